"""examples/shapes/held_out_pair_lora.py: the training images of a held-out pair, and its evaluation prompts."""

import importlib.util
import json

import PIL.Image
import pytest
from conftest import ROOT, call_main

from enat_diffusers.data.shapes import parse_caption
from enat_diffusers.evaluation.shapes import ShapesEval


@pytest.fixture(scope="module")
def lora_example():
    spec = importlib.util.spec_from_file_location("held_out_pair_lora", ROOT / "examples/shapes/held_out_pair_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pair_images_show_their_captions(lora_example, tmp_path):
    code, stderr = call_main(lora_example.main, "data", "--output-dir", tmp_path / "data", "--num-images", 8)
    assert code == 0, stderr
    records = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all("purple triangle" in record["text"] for record in records)
    assert {len(parse_caption(record["text"])) for record in records} == {1, 2}  # alone, and beside a seen pair
    images = [PIL.Image.open(tmp_path / "data" / record["file_name"]).convert("RGB") for record in records]
    report = ShapesEval().evaluate(images, [record["text"] for record in records])
    assert report["all"]["prompt"] == 1.0  # the rendered scenes are what the captions say
    code, stderr = call_main(lora_example.main, "data", "--output-dir", tmp_path / "data", "--pair", "red", "circle")
    assert code == 1 and "--pair must be a held-out pair" in stderr


def test_pair_prompts_hold_the_pair_and_no_other_held_out_pair(lora_example):
    prompts = lora_example.pair_prompts(("purple", "triangle"), 40, seed=0)
    assert len(set(prompts)) == 40
    assert all("purple triangle" in prompt and "green square" not in prompt for prompt in prompts)
