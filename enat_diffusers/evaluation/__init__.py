"""Evaluation of ENAT pipelines: ShapesEval (`shapes`) and FID / Inception Score / CLIP score (`fid`).

The names are imported from their module on first use, so that `python -m enat_diffusers.evaluation.shapes` runs the
module once, as `__main__` only, and torchmetrics is imported only when the FID functions are used.
"""

import importlib


SHAPES_NAMES = [
    "ShapesEval",
    "compare_reports",
    "evaluation_prompts",
    "format_comparison",
    "format_report",
    "mcnemar_p_value",
]
FID_NAMES = [
    "clip_scores",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "list_images",
    "load_clip",
    "load_inception",
    "load_statistics",
    "read_images",
    "save_statistics",
]
__all__ = SHAPES_NAMES + FID_NAMES


def __getattr__(name):
    if name in __all__:
        module = ".shapes" if name in SHAPES_NAMES else ".fid"
        return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
