"""`examples/shapes/tokenizer_report.py`: the VQ check that `make train-demo` runs before training ENAT."""

import importlib.util
import json

import pytest
import torch
from conftest import ROOT, call_main
from diffusers import VQModel

from enat_diffusers.data.shapes import write_imagefolder


spec = importlib.util.spec_from_file_location("tokenizer_report", ROOT / "examples" / "shapes" / "tokenizer_report.py")
tokenizer_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tokenizer_report)

SHIPPED_VQ = ROOT / "pretrained" / "enat-shapes" / "vqvae"
pytestmark = pytest.mark.skipif(not SHIPPED_VQ.is_dir(), reason="pretrained/enat-shapes has not shipped yet")


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_imagefolder(root, num_train=1, num_val=40, seed=0)
    return root / "validation"


def test_a_good_tokenizer_passes_and_its_numbers_are_written(validation, tmp_path):
    code, err = call_main(
        tokenizer_report.main, "--vqvae", SHIPPED_VQ, "--data", validation, "--num-images", 40, "--num-pairs", 10,
        "--min-shapes-eval", 95, "--json", tmp_path / "report.json",
    )  # fmt: skip
    assert code == 0, err
    numbers = json.loads((tmp_path / "report.json").read_text())
    codebook_size = VQModel.load_config(SHIPPED_VQ)["num_vq_embeddings"]
    assert numbers["num_images"] == 40 and 0 < numbers["codes_used"] <= codebook_size
    assert numbers["shapes_eval"] >= 95 and numbers["psnr"] > 25


def test_a_tokenizer_whose_reconstructions_fail_shapes_eval_stops(validation, tmp_path):
    broken = VQModel.from_pretrained(SHIPPED_VQ)
    with torch.no_grad():  # every token decodes as the first code: no shapes survive the round trip
        broken.quantize.embedding.weight[:] = broken.quantize.embedding.weight[0]
    broken.save_pretrained(tmp_path / "broken")
    code, err = call_main(
        tokenizer_report.main, "--vqvae", tmp_path / "broken", "--data", validation, "--num-images", 40,
        "--num-pairs", 10, "--min-shapes-eval", 95, "--json", tmp_path / "report.json",
    )  # fmt: skip
    assert code == 1
    assert "of the reconstructions pass ShapesEval (required: 95 %)" in err
    assert json.loads((tmp_path / "report.json").read_text())["shapes_eval"] < 95


def test_locality_measures_tell_a_context_dependent_tokenizer_from_a_local_one(tmp_path):
    # the shipped tokenizer gives every 4x4 patch its own id: one code for background, ids of one object that do not
    # depend on another
    shipped = tokenizer_report.locality(VQModel.from_pretrained(SHIPPED_VQ), num_pairs=30)
    assert shipped["empty_image_codes"] == 1 and shipped["empty_image_interior_codes"] == 1
    assert shipped["non_locality_left_columns"] < 2 and shipped["non_locality_left_object"] < 5
    # a convolutional VQ model with GroupNorm (image-wide statistics), untrained: its ids depend on distant objects
    torch.manual_seed(0)
    convolutional = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16, vq_embed_dim=16,
        num_vq_embeddings=32, sample_size=64,
    )  # fmt: skip
    context_dependent = tokenizer_report.locality(convolutional, num_pairs=30)
    assert context_dependent["empty_image_codes"] > 2 and context_dependent["non_locality_left_columns"] > 10
    assert context_dependent["non_locality_left_object"] > 10
    constant = VQModel.from_pretrained(SHIPPED_VQ)
    with torch.no_grad():  # every latent is nearest to code 0: ids cannot depend on anything
        constant.quantize.embedding.weight[:] = constant.quantize.embedding.weight[0]
    local = tokenizer_report.locality(constant, num_pairs=30)
    assert local == dict(
        empty_image_codes=1, empty_image_interior_codes=1, non_locality_left_columns=0.0, non_locality_left_object=0.0
    )
