import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FIXTURES, tiny_class_pipeline
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from enat_diffusers import ENATPipeline
from enat_diffusers.conversion import checkpoints as convert


FIXTURE_SETTINGS = dict(num_inference_steps=4, guidance_scale=2.0, mask_temperature=0, sampling_temperature=0)


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


# --------------------------------------------------------------------------------------- reproducing the original


def test_reproduces_the_original_generation_trace(fixture_pipeline, enat_io):
    labels = enat_io["gen.class_labels"]
    step_ids = []

    def record(pipe, step, timestep, callback_kwargs):
        step_ids.append(callback_kwargs["latents"].clone())
        return {}

    final = latents(fixture_pipeline, class_labels=labels, callback_on_step_end=record, **FIXTURE_SETTINGS)
    assert final.shape == (3, 4, 4) and final.dtype == torch.long
    assert torch.equal(final.reshape(3, 16), enat_io["gen.final_ids"])
    # the ids fed to steps 1..T-1 are what the callback saw after steps 0..T-2
    for step in range(1, 4):
        assert torch.equal(step_ids[step - 1].reshape(3, 16), enat_io["gen.step_input_ids"][step])
    assert fixture_pipeline.scheduler.step_guidance_scales == enat_io["gen.cfg_scale_per_step"].tolist()

    images = fixture_pipeline(class_labels=labels.tolist(), output_type="pt", **FIXTURE_SETTINGS).images
    assert images.shape == (3, 3, 8, 8)
    assert torch.allclose(images, enat_io["gen.decoded_images"].clamp(0, 1), atol=1e-4)


def test_reuse_features_false_runs_the_plain_path(fixture_pipeline, enat_io):
    labels = enat_io["gen.class_labels"]
    reused = latents(fixture_pipeline, class_labels=labels, **FIXTURE_SETTINGS)
    plain = latents(fixture_pipeline, class_labels=labels, reuse_features=False, **FIXTURE_SETTINGS)
    assert not torch.equal(plain, reused)

    # with reuse off, every step is a fresh forward (no state is passed in)
    states = []
    hook = fixture_pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: states.append(kwargs["reuse_state"]), with_kwargs=True
    )
    try:
        latents(fixture_pipeline, class_labels=labels, reuse_features=False, **FIXTURE_SETTINGS)
        assert states == [None] * 4
        states.clear()
        latents(fixture_pipeline, class_labels=labels, **FIXTURE_SETTINGS)
        assert states[0] is None and all(state is not None for state in states[1:])
    finally:
        hook.remove()


@torch.inference_mode()
def test_stochastic_sampling_matches_the_original_sampler_in_distribution(converted_fixture_dir):
    """
    With released-style temperatures the original's exact samples cannot be reproduced (it draws from torch's and
    NumPy's global RNGs), so compare distributions: the per-position token frequencies of 4,000 images from the
    pipeline against those of 60,000 from the original sampler's structure (`benchmarks/original_enat.py`:
    Categorical sampling, NumPy Gumbel noise, two model calls per step), recorded by
    `tests/fixtures/record_sampler_frequencies.py`. Measured mean total variation: 0.012-0.014 over 4 pipeline
    seeds; 0.031 with sampling temperature 4 instead of 6, 0.023 with mask temperature 1 instead of 1.5, 0.069 with
    guidance 4/3 instead of 2.
    """
    record = json.loads((FIXTURES / "original_sampler_frequencies.json").read_text())
    settings = record["settings"]
    reference = torch.tensor(record["counts"]) / record["num_samples"]  # (16 positions, 32 codes)
    pipe = ENATPipeline.from_pretrained(converted_fixture_dir)
    pipe.set_progress_bar_config(disable=True)

    def mean_total_variation(**overrides):
        sampling = dict(
            num_inference_steps=settings["steps"],
            guidance_scale=settings["cfg_scale"],
            mask_temperature=settings["mask_temp"],
            sampling_temperature=settings["samp_temp"],
        )
        ids = latents(
            pipe,
            class_labels=torch.full((4000,), settings["label"]),
            generator=torch.Generator().manual_seed(0),
            **{**sampling, **overrides},
        ).reshape(4000, 16)
        frequencies = torch.stack([torch.bincount(ids[:, p], minlength=32) for p in range(16)]) / 4000.0
        return 0.5 * (frequencies - reference).abs().sum(1).mean().item()

    assert mean_total_variation() < 0.02
    assert mean_total_variation(sampling_temperature=4.0) > 0.02  # the comparison can tell a wrong temperature


def test_released_settings_are_the_default(tmp_path):
    # a 1000-class converted pipeline defaults to the preset's sampling settings and knows ImageNet's names
    pipe = convert.build_pipeline(
        tiny_class_pipeline(num_classes=1000).transformer,
        tiny_class_pipeline().vqvae,
        convert.PRESETS["enat-l-512"]["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        loaded = ENATPipeline.from_pretrained(tmp_path)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]  # e.g. no id2label type warning
    loaded.set_progress_bar_config(disable=True)
    assert loaded.get_label_ids(["golden retriever", "Tabby"]) == [207, 281]
    by_name = latents(loaded, prompt="golden retriever", generator=torch.Generator().manual_seed(0))
    by_id = latents(loaded, class_labels=[207], generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, by_id)
    assert loaded.scheduler.step_guidance_scales == [(k / 8) * 3.5 for k in range(8)]
    assert loaded.scheduler.step_sampling_temperatures[0] == 4.0 * 7 / 8
    assert json.loads((tmp_path / "model_index.json").read_text())["id2label"]["207"] == "golden retriever"


# ------------------------------------------------------------------------------------------------- determinism


def test_same_generator_same_images_and_batch_equals_singles():
    pipe = tiny_class_pipeline()
    first = latents(pipe, class_labels=[1, 2], generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    again = latents(pipe, class_labels=[1, 2], generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    assert torch.equal(first, again)
    for row, (label, seed) in enumerate([(1, 0), (2, 1)]):
        single = latents(pipe, class_labels=[label], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(first[row], single[0])
    other = latents(pipe, class_labels=[1, 2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert not torch.equal(first, other)
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(latents(pipe, class_labels=[1], generator=torch.Generator().manual_seed(0)), first[:1])


# ------------------------------------------------------------------------------------------------------ outputs


def test_output_types_and_images_per_prompt():
    pipe = tiny_class_pipeline()
    kwargs = dict(class_labels=[3, 4], num_images_per_prompt=2, num_inference_steps=3)
    pil = pipe(**kwargs).images
    assert len(pil) == 4 and all(isinstance(image, PIL.Image.Image) and image.size == (8, 8) for image in pil)
    array = pipe(output_type="np", **kwargs).images
    assert array.shape == (4, 8, 8, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    tensor = pipe(output_type="pt", **kwargs).images
    assert tensor.shape == (4, 3, 8, 8) and 0 <= tensor.min() <= tensor.max() <= 1
    ids = pipe(output_type="latent", **kwargs).images
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.long and ids.max() < 8
    (as_tuple,) = pipe(output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(
        as_tuple, pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    )


def test_guidance_zero_skips_the_unconditional_batch():
    pipe = tiny_class_pipeline()
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        pipe(class_labels=[1], guidance_scale=0, output_type="latent", num_inference_steps=2)
        assert batch_sizes == [1, 1]
        batch_sizes.clear()
        pipe(class_labels=[1], guidance_scale=3, output_type="latent", num_inference_steps=2)
        assert batch_sizes == [2, 2]  # cond and uncond in one batch
    finally:
        hook.remove()


def test_callback_can_replace_the_tokens():
    pipe = tiny_class_pipeline()

    def zero_at_last_step(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 2 else {}

    ids = latents(pipe, class_labels=[1], num_inference_steps=3, callback_on_step_end=zero_at_last_step)
    assert (ids == 0).all()


def test_given_start_tokens_are_kept():
    pipe = tiny_class_pipeline()
    start = torch.full((1, 4, 4), 8)
    start[0, 0] = torch.tensor([1, 2, 3, 4])
    out = latents(pipe, class_labels=[5], latents=start, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 0], start[0, 0]) and (out < 8).all()


# ------------------------------------------------------------------------------------------------------ loading


def test_save_load_round_trip_and_diffusion_pipeline_loading(tmp_path):
    pipe = tiny_class_pipeline()
    pipe.save_pretrained(tmp_path)
    reference = latents(pipe, class_labels=[1, 9], generator=torch.Generator().manual_seed(0))
    assert (tmp_path / "pipeline.py").read_text().startswith("from enat_diffusers import ENATPipeline")
    for loader, kwargs in (
        (ENATPipeline, {}),
        # diffusers finds plain class names only in itself; the folder's one-line pipeline.py points at the package
        (DiffusionPipeline, dict(custom_pipeline=str(tmp_path / "pipeline.py"), trust_remote_code=True)),
    ):
        loaded = loader.from_pretrained(tmp_path, **kwargs)
        assert isinstance(loaded, ENATPipeline)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(latents(loaded, class_labels=[1, 9], generator=torch.Generator().manual_seed(0)), reference)
        assert loaded.get_label_ids("class 3") == [3]
    half = ENATPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.vqvae.dtype == torch.bfloat16
    half.set_progress_bar_config(disable=True)
    images = half(class_labels=[1], output_type="pt").images
    assert torch.isfinite(images).all() and images.shape == (1, 3, 8, 8)


# ------------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def pipe():
    return tiny_class_pipeline()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of `prompt`"),
        (dict(prompt="class 1", class_labels=[1]), "exactly one of `prompt`"),
        (dict(prompt="class 77"), r"not a class name of this model\. Did you mean: 'class 7'"),
        (dict(prompt="a photo of a cat"), "not a class name of this model"),
        (dict(class_labels=[10]), r"not a class id in \[0, 9\]"),
        (dict(class_labels=[-1]), r"not a class id in \[0, 9\]"),
        (dict(class_labels=[1], negative_prompt="blurry"), "takes no text inputs \\(negative_prompt\\)"),
        (dict(class_labels=[1], prompt_embeds=torch.zeros(1, 4, 4)), "takes no text inputs"),
        (dict(class_labels=[1], num_inference_steps=0), r"integer in \[1, 16\]"),
        (dict(class_labels=[1], num_inference_steps=17), r"integer in \[1, 16\]"),
        (dict(class_labels=[1], guidance_scale=-1.0), "guidance_scale must be a finite non-negative"),
        (dict(class_labels=[1], sampling_temperature=-0.5), "sampling_temperature must be a finite non-negative"),
        (dict(class_labels=[1], mask_temperature=-0.5), "mask_temperature must be a finite non-negative"),
        (dict(class_labels=[1], height=16), "generates 8x8 images"),
        (dict(class_labels=[1], width=4), "generates 8x8 images"),
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), "list of 1 generators for 2 images"),
        (dict(class_labels=[1], num_images_per_prompt=2, generator=[torch.Generator()]), "for 2 images"),
        (dict(class_labels=[1], output_type="jpeg"), "output_type must be one of"),
        (dict(class_labels=[1], latents=torch.full((1, 3, 3), 8)), "latents must have shape"),
        (dict(class_labels=[1], callback_on_step_end_tensor_inputs=["logits"]), "are not among"),
    ],
)
def test_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_names_without_id2label_and_ambiguous_names():
    pipe = ENATPipeline(
        transformer=tiny_class_pipeline().transformer,
        scheduler=tiny_class_pipeline().scheduler,
        vqvae=tiny_class_pipeline().vqvae,
    )
    with pytest.raises(ValueError, match="no class names"):
        pipe("class 1")
    ambiguous = ENATPipeline(
        transformer=pipe.transformer,
        scheduler=pipe.scheduler,
        vqvae=pipe.vqvae,
        id2label={0: "crane", 1: "crane", 2: "heron"},
    )
    with pytest.raises(ValueError, match=r"names several classes \[0, 1\]"):
        ambiguous.get_label_ids("crane")
