# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The AutoNAT network (CVPR 2024) as a diffusers model: a plain non-autoregressive transformer (NAT).

A U-ViT over [class token, image tokens]: `num_layers // 2` in-blocks, a mid-block and `num_layers // 2` out-blocks,
each out-block first merging the output of its mirror in-block through a long skip connection. Every token, visible
or [MASK], goes through every block at every sampling step: this is also the "vanilla NAT" that ENAT's spatial and
temporal designs are measured against.

Built from diffusers' parts: the blocks are `BasicTransformerBlock`s (pre-LayerNorm self-attention through diffusers'
`Attention` and its processors, exact-GELU `FeedForward`); the token embedding and the output head are the same
modules as ENAT's.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from .transformer_enat import ENATMlmHead, ENATTokenEmbedding, check_no_attention_kwargs, check_token_grid


@dataclass
class NATTransformer2DModelOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, codebook_size)`):
            Unnormalised scores over the VQ codebook at every position (the [MASK] id is never a prediction).
    """

    logits: torch.Tensor


class NATTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""
    AutoNAT's class-conditional NAT: predicts VQ codes for every [MASK] token of a token grid, running the full
    network over all tokens (no encoder/decoder split, no reuse between steps).

    The class enters as one in-context token (an embedding of its own, position 0) in front of the image tokens and
    is dropped at the output; the null class `num_classes` is the unconditional label.

    Args:
        sample_size (`int`, defaults to 16): Side of the token grid; the sequence length is `sample_size**2`.
        codebook_size (`int`, defaults to 1024): Number of VQ codes. The [MASK] token id is `codebook_size`.
        hidden_size (`int`, defaults to 768): Width of the transformer.
        num_attention_heads (`int`, defaults to 8): Number of attention heads.
        num_layers (`int`, defaults to 24): The U-ViT depth, even: `num_layers // 2` in-blocks, one mid-block and
            `num_layers // 2` out-blocks with long skip connections (`num_layers + 1` blocks in all).
        mlp_ratio (`float`, defaults to 4.0): Hidden width of the block MLPs relative to `hidden_size`.
        num_classes (`int`, defaults to 1000): Number of classes; `num_classes` itself is the null class.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock"]
    _repeated_blocks = ["BasicTransformerBlock"]
    _skip_layerwise_casting_patterns = ["embed", "norm"]
    supports_reuse = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        codebook_size: int = 1024,
        hidden_size: int = 768,
        num_attention_heads: int = 8,
        num_layers: int = 24,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
    ):
        super().__init__()
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"num_layers must be a positive even number (U-ViT in/out halves), got {num_layers}.")
        if num_attention_heads < 1 or hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible into {num_attention_heads} attention heads")
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be a positive number of classes, got {num_classes}.")

        self.embed = ENATTokenEmbedding(codebook_size + 1, sample_size**2, hidden_size)  # codebook + [MASK]
        self.class_embed = ENATTokenEmbedding(num_classes + 1, 1, hidden_size)  # last row: null class

        def block():
            return BasicTransformerBlock(
                hidden_size,
                num_attention_heads,
                hidden_size // num_attention_heads,
                activation_fn="gelu",
                attention_bias=False,
                norm_type="layer_norm",
                norm_eps=1e-5,
                ff_inner_dim=int(hidden_size * mlp_ratio),
            )

        self.in_blocks = nn.ModuleList([block() for _ in range(num_layers // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block() for _ in range(num_layers // 2)])
        # out-block i first merges [its input, the output of in-block (n - 1 - i)]
        self.skip_projections = nn.ModuleList(
            [nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_layers // 2)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=1e-5)
        self.mlm_head = ENATMlmHead(hidden_size, codebook_size)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """Initialisation of the original training code: truncated N(0, 0.02) linears with zero biases, N(0, 0.02)
        embeddings, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)  # timm's bounds are absolute
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class_label(self) -> int:
        return self.config.num_classes

    def _block(self, block, hidden_states):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden_states)
        return block(hidden_states)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor,
        reuse_state=None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[NATTransformer2DModelOutput, tuple]:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
                Token ids in raster order; `codebook_size` ([MASK]) where the token is unknown. Unlike ENAT, rows may
                have different numbers of [MASK] tokens.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`):
                Class ids in `[0, num_classes]`, `num_classes` being the null class.
            reuse_state: Must be `None`: a NAT recomputes every token at every step (ENAT's temporal reuse needs
                `ENATTransformer2DModel`).
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}` scales the loaded LoRA adapters for this call (diffusers' `apply_lora_scale`).
            return_dict (`bool`, defaults to `True`):
                Return a `NATTransformer2DModelOutput` instead of a tuple `(logits,)`.
        """
        if reuse_state is not None:
            raise ValueError(
                "NATTransformer2DModel has no feature reuse (every token goes through every block at every step); "
                "pass reuse_state=None (pipelines: reuse_features=False)."
            )
        check_no_attention_kwargs(attention_kwargs, type(self).__name__)
        input_ids = check_token_grid(input_ids, self.config.sample_size)
        batch_size = input_ids.shape[0]
        if not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point():
            raise ValueError("class_labels must be an integer tensor with one class id per row of input_ids.")
        class_labels = class_labels.reshape(-1)
        if class_labels.shape[0] != batch_size:
            raise ValueError(f"class_labels has {class_labels.shape[0]} labels for a batch of {batch_size}.")
        bad = torch.stack(
            [
                ((input_ids < 0) | (input_ids > self.mask_token_id)).sum(),
                ((class_labels < 0) | (class_labels > self.config.num_classes)).sum().to(input_ids.device),
            ]
        ).tolist()
        if bad[0]:
            raise ValueError(
                f"input_ids has {bad[0]} id(s) outside [0, {self.mask_token_id}] ([MASK] = codebook_size)."
            )
        if bad[1]:
            raise ValueError(
                f"class_labels has {bad[1]} label(s) outside [0, {self.config.num_classes}] "
                f"({self.config.num_classes} is the null class)."
            )

        class_token = self.class_embed(class_labels.to(input_ids.device).unsqueeze(1))  # (B, 1, D)
        hidden_states = torch.cat([class_token, self.embed(input_ids)], dim=1)  # (B, 1 + L, D)

        skips = []
        for block in self.in_blocks:
            hidden_states = self._block(block, hidden_states)
            skips.append(hidden_states)
        hidden_states = self._block(self.mid_block, hidden_states)
        for block, skip_projection in zip(self.out_blocks, self.skip_projections):
            hidden_states = skip_projection(torch.cat([hidden_states, skips.pop()], dim=-1))
            hidden_states = self._block(block, hidden_states)

        hidden_states = self.norm_out(hidden_states[:, 1:])  # the class token is not predicted
        word_embeddings = self.embed.codebook_table(self.config.codebook_size, hidden_states.device)
        logits = self.mlm_head(hidden_states, word_embeddings)  # (B, L, K)
        if not return_dict:
            return (logits,)
        return NATTransformer2DModelOutput(logits=logits)
