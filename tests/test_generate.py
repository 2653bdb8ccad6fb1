"""examples/generate.py: files named safely, written only into --output-dir, existing files checked first."""

import errno
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, call_main, tiny_class_pipeline, tiny_text_pipeline

from enat_diffusers.utils.cli import OutputLock
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


# ------------------------------------------------------------------------------------ the output-folder policy


def one_error_line(stderr: str) -> bool:
    """The error is one line at the end (progress bars may come before it), with no traceback."""
    lines = stderr.strip().splitlines()
    return "Traceback" not in stderr and lines[-1].startswith("error: ") and sum("error" in x for x in lines) == 1


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_leaves_no_stale_images(tmp_path, text_model, monkeypatch):
    args = ("--model", text_model, "--steps", 2, "--output-dir", "out", "--overwrite")
    assert generate_here(*args, "--prompt", "a", "b", "c", cwd=tmp_path, monkeypatch=monkeypatch)[0] == 0
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, stderr = generate_here(*args, "--prompt", "d", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, stderr
    out = tmp_path / "out"
    index = json.loads((out / "images.json").read_text())
    assert [entry["file"] for entry in index] == sorted(p.name for p in out.glob("image_*.png")) == ["image_00.png"]
    assert (out / "notes.txt").read_text() == "mine"  # not a file of this tool: kept
    assert listing(out) == ["grid.png", "image_00.png", "images.json", "notes.txt", "reveal.gif", "reveal_strip.png"]


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, text_model, monkeypatch):
    out = tmp_path / "out"
    with OutputLock(out, "--output-dir out"):  # a run that is writing there now
        code, stderr = generate_here("--model", text_model, "--prompt", "a", "--output-dir", out, "--steps", 2,
                                     cwd=tmp_path, monkeypatch=monkeypatch)  # fmt: skip
        assert code == 1 and "another run (process" in stderr and "is writing into --output-dir" in stderr
        assert listing(out) == [".enat-diffusers.lock"]
    assert listing(out) == []


def test_the_model_folder_is_never_the_output(tmp_path, text_model, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(text_model, model)
    (model / "image_00.png").write_bytes(b"the model card's picture")
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    for output_dir in (model, tmp_path):  # the model folder, and a folder holding it
        code, stderr = generate_here("--model", model, "--prompt", "a", "--output-dir", output_dir, "--overwrite",
                                     cwd=tmp_path, monkeypatch=monkeypatch)  # fmt: skip
        assert code == 1 and "the input" in stderr and "an output folder may never hold a run's inputs" in stderr
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "problem, message",
    [
        ("not a pipeline", "is not a pipeline folder: it has no model_index.json"),
        ("a component", "it looks like one component of a pipeline: pass its parent folder"),
        ("a string size", "config.json: hidden_size must be an integer, got '128'"),
        ("cuda", "--device cuda: CUDA is not available"),
    ],
)
def test_unusable_models_and_devices_are_one_line(tmp_path, text_model, monkeypatch, problem, message):
    if problem == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = tmp_path / "model"
    shutil.copytree(text_model, model)
    args = ["--model", model, "--prompt", "a", "--output-dir", tmp_path / "out"]
    if problem == "not a pipeline":
        (model / "model_index.json").unlink()
    elif problem == "a component":
        args[1] = model / "transformer"
    elif problem == "a string size":
        config = json.loads((model / "transformer" / "config.json").read_text())
        (model / "transformer" / "config.json").write_text(json.dumps({**config, "hidden_size": "128"}))
    else:
        args += ["--device", "cuda"]
    code, stderr = generate_here(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 1 and one_error_line(stderr) and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folders_fail_before_the_work(tmp_path, monkeypatch):
    """Checked before the model is loaded: with a folder that is no pipeline as --model, the error is the output's."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "not-a-model").mkdir()
    cases = [(tmp_path / "file" / "out", "cannot be created: "), (tmp_path / "file", "exists and is a file")]
    if Path("/proc/self").is_dir():  # a read-only file system for everyone, root included
        cases.append((Path("/proc/enat-out"), "cannot be written (in /proc)"))
    for output_dir, message in cases:
        code, stderr = generate_here("--model", tmp_path / "not-a-model", "--prompt", "a", "--output-dir", output_dir,
                                     cwd=tmp_path, monkeypatch=monkeypatch)  # fmt: skip
        assert code == 1 and message in stderr and "not a pipeline" not in stderr, stderr


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, text_model, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else "")

    monkeypatch.setattr(PIL.Image.Image, "save", no_space)
    code, stderr = generate_here("--model", text_model, "--prompt", "a", "--steps", 2, "--output-dir", "out",
                                 cwd=tmp_path, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 1 and "No space left on device" in stderr and "(the disk is full)" in stderr
    assert one_error_line(stderr) and not (tmp_path / "out").exists()
