# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ENAT (EfficientNAT, NeurIPS 2024) as a diffusers model.

ENAT is a non-autoregressive transformer over VQ tokens. Two ideas shape this file (paper §4):

* Spatial: visible tokens are encoded on their own by a deep encoder; [MASK] tokens are decoded by a shallow decoder
  that attends to [encoded visible tokens, masked tokens]. Context tokens and a block's own tokens use separate
  key/value projections and separate adaLN shift/scale.
* Temporal: between sampling steps only the newly revealed tokens are encoded. Everything visible before is reused:
  the previous step's final features, passed through a small residual MLP (`prev_proj`), serve as their context.
"""

import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from ..utils.token_groups import check_patch_size, group_mask, group_tokens, ungroup_tokens


@dataclass
class ENATReuseState(BaseOutput):
    """
    What one forward pass leaves for the next sampling step (ENAT's temporal reuse).

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, num_positions, hidden_size)`):
            Final hidden states of every image position, in raster order, before the output norm: one per token, or
            one per token group of a model with `patch_size > 1`. Only the positions that are visible (not masked)
            in `mask` are read by the next step.
        mask (`torch.BoolTensor` of shape `(batch_size, num_positions)`):
            `True` where the token (group) was [MASK] in this step's input.
        text_hidden_states (`torch.Tensor` of shape `(batch_size, text_sequence_length, hidden_size)`, *optional*):
            Final hidden states of the text tokens (text-to-image models only).
        conditioning (`torch.Tensor` of shape `(batch_size, hidden_size)`, *optional*):
            The adaLN condition (label or pooled text embedding) this step ran with.
        modulation (`torch.Tensor` of shape `(batch_size, num_blocks, 8 * hidden_size)`, *optional*):
            Every block's adaLN output for `conditioning` (encoder blocks, then decoder blocks). It depends on the
            condition only, so without gradients a next step with the same condition takes it from here instead of
            recomputing it; a different condition recomputes it.
    """

    # Fields after the first default to None as in every diffusers output, so that `BaseOutput` can be rebuilt from
    # a dict (accelerate's offload hooks move outputs between devices that way).
    hidden_states: torch.Tensor
    mask: Optional[torch.BoolTensor] = None
    text_hidden_states: Optional[torch.Tensor] = None
    conditioning: Optional[torch.Tensor] = None
    modulation: Optional[torch.Tensor] = None


@dataclass
class ENATTransformer2DModelOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, codebook_size)`):
            Unnormalised scores over the VQ codebook at every position (the [MASK] id is never a prediction).
        reuse_state (`ENATReuseState`):
            Pass it as `reuse_state` to the next step's forward to encode only the tokens revealed in between.
    """

    logits: torch.Tensor
    reuse_state: Optional[ENATReuseState] = None


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return hidden_states * (1 + scale) + shift


def feed_forward(dim: int, inner_dim: int) -> FeedForward:
    """diffusers' two-layer MLP with tanh-approximated GELU (`net.0.proj`, `net.2`), as the original's `Mlp`."""
    return FeedForward(dim, inner_dim=inner_dim, activation_fn="gelu-approximate", bias=True)


def check_no_attention_kwargs(attention_kwargs: Optional[Dict[str, Any]], model_name: str):
    """After `apply_lora_scale` took `"scale"`, nothing may be left: the attention processors take no other keys."""
    if attention_kwargs:
        raise ValueError(
            f"attention_kwargs {sorted(attention_kwargs, key=str)} are not used by {model_name}: it takes only "
            "'scale' (the LoRA scale)."
        )


def check_token_grid(input_ids: torch.LongTensor, side: int) -> torch.LongTensor:
    """`input_ids` of shape `(B, side**2)` or `(B, side, side)` as `(B, side**2)` int64 ids, or a clear error."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.ndim > 0 and input_ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch (batch_size 0).")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}.")
    if input_ids.ndim == 3 and tuple(input_ids.shape[1:]) == (side, side):
        return input_ids.reshape(input_ids.shape[0], side * side).long()
    if input_ids.ndim == 2 and input_ids.shape[1] == side * side:
        return input_ids.long()
    raise ValueError(
        f"input_ids must have shape (batch_size, {side * side}) or (batch_size, {side}, {side}) for this model's "
        f"{side}x{side} token grid, got {tuple(input_ids.shape)}."
    )


class ENATTokenEmbedding(nn.Module):
    """
    Token embedding (codebook + [MASK]) plus a learned absolute position embedding, then LayerNorm. With
    `patch_size > 1` a position is a `patch_size x patch_size` group of tokens: their embeddings are concatenated and
    projected to one (`patch_embed`), as a patch embedding does with pixels. `project_tokens` gives one position per
    token that projection too (the models of `ENATTransformer2DModel.ungroup`).
    """

    def __init__(
        self, vocab_size: int, num_positions: int, hidden_size: int, patch_size: int = 1, project_tokens: bool = False
    ):
        super().__init__()
        self.patch_size = patch_size
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.patch_embed = None
        if patch_size > 1 or project_tokens:
            self.patch_embed = nn.Linear(patch_size**2 * hidden_size, hidden_size)
        self.position_embeddings = nn.Embedding(num_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`(B, L)` token ids -> `(B, L / patch_size**2, D)` position embeddings."""
        embeddings = self.word_embeddings(input_ids)  # (B, L, D)
        if self.patch_embed is not None:
            embeddings = self.patch_embed(group_tokens(embeddings, self.patch_size).flatten(2))  # (B, G, D)
        positions = torch.arange(embeddings.shape[1], device=input_ids.device)
        return self.norm(embeddings + self.position_embeddings(positions))

    def codebook_table(self, codebook_size: int, device: torch.device) -> torch.Tensor:
        """The first `codebook_size` rows of the token table (no [MASK] row), looked up through the embedding module
        so that module hooks (layerwise casting, group offloading) apply, and detached as in the original."""
        return self.word_embeddings(torch.arange(codebook_size, device=device)).detach()  # (K, D)


class ENATPrevProjection(nn.Module):
    """Residual MLP applied to last step's features before they serve as context again (paper §4.2)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ff = feed_forward(hidden_size, 4 * hidden_size)  # always 4x, whatever mlp_ratio is

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.ff(self.norm(hidden_states))


def grid_rotary_table(side: int, head_dim: int, spacing: int = 1, theta: float = 10000.0):
    """
    2D rotary frequencies of a `side` x `side` grid in raster order: the first half of each head's features rotates
    with the row, the second half with the column (as Flux and Lumina split their axes). Positions are in tokens: the
    rows and columns of a grid of `spacing` x `spacing` token groups are `spacing` tokens apart, so a model with token
    groups and one without rotate the same offset in the image the same way (`ENATTransformer2DModel.ungroup`).
    Returns `(cos, sin)`, each `(side**2 + 1, head_dim)`; the extra last row is the identity (cos 1, sin 0), the
    rotation of tokens without a grid position (text tokens).
    """
    positions = torch.arange(side * side)
    tables = [
        get_1d_rotary_pos_embed(head_dim // 2, axis * spacing, theta, use_real=True, repeat_interleave_real=True)
        for axis in (positions // side, positions % side)
    ]
    cos, sin = (torch.cat([table[i] for table in tables], dim=-1) for i in (0, 1))  # (L, head_dim)
    return torch.cat([cos, torch.ones(1, head_dim)]), torch.cat([sin, torch.zeros(1, head_dim)])


@functools.lru_cache(maxsize=None)
def device_rotary_table(side: int, head_dim: int, device: torch.device, spacing: int = 1):
    """`grid_rotary_table` on `device`, built once per size and device (the models index it at every forward)."""
    return tuple(t.to(device) for t in grid_rotary_table(side, head_dim, spacing))


def apply_rotary(x: torch.Tensor, rotary: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotates `x` `(B, N, H, Dh)` by per-token `(cos, sin)`, each `(B, N, Dh)`, pairing features (2i, 2i+1)."""
    cos, sin = (t.unsqueeze(2) for t in rotary)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attend(processor, attn, query, key, value, attention_mask=None) -> torch.Tensor:
    """Attention of `(B, N, H, Dh)` queries, keys and values through diffusers' `dispatch_attention_fn` (with the
    processor's backend and parallel config), then `attn`'s output projection: `(B, N, H * Dh)`."""
    hidden_states = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attention_mask,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](hidden_states))


class ENATAttnProcessor:
    """
    Default processor of [`ENATAttention`]: queries from the block's own tokens; keys and values from [context
    tokens (through `add_k_proj`/`add_v_proj`), own tokens (through `to_k`/`to_v`)]. Attention itself goes through
    diffusers' `dispatch_attention_fn`, so `attention_backend(...)` and `set_attention_backend` apply. With
    `rotary_emb = ((cos, sin) of the own tokens, (cos, sin) of the context tokens or None)`, queries and keys are
    rotated by their tokens' grid positions first.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "ENATAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple] = None,
    ) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if encoder_hidden_states is not None:
            if attn.fused_projections:
                context_key, context_value = attn.to_added_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                context_key = attn.add_k_proj(encoder_hidden_states)
                context_value = attn.add_v_proj(encoder_hidden_states)
        query, key, value = (
            x.unflatten(-1, (attn.heads, attn.head_dim)) for x in (query, key, value)
        )  # (B, N, H, Dh)
        if rotary_emb is not None:
            query, key = apply_rotary(query, rotary_emb[0]), apply_rotary(key, rotary_emb[0])
        if encoder_hidden_states is not None:
            context_key, context_value = (
                x.unflatten(-1, (attn.heads, attn.head_dim)) for x in (context_key, context_value)
            )
            if rotary_emb is not None:
                context_key = apply_rotary(context_key, rotary_emb[1])
            key = torch.cat([context_key, key], dim=1)  # (B, Nc + N, H, Dh)
            value = torch.cat([context_value, value], dim=1)
        return attend(self, attn, query, key, value, attention_mask)


class ENATAttention(nn.Module, AttentionModuleMixin):
    """
    Multi-head attention in which queries come only from the block's own tokens, and keys/values come from
    [context tokens, own tokens] through two separate sets of projections (`add_k_proj`/`add_v_proj` for the
    context, `to_k`/`to_v` for the own tokens). Context tokens are read, never updated, so there is no
    `add_q_proj` and no context output projection.
    """

    _default_processor_cls = ENATAttnProcessor
    _available_processors = [ENATAttnProcessor]
    # fused projection -> the projections it concatenates (along the output features), as the processor reads them
    fused_projection_parts = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_kv": ("add_k_proj", "add_v_proj")}

    def __init__(self, query_dim: int, heads: int, processor=None):
        super().__init__()
        if heads < 1 or query_dim % heads != 0:
            raise ValueError(f"hidden_size {query_dim} is not divisible into {heads} attention heads")
        self.heads = heads
        self.head_dim = query_dim // heads
        self.inner_dim = query_dim
        self.use_bias = True
        self.to_q = nn.Linear(query_dim, query_dim)
        self.to_k = nn.Linear(query_dim, query_dim)
        self.to_v = nn.Linear(query_dim, query_dim)
        self.add_k_proj = nn.Linear(query_dim, query_dim)
        self.add_v_proj = nn.Linear(query_dim, query_dim)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Dropout(0.0)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    @torch.no_grad()
    def fuse_projections(self):
        """Fuses `to_q/to_k/to_v` into `to_qkv` and `add_k_proj/add_v_proj` into `to_added_kv` (fewer, larger
        matmuls). The separate projections stay; `unfuse_projections` drops the fused ones."""
        if self.fused_projections:
            return
        for name, part_names in self.fused_projection_parts.items():
            parts = [getattr(self, part) for part in part_names]
            weight = torch.cat([p.weight for p in parts])
            fused = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            fused.weight.copy_(weight)
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
            setattr(self, name, fused)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self):
        if not self.fused_projections:
            return
        del self.to_qkv, self.to_added_kv
        self.fused_projections = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class ENATBlock(nn.Module):
    """
    Transformer block with 8-way adaLN modulation: shift/scale for the own tokens, shift/scale for the context
    tokens, an attention gate, and shift/scale/gate for the MLP. The same block type serves encoder and decoder. The
    block owns its `adaLN_modulation` but the model applies it (once per condition, see `ENATReuseState.modulation`)
    and passes the result to `forward`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm1_context = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = ENATAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = feed_forward(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Linear(dim, 8 * dim)  # applied to SiLU(condition)

    def forward(
        self,
        hidden_states: torch.Tensor,
        modulation: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple] = None,
    ) -> torch.Tensor:
        """`modulation` `(B, 8D)`: this block's `adaLN_modulation(SiLU(condition))`."""
        modulation = modulation.unsqueeze(1)  # (B, 1, 8D)
        shift_msa, scale_msa, shift_ctx, scale_ctx, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(8, -1)

        norm_hidden_states = modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        if context is not None:
            context = modulate(self.norm1_context(context), shift_ctx, scale_ctx)
        attention_kwargs = {} if rotary_emb is None else {"rotary_emb": rotary_emb}
        hidden_states = hidden_states + gate_msa * self.attn(norm_hidden_states, context, **attention_kwargs)

        norm_hidden_states = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.ff(norm_hidden_states)


class ENATMlmHead(nn.Module):
    """Dense -> exact GELU -> LayerNorm, then scores against the (tied) token embedding table."""

    def __init__(self, hidden_size: int, codebook_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(codebook_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm(F.gelu(self.dense(hidden_states)))
        return F.linear(hidden_states, word_embeddings, self.bias)


class ENATTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""
    The ENAT transformer: predicts VQ codes for every [MASK] token of a token grid.

    Class-conditional models (the released ENAT checkpoints) take `class_labels`; the adaLN condition is a label
    embedding and the null class `num_classes` is the unconditional label.

    Text-to-image models (`text_embed_dim` set, `num_classes=None`) are this package's extension; the authors
    released no text code and the paper only says text embeddings are concatenated with the visual tokens. Here text
    tokens are *always-visible tokens*: they are projected to the hidden size, encoded by the encoder together with
    the visible image tokens, attended to by the decoder like any visible token, and with reuse they are encoded once
    (when there is no reuse state) and from then on reused through `prev_proj` like any previously visible token. The
    adaLN condition is a projection of the pooled text embedding. No attention mask is used for padded text
    positions (as in U-ViT's text models): the pad features of a causal text encoder are deterministic functions of
    the prompt.

    Args:
        sample_size (`int`, defaults to 16): Side of the token grid; the sequence length is `sample_size**2`.
        codebook_size (`int`, defaults to 1024): Number of VQ codes. The [MASK] token id is `codebook_size`.
        hidden_size (`int`, defaults to 1024): Width of the transformer.
        num_attention_heads (`int`, defaults to 16): Number of attention heads.
        num_encoder_layers (`int`, defaults to 22): Blocks that encode visible tokens.
        num_decoder_layers (`int`, defaults to 2): Blocks that decode [MASK] tokens.
        mlp_ratio (`float`, defaults to 4.0): Hidden width of the block MLPs relative to `hidden_size`.
        num_classes (`int`, *optional*, defaults to 1000): Number of classes of a class-conditional model. The
            null (unconditional) class id is `num_classes`. `None` for text-to-image models.
        text_embed_dim (`int`, *optional*): Width of the text encoder's token and pooled embeddings (768 for CLIP
            ViT-L/14). Set for text-to-image models only.
        use_rotary_positional_embeddings (`bool`, defaults to `False`): This package's extension (the released
            checkpoints have none): every attention rotates queries and keys by their tokens' 2D grid positions
            (`grid_rotary_table`; text tokens are not rotated), on top of the learned absolute position embedding.
            Attention scores then depend on relative offsets, so a masked token can find its neighbours among the
            visible tokens from the start of training.
        patch_size (`int`, defaults to 1): This package's extension (the released checkpoints have 1): the side of
            the square group of tokens that one transformer position holds. The blocks then run on
            `(sample_size / patch_size)**2` positions, several times cheaper; a group's token embeddings are
            concatenated and projected (`embed.patch_embed`), and its output is projected back to one feature per
            token (`proj_out`) before the tied output head. A group is masked or visible as a whole: the pipelines'
            scheduler needs the same `patch_size`.
        project_tokens (`bool`, defaults to `False`): This package's extension, for `patch_size` 1 (with token
            groups the projection is always there): each token's embedding goes through a linear projection
            (`embed.patch_embed`) before its position embedding is added. `ungroup` sets it, to keep the input
            projection of the token-group model it starts from.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ENATBlock"]
    _repeated_blocks = ["ENATBlock"]
    supports_reuse = True  # the pipelines pass each step's `reuse_state` to the next
    # Lookup tables (diffusers never casts nn.Embedding), the class embedding and the norms stay in the compute dtype.
    _skip_layerwise_casting_patterns = ["embed", "norm"]

    @register_to_config
    def __init__(
        self,
        # token grid
        sample_size: int = 16,
        codebook_size: int = 1024,
        # transformer
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        num_encoder_layers: int = 22,
        num_decoder_layers: int = 2,
        mlp_ratio: float = 4.0,
        # conditioning: exactly one of the two
        num_classes: Optional[int] = 1000,
        text_embed_dim: Optional[int] = None,
        # this package's extension
        use_rotary_positional_embeddings: bool = False,
        patch_size: int = 1,
        project_tokens: bool = False,
    ):
        super().__init__()
        if (num_classes is None) == (text_embed_dim is None):
            raise ValueError(
                "Set exactly one of `num_classes` (class-conditional model) and `text_embed_dim` (text-to-image "
                f"model); got num_classes={num_classes}, text_embed_dim={text_embed_dim}."
            )
        grid_positions = check_patch_size(sample_size, patch_size) ** 2
        if num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be at least 1, got {num_decoder_layers}.")
        head_dim = hidden_size // num_attention_heads
        if use_rotary_positional_embeddings and head_dim % 4:
            raise ValueError(
                f"2D rotary embeddings rotate feature pairs along two axes: the head dimension (hidden_size / "
                f"num_attention_heads = {head_dim}) must be a multiple of 4."
            )

        # vocabulary: the codebook plus [MASK] (id = codebook_size)
        self.embed = ENATTokenEmbedding(codebook_size + 1, grid_positions, hidden_size, patch_size, project_tokens)
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)  # last row: null class
        else:
            self.context_embedder = nn.Linear(text_embed_dim, hidden_size)
            self.pooled_text_embedder = nn.Linear(text_embed_dim, hidden_size)

        self.prev_proj = ENATPrevProjection(hidden_size)
        self.encoder_blocks = nn.ModuleList(
            [ENATBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_encoder_layers)]
        )
        self.decoder_blocks = nn.ModuleList(
            [ENATBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_decoder_layers)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=1e-5)
        if patch_size > 1:
            self.proj_out = nn.Linear(hidden_size, patch_size**2 * hidden_size)
        self.mlm_head = ENATMlmHead(hidden_size, codebook_size)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """Initialisation of the original training code: Xavier linears, N(0, 0.02) embeddings, zero adaLN."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            # The original fuses each key/value pair into one (2D, D) linear: keep its Xavier bound.
            for first, second in ((block.attn.to_k, block.attn.to_v), (block.attn.add_k_proj, block.attn.add_v_proj)):
                fused = torch.empty(2 * first.out_features, first.in_features, device=first.weight.device)
                nn.init.xavier_uniform_(fused)
                first.weight.data.copy_(fused[: first.out_features])
                second.weight.data.copy_(fused[first.out_features :])
            # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class_label(self) -> Optional[int]:
        return self.config.num_classes

    def _block_modulation(self, conditioning: torch.Tensor, reuse_state: Optional[ENATReuseState]) -> torch.Tensor:
        """
        Every block's adaLN output `(B, num_blocks, 8D)`, encoder blocks first. It depends on the condition only: a
        sampler's steps share it, so without gradients it is taken from a reuse state made with the same condition.
        """
        if (
            reuse_state is not None
            and reuse_state.modulation is not None
            and not torch.is_grad_enabled()
            and torch.equal(reuse_state.conditioning, conditioning)
        ):
            return reuse_state.modulation
        activated = F.silu(conditioning)
        blocks = [*self.encoder_blocks, *self.decoder_blocks]
        return torch.stack([block.adaLN_modulation(activated) for block in blocks], dim=1)

    def _run_blocks(self, blocks, hidden_states, modulation, context, rotary_emb):
        """`modulation` `(B, len(blocks), 8D)`: the blocks' adaLN outputs."""
        for block, block_modulation in zip(blocks, modulation.unbind(1)):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, block_modulation, context, rotary_emb
                )
            else:
                hidden_states = block(hidden_states, block_modulation, context, rotary_emb)
        return hidden_states

    def _rotary_emb(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, each `(B, N, head_dim)`, of raster `positions` `(B, N)` (`sample_size**2`: no rotation)."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        patch_size = self.config.patch_size
        table = device_rotary_table(self.config.sample_size // patch_size, head_dim, positions.device, patch_size)
        return tuple(t[positions].to(dtype) for t in table)

    def _rotary_embs(self, positions, num_text: int, num_old: int, num_new: int, reuse: bool, dtype):
        """
        The rotations `(own tokens, context tokens)` of the encoder's and of the decoder's blocks. `positions` `(B, L)`
        are the grid positions of the [old | new | masked] image tokens; text tokens lead the visible set, unrotated.
        """
        text = positions.new_full((positions.shape[0], num_text), positions.shape[1])
        positions = torch.cat([text, positions], dim=1)  # [text | old | new | masked]
        visible = num_text + num_old + num_new

        def rotary(start, end=None):
            return self._rotary_emb(positions[:, start:end], dtype)

        if reuse:  # the new tokens are encoded; text and old tokens are their context
            encoder = (rotary(visible - num_new, visible), rotary(0, visible - num_new))
        else:  # text and new tokens are encoded together
            encoder = (rotary(0, visible), None)
        return encoder, (rotary(visible), rotary(0, visible))

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        pooled_text_embeds: Optional[torch.Tensor] = None,
        reuse_state: Optional[ENATReuseState] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[ENATTransformer2DModelOutput, tuple]:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
                Token ids in raster order; `codebook_size` ([MASK]) where the token is unknown. Every row must have
                the same number of [MASK] tokens (the encoder/decoder split needs equal token counts).
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class ids in `[0, num_classes]`, `num_classes` being the null class. Class-conditional models only.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_sequence_length, text_embed_dim)`,
                *optional*): Text token embeddings. Text-to-image models only. Ignored when `reuse_state` is given:
                the text tokens were encoded by the step that produced it.
            pooled_text_embeds (`torch.Tensor` of shape `(batch_size, text_embed_dim)`, *optional*):
                Pooled text embedding, the adaLN condition of text-to-image models.
            reuse_state (`ENATReuseState`, *optional*):
                The `reuse_state` of the previous step's output. With it, only the tokens revealed since then are
                encoded, with the previous features through `prev_proj` as context (ENAT §4.2). Tokens may only be
                revealed, never hidden again. `None` runs the plain forward.
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}` scales the loaded LoRA adapters for this call (diffusers' `apply_lora_scale`).
            return_dict (`bool`, defaults to `True`):
                Return an `ENATTransformer2DModelOutput` instead of a tuple `(logits, reuse_state)`.

        Returns:
            `ENATTransformer2DModelOutput` with `logits` of shape `(batch_size, sequence_length, codebook_size)` and
            the `reuse_state` for the next step.
        """
        check_no_attention_kwargs(attention_kwargs, type(self).__name__)
        input_ids = check_token_grid(input_ids, self.config.sample_size)
        self._check_condition(input_ids.shape[0], class_labels, encoder_hidden_states, pooled_text_embeds)
        patch_size = self.config.patch_size
        mask = group_mask(input_ids == self.mask_token_id, patch_size, "input_ids")  # (B, L) or (B, G) positions
        num_masked, num_new = self._check_token_data(input_ids, class_labels, mask, reuse_state)
        batch_size, seq_len = mask.shape
        dim = self.config.hidden_size

        # 1. Embed the condition (adaLN input) and all tokens (those already in a reuse state go unused).
        if self.config.num_classes is not None:
            conditioning = self.class_embedding(class_labels.reshape(-1))  # (B, D)
        else:
            conditioning = self.pooled_text_embedder(pooled_text_embeds.to(self.dtype))  # (B, D)
        modulation = self._block_modulation(conditioning, reuse_state)  # (B, blocks, 8D)
        encoder_modulation, decoder_modulation = modulation.split(
            [self.config.num_encoder_layers, self.config.num_decoder_layers], dim=1
        )
        hidden_states = self.embed(input_ids)  # (B, L, D), one per position

        # 2. Partition positions into [previously visible | newly visible | masked], each in raster order.
        if reuse_state is None:
            group = mask.to(torch.uint8)  # 0 visible, 1 masked
        else:
            group = reuse_state.mask.to(torch.uint8) + mask.to(torch.uint8)  # 0 old, 1 new, 2 masked
        order = torch.argsort(group, dim=1, stable=True).unsqueeze(-1).expand(-1, -1, dim)  # (B, L, D)
        num_old = seq_len - num_masked - num_new
        new_tokens, masked_tokens = hidden_states.gather(1, order[:, num_old:]).split([num_new, num_masked], dim=1)

        # 3. Encoder on the newly visible tokens. Without a reuse state, text tokens are encoded with them; with one,
        #    everything visible before (text included) is context only, as prev_proj(previous final features).
        if reuse_state is None:
            text_tokens = self._embed_text(batch_size, encoder_hidden_states)  # (B, T, D) or None
            num_text = 0 if text_tokens is None else text_tokens.shape[1]
            encoder_context = None
            encoder_input = new_tokens if text_tokens is None else torch.cat([text_tokens, new_tokens], dim=1)
        else:
            old_states = reuse_state.hidden_states.gather(1, order[:, :num_old])  # (B, n_old, D)
            text_states = reuse_state.text_hidden_states
            num_text = 0 if text_states is None else text_states.shape[1]
            old_states = old_states if text_states is None else torch.cat([text_states, old_states], dim=1)
            # (B, T + n_old, D); none after a step with nothing visible (layers never see empty inputs: torchao's
            # dynamic int8 quantization fails on them)
            encoder_context = self.prev_proj(old_states).to(hidden_states.dtype) if old_states.shape[1] else None
            encoder_input = new_tokens
        encoder_rotary = decoder_rotary = None
        if self.config.use_rotary_positional_embeddings:
            encoder_rotary, decoder_rotary = self._rotary_embs(
                order[..., 0], num_text, num_old, num_new, reuse_state is not None, hidden_states.dtype
            )
        if encoder_input.shape[1] > 0:
            encoder_input = self._run_blocks(
                self.encoder_blocks, encoder_input, encoder_modulation, encoder_context, encoder_rotary
            )
        visible = encoder_input if encoder_context is None else torch.cat([encoder_context, encoder_input], dim=1)

        # 4. Decoder: masked tokens attend to [all visible tokens, masked tokens].
        decoder_context = visible if visible.shape[1] > 0 else None
        if masked_tokens.shape[1] > 0:
            masked_tokens = self._run_blocks(
                self.decoder_blocks, masked_tokens, decoder_modulation, decoder_context, decoder_rotary
            )

        # 5. Image tokens back to raster order; text tokens lead the visible set.
        text_states, image_states = visible.split([num_text, seq_len - num_masked], dim=1)
        ordered = torch.cat([image_states, masked_tokens], dim=1)  # (B, L, D), aligned with `order`
        hidden_states = torch.zeros_like(ordered).scatter(1, order, ordered)  # (B, L, D)

        # 6. Output head, tied to the token embedding ([MASK] row excluded; the original detaches the table). Token
        #    groups are first projected back to one feature per token.
        output_states = self.norm_out(hidden_states)
        if patch_size > 1:
            output_states = ungroup_tokens(
                self.proj_out(output_states).unflatten(-1, (patch_size**2, dim)), patch_size
            )
        word_embeddings = self.embed.codebook_table(self.config.codebook_size, hidden_states.device)
        logits = self.mlm_head(output_states, word_embeddings)  # (B, L tokens, K)

        text_states = text_states if self.config.text_embed_dim is not None else None
        state = ENATReuseState(hidden_states, mask, text_states, conditioning, modulation)
        if not return_dict:
            return (logits, state)
        return ENATTransformer2DModelOutput(logits=logits, reuse_state=state)

    @torch.no_grad()
    def ungroup(self) -> "ENATTransformer2DModel":
        """
        The same network with one position per token (`patch_size` 1), to fine-tune a model trained on token groups
        where a group's tokens must be predicted apart (a group's tokens come from one state, so they cannot agree).
        The blocks, the condition layers and the output head keep their weights; rotary positions are in tokens for
        both (`grid_rotary_table`), so attention sees the same offsets. A token's position embedding is its group's;
        its input projection (`project_tokens`) reads it as a group of copies of itself (the sum of the group
        projection's slices), so on a grid whose groups each repeat one token the new model's blocks see what this
        one's saw; its output is the mean of the group's `proj_out` projections, folded into the head's dense layer.
        Returns a new model on this one's device and dtype; this one is unchanged.
        """
        patch_size = self.config.patch_size
        if patch_size == 1:
            raise ValueError("This transformer has one position per token already (patch_size 1): nothing to ungroup.")
        model = type(self).from_config(self.config, patch_size=1, project_tokens=True).to(self.device, self.dtype)
        state = {
            name: value
            for name, value in self.state_dict().items()
            if not name.startswith(("embed.patch_embed.weight", "embed.position_embeddings.", "proj_out."))
        }
        dim = self.config.hidden_size
        state["embed.patch_embed.weight"] = self.embed.patch_embed.weight.unflatten(1, (patch_size**2, dim)).sum(1)
        group_positions = self.embed.position_embeddings.weight  # (G, D), one row per group in raster order
        repeated = group_positions.unsqueeze(1).expand(-1, patch_size**2, -1)  # (G, p*p, D)
        state["embed.position_embeddings.weight"] = ungroup_tokens(repeated.unsqueeze(0), patch_size)[0]  # (L, D)
        out_weight = self.proj_out.weight.unflatten(0, (patch_size**2, dim)).mean(0)  # (D, D)
        out_bias = self.proj_out.bias.unflatten(0, (patch_size**2, dim)).mean(0)
        dense = self.mlm_head.dense
        state["mlm_head.dense.weight"] = dense.weight @ out_weight
        state["mlm_head.dense.bias"] = dense.weight @ out_bias + dense.bias
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------ inputs

    def _check_condition(self, batch_size, class_labels, encoder_hidden_states, pooled_text_embeds):
        if self.config.num_classes is not None:
            if class_labels is None or pooled_text_embeds is not None or encoder_hidden_states is not None:
                raise ValueError("This is a class-conditional model: pass `class_labels` and no text embeddings.")
            class_labels = class_labels.reshape(-1)
            if class_labels.shape[0] != batch_size or class_labels.is_floating_point():
                raise ValueError(
                    f"class_labels must be {batch_size} integer labels (one per row of input_ids), got a "
                    f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}."
                )
            return
        if class_labels is not None or pooled_text_embeds is None:
            raise ValueError(
                "This is a text-to-image model: pass `pooled_text_embeds` (and `encoder_hidden_states` "
                "without a reuse state), not `class_labels`."
            )
        expected = (batch_size, self.config.text_embed_dim)
        if tuple(pooled_text_embeds.shape) != expected:
            raise ValueError(f"pooled_text_embeds must have shape {expected}, got {tuple(pooled_text_embeds.shape)}.")

    def _embed_text(self, batch_size, encoder_hidden_states) -> Optional[torch.Tensor]:
        if self.config.text_embed_dim is None:
            return None
        if encoder_hidden_states is None:
            raise ValueError("A text-to-image model needs `encoder_hidden_states` when no `reuse_state` is given.")
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch_size
            or encoder_hidden_states.shape[2] != self.config.text_embed_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must have shape ({batch_size}, text_sequence_length, "
                f"{self.config.text_embed_dim}), got {tuple(encoder_hidden_states.shape)}."
            )
        return self.context_embedder(encoder_hidden_states.to(self.dtype))

    def _check_token_data(self, input_ids, class_labels, mask, reuse_state) -> tuple:
        """
        Validates the data of the inputs and returns `(num_masked, num_newly_visible)` per row. All checks share one
        device-to-host transfer, which the token split sizes need anyway.
        """
        batch_size, seq_len = mask.shape
        num_masked = mask.sum(1)  # (B,)

        stats = [
            ((input_ids < 0) | (input_ids > self.mask_token_id)).sum(),
            num_masked.min(),
            num_masked.max(),
        ]
        if class_labels is not None:
            class_labels = class_labels.reshape(-1)
            stats.append(((class_labels < 0) | (class_labels > self.config.num_classes)).sum())
        if reuse_state is not None:
            self._check_reuse_state(reuse_state, batch_size, seq_len)
            prev_masked = reuse_state.mask.sum(1)
            stats += [prev_masked.min(), prev_masked.max(), (mask & ~reuse_state.mask).sum()]
        stats = torch.stack([s.to(device=input_ids.device, dtype=torch.long) for s in stats]).tolist()

        bad_ids, min_masked, max_masked = stats[:3]
        if bad_ids:
            raise ValueError(
                f"input_ids has {bad_ids} id(s) outside [0, {self.mask_token_id}] (codebook ids 0.."
                f"{self.mask_token_id - 1}, [MASK] = {self.mask_token_id})."
            )
        if min_masked != max_masked:
            raise ValueError(
                f"Every row of input_ids must have the same number of [MASK] tokens (ENAT's encoder/decoder split "
                f"needs it); got rows with between {min_masked} and {max_masked}."
            )
        if class_labels is not None and stats[3]:
            raise ValueError(
                f"class_labels has {stats[3]} label(s) outside [0, {self.config.num_classes}] "
                f"({self.config.num_classes} is the null class)."
            )
        if reuse_state is None:
            return min_masked, seq_len - min_masked
        prev_min, prev_max, rehidden = stats[-3:]
        if prev_min != prev_max:
            raise ValueError("reuse_state.mask has rows with different numbers of masked tokens.")
        if rehidden:
            raise ValueError(
                f"{rehidden} token(s) are masked now but were visible in reuse_state: with reuse, tokens may only be "
                "revealed, never hidden again. Run without reuse_state to start over."
            )
        return min_masked, prev_min - min_masked

    def _check_reuse_state(self, state: ENATReuseState, batch_size: int, seq_len: int):
        if not isinstance(state, ENATReuseState):
            raise ValueError(f"reuse_state must be an ENATReuseState, got {type(state).__name__}.")
        expected = (batch_size, seq_len, self.config.hidden_size)
        if tuple(state.hidden_states.shape) != expected:
            raise ValueError(
                f"reuse_state.hidden_states has shape {tuple(state.hidden_states.shape)}, but this input needs "
                f"{expected}: the state must come from the same batch and model."
            )
        autocast = torch.is_autocast_enabled(state.hidden_states.device.type)
        if state.hidden_states.dtype != self.dtype and not autocast:
            raise ValueError(
                f"reuse_state.hidden_states has dtype {state.hidden_states.dtype} but the model computes in "
                f"{self.dtype}: the state must come from this model in its current dtype."
            )
        if tuple(state.mask.shape) != (batch_size, seq_len) or state.mask.dtype != torch.bool:
            raise ValueError(
                f"reuse_state.mask must be a bool tensor of shape {(batch_size, seq_len)}, got a {state.mask.dtype} "
                f"tensor of shape {tuple(state.mask.shape)}."
            )
        num_blocks = self.config.num_encoder_layers + self.config.num_decoder_layers
        if state.modulation is not None and (
            state.conditioning is None
            or tuple(state.modulation.shape) != (batch_size, num_blocks, 8 * self.config.hidden_size)
        ):
            raise ValueError(
                f"reuse_state.modulation has shape {tuple(state.modulation.shape)} (conditioning "
                f"{'missing' if state.conditioning is None else 'given'}), but this model needs "
                f"{(batch_size, num_blocks, 8 * self.config.hidden_size)} with its conditioning: the state must come "
                "from the same batch and model."
            )
        has_text = state.text_hidden_states is not None
        if has_text != (self.config.text_embed_dim is not None):
            raise ValueError(
                f"reuse_state does not fit this model: text hidden states are {'present' if has_text else 'missing'}."
            )
        if has_text and (
            state.text_hidden_states.shape[0] != batch_size
            or state.text_hidden_states.shape[2] != self.config.hidden_size
        ):
            raise ValueError(
                f"reuse_state.text_hidden_states has shape {tuple(state.text_hidden_states.shape)}, "
                f"expected ({batch_size}, text_sequence_length, {self.config.hidden_size})."
            )
