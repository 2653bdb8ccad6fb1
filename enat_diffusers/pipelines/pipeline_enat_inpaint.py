# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ENATInpaintPipeline: regenerate the masked part of an image (inpainting; outpainting is inpainting a padded border).

Also home of what the editing pipelines share (`ENATEditingMixin`): image/mask preprocessing and checks, and VQ
encoding of the input image. Both editing pipelines set their schedule with `ENATPipeline.prepare_timesteps` and
decode with `ENATPipeline.sample_tokens`; there is no second sampling loop.

Rules (also in the `__call__` docstrings):

* **Token mask.** The pixel mask (white = regenerate) is binarised at 0.5 and a token is regenerated if *any* pixel
  of its `f x f` cell (`f` = the VQ model's downsampling factor) is masked: a max-pool of the pixel mask.
* **Schedule.** With `M` of the `L` tokens masked, the edit runs `T = min(num_inference_steps, M)` steps; step `k`
  leaves `floor(M * r_k)` tokens masked, `r_k` being the scheduler's mask ratio of step `k` of `T` (ENAT's cosine
  `cos(pi/2 (k+1)/T)`, or an explicit per-step list): the schedule scaled to the masked tokens, as MaskGIT decodes
  from a partially known grid. The counts are then clamped so that every step reveals at least one token
  (`edit_mask_counts`). The scheduler owns this rule (`set_timesteps(T, num_masked=M)`), as it does for
  `ENATPipeline(latents=...)`; with the whole image masked it is exactly the generation schedule. Temperatures and
  guidance follow the scheduler's per-step values for those `T` steps (the edit is a generation of `M` tokens).
"""

import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging, replace_example_docstring

from ..schedulers.scheduling_masked_token import edit_mask_counts  # noqa: F401  (re-exported with the pipelines)
from .pipeline_enat import ENATPipeline


logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> from enat_diffusers import ENATInpaintPipeline, box_mask, outpaint_inputs

        >>> pipe = ENATInpaintPipeline.from_pretrained("pretrained/enat-shapes")  # any ENATPipeline folder
        >>> image = PIL.Image.open("shapes.png").convert("RGB")  # the model's size, 64x64 here
        >>> mask = box_mask(64, 64, (0, 0, 32, 32))  # regenerate the top-left quarter
        >>> edited = pipe("a small blue square at the top", image=image, mask_image=mask).images[0]

        >>> # outpainting: shrink the image into the canvas, pad it, and regenerate the border
        >>> padded, border = outpaint_inputs(image, 16, 0, 16, 0, size=(64, 64))
        >>> wider = pipe("a large red circle", image=padded, mask_image=border).images[0]
        ```
"""


# ------------------------------------------------------------------------------------------------ helper functions


def box_mask(width: int, height: int, box: Tuple[int, int, int, int]) -> PIL.Image.Image:
    """A `width x height` mask image ("L" mode), white (regenerate) inside `box = (x0, y0, x1, y1)` (pixels, end
    exclusive), black elsewhere."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}.")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return PIL.Image.fromarray(mask, mode="L")


def outpaint_inputs(
    image: PIL.Image.Image,
    left: int,
    top: int,
    right: int,
    bottom: int,
    size: Optional[Tuple[int, int]] = None,
) -> Tuple[PIL.Image.Image, PIL.Image.Image]:
    """
    Outpainting as inpainting: pads `image` by `left, top, right, bottom` pixels and returns `(padded_image, mask)`,
    the mask white on the padding. Pass both to [`ENATInpaintPipeline`].

    Args:
        image (`PIL.Image.Image`): The image to extend.
        left, top, right, bottom (`int`): Padding in pixels (non-negative, not all 0).
        size (`(width, height)`, *optional*): Size of the result, normally the model's size. The image is first
            resized to the inner box `(width - left - right, height - top - bottom)`. Without it the result is the
            image's size plus the padding.

    The padding repeats the edge pixels (it is regenerated, but the VQ encoder sees it next to the kept tokens). By
    the token-mask rule, tokens that the padding only partly covers are regenerated too: padding by multiples of the
    VQ factor keeps every original pixel's token.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    pads = (left, top, right, bottom)
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 0 for p in pads) or not any(pads):
        raise ValueError(f"The padding (left, top, right, bottom) must be non-negative integers, not all 0: {pads}.")
    image = image.convert("RGB")
    if size is not None:
        width, height = size
        inner = (width - left - right, height - top - bottom)
        if inner[0] < 1 or inner[1] < 1:
            raise ValueError(f"The padding {pads} leaves no room for the image in a {width}x{height} canvas.")
        image = image.resize(inner, PIL.Image.BICUBIC)
    pixels = np.asarray(image)
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return PIL.Image.fromarray(padded, mode="RGB"), PIL.Image.fromarray(mask, mode="L")


# -------------------------------------------------------------------------------------------------- shared parts


def _check_array_values(value, name: str, allow_bool: bool):
    """Arrays and tensors must be floating point (or bool, for masks), finite, in [0, 1]."""
    arrays = value if isinstance(value, (list, tuple)) else [value]
    for array in arrays:
        if isinstance(array, PIL.Image.Image):
            continue
        is_bool = array.dtype == torch.bool if isinstance(array, torch.Tensor) else array.dtype == np.bool_
        if isinstance(array, torch.Tensor):
            is_float = array.is_floating_point()
        else:
            is_float = np.issubdtype(array.dtype, np.floating)
        if is_bool and allow_bool:
            continue
        if not is_float:
            kinds = "floating point or bool" if allow_bool else "floating point"
            raise TypeError(
                f"{name} arrays/tensors must be {kinds} with values in [0, 1], got dtype {array.dtype} (scale "
                "integer images by 1/255, or pass PIL images)."
            )
        tensor = torch.as_tensor(array)
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty.")
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(
                f"{name} values must be finite and in [0, 1], got the range [{tensor.min().item():.4g}, "
                f"{tensor.max().item():.4g}]."
            )


def _as_float(item):
    """Arrays and tensors as float32 (bool masks become 0/1); PIL images unchanged."""
    if isinstance(item, torch.Tensor):
        return item.float()
    if isinstance(item, np.ndarray):
        return item.astype(np.float32)
    return item


def _as_input_list(value, name: str) -> list:
    kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name} is an empty list.")
    if not all(isinstance(item, kinds) for item in items) or len({type(item) for item in items}) > 1:
        found = sorted({type(item).__name__ for item in items})
        raise TypeError(
            f"{name} must be a PIL image, a numpy array or a torch tensor, or a list of one of these kinds; got "
            f"{', '.join(found)}."
        )
    if isinstance(items[0], PIL.Image.Image) and len({item.size for item in items}) > 1:
        raise ValueError(f"The images of {name} have different sizes: {sorted({item.size for item in items})}.")
    return items


class ENATEditingMixin:
    """
    What [`ENATInpaintPipeline`] and [`ENATImg2ImgPipeline`] add to [`ENATPipeline`]: input images and masks, and VQ
    encoding. The schedule is `ENATPipeline.prepare_timesteps`, decoding `ENATPipeline.sample_tokens`.
    """

    # `vqvae.quantize` reads the codebook outside `forward`, where accelerate's offload hooks do not move it
    _exclude_from_cpu_offload = ["vqvae"]

    # -------------------------------------------------------------------------------------------- processors

    @property
    def edit_image_processor(self) -> VaeImageProcessor:
        """Input images: RGB, values in [0, 1] (no normalisation), never resized (sizes are checked instead)."""
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_resize=False, do_normalize=False, do_convert_rgb=True
        )

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks: grayscale, binarised at 0.5 (1 = regenerate), never resized."""
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_resize=False,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    @property
    def image_size(self) -> int:
        """The side of the images this model edits: token grid side times the VQ factor."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _check_size(self, tensor: torch.Tensor, name: str, what: str):
        size = self.image_size
        if tuple(tensor.shape[-2:]) != (size, size):
            raise ValueError(
                f"{name} is {tensor.shape[-1]}x{tensor.shape[-2]} (width x height) but this model edits "
                f"{size}x{size} {what} (a {self.transformer.config.sample_size}x{self.transformer.config.sample_size} "
                f"token grid with a {self.vae_scale_factor}x VQ model); resize or crop it first."
            )

    def preprocess_image(self, image, name: str = "image") -> torch.Tensor:
        """PIL image(s), numpy `(H, W, 3)` / `(B, H, W, 3)` or torch `(3, H, W)` / `(B, 3, H, W)` in [0, 1] ->
        float `(B, 3, H, W)`, checked against the model's size."""
        items = _as_input_list(image, name)
        _check_array_values(items, name, allow_bool=False)
        items = [_as_float(item) for item in items]
        try:
            pixels = self.edit_image_processor.preprocess(items if len(items) > 1 else items[0])
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{name} could not be read as images: {error}") from error
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"{name} must be RGB images: (H, W, 3) numpy arrays or (3, H, W) tensors, or batches of them; "
                f"it became a tensor of shape {tuple(pixels.shape)} (batch, channels, height, width)."
            )
        self._check_size(pixels, name, "images")
        return pixels.float()

    def preprocess_mask(self, mask_image, name: str = "mask_image") -> torch.Tensor:
        """PIL mask(s) (any mode, converted to grayscale), numpy `(H, W)` / `(B, H, W)` or torch `(H, W)` /
        `(B, H, W)` / `(B, 1, H, W)`, values in [0, 1] or bool -> binarised float `(B, 1, H, W)`, 1 = regenerate."""
        items = _as_input_list(mask_image, name)
        _check_array_values(items, name, allow_bool=True)
        for item in items:  # diffusers reads a 3-d array as (B, H, W): catch (H, W, 3) colour masks first
            if isinstance(item, np.ndarray) and (
                (item.ndim == 4 and item.shape[-1] != 1)
                or (item.ndim == 3 and item.shape[-1] in (3, 4) and item.shape[-1] != self.image_size)
            ):
                raise ValueError(
                    f"{name} must be single-channel masks ((H, W) or (B, H, W) arrays); got an array of shape "
                    f"{item.shape}, which looks like colour channels: convert it to grayscale."
                )
        items = [_as_float(item) for item in items]
        try:
            mask = self.mask_processor.preprocess(items if len(items) > 1 else items[0])
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{name} could not be read as masks: {error}") from error
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(
                f"{name} must be single-channel masks ((H, W) or (B, H, W) arrays, (B, 1, H, W) tensors, or PIL "
                f"images); it became a tensor of shape {tuple(mask.shape)} (batch, channels, height, width)."
            )
        self._check_size(mask, name, "masks")
        return mask.float()

    def get_token_mask(self, mask_image) -> torch.BoolTensor:
        """
        The tokens a pixel mask regenerates, `(B, h, w)` bool: a token is regenerated if any pixel of its `f x f`
        cell is masked (after binarising at 0.5; `f` is the VQ model's downsampling factor). With a transformer of
        `patch_size` `p > 1` the cell is that of the token's `p x p` group: whole groups are regenerated.
        """
        return self._token_mask(self.preprocess_mask(mask_image))

    def _token_mask(self, mask: torch.Tensor) -> torch.BoolTensor:
        """Binarised `(B, 1, H, W)` pixel mask -> `(B, h, w)`: max-pool over each token (group)'s cell."""
        patch_size = self.token_patch_size
        masked = F.max_pool2d(mask.float(), kernel_size=self.vae_scale_factor * patch_size).squeeze(1) > 0.5
        return masked.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)

    @torch.no_grad()
    def encode_image(self, image) -> torch.LongTensor:
        """Token ids `(B, h, w)` of images (any input `preprocess_image` accepts): `vqvae.encode(x).latents`, then
        the nearest codebook entries (`vqvae.quantize`)."""
        return self._encode_pixels(self.preprocess_image(image))

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.LongTensor:
        device = self._execution_device
        pixels = pixels.to(device=device, dtype=self.vqvae.dtype)
        latents = self.vqvae.encode(pixels).latents
        _, _, (_, _, indices) = self.vqvae.quantize(latents)  # indices: (B * h * w,), row-major
        side = self.transformer.config.sample_size
        return indices.reshape(pixels.shape[0], side, side).to(device=device, dtype=torch.long)

    @staticmethod
    def _check_generators(generator, batch_size: int):
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got a list of {len(generator)} generators for {batch_size} images; pass one per image.")

    def _expand_images(self, tokens: torch.LongTensor, batch_size: int, num_images_per_prompt: int, name: str):
        """`(I, L)` rows of I inputs -> `(batch_size, L)`: one input for every prompt, or one per prompt (each
        repeated `num_images_per_prompt` times)."""
        num_prompts = batch_size // num_images_per_prompt
        if tokens.shape[0] not in (1, num_prompts):
            raise ValueError(
                f"Got {tokens.shape[0]} inputs ({name}) for {num_prompts} prompts/classes: pass one for all "
                "prompts/classes, or one per prompt/class."
            )
        return tokens.expand(num_prompts, -1).repeat_interleave(num_images_per_prompt, dim=0)


# ---------------------------------------------------------------------------------------------------- pipeline


class ENATInpaintPipeline(ENATEditingMixin, ENATPipeline):
    r"""
    Inpainting with ENAT: the tokens under the mask are set to [MASK] and regenerated with the prompt or class; the
    others are the VQ tokens of the input image and never change. Outpainting is inpainting a padded border (see
    [`outpaint_inputs`]).

    Same components as [`ENATPipeline`]; an `ENATPipeline` folder loads into this class
    (`ENATInpaintPipeline.from_pretrained(folder)`, or `ENATInpaintPipeline(**pipe.components)`).

    * **Token mask:** a token is regenerated if any pixel of its `f x f` cell is masked (`f` = the VQ model's
      downsampling factor): see [`~ENATEditingMixin.get_token_mask`]. The output is the VQ decoding of all tokens, so
      pixels outside the mask are the VQ reconstruction of the input (and those next to the mask can change a little
      through the decoder's receptive field); paste the input back with the mask if exact pixels matter.
    * **Batch:** ENAT needs the same number of [MASK] tokens in every image of a batch. One mask serves the whole
      batch; several masks (one per image) must cover equally many tokens, otherwise a `ValueError` says so (edit such
      images in separate calls).
    * **Schedule:** `min(num_inference_steps, M)` steps for `M` masked tokens, ENAT's schedule scaled to `M` (see
      [`edit_mask_counts`]); masking every token reproduces `ENATPipeline` exactly.
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        image=None,
        mask_image=None,
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
        Regenerates the masked part of images.

        Args:
            prompt (`str` or `List[str]`, *optional*):
                Text prompts (text-to-image pipelines) or class names (class-conditional pipelines).
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images to edit, the model's size, values in [0, 1] (numpy `(H, W, 3)` / `(B, H, W, 3)`, torch
                `(3, H, W)` / `(B, 3, H, W)`). One image for every prompt, or one per prompt.
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) where to regenerate, black where to keep; the images' size. PIL masks are converted to
                grayscale; arrays `(H, W)` / `(B, H, W)`, tensors also `(B, 1, H, W)`, values in [0, 1] or bool.
                Binarised at 0.5; a token is regenerated if any of its pixels is masked. One mask for all images, one
                image for all masks, or one mask per image; every mask must cover the same number of tokens.
            class_labels (`int`, `List[int]` or `torch.LongTensor`, *optional*):
                Class ids, for class-conditional pipelines instead of `prompt`.
            num_inference_steps (`int`, *optional*, defaults to 8):
                Decoding steps; an edit of `M` masked tokens runs `min(num_inference_steps, M)`.
            guidance_scale, negative_prompt, num_images_per_prompt, generator, prompt_embeds, pooled_prompt_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, mask_temperature, sampling_temperature,
            reuse_features, output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            attention_kwargs:
                As in [`ENATPipeline.__call__`] (guidance ramps over the edit's steps). With `reuse_features` the
                known tokens are encoded once, at the first step, and reused after.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the edited images (`output_type="latent"`: token ids
            `(B, h, w)`, identical to `encode_image(image)` outside the token mask).
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
        if image is None:
            raise ValueError("Pass the `image` to inpaint.")
        if mask_image is None:
            raise ValueError("Pass `mask_image` (white where to regenerate).")
        device = self._execution_device
        mask_token_id = self.transformer.mask_token_id

        # 1. Inputs: the image tokens and the token mask (equal counts per image).
        pixels = self.preprocess_image(image, "image")
        token_mask = self._token_mask(self.preprocess_mask(mask_image, "mask_image")).flatten(1).to(device)
        num_inputs = max(pixels.shape[0], token_mask.shape[0])
        if {pixels.shape[0], token_mask.shape[0]} - {1, num_inputs}:
            raise ValueError(
                f"Got {token_mask.shape[0]} masks for {pixels.shape[0]} images: pass one mask for all images, one "
                "image for all masks, or as many masks as images."
            )
        counts = token_mask.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(
                f"mask_image masks different numbers of tokens per image ({counts.tolist()}); ENAT regenerates the "
                "same number of tokens in every image of a batch: use one mask for all images, masks that cover "
                "equally many tokens, or one call per image."
            )
        num_masked = int(counts[0])
        if num_masked == 0:
            raise ValueError("mask_image masks no token: nothing to regenerate (white marks what to regenerate).")
        tokens = self._encode_pixels(pixels).flatten(1)
        latents = torch.where(token_mask, mask_token_id, tokens)  # (max(images, masks), L)

        # 2. Schedule (decides whether guidance runs), then the conditions.
        self.prepare_timesteps(
            num_masked, num_inference_steps, device, guidance_scale, mask_temperature, sampling_temperature
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
        latents = self._expand_images(latents, batch_size, num_images_per_prompt, "image (or mask)")

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
