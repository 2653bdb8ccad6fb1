"""examples/generate.py: files named safely, written only into --output-dir, existing files checked first."""

import importlib.util
import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, call_main, tiny_class_pipeline, tiny_text_pipeline

from enat_diffusers.visualization import RevealRecorder, captioned_grid


GENERATE = ROOT / "examples" / "generate.py"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-text"
    tiny_text_pipeline().save_pretrained(folder)
    return folder


def generate_here(*args, cwd, monkeypatch) -> (int, str):
    """examples/generate.py's `main` in this process, run from `cwd`: (exit code, stderr with the exit message)."""
    spec = importlib.util.spec_from_file_location("enat_generate_example", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(cwd)
    return call_main(module.main, *args)


def test_prompts_never_become_paths(tmp_path, text_model, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    prompts = ["x/../../escaped", "a/b", "../up"]
    args = ("--model", text_model, "--prompt", *prompts, "--steps", 2, "--output-dir", "out")
    code, stderr = generate_here(*args, cwd=work, monkeypatch=monkeypatch)
    assert code == 0, stderr
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(str(p).startswith("work/out/") for p in written), written
    out = work / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png",
        "image_00.png",
        "image_01.png",
        "image_02.png",
        "images.json",
        "reveal.gif",
        "reveal_strip.png",
    ]
    index = json.loads((out / "images.json").read_text())
    assert [entry["condition"] for entry in index] == prompts and [entry["seed"] for entry in index] == [0, 1, 2]
    gif = PIL.Image.open(out / "reveal.gif")
    assert gif.n_frames == 2

    # a second run is refused before generating, and nothing changes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ("--model", text_model, "--prompt", "new", "--steps", 2, "--output-dir", "out")
    code, stderr = generate_here(*args, cwd=work, monkeypatch=monkeypatch)
    assert code != 0 and "exists; pass --overwrite" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_sampling_option_is_a_clear_error(tmp_path, text_model, monkeypatch):
    # in-process, an unhandled exception (a traceback for a user) would fail the test by itself
    args = ("--model", text_model, "--prompt", "a", "--guidance-scale", "inf", "--output-dir", tmp_path / "o")
    code, stderr = generate_here(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert code != 0 and "guidance_scale must be a finite" in stderr
    assert not (tmp_path / "o").exists()


def test_reveal_frames_fade_masked_cells_and_end_on_the_image():
    pipe = tiny_class_pipeline()
    recorder = RevealRecorder()
    final = pipe(class_labels=[3], num_inference_steps=4, callback_on_step_end=recorder, output_type="pt").images
    frames = recorder.frames(pipe, scale=1)
    assert len(frames) == 4 and frames[0].size == (8, 8)
    last = torch.from_numpy(np.asarray(frames[-1])).float().reshape(8, 8, 3).permute(2, 0, 1) / 255
    assert torch.allclose(last, final[0], atol=1 / 255 + 1e-6)  # nothing masked after the last step
    first = torch.from_numpy(np.asarray(frames[0])).float().reshape(-1, 3)
    assert not torch.allclose(first / 255, last.permute(1, 2, 0).reshape(-1, 3), atol=0.02)


def test_captioned_grid_layout():
    images = [PIL.Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    grid = captioned_grid(images, ["one", "two", "a much longer caption that wraps over lines"], columns=2, scale=2)
    assert grid.width == 2 * (32 + 6) + 6 and grid.height > 2 * 32
    with pytest.raises(ValueError, match="one caption per image"):
        captioned_grid(images, ["one"])
