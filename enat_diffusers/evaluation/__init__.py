"""Evaluation of ENAT pipelines.

The names are imported from `shapes` on first use, so that `python -m enat_diffusers.evaluation.shapes` runs the
module once, as `__main__` only.
"""

import importlib


__all__ = ["ShapesEval", "evaluation_prompts", "format_report"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".shapes", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
