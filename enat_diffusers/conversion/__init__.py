"""Conversion of the original ENAT checkpoints (key maps, loaders) and the conversion CLI."""

from .checkpoints import (
    PRESETS,
    CheckpointError,
    build_pipeline,
    build_transformer,
    build_vqvae,
    convert_transformer_state_dict,
    convert_vqgan_state_dict,
    load_original_checkpoint,
)


__all__ = [
    "PRESETS",
    "CheckpointError",
    "build_pipeline",
    "build_transformer",
    "build_vqvae",
    "convert_transformer_state_dict",
    "convert_vqgan_state_dict",
    "load_original_checkpoint",
]
