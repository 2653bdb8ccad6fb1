"""GPU checks: run with `pytest tests/test_gpu.py` on a machine with CUDA (skipped elsewhere)."""

import pytest
import torch
from conftest import tiny_class_pipeline

from enat_diffusers import ENATPipeline


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FIXTURE_SETTINGS = dict(num_inference_steps=4, guidance_scale=2.0, mask_temperature=0, sampling_temperature=0)


def test_reproduces_the_original_generation_on_cuda(converted_fixture_dir, enat_io, monkeypatch):
    # the fixture was recorded in float32: cuDNN's default TF32 convolutions (the VQ decoder) differ by about 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pipe = ENATPipeline.from_pretrained(converted_fixture_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    ids = pipe(class_labels=enat_io["gen.class_labels"], output_type="latent", **FIXTURE_SETTINGS).images
    assert ids.device.type == "cuda"
    assert torch.equal(ids.cpu().reshape(3, 16), enat_io["gen.final_ids"])
    images = pipe(class_labels=enat_io["gen.class_labels"], output_type="pt", **FIXTURE_SETTINGS).images
    assert torch.allclose(images.cpu(), enat_io["gen.decoded_images"].clamp(0, 1), atol=1e-4)


def test_cpu_generator_gives_the_same_tokens_on_cpu_and_cuda():
    pipe = tiny_class_pipeline()
    kwargs = dict(class_labels=[1, 2], output_type="latent", mask_temperature=1.0, sampling_temperature=1.0)
    on_cpu = pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kwargs).images
    pipe.to("cuda")
    on_cuda = pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kwargs).images
    assert torch.equal(on_cpu, on_cuda.cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(tmp_path, dtype):
    tiny_class_pipeline().save_pretrained(tmp_path)
    pipe = ENATPipeline.from_pretrained(tmp_path, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], output_type="pt", generator=torch.Generator("cuda").manual_seed(0)).images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_model_cpu_offload(tmp_path):
    tiny_class_pipeline().save_pretrained(tmp_path)
    pipe = ENATPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(class_labels=[3], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    pipe.enable_model_cpu_offload()
    offloaded = pipe(class_labels=[3], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(offloaded.cpu(), reference)
