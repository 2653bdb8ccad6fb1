# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ENATPipeline: class-conditional and text-to-image generation with ENAT."""

import difflib
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..models.transformer_enat import ENATTransformer2DModel
from ..models.transformer_nat import NATTransformer2DModel
from ..schedulers.scheduling_masked_token import MaskedTokenScheduler
from ..utils.token_groups import expand_group_mask


logger = logging.get_logger(__name__)

DEFAULT_NUM_INFERENCE_STEPS = 8
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Written into every saved pipeline folder: `DiffusionPipeline.from_pretrained(folder, custom_pipeline=<this file>,
# trust_remote_code=True)` then resolves to the installed class (diffusers looks plain class names up only in itself).
PIPELINE_SHIM = "pipeline.py"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from enat_diffusers import ENATPipeline

        >>> pipe = ENATPipeline.from_pretrained("pretrained/enat-shapes")  # a folder or a hub id
        >>> image = pipe("a large red circle on the left and a small blue square on the right").images[0]

        >>> # class-conditional pipelines (converted ImageNet checkpoints) take class names or ids
        >>> # image = pipe("golden retriever", generator=torch.Generator().manual_seed(0)).images[0]
        >>> # image = pipe(class_labels=[207], guidance_scale=2.5).images[0]
        ```
"""


class ENATLoraLoaderMixin(SanaLoraLoaderMixin):
    r"""
    `load_lora_weights`, `save_lora_weights`, `fuse_lora`, `unfuse_lora` for pipelines whose only LoRA-loadable
    component is the `transformer` (diffusers' transformer-only LoRA loader; the adapters are PEFT adapters of
    [`ENATTransformer2DModel`], targeting e.g. `to_q`, `to_k`, `to_v`, `to_out.0`, `add_k_proj`, `add_v_proj`).
    """


class ENATPipeline(DiffusionPipeline, ENATLoraLoaderMixin):
    r"""
    Image generation with ENAT (or AutoNAT): start from an all-[MASK] token grid, predict every masked token, keep
    the most confident predictions, repeat; then decode the tokens with the VQ model.

    Class-conditional pipelines (the converted ImageNet checkpoints) take class names (`pipe("golden retriever")`) or
    ids (`pipe(class_labels=[207])`); text-to-image pipelines take prompts (`pipe("a red bus")`).

    Args:
        transformer ([`ENATTransformer2DModel`] or [`NATTransformer2DModel`]): Predicts token logits. ENAT reuses
            features between steps; AutoNAT's NAT recomputes every token at every step.
        scheduler ([`MaskedTokenScheduler`]): Sampling schedule and re-masking.
        vqvae ([`VQModel`]): Decodes token ids to images in [0, 1]; needs `lookup_from_codebook=True`.
        text_encoder ([`CLIPTextModel`] or [`CLIPTextModelWithProjection`], *optional*): Text encoder of
            text-to-image models: its last hidden states are the text tokens, its pooled (or projected pooled)
            output the adaLN condition.
        tokenizer ([`CLIPTokenizer`], *optional*): Tokenizer of the text encoder.
        id2label (`Dict[int, str]`, *optional*): Class names of class-conditional models, stored in
            `model_index.json`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(
        self,
        transformer: Union[ENATTransformer2DModel, NATTransformer2DModel],
        scheduler: MaskedTokenScheduler,
        vqvae: VQModel,
        text_encoder: Optional[Union[CLIPTextModel, CLIPTextModelWithProjection]] = None,
        tokenizer: Optional[CLIPTokenizer] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,  # JSON (model_index.json) keys are strings
    ):
        super().__init__()
        check_components(transformer, scheduler, vqvae)
        if tokenizer is not None and len(tokenizer) <= 2:
            raise ValueError(
                f"The tokenizer has only {len(tokenizer)} tokens: its files are missing or empty (a pipeline folder "
                "without a complete `tokenizer/` subfolder loads like this)."
            )
        if tokenizer is not None and text_encoder is not None:
            max_positions = text_encoder.config.max_position_embeddings
            if tokenizer.model_max_length > max_positions:
                raise ValueError(
                    f"tokenizer.model_max_length is {tokenizer.model_max_length} but the text encoder has only "
                    f"{max_positions} positions; is tokenizer_config.json missing `model_max_length`?"
                )
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self._interrupt = False
        self._attention_kwargs = None
        self.labels = {}  # lower-case name -> ids
        for key, value in (id2label or {}).items():
            self.labels.setdefault(value.strip().lower(), []).append(key)
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1) if vqvae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False)

    @property
    def is_text_to_image(self) -> bool:
        return self.transformer.config.get("text_embed_dim") is not None

    def get_label_ids(self, label: Union[str, List[str]]) -> List[int]:
        """Maps class names (case-insensitive, as in `id2label`) to class ids."""
        if not self.labels:
            raise ValueError("This pipeline has no class names (`id2label`); pass `class_labels` ids instead.")
        ids = []
        for name in [label] if isinstance(label, str) else label:
            matches = self.labels.get(name.strip().lower())
            if matches is None:
                close = difflib.get_close_matches(name.strip().lower(), list(self.labels), n=5, cutoff=0.6)
                hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"{name!r} is not a class name of this model.{hint}")
            if len(matches) > 1:
                raise ValueError(f"{name!r} names several classes {matches}; pass one of them as `class_labels`.")
            ids.append(matches[0])
        return ids

    # ------------------------------------------------------------------------------------------------ conditions

    def _encode_text(self, texts: List[str], device) -> (torch.Tensor, torch.Tensor):
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "This pipeline has no tokenizer/text_encoder: pass `prompt_embeds` and "
                "`pooled_prompt_embeds` (and their negative counterparts) instead of text."
            )
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        for text, ids in zip(texts, self.tokenizer(texts, verbose=False).input_ids):
            if len(ids) > max_length:
                words = text.split()
                start = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
                logger.warning(
                    f"A prompt is {len(ids)} tokens long but the text encoder takes {max_length}: its last "
                    f"{len(ids) - max_length} tokens were cut off (prompt: {start!r})."
                )
        output = self.text_encoder(tokens.input_ids.to(device))
        # CLIPTextModelWithProjection pools into `text_embeds`, CLIPTextModel into `pooler_output`
        pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
        return output.last_hidden_state, pooled

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        device: Optional[torch.device] = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
    ):
        """
        Text embeddings for text-to-image models, each repeated `num_images_per_prompt` times.

        Returns:
            `(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)`, the
            negative ones `None` without classifier-free guidance. Token embeddings have shape
            `(batch_size * num_images_per_prompt, text_sequence_length, text_embed_dim)`, pooled ones
            `(batch_size * num_images_per_prompt, text_embed_dim)`. The unconditional text is the empty prompt.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            if pooled_prompt_embeds is not None:
                raise ValueError(
                    "`pooled_prompt_embeds` needs `prompt_embeds`: with a text prompt both are encoded from it, and "
                    "the given pooled embeddings would be ignored."
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = self._encode_text(prompts, device)
            check_finite("the text encoder's embeddings of the prompt", prompt_embeds, pooled_prompt_embeds)
        elif pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too.")
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_pooled_prompt_embeds is not None:
                raise ValueError(
                    "`negative_pooled_prompt_embeds` needs `negative_prompt_embeds`: without them the negative prompt "
                    '(or "") is encoded, and the given pooled embeddings would be ignored.'
                )
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * batch_size if isinstance(negative, str) else list(negative)
            if len(negatives) != batch_size:
                raise ValueError(
                    f"Got {len(negatives)} negative prompts for {batch_size} prompts; pass one, or one per prompt."
                )
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_text(negatives, device)
            check_finite(
                "the text encoder's embeddings of the negative prompt",
                negative_prompt_embeds,
                negative_pooled_prompt_embeds,
            )
        elif do_classifier_free_guidance and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too.")
        if pooled_prompt_embeds.shape[0] != batch_size:
            raise ValueError(
                f"Got {batch_size} prompt_embeds but {pooled_prompt_embeds.shape[0]} pooled_prompt_embeds."
            )
        if do_classifier_free_guidance and (
            negative_prompt_embeds.shape != prompt_embeds.shape
            or negative_pooled_prompt_embeds.shape != pooled_prompt_embeds.shape
        ):
            raise ValueError(
                "The negative text embeddings must have the shapes of the prompt's: got "
                f"{tuple(negative_prompt_embeds.shape)} and {tuple(negative_pooled_prompt_embeds.shape)} for "
                f"{tuple(prompt_embeds.shape)} and {tuple(pooled_prompt_embeds.shape)}."
            )

        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device).repeat_interleave(
                num_images_per_prompt, dim=0
            )
        else:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds

    # ------------------------------------------------------------------------------------------------------ checks

    def check_inputs(
        self,
        *,
        prompt,
        class_labels,
        negative_prompt,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        height,
        width,
        num_inference_steps,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
        guidance_scale=None,
        mask_temperature=None,
        sampling_temperature=None,
        generator=None,
        negative_pooled_prompt_embeds=None,
        reuse_features=None,
        return_dict=True,
        callback_on_step_end=None,
        attention_kwargs=None,
    ):
        check_prompt(prompt, "prompt")
        check_prompt(negative_prompt, "negative_prompt")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                "callback_on_step_end must be a function `(pipe, step, timestep, callback_kwargs) -> dict`, a "
                f"PipelineCallback or MultiPipelineCallbacks, got {type(callback_on_step_end).__name__}."
            )
        for name, value in (("reuse_features", reuse_features), ("return_dict", return_dict)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
        check_attention_kwargs(attention_kwargs)
        for name, value in (
            ("guidance_scale", guidance_scale),
            ("mask_temperature", mask_temperature),
            ("sampling_temperature", sampling_temperature),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")
        if isinstance(generator, list):
            if not generator:
                raise TypeError(
                    "generator is an empty list: pass one torch.Generator per image, one for all, or None."
                )
            for index, item in enumerate(generator):
                if not isinstance(item, torch.Generator):
                    raise TypeError(
                        f"generator[{index}] is {type(item).__name__}, not a torch.Generator: a list of generators "
                        "needs one generator for every image."
                    )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or a list of them (one per image), got {generator!r}."
            )
        for name, value in (
            ("prompt_embeds", prompt_embeds),
            ("pooled_prompt_embeds", pooled_prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
        ):
            if value is not None and (not isinstance(value, torch.Tensor) or not value.is_floating_point()):
                raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}.")
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or infinite values.")
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("This is a text-to-image pipeline: pass `prompt`, not `class_labels`.")
            if (prompt is None) == (prompt_embeds is None):
                raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
            if prompt_embeds is not None and pooled_prompt_embeds is None:
                raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too.")
            if prompt_embeds is None and pooled_prompt_embeds is not None:
                raise ValueError(
                    "`pooled_prompt_embeds` needs `prompt_embeds`: with a text prompt both are encoded from it, and "
                    "the given pooled embeddings would be ignored."
                )
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
            if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too.")
            if negative_prompt_embeds is None and negative_pooled_prompt_embeds is not None:
                raise ValueError(
                    "`negative_pooled_prompt_embeds` needs `negative_prompt_embeds`: without them the negative prompt "
                    '(or "") is encoded, and the given pooled embeddings would be ignored.'
                )
        else:
            if (prompt is None) == (class_labels is None):
                raise ValueError(
                    "This is a class-conditional pipeline: pass exactly one of `prompt` (class names) "
                    "and `class_labels` (class ids)."
                )
            text_inputs = {
                "negative_prompt": negative_prompt,
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled_prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
                "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            }
            given = [name for name, value in text_inputs.items() if value is not None]
            if given:
                raise ValueError(
                    f"This is a class-conditional pipeline; it takes no text inputs ({', '.join(given)}). "
                    "Its unconditional branch is the null class."
                )
        side = self.transformer.config.sample_size
        expected = side * self.vae_scale_factor
        if (height or expected) != expected or (width or expected) != expected:
            raise ValueError(
                f"This model generates {expected}x{expected} images (a {side}x{side} token grid with a "
                f"{self.vae_scale_factor}x VQ decoder); got height={height}, width={width}."
            )
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= side * side
        ):
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {side * side}] (the number of tokens), "
                f"got {num_inference_steps!r}."
            )
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}."
            )

    def _class_labels(self, prompt, class_labels, device) -> torch.LongTensor:
        if prompt is not None:
            labels = self.get_label_ids(prompt)
        elif isinstance(class_labels, torch.Tensor):
            if class_labels.ndim > 1 or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise ValueError(
                    "class_labels must be a 0-d or 1-d integer tensor, got a "
                    f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}."
                )
            labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (list, tuple, np.ndarray)):
            labels = (
                list(np.asarray(class_labels).reshape(-1))
                if isinstance(class_labels, np.ndarray)
                else list(class_labels)
            )
        else:
            labels = [class_labels]
        if not labels:
            raise ValueError("class_labels is empty: pass at least one class id.")
        num_classes = self.transformer.config.num_classes
        for label in labels:
            is_int = isinstance(label, (numbers.Integral, np.integer)) and not isinstance(label, (bool, np.bool_))
            if not is_int or not 0 <= label < num_classes:
                raise ValueError(f"class_labels entry {label!r} is not a class id in [0, {num_classes - 1}].")
        return torch.tensor([int(label) for label in labels], dtype=torch.long, device=device)

    # -------------------------------------------------------------------------------------------------- properties

    @property
    def guidance_scale(self) -> float:
        """The final guidance scale of this call's schedule (ENAT ramps it linearly from 0)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether any step of this call is guided (then cond and uncond run as one doubled batch)."""
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a callback to stop: the tokens that no step revealed are filled with the
        last step's predictions, the rest stays as the callback left it (see `sample_tokens`)."""
        return self._interrupt

    @property
    def attention_kwargs(self) -> Optional[Dict[str, Any]]:
        """This call's `attention_kwargs` (`{"scale": s}` sets the scale of loaded LoRA adapters)."""
        return self._attention_kwargs

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """`DiffusionPipeline.save_pretrained`, plus a one-line `pipeline.py` that lets plain
        `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder/pipeline.py, trust_remote_code=True)` load
        the folder with the installed `enat_diffusers`."""
        super().save_pretrained(save_directory, **kwargs)
        shim = f"from {type(self).__module__.split('.')[0]} import {type(self).__name__}  # noqa: F401\n"
        (Path(save_directory) / PIPELINE_SHIM).write_text(shim)

    # ---------------------------------------------------------------------------------------------------- sampling

    def sample_tokens(
        self,
        latents: torch.LongTensor,
        model_kwargs: Dict[str, Any],
        generator=None,
        reuse_features: Optional[bool] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
    ) -> torch.LongTensor:
        """
        The decoding loop shared by the generation and editing pipelines: runs the scheduler's steps from `latents`
        (`(B, L)` ids, [MASK] where unknown) and returns `(B, L)` ids without [MASK]. `set_timesteps` must have run
        (`prepare_timesteps`); `model_kwargs` hold the condition, already doubled (cond first) when guidance is on.
        `reuse_features=None` reuses when the transformer can (ENAT, not NAT).

        The callback contract (`callback_on_step_end`, after every step):

        * It may change the ids, by returning `{"latents": ids}` or by editing `callback_kwargs["latents"]` in place:
          reveal, change or re-mask tokens (the same number of [MASK] in every image). Edits are found by comparing
          with a copy taken before the call. When an edit touches a token that the reuse state has already encoded
          (one visible at the step's input), the state is dropped and the next step re-encodes every visible token;
          edits of other tokens keep it.
        * Setting `pipe._guidance_scale` changes the guidance of the following steps (`scheduler.guidance_scale_at`);
          0 switches it off and drops the unconditional batch (diffusers' CFG-cutoff pattern). Guidance that was off
          at the start cannot be switched on.
        * Setting `pipe._interrupt = True` stops: tokens that no step revealed get the last step's predictions
          (`pred_original_sample`, as the callback left it); everything else stays as the callback left it.
        * Tokens still masked at the end that have no prediction (re-masked by the callback after the last step, or
          before an interrupt) get one final step, as the last step of the schedule: old ids are never put back.
        """
        reuse_features = self.check_reuse_features(reuse_features)
        mask_token_id = self.transformer.mask_token_id
        timesteps = self.scheduler.timesteps
        start_guidance = self._guidance_scale
        reuse_state = None
        predicted = latents
        unrevealed = torch.zeros_like(latents, dtype=torch.bool)  # [MASK] in the last scheduler output

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                scale, model_kwargs, reuse_state = self._step_guidance(i, start_guidance, model_kwargs, reuse_state)
                latents, predicted, reuse_state = self._denoise_step(
                    i, t, latents, model_kwargs, reuse_state, scale, generator
                )
                reuse_state = reuse_state if reuse_features else None
                unrevealed = latents == mask_token_id
                if callback_on_step_end is not None:
                    latents, predicted, reuse_state = self._run_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, predicted, reuse_state
                    )
                progress_bar.update()

        if self.interrupt:  # what no step revealed gets the last predictions; the callback's edits stay
            latents = torch.where(unrevealed & (latents == mask_token_id), predicted, latents)
        if (latents == mask_token_id).any():  # re-masked by the callback: one final step
            last = len(timesteps) - 1
            scale, model_kwargs, reuse_state = self._step_guidance(last, start_guidance, model_kwargs, reuse_state)
            latents, _, _ = self._denoise_step(
                last, timesteps[-1], latents, model_kwargs, reuse_state, scale, generator
            )
        return latents

    def _step_guidance(self, index: int, start_guidance: float, model_kwargs, reuse_state):
        """The guidance scale of step `index`: the scheduler's, unless a callback changed `pipe._guidance_scale`
        since the start; switched off, the unconditional rows are dropped from the condition and the reuse state."""
        guidance = self._guidance_scale
        if guidance == start_guidance:
            return self.scheduler.step_guidance_scales[index], model_kwargs, reuse_state
        scale = self.scheduler.guidance_scale_at(index, guidance)
        if not self._do_classifier_free_guidance:
            if guidance != 0:
                raise ValueError(
                    f"A callback set the guidance scale to {guidance}, but guidance was off at the start of this call "
                    "(no unconditional branch was prepared): a callback can lower or switch off guidance, not switch "
                    "it on."
                )
            return 0.0, model_kwargs, reuse_state
        if guidance == 0:  # off for the rest of the call: the conditional rows only
            self._do_classifier_free_guidance = False
            rows = next(iter(model_kwargs.values())).shape[0] // 2
            model_kwargs = {name: value[:rows] for name, value in model_kwargs.items()}
            if reuse_state is not None:
                reuse_state = type(reuse_state)(
                    **{name: value[:rows] if torch.is_tensor(value) else value for name, value in reuse_state.items()}
                )
        return scale, model_kwargs, reuse_state

    def _denoise_step(self, index, timestep, latents, model_kwargs, reuse_state, scale: float, generator):
        """One forward (cond and uncond as one batch with guidance), the guided logits, checked, and the scheduler's
        step; returns `(prev_sample, pred_original_sample, reuse_state)`."""
        do_cfg = self._do_classifier_free_guidance
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        logits, *state = self.transformer(
            model_input,
            reuse_state=reuse_state,
            return_dict=False,
            attention_kwargs=self._attention_kwargs,
            **model_kwargs,
        )
        state = state[0] if state else None  # a NAT keeps no state
        raw = logits = logits.float()
        if do_cfg:
            cond, uncond = logits.chunk(2)
            logits = cond + scale * (cond - uncond)
        if not torch.isfinite(logits).all():  # one check per step: never sample from NaN
            if not torch.isfinite(raw).all():
                raise ValueError(
                    f"Step {index}: the logits are not finite (NaN or inf in the transformer's output): check the "
                    "model's weights and inputs."
                )
            raise ValueError(
                f"Step {index}: the guidance overflowed: guidance scale {scale:g} times (cond - uncond) is not "
                "finite; use a smaller guidance_scale."
            )
        output = self.scheduler.step(logits, timestep, latents, generator=generator)
        return output.prev_sample, output.pred_original_sample, state

    def _run_callback(self, callback, tensor_inputs, step, timestep, latents, predicted, reuse_state):
        """Calls `callback_on_step_end` and applies its edits (see `sample_tokens`); returns `(latents, predicted,
        reuse_state)`."""
        before = latents.clone()  # in-place edits are found against this copy
        tensors = {"latents": latents, "pred_original_sample": predicted}
        outputs = callback(self, step, timestep, {name: tensors[name] for name in tensor_inputs})
        if outputs is not None and not isinstance(outputs, dict):
            raise TypeError(
                "callback_on_step_end must return a dict (e.g. {'latents': ids}) or None, got "
                f"{type(outputs).__name__}."
            )
        outputs = outputs or {}
        latents = self._check_token_ids(outputs.get("latents", latents), before, "`latents` from callback_on_step_end")
        if "pred_original_sample" in outputs:
            what = "`pred_original_sample` from callback_on_step_end"
            predicted = self._check_token_ids(outputs["pred_original_sample"], before, what)
            if (predicted == self.transformer.mask_token_id).any():
                raise ValueError(f"{what} holds [MASK]: it holds the predicted ids that fill the masked tokens.")
        if reuse_state is not None:
            # tokens the state holds features of (its mask is per position: per token group with patch_size > 1)
            encoded = ~expand_group_mask(reuse_state.mask[: before.shape[0]], self.token_patch_size)
            if (encoded & (latents != before)).any():
                logger.info(f"step {step}: the callback changed encoded tokens; the next step re-encodes all")
                reuse_state = None
        return latents, predicted, reuse_state

    def check_reuse_features(self, reuse_features: Optional[bool]) -> bool:
        """`None` -> whether the transformer supports feature reuse; `True` for a transformer without it is an
        error."""
        supported = self.transformer.supports_reuse
        if reuse_features is None:
            return supported
        if not isinstance(reuse_features, bool):
            raise TypeError(f"reuse_features must be True, False or None, got {reuse_features!r}.")
        if reuse_features and not supported:
            raise ValueError(
                f"reuse_features=True, but {type(self.transformer).__name__} has no feature reuse (a NAT recomputes "
                "every token at every step); pass reuse_features=False or leave it unset."
            )
        return bool(reuse_features)

    def _check_token_ids(self, new_latents, latents, what: str) -> torch.LongTensor:
        """`new_latents` as `(B, L)` ids like `latents`, or a clear error; `what` names them in the message."""
        if not isinstance(new_latents, torch.Tensor) or new_latents.dtype not in (torch.int64, torch.int32):
            found = type(new_latents).__name__ if not isinstance(new_latents, torch.Tensor) else str(new_latents.dtype)
            raise TypeError(f"{what} must be an integer torch.Tensor of token ids, got {found}.")
        if new_latents.numel() != latents.numel() or new_latents.shape[0] != latents.shape[0]:
            raise ValueError(
                f"{what} has shape {tuple(new_latents.shape)}; expected {tuple(latents.shape)} (or the grid shape)."
            )
        new_latents = new_latents.to(device=latents.device, dtype=torch.long).reshape(latents.shape)
        mask_token_id = self.transformer.mask_token_id
        if ((new_latents < 0) | (new_latents > mask_token_id)).any():
            raise ValueError(f"{what} has ids outside [0, {mask_token_id}] ([MASK] = {mask_token_id}).")
        num_masked = (new_latents == mask_token_id).sum(1)
        if (num_masked != num_masked[0]).any():
            raise ValueError(
                f"{what} has different numbers of [MASK] tokens per image ({num_masked.tolist()}); ENAT needs the "
                "same number in every image."
            )
        return new_latents

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        class_labels: Union[int, List[int], torch.LongTensor, None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.LongTensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        mask_temperature: Optional[float] = None,
        sampling_temperature: Optional[float] = None,
        reuse_features: Optional[bool] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        attention_kwargs: Optional[Dict[str, Any]] = None,
    ):
        r"""
        Generates images.

        **Guidance follows ENAT, not diffusers' usual convention:** the guided logits are `cond + s * (cond - uncond)`,
        so `guidance_scale=0` means *no* guidance (and no unconditional pass), and `s` ramps linearly from 0 at the
        first step towards `guidance_scale` at the last (step `k` of `T` uses `(k / T) * guidance_scale`).

        Args:
            prompt (`str` or `List[str]`, *optional*):
                Text prompts (text-to-image pipelines) or class names (class-conditional pipelines, see `id2label`).
            class_labels (`int`, `List[int]` or `torch.LongTensor`, *optional*):
                Class ids, for class-conditional pipelines instead of `prompt`.
            height (`int`, *optional*):
                Must equal the model's size (token grid side times the VQ model's downsampling factor), the default.
            width (`int`, *optional*):
                Must equal the model's size, the default.
            num_inference_steps (`int`, *optional*, defaults to 8):
                Decoding steps; fixed by the scheduler's per-step strategy if it has one.
            guidance_scale (`float`, *optional*):
                Final value of ENAT's guidance ramp (see above; 0 disables guidance). Defaults to the scheduler's
                config (the released setting for converted models).
            negative_prompt (`str` or `List[str]`, *optional*):
                Text for the unconditional branch (text-to-image); one string serves every prompt. Defaults to "".
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt or class; the images of one prompt are consecutive in the output.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                Source of all randomness. A list gives one generator per image, so that an image does not depend on
                the rest of the batch.
            latents (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Token ids to start from, [MASK] where unknown (the same number `M > 0` of [MASK] in every image);
                all-[MASK] by default. Given tokens are kept; `min(num_inference_steps, M)` steps run, with the
                schedule scaled to the `M` masked tokens (`scheduler.set_timesteps(..., num_masked=M)`).
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed text token embeddings `(batch_size, text_sequence_length, text_embed_dim)`.
            pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed pooled text embeddings `(batch_size, text_embed_dim)`; needed with `prompt_embeds`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed token embeddings of the unconditional branch.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed pooled embeddings of the unconditional branch.
            mask_temperature (`float`, *optional*):
                Initial Gumbel temperature of the re-masking confidence, annealed to 0; randomises which tokens are
                kept. 0 is deterministic. Defaults to the scheduler's config.
            sampling_temperature (`float`, *optional*):
                Initial temperature of token sampling, annealed to 1e-3; 0 means argmax. Defaults to the scheduler's
                config.
            reuse_features (`bool`, *optional*):
                ENAT's temporal reuse: each step encodes only the tokens revealed since the previous step. `False`
                re-encodes every visible token at every step. Defaults to `True` for ENAT; a NAT
                ([`NATTransformer2DModel`]) has no reuse (`True` is an error).
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` (`(B, 3, H, W)` in [0, 1]) or `"latent"` (token ids `(B, h, w)`).
            return_dict (`bool`, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called as `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after every step. It may
                change the ids of the next step, returned as `{"latents": ids}` or edited in place: reveal, change or
                re-mask tokens (the same number of [MASK] in every image). Edits of already-encoded tokens drop the
                reuse state for one step, so that they always reach the model. `pipe._guidance_scale = 0` switches
                guidance off for the following steps; `pipe._interrupt = True` stops (see `sample_tokens`).
            callback_on_step_end_tensor_inputs (`List[str]`, defaults to `["latents"]`):
                Tensors passed to the callback; taken from the callback itself for `PipelineCallback`s.
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}` scales the loaded LoRA adapters of the transformer for this call (0 turns them off).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        num_inference_steps, callback_on_step_end_tensor_inputs = self.resolve_defaults(
            num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self.check_inputs(
            prompt=prompt,
            class_labels=class_labels,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            guidance_scale=guidance_scale,
            mask_temperature=mask_temperature,
            sampling_temperature=sampling_temperature,
            generator=generator,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            reuse_features=reuse_features,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            attention_kwargs=attention_kwargs,
        )
        device = self._execution_device
        side = self.transformer.config.sample_size
        if latents is not None:
            latents = self._check_start_latents(latents)
        num_masked = side * side if latents is None else int((latents[0] == self.transformer.mask_token_id).sum())
        if num_masked == 0:
            raise ValueError("latents has no [MASK] token: there is nothing to generate.")

        # 1. Schedule for the masked tokens (validates the sampling parameters; decides whether guidance runs).
        self.prepare_timesteps(
            num_masked, num_inference_steps, device, guidance_scale, mask_temperature, sampling_temperature
        )
        self._attention_kwargs = attention_kwargs

        # 2. Conditions: the conditional batch first, the unconditional one second.
        model_kwargs, batch_size = self.prepare_condition(
            prompt,
            class_labels,
            num_images_per_prompt,
            device,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got a list of {len(generator)} generators for {batch_size} images; pass one per image.")

        # 3. Starting tokens.
        if latents is None:
            latents = torch.full(
                (batch_size, side * side), self.transformer.mask_token_id, dtype=torch.long, device=device
            )
        elif latents.shape[0] != batch_size:
            raise ValueError(
                f"latents must have shape {(batch_size, side, side)}, got {(latents.shape[0], side, side)}."
            )

        # 4. Decoding loop, then the VQ decoder.
        return self.sample_and_decode(
            latents,
            model_kwargs,
            batch_size,
            generator,
            reuse_features,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            output_type,
            return_dict,
        )

    def sample_and_decode(
        self,
        latents: torch.LongTensor,
        model_kwargs,
        batch_size: int,
        generator,
        reuse_features,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        output_type: str,
        return_dict: bool,
    ):
        """The end of every generation and edit: `sample_tokens`, the VQ decoder, offload hooks, the output."""
        side = self.transformer.config.sample_size
        latents = self.sample_tokens(
            latents,
            model_kwargs,
            generator=generator,
            reuse_features=reuse_features,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images = self.decode_tokens(latents.reshape(batch_size, side, side), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def prepare_condition(
        self,
        prompt,
        class_labels,
        num_images_per_prompt: int,
        device,
        negative_prompt=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
    ) -> Tuple[Dict[str, torch.Tensor], int]:
        """The transformer's condition arguments and the number of images: cond rows first, then (with guidance, i.e.
        when `self._do_classifier_free_guidance`) the unconditional ones (the negative prompt or the null class)."""
        do_cfg = self._do_classifier_free_guidance
        model_kwargs = {}
        if self.is_text_to_image:
            embeds, pooled, negative_embeds, negative_pooled = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_cfg,
                negative_prompt,
                prompt_embeds,
                pooled_prompt_embeds,
                negative_prompt_embeds,
                negative_pooled_prompt_embeds,
            )
            batch_size = pooled.shape[0]
            if do_cfg:
                embeds, pooled = torch.cat([embeds, negative_embeds]), torch.cat([pooled, negative_pooled])
            model_kwargs.update(encoder_hidden_states=embeds, pooled_text_embeds=pooled)
        else:
            labels = self._class_labels(prompt, class_labels, device).repeat_interleave(num_images_per_prompt)
            batch_size = labels.shape[0]
            if do_cfg:
                labels = torch.cat([labels, torch.full_like(labels, self.transformer.null_class_label)])
            model_kwargs.update(class_labels=labels)
        return model_kwargs, batch_size

    def resolve_defaults(self, num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs):
        """The number of steps (the scheduler's strategy, else 8) and the callback's tensor inputs (its own for a
        `PipelineCallback`)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.strategy_num_steps or DEFAULT_NUM_INFERENCE_STEPS
        elif isinstance(num_inference_steps, np.integer) and not isinstance(num_inference_steps, np.bool_):
            num_inference_steps = int(num_inference_steps)  # NumPy integers are taken, as for class labels
        return num_inference_steps, callback_on_step_end_tensor_inputs

    def _check_start_latents(self, latents) -> torch.LongTensor:
        """Given start tokens: an integer tensor `(B, side, side)` of ids in `[0, mask_token_id]` with the same number
        of [MASK] in every row; returned as `(B, L)` on the execution device (the batch size is checked later)."""
        side = self.transformer.config.sample_size
        if not isinstance(latents, torch.Tensor) or latents.dtype not in (torch.int64, torch.int32):
            found = type(latents).__name__ if not isinstance(latents, torch.Tensor) else str(latents.dtype)
            raise TypeError(f"latents must be an integer torch.Tensor of token ids, got {found}.")
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (side, side):
            raise ValueError(f"latents must have shape (batch_size, {side}, {side}), got {tuple(latents.shape)}.")
        reference = torch.empty(latents.shape[0], side * side, dtype=torch.long, device=self._execution_device)
        return self._check_token_ids(latents, reference, "latents")

    @property
    def token_patch_size(self) -> int:
        """
        The side of the square token groups that are masked and revealed together: the transformer's `patch_size`
        (1 for models without one). The scheduler must have the same `patch_size`; a clear error otherwise.
        """
        patch_size = getattr(self.transformer.config, "patch_size", 1)
        scheduler_patch_size = self.scheduler.config.get("patch_size", 1)
        if scheduler_patch_size != patch_size:
            raise ValueError(
                f"The transformer masks tokens in {patch_size}x{patch_size} groups (patch_size {patch_size}) but the "
                f"scheduler has patch_size {scheduler_patch_size}: load the scheduler with patch_size={patch_size}."
            )
        return patch_size

    def prepare_timesteps(
        self,
        num_masked: int,
        num_inference_steps: int,
        device=None,
        guidance_scale: Optional[float] = None,
        mask_temperature: Optional[float] = None,
        sampling_temperature: Optional[float] = None,
    ) -> int:
        """
        Sets the scheduler for a decoding that starts with `num_masked` masked tokens (`set_timesteps(...,
        num_masked=...)`: the schedule scaled to them) and this call's state (`_do_classifier_free_guidance`,
        `_guidance_scale`, `_num_timesteps`, `_interrupt`); returns the number of steps.

        `min(num_inference_steps, num_masked)` steps run: never more steps than masked tokens (token groups, with a
        `token_patch_size` above 1). A scheduler with an explicit per-step strategy fixes the number of steps; a start
        with fewer masked tokens than that is an error.
        """
        steps = min(num_inference_steps, num_masked // self.token_patch_size**2)
        fixed = self.scheduler.strategy_num_steps
        if fixed is not None and steps < num_inference_steps and steps != fixed:
            raise ValueError(
                f"This scheduler's per-step strategy runs {fixed} steps, but only {num_masked} tokens are masked at "
                f"the start and a call runs at most one step per masked token."
            )
        self.scheduler.set_timesteps(
            steps,
            device=device,
            guidance_scale=guidance_scale,
            mask_temperature=mask_temperature,
            sampling_temperature=sampling_temperature,
            num_masked=num_masked,
        )
        self._do_classifier_free_guidance = any(scale > 0 for scale in self.scheduler.step_guidance_scales)
        self._guidance_scale = self.scheduler.config.guidance_scale if guidance_scale is None else guidance_scale
        self._num_timesteps = steps
        self._interrupt = False
        return steps

    def decode_tokens(self, tokens: torch.LongTensor, output_type: str = "pil"):
        """`(B, h, w)` token ids -> images of `output_type` (`"latent"` returns the ids)."""
        if output_type == "latent":
            return tokens
        batch_size, height, width = tokens.shape
        shape = (batch_size, height, width, self.vqvae.config.vq_embed_dim or self.vqvae.config.latent_channels)
        images = self.vqvae.decode(tokens, force_not_quantize=True, shape=shape).sample.clamp(0, 1)
        return self.image_processor.postprocess(images, output_type=output_type)


def check_prompt(prompt, name: str):
    """`None`, a string, or a non-empty list of strings, each valid Unicode text."""
    if prompt is None:
        return
    if not isinstance(prompt, str) and (
        not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt)
    ):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}: {prompt!r:.80}")
    if len(prompt) == 0 and not isinstance(prompt, str):
        raise ValueError(f"{name} is an empty list: pass at least one.")
    for text in [prompt] if isinstance(prompt, str) else prompt:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{name} is not valid Unicode text: {text[error.start : error.end]!r} at index {error.start} is a "
                "lone surrogate (half of a UTF-16 pair)."
            ) from None


def check_attention_kwargs(attention_kwargs):
    """`None`, or a dict whose only key is `"scale"` (the LoRA scale, a finite number): other keys would be ignored."""
    if attention_kwargs is None:
        return
    if not isinstance(attention_kwargs, dict):
        raise TypeError(f"attention_kwargs must be a dict such as {{'scale': 0.5}}, got {attention_kwargs!r:.80}.")
    unknown = sorted(set(attention_kwargs) - {"scale"}, key=str)
    if unknown:
        raise ValueError(
            f"attention_kwargs {unknown} would be ignored: ENAT's attention takes only 'scale' (the LoRA scale)."
        )
    scale = attention_kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"attention_kwargs['scale'] (the LoRA scale) must be a finite number, got {scale!r}.")


def check_finite(what: str, *tensors: torch.Tensor):
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        raise ValueError(f"{what} are not finite (NaN or inf): check the text encoder's weights.")


def check_components(transformer, scheduler, vqvae):
    """The [MASK] id of the scheduler and the codebook of the VQ model must be the transformer's."""
    if transformer is None or scheduler is None:
        return
    codebook_size = transformer.config.codebook_size
    if scheduler.config.mask_token_id != codebook_size:
        raise ValueError(
            f"The scheduler's mask_token_id is {scheduler.config.mask_token_id} but the transformer's [MASK] id is "
            f"its codebook_size, {codebook_size}: build the scheduler with mask_token_id={codebook_size}."
        )
    if vqvae is not None and vqvae.config.num_vq_embeddings != codebook_size:
        raise ValueError(
            f"The VQ model has {vqvae.config.num_vq_embeddings} codes but the transformer predicts {codebook_size}: "
            "these components do not belong together."
        )
    if vqvae is not None and not vqvae.config.lookup_from_codebook:
        raise ValueError("The VQ model must have lookup_from_codebook=True: the pipeline decodes token ids.")
