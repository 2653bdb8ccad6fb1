"""Conversion of the original ENAT and AutoNAT checkpoints (key maps, loaders) and the conversion CLI."""

from .checkpoints import (
    PRESETS,
    CheckpointError,
    build_pipeline,
    build_transformer,
    build_vqvae,
    convert_nat_state_dict,
    convert_transformer_state_dict,
    convert_vqgan_state_dict,
    is_autonat_checkpoint,
    load_original_checkpoint,
)


__all__ = [
    "PRESETS",
    "CheckpointError",
    "build_pipeline",
    "build_transformer",
    "build_vqvae",
    "convert_nat_state_dict",
    "convert_transformer_state_dict",
    "convert_vqgan_state_dict",
    "is_autonat_checkpoint",
    "load_original_checkpoint",
]
