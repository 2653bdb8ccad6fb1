# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ENATImg2ImgPipeline: re-mask a fraction (`strength`) of an image's VQ tokens and regenerate them.

Rules (also in the `__call__` docstring):

* **Strength.** `M = max(1, floor(strength * L + 0.5))` of the `L` tokens are re-masked (`strength * L` rounded to the
  nearest integer, halves up, at least one); `strength=1` re-masks everything and is plain generation.
* **Which tokens.** `remask="random"` (the default for now): `M` positions uniformly at random, drawn from the
  `generator` (one draw per image with a list of generators). `remask="confidence"`: the `M` tokens the model finds
  least likely in their context, scored by pseudo-likelihood: the grid is split into the four cosets of a 2x2
  interleave, each coset is masked in turn (so every masked token sees its 8 neighbours) and each token is scored by
  the conditional model's log-probability of its actual id (no guidance). Deterministic; 4 extra forward passes
  of the conditional rows (one row per prompt, no guidance). Ties go to the earlier position.
* **Schedule.** As for inpainting (`edit_mask_counts`): `min(num_inference_steps, M)` steps, ENAT's schedule
  scaled to the `M` re-masked tokens; `num_inference_steps` counts the edit's own steps (it is not the length of a
  full schedule cut by `strength`, as in diffusion img2img).
* **Token groups.** A transformer with `patch_size > 1` masks whole `patch_size x patch_size` groups: `L`, `M` and the
  steps count groups, a random choice draws one number per group, and a group's confidence is its tokens' sum.
"""

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import replace_example_docstring

from ..schedulers.scheduling_masked_token import lowest_scores_mask, uniform_noise
from ..utils.token_groups import expand_group_mask, group_tokens
from .pipeline_enat import ENATPipeline
from .pipeline_enat_inpaint import ENATEditingMixin


REMASK_MODES = ("random", "confidence")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from enat_diffusers import ENATImg2ImgPipeline

        >>> pipe = ENATImg2ImgPipeline.from_pretrained("pretrained/enat-shapes")  # any ENATPipeline folder
        >>> image = PIL.Image.open("shapes.png").convert("RGB")  # the model's size
        >>> edited = pipe(
        ...     "a large green triangle at the bottom", image=image, strength=0.4, remask="confidence",
        ...     generator=torch.Generator().manual_seed(0),
        ... ).images[0]
        ```
"""


def num_tokens_to_remask(strength: float, seq_len: int) -> int:
    """Img2img's rule: `max(1, floor(strength * seq_len + 0.5))` tokens are re-masked, for `0 < strength <= 1`."""
    return min(seq_len, max(1, math.floor(strength * seq_len + 0.5)))


class ENATImg2ImgPipeline(ENATEditingMixin, ENATPipeline):
    r"""
    Image-to-image with ENAT: encode the image into VQ tokens, re-mask a fraction `strength` of them (at random, or
    the model's least confident ones), and regenerate those with the prompt or class. Tokens that are not re-masked
    never change.

    Same components as [`ENATPipeline`]; an `ENATPipeline` folder loads into this class
    (`ENATImg2ImgPipeline.from_pretrained(folder)`, or `ENATImg2ImgPipeline(**pipe.components)`).
    """

    @torch.no_grad()
    def token_confidence(self, tokens: torch.LongTensor, model_kwargs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Pseudo-log-likelihood of every token of `tokens` (`(B, L)` ids without [MASK]) under the conditional model
        (`model_kwargs` of `B` conditional rows): the four cosets of a 2x2 interleave of the grid are masked in turn
        and each masked token is scored by `log p(its id | the other tokens, condition)`. Returns `(B, L)` float32.
        """
        side = self.transformer.config.sample_size
        index = torch.arange(side, device=tokens.device) // self.token_patch_size  # cosets of whole token groups
        coset = ((index[:, None] % 2) * 2 + index[None, :] % 2).flatten()  # (L,)
        scores = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        for group in range(4):
            where = coset == group
            if not where.any():  # a 1x1 grid has one coset
                continue
            ids = tokens.masked_fill(where, self.transformer.mask_token_id)
            output = self.transformer(ids, return_dict=False, attention_kwargs=self._attention_kwargs, **model_kwargs)
            logits = output[0].float()
            log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            scores = torch.where(where, log_probs, scores)
        return scores

    def select_remask(
        self,
        tokens: torch.LongTensor,
        num_remask: int,
        remask: str = "random",
        generator=None,
        model_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    ) -> torch.BoolTensor:
        """`(B, L)` bool, `True` at the `num_remask` tokens of each row to regenerate (see the module rules);
        `model_kwargs` are the conditional rows, needed for `remask="confidence"`. With a `token_patch_size` above
        1, whole token groups are chosen (`num_remask` whole groups' tokens), a group's confidence being its
        tokens' sum."""
        seq_len = tokens.shape[1]
        if num_remask >= seq_len:
            return torch.ones_like(tokens, dtype=torch.bool)  # draws nothing: strength 1 is plain generation
        patch_size = self.token_patch_size
        num_groups = seq_len // patch_size**2
        if remask == "random":
            scores = uniform_noise((tokens.shape[0], num_groups), generator, tokens.device)
        else:
            scores = group_tokens(self.token_confidence(tokens, model_kwargs), patch_size).sum(-1)
        return expand_group_mask(lowest_scores_mask(scores, num_remask // patch_size**2), patch_size)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        image=None,
        strength: float = 0.5,
        remask: str = "random",
        class_labels: Union[int, List[int], torch.LongTensor, None] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
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
        Regenerates a fraction of the tokens of images.

        Args:
            prompt (`str` or `List[str]`, *optional*):
                Text prompts (text-to-image pipelines) or class names (class-conditional pipelines).
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images to edit, the model's size, values in [0, 1] (numpy `(H, W, 3)` / `(B, H, W, 3)`, torch
                `(3, H, W)` / `(B, 3, H, W)`). One image for every prompt, or one per prompt.
            strength (`float`, defaults to 0.5):
                In (0, 1]: the fraction of the tokens re-masked, `max(1, floor(strength * L + 0.5))` of `L`. 1 re-masks
                everything (generation from the prompt alone).
            remask (`str`, defaults to `"random"`):
                Which tokens: `"random"` (uniform, from `generator`) or `"confidence"` (the model's least likely
                tokens in context, deterministic; 4 extra forward passes). The default is provisional, until the two
                are compared on a trained model.
            class_labels (`int`, `List[int]` or `torch.LongTensor`, *optional*):
                Class ids, for class-conditional pipelines instead of `prompt`.
            num_inference_steps (`int`, *optional*, defaults to 8):
                Decoding steps of the edit; with `M` re-masked tokens `min(num_inference_steps, M)` run.
            guidance_scale, negative_prompt, num_images_per_prompt, generator, prompt_embeds, pooled_prompt_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, mask_temperature, sampling_temperature,
            reuse_features, output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            attention_kwargs:
                As in [`ENATPipeline.__call__`] (guidance ramps over the edit's steps). With `reuse_features` the
                kept tokens are encoded once, at the first step, and reused after.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the edited images (`output_type="latent"`: token ids
            `(B, h, w)`).
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
            height=None,
            width=None,
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
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1] (the fraction of tokens re-masked): {strength!r}")
        if remask not in REMASK_MODES:
            raise ValueError(f"remask must be one of {REMASK_MODES}, got {remask!r}.")
        if image is None:
            raise ValueError("Pass the `image` to edit.")
        device = self._execution_device
        seq_len = self.transformer.config.sample_size**2
        group = self.token_patch_size**2
        num_remask = num_tokens_to_remask(float(strength), seq_len // group) * group  # whole token groups

        # 1. Image tokens, schedule (decides whether guidance runs), conditions.
        tokens = self._encode_pixels(self.preprocess_image(image, "image")).flatten(1)
        self.prepare_timesteps(
            num_remask, num_inference_steps, device, guidance_scale, mask_temperature, sampling_temperature
        )
        self._attention_kwargs = attention_kwargs
        model_kwargs, batch_size = self.prepare_condition(
            prompt,
            class_labels,
            num_images_per_prompt,
            device,
            negative_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        self._check_generators(generator, batch_size)
        tokens = self._expand_images(tokens, batch_size, num_images_per_prompt, "image")

        # 2. Which tokens to regenerate. Confidence scores are the same for the copies of one prompt's image: score
        #    one row per prompt.
        if remask == "confidence" and num_remask < seq_len:
            step = num_images_per_prompt
            condition = {name: value[:batch_size:step] for name, value in model_kwargs.items()}
            selected = self.select_remask(tokens[::step], num_remask, "confidence", model_kwargs=condition)
            selected = selected.repeat_interleave(step, dim=0)
        else:
            selected = self.select_remask(tokens, num_remask, "random", generator)
        latents = torch.where(selected, self.transformer.mask_token_id, tokens)

        # 3. The shared decoding loop and the VQ decoder.
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
