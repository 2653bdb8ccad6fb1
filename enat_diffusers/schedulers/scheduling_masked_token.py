# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Confidence-based masked-token sampling (MaskGIT family) with ENAT's schedule and AutoNAT's per-step strategies."""

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..utils.token_groups import expand_group_mask, group_mask, group_tokens


@dataclass
class MaskedTokenSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
            Token ids for the next step: the sampled ids with the least confident ones set back to [MASK].
        pred_original_sample (`torch.LongTensor`, same shape as `prev_sample`):
            The sampled ids with every masked position filled in; the final image tokens at the last step.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor


GeneratorType = Union[torch.Generator, List[torch.Generator], None]


def cosine_mask_ratio(progress: float) -> float:
    """ENAT/MaskGIT cosine schedule: fraction of tokens still masked after `progress` of the steps, in float64.

    (float32 `cos(pi/2)` is negative, which would re-mask all but one token at the last step.)
    """
    return math.cos(progress * math.pi / 2)


def num_tokens_to_mask(seq_len: int, mask_ratio: float) -> int:
    """How many tokens stay masked after a step: `floor(L * ratio)`, as in ENAT (no clamping)."""
    return math.floor(seq_len * mask_ratio)


def lowest_scores_mask(scores: torch.Tensor, num_lowest: int) -> torch.BoolTensor:
    """`True` at the `num_lowest` lowest-scoring positions of every row (ties broken by position)."""
    lowest = torch.sort(scores, dim=-1, stable=True).indices[:, :num_lowest]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)


def uniform_noise(shape: Tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    """U[0, 1) noise in float32. A list of generators draws row `i` from `generator[i]`, so that a batch gives the
    same numbers as its rows run one at a time."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"Got a list of {len(generator)} generators for a batch of {shape[0]}.")
        rows = [torch.rand(shape[1:], generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows)
    generator_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=generator_device).to(device)


def gumbel_noise(shape: Tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    uniform = uniform_noise(shape, generator, device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


def sample_categorical(log_probs: torch.Tensor, uniform: torch.Tensor) -> torch.LongTensor:
    """Inverse-CDF draw from `softmax(log_probs)` over the last dim, one uniform number per distribution.

    Token `k` owns the half-open interval `[cdf[k-1], cdf[k])`, so a token of probability 0 (an empty interval) is
    never drawn, not even for a uniform draw of exactly 0.
    """
    cdf = log_probs.softmax(dim=-1).cumsum(dim=-1)  # (..., K)
    total = cdf[..., -1]
    if not torch.isfinite(total).all():  # NaN or infinite log-probabilities: searchsorted would return the last id
        raise ValueError("The distribution to sample from is not finite (its log-probabilities hold NaN or inf).")
    target = (uniform * total).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=log_probs.shape[-1] - 1)


def edit_mask_counts(num_masked: int, mask_ratios: Sequence[float]) -> List[int]:
    """
    Tokens still masked after each step of a decoding that starts with `num_masked` masked tokens.

    `mask_ratios` are a scheduler's per-step ratios (`step_mask_ratios` after `set_timesteps(T)`, the last one 0).
    Step `k` keeps `floor(num_masked * mask_ratios[k])` masked (the schedule scaled to the masked tokens), clamped to
    `[T - 1 - k, previous - 1]` so that every step reveals at least one token and the last reveals the rest; this
    needs `T <= num_masked`. With `num_masked = L` and a strictly decreasing schedule the counts are ENAT's
    `floor(L * ratio)`.
    """
    steps = len(mask_ratios)
    if not 1 <= steps <= num_masked:
        raise ValueError(f"{num_masked} masked tokens take 1 to {num_masked} steps, got {steps}.")
    counts, previous = [], num_masked
    for k, ratio in enumerate(mask_ratios):
        count = max(min(math.floor(num_masked * float(ratio)), previous - 1), steps - 1 - k)
        counts.append(count)
        previous = count
    return counts


class MaskedTokenScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Iterative confidence-based decoding of VQ tokens (MaskGIT family), with ENAT's schedule by default.

    Each step samples every masked token, scores each sample by its log-probability plus annealed Gumbel noise, and
    re-masks the least confident tokens so that `floor(L * mask_ratio)` stay masked. Tokens that are visible are
    never re-masked. By default step `k` of `T` (with `r = (k + 1) / T`) uses

    * mask ratio `cos(r * pi / 2)` (computed in float64),
    * Gumbel temperature `mask_temperature * (1 - r)` on the confidence,
    * sampling temperature `max(sampling_temperature * (1 - r), 1e-3)`,
    * guidance scale `(k / T) * guidance_scale`, applied by the pipeline as `cond + s * (cond - uncond)` (so 0 means
      no guidance).

    A temperature of 0 is deterministic: argmax sampling, no Gumbel noise. Any of the four per-step quantities can
    instead be given explicitly, as AutoNAT's searched generation strategies do; the lists then fix the number of
    steps. With explicit `mask_ratios`, the number of tokens kept masked after step `k < T - 1` is AutoNAT's:
    `floor(L * ratio)` clamped to `[1, masked - 1]` (every step reveals a token, none but the last reveals all).

    A decoding that starts with only `M < L` tokens masked (inpainting, img2img, given start tokens) passes
    `num_masked=M` to `set_timesteps`: the schedule is then scaled to the masked tokens, `floor(M * ratio)` clamped so
    that every step reveals at least one (see `edit_mask_counts`). `M = L` is the rule above, unchanged.

    A non-finite distribution is refused (`ValueError`) rather than sampled: logits with NaN or inf, or a sampling or
    mask temperature whose product with them overflows.

    Args:
        mask_token_id (`int`, defaults to 1024): Id of the [MASK] token (the transformer's `codebook_size`).
        guidance_scale (`float`, defaults to 2.5): Final value of ENAT's linear guidance ramp.
        mask_temperature (`float`, defaults to 1.5): Initial Gumbel temperature of the confidence scores.
        sampling_temperature (`float`, defaults to 6.0): Initial temperature of token sampling.
        mask_ratios (`List[float]`, *optional*): Fraction of tokens still masked after each step but the last
            (`T - 1` non-increasing values; the last step reveals everything).
        mask_temperatures (`List[float]`, *optional*): Gumbel temperature of each step but the last (`T - 1` values).
        sampling_temperatures (`List[float]`, *optional*): Sampling temperature of each step (`T` values).
        guidance_scales (`List[float]`, *optional*): Guidance scale of each step (`T` values).
        beta_alpha (`float`, defaults to 12.0): `alpha` of the Beta distribution of training mask ratios.
        beta_beta (`float`, defaults to 3.0): `beta` of the Beta distribution of training mask ratios.
        patch_size (`int`, defaults to 1): The transformer's `patch_size`. Above 1, tokens are masked and revealed in
            `patch_size x patch_size` groups of the token grid (`enat_diffusers.utils.token_groups`): every count
            above (`L`, `M`, the tokens revealed per step) counts groups, a group's confidence is the sum of its
            sampled tokens' log-probabilities, and it gets one Gumbel draw.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        mask_token_id: int = 1024,
        # ENAT schedule
        guidance_scale: float = 2.5,
        mask_temperature: float = 1.5,
        sampling_temperature: float = 6.0,
        # explicit per-step strategy (AutoNAT)
        mask_ratios: Optional[List[float]] = None,
        mask_temperatures: Optional[List[float]] = None,
        sampling_temperatures: Optional[List[float]] = None,
        guidance_scales: Optional[List[float]] = None,
        # training mask ratio ~ Beta(alpha, beta)
        beta_alpha: float = 12.0,
        beta_beta: float = 3.0,
        # the transformer's token groups
        patch_size: int = 1,
    ):
        scalars = {
            "guidance_scale": guidance_scale,
            "mask_temperature": mask_temperature,
            "sampling_temperature": sampling_temperature,
        }
        lists = {
            "mask_ratios": mask_ratios,
            "mask_temperatures": mask_temperatures,
            "sampling_temperatures": sampling_temperatures,
            "guidance_scales": guidance_scales,
        }
        for name, value in [*scalars.items(), *lists.items()]:
            if value is not None:
                _check_non_negative(name, value if isinstance(value, list) else [value])
        if mask_ratios is not None and (
            any(r > 1 for r in mask_ratios) or any(b > a for a, b in zip(mask_ratios, mask_ratios[1:]))
        ):
            raise ValueError(f"mask_ratios must be non-increasing values in [0, 1], got {mask_ratios}.")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
        if beta_alpha <= 0 or beta_beta <= 0:
            raise ValueError(f"beta_alpha and beta_beta must be positive, got {beta_alpha}, {beta_beta}.")
        if len(_strategy_step_counts(lists)) > 1:
            raise ValueError(
                "The per-step lists disagree on the number of steps: mask_ratios and mask_temperatures need T - 1 "
                "values, sampling_temperatures and guidance_scales T values."
            )
        self.num_inference_steps = None
        self.num_masked = None
        self.timesteps = None

    @property
    def strategy_num_steps(self) -> Optional[int]:
        """The number of steps fixed by explicit per-step lists, or `None` for ENAT's schedule."""
        counts = _strategy_step_counts({name: self.config[name] for name in STEP_LISTS})
        return counts.pop() if counts else None

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: Union[str, torch.device, None] = None,
        guidance_scale: Optional[float] = None,
        mask_temperature: Optional[float] = None,
        sampling_temperature: Optional[float] = None,
        num_masked: Optional[int] = None,
    ):
        """
        Prepares the per-step schedule. `guidance_scale`, `mask_temperature` and `sampling_temperature` override the
        config values of ENAT's formulas; they cannot override an explicit per-step list.

        `num_masked` is the number of [MASK] tokens at the start when not every token is masked: the mask ratios then
        scale to them (`edit_mask_counts`; it needs `num_inference_steps <= num_masked`, counted in groups with
        `patch_size > 1`). `None`, or the sequence length, keeps the rule of a fully masked start.
        """
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}.")
        if num_masked is not None:
            if isinstance(num_masked, bool) or not isinstance(num_masked, int) or num_masked < 1:
                raise ValueError(f"num_masked must be a positive integer, got {num_masked!r}.")
            group = self.config.patch_size**2
            if num_masked % group:
                raise ValueError(
                    f"num_masked={num_masked} is not a whole number of {self.config.patch_size}x"
                    f"{self.config.patch_size} token groups (patch_size {self.config.patch_size})."
                )
            num_masked //= group
            if steps > num_masked:
                raise ValueError(
                    f"{num_masked} masked tokens take 1 to {num_masked} steps (each step reveals at least one), got "
                    f"num_inference_steps={steps}."
                )
        fixed = self.strategy_num_steps
        if fixed is not None and fixed != steps:
            raise ValueError(
                f"This scheduler's per-step strategy is for {fixed} steps, got num_inference_steps={steps}."
            )
        config = self.config
        overrides = {
            "guidance_scale": guidance_scale,
            "mask_temperature": mask_temperature,
            "sampling_temperature": sampling_temperature,
        }
        for name, value in overrides.items():
            if value is None:
                continue
            _check_non_negative(name, [value])
            if config[name + "s"] is not None:
                raise ValueError(
                    f"This scheduler has an explicit per-step `{name}s` list; `{name}` cannot override it."
                )
        guidance = config.guidance_scale if guidance_scale is None else guidance_scale
        mask_temp = config.mask_temperature if mask_temperature is None else mask_temperature
        samp_temp = config.sampling_temperature if sampling_temperature is None else sampling_temperature

        progress = [(k + 1) / steps for k in range(steps)]
        if config.mask_ratios is not None:
            self.step_mask_ratios = [float(r) for r in config.mask_ratios] + [0.0]
        else:
            self.step_mask_ratios = [cosine_mask_ratio(r) for r in progress]
        if config.mask_temperatures is not None:
            self.step_mask_temperatures = [float(t) for t in config.mask_temperatures] + [0.0]
        else:
            self.step_mask_temperatures = [mask_temp * (1 - r) for r in progress]
        if config.sampling_temperatures is not None:
            self.step_sampling_temperatures = [float(t) for t in config.sampling_temperatures]
        else:  # ENAT floors the annealed temperature at 1e-3; 0 stays 0 (argmax)
            self.step_sampling_temperatures = [
                max(samp_temp * (1 - r), 1e-3) if samp_temp > 0 else 0.0 for r in progress
            ]
        if config.guidance_scales is not None:
            self.step_guidance_scales = [float(s) for s in config.guidance_scales]
        else:  # step k uses the ratio of step k - 1: no guidance at the first step
            self.step_guidance_scales = [(k / steps) * guidance for k in range(steps)]

        self.num_masked = num_masked
        self._scaled_mask_counts = None if num_masked is None else edit_mask_counts(num_masked, self.step_mask_ratios)
        self.num_inference_steps = steps
        self.timesteps = torch.arange(steps, device=device)

    def guidance_scale_at(self, step_index: int, guidance_scale: Optional[float] = None) -> float:
        """
        The guidance scale of step `step_index` (`step_guidance_scales`), or, with `guidance_scale`, the scale that
        ENAT's ramp gives that step for this final value, `(k / T) * guidance_scale`: how a callback's change of
        `pipe._guidance_scale` (diffusers' CFG-cutoff pattern) reaches the later steps. An explicit per-step list
        can only be switched off (`guidance_scale=0`).
        """
        if guidance_scale is None:
            return self.step_guidance_scales[step_index]
        _check_non_negative("guidance_scale", [guidance_scale])
        if self.config.guidance_scales is not None and guidance_scale != 0:
            raise ValueError(
                "This scheduler has an explicit per-step `guidance_scales` list: a new guidance scale can only switch "
                f"guidance off (0), got {guidance_scale!r}."
            )
        return (step_index / self.num_inference_steps) * guidance_scale

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorType = None,
        return_dict: bool = True,
    ) -> Union[MaskedTokenSchedulerOutput, Tuple]:
        """
        One decoding step.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, sequence_length, codebook_size)`):
                The (guided) logits at every position.
            timestep (`int`): The step index, an entry of `self.timesteps`.
            sample (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
                The current token ids, [MASK] (`mask_token_id`) where unknown.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                Source of all randomness; a list gives one generator per row.
            return_dict (`bool`, defaults to `True`): Return a `MaskedTokenSchedulerOutput` instead of a tuple.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        step_index = int(timestep)
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"timestep {step_index} is outside [0, {self.num_inference_steps}).")
        batch_size = sample.shape[0]
        ids = sample.reshape(batch_size, -1)  # (B, L)
        seq_len = ids.shape[1]
        if model_output.ndim != 3 or model_output.shape[:2] != (batch_size, seq_len):
            raise ValueError(
                f"model_output must have shape ({batch_size}, {seq_len}, codebook_size), "
                f"got {tuple(model_output.shape)}."
            )

        # 1. Sample every position (visible ones keep their id).
        log_probs = torch.log_softmax(model_output.float(), dim=-1)  # (B, L, K)
        is_masked = ids == self.config.mask_token_id
        temperature = self.step_sampling_temperatures[step_index]
        if temperature > 0:
            uniform = uniform_noise(ids.shape, generator, ids.device)
            try:
                sampled = sample_categorical(log_probs / temperature, uniform)
            except ValueError:  # a non-finite distribution
                self._raise_not_finite(
                    model_output, step_index, f"log-probabilities / sampling temperature {temperature}"
                )
        else:
            sampled = log_probs.argmax(dim=-1)
        sampled = torch.where(is_masked, sampled, ids)  # (B, L)

        # 2. Confidence: log-prob of the sample plus annealed Gumbel noise; visible tokens are certain. With token
        #    groups, a group's confidence is its tokens' summed log-prob, and from here on the units are groups.
        confidence = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        patch_size = self.config.patch_size
        if patch_size > 1:
            is_masked = group_mask(is_masked, patch_size, "sample")  # (B, G)
            confidence = group_tokens(confidence, patch_size).sum(-1)
        seq_len = is_masked.shape[1]
        confidence = torch.where(is_masked, confidence, torch.inf)
        mask_temperature = self.step_mask_temperatures[step_index]
        if mask_temperature > 0:
            confidence = confidence + mask_temperature * gumbel_noise(is_masked.shape, generator, ids.device)
        if not torch.isfinite(torch.where(is_masked, confidence, 0.0)).all():  # (B, L) or (B, G): one cheap check
            self._raise_not_finite(model_output, step_index, f"mask_temperature {mask_temperature} * Gumbel noise")

        # 3. Re-mask the least confident sampled tokens. With an explicit strategy (AutoNAT), every step but the last
        #    reveals at least one token and keeps at least one masked, as AutoNAT clamps its count. A partly masked
        #    start (`num_masked` < L) follows the schedule scaled to its masked tokens.
        if self.num_masked is not None and self.num_masked != seq_len:
            if step_index == 0 and self.num_inference_steps > 1 and int(is_masked[0].sum()) != self.num_masked:
                raise ValueError(
                    f"set_timesteps(num_masked={self.num_masked * patch_size**2}) but the first step's sample has "
                    f"{int(is_masked[0].sum()) * patch_size**2} masked tokens per row."
                )
            num_masked = self._scaled_mask_counts[step_index]
        else:
            num_masked = num_tokens_to_mask(seq_len, self.step_mask_ratios[step_index])
            if self.config.mask_ratios is not None and step_index < self.num_inference_steps - 1:
                num_masked = max(1, min(int(is_masked[0].sum()) - 1, num_masked))
        remask = expand_group_mask(lowest_scores_mask(confidence, num_masked) & is_masked, patch_size)
        prev_sample = torch.where(remask, self.config.mask_token_id, sampled)

        prev_sample, sampled = prev_sample.reshape(sample.shape), sampled.reshape(sample.shape)
        if not return_dict:
            return (prev_sample, sampled)
        return MaskedTokenSchedulerOutput(prev_sample=prev_sample, pred_original_sample=sampled)

    @staticmethod
    def _raise_not_finite(model_output: torch.Tensor, step_index: int, product: str):
        """A clear error naming the cause: the logits themselves, or their product with a temperature."""
        if not torch.isfinite(model_output).all():
            raise ValueError(f"Step {step_index}: the logits are not finite (NaN or inf in model_output).")
        raise ValueError(
            f"Step {step_index}: {product} is not finite: the temperature overflows with these logits; use a value "
            "closer to 1."
        )

    def sample_mask_ratio(self, generator: Optional[torch.Generator] = None) -> float:
        """A training mask ratio from Beta(beta_alpha, beta_beta), seeded from `generator`."""
        generator_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator_device))
        return random.Random(seed).betavariate(self.config.beta_alpha, self.config.beta_beta)

    def add_noise(
        self,
        sample: torch.LongTensor,
        generator: Optional[torch.Generator] = None,
        mask_ratio: Optional[float] = None,
    ) -> torch.LongTensor:
        """
        Training-time masking (ENAT): one mask ratio for the whole batch (drawn from Beta(alpha, beta) unless
        `mask_ratio` is given), `round(L * ratio)` tokens clamped to `[1, L - 1]` masked at random in every row. Every
        row gets the same count, as the transformer requires. With `patch_size > 1`, `L` counts token groups, and a
        group is masked as a whole.

        Args:
            sample (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, height, width)`):
                Clean token ids.
            generator (`torch.Generator`, *optional*): Source of the ratio and the positions.
            mask_ratio (`float`, *optional*): Use this ratio instead of drawing one.

        Returns:
            `torch.LongTensor` of the shape of `sample`, with [MASK] at the masked positions.
        """
        batch_size = sample.shape[0]
        ids = sample.reshape(batch_size, -1)
        patch_size = self.config.patch_size
        seq_len = ids.shape[1] // patch_size**2
        if seq_len < 2:
            raise ValueError("add_noise needs at least 2 tokens (token groups) per sample.")
        ratio = self.sample_mask_ratio(generator) if mask_ratio is None else float(mask_ratio)
        count = min(max(round(seq_len * ratio), 1), seq_len - 1)
        masked = lowest_scores_mask(uniform_noise((batch_size, seq_len), generator, ids.device), count)
        masked = expand_group_mask(masked, patch_size)
        return torch.where(masked, self.config.mask_token_id, ids).reshape(sample.shape)


# per-step lists of the config -> how many steps have no entry (the last step re-masks nothing)
STEP_LISTS = {"mask_ratios": 1, "mask_temperatures": 1, "sampling_temperatures": 0, "guidance_scales": 0}


def _strategy_step_counts(lists: dict) -> set:
    return {len(values) + STEP_LISTS[name] for name, values in lists.items() if values is not None}


def _check_non_negative(name, values):
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{name} must be finite non-negative numbers, got {values}.")
