"""Data sets for training and checking ENAT pipelines.

The names are imported from `shapes` on first use, so that `python -m enat_diffusers.data.shapes` runs the module
once, as `__main__` only.
"""

import importlib


__all__ = [
    "BACKGROUND",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ShapeObject",
    "ShapesDataset",
    "caption_for",
    "is_held_out",
    "parse_caption",
    "render_scene",
    "sample_scene",
    "write_imagefolder",
]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".shapes", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
