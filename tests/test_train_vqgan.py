"""examples/train_vqgan.py end to end on a few tiny generated images: outputs, resume, errors."""

import json
import logging
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from diffusers import VQModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from enat_diffusers.utils import training
from enat_diffusers.utils.cli import OutputLock, UsageError


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_vqgan  # noqa: E402


COLOURS = [(220, 50, 47), (60, 170, 70), (38, 110, 210), (240, 190, 30), (140, 70, 180)]
BACKGROUND = (236, 236, 236)
TINY_MODEL = [
    "--resolution", "32", "--block_out_channels", "8", "16", "--norm_num_groups", "4", "--latent_channels", "4",
    "--num_vq_embeddings", "16", "--train_batch_size", "4", "--num_validation_images", "4", "--report_to", "none",
    "--quantizer_warmup_steps", "1",
]  # fmt: skip


def make_images(folder: Path, count: int, size: int = 32, seed: int = 0):
    """Flat-coloured circles and squares on the Shapes background."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        extent = rng.choice([7, 12])
        x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + extent - 1, y + extent - 1], fill=rng.choice(COLOURS))
        image.save(folder / f"{index:03d}.png")


def train(data_dir: Path, output_dir: Path, *extra: str):
    return train_vqgan.main(
        train_vqgan.parse_args(
            ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), *TINY_MODEL, *map(str, extra)]
        )
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_images(folder / "nested", 24)  # searched recursively
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "vq"
    metrics = train(data_dir, output_dir, "--max_train_steps", 4, "--checkpointing_steps", 2,
                    "--codebook_restart_steps", 2)  # fmt: skip
    return output_dir, metrics


def test_saved_model_decodes_token_ids(trained):
    output_dir, metrics = trained
    vqvae = VQModel.from_pretrained(output_dir / "vqvae").eval()
    assert vqvae.config.lookup_from_codebook
    assert vqvae.config.num_vq_embeddings == 16
    ids = torch.randint(0, 16, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = vqvae.decode(ids, force_not_quantize=True, shape=(2, 16, 16, vqvae.config.vq_embed_dim)).sample
    assert images.shape == (2, 3, 32, 32)
    assert set(metrics) >= {"val/mse", "val/psnr", "val/codebook_usage"}
    assert 0 < metrics["val/codebook_usage"] <= 1 and metrics["val/mse"] < 1
    assert (output_dir / "validation_reconstructions.png").is_file()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_continues_at_the_saved_step(trained, data_dir, tmp_path):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    # resuming at the last step trains no further: the saved model is exactly the checkpoint's
    train(data_dir, resumed, "--resume_from_checkpoint", output_dir / "checkpoint-4", "--max_train_steps", 4)
    checkpoint = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    saved = load_file(resumed / "vqvae" / "diffusion_pytorch_model.safetensors")
    assert checkpoint.keys() == saved.keys()
    assert all(torch.equal(checkpoint[key], saved[key]) for key in checkpoint)
    # "latest" picks checkpoint-4 of the first run and trains steps 5 and 6 only
    output_dir = tmp_path / "continued"
    shutil.copytree(trained[0], output_dir)
    train(data_dir, output_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 6,
          "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)  # fmt: skip
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not torch.equal(
        load_file(output_dir / "checkpoint-6" / "model.safetensors")["quantize.embedding.weight"],
        checkpoint["quantize.embedding.weight"],
    )


def test_clear_errors(tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="no readable images found"):
        train(empty, tmp_path / "out", "--max_train_steps", 2)
    with pytest.raises(ValueError, match="not divisible by 4"):
        train_vqgan.parse_args(["--train_data_dir", "x", "--resolution", "30", "--block_out_channels", "8", "8", "8",
                                "--norm_num_groups", "4"])  # fmt: skip
    with pytest.raises(ValueError, match="quantizer_warmup_steps must be in"):
        train_vqgan.parse_args(["--train_data_dir", "x", "--max_train_steps", "10", "--quantizer_warmup_steps", "10"])
    with pytest.raises(ValueError, match="does not divide"):
        train_vqgan.parse_args(["--train_data_dir", "x", "--block_out_channels", "12", "16", "--norm_num_groups", "8"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="not empty .*--overwrite_output_dir"):
        train(data_dir, busy, "--max_train_steps", 2)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, caplog):
    make_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    PartialState()  # accelerate's logger needs its state
    with caplog.at_level(logging.WARNING):
        paths = train_vqgan.find_images(str(tmp_path))
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png"]
    assert "broken.png" in caplog.text


def test_quantizer_warmup_and_kmeans_initialisation():
    torch.manual_seed(0)
    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    vqvae = VQModel(
        block_out_channels=[8, 16], latent_channels=4, num_vq_embeddings=16, norm_num_groups=4,
        mid_block_add_attention=False, lookup_from_codebook=True, **blocks,
    ).eval()  # fmt: skip
    monitor = train_vqgan.CodebookMonitor(vqvae.quantize, 16)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    monitor.quantize = False  # warm-up: a plain autoencoder
    with torch.no_grad():
        reconstructions, vq_loss = vqvae(images, return_dict=False)
        latents = vqvae.encode(images).latents
        torch.testing.assert_close(reconstructions, vqvae.decoder(vqvae.post_quant_conv(latents)))
    assert vq_loss == 0 and monitor.latents.shape == (2 * 8 * 8, 4)
    # k-means finds four tight clusters
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    noise = 0.01 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    found = train_vqgan.kmeans(centres.repeat_interleave(50, 0) + noise, 4, torch.Generator().manual_seed(0))
    distances = torch.cdist(centres, found)
    assert distances.amin(1).max() < 0.01 and sorted(distances.argmin(1).tolist()) == [0, 1, 2, 3]


class MarkerPickle:
    """A pickle that, when unpickled, creates a file (the code a replaced checkpoint file could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


def test_a_planted_pickle_is_never_loaded(trained, data_dir, tmp_path):
    """Replacing a checkpoint's `custom_checkpoint_0.pkl` (where the codebook monitor's state used to be pickled)
    with a pickle that creates a file: resuming refuses that checkpoint, and the code never runs."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    marker = tmp_path / "code-ran"
    for checkpoint in run.glob("checkpoint-*"):
        torch.save({"counts": MarkerPickle(marker)}, checkpoint / "custom_checkpoint_0.pkl")  # as accelerate writes
    with pytest.raises(UsageError, match="custom_checkpoint_0.pkl, which its save did not write"):
        train(data_dir, run, "--resume_from_checkpoint", "latest", "--max_train_steps", 6)
    assert not marker.exists()


def test_a_checkpoint_whose_manifest_was_rewritten_is_a_clear_error_and_runs_no_code(trained, data_dir, tmp_path):
    """Planted pickles with a manifest rewritten to match them pass the manifest check; loading them then refuses
    them (weights_only, no registered custom objects) as one clear error naming the checkpoint, and no code runs."""
    marker = tmp_path / "code-ran"
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl"):
        run = tmp_path / name
        shutil.copytree(trained[0], run)
        checkpoint = sorted(run.glob("checkpoint-*"))[-1]
        torch.save({"counts": MarkerPickle(marker)}, checkpoint / name)
        manifest = json.loads((checkpoint / training.MANIFEST_FILE).read_text())
        manifest["files"][name] = {
            "size": (checkpoint / name).stat().st_size,
            "sha256": training.file_sha256(checkpoint / name),
        }
        (checkpoint / training.MANIFEST_FILE).write_text(json.dumps(manifest))
        assert training.checkpoint_problem(checkpoint) is None
        with pytest.raises(UsageError, match=f"the checkpoint .*{checkpoint.name} cannot be loaded"):
            train(data_dir, run, "--resume_from_checkpoint", "latest", "--max_train_steps", 6)
        assert not marker.exists()


def test_resume_continues_exactly_from_the_newest_complete_checkpoint(trained, data_dir, tmp_path, caplog):
    """With the latest checkpoint incomplete (a file missing), `latest` resumes from the one before (with a warning)
    and ends bit-exactly where the uninterrupted run ended."""
    straight, run = trained[0], tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "checkpoint-4" / "optimizer.bin").unlink()  # an interrupted save
    with caplog.at_level(logging.WARNING):
        train(data_dir, run, "--resume_from_checkpoint", "latest", "--max_train_steps", 4, "--checkpointing_steps", 2,
              "--codebook_restart_steps", 2)  # fmt: skip
    assert "checkpoint-4 is incomplete (optimizer.bin is missing): resuming from" in caplog.text
    expected, resumed = weights(straight / "checkpoint-4"), weights(run / "checkpoint-4")
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    counts = load_file(run / "checkpoint-4" / "training_state.safetensors")["codebook_monitor.counts"]
    assert counts.shape == (16,) and json.loads((run / "checkpoint-4" / "training_state.json").read_text())


def test_the_training_state_is_checked_when_read(tmp_path):
    PartialState()
    monitor = train_vqgan.CodebookMonitor(torch.nn.Identity(), 16)
    monitor.counts += 3
    training.save_training_state(tmp_path, {"codebook_monitor": monitor})
    restored = train_vqgan.CodebookMonitor(torch.nn.Identity(), 16)
    training.load_training_state(tmp_path, {"codebook_monitor": restored})
    assert torch.equal(restored.counts, monitor.counts)
    with pytest.raises(UsageError, match="the saved state of 'codebook_monitor' does not fit this run"):
        training.load_training_state(
            tmp_path, {"codebook_monitor": train_vqgan.CodebookMonitor(torch.nn.Identity(), 8)}
        )
    state = tmp_path / "training_state.json"
    state.write_text(state.read_text()[:-20])
    with pytest.raises(UsageError, match="training state in .* cannot be read"):
        training.load_training_state(tmp_path, {"codebook_monitor": restored})
    training.save_training_state(tmp_path, {"codebook_monitor": monitor})
    with pytest.raises(UsageError, match="resume_from_checkpoint .*checkpoint-3 is not a checkpoint-<step> folder"):
        training.find_resume_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(UsageError, match="no complete checkpoint in .*checkpoint-3: it has no checkpoint_manifest"):
        training.find_resume_checkpoint("latest", tmp_path)


def test_a_pipeline_folder_is_never_replaced(data_dir, tmp_path):
    """--output_dir naming a pipeline folder is refused, also with --resume_from_checkpoint latest and no checkpoint
    (which would otherwise start a new run there and replace its vqvae/)."""
    pipeline = tmp_path / "pipeline"
    (pipeline / "vqvae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "ENATPipeline"}')
    (pipeline / "vqvae" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in pipeline.rglob("*") if p.is_file()}
    for extra in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
        with pytest.raises(UsageError, match="is a pipeline folder: this script does not update it"):
            train(data_dir, pipeline, "--max_train_steps", 2, *extra)
    assert {p: p.read_bytes() for p in pipeline.rglob("*") if p.is_file()} == before


def test_a_second_run_into_the_same_folder_is_refused(data_dir, tmp_path):
    with OutputLock(tmp_path / "run", "--output_dir run"):  # a run that is training there now
        with pytest.raises(UsageError, match="another run .* is writing into --output_dir"):
            train(data_dir, tmp_path / "run", "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
