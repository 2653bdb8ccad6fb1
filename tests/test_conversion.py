import json

import pytest
import torch
from conftest import FIXTURES, call_converter
from diffusers import VQModel

from enat_diffusers import ENATTransformer2DModel
from enat_diffusers.conversion import checkpoints as convert


TINY_ARGS = ["--num-attention-heads", 4, "--num-encoder-layers", 3]


def random_state_dict(listing: str) -> dict:
    shapes = json.loads((FIXTURES / "original_keys" / listing).read_text())
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}


def original_tiny():
    return torch.load(FIXTURES / "enat_tiny.pth", weights_only=True)


# ---------------------------------------------------------------------------------------------- fixture conversion


@torch.no_grad()
def test_converted_vqgan_matches_original(converted_fixture_dir, vqgan_io):
    vqvae = VQModel.from_pretrained(converted_fixture_dir, subfolder="vqvae")
    codes = vqgan_io["decode.codes"]
    shape = (*codes.shape, vqvae.config.vq_embed_dim)
    images = vqvae.decode(codes, force_not_quantize=True, shape=shape).sample
    assert torch.allclose(images, vqgan_io["decode.images"], atol=1e-4)

    latents = vqvae.encode(vqgan_io["encode.images"]).latents
    assert torch.allclose(latents, vqgan_io["encode.latents"], atol=1e-4)
    quantized, _, (_, _, indices) = vqvae.quantize(latents)
    assert torch.equal(indices.reshape(vqgan_io["encode.indices"].shape), vqgan_io["encode.indices"])
    assert torch.allclose(quantized, vqgan_io["encode.quantized"], atol=1e-4)


def test_converted_folder_is_a_complete_pipeline(converted_fixture_dir):
    model_index = json.loads((converted_fixture_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "ENATPipeline"
    assert model_index["transformer"] == ["enat_diffusers.models.transformer_enat", "ENATTransformer2DModel"]
    assert model_index["scheduler"] == ["enat_diffusers.schedulers.scheduling_masked_token", "MaskedTokenScheduler"]
    assert model_index["vqvae"] == ["diffusers", "VQModel"]
    transformer = ENATTransformer2DModel.from_pretrained(converted_fixture_dir, subfolder="transformer")
    assert (transformer.config.num_encoder_layers, transformer.config.num_decoder_layers) == (3, 2)
    assert (transformer.config.codebook_size, transformer.config.num_classes) == (32, 10)
    scheduler_config = json.loads((converted_fixture_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["mask_token_id"] == 32


def test_transformer_only_and_dtype(tmp_path):
    out = tmp_path / "transformer-only"
    code, stderr = call_converter(
        "--transformer-checkpoint", FIXTURES / "enat_tiny.pth", *TINY_ARGS, "--output-dir", out, "--dtype", "bfloat16"
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["transformer"]
    from safetensors.torch import load_file

    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def test_wrapped_and_prefixed_checkpoints_are_accepted(tmp_path):
    original = original_tiny()
    wrapped = {"state_dict": {f"module.{key}": value for key, value in original.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    loaded = convert.load_original_checkpoint(tmp_path / "wrapped.pth")
    assert loaded.keys() == original.keys()
    converted = convert.convert_transformer_state_dict(loaded, 3)
    assert not any(key.startswith("prev_embedder") for key in converted)  # never-used keys dropped


# -------------------------------------------------------------------------------------- released checkpoint layouts


@pytest.mark.parametrize(
    "preset, listing, side", [("enat-l-256", "enat_l_256.json", 16), ("enat-l-512", "enat_l_512.json", 32)]
)
def test_released_transformer_layouts_convert_with_presets(preset, listing, side):
    original = random_state_dict(listing)
    settings = convert.PRESETS[preset]
    model = convert.build_transformer(original, settings["num_attention_heads"], settings["num_encoder_layers"])
    config = model.config
    assert (config.sample_size, config.hidden_size, config.codebook_size, config.num_classes) == (
        side,
        1024,
        1024,
        1000,
    )
    assert (config.num_encoder_layers, config.num_decoder_layers, config.num_attention_heads) == (22, 2, 16)
    assert config.sample_size == settings["sample_size"]

    # every model parameter holds a value from the checkpoint
    converted = convert.convert_transformer_state_dict(original, 22)
    state = model.state_dict()
    assert state.keys() == converted.keys()
    assert all(torch.equal(state[key], converted[key]) for key in state)
    used = sum(v.numel() for k, v in original.items() if not k.startswith("prev_embedder"))
    assert model.num_parameters() == used - 1  # minus the dropped [MASK] output bias

    ids = torch.randint(0, 1024, (1, side * side))
    ids[:, : side * side - 40] = model.mask_token_id
    with torch.no_grad():
        logits = model(ids, class_labels=torch.tensor([207])).logits
    assert logits.shape == (1, side * side, 1024) and torch.isfinite(logits).all()
    del original, converted, model, state


def test_released_vqgan_layout_converts():
    original = random_state_dict("vqgan_f16_1024.json")
    vqvae = convert.build_vqvae(original)
    config = vqvae.config
    assert list(config.block_out_channels) == [128, 128, 256, 256, 512] and config.layers_per_block == 2
    assert (config.num_vq_embeddings, config.vq_embed_dim) == (1024, 256)
    assert vqvae.num_parameters() == 64_780_163  # 54,515,587 original + fixed padding (VQ_MAPPING.md)
    codes = torch.randint(0, 1024, (1, 2, 2))
    with torch.no_grad():
        images = vqvae.decode(codes, force_not_quantize=True, shape=(1, 2, 2, 256)).sample
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------------- errors


def broken(change):
    state = original_tiny()
    change(state)
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("blocks.1.attn.q.weight"), "missing key 'blocks.1.attn.q.weight'"),
        (lambda s: s.pop("mlm_layer.bias"), "missing key 'mlm_layer.bias'"),
        (
            lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(1)}),
            "unexpected key 'blocks.0.attn.extra.weight'",
        ),
        (
            lambda s: s.update({"blocks.2.mlp.fc2.weight": torch.zeros(64, 255)}),
            r"'blocks.2.mlp.fc2.weight' has shape \[64, 255\], expected \[64, 256\]",
        ),
    ],
)
def test_transformer_checkpoint_errors_name_the_key(change, message):
    with pytest.raises(convert.CheckpointError, match=message):
        convert.build_transformer(broken(change), 4, 3)


def test_vqgan_checkpoint_errors_name_the_key():
    state = torch.load(FIXTURES / "vqgan_tiny.ckpt", weights_only=True)["state_dict"]
    missing = {k: v for k, v in state.items() if k != "decoder.up.1.upsample.conv.bias"}
    with pytest.raises(convert.CheckpointError, match="missing key 'decoder.up.1.upsample.conv.bias'"):
        convert.build_vqvae(missing)
    with pytest.raises(convert.CheckpointError, match="unexpected key 'encoder.mid.attn_1.q.weight'"):
        convert.build_vqvae({**state, "encoder.mid.attn_1.q.weight": torch.zeros(64, 64, 1, 1)})
    wrong = {**state, "decoder.conv_out.weight": torch.zeros(3, 32, 1, 1)}
    with pytest.raises(convert.CheckpointError, match="'decoder.conv_out.weight' has shape"):
        convert.build_vqvae(wrong)


def test_unreadable_files(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((FIXTURES / "enat_tiny.pth").read_bytes()[:5000])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    for path, message in [
        (truncated, "not a readable PyTorch checkpoint"),
        (text, "not a readable PyTorch checkpoint"),
        (not_a_dict, "does not hold a state dict"),
        (tmp_path / "absent.pth", "no such"),
    ]:
        with pytest.raises(convert.CheckpointError, match=message):
            convert.load_original_checkpoint(path)
        code, stderr = call_converter("--transformer-checkpoint", path, *TINY_ARGS, "--output-dir", tmp_path / "out")
        assert code != 0 and message in stderr
        assert not (tmp_path / "out").exists()


def test_code_in_a_checkpoint_is_never_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(convert.CheckpointError, match="not a readable PyTorch checkpoint"):
        convert.load_original_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_existing_output_is_never_overwritten_without_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, stderr = call_converter(
        "--transformer-checkpoint", FIXTURES / "enat_tiny.pth", *TINY_ARGS, "--output-dir", out
    )
    assert code != 0 and "--overwrite" in stderr
    assert (out / "precious.txt").read_text() == "user data"

    code, stderr = call_converter(
        "--transformer-checkpoint", FIXTURES / "enat_tiny.pth", *TINY_ARGS, "--output-dir", out, "--overwrite"
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["transformer"]


def test_argument_and_preset_errors(tmp_path):
    checkpoint = ["--transformer-checkpoint", FIXTURES / "enat_tiny.pth", "--output-dir", tmp_path / "out"]
    assert "pass --preset" in call_converter(*checkpoint)[1]
    assert "not both" in call_converter(*checkpoint, "--preset", "enat-l-256", "--num-encoder-layers", 3)[1]
    code, stderr = call_converter(*checkpoint, "--preset", "enat-l-256")  # 5 blocks cannot have 22 encoder layers
    assert code != 0 and "leaves no decoder block" in stderr
    assert not (tmp_path / "out").exists()


def test_mismatched_vqgan_is_refused(tmp_path):
    state = torch.load(FIXTURES / "vqgan_tiny.ckpt", weights_only=True)["state_dict"]
    state["quantize.embedding.weight"] = torch.randn(64, 16)
    torch.save(state, tmp_path / "vq64.ckpt")
    code, stderr = call_converter(
        "--transformer-checkpoint",
        FIXTURES / "enat_tiny.pth",
        "--vqgan-checkpoint",
        tmp_path / "vq64.ckpt",
        *TINY_ARGS,
        "--output-dir",
        tmp_path / "out",
    )
    assert code != 0 and "do not belong together" in stderr


def test_imagenet_names_for_1000_classes():
    names = convert.imagenet_id2label(1000)
    assert names[207] == "golden retriever" and len(names) == 1000
    assert convert.imagenet_id2label(10) is None
