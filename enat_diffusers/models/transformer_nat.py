# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The AutoNAT network (CVPR 2024) as a diffusers model: a plain non-autoregressive transformer (NAT).

A U-ViT over [class token, image tokens]: `num_layers // 2` in-blocks, a mid-block and `num_layers // 2` out-blocks,
each out-block first merging the output of its mirror in-block through a long skip connection. Every token, visible
or [MASK], goes through every block at every sampling step: this is also the "vanilla NAT" that ENAT's spatial and
temporal designs are measured against.

Built from diffusers' parts: the blocks are `BasicTransformerBlock`s (pre-LayerNorm self-attention through diffusers'
`Attention` and its processors, exact-GELU `FeedForward`); the token embedding and the output head are the same
modules as ENAT's.

Text-to-image models (`text_embed_dim`) put the condition in context as U-ViT does for MS-COCO: a token of the
pooled text embedding and the text's token embeddings lead the image tokens through every block, and are dropped at
the output. With `use_rotary_positional_embeddings`, queries and keys of image tokens are rotated by their grid
position (2D rotary, as in ENAT; `NATRotaryAttnProcessor`).
"""

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from .transformer_enat import (
    ENATMlmHead,
    ENATTokenEmbedding,
    apply_rotary,
    attend,
    check_no_attention_kwargs,
    check_token_grid,
    device_rotary_table,
)


@dataclass
class NATTransformer2DModelOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, codebook_size)`):
            Unnormalised scores over the VQ codebook at every position (the [MASK] id is never a prediction).
    """

    logits: torch.Tensor


class NATRotaryAttnProcessor:
    """
    Self-attention of a NAT block whose queries and keys are rotated by their tokens' grid positions first
    (`rotary_emb = (cos, sin)`, each `(1, N, head_dim)`; tokens without a grid position have the identity rotation).
    Otherwise the computation of diffusers' `AttnProcessor2_0` for these blocks (no norms, no residual); attention goes
    through `dispatch_attention_fn`, so `attention_backend(...)` applies.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError(
                "NATRotaryAttnProcessor is a self-attention processor: encoder_hidden_states must be None."
            )
        query, key, value = (
            projection(hidden_states).unflatten(-1, (attn.heads, -1))
            for projection in (attn.to_q, attn.to_k, attn.to_v)
        )  # (B, N, H, Dh)
        if rotary_emb is not None:
            query, key = apply_rotary(query, rotary_emb), apply_rotary(key, rotary_emb)
        return attend(self, attn, query, key, value, attention_mask)


@functools.lru_cache(maxsize=None)
def _takes_rotary(processor_class) -> bool:
    return "rotary_emb" in inspect.signature(processor_class.__call__).parameters


class NATTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""
    AutoNAT's NAT: predicts VQ codes for every [MASK] token of a token grid, running the full network over all tokens
    (no encoder/decoder split, no reuse between steps).

    The condition enters in context, in front of the image tokens, and is dropped at the output: for class-conditional
    models (the released AutoNAT checkpoints) one token, an embedding of the class (the null class `num_classes` is
    the unconditional label); for text-to-image models (`text_embed_dim`, `num_classes=None`) a projection of the
    pooled text embedding, then the projected text token embeddings (the unconditional text is the empty prompt's).

    Args:
        sample_size (`int`, defaults to 16): Side of the token grid; the sequence length is `sample_size**2`.
        codebook_size (`int`, defaults to 1024): Number of VQ codes. The [MASK] token id is `codebook_size`.
        hidden_size (`int`, defaults to 768): Width of the transformer.
        num_attention_heads (`int`, defaults to 8): Number of attention heads.
        num_layers (`int`, defaults to 24): The U-ViT depth, even: `num_layers // 2` in-blocks, one mid-block and
            `num_layers // 2` out-blocks with long skip connections (`num_layers + 1` blocks in all).
        mlp_ratio (`float`, defaults to 4.0): Hidden width of the block MLPs relative to `hidden_size`.
        num_classes (`int`, *optional*, defaults to 1000): Number of classes; `num_classes` itself is the null class.
            `None` for text-to-image models.
        text_embed_dim (`int`, *optional*): Width of the text encoder's token and pooled embeddings; set for
            text-to-image models (with `num_classes=None`).
        use_rotary_positional_embeddings (`bool`, defaults to `False`): Rotate the queries and keys of image tokens
            by their grid positions (2D rotary, on top of the learned absolute position embedding), so attention
            depends on relative positions; the condition tokens are not rotated.
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
        num_classes: Optional[int] = 1000,
        text_embed_dim: Optional[int] = None,
        use_rotary_positional_embeddings: bool = False,
    ):
        super().__init__()
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"num_layers must be a positive even number (U-ViT in/out halves), got {num_layers}.")
        if num_attention_heads < 1 or hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible into {num_attention_heads} attention heads")
        if (num_classes is None) == (text_embed_dim is None):
            raise ValueError(
                "Set exactly one of num_classes (class-conditional) and text_embed_dim (text-to-image), got "
                f"num_classes={num_classes!r}, text_embed_dim={text_embed_dim!r}."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive number of classes, got {num_classes}.")
        if text_embed_dim is not None and text_embed_dim < 1:
            raise ValueError(f"text_embed_dim must be a positive width, got {text_embed_dim}.")
        head_dim = hidden_size // num_attention_heads
        if use_rotary_positional_embeddings and head_dim % 4:
            raise ValueError(f"2D rotary embeddings need a head width divisible by 4, got {head_dim}.")

        self.embed = ENATTokenEmbedding(codebook_size + 1, sample_size**2, hidden_size)  # codebook + [MASK]
        if num_classes is not None:
            self.class_embed = ENATTokenEmbedding(num_classes + 1, 1, hidden_size)  # last row: null class
        else:
            self.pooled_text_embedder = nn.Linear(text_embed_dim, hidden_size)
            self.context_embedder = nn.Linear(text_embed_dim, hidden_size)

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
        if use_rotary_positional_embeddings:
            self.set_attn_processor(NATRotaryAttnProcessor())

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
    def null_class_label(self) -> Optional[int]:
        return self.config.num_classes

    def _block(self, block, hidden_states, attention_kwargs):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden_states, None, None, None, None, attention_kwargs)
        return block(hidden_states, cross_attention_kwargs=attention_kwargs)

    def _rotary_emb(self, num_condition: int, device, dtype) -> Optional[Dict[str, Any]]:
        """The blocks' `{"rotary_emb": (cos, sin)}`, each `(1, num_condition + L, head_dim)` (condition tokens
        unrotated), or `None` without rotary embeddings."""
        if not self.config.use_rotary_positional_embeddings:
            return None
        unknown = [name for name, processor in self.attn_processors.items() if not _takes_rotary(type(processor))]
        if unknown:
            raise ValueError(
                f"This NAT uses rotary position embeddings, but the attention processors of {unknown[:3]} do not take "
                "them; set NATRotaryAttnProcessor (or one with a `rotary_emb` argument)."
            )
        side = self.config.sample_size
        table = device_rotary_table(side, self.config.hidden_size // self.config.num_attention_heads, device)
        # condition tokens take the table's last row (no rotation), image tokens their grid position
        positions = torch.cat([torch.full((num_condition,), side * side), torch.arange(side * side)]).to(device)
        return {"rotary_emb": tuple(t[positions].unsqueeze(0).to(dtype) for t in table)}

    def _check_condition(self, batch_size, class_labels, encoder_hidden_states, pooled_text_embeds):
        """The condition's inputs checked (shapes and kinds; the label values are checked with the token ids)."""
        if self.config.num_classes is not None:
            if encoder_hidden_states is not None or pooled_text_embeds is not None:
                raise ValueError("This is a class-conditional model: pass `class_labels` and no text embeddings.")
            if not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point():
                raise ValueError("class_labels must be an integer tensor with one class id per row of input_ids.")
            if class_labels.reshape(-1).shape[0] != batch_size:
                raise ValueError(f"class_labels has {class_labels.numel()} labels for a batch of {batch_size}.")
            return
        if class_labels is not None or pooled_text_embeds is None or encoder_hidden_states is None:
            raise ValueError(
                "This is a text-to-image model: pass `pooled_text_embeds` and `encoder_hidden_states`, not "
                "`class_labels`."
            )
        width = self.config.text_embed_dim
        if tuple(pooled_text_embeds.shape) != (batch_size, width):
            raise ValueError(
                f"pooled_text_embeds must have shape {(batch_size, width)}, got {tuple(pooled_text_embeds.shape)}."
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (batch_size, width):
            raise ValueError(
                f"encoder_hidden_states must have shape ({batch_size}, text_sequence_length, {width}), got "
                f"{tuple(encoder_hidden_states.shape)}."
            )

    def _condition_tokens(self, class_labels, encoder_hidden_states, pooled_text_embeds, device):
        """The in-context condition tokens `(B, C, D)`: the class token, or the pooled and token text embeddings."""
        if self.config.num_classes is not None:
            return self.class_embed(class_labels.reshape(-1, 1).to(device))  # (B, 1, D)
        pooled = self.pooled_text_embedder(pooled_text_embeds.to(device, self.dtype)).unsqueeze(1)  # (B, 1, D)
        return torch.cat([pooled, self.context_embedder(encoder_hidden_states.to(device, self.dtype))], dim=1)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        pooled_text_embeds: Optional[torch.Tensor] = None,
        reuse_state=None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[NATTransformer2DModelOutput, tuple]:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
                Token ids in raster order; `codebook_size` ([MASK]) where the token is unknown. Unlike ENAT, rows may
                have different numbers of [MASK] tokens.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class ids in `[0, num_classes]`, `num_classes` being the null class. Class-conditional models only.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_sequence_length, text_embed_dim)`,
                *optional*): Text token embeddings. Text-to-image models only.
            pooled_text_embeds (`torch.Tensor` of shape `(batch_size, text_embed_dim)`, *optional*):
                Pooled text embedding. Text-to-image models only.
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
        self._check_condition(input_ids.shape[0], class_labels, encoder_hidden_states, pooled_text_embeds)
        checks = [((input_ids < 0) | (input_ids > self.mask_token_id)).sum()]
        if class_labels is not None:
            checks.append(((class_labels < 0) | (class_labels > self.config.num_classes)).sum().to(input_ids.device))
        bad_ids, *bad_labels = torch.stack(checks).tolist()  # one device-to-host transfer
        if bad_ids:
            raise ValueError(
                f"input_ids has {bad_ids} id(s) outside [0, {self.mask_token_id}] ([MASK] = codebook_size)."
            )
        if bad_labels and bad_labels[0]:
            raise ValueError(
                f"class_labels has {bad_labels[0]} label(s) outside [0, {self.config.num_classes}] "
                f"({self.config.num_classes} is the null class)."
            )

        condition = self._condition_tokens(class_labels, encoder_hidden_states, pooled_text_embeds, input_ids.device)
        num_condition = condition.shape[1]
        hidden_states = torch.cat([condition, self.embed(input_ids)], dim=1)  # (B, C + L, D)
        block_kwargs = self._rotary_emb(num_condition, hidden_states.device, hidden_states.dtype)

        skips = []
        for block in self.in_blocks:
            hidden_states = self._block(block, hidden_states, block_kwargs)
            skips.append(hidden_states)
        hidden_states = self._block(self.mid_block, hidden_states, block_kwargs)
        for block, skip_projection in zip(self.out_blocks, self.skip_projections):
            hidden_states = skip_projection(torch.cat([hidden_states, skips.pop()], dim=-1))
            hidden_states = self._block(block, hidden_states, block_kwargs)

        hidden_states = self.norm_out(hidden_states[:, num_condition:])  # the condition tokens are not predicted
        word_embeddings = self.embed.codebook_table(self.config.codebook_size, hidden_states.device)
        logits = self.mlm_head(hidden_states, word_embeddings)  # (B, L, K)
        if not return_dict:
            return (logits,)
        return NATTransformer2DModelOutput(logits=logits)
