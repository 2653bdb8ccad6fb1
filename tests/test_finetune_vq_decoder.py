"""examples/finetune_vq_decoder.py on the shipped Shapes pipeline and a few real Shapes images made here."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import call_main
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import write_imagefolder


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune_vq_decoder  # noqa: E402


SHIPPED = ROOT / "pretrained" / "enat-shapes"


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_imagefolder(root, num_train=12, num_val=2, seed=3)
    return root / "train"


def run(data, output_dir, *extra):
    arguments = ["--pretrained_model_name_or_path", SHIPPED, "--train_data_dir", data, "--output_dir", output_dir]
    return call_main(finetune_vq_decoder.main, *arguments, "--train_batch_size", 4, *extra)


def weights(folder, component):
    return load_file(Path(folder) / component / "diffusion_pytorch_model.safetensors")


def corrupted_l1(vqvae, pipe, data, seed=0):
    """L1 of `vqvae`'s decoding of one fixed batch of corrupted token grids (corrupted by `pipe`'s transformer)."""
    from enat_diffusers.utils.training import load_image, vq_token_ids

    records = [json.loads(line) for line in (Path(data) / "metadata.jsonl").open()][:8]
    images = torch.stack([load_image(Path(data) / record["file_name"], 64) for record in records])
    texts = [record["text"] for record in records]
    args = finetune_vq_decoder.parse_args(
        ["--pretrained_model_name_or_path", "x", "--train_data_dir", "x", "--output_dir", "x", "--clean_fraction", "0"]
    )
    with torch.no_grad():
        ids = vq_token_ids(pipe.vqvae, images)
        grid = finetune_vq_decoder.corrupt(pipe, ids, texts, torch.Generator().manual_seed(seed), args, 0.5)
        decoded = finetune_vq_decoder.TokenDecoder(vqvae)(grid.reshape(-1, 16, 16))
    return (decoded - images).abs().mean().item()


def test_only_the_decoder_changes_and_its_error_on_corrupted_grids_falls(shapes_train, tmp_path):
    code, stderr = run(shapes_train, tmp_path / "out", "--max_train_steps", 60, "--learning_rate", 1e-4)
    assert code == 0, stderr
    tuned = ENATPipeline.from_pretrained(tmp_path / "out")
    shipped = ENATPipeline.from_pretrained(SHIPPED)
    before, after = weights(SHIPPED, "vqvae"), weights(tmp_path / "out", "vqvae")
    assert before.keys() == after.keys()
    for name in before:
        frozen = not name.startswith(("decoder.", "post_quant_conv."))
        assert torch.equal(before[name], after[name]) == frozen, name  # encoder and codebook untouched
    for component in ("transformer", "text_encoder"):
        folder = tmp_path / "out" / component
        files = sorted(folder.glob("*.safetensors"))
        assert files
        for f in files:
            original = load_file(SHIPPED / component / f.name)
            assert all(torch.equal(original[k], v) for k, v in load_file(f).items())
    log = (tmp_path / "out" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,corrupted_fraction" and len(log) == 7 and log[-1].startswith("60,")
    # the decoder learnt to undo the transformer's parallel-sampling errors on these images (other random grids;
    # 60 steps move it by about 1.5 %, the 600 of the model card by 12 %; decoding clean grids instead: +0.9 %)
    assert corrupted_l1(tuned.vqvae, shipped, shapes_train, seed=5) < 0.99 * corrupted_l1(
        shipped.vqvae, shipped, shapes_train, seed=5
    )


def test_resume_replays_the_same_steps(shapes_train, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(shapes_train, straight, "--max_train_steps", 4)[0] == 0
    assert run(shapes_train, resumed, "--max_train_steps", 4, "--checkpointing_steps", 2)[0] == 0
    (resumed / "model_index.json").unlink()  # as if stopped after the checkpoint of step 2
    code, stderr = run(shapes_train, resumed, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert code == 0, stderr
    a, b = weights(straight, "vqvae"), weights(resumed, "vqvae")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-2"]


def test_refuses_a_used_output_dir_and_a_class_conditional_pipeline(shapes_train, converted_fixture_dir, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    code, stderr = run(shapes_train, tmp_path / "used", "--max_train_steps", 1)
    assert code == 1 and "error: --output_dir" in stderr and "is not empty (notes.txt)" in stderr
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
    code, stderr = call_main(
        finetune_vq_decoder.main,
        "--pretrained_model_name_or_path",
        converted_fixture_dir,
        "--train_data_dir",
        shapes_train,
        "--output_dir",
        tmp_path / "class",
    )
    assert code == 1 and "this needs a text-to-image ENATPipeline" in stderr
    assert not (tmp_path / "class").exists()
    code, stderr = run(shapes_train, tmp_path / "bad", "--min_mask_ratio", 0.9, "--max_mask_ratio", 0.5)
    assert code == 1 and "min_mask_ratio" in stderr and len(stderr.strip().splitlines()) == 1


def test_the_input_pipeline_is_never_the_output(shapes_train, tmp_path):
    code, stderr = run(shapes_train, SHIPPED, "--max_train_steps", 1, "--resume_from_checkpoint", "latest")
    assert code == 1 and "is a pipeline folder" in stderr
    code, stderr = run(shapes_train, SHIPPED.parent, "--max_train_steps", 1)
    assert code == 1 and "contains the input" in stderr
