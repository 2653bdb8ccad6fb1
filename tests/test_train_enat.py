"""examples/train_enat.py on tiny data made here: every data layout, resume, two processes, and its errors."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from conftest import ROOT, call_main, tiny_text_encoder, tiny_tokenizer
from diffusers import VQModel
from PIL import Image
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline, ENATTransformer2DModel, MaskedTokenScheduler, NATTransformer2DModel
from enat_diffusers.utils.cli import UsageError, run_cli
from enat_diffusers.utils.token_groups import group_mask


sys.path.insert(0, str(ROOT / "examples"))
import train_enat  # noqa: E402


SCRIPT = ROOT / "examples" / "train_enat.py"
RESOLUTION = 32  # 8x8 tokens with the 4x VQ model below
CODES = 16
COLOURS = {"red": (220, 50, 47), "green": (60, 170, 70), "blue": (38, 110, 210), "yellow": (240, 190, 30)}
CORNERS = {"top left": (2, 2), "top right": (18, 2), "bottom left": (2, 18), "bottom right": (18, 18)}
CLASS_CONFIG = dict(
    sample_size=8,
    codebook_size=CODES,
    hidden_size=32,
    num_attention_heads=2,
    num_encoder_layers=2,
    num_decoder_layers=1,
    mlp_ratio=2.0,
    num_classes=len(COLOURS),
)
TEXT_CONFIG = {**CLASS_CONFIG, "num_classes": None, "text_embed_dim": 16}
FAST = ["--max_train_steps", "5", "--train_batch_size", "4", "--lr_warmup_steps", "1", "--ema_decay", "0.9"]
FAST += ["--report_to", "none", "--encode_batch_size", "16"]


def square(colour: str, corner: str) -> Image.Image:
    """A 12-pixel square of a colour in a corner of a light grey 32x32 image."""
    image = Image.new("RGB", (RESOLUTION, RESOLUTION), (236, 236, 236))
    x, y = CORNERS[corner]
    image.paste(COLOURS[colour], (x, y, x + 12, y + 12))
    return image


def scenes():
    """24 (file name, colour, corner, caption) with every colour in every corner, and a repeat of each scene."""
    items = []
    for repeat in range(2):
        for colour in COLOURS:
            for corner in CORNERS:
                if (repeat, corner) != (1, "bottom right"):
                    name = f"{colour}_{corner.replace(' ', '_')}_{repeat}.png"
                    items.append((name, colour, corner, f"a {colour} square at the {corner}"))
    return items


def write_class_folders(root):
    for name, colour, corner, _ in scenes():
        (root / colour).mkdir(parents=True, exist_ok=True)
        square(colour, corner).save(root / colour / name)
    return root


def write_metadata_folder(root, skip_caption_of=None):
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as metadata:
        for name, colour, corner, caption in scenes():
            square(colour, corner).save(root / name)
            if name != skip_caption_of:
                metadata.write(json.dumps({"file_name": name, "text": caption, "held_out": False}) + "\n")
    return root


def write_coco(root):
    """The COCO layout: an image folder and a captions JSON with two captions per image."""
    images, annotations = [], []
    (root / "train2017").mkdir(parents=True)
    for image_id, (name, colour, corner, caption) in enumerate(scenes()):
        square(colour, corner).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "height": RESOLUTION, "width": RESOLUTION})
        for index, text in enumerate([caption, f"{colour} block, {corner}"]):
            annotations.append({"id": 2 * image_id + index, "image_id": image_id, "caption": text})
    (root / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "train2017", root / "captions_train2017.json"


def tiny_vq(num_codes=CODES) -> VQModel:
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=[8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=num_codes,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        scaling_factor=1.0,
    ).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Pipeline components without a transformer (vqvae, scheduler, text encoder, tokenizer); new models' configs."""
    root = tmp_path_factory.mktemp("base")
    tiny_vq().save_pretrained(root / "components" / "vqvae")
    MaskedTokenScheduler(mask_token_id=CODES).save_pretrained(root / "components" / "scheduler")
    tiny_text_encoder().save_pretrained(root / "components" / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "components" / "tokenizer")
    for name, config in (("class", CLASS_CONFIG), ("text", TEXT_CONFIG)):
        (root / f"{name}.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def class_data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("class_data"))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_metadata_folder(tmp_path_factory.mktemp("text_data") / "train")


def train(*arguments):
    """Runs the script's `main` in this process, as `accelerate launch` would with one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a busy machine
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return train_enat.main(train_enat.parse_args([str(argument) for argument in arguments]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def train_cli(*arguments) -> (int, str):
    """The script's command line (errors as one line), in this process: (exit status, stderr with the message)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return call_main(lambda argv: run_cli(train_enat.main, train_enat.parse_args, argv), *arguments)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def class_run(base, data, output_dir, *extra):
    return train(
        "--pretrained_model_name_or_path", base / "components", "--transformer_config", base / "class.json",
        "--train_data_dir", data, "--output_dir", output_dir, *FAST, *extra,
    )  # fmt: skip


def text_run(base, data, output_dir, *extra):
    return train(
        "--pretrained_model_name_or_path", base / "components", "--transformer_config", base / "text.json",
        "--train_data_dir", data, "--output_dir", output_dir, *FAST, *extra,
    )  # fmt: skip


class MarkerPickle:
    """A pickle that, when unpickled, creates a file (the code a replaced checkpoint file could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def transformer_weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_class_folders_train_save_and_generate(base, class_data, tmp_path):
    output_dir = tmp_path / "out"
    class_run(base, class_data, output_dir, "--validation_prompts", "0", "blue", "--validation_steps", "5")

    pipe = ENATPipeline.from_pretrained(output_dir)
    assert pipe.config.id2label == {0: "blue", 1: "green", 2: "red", 3: "yellow"}  # sorted folder names
    image = pipe(class_labels=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)
    # the pipeline holds the EMA weights, which differ from the trained ones
    ema = transformer_weights(output_dir / "transformer")
    assert ema.keys() == transformer_weights(output_dir / "checkpoint-5" / "transformer_ema").keys()
    trained = transformer_weights(output_dir / "checkpoint-5" / "transformer")
    assert any(not torch.equal(ema[key], trained[key]) for key in ema)
    rows = (output_dir / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [row.split(",")[0] for row in rows[1:]] == ["5"]
    assert (output_dir / "validation" / "step-000005.png").is_file()
    assert (output_dir / "loss_curve.png").is_file()


def test_metadata_jsonl_trains_with_tensorboard_and_generates(base, text_data, tmp_path):
    output_dir = tmp_path / "out"
    text_run(
        base, text_data, output_dir, "--report_to", "tensorboard", "--logging_steps", "2",
        "--validation_prompts", "a red square at the top left", "--validation_steps", "10",
        "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
    )  # fmt: skip

    pipe = ENATPipeline.from_pretrained(output_dir)
    images = pipe("a blue square at the bottom left", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert list((output_dir / "logs" / "train_enat").glob("events.out.tfevents.*"))
    assert [row.split(",")[0] for row in (output_dir / "train_log.csv").read_text().splitlines()[1:]] == [
        "2", "4", "5"
    ]  # fmt: skip
    assert (output_dir / "validation" / "step-000005.png").is_file()  # the final validation


def test_validation_sampling_settings_reach_the_pipeline(base, tmp_path):
    # temperatures 0 make generation deterministic: the validation grid then no longer depends on the seed
    components = base / "components"
    pipe = ENATPipeline(
        transformer=ENATTransformer2DModel(**TEXT_CONFIG).eval(),
        scheduler=MaskedTokenScheduler.from_pretrained(components / "scheduler"),
        vqvae=VQModel.from_pretrained(components / "vqvae"),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
    )
    tracker_free = type("Accelerator", (), {"trackers": []})()
    PartialState()  # the script logs through accelerate

    def grid(seed, *extra):
        args = train_enat.parse_args([
            "--pretrained_model_name_or_path", str(components), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--seed", str(seed),
            "--validation_prompts", "a red square at the top left", "--validation_num_inference_steps", "2", *extra,
        ])  # fmt: skip
        train_enat.log_validation(pipe, args, tracker_free, seed, tmp_path)
        return np.asarray(Image.open(tmp_path / "validation" / f"step-{seed:06d}.png"))

    assert not np.array_equal(grid(0), grid(1))  # the scheduler's temperatures sample
    greedy = ["--validation_mask_temperature", "0", "--validation_sampling_temperature", "0"]
    assert np.array_equal(grid(2, *greedy), grid(3, *greedy))


def test_coco_layout_uses_every_caption(base, tmp_path):
    image_dir, annotations = write_coco(tmp_path / "coco")
    data = train_enat.read_training_data(
        train_enat.parse_args(["--train_data_dir", str(image_dir), "--coco_annotations_file", str(annotations),
                               "--output_dir", "unused", "--max_train_steps", "1", "--vqvae_name_or_path", "unused",
                               "--transformer_config", str(base / "text.json")]),
        text_to_image=True,
    )  # fmt: skip
    assert len(data.files) == len(scenes()) and all(len(captions) == 2 for captions in data.captions)
    captions = dict(zip(data.files, data.captions))
    assert captions["red_top_left_0.png"] == ["a red square at the top left", "red block, top left"]

    output_dir = tmp_path / "out"
    text_run(base, image_dir, output_dir, "--coco_annotations_file", annotations)
    pipe = ENATPipeline.from_pretrained(output_dir)
    assert pipe("red block, top left", num_inference_steps=2).images[0].size == (RESOLUTION, RESOLUTION)


def test_fine_tunes_a_converted_checkpoint(converted_fixture_dir, class_data, tmp_path):
    train(
        "--pretrained_model_name_or_path", converted_fixture_dir, "--train_data_dir", class_data,
        "--output_dir", tmp_path / "out", *FAST,
    )  # fmt: skip
    original, tuned = (
        ENATPipeline.from_pretrained(converted_fixture_dir),
        ENATPipeline.from_pretrained(tmp_path / "out"),
    )
    for component in ("transformer", "scheduler"):
        configs = [{k: v for k, v in pipe.components[component].config.items() if k != "_name_or_path"}
                   for pipe in (original, tuned)]  # fmt: skip
        assert configs[0] == configs[1]
    assert original.config.id2label is None  # a converted model without class names takes the folders' names
    assert tuned.config.id2label == {0: "blue", 1: "green", 2: "red", 3: "yellow"}
    before, after = original.transformer.state_dict(), tuned.transformer.state_dict()
    change = max((after[key] - before[key]).abs().max().item() for key in before)
    assert 0 < change < 0.05  # a few small steps away from the converted weights


def test_class_folders_named_after_pretrained_classes_keep_their_ids(tmp_path):
    PartialState()  # the script logs through accelerate
    id2label = {"0": "blue", "1": "green", "2": "red", "3": "yellow"}  # as model_index.json stores it

    def folders(*names):
        return train_enat.TrainingData(tmp_path, "class folders", list(names), list(range(len(names))), list(names))

    data = folders("Red", "blue")
    assert train_enat.assign_class_ids(data, id2label, 4) == {0: "blue", 1: "green", 2: "red", 3: "yellow"}
    assert data.labels == [2, 0]
    data = folders("cats", "dogs")  # not class names: folder i trains class i, renamed
    assert train_enat.assign_class_ids(data, id2label, 4) == {0: "cats", 1: "dogs", 2: "red", 3: "yellow"}
    assert data.labels == [0, 1]
    with pytest.raises(ValueError, match="5 class folders but the transformer has num_classes=4"):
        train_enat.assign_class_ids(folders(*"abcde"), None, 4)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_resume_continues_exactly(base, class_data, tmp_path, caplog):
    """6 uninterrupted steps, against 4 steps whose last checkpoint is incomplete (a file missing) and a resume with
    `latest`: it falls back to checkpoint-3 with a warning and from there reproduces every loss, the weights, the EMA
    and the optimiser state exactly."""
    common = ["--checkpointing_steps", "3", "--train_batch_size", "5", "--logging_steps", "1"]
    class_run(base, class_data, tmp_path / "straight", *common, "--max_train_steps", "6")
    class_run(base, class_data, tmp_path / "resumed", *common, "--max_train_steps", "4")
    (tmp_path / "resumed" / "checkpoint-4" / "transformer_ema" / "diffusion_pytorch_model.safetensors").unlink()
    token_cache = next((tmp_path / "resumed" / "token_cache").glob("*.npy"))
    cached_at = token_cache.stat().st_mtime_ns
    class_run(base, class_data, tmp_path / "resumed", *common, "--max_train_steps", "6",
              "--resume_from_checkpoint", "latest")  # fmt: skip

    assert "checkpoint-4 is incomplete (transformer_ema/diffusion_pytorch_model.safetensors is missing)" in caplog.text
    assert token_cache.stat().st_mtime_ns == cached_at  # the images were not tokenised again
    logs = [(tmp_path / run / "train_log.csv").read_text().splitlines()[1:] for run in ("straight", "resumed")]
    assert [row.split(",")[:2] for row in logs[0]] == [row.split(",")[:2] for row in logs[1]]  # steps 1-6, losses
    for folder in ("transformer", "transformer_ema"):
        straight = transformer_weights(tmp_path / "straight" / "checkpoint-6" / folder)
        resumed = transformer_weights(tmp_path / "resumed" / "checkpoint-6" / folder)
        assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    straight = torch.load(tmp_path / "straight" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert straight["state"].keys() == resumed["state"].keys()
    for index, state in straight["state"].items():
        assert all(torch.equal(value, resumed["state"][index][name]) for name, value in state.items())
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "training_state.json").read_text())
    assert state["objects"]["ema"]["values"]["optimization_step"] == 6  # diffusers' EMAModel, restored
    assert not list((tmp_path / "straight" / "checkpoint-6").glob("custom_checkpoint_*"))  # nothing pickled


def test_a_planted_pickle_never_runs_on_resume(base, class_data, tmp_path):
    """A checkpoint's `custom_checkpoint_0.pkl` (where the training generator's state used to be pickled) replaced
    with a pickle that creates a file: resuming refuses that checkpoint, and the code never runs."""
    class_run(base, class_data, tmp_path / "out", "--max_train_steps", "2")
    marker = tmp_path / "code-ran"
    torch.save(
        {"generator_states": MarkerPickle(marker)}, tmp_path / "out" / "checkpoint-2" / "custom_checkpoint_0.pkl"
    )
    with pytest.raises(UsageError, match="custom_checkpoint_0.pkl, which its save did not write"):
        class_run(base, class_data, tmp_path / "out", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert not marker.exists()


def test_checkpoints_total_limit_keeps_the_newest(base, class_data, tmp_path):
    class_run(base, class_data, tmp_path / "out", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_two_processes_end_with_the_same_weights_and_one_output(base, class_data, tmp_path):
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
        "--pretrained_model_name_or_path", str(base / "components"), "--transformer_config", str(base / "class.json"),
        "--train_data_dir", str(class_data), "--output_dir", str(output_dir), *FAST,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # CPU processes, gloo
    log = tmp_path / "launcher.log"
    with open(log, "w") as stderr_file:
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True, env=env,
                                    start_new_session=True)  # fmt: skip
        try:  # polled up to a generous deadline; a run past it fails with the end of its log
            deadline = time.monotonic() + 1800
            while launcher.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"accelerate launch still running after 1800 s; its log ends:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        finally:  # the launcher and both workers, also after a timeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert launcher.returncode == 0, stderr[-3000:]
    checksums = {line.split("Process ")[1][0]: line.rsplit(" ", 1)[1] for line in stderr.splitlines()
                 if "parameter checksum" in line}  # fmt: skip
    assert checksums.keys() == {"0", "1"} and checksums["0"] == checksums["1"]
    assert [row.split(",")[0] for row in (output_dir / "train_log.csv").read_text().splitlines()[1:]] == ["5"]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-5"]
    ENATPipeline.from_pretrained(output_dir)


def test_loss_falls_on_structured_data(base, class_data, tmp_path):
    """Learning, not just running: 150 steps take the masked-token loss from ln(16) ~ 2.7 far down (floor ~0.57)."""
    class_run(
        base, class_data, tmp_path / "out", "--max_train_steps", "150", "--train_batch_size", "16",
        "--learning_rate", "2e-3", "--lr_warmup_steps", "10", "--checkpointing_steps", "1000",
    )  # fmt: skip
    losses = [float(row.split(",")[1]) for row in (tmp_path / "out" / "train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 15 and losses[0] > 2.5 and losses[-1] < 0.7 * losses[0]


def test_reuse_training_input_masks_more_tokens_of_each_row():
    generator = torch.Generator().manual_seed(0)
    scheduler = MaskedTokenScheduler(mask_token_id=CODES)
    for _ in range(20):
        input_ids = scheduler.add_noise(torch.randint(0, CODES, (6, 64), generator=generator), generator=generator)
        previous = train_enat.mask_previous_step(input_ids, CODES, generator)
        now_masked, then_masked = input_ids == CODES, previous == CODES
        assert torch.all(then_masked | ~now_masked)  # tokens masked now were masked then
        extra = (then_masked & ~now_masked).sum(1)
        assert torch.all(extra == extra[0])  # the same number of extra masked tokens in every row
        assert torch.equal(previous[~then_masked], input_ids[~then_masked])


def test_region_masks_cover_a_half_or_a_quarter_and_the_ratio_inside_it():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, CODES, (8, 64), generator=generator)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    regions = {
        "left": cols < 4, "right": cols >= 4, "top": rows < 4, "bottom": rows >= 4,
        "top-left": (rows < 4) & (cols < 4), "top-right": (rows < 4) & (cols >= 4),
        "bottom-left": (rows >= 4) & (cols < 4), "bottom-right": (rows >= 4) & (cols >= 4),
    }  # fmt: skip
    seen = set()
    for _ in range(40):
        noisy = train_enat.mask_in_regions(clean, CODES, 8, 0.75, generator)
        masked = (noisy == CODES).reshape(8, 8, 8)
        counts = masked.sum((1, 2))
        assert torch.all(counts == counts[0]) and int(counts[0]) in (24, 12)  # 0.75 of 32 or of 16 tokens
        for row in masked:
            inside = [name for name, region in regions.items() if not (row & ~region).any()]
            size = 32 if counts[0] == 24 else 16
            inside = [name for name in inside if int(regions[name].sum()) == size]
            assert len(inside) == 1  # exactly one region of the batch's size holds every masked token
            seen.add(inside[0])
        assert torch.equal(noisy[noisy != CODES], clean[noisy != CODES])
    assert seen == set(regions)  # all four halves and all four quarters occur
    odd = train_enat.mask_in_regions(torch.zeros(16, 25, dtype=torch.long), CODES, 5, 1.0, generator)
    assert torch.all((odd == CODES).sum(1) == (odd == CODES).sum(1)[0])  # a 5x5 grid: equal halves of 2 lines


def test_region_mask_prob_trains_on_region_masks(base, class_data, tmp_path):
    output_dir = tmp_path / "out"
    class_run(base, class_data, output_dir, "--region_mask_prob", "1")
    ratios = [float(row.split(",")[3]) for row in (output_dir / "train_log.csv").read_text().splitlines()[1:]]
    assert ratios and all(0 < r <= 0.5 for r in ratios)  # at most a half of the grid is ever masked


def test_training_masks_of_a_grouped_model_cover_whole_groups():
    """With patch_size 2 (8x8 tokens, 4x4 groups) every training mask masks whole 2x2 groups: random masks, region
    masks inside one half or quarter, and the reuse step's larger masks."""
    generator = torch.Generator().manual_seed(0)
    scheduler = MaskedTokenScheduler(mask_token_id=CODES, patch_size=2)
    clean = torch.randint(0, CODES, (6, 64), generator=generator)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    halves = [cols < 4, cols >= 4, rows < 4, rows >= 4]
    for _ in range(20):
        noisy = scheduler.add_noise(clean, generator=generator)
        regional = train_enat.mask_in_regions(clean, CODES, 8, 0.5, generator, patch_size=2)
        for input_ids in (noisy, regional):
            groups = group_mask(input_ids == CODES, 2)  # raises on a partly masked group
            assert torch.all(groups.sum(1) == groups.sum(1)[0])
            previous = train_enat.mask_previous_step(input_ids, CODES, generator, patch_size=2)
            then = group_mask(previous == CODES, 2)
            assert torch.all(then | ~groups) and torch.all(then.sum(1) == then.sum(1)[0])
        masked = (regional == CODES).reshape(6, 8, 8)
        assert all(any(not (row & ~half).any() for half in halves) for row in masked)  # within a half (or quarter)
        assert int(masked[0].sum()) in (16, 8)  # half of a half's 8 groups or of a quarter's 4, 4 tokens each


def test_a_grouped_text_model_trains_resumes_generates_and_ungroups(base, text_data, tmp_path):
    """`"patch_size": 2` in --transformer_config: the scheduler saved with the pipeline gets the same patch_size,
    the sine-cosine start covers the 4x4 grid of groups, training resumes exactly, and the pipeline generates; with
    --ungroup it is fine-tuned as one position per token, and a model without groups is refused."""
    config = tmp_path / "grouped.json"
    config.write_text(json.dumps({**TEXT_CONFIG, "patch_size": 2}))
    common = ["--pretrained_model_name_or_path", base / "components", "--transformer_config", config,
              "--train_data_dir", text_data, *FAST, "--checkpointing_steps", "2", "--logging_steps", "1",
              "--region_mask_prob", "0.5", "--reuse_prob", "0.5", "--sincos_position_embeddings"]  # fmt: skip
    train(*common, "--output_dir", tmp_path / "straight", "--max_train_steps", "4")
    train(*common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "2")
    train(
        *common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    logs = [(tmp_path / run / "train_log.csv").read_text().splitlines()[1:] for run in ("straight", "resumed")]
    assert [row.split(",")[:2] for row in logs[0]] == [row.split(",")[:2] for row in logs[1]]
    assert {row.split(",")[4] for row in logs[0]} >= {"0.0", "1.0"}  # batches with and without a reuse state

    assert MaskedTokenScheduler.from_pretrained(tmp_path / "straight" / "scheduler").config.patch_size == 2
    pipe = ENATPipeline.from_pretrained(tmp_path / "straight")
    assert pipe.transformer.config.patch_size == 2
    start = pipe.transformer.embed.position_embeddings.weight
    assert start.shape == (16, 32) and torch.allclose(start, train_enat.sincos_grid(4, 32), atol=0.02)
    seen = []
    images = pipe(
        "a red square at the top left", num_inference_steps=3, output_type="pt",
        callback_on_step_end=lambda p, step, t, tensors: seen.append(tensors["latents"].clone()) or {},
    ).images  # fmt: skip
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert [int(group_mask(ids.reshape(1, 64) == CODES, 2).sum()) for ids in seen] == [13, 8, 0]

    # --ungroup: the same network fine-tuned with one position per token; the scheduler follows
    train("--pretrained_model_name_or_path", tmp_path / "straight", "--ungroup", "--train_data_dir", text_data, *FAST,
          "--output_dir", tmp_path / "ungrouped", "--max_train_steps", "2")  # fmt: skip
    pipe = ENATPipeline.from_pretrained(tmp_path / "ungrouped")
    assert pipe.transformer.config.patch_size == 1 and pipe.transformer.config.project_tokens
    assert pipe.scheduler.config.patch_size == 1
    seen.clear()
    pipe("a red square at the top left", num_inference_steps=3,
         callback_on_step_end=lambda p, step, t, tensors: seen.append(tensors["latents"].clone()) or {})  # fmt: skip
    masked = [int((ids == CODES).sum()) for ids in seen]
    assert masked[-1] == 0 and any(count % 4 for count in masked)  # single tokens are revealed
    code, stderr = train_cli("--pretrained_model_name_or_path", tmp_path / "ungrouped", "--ungroup",
                             "--train_data_dir", text_data, *FAST, "--output_dir", tmp_path / "again")  # fmt: skip
    assert code == 1 and "has no token groups (patch_size 1)" in stderr.strip().splitlines()[-1], stderr[-2000:]
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------------------- errors


def test_image_listing_is_the_files_that_imagefolder_reads(tmp_path):
    """list_images lists the folder itself (load_dataset takes seconds per thousand files): the same files as 🤗
    datasets' imagefolder, hidden and `__` entries, other extensions and folders named like images left out."""
    import datasets

    from enat_diffusers.utils.training import list_images

    for name in ["a.png", "b/c.JPG", "b/d/e.jpeg", ".hidden.png", ".cache/f.png", "__skip/g.png", "b/h.webp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train", drop_labels=True)
    read = sorted(
        pathlib.Path(row["path"]).relative_to(tmp_path).as_posix()
        for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]
    )
    assert list_images(tmp_path) == read == ["a.png", "b/c.JPG", "b/d/e.jpeg", "b/h.webp"]


def test_empty_data_folder(base, tmp_path):
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images in --train_data_dir"):
        class_run(base, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_images_without_captions(base, class_data, tmp_path):
    with pytest.raises(ValueError, match="have no captions: a text-to-image model needs .*metadata.jsonl"):
        text_run(base, class_data, tmp_path / "out")
    data = write_metadata_folder(tmp_path / "data", skip_caption_of="red_top_left_0.png")
    with pytest.raises(ValueError, match=r"1 images in .* have no caption in metadata.jsonl: red_top_left_0.png"):
        text_run(base, data, tmp_path / "out")


def test_caption_files_naming_missing_images(base, tmp_path):
    data = write_metadata_folder(tmp_path / "data")
    (data / "blue_top_left_1.png").unlink()
    with pytest.raises(ValueError, match="metadata.jsonl names 1 images that are not in .*: blue_top_left_1.png"):
        text_run(base, data, tmp_path / "out")
    image_dir, annotations = write_coco(tmp_path / "coco")
    (image_dir / "green_top_right_0.png").unlink()
    with pytest.raises(ValueError, match="captions_train2017.json names 1 images .*: green_top_right_0.png"):
        text_run(base, image_dir, tmp_path / "out", "--coco_annotations_file", annotations)


@pytest.mark.parametrize(
    "config, components, message",
    [
        ({"codebook_size": 32}, {}, "codebook_size is 32 but the VQ model has 16 codes"),
        ({"sample_size": 4}, {}, "transformer.s sample_size is 4: sample_size must equal resolution / 4"),
        ({}, {"scheduler": MaskedTokenScheduler(mask_token_id=8)}, "scheduler's mask_token_id is 8"),
    ],
)
def test_components_that_do_not_fit(base, class_data, tmp_path, config, components, message):
    components_dir = tmp_path / "components"
    components_dir.mkdir()
    for name in ("vqvae", "scheduler"):
        if name in components:
            components[name].save_pretrained(components_dir / name)
        else:
            os.symlink(base / "components" / name, components_dir / name)
    (tmp_path / "config.json").write_text(json.dumps({**CLASS_CONFIG, **config}))
    with pytest.raises(ValueError, match=message):
        train(
            "--pretrained_model_name_or_path", components_dir, "--transformer_config", tmp_path / "config.json",
            "--train_data_dir", class_data, "--output_dir", tmp_path / "out", "--resolution", RESOLUTION, *FAST,
        )  # fmt: skip


def test_resume_from_another_configuration_is_refused(base, class_data, tmp_path):
    class_run(base, class_data, tmp_path / "out", "--max_train_steps", "2")
    (tmp_path / "wider.json").write_text(json.dumps({**CLASS_CONFIG, "hidden_size": 48}))
    with pytest.raises(ValueError, match="another transformer configuration .*hidden_size: 32 in the checkpoint, 48"):
        train(
            "--pretrained_model_name_or_path", base / "components", "--transformer_config", tmp_path / "wider.json",
            "--train_data_dir", class_data, "--output_dir", tmp_path / "out", *FAST,
            "--resume_from_checkpoint", "latest",
        )  # fmt: skip


def test_non_empty_output_dir_is_refused_without_resume(base, class_data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty .*notes.txt"):
        class_run(base, class_data, tmp_path / "out")


def test_unreadable_image_is_skipped_with_a_warning(base, class_data, tmp_path, caplog):
    data = tmp_path / "data"
    write_class_folders(data)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    class_run(base, data, tmp_path / "out")
    assert "Skipping" in caplog.text and "broken.png" in caplog.text
    meta = json.loads(next((tmp_path / "out" / "token_cache").glob("*.json")).read_text())
    assert meta["skipped"] == ["red/broken.png"] and len(meta["files"]) == len(scenes())


def test_mask_ratio_distribution_and_sincos_positions_are_used_and_saved(base, class_data, tmp_path):
    output_dir = tmp_path / "out"
    class_run(base, class_data, output_dir, "--beta_alpha_beta", "2", "1.5", "--sincos_position_embeddings")
    scheduler = MaskedTokenScheduler.from_pretrained(output_dir / "scheduler")
    assert (scheduler.config.beta_alpha, scheduler.config.beta_beta) == (2.0, 1.5)
    rows = (output_dir / "train_log.csv").read_text().splitlines()[1:]
    ratios = [float(row.split(",")[3]) for row in rows]
    assert ratios and all(0 < r < 1 for r in ratios)

    grid = train_enat.sincos_grid(8, 32)
    assert grid.shape == (64, 32) and abs(float(grid.std()) - 0.02) < 1e-6
    distance = torch.cdist(grid, grid)  # codes of neighbouring cells are closer than those of far cells
    assert distance[0, 1] < distance[0, 7] and distance[0, 8] < distance[0, 56]
    assert distance.fill_diagonal_(1).min() > 0  # every cell has its own code
    start = ENATPipeline.from_pretrained(output_dir).transformer.embed.position_embeddings.weight
    assert torch.allclose(start, grid, atol=0.02)  # 5 short steps from the grid, not from N(0, 0.02)
    with pytest.raises(ValueError, match="needs --transformer_config"):
        train_enat.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(class_data),
                               "--output_dir", str(tmp_path / "y"), "--max_train_steps", "1",
                               "--sincos_position_embeddings"])  # fmt: skip


def test_a_damaged_token_cache_is_tokenised_again(base, class_data, tmp_path, caplog):
    cache = tmp_path / "cache"
    class_run(base, class_data, tmp_path / "first", "--max_train_steps", "1", "--token_cache_dir", cache)
    tokens = next(cache.glob("*.npy"))
    tokens.write_bytes(tokens.read_bytes()[:-100])  # an interrupted copy
    class_run(base, class_data, tmp_path / "second", "--max_train_steps", "1", "--token_cache_dir", cache)
    assert f"The token cache {tokens} is damaged" in caplog.text
    assert np.load(tokens).shape == (len(scenes()), 2, 64)  # written again, whole


def test_training_without_ema_saves_the_trained_weights(base, class_data, tmp_path):
    output_dir = tmp_path / "out"
    class_run(base, class_data, output_dir, "--no_use_ema")
    saved, trained = (
        transformer_weights(output_dir / "transformer"),
        transformer_weights(output_dir / "checkpoint-5" / "transformer"),
    )
    assert all(torch.equal(saved[key], trained[key]) for key in saved)
    assert not (output_dir / "checkpoint-5" / "transformer_ema").exists()
    assert "ema" not in json.loads((output_dir / "checkpoint-5" / "training_state.json").read_text())["objects"]


@pytest.fixture(scope="module")
def class_pipeline(base, tmp_path_factory):
    """A pretrained class-conditional pipeline (random weights) of the tiny configuration."""
    folder = tmp_path_factory.mktemp("pipeline") / "class"
    torch.manual_seed(0)
    transformer = ENATTransformer2DModel(**CLASS_CONFIG)
    with torch.no_grad():  # adaLN starts at zero (identity blocks): perturb it so that the attention matters
        for parameter in transformer.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    vqvae = VQModel.from_pretrained(base / "components" / "vqvae")
    id2label = {0: "blue", 1: "green", 2: "red", 3: "yellow"}
    ENATPipeline(transformer, MaskedTokenScheduler(mask_token_id=CODES), vqvae, id2label=id2label).save_pretrained(
        folder
    )
    return folder


def test_lora_trains_saves_loads_and_resumes_exactly(class_pipeline, class_data, tmp_path):
    """A LoRA of the attention projections of a pretrained pipeline: a few steps change its outputs; the adapter file
    loads into a fresh copy of the pipeline with `load_lora_weights` and gives the trained model's outputs exactly;
    a resumed run ends with the same adapter."""
    arguments = ["--pretrained_model_name_or_path", class_pipeline, "--train_data_dir", class_data, *FAST,
                 "--use_lora", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
                 "--checkpointing_steps", "2", "--max_train_steps", "4"]  # fmt: skip
    trained = train(*arguments, "--output_dir", tmp_path / "lora")
    adapter = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(adapter)
    assert not (tmp_path / "lora" / "model_index.json").exists() and adapter.stat().st_size < 1e6
    assert {key.split(".attn.")[1].split(".lora_")[0] for key in weights} == {"to_q", "to_k", "to_v", "to_out.0"}

    base_pipe, fresh = ENATPipeline.from_pretrained(class_pipeline), ENATPipeline.from_pretrained(class_pipeline)
    fresh.load_lora_weights(tmp_path / "lora")
    ids = torch.randint(0, CODES, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[:, ::2] = CODES  # every other token masked
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        before, after, expected = (
            pipe.transformer(ids, class_labels=labels).logits for pipe in (base_pipe, fresh, trained)
        )
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-2  # the adapter changed the model

    def generate(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1, 3], num_inference_steps=2, generator=generator, output_type="latent").images

    assert torch.equal(generate(fresh), generate(trained))

    shutil.copytree(tmp_path / "lora", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    train(*arguments, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[key], resumed[key]) for key in weights)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("invalid json", "--transformer_config .*bad.json is not valid JSON: Expecting"),
        ("string size", "--transformer_config .*bad.json: hidden_size must be an integer, got '128'"),
        ("no file_name", "1 lines of .*metadata.jsonl have no file_name"),
        ("output under a file", "--output_dir .*notes.txt/out cannot be created: .*notes.txt is a file"),
    ],
)
def test_user_errors_are_one_line(base, tmp_path, problem, message):
    data = write_metadata_folder(tmp_path / "data")
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(TEXT_CONFIG))
    output_dir = tmp_path / "out"
    if problem == "invalid json":
        config.write_text('{"sample_size": 8,}')
    elif problem == "string size":
        config.write_text(json.dumps({**TEXT_CONFIG, "hidden_size": "128"}))
    elif problem == "no file_name":
        with open(data / "metadata.jsonl", "a") as metadata:
            metadata.write(json.dumps({"text": "a red square at the top left"}) + "\n")
    else:
        (tmp_path / "notes.txt").write_text("mine")
        output_dir = tmp_path / "notes.txt" / "out"
    args = ["--pretrained_model_name_or_path", base / "components", "--transformer_config", config,
            "--train_data_dir", data, "--output_dir", output_dir, *FAST]  # fmt: skip
    code, stderr = train_cli(*args)
    assert code == 1 and re.search(message, stderr.strip().splitlines()[-1]), stderr[-2000:]
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        train_cli(*args, "--debug")


def test_a_new_model_from_separate_components_asks_no_hub_for_a_scheduler(base, class_data, tmp_path, monkeypatch):
    """Without --pretrained_model_name_or_path there is no pipeline to read a scheduler from: the script must not
    look one up (it used to ask the Hub for a repository named "None", retrying for half a minute offline)."""
    original = MaskedTokenScheduler.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        assert path is not None, "asked for the scheduler of pipeline None"
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(MaskedTokenScheduler, "from_pretrained", classmethod(from_pretrained))
    output_dir = tmp_path / "out"
    train(
        "--vqvae_name_or_path", base / "components" / "vqvae", "--transformer_config", base / "class.json",
        "--train_data_dir", class_data, "--output_dir", output_dir, *FAST,
    )  # fmt: skip
    scheduler = MaskedTokenScheduler.from_pretrained(output_dir / "scheduler")
    assert scheduler.config.mask_token_id == CODES


def test_a_plain_nat_config_trains_a_text_nat_that_resumes_and_generates(base, text_data, tmp_path):
    """`"_class_name": "NATTransformer2DModel"` in --transformer_config trains AutoNAT's plain NAT (text in context,
    rotary positions) without reuse; it resumes exactly and saves a pipeline that generates."""
    config = {"_class_name": "NATTransformer2DModel", "sample_size": 8, "codebook_size": CODES, "hidden_size": 32,
              "num_attention_heads": 2, "num_layers": 2, "mlp_ratio": 2.0, "num_classes": None, "text_embed_dim": 16,
              "use_rotary_positional_embeddings": True}  # fmt: skip
    (tmp_path / "nat.json").write_text(json.dumps(config))
    common = ["--pretrained_model_name_or_path", base / "components", "--transformer_config", tmp_path / "nat.json",
              "--train_data_dir", text_data, *FAST, "--checkpointing_steps", "2", "--logging_steps", "1"]  # fmt: skip
    train(*common, "--output_dir", tmp_path / "straight", "--max_train_steps", "4")
    train(*common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "2")
    train(
        *common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )

    logs = [(tmp_path / run / "train_log.csv").read_text().splitlines()[1:] for run in ("straight", "resumed")]
    assert [row.split(",")[:2] for row in logs[0]] == [row.split(",")[:2] for row in logs[1]]  # steps 1-4, losses
    assert [row.split(",")[4] for row in logs[0]] == ["0.0"] * 4  # no batch used a reuse state
    pipe = ENATPipeline.from_pretrained(tmp_path / "straight")
    assert isinstance(pipe.transformer, NATTransformer2DModel)
    assert pipe.transformer.config.use_rotary_positional_embeddings
    trained = transformer_weights(tmp_path / "straight" / "transformer")
    assert all(
        torch.equal(trained[k], v) for k, v in transformer_weights(tmp_path / "resumed" / "transformer").items()
    )
    images = pipe("a red square at the top left", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)

    status, message = train_cli(*common, "--output_dir", tmp_path / "reuse", "--reuse_prob", "0.5")
    assert status == 1 and "NATTransformer2DModel has no feature reuse; pass 0" in message
    (tmp_path / "other.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    status, message = train_cli(*common[:2], "--transformer_config", tmp_path / "other.json", *common[4:],
                                "--output_dir", tmp_path / "other")  # fmt: skip
    assert status == 1 and "names the class 'UNet2DModel'" in message
