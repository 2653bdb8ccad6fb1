"""Shared tiny, real components for the tests (everything is built locally; nothing is downloaded)."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import VQModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from enat_diffusers import ENATPipeline, ENATTransformer2DModel, MaskedTokenScheduler, build_clip_tokenizer


ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONVERTER = ROOT / "conversion" / "convert_enat_to_diffusers.py"
sys.path.insert(0, str(ROOT / "benchmarks"))  # original_enat.py: the original computation, re-stated


def run_converter(*args):
    """Runs the conversion CLI in a new process, as a user would."""
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)], capture_output=True, text=True)


def call_main(main, *args) -> (int, str):
    """Runs a CLI's `main(argv)` in this process; returns (exit code, stderr including the exit message)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit:
            if isinstance(exit.code, str):
                return 1, stderr.getvalue() + exit.code
            return exit.code or 0, stderr.getvalue()
    return 0, stderr.getvalue()


def call_converter(*args) -> (int, str):
    """Runs the conversion CLI's `main` in this process; returns (exit code, stderr including the exit message)."""
    from enat_diffusers.conversion import cli

    return call_main(cli.main, *args)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny, latency-bound models: on a busy machine two spinning intra-op threads
    make each call many times slower. Restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def enat_io():
    return load_file(FIXTURES / "enat_tiny_io.safetensors")


@pytest.fixture(scope="session")
def vqgan_io():
    return load_file(FIXTURES / "vqgan_tiny_io.safetensors")


@pytest.fixture(scope="session")
def fixture_meta():
    return json.loads((FIXTURES / "fixture_meta.json").read_text())


@pytest.fixture(scope="session")
def converted_fixture_dir(tmp_path_factory):
    """The fixture checkpoint pair converted into a full pipeline folder by the CLI."""
    output_dir = tmp_path_factory.mktemp("converted") / "enat-tiny"
    result = run_converter(
        "--transformer-checkpoint",
        FIXTURES / "enat_tiny.pth",
        "--vqgan-checkpoint",
        FIXTURES / "vqgan_tiny.ckpt",
        "--num-attention-heads",
        4,
        "--num-encoder-layers",
        3,
        "--output-dir",
        output_dir,
    )
    assert result.returncode == 0, result.stderr
    return output_dir


@pytest.fixture(scope="session")
def fixture_pipeline(converted_fixture_dir):
    pipe = ENATPipeline.from_pretrained(converted_fixture_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer(**overrides) -> ENATTransformer2DModel:
    config = dict(
        sample_size=4,
        codebook_size=8,
        hidden_size=32,
        num_attention_heads=2,
        num_encoder_layers=2,
        num_decoder_layers=1,
        mlp_ratio=2.0,
        num_classes=10,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = ENATTransformer2DModel(**config)
    # adaLN starts at zero (identity blocks); perturb every parameter so each one matters in the tests
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def tiny_vqvae(num_codes=8) -> VQModel:
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=num_codes,
        sample_size=8,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        scaling_factor=1.0,
    ).eval()


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    return CLIPTextModel(config).eval()


def tiny_tokenizer():
    return build_clip_tokenizer(num_merges=486)  # 1000 tokens, byte-complete


def tiny_class_pipeline(**transformer_overrides) -> ENATPipeline:
    pipe = ENATPipeline(
        transformer=tiny_transformer(**transformer_overrides),
        scheduler=MaskedTokenScheduler(mask_token_id=8),
        vqvae=tiny_vqvae(),
        id2label={i: f"class {i}" for i in range(transformer_overrides.get("num_classes", 10))},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text_pipeline() -> ENATPipeline:
    pipe = ENATPipeline(
        transformer=tiny_transformer(num_classes=None, text_embed_dim=16),
        scheduler=MaskedTokenScheduler(mask_token_id=8),
        vqvae=tiny_vqvae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
