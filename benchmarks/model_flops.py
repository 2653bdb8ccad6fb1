"""Model FLOPs of a generation, counted analytically from the shapes that are actually computed.

What is counted is what `torch.utils.flop_counter.FlopCounterMode` counts (2 FLOPs per multiply-add of every
matmul, linear layer and attention product; norms, activations, lookups and sampling are not counted), so the two
can be cross-checked exactly (`tests/test_model_flops.py`). ENAT's shapes (paper §4):

* encoder blocks over the visible tokens only (text tokens are visible tokens); with reuse, only over the tokens
  revealed since the previous step, with `prev_proj(previous features)` as extra key/value context;
* decoder blocks over the [MASK] tokens, with every visible token as key/value context;
* the output head over every position; classifier-free guidance doubles every row of every step.

With `patch_size > 1` the blocks run on token groups (every count above counts groups, as the scheduler does), plus
the group embedding and output projections (`embed.patch_embed`, `proj_out`) over every group; the head still runs
over every token.

The vanilla NAT (`NATTransformer2DModel`, AutoNAT) runs every token (plus the condition tokens) through every block.
"""

import math
from typing import Callable, List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from enat_diffusers.schedulers.scheduling_masked_token import num_tokens_to_mask


def _block_flops(dim: int, mlp_dim: int, num_own: int, num_context: int) -> int:
    """One ENAT block (or, with `num_context=0` and no adaLN, a plain pre-LN block) for one row."""
    keys = num_own + num_context
    projections = 2 * dim * dim * (4 * num_own + 2 * num_context)  # q, k, v, out of the own tokens; context k, v
    attention = 4 * num_own * keys * dim  # q k^T and attn v
    feed_forward = 4 * num_own * dim * mlp_dim
    return projections + attention + feed_forward


def enat_forward_flops(
    config, num_visible: int, num_masked: int, num_new=None, num_text: int = 0, modulation: str = "all"
) -> int:
    """FLOPs of one `ENATTransformer2DModel` forward for one row.

    Args:
        config: the transformer's config.
        num_visible: visible image positions (tokens, or token groups with `patch_size > 1`).
        num_masked: [MASK] positions (the decoder's own).
        num_new: with a reuse state, how many of the visible tokens were revealed since it (the encoder runs over
            them; the other visible tokens and the text are context through `prev_proj`). `None`: no reuse state.
        num_text: text tokens (text-to-image models).
        modulation: which blocks' adaLN modulation this forward computes: `"all"` (ours, without a reuse state),
            `"none"` (ours with one: it takes the modulation from the state), `"running"` (the original code: every
            block that runs, at every step).
    """
    dim, codebook = config.hidden_size, config.codebook_size
    mlp_dim = int(dim * config.mlp_ratio)
    seq_len, patch = config.sample_size**2, config.get("patch_size", 1)
    flops = 0
    if patch > 1:  # group embedding and output projections over every group
        flops += 2 * 2 * seq_len * dim * dim  # (L / p**2 groups, p**2 D <-> D each)
    elif config.get("project_tokens", False):  # an ungrouped model's input projection, D -> D per token
        flops += 2 * seq_len * dim * dim
    if config.text_embed_dim is not None:
        flops += 2 * config.text_embed_dim * dim  # pooled text -> condition
    if num_new is None:
        if config.text_embed_dim is not None:
            flops += 2 * num_text * config.text_embed_dim * dim  # text tokens -> hidden size
        encoded, reused = num_visible + num_text, 0
    else:
        encoded, reused = num_new, num_visible - num_new + num_text
    flops += 2 * reused * dim * 4 * dim * 2  # prev_proj: a residual 4x MLP
    if modulation not in ("all", "none", "running"):
        raise ValueError(f"modulation must be 'all', 'none' or 'running', got {modulation!r}")
    block_modulation = 2 * dim * 8 * dim  # a block's adaLN shifts, scales and gates from the condition
    encoder_runs = encoded > 0  # (with nothing to encode, the encoder does not run)
    if modulation == "all" or (modulation == "running" and encoder_runs):
        flops += config.num_encoder_layers * block_modulation
    if modulation != "none":
        flops += config.num_decoder_layers * block_modulation
    if encoder_runs:
        flops += config.num_encoder_layers * _block_flops(dim, mlp_dim, encoded, reused)
    flops += config.num_decoder_layers * _block_flops(dim, mlp_dim, num_masked, reused + encoded)
    return flops + 2 * seq_len * dim * (dim + codebook)  # head: dense, then scores against the codebook table


def nat_forward_flops(config, num_text: int = 0) -> int:
    """FLOPs of one `NATTransformer2DModel` forward for one row: every token through every block. The condition
    tokens lead: the class token, or the pooled text token and `num_text` text tokens (text-to-image models)."""
    dim, codebook = config.hidden_size, config.codebook_size
    mlp_dim = int(dim * config.mlp_ratio)
    seq_len = config.sample_size**2
    flops, tokens = 0, seq_len + 1
    if config.get("text_embed_dim") is not None:
        flops += 2 * (1 + num_text) * config.text_embed_dim * dim  # pooled and token text embeddings -> hidden size
        tokens += num_text
    flops += (config.num_layers + 1) * _block_flops(dim, mlp_dim, tokens, 0)
    flops += (config.num_layers // 2) * 2 * tokens * 2 * dim * dim  # long-skip projections
    return flops + 2 * seq_len * dim * (dim + codebook)


def masked_counts(seq_len: int, step_mask_ratios: Sequence[float]) -> List[int]:
    """[MASK] tokens at the input of every step of a full generation (a scheduler's `step_mask_ratios`)."""
    return [seq_len] + [num_tokens_to_mask(seq_len, ratio) for ratio in step_mask_ratios[:-1]]


def generation_flops(
    transformer,
    step_mask_ratios: Sequence[float],
    guided: bool,
    reuse: bool,
    num_text: int = 0,
    modulation_every_step: bool = False,
):
    """Model FLOPs per image of a pipeline generation (`ENATPipeline`) with this schedule.

    Args:
        transformer: an `ENATTransformer2DModel` or a `NATTransformer2DModel`.
        step_mask_ratios: the scheduler's per-step mask ratios (after `set_timesteps`).
        guided: whether classifier-free guidance runs (the pipeline then doubles every step's batch).
        reuse: ENAT's feature reuse (ignored for a NAT).
        num_text: text tokens of a text-to-image model.
        modulation_every_step: the adaLN modulation at every step, as the original code computes it (this package
            computes it at the first step only when it reuses features).
    """
    config = transformer.config
    seq_len = config.sample_size**2 // config.get("patch_size", 1) ** 2  # the scheduler's units
    rows = 2 if guided else 1
    counts = masked_counts(seq_len, step_mask_ratios)
    if "num_encoder_layers" not in config:  # a NAT
        return rows * len(counts) * nat_forward_flops(config, num_text)
    total = 0
    for step, masked in enumerate(counts):
        new = counts[step - 1] - masked if reuse and step > 0 else None
        modulation = "running" if modulation_every_step else "all" if new is None else "none"
        total += enat_forward_flops(config, seq_len - masked, masked, new, num_text, modulation=modulation)
    return rows * total


def flop_counter() -> FlopCounterMode:
    """torch's `FlopCounterMode` (2 FLOPs per multiply-add), also counting the CPU attention kernel.

    torch counts the CUDA attention kernels but not the CPU one, so a formula for it is added (the same count as the
    two batched matmuls of a manual attention: 2*B*H*Nq*Nk*(Dh + Dv)).
    """

    def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        batch = math.prod(query_shape[:-2])
        (num_queries, head_dim), num_keys = query_shape[-2:], key_shape[-2]
        return 2 * batch * num_queries * num_keys * (head_dim + value_shape[-1])

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={cpu_attention: sdpa_flops})


def counted_flops(fn: Callable) -> int:
    """FLOPs of `fn()` as `flop_counter()` counts them."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()
