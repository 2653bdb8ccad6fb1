"""examples/shapes/train_patch_vq.py: the patch ids (a function of each 4x4 patch's pixels) and a tiny training run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import VQModel

from enat_diffusers.data.shapes import BACKGROUND, COLOURS, ShapeObject, render_scene, write_imagefolder


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "shapes"))
import train_patch_vq  # noqa: E402


def scene(*objects) -> np.ndarray:
    return np.asarray(render_scene([ShapeObject(*o) for o in objects]).convert("RGB"))[None]


def test_patch_masks_and_colours_spell_the_pixels():
    image = scene(("square", "large", "blue", "left", (17, 33)))  # x 5..28, y 21..44
    masks, colours = train_patch_vq.patch_masks_and_colours(image)
    foreground = (image[0] != np.array(BACKGROUND)).any(-1)
    for token in range(256):
        row, column = divmod(token, 16)
        patch = foreground[4 * row : 4 * row + 4, 4 * column : 4 * column + 4].reshape(-1)
        assert masks[0, token] == sum(1 << bit for bit in range(16) if patch[bit])
        assert colours[0, token] == (list(COLOURS).index("blue") if patch.any() else 0)
    assert masks[0, 0] == 0 and masks[0, 16 * 6 + 2] == 0xFFFF  # a corner of the image, the inside of the square


def test_patch_ids_background_colour_and_nearest_mask():
    image = scene(("circle", "large", "red", "left", (17, 32)), ("triangle", "small", "yellow", "right", (48, 34)))
    masks, colours = train_patch_vq.patch_masks_and_colours(image)
    frequent = train_patch_vq.frequent_masks(masks, 4)
    codes = train_patch_vq.PatchCodes(frequent)
    ids = codes.ids(image)[0]
    assert codes.num_codes == 1 + 5 * 4
    assert ids.shape == (256,) and (ids[masks[0] == 0] == 0).all()
    kept = np.isin(masks[0], frequent)
    # a frequent mask is its own: id = 1 + colour * num_masks + its rank
    ranks = {int(m): k for k, m in enumerate(frequent)}
    expected = [1 + colours[0, t] * 4 + ranks[int(masks[0, t])] for t in np.flatnonzero(kept)]
    assert ids[kept].tolist() == expected
    # a rare mask takes the nearest frequent one
    rare = np.flatnonzero((masks[0] > 0) & ~kept)
    assert len(rare)
    for t in rare:
        distances = [bin(int(masks[0, t]) ^ int(m)).count("1") for m in frequent]
        assert (ids[t] - 1) % 4 == int(np.argmin(distances))
        assert (ids[t] - 1) // 4 == colours[0, t]


def test_frequent_masks_are_the_most_common_non_empty():
    masks = np.array([[0, 0, 0, 5, 5, 5, 3, 3, 7]])
    assert train_patch_vq.frequent_masks(masks, 2).tolist() == [5, 3]


def test_tiny_training_run(tmp_path):
    write_imagefolder(tmp_path / "data", num_train=12, num_val=4, seed=1)
    output = tmp_path / "vq"
    argv = [
        "--train_data_dir", tmp_path / "data" / "train", "--validation_data_dir", tmp_path / "data" / "validation",
        "--output_dir", output, "--num_masks", "6", "--block_out_channels", "8", "8", "8", "--latent_channels", "4",
        "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "3", "--report_to", "none",
    ]  # fmt: skip
    args = train_patch_vq.parse_args([str(arg) for arg in argv])
    metrics = train_patch_vq.main(args)
    assert 0 <= metrics["val/id_accuracy"] <= 1
    vqvae = VQModel.from_pretrained(output / "vqvae")
    assert vqvae.config.num_vq_embeddings == 1 + 5 * 6
    record = json.loads((output / "patch_codes.json").read_text())
    assert len(record["masks"]) == 6 and record["colours"] == list(COLOURS)
    ids = torch.zeros(1, 256, dtype=torch.long)
    assert train_patch_vq.decode_ids(vqvae, ids).shape == (1, 3, 64, 64)


def test_refuses_a_grid_that_is_not_4x4_patches():
    with pytest.raises(ValueError, match="3 widths"):
        train_patch_vq.parse_args(["--train_data_dir", "x", "--block_out_channels", "8", "8"])
