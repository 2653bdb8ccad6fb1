# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
Key maps and loaders of the original checkpoints: ENAT's transformer (github.com/LeapLabTHU/ENAT, `DiT` of
`libs/models.py`) onto `ENATTransformer2DModel`, AutoNAT's (github.com/LeapLabTHU/ImprovedNAT, `UViT` of
`libs/nat_model.py`) onto `NATTransformer2DModel`, and their VQGAN tokenizer (taming's MaskGIT-JAX variant) onto
diffusers' `VQModel`. Everything but the head count (and ENAT's encoder/decoder split) is read from the checkpoint
shapes.
"""

import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from accelerate import init_empty_weights
from diffusers import VQModel

from ..models.transformer_enat import ENATTransformer2DModel
from ..models.transformer_nat import NATTransformer2DModel
from ..pipelines.pipeline_enat import ENATPipeline
from ..schedulers.scheduling_masked_token import MaskedTokenScheduler


# AutoNAT-L's searched 8-step generation strategy (ImprovedNAT `configs/AutoNAT_L-T8_strategy.yaml`).
AUTONAT_L_T8_STRATEGY = {
    "mask_ratios": [
        0.9531645174140464,
        0.8795409806037042,
        0.7940230737075623,
        0.745995860948045,
        0.6249785820461957,
        0.407321956652571,
        0.260658917067054,
    ],
    "mask_temperatures": [
        2.404912789740805,
        2.477616274962803,
        1.191696577294597,
        0.7685444738649722,
        1.0673489052089495,
        0.9353720330515827,
        0.7843839537838292,
    ],
    "sampling_temperatures": [
        2.8999037830310685,
        1.867261830931786,
        1.1443729673819831,
        1.3796334226014182,
        1.4699896959810144,
        1.3760684112198358,
        1.7082165405200722,
        0.7133060703601533,
    ],
    "guidance_scales": [
        0.0001,
        0.0001,
        0.0001,
        0.9151274967591447,
        1.6160182878189675,
        1.1945509026838659,
        1.38322370140345,
        1.22678520936251,
    ],
}

# Released checkpoints: the architecture not stored in the file, and the README's sampling settings.
PRESETS = {
    "autonat-l-256": {
        "family": "autonat",
        "num_attention_heads": 8,
        "sample_size": 16,
        "scheduler": AUTONAT_L_T8_STRATEGY,
    },
    "enat-l-256": {
        "family": "enat",
        "num_attention_heads": 16,
        "num_encoder_layers": 22,
        "sample_size": 16,
        "scheduler": {"guidance_scale": 2.5, "mask_temperature": 1.5, "sampling_temperature": 6.0},
    },
    "enat-l-512": {
        "family": "enat",
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
    "prev_proj.mlp.fc1.weight": "prev_proj.ff.net.0.proj.weight",
    "prev_proj.mlp.fc1.bias": "prev_proj.ff.net.0.proj.bias",
    "prev_proj.mlp.fc2.weight": "prev_proj.ff.net.2.weight",
    "prev_proj.mlp.fc2.bias": "prev_proj.ff.net.2.bias",
    "norm.weight": "norm_out.weight",
    "norm.bias": "norm_out.bias",
    "mlm_layer.fc.weight": "mlm_head.dense.weight",
    "mlm_layer.fc.bias": "mlm_head.dense.bias",
    "mlm_layer.ln.weight": "mlm_head.norm.weight",
    "mlm_layer.ln.bias": "mlm_head.norm.bias",
}

BLOCK_RENAMES = {
    "attn.q": "attn.to_q",
    "attn.proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "adaLN_modulation",
}

# Fused original key/value projections, split in two: own tokens (`kv.B`) and context tokens (`kv.A`).
BLOCK_SPLITS = {
    "attn.kv.B": ("attn.to_k", "attn.to_v"),
    "attn.kv.A": ("attn.add_k_proj", "attn.add_v_proj"),
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


def check_values(state_dict: Dict[str, torch.Tensor], what: str):
    """Refuses integer (or boolean) tensors where weights belong and warns about NaN/inf weights, naming the key."""
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{what} checkpoint key '{key}' holds {value.dtype} values; weights must be floats")
        if not torch.isfinite(value).all():
            warnings.warn(f"{what} checkpoint key '{key}' contains NaN or infinite values", stacklevel=2)


def _require(state_dict, key, ndim):
    if key not in state_dict:
        raise CheckpointError(f"checkpoint is missing key '{key}'")
    if state_dict[key].ndim != ndim:
        raise CheckpointError(f"checkpoint key '{key}' has shape {list(state_dict[key].shape)}, expected {ndim} dims")
    return state_dict[key].shape


def _grid_side(num_positions: int) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointError(f"position embedding has {num_positions} rows, not a square token grid")
    return side


def _check_heads(num_attention_heads, hidden_size: int):
    if not isinstance(num_attention_heads, int) or num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise CheckpointError(
            f"num_attention_heads must be a positive divisor of the checkpoint's hidden size {hidden_size}, "
            f"got {num_attention_heads}"
        )


# ------------------------------------------------------------------------------------------------------ transformer


def transformer_config_from_state_dict(state_dict, num_attention_heads: int, num_encoder_layers: int) -> dict:
    """The `ENATTransformer2DModel` config of an original checkpoint; shapes give all but heads and the split."""
    vocab_size, hidden_size = _require(state_dict, "x_embedder.word_embeddings.weight", 2)
    num_positions = _require(state_dict, "x_embedder.position_embeddings.weight", 2)[0]
    num_labels = _require(state_dict, "y_embedder.embedding_table.weight", 2)[0]
    mlp_hidden = _require(state_dict, "blocks.0.mlp.fc1.weight", 2)[0]
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    side = _grid_side(num_positions)
    _check_heads(num_attention_heads, hidden_size)
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
        if key.startswith(UNUSED_TRANSFORMER_PREFIXES):
            continue
        if key in TRANSFORMER_RENAMES:
            converted[TRANSFORMER_RENAMES[key]] = value
        elif key == "mlm_layer.bias":
            converted["mlm_head.bias"] = value.reshape(-1)[:-1]  # the [MASK] logit is never produced
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, kind = int(match.group(1)), match.group(2), match.group(3)
            stack = "encoder_blocks" if index < num_encoder_layers else "decoder_blocks"
            prefix = f"{stack}.{index if index < num_encoder_layers else index - num_encoder_layers}"
            if name in BLOCK_SPLITS:  # key | value along the output dim
                key_part, value_part = value.chunk(2, dim=0)
                converted[f"{prefix}.{BLOCK_SPLITS[name][0]}.{kind}"] = key_part
                converted[f"{prefix}.{BLOCK_SPLITS[name][1]}.{kind}"] = value_part
            elif name in BLOCK_RENAMES:
                converted[f"{prefix}.{BLOCK_RENAMES[name]}.{kind}"] = value
            else:
                raise CheckpointError(f"unexpected key '{key}' in the transformer checkpoint")
        else:
            raise CheckpointError(f"unexpected key '{key}' in the transformer checkpoint")
    return converted


# ----------------------------------------------------------------------------------------------- AutoNAT transformer

NAT_RENAMES = {
    "token_emb.word_embeddings.weight": "embed.word_embeddings.weight",
    "token_emb.position_embeddings.weight": "embed.position_embeddings.weight",
    "token_emb.LayerNorm.weight": "embed.norm.weight",
    "token_emb.LayerNorm.bias": "embed.norm.bias",
    "context_embed.word_embeddings.weight": "class_embed.word_embeddings.weight",
    "context_embed.position_embeddings.weight": "class_embed.position_embeddings.weight",
    "context_embed.LayerNorm.weight": "class_embed.norm.weight",
    "context_embed.LayerNorm.bias": "class_embed.norm.bias",
    "norm.weight": "norm_out.weight",
    "norm.bias": "norm_out.bias",
    "mlm_layer.fc.weight": "mlm_head.dense.weight",
    "mlm_layer.fc.bias": "mlm_head.dense.bias",
    "mlm_layer.ln.weight": "mlm_head.norm.weight",
    "mlm_layer.ln.bias": "mlm_head.norm.bias",
}

# U-ViT block (timm-style) -> diffusers `BasicTransformerBlock`; the fused `attn.qkv` is split into q, k, v.
NAT_BLOCK_RENAMES = {
    "norm1": "norm1",
    "attn.proj": "attn1.to_out.0",
    "norm2": "norm3",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def is_autonat_checkpoint(state_dict) -> bool:
    """AutoNAT's U-ViT has `in_blocks.*`/`mid_block.*`/`out_blocks.*`; ENAT's DiT has `blocks.*`."""
    return any(key.startswith(("in_blocks.", "mid_block.", "out_blocks.")) for key in state_dict)


def nat_config_from_state_dict(state_dict, num_attention_heads: int) -> dict:
    """The `NATTransformer2DModel` config of an original AutoNAT checkpoint; shapes give all but the heads."""
    vocab_size, hidden_size = _require(state_dict, "token_emb.word_embeddings.weight", 2)
    num_positions = _require(state_dict, "token_emb.position_embeddings.weight", 2)[0]
    num_labels = _require(state_dict, "context_embed.word_embeddings.weight", 2)[0]
    mlp_hidden = _require(state_dict, "mid_block.mlp.fc1.weight", 2)[0]
    num_in = len({int(m.group(1)) for k in state_dict if (m := re.match(r"in_blocks\.(\d+)\.", k))})
    side = _grid_side(num_positions)
    _check_heads(num_attention_heads, hidden_size)
    if num_labels < 2:
        raise CheckpointError(f"the class embedding has {num_labels} rows: no room for a class and the null class")
    return {
        "sample_size": side,
        "codebook_size": vocab_size - 1,  # last row is [MASK]
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_layers": 2 * num_in,
        "mlp_ratio": mlp_hidden / hidden_size,
        "num_classes": num_labels - 1,  # last row is the null class
    }


def expected_nat_shapes(config: dict) -> Dict[str, tuple]:
    """Key -> shape of an original AutoNAT `UViT` checkpoint with this config (no qkv bias, long skips)."""
    d, k, c = config["hidden_size"], config["codebook_size"], config["num_classes"]
    mlp = int(d * config["mlp_ratio"])
    shapes = {
        "token_emb.word_embeddings.weight": (k + 1, d),
        "token_emb.position_embeddings.weight": (config["sample_size"] ** 2, d),
        "context_embed.word_embeddings.weight": (c + 1, d),
        "context_embed.position_embeddings.weight": (1, d),
        "mlm_layer.fc.weight": (d, d),
        "mlm_layer.bias": (1, 1, k + 1),
    }
    for name in ("token_emb.LayerNorm", "context_embed.LayerNorm", "norm", "mlm_layer.ln"):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (d,)
    shapes["mlm_layer.fc.bias"] = (d,)
    half = config["num_layers"] // 2
    blocks = [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]
    for prefix in blocks:
        shapes.update(
            {
                f"{prefix}.norm1.weight": (d,),
                f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d),
                f"{prefix}.attn.proj.weight": (d, d),
                f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,),
                f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (mlp, d),
                f"{prefix}.mlp.fc1.bias": (mlp,),
                f"{prefix}.mlp.fc2.weight": (d, mlp),
                f"{prefix}.mlp.fc2.bias": (d,),
            }
        )
        if prefix.startswith("out_blocks"):
            shapes[f"{prefix}.skip_linear.weight"] = (d, 2 * d)
            shapes[f"{prefix}.skip_linear.bias"] = (d,)
    return shapes


def convert_nat_state_dict(original: Dict[str, torch.Tensor]) -> dict:
    """Maps original AutoNAT `UViT` keys to `NATTransformer2DModel` keys (pure; the layout is checked by
    `check_layout`)."""
    converted = {}
    for key, value in original.items():
        if key in NAT_RENAMES:
            converted[NAT_RENAMES[key]] = value
        elif key == "mlm_layer.bias":
            converted["mlm_head.bias"] = value.reshape(-1)[:-1]  # the [MASK] logit is never produced
        elif match := re.fullmatch(r"out_blocks\.(\d+)\.skip_linear\.(weight|bias)", key):
            converted[f"skip_projections.{match.group(1)}.{match.group(2)}"] = value
        elif match := re.fullmatch(r"((?:in|out)_blocks\.\d+|mid_block)\.(.+)\.(weight|bias)", key):
            prefix, name, kind = match.groups()
            if name == "attn.qkv" and kind == "weight":  # [q | k | v] along the output dim
                for part, tensor in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    converted[f"{prefix}.attn1.{part}.weight"] = tensor
            elif name in NAT_BLOCK_RENAMES:
                converted[f"{prefix}.{NAT_BLOCK_RENAMES[name]}.{kind}"] = value
            else:
                raise CheckpointError(f"unexpected key '{key}' in the AutoNAT checkpoint")
        else:
            raise CheckpointError(f"unexpected key '{key}' in the AutoNAT checkpoint")
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


def build_transformer(
    original, num_attention_heads: int, num_encoder_layers: Optional[int] = None
) -> Union[ENATTransformer2DModel, NATTransformer2DModel]:
    """The model of an original checkpoint with its weights (strictly checked and loaded): an
    `ENATTransformer2DModel` for ENAT checkpoints (they need `num_encoder_layers`), a `NATTransformer2DModel` for
    AutoNAT ones (recognised by their keys; they have no encoder/decoder split)."""
    if is_autonat_checkpoint(original):
        if num_encoder_layers is not None:
            raise CheckpointError(
                "this is an AutoNAT checkpoint (U-ViT keys in_blocks/mid_block/out_blocks): it has no encoder/decoder "
                "split, so num_encoder_layers does not apply"
            )
        config = nat_config_from_state_dict(original, num_attention_heads)
        check_layout(original, expected_nat_shapes(config), "AutoNAT")
        check_values(original, "AutoNAT")
        with init_empty_weights():
            model = NATTransformer2DModel(**config)
        model.load_state_dict(convert_nat_state_dict(original), strict=True, assign=True)
        return model.eval()
    if num_encoder_layers is None:
        raise CheckpointError("this is an ENAT checkpoint: pass the number of encoder layers (or a --preset)")
    config = transformer_config_from_state_dict(original, num_attention_heads, num_encoder_layers)
    check_layout(original, expected_transformer_shapes(config), "transformer", UNUSED_TRANSFORMER_PREFIXES)
    check_values(original, "transformer")
    with init_empty_weights():  # no random initialisation: every parameter comes from the checkpoint
        model = ENATTransformer2DModel(**config)
    model.load_state_dict(convert_transformer_state_dict(original, num_encoder_layers), strict=True, assign=True)
    return model.eval()


def build_vqvae(original) -> VQModel:
    """A diffusers `VQModel` computing what the original VQGAN computes (strictly checked and loaded)."""
    config = vqgan_config_from_state_dict(original)
    check_layout(original, expected_vqgan_shapes(config), "VQGAN")
    check_values(original, "VQGAN")
    with init_empty_weights():
        model = VQModel(**config)
    model.load_state_dict(convert_vqgan_state_dict(original), strict=True, assign=True)
    return model.eval()


def imagenet_id2label(num_classes: int) -> Optional[Dict[int, str]]:
    """ImageNet-1k class names (torchvision's list, shipped with the package) for 1000-class models, else `None`."""
    if num_classes != 1000:
        return None
    names = json.loads((Path(__file__).parent / "imagenet_classes.json").read_text(encoding="utf-8"))
    return dict(enumerate(names))


def build_pipeline(transformer, vqvae: VQModel, scheduler_config: dict) -> ENATPipeline:
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
