# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
Square groups of tokens of a token grid, for transformers with `patch_size > 1`.

Such a transformer gives one position to every `patch_size x patch_size` group of tokens, so a group is masked or
visible as a whole: the scheduler, the training masks and the editing masks work on groups. Sequences are in raster
order of the token grid; grouped tensors list the groups in raster order of the coarse grid, and each group's tokens
in raster order within the group. With `patch_size == 1` every function returns its input's layout unchanged.
"""

import math

import torch


def grid_side(seq_len: int) -> int:
    """The side of a square token grid of `seq_len` tokens, or a clear error."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"A token sequence of length {seq_len} is not a square grid.")
    return side


def check_patch_size(side: int, patch_size: int) -> int:
    """The side of the grid of groups, or a clear error when `patch_size` does not tile the `side` x `side` grid."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or side % patch_size:
        raise ValueError(
            f"patch_size must be a positive integer that divides the token grid's side {side}, got {patch_size!r}."
        )
    return side // patch_size


def group_tokens(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, L, *rest)` in raster order -> `(B, G, patch_size**2, *rest)`, `G = L / patch_size**2`."""
    if patch_size == 1:
        return x.unsqueeze(2)
    batch_size, rest = x.shape[0], x.shape[2:]
    groups = check_patch_size(grid_side(x.shape[1]), patch_size)
    x = x.reshape(batch_size, groups, patch_size, groups, patch_size, *rest).transpose(2, 3)
    return x.reshape(batch_size, groups * groups, patch_size * patch_size, *rest)


def ungroup_tokens(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The inverse of `group_tokens`: `(B, G, patch_size**2, *rest)` -> `(B, L, *rest)` in raster order."""
    if patch_size == 1:
        return x.squeeze(2)
    batch_size, rest = x.shape[0], x.shape[3:]
    groups = grid_side(x.shape[1])
    x = x.reshape(batch_size, groups, groups, patch_size, patch_size, *rest).transpose(2, 3)
    return x.reshape(batch_size, groups * groups * patch_size * patch_size, *rest)


def expand_group_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A per-group `(B, G)` mask as the per-token `(B, L)` mask in raster order."""
    if patch_size == 1:
        return mask
    return ungroup_tokens(mask.unsqueeze(2).expand(-1, -1, patch_size * patch_size), patch_size)


def group_mask(mask: torch.BoolTensor, patch_size: int, name: str = "mask") -> torch.BoolTensor:
    """A per-token `(B, L)` mask as its per-group `(B, G)` mask; an error when a group is partly masked."""
    if patch_size == 1:
        return mask
    grouped = group_tokens(mask, patch_size)
    any_masked, all_masked = grouped.any(-1), grouped.all(-1)
    if not torch.equal(any_masked, all_masked):
        raise ValueError(
            f"{name} masks part of a {patch_size}x{patch_size} token group: with patch_size {patch_size} every group "
            "is masked or visible as a whole."
        )
    return all_masked
