import math

import pytest
import torch

from enat_diffusers import MaskedTokenScheduler
from enat_diffusers.conversion.checkpoints import AUTONAT_L_T8_STRATEGY
from enat_diffusers.schedulers.scheduling_masked_token import sample_categorical


MASK = 1024


def run(scheduler, seq_len=256, batch=2, generator=None, steps=8, start=None, **set_kwargs):
    """Runs the scheduler on random logits; returns the id tensors after every step."""
    scheduler.set_timesteps(steps, **set_kwargs)
    ids = torch.full((batch, seq_len), MASK) if start is None else start.clone()
    logits_generator = torch.Generator().manual_seed(123)
    trace = []
    for t in scheduler.timesteps:
        logits = torch.randn(batch, seq_len, MASK, generator=logits_generator)
        out = scheduler.step(logits, t, ids, generator=generator)
        trace.append(out)
        ids = out.prev_sample
    return trace


@pytest.mark.parametrize(
    "seq_len, expected",
    [
        (256, [251, 236, 212, 181, 142, 97, 49, 0]),
        (1024, [1004, 946, 851, 724, 568, 391, 199, 0]),
    ],
)
def test_masked_counts_follow_the_cosine_schedule(seq_len, expected):
    trace = run(MaskedTokenScheduler(), seq_len=seq_len, generator=torch.Generator().manual_seed(0))
    counts = [int((out.prev_sample == MASK).sum(1).unique().item()) for out in trace]
    assert counts == expected
    assert not (trace[-1].pred_original_sample == MASK).any()
    assert torch.equal(trace[-1].pred_original_sample, trace[-1].prev_sample)


def test_schedule_values():
    scheduler = MaskedTokenScheduler(guidance_scale=2.5, mask_temperature=1.5, sampling_temperature=6.0)
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.tolist() == list(range(8))
    assert scheduler.step_guidance_scales == [(k / 8) * 2.5 for k in range(8)]
    assert scheduler.step_sampling_temperatures[:2] == [5.25, 4.5] and scheduler.step_sampling_temperatures[-1] == 1e-3
    assert (
        scheduler.step_mask_temperatures[0] == pytest.approx(1.5 * 7 / 8) and scheduler.step_mask_temperatures[-1] == 0
    )
    assert scheduler.step_mask_ratios[-1] == math.cos(math.pi / 2) > 0  # float64: positive, floor(L * r) = 0
    scheduler.set_timesteps(8, sampling_temperature=0, guidance_scale=1.0)
    assert scheduler.step_sampling_temperatures == [0.0] * 8  # 0 means argmax, not the 1e-3 floor
    assert scheduler.step_guidance_scales[-1] == 7 / 8


def test_visible_tokens_are_never_remasked_or_changed():
    start = torch.full((2, 256), MASK)
    start[:, ::3] = torch.arange(86) % 1024  # 86 given tokens, more than the schedule keeps at the first steps
    for out in run(MaskedTokenScheduler(), start=start, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(out.prev_sample[:, ::3], start[:, ::3])
        assert torch.equal(out.pred_original_sample[:, ::3], start[:, ::3])


def test_revealed_tokens_stay_revealed():
    trace = run(MaskedTokenScheduler(), generator=torch.Generator().manual_seed(0))
    for before, after in zip(trace, trace[1:]):
        revealed = before.prev_sample != MASK
        assert torch.equal(after.prev_sample[revealed], before.prev_sample[revealed])


def test_randomness_only_from_the_generator():
    scheduler = MaskedTokenScheduler()
    a = run(scheduler, generator=torch.Generator().manual_seed(7))[-1].prev_sample
    torch.manual_seed(999)  # the global RNG must not matter
    b = run(scheduler, generator=torch.Generator().manual_seed(7))[-1].prev_sample
    c = run(scheduler, generator=torch.Generator().manual_seed(8))[-1].prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_zero_is_deterministic_argmax():
    scheduler = MaskedTokenScheduler()
    kwargs = dict(mask_temperature=0, sampling_temperature=0)
    a = run(scheduler, generator=torch.Generator().manual_seed(1), **kwargs)
    b = run(scheduler, generator=torch.Generator().manual_seed(2), **kwargs)
    assert all(torch.equal(x.prev_sample, y.prev_sample) for x, y in zip(a, b))
    logits = torch.randn(1, 16, MASK)
    scheduler.set_timesteps(1, **kwargs)
    out = scheduler.step(logits, 0, torch.full((1, 16), MASK))
    assert torch.equal(out.prev_sample, logits.argmax(-1))


def test_list_of_generators_makes_rows_independent():
    scheduler = MaskedTokenScheduler()
    batch = run(scheduler, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])[0].prev_sample
    scheduler.set_timesteps(8)
    logits = torch.randn(2, 256, MASK, generator=torch.Generator().manual_seed(123))
    single = scheduler.step(logits[1:], 0, torch.full((1, 256), MASK), generator=[torch.Generator().manual_seed(4)])
    assert torch.equal(batch[1:], single.prev_sample)
    with pytest.raises(ValueError, match="list of 3 generators for a batch of 2"):
        scheduler.step(logits, 0, torch.full((2, 256), MASK), generator=[torch.Generator()] * 3)


def test_categorical_sampler_matches_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    uniform = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    draws = sample_categorical(probs.log().expand(200_000, 5), uniform)
    frequencies = torch.bincount(draws, minlength=5).float() / 200_000
    assert torch.allclose(frequencies, probs, atol=0.005)
    assert frequencies[4] == 0


def test_grid_shaped_samples():
    scheduler = MaskedTokenScheduler(mask_token_id=8)
    scheduler.set_timesteps(2)
    out = scheduler.step(torch.randn(2, 16, 8), 0, torch.full((2, 4, 4), 8), generator=torch.Generator())
    assert out.prev_sample.shape == (2, 4, 4) and (out.prev_sample == 8).sum() == 2 * 11  # floor(16 * cos(pi/4))


def test_autonat_strategy_round_trips_and_drives_the_steps(tmp_path):
    scheduler = MaskedTokenScheduler(**AUTONAT_L_T8_STRATEGY)
    scheduler.save_pretrained(tmp_path)
    loaded = MaskedTokenScheduler.from_pretrained(tmp_path)
    assert loaded.config.mask_ratios == AUTONAT_L_T8_STRATEGY["mask_ratios"]
    assert loaded.config.guidance_scales == AUTONAT_L_T8_STRATEGY["guidance_scales"]
    assert loaded.strategy_num_steps == 8
    trace = run(loaded, generator=torch.Generator().manual_seed(0))
    counts = [int((out.prev_sample == MASK).sum(1).unique().item()) for out in trace]
    assert counts == [math.floor(256 * r) for r in AUTONAT_L_T8_STRATEGY["mask_ratios"]] + [0]
    assert loaded.step_guidance_scales == AUTONAT_L_T8_STRATEGY["guidance_scales"]
    assert loaded.step_sampling_temperatures == AUTONAT_L_T8_STRATEGY["sampling_temperatures"]
    assert loaded.step_mask_temperatures == AUTONAT_L_T8_STRATEGY["mask_temperatures"] + [0.0]


def test_invalid_configurations_and_arguments():
    with pytest.raises(ValueError, match="strategy is for 8 steps"):
        MaskedTokenScheduler(**AUTONAT_L_T8_STRATEGY).set_timesteps(4)
    with pytest.raises(ValueError, match="cannot override"):
        MaskedTokenScheduler(**AUTONAT_L_T8_STRATEGY).set_timesteps(8, guidance_scale=3.0)
    with pytest.raises(ValueError, match="disagree on the number of steps"):
        MaskedTokenScheduler(mask_ratios=[0.5, 0.2], guidance_scales=[0, 1])
    with pytest.raises(ValueError, match="non-increasing"):
        MaskedTokenScheduler(mask_ratios=[0.5, 0.7])
    with pytest.raises(ValueError, match="mask_temperature must be finite non-negative"):
        MaskedTokenScheduler().set_timesteps(8, mask_temperature=-1)
    with pytest.raises(ValueError, match="guidance_scale must be finite non-negative"):
        MaskedTokenScheduler(guidance_scale=-2)
    with pytest.raises(ValueError, match="positive integer"):
        MaskedTokenScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        MaskedTokenScheduler().step(torch.randn(1, 4, 8), 0, torch.zeros(1, 4, dtype=torch.long))


def test_add_noise_masks_a_beta_distributed_count_per_batch():
    scheduler = MaskedTokenScheduler(mask_token_id=1024)
    clean = torch.randint(0, 1024, (4, 256))
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        noisy = scheduler.add_noise(clean, generator=generator)
        per_row = (noisy == MASK).sum(1)
        assert (per_row == per_row[0]).all()  # one ratio for the whole batch
        assert torch.equal(noisy[noisy != MASK], clean[noisy != MASK])
        counts.append(per_row[0].item())
    counts = torch.tensor(counts, dtype=torch.float)
    assert counts.min() >= 1 and counts.max() <= 255
    assert counts.mean() / 256 == pytest.approx(12 / 15, abs=0.02)  # Beta(12, 3) mean 0.8
    assert counts.std() / 256 == pytest.approx(math.sqrt(12 * 3 / (15**2 * 16)), abs=0.015)

    a = scheduler.add_noise(clean, generator=torch.Generator().manual_seed(5))
    b = scheduler.add_noise(clean, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert ((scheduler.add_noise(clean, mask_ratio=1.0) == MASK).sum(1) == 255).all()  # clamped to L - 1
    assert ((scheduler.add_noise(clean, mask_ratio=0.0) == MASK).sum(1) == 1).all()  # and to 1
    assert ((scheduler.add_noise(clean.reshape(4, 16, 16), mask_ratio=0.5) == MASK).sum((1, 2)) == 128).all()


def test_partly_masked_starts_and_guidance_overrides():
    scheduler = MaskedTokenScheduler(mask_token_id=8, guidance_scale=2.5)
    scheduler.set_timesteps(4, num_masked=16)  # every token of a 4x4 grid: ENAT's rule, unscaled
    start = torch.full((1, 16), 8)
    out = scheduler.step(torch.randn(1, 16, 8), 0, start, generator=torch.Generator().manual_seed(0))
    assert int((out.prev_sample == 8).sum()) == math.floor(16 * math.cos(math.pi / 8))
    scheduler.set_timesteps(4, num_masked=6)
    with pytest.raises(ValueError, match=r"num_masked=6\) but the first step's sample has 16 masked"):
        scheduler.step(torch.randn(1, 16, 8), 0, start)
    # the override follows ENAT's ramp exactly; unchanged, it is the schedule itself
    assert [scheduler.guidance_scale_at(k) for k in range(4)] == scheduler.step_guidance_scales
    assert [scheduler.guidance_scale_at(k, 2.5) for k in range(4)] == scheduler.step_guidance_scales
    assert [scheduler.guidance_scale_at(k, 0.0) for k in range(4)] == [0.0] * 4
    listed = MaskedTokenScheduler(mask_token_id=8, guidance_scales=[0.0, 1.0, 2.0])
    listed.set_timesteps(3)
    assert listed.guidance_scale_at(2, 0.0) == 0.0
    with pytest.raises(ValueError, match="can only switch guidance off"):
        listed.guidance_scale_at(2, 1.5)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        scheduler.set_timesteps(True)
