# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
Convert the original ENAT checkpoints (github.com/LeapLabTHU/ENAT) to diffusers folders.

    python conversion/convert_enat_to_diffusers.py --transformer-checkpoint nnet_ema.pth \
        --vqgan-checkpoint vqgan_jax_strongaug.ckpt --preset enat-l-256 --output-dir enat-l-256

Writes `OUT/transformer`, `OUT/vqvae` (with a VQGAN checkpoint) and, with both, a complete `ENATPipeline` folder.
Everything but the head count and the encoder/decoder split is read from the checkpoint shapes.
"""

import argparse
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from diffusers import VQModel

from enat_diffusers import ENATPipeline, ENATTransformer2DModel, MaskedTokenScheduler


# Released checkpoints: the architecture not stored in the file, and the README's sampling settings.
PRESETS = {
    "enat-l-256": {
        "num_attention_heads": 16,
        "num_encoder_layers": 22,
        "sample_size": 16,
        "scheduler": {"guidance_scale": 2.5, "mask_temperature": 1.5, "sampling_temperature": 6.0},
    },
    "enat-l-512": {
        "num_attention_heads": 16,
        "num_encoder_layers": 22,
        "sample_size": 32,
        "scheduler": {"guidance_scale": 3.5, "mask_temperature": 1.5, "sampling_temperature": 4.0},
    },
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Original keys with no counterpart: `prev_embedder` is built by the original model but never called.
UNUSED_TRANSFORMER_PREFIXES = ("prev_embedder.",)

TRANSFORMER_RENAMES = {
    "x_embedder.word_embeddings.weight": "embed.word_embeddings.weight",
    "x_embedder.position_embeddings.weight": "embed.position_embeddings.weight",
    "x_embedder.LayerNorm.weight": "embed.norm.weight",
    "x_embedder.LayerNorm.bias": "embed.norm.bias",
    "y_embedder.embedding_table.weight": "class_embedding.weight",
    "prev_proj.norm.weight": "prev_proj.norm.weight",
    "prev_proj.norm.bias": "prev_proj.norm.bias",
    "prev_proj.mlp.fc1.weight": "prev_proj.ff.fc1.weight",
    "prev_proj.mlp.fc1.bias": "prev_proj.ff.fc1.bias",
    "prev_proj.mlp.fc2.weight": "prev_proj.ff.fc2.weight",
    "prev_proj.mlp.fc2.bias": "prev_proj.ff.fc2.bias",
    "norm.weight": "norm_out.weight",
    "norm.bias": "norm_out.bias",
    "mlm_layer.fc.weight": "mlm_head.dense.weight",
    "mlm_layer.fc.bias": "mlm_head.dense.bias",
    "mlm_layer.ln.weight": "mlm_head.norm.weight",
    "mlm_layer.ln.bias": "mlm_head.norm.bias",
}

BLOCK_RENAMES = {
    "attn.kv.A": "attn.add_kv_proj",  # context tokens' key/value
    "attn.proj": "attn.to_out",
    "mlp.fc1": "ff.fc1",
    "mlp.fc2": "ff.fc2",
    "adaLN_modulation.1": "adaLN_modulation",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or key."""


# ----------------------------------------------------------------------------------------------------------- loading


def load_original_checkpoint(path) -> Dict[str, torch.Tensor]:
    """Loads a `.pth`/`.ckpt` without executing code; unwraps `{"state_dict": ...}` and `module.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a zip/pickle, or pickled objects that are not plain tensors
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        key = key[len("module.") :] if key.startswith("module.") else key
        if "position_ids" not in key:  # legacy buffer the original loader drops too
            state_dict[key] = value
    return state_dict


def _require(state_dict, key, ndim):
    if key not in state_dict:
        raise CheckpointError(f"checkpoint is missing key '{key}'")
    if state_dict[key].ndim != ndim:
        raise CheckpointError(f"checkpoint key '{key}' has shape {list(state_dict[key].shape)}, expected {ndim} dims")
    return state_dict[key].shape


# ------------------------------------------------------------------------------------------------------ transformer


def transformer_config_from_state_dict(state_dict, num_attention_heads: int, num_encoder_layers: int) -> dict:
    """The `ENATTransformer2DModel` config of an original checkpoint; shapes give all but heads and the split."""
    vocab_size, hidden_size = _require(state_dict, "x_embedder.word_embeddings.weight", 2)
    num_positions = _require(state_dict, "x_embedder.position_embeddings.weight", 2)[0]
    num_labels = _require(state_dict, "y_embedder.embedding_table.weight", 2)[0]
    mlp_hidden = _require(state_dict, "blocks.0.mlp.fc1.weight", 2)[0]
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointError(f"position embedding has {num_positions} rows, not a square token grid")
    if not 0 < num_encoder_layers < depth:
        raise CheckpointError(
            f"checkpoint has {depth} blocks; num_encoder_layers={num_encoder_layers} leaves no decoder block"
        )
    return {
        "sample_size": side,
        "codebook_size": vocab_size - 1,  # last row is [MASK]
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_encoder_layers": num_encoder_layers,
        "num_decoder_layers": depth - num_encoder_layers,
        "mlp_ratio": mlp_hidden / hidden_size,
        "num_classes": num_labels - 1,  # last row is the null class
        "text_embed_dim": None,
    }


def expected_transformer_shapes(config: dict) -> Dict[str, tuple]:
    """Key -> shape of an original `DiT` checkpoint with this config (the unused `prev_embedder` excluded)."""
    d, k, c = config["hidden_size"], config["codebook_size"], config["num_classes"]
    mlp = int(d * config["mlp_ratio"])
    shapes = {
        "x_embedder.word_embeddings.weight": (k + 1, d),
        "x_embedder.position_embeddings.weight": (config["sample_size"] ** 2, d),
        "x_embedder.LayerNorm.weight": (d,),
        "x_embedder.LayerNorm.bias": (d,),
        "y_embedder.embedding_table.weight": (c + 1, d),
        "prev_proj.norm.weight": (d,),
        "prev_proj.norm.bias": (d,),
        "prev_proj.mlp.fc1.weight": (4 * d, d),
        "prev_proj.mlp.fc1.bias": (4 * d,),
        "prev_proj.mlp.fc2.weight": (d, 4 * d),
        "prev_proj.mlp.fc2.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "mlm_layer.fc.weight": (d, d),
        "mlm_layer.fc.bias": (d,),
        "mlm_layer.ln.weight": (d,),
        "mlm_layer.ln.bias": (d,),
        "mlm_layer.bias": (1, 1, k + 1),
    }
    block = {
        "attn.q": (d, d),
        "attn.kv.A": (2 * d, d),
        "attn.kv.B": (2 * d, d),
        "attn.proj": (d, d),
        "mlp.fc1": (mlp, d),
        "mlp.fc2": (d, mlp),
        "adaLN_modulation.1": (8 * d, d),
    }
    for index in range(config["num_encoder_layers"] + config["num_decoder_layers"]):
        for name, (rows, cols) in block.items():
            shapes[f"blocks.{index}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{index}.{name}.bias"] = (rows,)
    return shapes


def check_layout(state_dict: dict, expected: Dict[str, tuple], what: str, ignored_prefixes=()):
    """Raises `CheckpointError` naming the first missing, unexpected or wrongly shaped key."""
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{what} checkpoint is missing key '{key}'")
        if tuple(state_dict[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{what} checkpoint key '{key}' has shape {list(state_dict[key].shape)}, expected {list(shape)}"
            )
    for key in state_dict:
        if key not in expected and not key.startswith(ignored_prefixes):
            raise CheckpointError(f"unexpected key '{key}' in the {what} checkpoint")


def convert_transformer_state_dict(original: Dict[str, torch.Tensor], num_encoder_layers: int) -> dict:
    """Maps original `DiT` keys to `ENATTransformer2DModel` keys (pure; the layout is checked by `check_layout`)."""
    converted = {}
    for key, value in original.items():
        if key.startswith(UNUSED_TRANSFORMER_PREFIXES) or key.startswith("blocks.") and ".attn.q." in key:
            continue  # unused, or fused with kv.B below
        if key in TRANSFORMER_RENAMES:
            converted[TRANSFORMER_RENAMES[key]] = value
        elif key == "mlm_layer.bias":
            converted["mlm_head.bias"] = value.reshape(-1)[:-1]  # the [MASK] logit is never produced
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, kind = int(match.group(1)), match.group(2), match.group(3)
            stack = "encoder_blocks" if index < num_encoder_layers else "decoder_blocks"
            prefix = f"{stack}.{index if index < num_encoder_layers else index - num_encoder_layers}"
            if name == "attn.kv.B":  # own tokens: fuse the query with their key/value
                query = original[f"blocks.{index}.attn.q.{kind}"]
                converted[f"{prefix}.attn.to_qkv.{kind}"] = torch.cat([query, value], dim=0)
            elif name in BLOCK_RENAMES:
                converted[f"{prefix}.{BLOCK_RENAMES[name]}.{kind}"] = value
            else:
                raise CheckpointError(f"unexpected key '{key}' in the transformer checkpoint")
        else:
            raise CheckpointError(f"unexpected key '{key}' in the transformer checkpoint")
    return converted


# ------------------------------------------------------------------------------------------------------------ VQGAN


def vqgan_config_from_state_dict(state_dict) -> dict:
    """The diffusers `VQModel` config of an original (taming, MaskGIT-JAX variant) VQGAN state dict."""
    num_levels = len({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if num_levels == 0:
        raise CheckpointError("checkpoint has no 'encoder.down.*' keys: not an ENAT VQGAN")
    layers = len({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    channels = [_require(state_dict, f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(num_levels)]
    num_codes, embed_dim = _require(state_dict, "quantize.embedding.weight", 2)
    return {
        "in_channels": _require(state_dict, "encoder.conv_in.weight", 4)[1],
        "out_channels": _require(state_dict, "decoder.conv_out.weight", 4)[0],
        "down_block_types": ["DownEncoderBlock2D"] * num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": embed_dim,
        "vq_embed_dim": embed_dim,
        "num_vq_embeddings": num_codes,
        "norm_num_groups": 32,
        "norm_type": "group",
        "mid_block_add_attention": False,
        "lookup_from_codebook": True,
        "force_upcast": False,
        "scaling_factor": 1.0,
        "sample_size": 256,
    }


def expected_vqgan_shapes(config: dict) -> Dict[str, tuple]:
    """Key -> shape of an original taming VQGAN (MaskGIT-JAX variant) state dict with this config."""
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    z, shapes = config["latent_channels"], {}

    def resnet(prefix, cin, cout):
        shapes.update(
            {
                f"{prefix}.norm1.weight": (cin,),
                f"{prefix}.norm1.bias": (cin,),
                f"{prefix}.conv1.weight": (cout, cin, 3, 3),
                f"{prefix}.norm2.weight": (cout,),
                f"{prefix}.norm2.bias": (cout,),
                f"{prefix}.conv2.weight": (cout, cout, 3, 3),
            }
        )
        if cin != cout:
            shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)

    shapes["encoder.conv_in.weight"] = (channels[0], config["in_channels"], 3, 3)
    cin = channels[0]
    for i, cout in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
    for part in ("encoder", "decoder"):
        for name in ("block_1", "block_2"):
            resnet(f"{part}.mid.{name}", channels[-1], channels[-1])
    shapes.update(
        {
            "encoder.norm_out.weight": (channels[-1],),
            "encoder.norm_out.bias": (channels[-1],),
            "encoder.conv_out.weight": (z, channels[-1], 1, 1),
            "encoder.conv_out.bias": (z,),
            "quantize.embedding.weight": (config["num_vq_embeddings"], z),
            "decoder.conv_in.weight": (channels[-1], z, 3, 3),
            "decoder.conv_in.bias": (channels[-1],),
        }
    )
    cin = channels[-1]
    for i in reversed(range(len(channels))):
        for j in range(layers):
            resnet(f"decoder.up.{i}.block.{j}", cin, channels[i])
            cin = channels[i]
        if i > 0:
            shapes[f"decoder.up.{i}.upsample.conv.weight"] = (cin, cin, 3, 3)
            shapes[f"decoder.up.{i}.upsample.conv.bias"] = (cin,)
    shapes.update(
        {
            "decoder.norm_out.weight": (channels[0],),
            "decoder.norm_out.bias": (channels[0],),
            "decoder.conv_out.weight": (config["out_channels"], channels[0], 3, 3),
            "decoder.conv_out.bias": (config["out_channels"],),
        }
    )
    return shapes


def _convert_resnet(original, source, target, converted):
    """Taming resnet -> diffusers `ResnetBlock2D`: zero conv biases, fold `a + nin_shortcut(a)` into conv2."""
    for norm in ("norm1", "norm2"):
        for kind in ("weight", "bias"):
            converted[f"{target}.{norm}.{kind}"] = original.pop(f"{source}.{norm}.{kind}")
    conv1, conv2 = original.pop(f"{source}.conv1.weight"), original.pop(f"{source}.conv2.weight")
    converted[f"{target}.conv1.weight"] = conv1
    converted[f"{target}.conv1.bias"] = conv1.new_zeros(conv1.shape[0])
    converted[f"{target}.conv2.bias"] = conv2.new_zeros(conv2.shape[0])
    shortcut = original.pop(f"{source}.nin_shortcut.weight", None)
    if shortcut is None:
        converted[f"{target}.conv2.weight"] = conv2
        return
    # The taming block outputs a + W_sc a (no input path): fold (I + W_sc) into conv2, zero diffusers' x shortcut.
    fold = torch.eye(shortcut.shape[0], dtype=torch.float64) + shortcut[:, :, 0, 0].double()
    converted[f"{target}.conv2.weight"] = torch.einsum("om,mikl->oikl", fold, conv2.double()).to(conv2.dtype)
    converted[f"{target}.conv_shortcut.weight"] = conv1.new_zeros(conv1.shape[0], conv1.shape[1], 1, 1)
    converted[f"{target}.conv_shortcut.bias"] = conv1.new_zeros(conv1.shape[0])


def convert_vqgan_state_dict(original: Dict[str, torch.Tensor]) -> dict:
    """
    Maps the original VQGAN to diffusers `VQModel` weights with the surgery of reference/VQ_MAPPING.md: parameter-free
    average pooling and the 1x1 `conv_out` become fixed convolutions, identity quant convs and identity extra decoder
    resnets are inserted. Pure; the layout is checked by `check_layout`.
    """
    config = vqgan_config_from_state_dict(original)
    original = dict(original)
    levels, layers, embed_dim = (
        len(config["block_out_channels"]),
        config["layers_per_block"],
        config["latent_channels"],
    )
    converted = {}

    def move(source, target):
        converted[target] = original.pop(source)

    # encoder
    move("encoder.conv_in.weight", "encoder.conv_in.weight")
    converted["encoder.conv_in.bias"] = converted["encoder.conv_in.weight"].new_zeros(config["block_out_channels"][0])
    for i in range(levels):
        for j in range(layers):
            _convert_resnet(original, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", converted)
        if i < levels - 1:  # 2x2 average pooling as diffusers' padded stride-2 3x3 conv
            channels = config["block_out_channels"][i]
            kernel = torch.zeros(channels, channels, 3, 3)
            kernel[range(channels), range(channels), 0:2, 0:2] = 0.25
            converted[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = kernel
            converted[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = torch.zeros(channels)
    for source, target in (("block_1", "resnets.0"), ("block_2", "resnets.1")):
        _convert_resnet(original, f"encoder.mid.{source}", f"encoder.mid_block.{target}", converted)
    move("encoder.norm_out.weight", "encoder.conv_norm_out.weight")
    move("encoder.norm_out.bias", "encoder.conv_norm_out.bias")
    conv_out = original.pop("encoder.conv_out.weight")  # 1x1 -> centred 3x3
    converted["encoder.conv_out.weight"] = conv_out.new_zeros(*conv_out.shape[:2], 3, 3)
    converted["encoder.conv_out.weight"][:, :, 1, 1] = conv_out[:, :, 0, 0]
    move("encoder.conv_out.bias", "encoder.conv_out.bias")

    # quantizer, between identity 1x1 convs
    move("quantize.embedding.weight", "quantize.embedding.weight")
    for conv in ("quant_conv", "post_quant_conv"):
        converted[f"{conv}.weight"] = torch.eye(embed_dim).reshape(embed_dim, embed_dim, 1, 1)
        converted[f"{conv}.bias"] = torch.zeros(embed_dim)

    # decoder: taming level i is diffusers up block (levels - 1 - i), which has one extra (identity) resnet
    move("decoder.conv_in.weight", "decoder.conv_in.weight")
    move("decoder.conv_in.bias", "decoder.conv_in.bias")
    for source, target in (("block_1", "resnets.0"), ("block_2", "resnets.1")):
        _convert_resnet(original, f"decoder.mid.{source}", f"decoder.mid_block.{target}", converted)
    for i in range(levels):
        up = f"decoder.up_blocks.{levels - 1 - i}"
        for j in range(layers):
            _convert_resnet(original, f"decoder.up.{i}.block.{j}", f"{up}.resnets.{j}", converted)
        channels = config["block_out_channels"][i]
        identity = f"{up}.resnets.{layers}"  # output x + conv2(...) with conv2 = 0
        converted[f"{identity}.norm1.weight"], converted[f"{identity}.norm1.bias"] = (
            torch.ones(channels),
            torch.zeros(channels),
        )
        converted[f"{identity}.norm2.weight"], converted[f"{identity}.norm2.bias"] = (
            torch.ones(channels),
            torch.zeros(channels),
        )
        for conv in ("conv1", "conv2"):
            converted[f"{identity}.{conv}.weight"] = torch.zeros(channels, channels, 3, 3)
            converted[f"{identity}.{conv}.bias"] = torch.zeros(channels)
        if i > 0:
            move(f"decoder.up.{i}.upsample.conv.weight", f"{up}.upsamplers.0.conv.weight")
            move(f"decoder.up.{i}.upsample.conv.bias", f"{up}.upsamplers.0.conv.bias")
    for kind in ("weight", "bias"):
        move(f"decoder.norm_out.{kind}", f"decoder.conv_norm_out.{kind}")
        move(f"decoder.conv_out.{kind}", f"decoder.conv_out.{kind}")

    return converted


# ---------------------------------------------------------------------------------------------------------- loading


def build_transformer(original, num_attention_heads: int, num_encoder_layers: int) -> ENATTransformer2DModel:
    """An `ENATTransformer2DModel` with the weights of an original checkpoint (strictly checked and loaded)."""
    config = transformer_config_from_state_dict(original, num_attention_heads, num_encoder_layers)
    check_layout(original, expected_transformer_shapes(config), "transformer", UNUSED_TRANSFORMER_PREFIXES)
    model = ENATTransformer2DModel(**config)
    model.load_state_dict(convert_transformer_state_dict(original, num_encoder_layers), strict=True)
    return model.eval()


def build_vqvae(original) -> VQModel:
    """A diffusers `VQModel` computing what the original VQGAN computes (strictly checked and loaded)."""
    config = vqgan_config_from_state_dict(original)
    check_layout(original, expected_vqgan_shapes(config), "VQGAN")
    model = VQModel(**config)
    model.load_state_dict(convert_vqgan_state_dict(original), strict=True)
    return model.eval()


def imagenet_id2label(num_classes: int) -> Optional[Dict[int, str]]:
    """ImageNet-1k class names (torchvision's list, shipped offline) for 1000-class models, else `None`."""
    if num_classes != 1000:
        return None
    from torchvision.models import ResNet50_Weights

    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def build_pipeline(transformer: ENATTransformer2DModel, vqvae: VQModel, scheduler_config: dict) -> ENATPipeline:
    if vqvae.config.num_vq_embeddings != transformer.config.codebook_size:
        raise CheckpointError(
            f"the VQGAN has {vqvae.config.num_vq_embeddings} codes but the transformer predicts "
            f"{transformer.config.codebook_size}: these checkpoints do not belong together"
        )
    scheduler = MaskedTokenScheduler(mask_token_id=transformer.config.codebook_size, **scheduler_config)
    return ENATPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vqvae=vqvae,
        id2label=imagenet_id2label(transformer.config.num_classes),
    )


# --------------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer-checkpoint", required=True, help="original ENAT weights (e.g. nnet_ema.pth)")
    parser.add_argument("--vqgan-checkpoint", help="original VQGAN weights (vqgan_jax_strongaug.ckpt)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a released ENAT checkpoint")
    parser.add_argument("--num-attention-heads", type=int, help="without --preset: attention heads")
    parser.add_argument("--num-encoder-layers", type=int, help="without --preset: encoder blocks (the rest decode)")
    parser.add_argument("--output-dir", required=True, help="folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    args = parser.parse_args(argv)
    custom = args.num_attention_heads is not None or args.num_encoder_layers is not None
    if args.preset and custom:
        parser.error("pass either --preset or --num-attention-heads/--num-encoder-layers, not both")
    if not args.preset and (args.num_attention_heads is None or args.num_encoder_layers is None):
        parser.error("pass --preset, or both --num-attention-heads and --num-encoder-layers")
    return args


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        sys.exit(f"error: {output_dir} already exists; pass --overwrite to replace it")
    preset = PRESETS.get(args.preset, {})
    heads = preset.get("num_attention_heads", args.num_attention_heads)
    encoder_layers = preset.get("num_encoder_layers", args.num_encoder_layers)

    try:
        transformer = build_transformer(load_original_checkpoint(args.transformer_checkpoint), heads, encoder_layers)
        if preset and transformer.config.sample_size != preset["sample_size"]:
            side = transformer.config.sample_size
            raise CheckpointError(
                f"preset {args.preset} is for a {preset['sample_size']}x{preset['sample_size']} "
                f"token grid, but the checkpoint has {side}x{side}"
            )
        vqvae = build_vqvae(load_original_checkpoint(args.vqgan_checkpoint)) if args.vqgan_checkpoint else None
        pipeline = build_pipeline(transformer, vqvae, preset.get("scheduler", {})) if vqvae is not None else None
    except CheckpointError as error:
        sys.exit(f"error: {error}")

    # Write next to the target, then move into place: a failed run leaves no half-written folder behind.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        for model in (transformer, vqvae):
            if model is not None:
                torch.nn.Module.to(model, DTYPES[args.dtype])
        if pipeline is not None:
            pipeline.save_pretrained(staging)
        else:
            transformer.save_pretrained(staging / "transformer")
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = "pipeline" if pipeline is not None else "transformer"
    print(f"wrote the {written} ({transformer.num_parameters():,} transformer parameters) to {output_dir}")


if __name__ == "__main__":
    main()
