# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The Shapes world: a procedural text-to-image data set whose images can be checked against their captions.

64 x 64 RGB images of one or two flat-coloured circles, squares and triangles on a light grey background, with
captions such as "a large blue square at the top and a small yellow triangle at the bottom". Every sample is
deterministic from `(seed, split, index)`. The colour-shape pairs of `HELD_OUT_PAIRS` never occur in the training
split; the validation split mixes seen scenes and held-out scenes (scenes with at least one held-out pair), half each.

Write a data set in the Hugging Face `imagefolder` layout:

    python -m enat_diffusers.data.shapes --output-dir shapes --num-train 20000 --num-val 1000 --seed 0
"""

import argparse
import json
import random
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..utils.cli import OutputLock, check_output_dir, non_negative_int, run_parser


IMAGE_SIZE = 64
BACKGROUND = (236, 236, 236)
SHAPES = ("circle", "square", "triangle")
# extent in pixels: circle diameter, square side, triangle base and height
SIZES: Dict[str, int] = {"small": 14, "large": 24}
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (38, 110, 210),
    "yellow": (240, 190, 30),
    "purple": (140, 70, 180),
}
# name -> (nominal centre (x, y), phrase in captions); x to the right, y down
POSITIONS: Dict[str, Tuple[Tuple[int, int], str]] = {
    "centre": ((32, 32), "in the centre"),
    "left": ((16, 32), "on the left"),
    "right": ((48, 32), "on the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
}
# the position pairs of two-object scenes
TWO_OBJECT_LAYOUTS = (("left", "right"), ("top", "bottom"))
# maximum absolute offset of an object's centre from its nominal position, per axis
JITTER = 3
# (colour, shape) pairs that never occur in the training split
HELD_OUT_PAIRS = (("purple", "triangle"), ("green", "square"))
SPLITS = ("train", "validation")
ALL_PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
SEEN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

_TWO_OBJECT_POSITION_SETS = [set(layout) for layout in TWO_OBJECT_LAYOUTS]
_PHRASE_TO_POSITION = {phrase: name for name, (_, phrase) in POSITIONS.items()}
_OBJECT_PATTERN = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(_PHRASE_TO_POSITION)})"
)
CAPTION_GRAMMAR = (
    "'a {size} {colour} {shape} {phrase}', or two such phrases joined by ' and ' (one on the left and one on the "
    f"right, or one at the top and one at the bottom), with size in {list(SIZES)}, colour in {list(COLOURS)}, shape "
    f"in {list(SHAPES)} and phrase in {list(_PHRASE_TO_POSITION)}"
)


@dataclass(frozen=True)
class ShapeObject:
    r"""
    One object of a scene.

    Args:
        shape (`str`): One of `SHAPES`.
        size (`str`): One of `SIZES`.
        colour (`str`): One of `COLOURS`.
        position (`str`): One of `POSITIONS`.
        centre (`Tuple[int, int]`): Centre `(x, y)` in pixels: the nominal centre of `position` plus the jitter. The
            centre of the object's bounding box (also for triangles).
    """

    shape: str
    size: str
    colour: str
    position: str
    centre: Tuple[int, int]

    @property
    def extent(self) -> int:
        return SIZES[self.size]

    @property
    def rgb(self) -> Tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def nominal_centre(self) -> Tuple[int, int]:
        return POSITIONS[self.position][0]

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    @property
    def phrase(self) -> str:
        """The object's phrase in captions, e.g. "a small red circle on the left"."""
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}"


def is_held_out(objects: Sequence[ShapeObject]) -> bool:
    """Whether any object of the scene has a held-out colour-shape pair."""
    return any(obj.held_out for obj in objects)


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """The caption of a scene: the object phrases in the order of `objects`, joined by " and "."""
    return " and ".join(obj.phrase for obj in objects)


def parse_caption(caption: str) -> List[ShapeObject]:
    r"""
    The nominal scene of a caption: its objects in caption order, each centred at its position's nominal centre.

    Raises:
        `ValueError`: when the caption does not follow the grammar of the data set's captions.
    """
    phrases = caption.strip().split(" and ")
    if len(phrases) > 2:
        raise ValueError(f"Caption {caption!r} has {len(phrases)} object phrases; expected {CAPTION_GRAMMAR}.")
    objects = []
    for phrase in phrases:
        match = _OBJECT_PATTERN.fullmatch(phrase)
        if match is None:
            raise ValueError(f"Caption {caption!r}: cannot parse {phrase!r}; expected {CAPTION_GRAMMAR}.")
        size, colour, shape, position_phrase = match.groups()
        position = _PHRASE_TO_POSITION[position_phrase]
        objects.append(ShapeObject(shape, size, colour, position, POSITIONS[position][0]))
    if len(objects) == 2 and {obj.position for obj in objects} not in _TWO_OBJECT_POSITION_SETS:
        raise ValueError(
            f"Caption {caption!r} places its objects {objects[0].position} and {objects[1].position}; "
            f"expected {CAPTION_GRAMMAR}."
        )
    return objects


def sample_scene(rng: random.Random, split: str = "train") -> List[ShapeObject]:
    r"""
    Draws a scene: one object at any of the five positions or (with probability 1/2) two objects, left and right or
    top and bottom, in random caption order. Shapes, sizes, colours and jitter are uniform.

    Args:
        rng (`random.Random`): Source of all randomness.
        split (`str`, defaults to `"train"`): `"train"` never draws a pair of `HELD_OUT_PAIRS`. `"validation"` draws
            a seen scene (as in training) or, with probability 1/2, a held-out scene: one random object gets a
            held-out pair, the other (if any) any pair.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if rng.random() < 0.5:
        positions = [rng.choice(list(POSITIONS))]
    else:
        positions = list(rng.choice(TWO_OBJECT_LAYOUTS))
        rng.shuffle(positions)
    pair_choices = [SEEN_PAIRS] * len(positions)
    if split == "validation" and rng.random() < 0.5:
        pair_choices = [ALL_PAIRS] * len(positions)
        pair_choices[rng.randrange(len(positions))] = HELD_OUT_PAIRS

    objects = []
    for position, pairs in zip(positions, pair_choices):
        colour, shape = rng.choice(pairs)
        size = rng.choice(list(SIZES))
        (x, y), _ = POSITIONS[position]
        centre = (x + rng.randint(-JITTER, JITTER), y + rng.randint(-JITTER, JITTER))
        objects.append(ShapeObject(shape, size, colour, position, centre))
    return objects


@lru_cache(maxsize=None)
def shape_mask(shape: str, extent: int) -> np.ndarray:
    r"""
    The `(extent, extent)` boolean pixel mask of a shape (read-only: it is cached); its bounding box is the whole
    mask.

    A pixel belongs to a circle when its centre lies in the disc of diameter `extent`. A triangle (apex up, base and
    height `extent`) covers, in every pixel row, the pixels whose centres lie within the triangle's width at the
    bottom of that row; so its top row is 2 pixels wide and its bottom row `extent` pixels.
    """
    centres = np.arange(extent) + 0.5 - extent / 2  # pixel centres relative to the mask's centre
    dx, dy = centres[None, :], centres[:, None]
    if shape == "circle":
        mask = dx**2 + dy**2 <= (extent / 2) ** 2
    elif shape == "square":
        mask = np.ones((extent, extent), dtype=bool)
    elif shape == "triangle":
        half_width_at_row_bottom = (np.arange(extent)[:, None] + 1) / 2
        mask = np.abs(dx) <= half_width_at_row_bottom
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    mask.setflags(write=False)
    return mask


def render_scene(objects: Sequence[ShapeObject]) -> Image.Image:
    """Renders a scene as a 64 x 64 RGB image: flat colours on the background, no anti-aliasing."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in objects:
        mask = shape_mask(obj.shape, obj.extent)
        left, top = obj.centre[0] - obj.extent // 2, obj.centre[1] - obj.extent // 2
        if left < 0 or top < 0 or left + obj.extent > IMAGE_SIZE or top + obj.extent > IMAGE_SIZE:
            raise ValueError(f"{obj} does not fit in the {IMAGE_SIZE}x{IMAGE_SIZE} image.")
        canvas[top : top + obj.extent, left : left + obj.extent][mask] = obj.rgb
    return Image.fromarray(canvas)


class ShapesDataset:
    r"""
    An indexable Shapes data set: `dataset[i]` is `{"image": PIL.Image, "text": caption, "held_out": bool}`.

    Sample `i` depends only on `(seed, split, i)`, so the data set is deterministic and can be read in any order.

    Args:
        num_samples (`int`): Number of samples.
        seed (`int`, defaults to 0): Seed of the data set.
        split (`str`, defaults to `"train"`): `"train"` or `"validation"` (see `sample_scene`).
    """

    def __init__(self, num_samples: int, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
        self.num_samples = num_samples
        self.seed = seed
        self.split = split

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> List[ShapeObject]:
        """The objects of sample `index`, in caption order."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a data set of {self.num_samples} samples.")
        # a string seed is hashed with SHA-512: stable across processes and Python versions
        return sample_scene(random.Random(f"shapes/{self.seed}/{self.split}/{index}"), self.split)

    def __getitem__(self, index: int) -> Dict[str, Union[Image.Image, str, bool]]:
        objects = self.scene(index)
        return {"image": render_scene(objects), "text": caption_for(objects), "held_out": is_held_out(objects)}


def write_imagefolder(
    output_dir: Union[str, Path], num_train: int, num_val: int, seed: int = 0, overwrite: bool = False
) -> Dict[str, Dict[str, int]]:
    r"""
    Writes a Shapes data set in the Hugging Face `imagefolder` layout: `output_dir/{train,validation}/` with PNGs
    and a `metadata.jsonl` of lines `{"file_name": "000000.png", "text": caption, "held_out": bool}`.

    Args:
        output_dir (`str` or `Path`): The folder to write; it must be empty or absent unless `overwrite`.
        num_train (`int`), num_val (`int`): Number of training and validation images.
        seed (`int`, defaults to 0): Seed of the data set.
        overwrite (`bool`, defaults to `False`): Write into a non-empty folder, replacing the files of the same names
            (no other file is deleted).

    Returns:
        `Dict[str, Dict[str, int]]`: per split, the number of images and of held-out images written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} exists and is not a folder.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (--overwrite) or another folder.")

    summary = {}
    for split, num_samples in (("train", num_train), ("validation", num_val)):
        dataset = ShapesDataset(num_samples, seed, split)
        split_dir = output_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        written = {"metadata.jsonl"}
        num_held_out = 0
        with open(split_dir / "metadata.jsonl", "w") as metadata:
            for index in range(num_samples):
                sample = dataset[index]
                file_name = f"{index:06d}.png"
                sample["image"].save(split_dir / file_name)
                record = {"file_name": file_name, "text": sample["text"], "held_out": sample["held_out"]}
                metadata.write(json.dumps(record) + "\n")
                written.add(file_name)
                num_held_out += sample["held_out"]
        stale = [path.name for path in split_dir.iterdir() if path.name not in written]
        if stale:
            warnings.warn(
                f"{split_dir} holds {len(stale)} files that this run did not write (e.g. {stale[0]}) and that "
                "metadata.jsonl does not list; an imagefolder loader may reject them: remove them or write to an "
                "empty folder."
            )
        summary[split] = {"num_images": num_samples, "num_held_out": num_held_out}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="folder to write (empty or absent unless --overwrite)")
    parser.add_argument("--num-train", type=non_negative_int, required=True, help="number of training images")
    parser.add_argument("--num-val", type=non_negative_int, required=True, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder, replacing files")
    run_parser(parser, _write, argv)


def _write(args):
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, (), "--output-dir")
    # one run at a time; the lock is a sibling of the folder, which must stay empty for a new data set
    lock_path = output_dir.absolute().parent / f".{output_dir.name}.lock"
    with OutputLock(output_dir.absolute().parent, f"--output-dir {output_dir}", lock_path):
        summary = write_imagefolder(output_dir, args.num_train, args.num_val, args.seed, args.overwrite)
    for split, counts in summary.items():
        print(
            f"wrote {counts['num_images']} images ({counts['num_held_out']} held-out) and metadata.jsonl to "
            f"{output_dir / split}"
        )


if __name__ == "__main__":
    main()
