# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
Convert the original ENAT (github.com/LeapLabTHU/ENAT) and AutoNAT (github.com/LeapLabTHU/ImprovedNAT) checkpoints
to diffusers folders.

    python conversion/convert_enat_to_diffusers.py --transformer-checkpoint nnet_ema.pth \\
        --vqgan-checkpoint vqgan_jax_strongaug.ckpt --preset enat-l-256 --output-dir enat-l-256
    python conversion/convert_enat_to_diffusers.py --transformer-checkpoint autonat_nnet_ema.pth \\
        --vqgan-checkpoint vqgan_jax_strongaug.ckpt --preset autonat-l-256 --output-dir autonat-l-256

Writes `OUT/transformer`, `OUT/vqvae` (with a VQGAN checkpoint) and, with both, a complete `ENATPipeline` folder.
AutoNAT checkpoints are recognised by their keys and become a `NATTransformer2DModel`; `--preset autonat-l-256` also
writes AutoNAT-L's searched 8-step strategy into the scheduler. Everything but the head count (and ENAT's
encoder/decoder split) is read from the checkpoint shapes.

`--overwrite` replaces an existing output folder only once the new one is complete (old folder renamed aside, new
one moved in, old one deleted), and refuses an output folder that is, or contains, the current directory or an input
checkpoint. Errors are one line (`--debug` shows the traceback). Also runs as `python -m enat_diffusers.conversion`.
"""

import argparse
from pathlib import Path

import torch

from ..utils import cli as cli_utils
from ..utils.cli import add_debug_argument, report_errors, sigterm_as_interrupt, write_atomically  # noqa: F401
from .checkpoints import (
    DTYPES,
    PRESETS,
    CheckpointError,
    build_pipeline,
    build_transformer,
    build_vqvae,
    is_autonat_checkpoint,
    load_original_checkpoint,
)


def parse_args(argv=None, prog=None):
    """`prog`: the command's name in usage and error lines (default: the script's file name)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transformer-checkpoint", required=True, help="original ENAT weights (e.g. nnet_ema.pth)")
    parser.add_argument("--vqgan-checkpoint", help="original VQGAN weights (vqgan_jax_strongaug.ckpt)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a released ENAT or AutoNAT checkpoint")
    parser.add_argument("--num-attention-heads", type=int, help="without --preset: attention heads")
    parser.add_argument(
        "--num-encoder-layers",
        type=int,
        help="without --preset, ENAT checkpoints only: encoder blocks (the rest decode)",
    )
    parser.add_argument("--output-dir", required=True, help="folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (see above)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    custom = args.num_attention_heads is not None or args.num_encoder_layers is not None
    if args.preset and custom:
        parser.error("pass either --preset or --num-attention-heads/--num-encoder-layers, not both")
    if not args.preset and args.num_attention_heads is None:
        parser.error("pass --preset, or --num-attention-heads (and, for ENAT checkpoints, --num-encoder-layers)")
    if custom and args.num_attention_heads < 1:
        parser.error(f"--num-attention-heads must be a positive integer, got {args.num_attention_heads}")
    return args


def check_output_dir(output_dir: Path, inputs, overwrite: bool):
    """Refuses output folders whose replacement could destroy something the user did not ask to replace: an existing
    folder without `overwrite`, the current directory or one holding it, a folder holding an input; and those the
    shared policy refuses (a file, under a file, not writable)."""
    target = output_dir.resolve()
    if output_dir.exists() or output_dir.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{output_dir} already exists; pass --overwrite to replace it")
        if not output_dir.is_dir() or output_dir.is_symlink():
            raise CheckpointError(f"{output_dir} exists and is not a folder; --overwrite only replaces folders")
        cwd = Path.cwd().resolve()
        if cwd == target or target in cwd.parents:
            raise CheckpointError(
                f"--output-dir {output_dir} is or contains the current directory; refusing to replace it"
            )
    # replacing a pipeline folder is this tool's job (with --overwrite)
    cli_utils.check_output_dir(output_dir, inputs, "--output-dir", allow_model_folder=True)


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    output_dir = Path(args.output_dir)
    preset = PRESETS.get(args.preset, {})
    heads = preset.get("num_attention_heads", args.num_attention_heads)
    encoder_layers = preset.get("num_encoder_layers", args.num_encoder_layers)
    inputs = [p for p in (args.transformer_checkpoint, args.vqgan_checkpoint) if p]

    with report_errors(args.debug):
        convert(args, output_dir, preset, heads, encoder_layers, inputs)


def convert(args, output_dir: Path, preset: dict, heads, encoder_layers, inputs):
    check_output_dir(output_dir, inputs, args.overwrite)
    original = load_original_checkpoint(args.transformer_checkpoint)
    family = "autonat" if is_autonat_checkpoint(original) else "enat"
    if preset and preset["family"] != family:
        raise CheckpointError(
            f"preset {args.preset} is for {preset['family'].upper()} checkpoints, but "
            f"{args.transformer_checkpoint} is an {family.upper()} checkpoint"
        )
    transformer = build_transformer(original, heads, encoder_layers)
    if preset and transformer.config.sample_size != preset["sample_size"]:
        side = transformer.config.sample_size
        raise CheckpointError(
            f"preset {args.preset} is for a {preset['sample_size']}x{preset['sample_size']} "
            f"token grid, but the checkpoint has {side}x{side}"
        )
    vqvae = build_vqvae(load_original_checkpoint(args.vqgan_checkpoint)) if args.vqgan_checkpoint else None
    pipeline = build_pipeline(transformer, vqvae, preset.get("scheduler", {})) if vqvae is not None else None

    for model in (transformer, vqvae):
        if model is not None:
            torch.nn.Module.to(model, DTYPES[args.dtype])

    def save(folder: Path):
        if pipeline is not None:
            pipeline.save_pretrained(folder)
        else:
            transformer.save_pretrained(folder / "transformer")

    write_atomically(output_dir, save)  # an OSError (a full disk) is one line too
    written = "pipeline" if pipeline is not None else "transformer"
    print(f"wrote the {written} ({transformer.num_parameters():,} transformer parameters) to {output_dir}")


if __name__ == "__main__":
    main(prog="python -m enat_diffusers.conversion.cli")
