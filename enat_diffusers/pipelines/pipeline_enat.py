# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ENATPipeline: class-conditional and text-to-image generation with ENAT."""

import difflib
from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers import VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..models.transformer_enat import ENATTransformer2DModel
from ..schedulers.scheduling_masked_token import MaskedTokenScheduler


logger = logging.get_logger(__name__)

DEFAULT_NUM_INFERENCE_STEPS = 8
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class ENATPipeline(DiffusionPipeline):
    r"""
    Image generation with ENAT: start from an all-[MASK] token grid, predict every masked token, keep the most
    confident predictions, repeat; then decode the tokens with the VQ model.

    Class-conditional pipelines (the converted ImageNet checkpoints) take class names (`pipe("golden retriever")`) or
    ids (`pipe(class_labels=[207])`); text-to-image pipelines take prompts (`pipe("a red bus")`).

    Args:
        transformer ([`ENATTransformer2DModel`]): Predicts token logits.
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
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: ENATTransformer2DModel,
        scheduler: MaskedTokenScheduler,
        vqvae: VQModel,
        text_encoder: Optional[Union[CLIPTextModel, CLIPTextModelWithProjection]] = None,
        tokenizer: Optional[CLIPTokenizer] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,  # JSON (model_index.json) keys are strings
    ):
        super().__init__()
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
        self.labels = {}  # lower-case name -> ids
        for key, value in (id2label or {}).items():
            self.labels.setdefault(value.strip().lower(), []).append(key)
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1) if vqvae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False)

    @property
    def is_text_to_image(self) -> bool:
        return self.transformer.config.text_embed_dim is not None

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
        untruncated = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[1] > max_length:
            removed = self.tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
            logger.warning(f"The text encoder takes at most {max_length} tokens; this was cut off: {removed}")
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
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = self._encode_text(prompts, device)
        elif pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too.")
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * batch_size if isinstance(negative, str) else list(negative)
            if len(negatives) != batch_size:
                raise ValueError(
                    f"Got {len(negatives)} negative prompts for {batch_size} prompts; pass one, or one per prompt."
                )
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_text(negatives, device)
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

        def repeat(tensor):
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return tuple(
            map(repeat, (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds))
        )

    # ------------------------------------------------------------------------------------------------------ checks

    def check_inputs(
        self,
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
    ):
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("This is a text-to-image pipeline: pass `prompt`, not `class_labels`.")
            if (prompt is None) == (prompt_embeds is None):
                raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
            if prompt_embeds is not None and pooled_prompt_embeds is None:
                raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too.")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
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
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= side * side:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {side * side}] (the number of tokens), "
                f"got {num_inference_steps!r}."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
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
            labels = class_labels.reshape(-1).tolist()
        else:
            labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        num_classes = self.transformer.config.num_classes
        for label in labels:
            if isinstance(label, bool) or not hasattr(label, "__index__") or not 0 <= label < num_classes:
                raise ValueError(f"Class label {label!r} is not a class id in [0, {num_classes - 1}].")
        labels = [int(label) for label in labels]
        return torch.tensor(labels, dtype=torch.long, device=device)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ---------------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
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
        reuse_features: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
    ):
        r"""
        Generates images.

        Args:
            prompt (`str` or `List[str]`, *optional*): Text prompts (text-to-image) or class names (class-conditional).
            class_labels (`int`, `List[int]` or `torch.LongTensor`, *optional*): Class ids (class-conditional).
            height (`int`, *optional*), width (`int`, *optional*): Must equal the model's size (token grid side times
                the VQ model's downsampling factor), the default.
            num_inference_steps (`int`, *optional*, defaults to 8): Decoding steps; fixed by the scheduler's per-step
                strategy if it has one.
            guidance_scale (`float`, *optional*): ENAT guidance: logits `cond + s * (cond - uncond)` with `s` ramping
                linearly from 0 at the first step towards `guidance_scale`. 0 disables guidance (and the
                unconditional pass). Defaults to the scheduler's config (the released setting for converted models).
            negative_prompt (`str` or `List[str]`, *optional*): Text for the unconditional branch (text-to-image);
                one string is used for every prompt. Defaults to the empty prompt.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt or class.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): Randomness; a list gives one
                generator per image, so an image does not depend on the rest of the batch.
            latents (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): Token ids to start from,
                [MASK] where unknown (every row with the same number of [MASK]); all-[MASK] by default. Given tokens
                are kept.
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
                (`torch.Tensor`, *optional*): Precomputed text embeddings (see `encode_prompt`).
            mask_temperature (`float`, *optional*): Initial Gumbel temperature of the re-masking confidence, annealed
                to 0; randomises which tokens are kept. Defaults to the scheduler's config.
            sampling_temperature (`float`, *optional*): Initial temperature of token sampling, annealed to 1e-3;
                0 means argmax. Defaults to the scheduler's config.
            reuse_features (`bool`, defaults to `True`): ENAT's temporal reuse: each step encodes only the tokens
                revealed since the previous step. `False` re-encodes every visible token at every step.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (`(B, 3, H, W)` in [0, 1]) or
                `"latent"` (token ids `(B, h, w)`).
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called as `callback_on_step_end(pipe, step, timestep,
                callback_kwargs)` after every step; may return a dict with a replacement `latents` (the ids of the
                next step).
            callback_on_step_end_tensor_inputs (`List[str]`, defaults to `["latents"]`): Tensors passed to the
                callback.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.strategy_num_steps or DEFAULT_NUM_INFERENCE_STEPS
        self.check_inputs(
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
        )
        device = self._execution_device
        side = self.transformer.config.sample_size
        mask_token_id = self.transformer.mask_token_id

        # 1. Schedule (validates the sampling parameters), and whether guidance needs the unconditional branch.
        self.scheduler.set_timesteps(
            num_inference_steps,
            device=device,
            guidance_scale=guidance_scale,
            mask_temperature=mask_temperature,
            sampling_temperature=sampling_temperature,
        )
        do_cfg = any(scale > 0 for scale in self.scheduler.step_guidance_scales)
        self._num_timesteps = num_inference_steps

        # 2. Conditions: the conditional batch first, the unconditional one second.
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
            if do_cfg:
                embeds, pooled = torch.cat([embeds, negative_embeds]), torch.cat([pooled, negative_pooled])
            model_kwargs.update(encoder_hidden_states=embeds, pooled_text_embeds=pooled)
            batch_size = pooled.shape[0] // (2 if do_cfg else 1)
        else:
            labels = self._class_labels(prompt, class_labels, device).repeat_interleave(num_images_per_prompt)
            batch_size = labels.shape[0]
            if do_cfg:  # the null class is `num_classes`
                labels = torch.cat([labels, torch.full_like(labels, self.transformer.null_class_label)])
            model_kwargs.update(class_labels=labels)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got a list of {len(generator)} generators for {batch_size} images; pass one per image.")

        # 3. Starting tokens.
        if latents is None:
            latents = torch.full((batch_size, side * side), mask_token_id, dtype=torch.long, device=device)
        elif tuple(latents.shape) != (batch_size, side, side):
            raise ValueError(f"latents must have shape {(batch_size, side, side)}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=torch.long).reshape(batch_size, side * side)

        # 4. Decoding loop. One state object carries the reuse chains of both halves of the doubled batch.
        reuse_state = None
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                logits, state = self.transformer(
                    model_input, reuse_state=reuse_state, return_dict=False, **model_kwargs
                )
                reuse_state = state if reuse_features else None
                logits = logits.float()
                if do_cfg:
                    cond, uncond = logits.chunk(2)
                    logits = cond + self.scheduler.step_guidance_scales[i] * (cond - uncond)
                latents = self.scheduler.step(logits, t, latents, generator=generator).prev_sample

                if callback_on_step_end is not None:
                    tensors = {"latents": latents}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents) if callback_outputs else latents
                progress_bar.update()

        # 5. Decode. The last step re-masks nothing, so `latents` are the final tokens.
        latents = latents.reshape(batch_size, side, side)
        if output_type == "latent":
            images = latents
        else:
            shape = (batch_size, side, side, self.vqvae.config.vq_embed_dim or self.vqvae.config.latent_channels)
            images = self.vqvae.decode(latents, force_not_quantize=True, shape=shape).sample.clamp(0, 1)
            images = self.image_processor.postprocess(images, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
