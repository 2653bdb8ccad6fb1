"""examples/search_strategy.py: AutoNAT's strategy search (clipping, gradient estimate, SGD with momentum), its files,
and the expansion of a scheduler's schedule into explicit lists."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, call_main, tiny_class_pipeline

from enat_diffusers import ENATPipeline, MaskedTokenScheduler


SHIPPED = ROOT / "pretrained" / "enat-shapes"
spec = importlib.util.spec_from_file_location("search_strategy_example", ROOT / "examples" / "search_strategy.py")
search_strategy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(search_strategy)
flatten, unflatten = search_strategy.flatten, search_strategy.unflatten


@pytest.fixture(scope="module")
def shipped():
    pipe = ENATPipeline.from_pretrained(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quadratic(target, weights):
    """A toy metric of the strategy vector (it ignores the pipeline): sum w_i (x_i - c_i)^2."""
    return lambda pipe, strategy: float(np.sum(weights * (flatten(strategy) - target) ** 2))


def test_clipping_keeps_strategies_valid():
    rng = np.random.default_rng(0)
    steps, gap = 5, 1 / 256
    for _ in range(200):
        clipped = search_strategy.clip_vector(rng.normal(0.5, 1.5, size=4 * steps - 2), steps, gap)
        ratios, rest = clipped[: steps - 1], clipped[steps - 1 :]
        assert np.all(np.diff(ratios) <= -gap + 1e-12) and ratios[0] <= 0.99 and ratios[-1] >= gap - 1e-12
        assert np.all(rest >= 1e-4)
        np.testing.assert_allclose(search_strategy.clip_vector(clipped, steps, gap), clipped, atol=1e-12)
        MaskedTokenScheduler(**unflatten(clipped, steps))  # a valid config
    # the original's clip: ratios into [0, 0.99], the rest to >= 1e-4
    vector = [1.3, 0.5, -0.2, -1.0, 0.0, 2.0, 0.0, 0.5, 1.0, 0.0]
    expected = [0.99, 0.5, 1e-4, 1e-4, 1e-4, 2.0, 1e-4, 0.5, 1.0, 1e-4]
    np.testing.assert_allclose(search_strategy.clip_vector(vector, 3, 0.0), expected)
    # increasing ratios go to the closest decreasing ones: [0.4, 0.6] -> [0.55, 0.45] with a gap of 0.1
    np.testing.assert_allclose(search_strategy.clip_ratios(np.array([0.4, 0.6]), 0.1), [0.55, 0.45])
    np.testing.assert_allclose(search_strategy.clip_ratios(np.array([0.3, 0.9, 0.6, 0.1]), 0.0), [0.6, 0.6, 0.6, 0.1])


def test_finite_differences_stay_valid():
    steps, gap = 4, 0.01
    init = {
        "mask_ratios": [0.99, 0.5, 0.49],  # the first cannot go up, nor the third (the gap to the second)
        "mask_temperatures": [1e-4, 1.0, 2.0],
        "sampling_temperatures": [1.0] * 4,
        "guidance_scales": [1.0] * 4,
    }
    evaluated = []
    search = search_strategy.StrategySearch(
        lambda pipe, strategy: 0.0, None, init, min_ratio_gap=gap, on_evaluation=evaluated.append
    )
    vector = search.vector
    np.testing.assert_allclose(vector[:3], [0.99, 0.5, 0.49])  # valid already
    assert search.perturbed_value(vector, 0) == pytest.approx(0.98)  # no room up: 0.01 down
    assert search.perturbed_value(vector, 1) == pytest.approx(0.51)  # +0.01
    assert search.perturbed_value(vector, 2) == pytest.approx(0.48)  # 0 up (gap), 0.01 down
    assert search.perturbed_value(vector, 3) == pytest.approx(0.1001)  # temperatures: +0.1
    search.estimate_gradient()
    assert len(evaluated) == 1 + 4 * steps - 2
    for record in evaluated:
        MaskedTokenScheduler(**record["strategy"])
        ratios = record["strategy"]["mask_ratios"]
        assert all(a - b >= gap - 1e-12 for a, b in zip(ratios, ratios[1:]))
    # a coordinate pinned by its neighbours is not evaluated
    pinned = {**init, "mask_ratios": [0.5, 0.49, 0.48]}
    evaluated.clear()
    search = search_strategy.StrategySearch(
        lambda pipe, strategy: 0.0, None, pinned, min_ratio_gap=gap, on_evaluation=evaluated.append
    )
    search.estimate_gradient()
    assert "mask_ratios[1]" not in [record["candidate"] for record in evaluated]
    assert len(evaluated) == 1 + 4 * steps - 3


def test_gradient_estimate_and_sgd_momentum_by_hand():
    steps = 3
    init = search_strategy.autonat_init(steps)
    x0 = flatten(init)
    target = np.array([0.8, 0.3, 0.6, 0.2, 1.5, 1.2, 0.9, 0.5, 1.0, 2.0])
    weights = np.arange(1, 11, dtype=float)
    ratio_lr, lr, momentum, ratio_delta, delta = 1e-2, 0.05, 0.5, 0.01, 0.1
    search = search_strategy.StrategySearch(
        quadratic(target, weights),
        None,
        init,
        mode="min",
        ratio_lr=ratio_lr,
        lr=lr,
        momentum=momentum,
        ratio_delta=ratio_delta,
        delta=delta,
    )
    deltas = np.array([ratio_delta] * 2 + [delta] * 8)
    lrs = np.array([ratio_lr] * 2 + [lr] * 8)

    def forward_difference(x):  # exact for a quadratic: w (2 (x - c) + d)
        return weights * (2 * (x - target) + deltas)

    g0 = forward_difference(x0)
    np.testing.assert_allclose(search.estimate_gradient(), g0, rtol=1e-6)
    search.step()  # torch SGD: buffer = g, x -= lr * buffer
    x1 = x0 - lrs * g0
    np.testing.assert_allclose(search.vector, x1, rtol=1e-6)
    search.step()  # buffer = momentum * buffer + g
    g1 = forward_difference(x1)
    np.testing.assert_allclose(search.vector, x1 - lrs * (momentum * g0 + g1), rtol=1e-6)
    assert search.iteration == 2 and search.num_evaluations == 1 + 2 * (10 + 1) + 10  # one gradient ran twice


def test_search_climbs_toward_the_optimum():
    steps = 4
    init = search_strategy.autonat_init(steps)
    target = flatten(init) + np.array([-0.1, -0.05, -0.05] + [0.4] * 11)  # a valid strategy
    weights = np.array([100.0] * 3 + [1.0] * 11)
    metric = lambda pipe, strategy: -quadratic(target, weights)(pipe, strategy)  # noqa: E731  higher is better
    records = []
    search = search_strategy.StrategySearch(metric, None, init, mode="max", on_evaluation=records.append)
    start = np.abs(search.vector - target)
    for _ in range(15):
        search.step()
    assert np.all(np.abs(search.vector - target) < 0.5 * start)
    bases = [record for record in records if record["candidate"] == "base"]
    assert len(bases) == 16 and len(records) == 16 + 15 * (4 * steps - 2)
    assert search.best["value"] == max(record["value"] for record in bases) > 0.02 * bases[0]["value"]


def test_autonat_initialisation_and_strategy_files(tmp_path):
    init = search_strategy.autonat_init(8)
    np.testing.assert_allclose(init["mask_ratios"], [math.cos(k * math.pi / 16) for k in range(1, 8)])
    np.testing.assert_allclose(init["mask_temperatures"], [1 - k / 8 for k in range(7)])
    assert init["sampling_temperatures"] == [1.0] * 8
    np.testing.assert_allclose(init["guidance_scales"], [k / 8 for k in range(1, 9)])

    yaml_file = tmp_path / "AutoNAT_L-T8_strategy.yaml"
    yaml_file.write_text(
        "manual_ratios: [0.9532, 0.8795, 0.7940, 0.7460, 0.6250, 0.4073, 0.2607]\n"
        "manual_temp: [2.405, 2.478, 1.192, 0.769, 1.067, 0.935, 0.784]\n"
        "manual_samp_temp: [2.900, 1.867, 1.144, 1.380, 1.470, 1.376, 1.708, 0.713]\n"
        "manual_cfg: [0.0001, 0.0001, 0.0001, 0.915, 1.616, 1.195, 1.383, 1.227]\n"
    )
    strategy = search_strategy.load_strategy(yaml_file, MaskedTokenScheduler())
    assert strategy["mask_ratios"][0] == 0.9532 and strategy["guidance_scales"][-1] == 1.227
    assert search_strategy.strategy_num_steps(strategy) == 8
    # a scheduler config with some lists: the others are the scheduler's schedule expanded at its number of steps
    json_file = tmp_path / "partial.json"
    json_file.write_text(json.dumps({"mask_token_id": 8, "mask_ratios": [0.8, 0.3], "guidance_scales": None}))
    strategy = search_strategy.load_strategy(json_file, MaskedTokenScheduler(guidance_scale=3.0))
    assert strategy["mask_ratios"] == [0.8, 0.3] and strategy["guidance_scales"] == [0.0, 1.0, 2.0]
    json_file.write_text(json.dumps({"mask_ratios": [0.8, 0.3], "sampling_temperatures": [1.0]}))
    with pytest.raises(ValueError, match="disagree"):
        search_strategy.load_strategy(json_file, MaskedTokenScheduler())


@pytest.mark.parametrize("steps", [3, 6])
def test_default_expansion_reproduces_the_scheduler(steps):
    pipe = tiny_class_pipeline()
    pipe.scheduler = MaskedTokenScheduler(
        mask_token_id=8, guidance_scale=2.0, mask_temperature=3.0, sampling_temperature=1.5
    )

    def ids(scheduler):
        pipe.scheduler = scheduler
        generator = [torch.Generator().manual_seed(i) for i in range(8)]
        labels = list(range(8))
        return pipe(class_labels=labels, num_inference_steps=steps, generator=generator, output_type="latent").images

    formula = pipe.scheduler
    lists = search_strategy.expand_schedule(formula, steps)
    explicit = search_strategy.strategy_scheduler(pipe, lists)
    assert explicit.strategy_num_steps == steps and formula.strategy_num_steps is None
    assert torch.equal(ids(formula), ids(explicit))
    # the test sees a small change of the lists: a guidance ramp shifted by one step
    shifted = {**lists, "guidance_scales": [2.0 * (k + 1) / steps for k in range(steps)]}
    assert not torch.equal(ids(formula), ids(search_strategy.strategy_scheduler(pipe, shifted)))


def test_shapes_metric_is_the_same_on_any_number_of_processes(shipped, monkeypatch):
    prompts = search_strategy.evaluation_prompts(3, seed=1)
    strategy = search_strategy.expand_schedule(shipped.scheduler, 2)
    single = search_strategy.ShapesAccuracy(prompts, batch_size=1)
    expected = single.correct(shipped, strategy)
    assert shipped.scheduler.strategy_num_steps is None  # the pipeline's scheduler is put back

    class Process:
        def __init__(self, index):
            self.process_index, self.num_processes = index, 2

    shards = []  # what each of two processes computes; gather_object concatenates them
    monkeypatch.setattr("accelerate.utils.gather_object", lambda items: shards.append(items) or items)
    for index in (0, 1):
        search_strategy.ShapesAccuracy(prompts, batch_size=1, accelerator=Process(index)).correct(shipped, strategy)
    assert [batch for batch, _ in shards[0]] == [0, 2] and [batch for batch, _ in shards[1]] == [1]
    gathered = sorted(shards[0] + shards[1], key=lambda item: item[0])
    assert [flag for _, flags in gathered for flag in flags] == expected


def test_search_cli_writes_a_loadable_strategy_and_its_log(tmp_path, shipped):
    output, log = tmp_path / "strategy.json", tmp_path / "search.jsonl"
    args = ["search", "--model", SHIPPED, "--steps", 2, "--num-prompts", 2, "--iterations", 1]
    args += ["--output", output, "--log", log]
    code, stderr = call_main(search_strategy.main, *args)
    assert code == 0, stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 1 + (1 + 1 + 2 + 2) + 1  # start, one finite difference per coordinate, the update
    assert [r["candidate"] for r in records[:3]] == ["base", "mask_ratios[0]", "mask_temperatures[0]"]
    assert {r["iteration"] for r in records} == {0, 1} and all(0 <= r["value"] <= 100 for r in records)
    strategy = json.loads(output.read_text())
    assert set(strategy) == set(search_strategy.STRATEGY_KEYS)
    best = max((r for r in records if r["candidate"] == "base"), key=lambda r: r["value"])
    assert strategy == best["strategy"]

    scheduler = MaskedTokenScheduler.from_config(shipped.scheduler.config, **strategy)
    pipe = ENATPipeline(**{**shipped.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a small red circle on the left", output_type="latent").images.shape == (1, 16, 16)  # 2 steps

    before = output.read_text(), log.read_text()
    code, stderr = call_main(search_strategy.main, *args)
    assert code == 1 and "exists; pass --overwrite" in stderr
    assert (output.read_text(), log.read_text()) == before

    report = tmp_path / "eval.json"
    args = ["evaluate", "--model", SHIPPED, "--scheduler-config", output, "--num-prompts", 1, "--json", report]
    code, stderr = call_main(search_strategy.main, *args)
    assert code == 0, stderr
    result = json.loads(report.read_text())
    assert result["steps"] == 2 and result["seen"]["num_prompts"] == 1 and result["held_out"]["num_prompts"] == 1


def test_cli_refuses_outputs_that_are_inputs_and_impossible_counts(tmp_path):
    strategy = tmp_path / "strategy.json"
    strategy.write_text(json.dumps({"mask_ratios": [0.5], "mask_temperatures": [1.0]}))
    before = strategy.read_text()
    args = ["evaluate", "--model", SHIPPED, "--scheduler-config", strategy, "--num-prompts", 1]
    code, stderr = call_main(search_strategy.main, *args, "--json", strategy, "--overwrite")
    assert code == 1 and "is an input of this run" in stderr and strategy.read_text() == before
    same = ["search", "--model", SHIPPED, "--output", tmp_path / "a.json", "--log", tmp_path / "a.json"]
    assert "name the same file" in call_main(search_strategy.main, *same)[1]
    for count in (-1, 100000):
        code, stderr = call_main(search_strategy.main, "evaluate", "--model", SHIPPED, "--num-prompts", count)
        assert code == 2 and "--num-prompts" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strategy.json"]


def test_fid_metric_scores_the_generated_images(tmp_path, monkeypatch):
    fid = pytest.importorskip("enat_diffusers.evaluation.fid")
    torch.manual_seed(0)
    projection = torch.randn(3 * 8 * 8, 64)  # a stand-in for the Inception network (no weights here), 64 features

    class Features(torch.nn.Module):
        def forward(self, images):
            assert images.dtype == torch.uint8
            features = images.flatten(1).float() / 255 @ projection
            return features, features  # (features, logits)

    monkeypatch.setattr(fid, "load_inception", lambda path, device: Features())
    reference = tmp_path / "stats.npz"
    fid.save_statistics(reference, np.full(64, 0.5), np.eye(64))
    pipe = tiny_class_pipeline()
    strategy = search_strategy.autonat_init(3)
    score = search_strategy.FIDScore(list(range(10)), 6, reference, "pt_inception.pth", batch_size=4)
    assert score.mode == "min"

    run = ENATPipeline(**{**pipe.components, "scheduler": search_strategy.strategy_scheduler(pipe, strategy)})
    images = []
    for start, end in ((0, 4), (4, 6)):  # the metric's batches
        generator = [torch.Generator().manual_seed(i) for i in range(start, end)]
        images.append(run(class_labels=list(range(start, end)), generator=generator, output_type="pt").images)
    expected = Features()(fid.to_uint8(torch.cat(images)))[0].numpy()
    np.testing.assert_allclose(score.features(pipe, strategy), expected, rtol=1e-5, atol=1e-5)
    assert score(pipe, strategy) == pytest.approx(fid.frechet_distance(expected, *fid.load_statistics(reference)))
