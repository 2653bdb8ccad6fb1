"""No data loss, no writes outside the output folder, no silent garbage, clear errors instead of tracebacks."""

import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, call_converter, tiny_class_pipeline, tiny_text_pipeline
from diffusers.utils import logging as diffusers_logging

from enat_diffusers import MaskedTokenScheduler
from enat_diffusers.conversion import checkpoints as convert
from enat_diffusers.conversion.cli import write_atomically


TINY_ARGS = ["--num-attention-heads", 4, "--num-encoder-layers", 3]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def workdir(tmp_path):
    """A folder holding copies of the fixture checkpoints and a user file, as a user's working directory."""
    shutil.copy(FIXTURES / "enat_tiny.pth", tmp_path)
    shutil.copy(FIXTURES / "vqgan_tiny.ckpt", tmp_path)
    (tmp_path / "notes.txt").write_text("my notes")
    return tmp_path


# ------------------------------------------------------------------------------------------------- the converter


def test_overwrite_of_the_current_directory_is_refused_and_nothing_is_deleted(workdir, monkeypatch):
    before = snapshot(workdir)
    args = ["--transformer-checkpoint", "enat_tiny.pth", "--vqgan-checkpoint", "vqgan_tiny.ckpt", *TINY_ARGS]
    monkeypatch.chdir(workdir)
    code, stderr = call_converter(*args, "--output-dir", ".", "--overwrite")
    assert code != 0 and "is or contains the current directory" in stderr
    monkeypatch.chdir(workdir / "..")
    inputs = [a if a not in ("enat_tiny.pth", "vqgan_tiny.ckpt") else workdir / a for a in args]
    code, stderr = call_converter(*inputs, "--output-dir", workdir, "--overwrite")
    assert code != 0 and "contains the input" in stderr
    assert snapshot(workdir) == before


def test_an_output_folder_containing_the_input_is_refused(workdir):
    (workdir / "model").mkdir()
    shutil.move(workdir / "enat_tiny.pth", workdir / "model" / "enat_tiny.pth")
    before = snapshot(workdir)
    code, stderr = call_converter(
        "--transformer-checkpoint",
        workdir / "model" / "enat_tiny.pth",
        *TINY_ARGS,
        "--output-dir",
        workdir / "model",
        "--overwrite",
    )
    assert code != 0 and "contains the input" in stderr
    assert snapshot(workdir) == before


def test_overwrite_replaces_a_previous_output_completely(workdir):
    out = workdir / "converted"
    args = ["--transformer-checkpoint", workdir / "enat_tiny.pth", *TINY_ARGS, "--output-dir", out]
    assert call_converter(*args)[0] == 0
    (out / "stale.txt").write_text("from an earlier run")
    code, stderr = call_converter(*args)
    assert code != 0 and "already exists; pass --overwrite" in stderr
    assert (out / "stale.txt").exists()
    assert call_converter(*args, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["transformer"]
    assert sorted(p.name for p in workdir.iterdir()) == ["converted", "enat_tiny.pth", "notes.txt", "vqgan_tiny.ckpt"]


def test_output_folders_get_the_umask_permissions(workdir):
    old = os.umask(0o022)
    try:
        out = workdir / "converted"
        assert (
            call_converter("--transformer-checkpoint", workdir / "enat_tiny.pth", *TINY_ARGS, "--output-dir", out)[0]
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_sigterm_during_the_save_leaves_no_staging_folder(tmp_path):
    def save(folder):
        (folder / "part.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "out", save)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_failed_save_keeps_the_previous_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    def save(folder):
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(tmp_path / "out", save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "old.txt").exists()


def test_an_output_parent_that_is_a_file_is_a_clear_error(workdir):
    code, stderr = call_converter(
        "--transformer-checkpoint",
        workdir / "enat_tiny.pth",
        *TINY_ARGS,
        "--output-dir",
        workdir / "notes.txt" / "out",
    )
    assert code != 0 and "is a file, not a folder" in stderr


@pytest.mark.parametrize("heads", [0, 5, -4])
def test_bad_head_counts_are_refused(workdir, heads):
    code, stderr = call_converter(
        "--transformer-checkpoint",
        workdir / "enat_tiny.pth",
        "--num-attention-heads",
        heads,
        "--num-encoder-layers",
        3,
        "--output-dir",
        workdir / "out",
    )
    assert code != 0 and "num-attention-heads" in stderr.replace("_", "-")
    assert not (workdir / "out").exists()


def test_non_finite_weights_warn_and_integer_weights_are_refused():
    original = torch.load(FIXTURES / "enat_tiny.pth", weights_only=True)
    broken = dict(original)
    broken["blocks.1.mlp.fc1.weight"] = original["blocks.1.mlp.fc1.weight"].clone()
    broken["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    with pytest.warns(UserWarning, match="'blocks.1.mlp.fc1.weight' contains NaN or infinite values"):
        convert.build_transformer(broken, 4, 3)
    wrong = dict(original)
    wrong["x_embedder.LayerNorm.weight"] = torch.ones(64, dtype=torch.int64)
    with pytest.raises(convert.CheckpointError, match="'x_embedder.LayerNorm.weight' holds torch.int64 values"):
        convert.build_transformer(wrong, 4, 3)


# --------------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def class_pipe():
    return tiny_class_pipeline()


@pytest.fixture(scope="module")
def text_pipe():
    return tiny_text_pipeline()


CLASS_CASES = [
    ("class_labels", dict(class_labels=1.0)),
    ("class_labels", dict(class_labels=[1.5])),
    ("class_labels", dict(class_labels=[])),
    ("class_labels", dict(class_labels=torch.tensor([[1, 2]]))),
    ("class_labels", dict(class_labels=torch.tensor([1.0]))),
    ("class_labels", dict(class_labels="1")),
    ("class_labels", dict(class_labels=[True])),
    ("prompt", dict(prompt=[])),
    ("prompt", dict(prompt=123)),
    ("prompt", dict(prompt=["class 1", 2])),
    ("generator", dict(class_labels=[1], generator=0)),
    ("generator", dict(class_labels=[1], generator=[])),
    ("generator", dict(class_labels=[1], generator=[torch.Generator(), torch.Generator()])),
    ("guidance_scale", dict(class_labels=[1], guidance_scale=float("inf"))),
    ("guidance_scale", dict(class_labels=[1], guidance_scale=float("nan"))),
    ("guidance_scale", dict(class_labels=[1], guidance_scale="2")),
    ("mask_temperature", dict(class_labels=[1], mask_temperature=float("inf"))),
    ("sampling_temperature", dict(class_labels=[1], sampling_temperature=float("-inf"))),
    ("num_inference_steps", dict(class_labels=[1], num_inference_steps=2.0)),
    ("num_images_per_prompt", dict(class_labels=[1], num_images_per_prompt=0)),
    ("latents", dict(class_labels=[1], latents=[[8] * 4] * 4)),
    ("latents", dict(class_labels=[1], latents=np.full((1, 4, 4), 8))),
    ("latents", dict(class_labels=[1], latents=torch.full((1, 4, 4), 8.0))),
    ("latents", dict(class_labels=[1], latents=torch.full((1, 4, 4), 99))),
    ("output_type", dict(class_labels=[1], output_type=None)),
    ("callback_on_step_end", dict(class_labels=[1], callback_on_step_end=lambda *a: [1])),
    ("callback_on_step_end", dict(class_labels=[1], callback_on_step_end=5)),
    ("generator", dict(class_labels=[1, 2], generator=[None, torch.Generator()])),
    ("num_inference_steps", dict(class_labels=[1], num_inference_steps=True)),
    ("num_images_per_prompt", dict(class_labels=[1], num_images_per_prompt=True)),
    ("reuse_features", dict(class_labels=[1], reuse_features="yes")),
    ("return_dict", dict(class_labels=[1], return_dict="no")),
    ("prompt", dict(prompt="\ud800")),
    ("attention_kwargs", dict(class_labels=[1], attention_kwargs={"scale": float("nan")})),
]

TEXT_CASES = [
    ("prompt", dict(prompt=[])),
    ("prompt", dict(prompt=123)),
    ("negative_prompt", dict(prompt="a", negative_prompt=5)),
    (
        "prompt_embeds",
        dict(prompt_embeds=torch.full((1, 77, 16), float("nan")), pooled_prompt_embeds=torch.zeros(1, 16)),
    ),
    ("prompt_embeds", dict(prompt_embeds=np.zeros((1, 77, 16)), pooled_prompt_embeds=torch.zeros(1, 16))),
    (
        "pooled_prompt_embeds",
        dict(prompt_embeds=torch.zeros(1, 77, 16), pooled_prompt_embeds=torch.full((1, 16), float("inf"))),
    ),
    ("guidance_scale", dict(prompt="a", guidance_scale=float("inf"))),
    ("mask_temperature", dict(prompt="a", mask_temperature=float("inf"))),
    ("prompt", dict(prompt=["a red bus", "a \ud800 bus"])),
    ("negative_prompt", dict(prompt="a", negative_prompt="\udfff")),
    (
        "negative_pooled_prompt_embeds",
        dict(
            prompt="a",
            negative_prompt_embeds=torch.zeros(1, 77, 16),
            negative_pooled_prompt_embeds=torch.full((1, 16), float("nan")),
        ),
    ),
]


def check_clear_error(pipe, argument, kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)
    assert type(info.value) in (ValueError, TypeError)  # not a RuntimeError/IndexError subclass
    assert argument in str(info.value), str(info.value)


@pytest.mark.parametrize("argument, kwargs", CLASS_CASES)
def test_bad_class_pipeline_arguments_are_clear_errors(class_pipe, argument, kwargs):
    check_clear_error(class_pipe, argument, dict(kwargs))


@pytest.mark.parametrize("argument, kwargs", TEXT_CASES)
def test_bad_text_pipeline_arguments_are_clear_errors(text_pipe, argument, kwargs):
    check_clear_error(text_pipe, argument, dict(kwargs))


def test_guidance_that_overflows_is_refused_naming_the_guidance(class_pipe, text_pipe):
    # finite scales whose products with the logits are not: every token would come out as the last id
    with pytest.raises(ValueError, match="guidance overflowed"):
        class_pipe(class_labels=[1], guidance_scale=1e300, num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance overflowed"):
        text_pipe("a", guidance_scale=1e39, num_inference_steps=2)


def test_non_finite_logits_are_refused_naming_the_logits():
    pipe = tiny_class_pipeline()
    with torch.no_grad():
        pipe.transformer.decoder_blocks[0].attn.to_v.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits are not finite"):
        pipe(class_labels=[1], num_inference_steps=2)


def test_temperature_products_that_overflow_are_refused_naming_the_temperature(class_pipe):
    with pytest.raises(ValueError, match="mask_temperature"):
        class_pipe(class_labels=[1], mask_temperature=1e300, num_inference_steps=2, generator=torch.Generator())
    scheduler = MaskedTokenScheduler(mask_token_id=8, sampling_temperatures=[1e-45, 1e-45])
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="sampling temperature"):
        scheduler.step(torch.randn(1, 16, 8), 0, torch.full((1, 16), 8), generator=torch.Generator())


def test_numpy_integer_labels_are_accepted(class_pipe):
    ids = class_pipe(class_labels=np.int64(3), num_inference_steps=2, output_type="latent").images
    assert ids.shape == (1, 4, 4)
    assert class_pipe(class_labels=np.array([1, 2]), num_inference_steps=2, output_type="latent").images.shape[0] == 2


def test_numpy_integer_steps_are_taken_like_ints(class_pipe):
    def run(steps):
        generator = torch.Generator().manual_seed(0)
        output = class_pipe(class_labels=[3], num_inference_steps=steps, generator=generator, output_type="latent")
        return output.images

    assert torch.equal(run(np.int64(3)), run(3))
    assert not torch.equal(run(np.int32(1)), run(3))  # the number is used, not replaced by a default
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        run(np.bool_(True))


def test_reuse_state_of_another_dtype_is_a_clear_error():
    model = tiny_class_pipeline().transformer
    ids = torch.full((1, 16), 8)
    ids[0, :5] = 1
    state = model(ids, class_labels=torch.tensor([1])).reuse_state
    state.hidden_states = state.hidden_states.to(torch.bfloat16)
    with pytest.raises(ValueError, match="reuse_state.hidden_states has dtype torch.bfloat16"):
        model(ids, class_labels=torch.tensor([1]), reuse_state=state)


@pytest.mark.parametrize("bad", [[[8] * 16], np.full((1, 16), 8), torch.zeros(0, 16, dtype=torch.long)])
def test_model_input_ids_must_be_a_non_empty_integer_tensor(bad):
    model = tiny_class_pipeline().transformer
    with pytest.raises((ValueError, TypeError), match="input_ids"):
        model(bad, class_labels=torch.tensor([1]))


def test_truncation_warning_is_short(text_pipe, caplog):
    prompt = "word " * 1000
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            text_pipe(prompt, num_inference_steps=1)
    finally:
        diffusers_logging.disable_propagation()
    messages = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert len(messages) == 1 and len(messages[0]) < 300
    assert "2002 tokens long" in messages[0] and "1925 tokens were cut off" in messages[0]
