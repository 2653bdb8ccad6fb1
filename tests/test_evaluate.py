"""examples/evaluate.py and enat_diffusers.evaluation.fid: FID, Inception Score and CLIP score on small real data.

The Inception network is torch-fidelity's FID InceptionV3 with random (seeded) weights, saved in the format of
pt_inception-2015-12-05-6726825d.pth and loaded through `--inception-weights`, as the real weights would be. Most
FIDs here use the 64-d features (`--fid-features 64`): on one CPU thread the 2048 x 2048 eigenvalue problem of a
2048-d FID takes about 10 s, so only one test computes it.
"""

import dataclasses
import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, call_main, tiny_class_pipeline, tiny_text_pipeline, tiny_tokenizer
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import ShapesDataset, caption_for, render_scene
from enat_diffusers.evaluation.fid import (
    FeatureExtractorInceptionV3,
    clip_scores,
    feature_statistics,
    frechet_distance,
    inception_score,
    list_images,
    load_clip,
    load_inception,
    load_statistics,
    read_images,
    to_uint8,
)


spec = importlib.util.spec_from_file_location("enat_evaluate_example", ROOT / "examples" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

NUM_IMAGES = 6
FEATURES = 64


def run(*args) -> (int, str):
    return call_main(evaluate.main, *args)


class _RandomInception(FeatureExtractorInceptionV3):
    def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
        return None


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Random FID-Inception weights as a plain state dict file (He-initialised so that activations stay O(1))."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    network = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def write_folder(folder: Path, scenes):
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, objects in enumerate(scenes):
            render_scene(objects).save(folder / f"{index:06d}.png")
            metadata.write(json.dumps({"file_name": f"{index:06d}.png", "text": caption_for(objects)}) + "\n")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """Folders of Shapes images: `a` and `b` (two seeds of the training distribution), `a_copy` (the files of `a`),
    `c` (the scenes of a third seed with every object a large red square: another distribution)."""
    root = tmp_path_factory.mktemp("shapes")
    scenes = {seed: [ShapesDataset(NUM_IMAGES, seed).scene(i) for i in range(NUM_IMAGES)] for seed in (0, 1, 2)}
    red_squares = [[dataclasses.replace(o, colour="red", shape="square", size="large") for o in s] for s in scenes[2]]
    folders = {
        "a": write_folder(root / "a", scenes[0]),
        "b": write_folder(root / "b", scenes[1]),
        "c": write_folder(root / "c", red_squares),
    }
    folders["a_copy"] = Path(shutil.copytree(folders["a"], root / "a_copy"))
    return folders


@pytest.fixture(scope="module")
def features(inception_weights, shapes) -> dict:
    """(64-d features, logits) of the folders a, b and c, through the library's loading and reading code."""
    inception = load_inception(inception_weights, feature_dim=FEATURES)
    with torch.no_grad():
        return {name: inception(read_images(list_images(shapes[name]))) for name in ("a", "b", "c")}


def fid_by_eigenvalues(x: np.ndarray, y: np.ndarray) -> float:
    """An independent FID of two feature sets (NumPy, the trace of the square root from the eigenvalues)."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sqrt_trace = np.sqrt(np.linalg.eigvals(cov_x @ cov_y).astype(complex)).real.sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * sqrt_trace)


def test_fid_is_zero_for_identical_sets_small_within_and_large_across_distributions(features):
    pool = {name: value[0] for name, value in features.items()}
    stats = {name: feature_statistics(value) for name, value in pool.items()}
    identical = frechet_distance(pool["a"], *stats["a"])
    same_distribution = frechet_distance(pool["b"], *stats["a"])
    other_distribution = frechet_distance(pool["c"], *stats["a"])
    assert abs(identical) < 1e-3
    assert 0.01 < same_distribution and other_distribution > 10 * same_distribution, (
        same_distribution,
        other_distribution,
    )
    # FID is symmetric, and agrees with an independent computation: the reference statistics enter exactly
    assert frechet_distance(pool["a"], *stats["b"]) == pytest.approx(same_distribution, rel=1e-6)
    for x, y in (("b", "a"), ("c", "a"), ("c", "b")):
        expected = fid_by_eigenvalues(pool[y].double().numpy(), pool[x].double().numpy())
        assert frechet_distance(pool[x], *stats[y]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(pool["a"][:1], *stats["a"])
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(pool["a"][:1])


@pytest.mark.filterwarnings(r"ignore:std\(\). degrees of freedom:UserWarning")  # one split has no spread
def test_inception_score_of_known_logits_and_of_images(features):
    classes = torch.arange(12) % 4
    confident = 50.0 * nn.functional.one_hot(classes, 1008).double()
    assert inception_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-6)  # 4 classes, each certain
    assert inception_score(torch.zeros(12, 1008), splits=3) == pytest.approx((1.0, 0.0), abs=1e-9)  # no information
    mean, std = inception_score(features["c"][1], splits=2)
    assert np.isfinite(mean) and np.isfinite(std) and mean >= 1.0
    assert inception_score(features["c"][1], splits=2) == (mean, std)  # repeatable: the shuffle is seeded
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(features["c"][1][:5], splits=10)


def test_inception_weights_are_checked(tmp_path, inception_weights):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048), "path": Path("x")}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_inception(tmp_path / "pickle.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_inception(tmp_path / "text.pth")
    state = torch.load(inception_weights, weights_only=True)
    state.pop("fc.bias")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="(?s)does not hold the FID InceptionV3 weights.*fc.bias"):
        load_inception(tmp_path / "partial.pth")


def test_reference_statistics_round_trip_and_identical_folders(tmp_path, inception_weights, shapes, features):
    weights = ("--inception-weights", inception_weights, "--fid-features", FEATURES)
    npz = tmp_path / "a.npz"
    code, stderr = run("--images-dir", shapes["a_copy"], "--reference-dir", shapes["a"], "--save-reference-stats", npz,
                       "--inception-score", "--is-splits", 3, "--json", tmp_path / "identical.json",
                       *weights)  # fmt: skip
    assert code == 0, stderr
    identical = json.loads((tmp_path / "identical.json").read_text())
    assert abs(identical["fid"]) < 1e-3
    assert identical["num_images"] == identical["reference_num_images"] == NUM_IMAGES
    expected_is = inception_score(features["a"][1], splits=3)
    assert (identical["inception_score_mean"], identical["inception_score_std"]) == pytest.approx(expected_is)
    assert "not the standard FID Inception file" in stderr  # random weights are not pt_inception
    mu, sigma = load_statistics(npz)
    expected_mu, expected_sigma = feature_statistics(features["a"][0])
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-6, atol=1e-9)
    with np.load(npz) as data:
        assert sorted(data.files) == ["mu", "sigma"]  # the ADM / ENAT format

    code, stderr = run("--images-dir", shapes["b"], "--num-images", 3, "--reference-stats", npz,
                       "--json", tmp_path / "from_npz.json", *weights)  # fmt: skip
    assert code == 0, stderr
    from_npz = json.loads((tmp_path / "from_npz.json").read_text())
    assert from_npz["num_images"] == 3 and from_npz["settings"]["fid_features"] == FEATURES
    expected_fid = frechet_distance(features["b"][0][:3], expected_mu, expected_sigma)
    assert from_npz["fid"] == pytest.approx(expected_fid, rel=1e-5)

    # statistics of other features, and existing files, are refused
    code, stderr = run("--images-dir", shapes["b"], "--reference-stats", npz, "--inception-weights", inception_weights)
    assert code == 1 and "holds statistics of 64-d features; pass --fid-features 64" in stderr
    before = npz.read_bytes()
    code, stderr = run("--reference-dir", shapes["b"], "--save-reference-stats", npz, *weights)
    assert code == 1 and "exists; pass --overwrite" in stderr and npz.read_bytes() == before


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    tiny_class_pipeline().save_pretrained(root / "class")
    tiny_text_pipeline().save_pretrained(root / "text")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=998, eos_token_id=999, pad_token_id=999),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(root / "clip")
    return {name: root / name for name in ("class", "text", "clip")}


def test_class_model_end_to_end_with_balanced_labels(tmp_path, inception_weights, shapes, models):
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in ("000000.png", "000001.png"):
        shutil.copy(shapes["c"] / name, reference)
    out = tmp_path / "samples"
    common = ("--inception-weights", inception_weights, "--inception-score", "--is-splits", 2)
    code, stderr = run("--model", models["class"], "--num-images", 4, "--batch-size", 3, "--steps", 2, "--seed", 3,
                       "--reference-dir", reference, "--save-images", out, "--json", tmp_path / "generated.json",
                       *common)  # fmt: skip
    assert code == 0, stderr
    generated = json.loads((tmp_path / "generated.json").read_text())
    assert generated["num_images"] == 4 and generated["settings"]["steps"] == 2
    assert generated["settings"]["fid_features"] == 2048  # the standard FID, the default
    assert np.isfinite(generated["fid"]) and generated["fid"] > 0 and generated["inception_score_mean"] >= 1.0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["class_label"] for r in records] == [0, 2, 5, 7]  # 4 images over 10 classes, balanced
    assert [r["seed"] for r in records] == [3, 4, 5, 6]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]

    # image i is the pipeline's image for its class and seed 3 + i, whatever the batches; what is saved is evaluated
    pipe = ENATPipeline.from_pretrained(models["class"])
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(4)]
    expected = pipe(class_labels=[0, 2, 5, 7], num_inference_steps=2, generator=generators, output_type="pt").images
    assert torch.equal(read_images(list_images(out)), to_uint8(expected))
    code, stderr = run("--images-dir", out, "--json", tmp_path / "saved.json", *common)
    assert code == 0, stderr
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert (saved["inception_score_mean"], saved["inception_score_std"]) == pytest.approx(
        (generated["inception_score_mean"], generated["inception_score_std"]), rel=1e-4, abs=1e-12
    )

    # saved images are refused before anything runs; --overwrite replaces them and removes the stale ones
    code, stderr = run("--model", models["class"], "--num-images", 4, "--save-images", out, *common)
    assert code == 1 and "000000.png exists; pass --overwrite" in stderr
    code, stderr = run("--model", models["class"], "--num-images", 2, "--steps", 2, "--save-images", out,
                       "--overwrite", *common)  # fmt: skip
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


def test_text_model_clip_score(tmp_path, models):
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "samples"
    code, stderr = run("--model", models["text"], "--prompts", tmp_path / "prompts.txt", "--num-images", 3,
                       "--steps", 2, "--clip-model", models["clip"], "--save-images", out,
                       "--json", tmp_path / "clip.json")  # fmt: skip
    assert code == 0, stderr
    result = json.loads((tmp_path / "clip.json").read_text())
    assert result["fid"] is None and result["num_images"] == 3
    texts = [json.loads(line)["text"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert texts == [prompts[0], prompts[1], prompts[0]]

    model, processor = load_clip(models["clip"])
    scores = clip_scores(model, processor, read_images(list_images(out)), texts)
    assert scores.shape == (3,) and bool(((scores >= -100) & (scores <= 100)).all())
    assert scores.mean().item() > 0  # this seed's random CLIP: the floor at 0 does not hide the value
    assert result["clip_score"] == pytest.approx(scores.mean().item(), rel=1e-5)

    code, stderr = run("--images-dir", out, "--clip-model", models["clip"], "--json", tmp_path / "again.json")
    assert code == 0, stderr
    assert json.loads((tmp_path / "again.json").read_text())["clip_score"] == pytest.approx(result["clip_score"])


def test_balanced_labels_and_process_shares():
    assert evaluate.balanced_class_labels(50, 10) == np.arange(10).repeat(5).tolist()  # ENAT's order
    assert np.bincount(evaluate.balanced_class_labels(10, 4)).tolist() == [3, 2, 3, 2]
    assert evaluate.balanced_class_labels(3, 10) == [0, 3, 6]
    for num_items, world in ((10, 3), (2, 4), (50000, 8)):
        shares = [evaluate.process_share(num_items, SimpleNamespace(process_index=r, num_processes=world))
                  for r in range(world)]  # fmt: skip
        assert [i for share in shares for i in share] == list(range(num_items))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_bad_inputs_are_refused_with_clear_errors(tmp_path, inception_weights, shapes, models):
    weights = ("--inception-weights", inception_weights)
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(shapes["a"] / "000000.png", one)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a large red circle on the left\n")
    cases = [
        ((), "give --model or --images-dir"),
        (("--images-dir", shapes["a"]), "nothing to compute"),
        (("--images-dir", shapes["a"], "--reference-dir", shapes["a"]), "need --inception-weights"),
        (("--images-dir", shapes["a"], "--reference-dir", shapes["a"], "--inception-weights", tmp_path / "no.pth"),
         "not found"),
        (("--images-dir", shapes["a"], "--reference-dir", empty, *weights), "No images in"),
        (("--images-dir", tmp_path / "missing", "--reference-dir", shapes["a"], *weights), "is not a folder"),
        (("--images-dir", one, "--reference-dir", shapes["a"], *weights), "FID needs at least 2 images, got 1"),
        (("--images-dir", shapes["a"], "--num-images", 1, "--reference-dir", shapes["a"], *weights), "at least 2"),
        (("--images-dir", shapes["a"], "--reference-stats", tmp_path / "bad.npz", *weights), "has no mu or sigma"),
        (("--images-dir", shapes["a"], "--reference-stats", tmp_path / "no.npz", *weights), "not found"),
        (("--images-dir", shapes["a"], "--inception-score", "--num-images", 5, *weights), "splits needs at least"),
        (("--images-dir", shapes["a"], "--reference-dir", shapes["a"], "--json", tmp_path / "exists.json", *weights),
         "exists; pass --overwrite"),
        (("--images-dir", one, "--clip-model", models["clip"]), "metadata.jsonl"),
        (("--images-dir", shapes["a"], "--clip-model", tmp_path / "no-clip"), "CLIP model folder"),
        (("--model", models["class"], "--prompts", tmp_path / "prompts.txt", "--inception-score", *weights),
         "class-conditional"),
        (("--model", models["class"], "--clip-model", models["clip"]), "class-conditional"),
        (("--model", models["text"], "--inception-score", *weights), "give --prompts"),
        (("--images-dir", shapes["a"], "--prompts", tmp_path / "prompts.txt", "--inception-score", *weights),
         "--prompts is for generation"),
        (("--save-reference-stats", tmp_path / "x.npz", *weights), "needs --reference-dir"),
        (("--model", models["text"], "--prompts", tmp_path / "prompts.txt", "--inception-score", *weights,
          "--save-images", models["text"], "--overwrite"), "is the input"),
        (("--model", models["text"], "--prompts", tmp_path / "prompts.txt", "--inception-score", *weights,
          "--json", tmp_path / "prompts.txt", "--overwrite"), "is an input of this run"),
        (("--model", models["text"], "--prompts", tmp_path / "prompts.txt", "--inception-score", *weights,
          "--json", tmp_path / "exists.json" / "x.json"), "does not exist"),
    ]  # fmt: skip
    for args, message in cases:
        code, stderr = run(*args)
        assert code == 1 and message in stderr, (args, stderr[-500:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "empty", "exists.json", "one", "prompts.txt"]
