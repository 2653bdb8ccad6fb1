# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Pictures of what a pipeline does: captioned grids, and the step-by-step reveal of an image (GIF and strip).

The reveal shows, after each decoding step, the image the model currently predicts (every masked token filled with
its sampled guess) with the tokens that are still masked faded towards grey: the crisp cells are the tokens already
fixed, which never change again.
"""

import textwrap
from typing import List, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from diffusers.callbacks import PipelineCallback


def captioned_grid(
    images: Sequence[PIL.Image.Image], captions: Sequence[str], columns: int = 4, scale: int = 3, font_size: int = 13
) -> PIL.Image.Image:
    """Images in a grid, each enlarged `scale` times (nearest neighbour) with its caption written underneath."""
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"captioned_grid needs one caption per image, got {len(images)} images, {len(captions)} captions."
        )
    font = PIL.ImageFont.load_default(size=font_size)
    cell_width, cell_height = images[0].width * scale, images[0].height * scale
    chars_per_line = max(8, int(cell_width / (font_size * 0.55)))
    wrapped = [textwrap.wrap(caption, chars_per_line) or [""] for caption in captions]
    text_height = (max(len(lines) for lines in wrapped) * (font_size + 3)) + 6
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    pad = 6
    grid = PIL.Image.new(
        "RGB", (columns * (cell_width + pad) + pad, rows * (cell_height + text_height + pad) + pad), "white"
    )
    draw = PIL.ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        x = pad + (index % columns) * (cell_width + pad)
        y = pad + (index // columns) * (cell_height + text_height + pad)
        grid.paste(image.convert("RGB").resize((cell_width, cell_height), PIL.Image.NEAREST), (x, y))
        for line_index, line in enumerate(lines):
            draw.text((x, y + cell_height + 3 + line_index * (font_size + 3)), line, fill=(20, 20, 20), font=font)
    return grid


class RevealRecorder(PipelineCallback):
    """
    A `callback_on_step_end` that records, for the first image of the batch, the visible tokens and the model's
    prediction of every token after each step. Pass it to the pipeline, then call `frames(pipe)`.
    """

    tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self):
        super().__init__()
        self.steps: List[tuple] = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps.append(
            (callback_kwargs["latents"][:1].clone(), callback_kwargs["pred_original_sample"][:1].clone())
        )
        return {}

    @torch.no_grad()
    def frames(self, pipe, scale: int = 4, fade: float = 0.65) -> List[PIL.Image.Image]:
        """One image per step: the prediction, with still-masked token cells faded by `fade` towards grey."""
        if not self.steps:
            raise ValueError("Nothing recorded: pass this recorder as `callback_on_step_end` to the pipeline first.")
        side = pipe.transformer.config.sample_size
        visible = torch.cat([ids for ids, _ in self.steps]).reshape(-1, side, side)
        predicted = torch.cat([pred for _, pred in self.steps]).reshape(-1, side, side)
        images = pipe.decode_tokens(predicted.to(pipe._execution_device), output_type="pt").cpu()  # (T, 3, H, W)
        cell = images.shape[-1] // side
        masked = (visible == pipe.transformer.mask_token_id).float()
        masked = masked.repeat_interleave(cell, 1).repeat_interleave(cell, 2).unsqueeze(1)  # (T, 1, H, W)
        faded = images * (1 - fade * masked) + 0.5 * fade * masked
        frames = pipe.image_processor.postprocess(faded, output_type="pil")
        return [frame.resize((frame.width * scale, frame.height * scale), PIL.Image.NEAREST) for frame in frames]


def reveal_strip(frames: Sequence[PIL.Image.Image], labels: Optional[Sequence[str]] = None) -> PIL.Image.Image:
    """The frames side by side, labelled `step 1`, `step 2`, ... underneath."""
    labels = labels or [f"step {i + 1}" for i in range(len(frames))]
    return captioned_grid(list(frames), list(labels), columns=len(frames), scale=1)


def save_gif(frames: Sequence[PIL.Image.Image], path, duration_ms: int = 450, hold_last_ms: int = 1500):
    """An animated GIF of the frames that loops, holding the last frame longer."""
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)
