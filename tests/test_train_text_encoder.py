"""examples/train_text_encoder.py end to end on tiny generated (image, caption) pairs: outputs, resume, errors."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from enat_diffusers import build_clip_tokenizer
from enat_diffusers.utils.cli import UsageError


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_text_encoder  # noqa: E402


COLOURS = {"red": (220, 50, 47), "green": (60, 170, 70), "blue": (38, 110, 210)}
POSITIONS = {"on the left": (8, 16), "on the right": (24, 16), "in the centre": (16, 16)}
TINY_MODEL = [
    "--resolution", "32", "--patch_size", "8", "--max_length", "16", "--text_hidden_size", "16",
    "--text_num_layers", "1", "--text_num_heads", "2", "--projection_dim", "16", "--vision_hidden_size", "16",
    "--vision_num_layers", "1", "--vision_num_heads", "2", "--train_batch_size", "8", "--num_validation_pairs", "8",
    "--validation_batch_size", "4", "--hard_negative_weight", "1", "--report_to", "none",
]  # fmt: skip


def make_pairs(folder: Path, count: int, seed: int = 0):
    """A tiny imagefolder of coloured circles and squares, captioned "a red circle on the left" or, for two objects,
    "a red circle on the left and a blue square on the right" (either order)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image = Image.new("RGB", (32, 32), (236, 236, 236))
        draw = ImageDraw.Draw(image)
        positions = rng.choice([["in the centre"], ["on the left", "on the right"], ["on the right", "on the left"]])
        phrases = []
        for position in positions:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
            x, y = POSITIONS[position]
            (draw.ellipse if shape == "circle" else draw.rectangle)([x - 5, y - 5, x + 5, y + 5], fill=COLOURS[colour])
            phrases.append(f"a {colour} {shape} {position}")
        image.save(folder / f"{index:03d}.png")
        lines.append(json.dumps({"file_name": f"{index:03d}.png", "text": " and ".join(phrases)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def train(data_dir: Path, output_dir: Path, *extra):
    return train_text_encoder.main(
        train_text_encoder.parse_args(
            ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), *TINY_MODEL, *map(str, extra)]
        )
    )


def clip_text_features(checkpoint: Path, input_ids: torch.Tensor):
    """Text features of the CLIPModel saved in a training checkpoint: (projected pooled, last hidden states)."""
    args = train_text_encoder.parse_args(["--train_data_dir", "unused", *TINY_MODEL])
    clip = train_text_encoder.build_clip(args, build_clip_tokenizer(model_max_length=16))
    clip.load_state_dict(load_file(checkpoint / "model.safetensors"))
    with torch.no_grad():
        outputs = clip.eval().text_model(input_ids=input_ids)
        return clip.text_projection(outputs.pooler_output), outputs.last_hidden_state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    make_pairs(folder, 32)
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "clip"
    metrics = train(data_dir, output_dir, "--max_train_steps", 4, "--checkpointing_steps", 2)
    return output_dir, metrics


def test_saved_text_encoder_equals_the_trained_clip_text_tower(trained):
    output_dir, metrics = trained
    tokenizer = CLIPTokenizer.from_pretrained(output_dir / "tokenizer")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(output_dir / "text_encoder").eval()
    assert tokenizer.model_max_length == text_encoder.config.max_position_embeddings == 16
    assert len(tokenizer) == text_encoder.config.vocab_size == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids
    input_ids = tokenizer(
        ["a red circle on the left", "a blue square in the centre"], padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        outputs = text_encoder(input_ids=input_ids)
    text_embeds, last_hidden_state = clip_text_features(output_dir / "checkpoint-4", input_ids)
    torch.testing.assert_close(outputs.text_embeds, text_embeds)
    torch.testing.assert_close(outputs.last_hidden_state, last_hidden_state)
    assert outputs.text_embeds.shape == (2, 16) and outputs.last_hidden_state.shape == (2, 16, 16)
    for name in ("text_to_image_top1", "image_to_text_top1", "word_order_accuracy"):
        assert 0 <= metrics[f"val/{name}"] <= 1
    assert json.loads((output_dir / "held_out_retrieval.json").read_text()) == metrics


def test_a_text_encoder_below_the_retrieval_bar_is_an_error(data_dir, tmp_path):
    """The final scores are written either way; below --min_held_out_retrieval the run fails and names the score."""
    passed = train(data_dir, tmp_path / "low-bar", "--max_train_steps", 2, "--min_held_out_retrieval", 0.01)
    top1 = passed["val/text_to_image_top1"]
    assert top1 < 1  # two steps on tiny data: far from perfect, so a bar of 100 % fails
    with pytest.raises(UsageError, match=rf"retrieval is {top1:.1%}, below --min_held_out_retrieval 100.0%"):
        train(data_dir, tmp_path / "high-bar", "--max_train_steps", 2, "--min_held_out_retrieval", 1)
    assert json.loads((tmp_path / "high-bar" / "held_out_retrieval.json").read_text()) == passed
    assert (tmp_path / "high-bar" / "text_encoder" / "config.json").is_file()
    with pytest.raises(ValueError, match="must be in"):
        train_text_encoder.parse_args(["--train_data_dir", "x", "--min_held_out_retrieval", "0"])


def test_word_swap_negatives():
    negatives = train_text_encoder.WordSwapNegatives(
        [
            "a red circle on the left and a blue square on the right",
            "a green square in the centre",
            "a blue circle on the right",
            "a red square on the left",
        ]
    )
    assert negatives.same_kind["red"] == {"blue", "green"} and negatives.same_kind["left"] == {"right", "centre"}
    caption = "a red circle on the left and a blue square on the right"
    swapped = {negatives.sample(caption, torch.Generator().manual_seed(seed)) for seed in range(50)}
    assert swapped == {
        "a blue circle on the left and a red square on the right",
        "a red square on the left and a blue circle on the right",
        "a red circle on the right and a blue square on the left",
    }
    assert negatives.sample("a green square in the centre", torch.Generator()) is None  # nothing to swap


def test_contrastive_loss_is_clips():
    args = train_text_encoder.parse_args(["--train_data_dir", "unused", *TINY_MODEL])
    tokenizer = build_clip_tokenizer(model_max_length=16)
    torch.manual_seed(0)
    clip = train_text_encoder.build_clip(args, tokenizer).eval()
    captions = ["a red circle", "a blue square", "a green circle"]
    input_ids = tokenizer(captions, padding="max_length", return_tensors="pt").input_ids
    pixel_values = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = clip(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    torch.testing.assert_close(train_text_encoder.contrastive_loss(outputs.logits_per_text), outputs.loss)


def test_resume_continues_at_the_saved_step(trained, data_dir, tmp_path):
    output_dir, _ = trained
    # resuming at the last step trains no further: the saved text encoder is exactly the checkpoint's text tower
    resumed = tmp_path / "resumed"
    train(data_dir, resumed, "--resume_from_checkpoint", output_dir / "checkpoint-2", "--max_train_steps", 2)
    input_ids = build_clip_tokenizer(model_max_length=16)(
        "a green circle on the right", padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text_embeds = CLIPTextModelWithProjection.from_pretrained(resumed / "text_encoder")(input_ids).text_embeds
    torch.testing.assert_close(text_embeds, clip_text_features(output_dir / "checkpoint-2", input_ids)[0])
    # "latest" continues the first run from step 4 and trains steps 5 and 6 only
    train(data_dir, output_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 6,
          "--checkpointing_steps", 2, "--checkpoints_total_limit", 1)  # fmt: skip
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-6"]


def test_clear_errors(tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no captions"):
        train(empty, tmp_path / "out1", "--max_train_steps", 1)
    uncaptioned = tmp_path / "uncaptioned"
    make_pairs(uncaptioned, 4)
    (uncaptioned / "metadata.jsonl").unlink()
    with pytest.raises(UsageError, match="no captions"):
        train(uncaptioned, tmp_path / "out2", "--max_train_steps", 1)
    (uncaptioned / "metadata.jsonl").write_text(
        '{"file_name": "000.png", "text": "a red circle"}\n{"file_name": "001.png"}\n'
    )
    with pytest.raises(ValueError, match="'001.png', column 'text' has no caption"):
        train(uncaptioned, tmp_path / "out3", "--max_train_steps", 1)
    with pytest.raises(ValueError, match="does not divide"):
        train_text_encoder.parse_args(["--train_data_dir", "x", "--resolution", "30", "--patch_size", "8"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="not empty"):
        train(data_dir, busy, "--max_train_steps", 1)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    (uncaptioned / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "a"}\n{"text": "a red circle"}\n')
    with pytest.raises(ValueError, match="1 lines of .*metadata.jsonl have no file_name .*'a red circle'"):
        train(uncaptioned, tmp_path / "out4", "--max_train_steps", 1)


def test_a_pipeline_folder_is_never_replaced(data_dir, tmp_path):
    """--output_dir naming a pipeline folder is refused, also with --resume_from_checkpoint latest and no checkpoint
    (which would otherwise start a new run there and replace its text_encoder/ and tokenizer/)."""
    pipeline = tmp_path / "pipeline"
    (pipeline / "text_encoder").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "ENATPipeline"}')
    (pipeline / "text_encoder" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in pipeline.rglob("*") if p.is_file()}
    for extra in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
        with pytest.raises(UsageError, match="is a pipeline folder: this script does not update it"):
            train(data_dir, pipeline, "--max_train_steps", 1, *extra)
    assert {p: p.read_bytes() for p in pipeline.rglob("*") if p.is_file()} == before
