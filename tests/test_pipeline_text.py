import logging
import shutil

import pytest
import torch
from conftest import tiny_text_pipeline
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from enat_diffusers import ENATPipeline, build_clip_tokenizer


def latents(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipe(output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_text_pipeline()


def test_end_to_end(pipe):
    images = pipe(
        ["a red bus", "a photo of a cat"],
        num_inference_steps=4,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() <= images.max() <= 1
    pil = pipe("a red bus", num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    # the prompt matters
    assert not torch.equal(latents(pipe, prompt="a red bus"), latents(pipe, prompt="a green tree"))


def test_text_is_encoded_once_with_reuse(pipe):
    text_inputs = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: text_inputs.append(
            kwargs["encoder_hidden_states"] is not None and kwargs["reuse_state"] is None
        ),
        with_kwargs=True,
    )
    try:
        latents(pipe, prompt="a red bus")
        assert text_inputs == [True, False, False, False]  # step 0 encodes the text; later steps reuse it
    finally:
        hook.remove()
    assert not torch.equal(latents(pipe, prompt="a red bus"), latents(pipe, prompt="a red bus", reuse_features=False))


def test_prompt_and_equivalent_embeddings_give_the_same_images(pipe):
    embeds = pipe.encode_prompt(["a red bus", "a cat"], negative_prompt="blurry")
    assert embeds[0].shape == (2, 77, 16) and embeds[1].shape == (2, 16)
    from_text = latents(pipe, prompt=["a red bus", "a cat"], negative_prompt="blurry")
    from_embeds = latents(
        pipe,
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        negative_prompt_embeds=embeds[2],
        negative_pooled_prompt_embeds=embeds[3],
    )
    assert torch.equal(from_text, from_embeds)
    # without negative embeddings, the empty prompt is the unconditional text
    assert torch.equal(
        latents(pipe, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1]),
        latents(pipe, prompt=["a red bus", "a cat"]),
    )


def test_one_negative_prompt_is_broadcast(pipe):
    one = latents(pipe, prompt=["a red bus", "a cat", "a dog"], negative_prompt="blurry")
    many = latents(pipe, prompt=["a red bus", "a cat", "a dog"], negative_prompt=["blurry"] * 3)
    assert torch.equal(one, many)
    assert not torch.equal(one, latents(pipe, prompt=["a red bus", "a cat", "a dog"]))
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        latents(pipe, prompt=["a", "b", "c"], negative_prompt=["x", "y"])


def test_empty_prompt_and_images_per_prompt(pipe):
    ids = latents(pipe, prompt="", num_images_per_prompt=2)
    assert ids.shape == (2, 4, 4) and (ids < 8).all()
    batch = latents(pipe, prompt=["a red bus", "a cat"], num_images_per_prompt=2)
    assert batch.shape == (4, 4, 4)
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    listed = pipe(
        ["a red bus", "a cat"],
        num_images_per_prompt=2,
        generator=generators,
        output_type="latent",
        num_inference_steps=4,
    ).images
    single = pipe(
        "a cat", generator=torch.Generator().manual_seed(3), output_type="latent", num_inference_steps=4
    ).images
    assert torch.equal(listed[3], single[0])


def test_long_prompt_is_truncated_with_a_warning(pipe):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = diffusers_logging.get_logger("enat_diffusers.pipelines.pipeline_enat")
    logger.addHandler(handler)
    try:
        latents(pipe, prompt="very long " * 60, num_inference_steps=1)
    finally:
        logger.removeHandler(handler)
    assert any("the text encoder takes 77" in record.getMessage() for record in records)


def test_save_load_round_trip(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    reference = latents(pipe, prompt=["a red bus", "a cat"])
    for loader, kwargs in (
        (ENATPipeline, {}),
        (DiffusionPipeline, dict(custom_pipeline=str(tmp_path / "pipeline.py"), trust_remote_code=True)),
    ):
        loaded = loader.from_pretrained(tmp_path, **kwargs)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.tokenizer.model_max_length == 77 and len(loaded.tokenizer) == 1000
        assert torch.equal(latents(loaded, prompt=["a red bus", "a cat"]), reference)
    mixed = ENATPipeline.from_pretrained(tmp_path, dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.text_encoder.dtype == torch.float32
    mixed.set_progress_bar_config(disable=True)
    assert torch.isfinite(mixed("a red bus", num_inference_steps=2, output_type="pt").images).all()


@pytest.mark.parametrize("damage", ["remove folder", "empty folder"])
def test_missing_or_empty_tokenizer_is_a_clear_error(tmp_path, pipe, damage):
    pipe.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "tokenizer")
    if damage == "empty folder":
        (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ValueError, match="tokenizer.*missing or empty"):
        ENATPipeline.from_pretrained(tmp_path)


def test_clear_errors(pipe):
    with pytest.raises(ValueError, match="pass `prompt`, not `class_labels`"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match="exactly one of `prompt` and `prompt_embeds`"):
        pipe()
    with pytest.raises(ValueError, match="needs `pooled_prompt_embeds`"):
        pipe(prompt_embeds=torch.zeros(1, 77, 16))
    with pytest.raises(ValueError, match="at most one of `negative_prompt`"):
        pipe("a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 77, 16))
    embeds = pipe.encode_prompt(["a", "b"])
    with pytest.raises(ValueError, match="must have the shapes of the prompt's"):
        pipe(
            prompt_embeds=embeds[0],
            pooled_prompt_embeds=embeds[1],
            negative_prompt_embeds=embeds[2][:1],
            negative_pooled_prompt_embeds=embeds[3][:1],
        )
    with pytest.raises(ValueError, match="2 prompt_embeds but 1 pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1][:1])
    no_text = ENATPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, vqvae=pipe.vqvae)
    no_text.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="no tokenizer/text_encoder"):
        no_text("a red bus")
    embeds = pipe.encode_prompt("a red bus")
    ids = latents(
        no_text,
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        negative_prompt_embeds=embeds[2],
        negative_pooled_prompt_embeds=embeds[3],
    )
    assert torch.equal(ids, latents(pipe, prompt="a red bus"))


def test_full_offline_clip_tokenizer():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # open_clip's own tokenizer module, loaded without the package (whose __init__ needs torchvision)
    import importlib.util

    from enat_diffusers.clip_tokenizer import open_clip_bpe_path

    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", open_clip_bpe_path().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer()
    for text in [
        "A red double-decker bus, parked at 5pm!",
        "Ünïcödé café naïve",
        "emoji 🎨 and CJK 東京",
        "tabs\tand\nnewlines",
        "  spaces   everywhere  ",
    ]:
        assert tokenizer(text).input_ids == [49406, *reference.encode(text), 49407], text
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_text_encoder_with_projection(pipe):
    from transformers import CLIPTextModelWithProjection

    config = pipe.text_encoder.config.to_dict()
    config["projection_dim"] = 16  # the pooled width the transformer takes (text_embed_dim)
    torch.manual_seed(0)
    encoder = CLIPTextModelWithProjection(type(pipe.text_encoder.config)(**config)).eval()
    projected = ENATPipeline(
        transformer=pipe.transformer,
        scheduler=pipe.scheduler,
        vqvae=pipe.vqvae,
        text_encoder=encoder,
        tokenizer=pipe.tokenizer,
    )
    projected.set_progress_bar_config(disable=True)
    embeds, pooled, _, _ = projected.encode_prompt("a red bus")
    with torch.no_grad():
        expected = encoder(
            pipe.tokenizer("a red bus", padding="max_length", return_tensors="pt").input_ids
        ).text_embeds
    assert torch.allclose(pooled, expected)
    assert latents(projected, prompt="a red bus").shape == (1, 4, 4)
