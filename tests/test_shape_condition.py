"""`examples/shapes/shape_condition.py`: the transformer's loss on one-object scenes against the exact distribution's,
with the true and the swapped shape word."""

import importlib.util
import math
import sys

import pytest
import torch
from conftest import ROOT

from enat_diffusers import ENATPipeline


sys.path.insert(0, str(ROOT / "examples" / "shapes"))  # its sibling sampler_ceiling.py
spec = importlib.util.spec_from_file_location("shape_condition", ROOT / "examples" / "shapes" / "shape_condition.py")
shape_condition = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape_condition)


def test_the_half_masked_state_masks_half_of_the_object_and_half_of_the_rest():
    is_object = torch.zeros(64, dtype=torch.bool)
    is_object[10:20] = True
    mask = shape_condition.state_mask(is_object, 0.5, torch.Generator().manual_seed(0))
    assert int((mask & is_object).sum()) == 5 and int((mask & ~is_object).sum()) == 27
    assert shape_condition.state_mask(is_object, None, torch.Generator()).all()


@pytest.fixture(scope="module")
def numbers():
    pipe = ENATPipeline.from_pretrained(ROOT / "pretrained" / "enat-shapes")
    return shape_condition.measure(pipe, scenes_per_kind=1, seed=0)


def test_every_kind_is_measured_under_each_caption_on_the_same_tokens(numbers):
    for state in shape_condition.STATES:
        for size in ("small", "large"):
            for shape in ("circle", "square", "triangle"):
                rows = [row for key, row in numbers.items() if key.startswith(f"{state} | {size} | {shape} |")]
                assert len(rows) == 3  # the true caption and the two other shape words
                assert len({row["num_tokens"] for row in rows}) == 1 and rows[0]["num_tokens"] > 0
                for row in rows:
                    assert math.isfinite(row["cross_entropy"]) and 0 <= row["top1"] <= 1


def test_the_exact_distribution_knows_the_shape(numbers):
    for size in ("small", "large"):
        for shape in ("circle", "square", "triangle"):
            prefix = f"all masked | {size} | {shape} | "
            true_all = numbers[prefix + "true"]["exact_cross_entropy"]
            swapped_all = [row["exact_cross_entropy"] for key, row in numbers.items() if key.startswith(prefix + "as")]
            assert len(swapped_all) == 2
            # a scene's own caption makes its tokens likelier than another shape's caption does
            assert all(true_all < other for other in swapped_all)
            # half of the object visible pins its jitter: the rest follows from it under the true caption
            assert numbers[f"half masked | {size} | {shape} | true"]["exact_cross_entropy"] < 0.5
