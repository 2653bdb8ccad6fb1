# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""A Gradio demo (and Hugging Face Space) for ENAT pipelines.

    python examples/spaces/app.py                        # the shipped pretrained/enat-shapes, on 127.0.0.1:7860
    MODEL_ID=org/enat-l-256 python examples/spaces/app.py   # a hub id or a pipeline folder
    python examples/spaces/app.py --model path/to/pipeline --port 7861

The pipeline is loaded once, from `--model`, else `$MODEL_ID`, else `pretrained/enat-shapes` (next to this file
in a Space, or the repository's). Text-to-image pipelines get a prompt box, class-conditional ones (converted ImageNet
checkpoints) a searchable class picker. Every request shows the images, the step-by-step reveal of the first image
(an animated GIF and a slider over the steps), the generation time and the model FLOPs per image with and without
ENAT's feature reuse.

The handlers (`EnatDemo.generate`, `EnatDemo.show_step`, `random_seed`) are plain functions: they can be called
without a server, and they report bad inputs as `gr.Error`. The only files written are the reveal GIFs, in a
folder made by `tempfile.mkdtemp` and removed at exit.
"""

# `spaces` (ZeroGPU) must be imported before torch initialises CUDA; elsewhere the decorator changes nothing.
try:
    import spaces

    gpu = spaces.GPU(duration=120)
except (ImportError, AttributeError):  # not installed (or just a folder named `spaces` on sys.path)
    spaces = None

    def gpu(function):
        return function


import argparse
import atexit
import copy
import html
import logging
import math
import numbers
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gradio as gr
import PIL.Image
import torch
from torch.utils.flop_counter import FlopCounterMode


try:
    from enat_diffusers import ENATPipeline
except ImportError:  # a clone without `pip install -e .`: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import is_held_out, parse_caption
from enat_diffusers.visualization import RevealRecorder, save_gif


logger = logging.getLogger("enat_space")

APP_DIR = Path(__file__).resolve().parent
SHIPPED_MODEL = Path("pretrained") / "enat-shapes"
MAX_IMAGES = 8  # images per request
MAX_PROMPT_CHARS = 500  # longer prompts are cut (with a warning) before tokenizing
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 10.0
MAX_MASK_TEMPERATURE = 10.0
MAX_SAMPLING_TEMPERATURE = 20.0
# One pipeline on one device, and its scheduler keeps per-call state: one generation at a time, the rest wait.
CONCURRENCY_LIMIT = 1
QUEUE_MAX_SIZE = 32
SETTINGS = ("guidance_scale", "mask_temperature", "sampling_temperature")  # overrides of the scheduler's config
DISPLAY_SIZE = 256  # small images are enlarged (nearest neighbour) to about this many pixels for display
KEEP_GIFS = 64  # reveal GIFs kept in the temporary folder (older ones are deleted)

SEEN_EXAMPLES = [
    "a large red circle on the left and a small blue square on the right",
    "a small yellow triangle in the centre",
    "a large blue square at the top and a small yellow triangle at the bottom",
    "a small purple circle on the left and a large green triangle on the right",
]
# colour-shape pairs of `enat_diffusers.data.shapes.HELD_OUT_PAIRS`: never in the training captions
HELD_OUT_EXAMPLES = [
    "a large purple triangle on the left",
    "a small green square at the top and a large red circle at the bottom",
    "a small green square in the centre",
    "a large blue circle on the left and a small purple triangle on the right",
]
# well-known ImageNet classes, used as examples by 1000-class pipelines
IMAGENET_EXAMPLES = [207, 281, 980, 277, 88, 417]

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="pink", neutral_hue="slate")
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#enat-header h1 { margin-bottom: 0.2em; }
#enat-stats table { width: 100%; }
#enat-gallery .grid-wrap { min-height: 0 !important; max-height: none !important; overflow-y: visible; }
#enat-generate { min-height: 3em; }
footer { display: none !important; }
"""


# ------------------------------------------------------------------------------------------------- loading


def default_model_id() -> str:
    """`$MODEL_ID`, else `pretrained/enat-shapes` of the repository (this file is examples/spaces/app.py in it), else
    `pretrained/enat-shapes` next to this file (a Space)."""
    model_id = os.environ.get("MODEL_ID", "").strip()
    if model_id:
        return model_id
    if len(APP_DIR.parents) >= 2 and (APP_DIR.parents[1] / "enat_diffusers").is_dir():
        return str(APP_DIR.parents[1] / SHIPPED_MODEL)
    return str(APP_DIR / SHIPPED_MODEL)


def display_name(model_id: str) -> str:
    """What the page calls the model: a hub id as is; a local folder by its last two path parts (the page never shows
    where the server keeps its files)."""
    if not model_id:
        return "ENAT"
    path = Path(model_id).expanduser()
    return "/".join(path.parts[-2:]) if path.exists() else model_id


def _looks_like_path(model_id: str) -> bool:
    return (
        model_id.startswith((".", "/", "~", "\\")) or model_id.count("/") != 1 or os.sep != "/" and os.sep in model_id
    )


def load_pipeline(model_id: Optional[str] = None, device: Optional[str] = None) -> ENATPipeline:
    """Loads an ENAT pipeline from a hub id or a local folder, on `device` (CUDA when available)."""
    model_id = model_id or default_model_id()
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a pipeline folder: it has no model_index.json.")
        source = str(path)
    elif _looks_like_path(model_id):
        hint = (
            " It is the shipped Shapes model: train it first, or set MODEL_ID to another pipeline."
            if path.name == SHIPPED_MODEL.name
            else ""
        )
        raise FileNotFoundError(
            f"No pipeline folder at {path}.{hint} MODEL_ID may be a hub id (org/name) or a pipeline folder."
        )
    else:
        source = model_id  # a hub id
    pipe = ENATPipeline.from_pretrained(source)
    if pipe.is_text_to_image and (pipe.tokenizer is None or pipe.text_encoder is None):
        raise ValueError(
            f"{model_id} is a text-to-image pipeline without tokenizer/text_encoder: the demo needs both."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ helpers


def random_seed() -> int:
    """A fresh seed for the seed box (the Randomise button)."""
    return random.randint(0, MAX_SEED)


def _whole_number(value, name: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {html.escape(value[:40])!r}.")
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
        or not low <= int(value) <= high
    ):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {html.escape(repr(value))}.")
    return int(value)


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = None
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise gr.Error(f"{name} must be a number from {low:g} to {high:g}, got {html.escape(repr(value))}.")
    return float(value)


def clean_text(text: str) -> str:
    """NFC-normalised, control characters (newlines, tabs, ...) turned into spaces, runs of spaces collapsed."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return " ".join(text.split())


def _enlarge(image: PIL.Image.Image, factor: int) -> PIL.Image.Image:
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.3g}"


# --------------------------------------------------------------------------------------------------- demo


class EnatDemo:
    """The demo around one loaded pipeline: the handlers, the FLOPs cache, and `build()` for the Gradio UI."""

    def __init__(self, pipe: ENATPipeline, model_id: str = "", max_images: int = MAX_IMAGES):
        self.pipe = pipe
        self.model_id = model_id
        self.max_images = max_images
        self.is_text = pipe.is_text_to_image
        config = pipe.transformer.config
        self.side = config.sample_size
        self.num_tokens = self.side * self.side
        self.resolution = self.side * pipe.vae_scale_factor
        self.display_factor = max(1, DISPLAY_SIZE // self.resolution)
        self.fixed_steps = pipe.scheduler.strategy_num_steps  # a per-step strategy fixes the number of steps
        # ... and those of its settings that it lists per step (AutoNAT strategies); the sliders are then read-only
        self.fixed_settings = {name for name in SETTINGS if pipe.scheduler.config.get(name + "s") is not None}
        self.max_steps = self.fixed_steps or min(self.num_tokens // pipe.token_patch_size**2, 64)  # one unit a step
        self.default_steps = self.fixed_steps or min(8, self.max_steps)
        scheduler_config = pipe.scheduler.config
        self.default_guidance = min(float(scheduler_config.guidance_scale), MAX_GUIDANCE)
        self.default_mask_temperature = min(float(scheduler_config.mask_temperature), MAX_MASK_TEMPERATURE)
        self.default_sampling_temperature = min(float(scheduler_config.sampling_temperature), MAX_SAMPLING_TEMPERATURE)
        self.class_names: Dict[int, str] = {}
        if not self.is_text:
            id2label = pipe.config.id2label or {}
            self.class_names = {
                i: str(id2label.get(i, id2label.get(str(i), f"class {i}"))) for i in range(config.num_classes)
            }
        self.flops_cache: Dict[Tuple[int, bool, bool], float] = {}  # (steps, guided, reuse) -> FLOPs per image
        self.output_dir = tempfile.mkdtemp(prefix="enat-space-")
        atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)
        self._lock = threading.Lock()
        # ZeroGPU runs the decorated function in a forked GPU worker: it gets and returns plain picklable values
        self._run_on_device = gpu(self._device_generate)

    # ----------------------------------------------------------------------------------------- conditions

    @property
    def class_choices(self) -> List[Tuple[str, str]]:
        """The class picker's (label, value) pairs: the value is the class id as text (Gradio shows 0 as empty)."""
        return [(f"{name} ({i})", str(i)) for i, name in self.class_names.items()]

    @property
    def default_condition(self) -> str:
        if self.is_text:
            return SEEN_EXAMPLES[0]
        return str(self.class_examples[0])

    @property
    def class_examples(self) -> List[int]:
        if len(self.class_names) == 1000:
            return IMAGENET_EXAMPLES
        return list(self.class_names)[:6]

    def _prompt(self, prompt) -> Tuple[str, List[str]]:
        """The prompt to generate from, and warnings to show (cut to length)."""
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
        text = clean_text(prompt)
        if not text:
            raise gr.Error(f"Please enter a prompt, for example “{SEEN_EXAMPLES[0]}”.")
        reasons = []
        if len(text) > MAX_PROMPT_CHARS:
            cut = text[:MAX_PROMPT_CHARS]
            text = cut.rsplit(" ", 1)[0] if " " in cut else cut
            reasons.append(f"it is longer than {MAX_PROMPT_CHARS} characters")
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length

        def fits(candidate: str) -> bool:
            return len(tokenizer(candidate, verbose=False).input_ids) <= limit

        if not fits(text):
            words = text.split(" ")
            low, high = 0, len(words)  # the longest run of whole words that fits
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if fits(" ".join(words[:middle])) else (low, middle - 1)
            if low > 0:
                text = " ".join(words[:low])
            else:  # one very long word
                low, high = 1, len(words[0])
                while low < high:
                    middle = (low + high + 1) // 2
                    low, high = (middle, high) if fits(words[0][:middle]) else (low, middle - 1)
                text = words[0][:low]
            reasons.append(f"the text encoder reads at most {limit} tokens")
        notes = []
        if reasons:
            shown = text if len(text) <= 120 else text[:117] + "..."
            notes.append(f"The prompt was cut ({' and '.join(reasons)}) to “{html.escape(shown)}”.")
        return text, notes

    def _class_id(self, value) -> int:
        """A class id from the picker's value (an id), an id as text, or a class name."""
        if value is None or (isinstance(value, str) and not value.strip()):
            raise gr.Error("Please pick a class.")
        if isinstance(value, str):
            value = value.strip()
            if value.endswith(")") and "(" in value:  # "golden retriever (207)", as shown in the picker
                value = value.rsplit("(", 1)[1][:-1].strip()
            if value.lstrip("-").isdigit():
                value = int(value)
            else:
                try:
                    return self.pipe.get_label_ids(value)[0]
                except ValueError as error:
                    raise gr.Error(html.escape(str(error)))
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in self.class_names:
            raise gr.Error(
                f"{html.escape(repr(value))} is not a class of this model: pick one of the "
                f"{len(self.class_names)} classes."
            )
        return int(value)

    # -------------------------------------------------------------------------------------------- handlers

    def generate(
        self,
        condition,
        num_inference_steps=None,
        guidance_scale=None,
        seed=0,
        mask_temperature=None,
        sampling_temperature=None,
        reuse_features=True,
        num_images=1,
    ):
        """
        The Generate button. Returns `(gallery, reveal_gif_path, reveal_state, step_slider, step_frame, stats)`;
        raises `gr.Error` with a readable message for bad inputs and failed generations.
        """
        # 1. Inputs (defaults for None), checked before any device time is spent.
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        steps = _whole_number(steps, "Steps", 1, self.max_steps)
        if self.fixed_steps and steps != self.fixed_steps:
            raise gr.Error(f"This model's sampling strategy is for exactly {self.fixed_steps} steps.")
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        guidance = _number(guidance, "Guidance", 0.0, MAX_GUIDANCE)
        mask_t = self.default_mask_temperature if mask_temperature is None else mask_temperature
        mask_t = _number(mask_t, "Mask temperature", 0.0, MAX_MASK_TEMPERATURE)
        sampling_t = self.default_sampling_temperature if sampling_temperature is None else sampling_temperature
        sampling_t = _number(sampling_t, "Sampling temperature", 0.0, MAX_SAMPLING_TEMPERATURE)
        num_images = _whole_number(num_images, "Number of images", 1, self.max_images)
        seed_given = seed is not None and not (isinstance(seed, str) and not seed.strip())
        seed = _whole_number(seed, "Seed", 0, MAX_SEED) if seed_given else random_seed()
        reuse = bool(reuse_features)
        notes = [] if seed_given else [f"No seed given: used the random seed {seed}."]
        if self.is_text:
            text, prompt_notes = self._prompt(condition)
            notes += prompt_notes
            condition_kwargs = {"prompt": text}
            caption = None
        else:
            class_id = self._class_id(condition)
            condition_kwargs = {"class_labels": [class_id]}
            caption = f"{self.class_names[class_id]} ({class_id})"
        for note in notes:
            gr.Warning(note)

        # 2. Generation (on the GPU worker under ZeroGPU), plus one FLOPs measurement per new settings key.
        overrides = dict(guidance_scale=guidance, mask_temperature=mask_t, sampling_temperature=sampling_t)
        overrides = {name: value for name, value in overrides.items() if name not in self.fixed_settings}
        try:  # the scheduler's own schedule on a copy: checks the settings, and tells whether any step is guided
            schedule = copy.deepcopy(self.pipe.scheduler)
            schedule.set_timesteps(steps, **overrides)
        except ValueError as error:
            raise gr.Error(html.escape(str(error)))
        guided = any(scale > 0 for scale in schedule.step_guidance_scales)
        measure = [reuse_key for reuse_key in (True, False) if (steps, guided, reuse_key) not in self.flops_cache]
        settings = dict(num_inference_steps=steps, **overrides)
        try:
            with self._lock:
                result = self._run_on_device(condition_kwargs, settings, seed, reuse, num_images, measure)
        except gr.Error:
            raise
        except torch.OutOfMemoryError:
            raise gr.Error("The device ran out of memory: try fewer images or fewer steps.")
        except (ValueError, TypeError) as error:
            raise gr.Error(f"Could not generate: {html.escape(str(error))}")
        except Exception as error:  # never a traceback in the UI: log it here, show a short message there
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed ({type(error).__name__}). Please try other settings or try again.")
        for reuse_key, flops in result["flops"].items():
            self.flops_cache[(steps, guided, reuse_key)] = flops

        # 3. Outputs: gallery, reveal GIF and slider, stats.
        images = [_enlarge(image, self.display_factor) for image in result["images"]]
        gallery = [(image, f"seed {seed + i}") for i, image in enumerate(images)]
        frames = result["frames"]
        gif_path = self._save_gif(frames)
        state = {"frames": frames, "revealed": result["revealed"], "total": self.num_tokens}
        slider = gr.update(minimum=1, maximum=len(frames), value=len(frames), step=1, interactive=len(frames) > 1)
        stats = self._stats(result, steps, guided, reuse, num_images, seed, condition_kwargs.get("prompt"), caption)
        return gallery, gif_path, state, slider, self.show_step(state, len(frames)), stats

    def show_step(self, state, step):
        """The step slider: the reveal frame of `step` (1-based) with how many tokens are fixed."""
        if not state or not state.get("frames"):
            return gr.update()
        frames = state["frames"]
        try:
            index = min(max(int(step), 1), len(frames)) - 1
        except (TypeError, ValueError):
            index = len(frames) - 1
        label = f"Step {index + 1} of {len(frames)}: {state['revealed'][index]} of {state['total']} tokens fixed"
        return gr.update(value=frames[index], label=label)

    # --------------------------------------------------------------------------------------------- device

    def _generators(self, seed: int, num_images: int) -> List[torch.Generator]:
        # CPU generators, one per image: the same seed gives the same images on any device and in any batch size
        return [torch.Generator().manual_seed(seed + i) for i in range(num_images)]

    def _device_generate(self, condition_kwargs, settings, seed, reuse, num_images, measure) -> dict:
        pipe = self.pipe
        device = pipe._execution_device
        flops = {}
        for reuse_key in measure:  # one image per settings key; the FLOPs do not depend on the seed or condition
            with FlopCounterMode(display=False) as counter:
                pipe(
                    **condition_kwargs,
                    **settings,
                    reuse_features=reuse_key,
                    generator=self._generators(seed, 1),
                    output_type="pt",
                )
            flops[reuse_key] = float(counter.get_total_flops())
        recorder = RevealRecorder()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        images = pipe(
            **condition_kwargs,
            **settings,
            reuse_features=reuse,
            num_images_per_prompt=num_images,
            generator=self._generators(seed, num_images),
            callback_on_step_end=recorder,
        ).images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        mask_token_id = pipe.transformer.mask_token_id
        return {
            "images": images,
            "frames": recorder.frames(pipe, scale=self.display_factor),
            "revealed": [int((ids != mask_token_id).sum()) for ids, _ in recorder.steps],
            "seconds": seconds,
            "device": str(device),
            "flops": flops,
        }

    # -------------------------------------------------------------------------------------------- outputs

    def _save_gif(self, frames) -> str:
        handle, path = tempfile.mkstemp(suffix=".gif", prefix="reveal-", dir=self.output_dir)
        os.close(handle)
        save_gif(frames, path, duration_ms=max(120, min(450, 3600 // max(len(frames), 1))))
        gifs = sorted(Path(self.output_dir).glob("reveal-*.gif"), key=lambda p: p.stat().st_mtime)
        for old in gifs[:-KEEP_GIFS]:
            old.unlink(missing_ok=True)
        return path

    def _stats(self, result, steps, guided, reuse, num_images, seed, prompt, class_name) -> str:
        seconds = result["seconds"]
        with_reuse = self.flops_cache[(steps, guided, True)]
        without_reuse = self.flops_cache[(steps, guided, False)]
        saving = 100 * (1 - with_reuse / without_reuse) if without_reuse else 0.0
        guidance = "on" if guided else "off"
        what = f"**{num_images} image{'s' if num_images > 1 else ''}**"
        if class_name:
            what += f" of *{html.escape(class_name)}*"
        seeds = f"seed {seed}" if num_images == 1 else f"seeds {seed}–{seed + num_images - 1}"
        rows = []
        for reuse_row, flops in ((True, with_reuse), (False, without_reuse)):
            name = f"feature reuse {'on' if reuse_row else 'off'}"
            rows.append(
                f"| {name} ✓ used | **{_gflops(flops)}** |" if reuse_row == reuse else f"| {name} | {_gflops(flops)} |"
            )
        lines = [
            f"{what} ({self.resolution}×{self.resolution}) in **{seconds:.2f} s** ({seconds / num_images:.2f} s per "
            f"image) on `{result['device']}` · {steps} steps · guidance {guidance} · {seeds}",
            "",
            f"| Model FLOPs per image ({steps} steps, guidance {guidance}) | GFLOPs |",
            "| :-- | --: |",
            *rows,
            "",
            f"Feature reuse saves **{saving:.0f}%** of the compute (counted by `torch.utils.flop_counter` over the "
            "text encoder or class embedding, transformer and VQ decoder; measured once per setting).",
        ]
        if prompt is not None:
            try:
                objects = parse_caption(prompt)
            except ValueError:
                objects = None
            if objects is not None and is_held_out(objects):
                lines += [
                    "",
                    "This caption has a **held-out colour–shape pair**: the Shapes training set never shows it.",
                ]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------- UI

    def _fixed(self, name: str, info: Optional[str] = None) -> dict:
        """Slider arguments: read-only, and saying so, when the scheduler's per-step strategy fixes the setting."""
        if name in self.fixed_settings:
            return dict(interactive=False, info="Fixed by this model's per-step sampling strategy")
        return dict(info=info)

    def build(self) -> gr.Blocks:
        kind = "text-to-image" if self.is_text else f"class-conditional, {len(self.class_names)} classes"
        with gr.Blocks(title="ENAT demo", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
            gr.Markdown(
                "# ENAT: masked-token image generation\n"
                "Every image starts as a grid of [MASK] tokens; each step predicts all of them and keeps the most "
                "confident, and with **feature reuse** only the newly revealed tokens are encoded again. "
                f"Model `{html.escape(display_name(self.model_id))}` · {kind} · {self.resolution}×{self.resolution} "
                f"({self.side}×{self.side} tokens).",
                elem_id="enat-header",
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=320):
                    if self.is_text:
                        condition = gr.Textbox(
                            value=self.default_condition,
                            label="Prompt",
                            placeholder="a large red circle on the left and a small blue square on the right",
                            lines=2,
                            max_lines=4,
                            max_length=MAX_PROMPT_CHARS,
                        )
                    else:
                        condition = gr.Dropdown(
                            choices=self.class_choices,
                            value=self.default_condition,
                            label="Class",
                            info="Type to search the class names.",
                            filterable=True,
                        )
                    generate_button = gr.Button("Generate", variant="primary", elem_id="enat-generate")
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            self.max_steps,
                            value=self.default_steps,
                            step=1,
                            label="Steps",
                            interactive=not self.fixed_steps,
                        )
                        num_images = gr.Slider(1, self.max_images, value=4, step=1, label="Images")
                    with gr.Row():
                        guidance = gr.Slider(
                            0,
                            MAX_GUIDANCE,
                            value=self.default_guidance,
                            step=0.1,
                            label="Guidance",
                            **self._fixed("guidance_scale"),
                        )
                        reuse = gr.Checkbox(
                            value=True, label="Feature reuse", info="Encode only newly revealed tokens"
                        )
                    with gr.Row(equal_height=True):
                        seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
                        randomise = gr.Button("Randomise", scale=1, min_width=100)
                    with gr.Accordion("Temperatures", open=False):
                        mask_temperature = gr.Slider(
                            0,
                            MAX_MASK_TEMPERATURE,
                            value=self.default_mask_temperature,
                            step=0.1,
                            label="Mask temperature",
                            **self._fixed("mask_temperature", "Randomness of which tokens are kept (annealed to 0)"),
                        )
                        sampling_temperature = gr.Slider(
                            0,
                            MAX_SAMPLING_TEMPERATURE,
                            value=self.default_sampling_temperature,
                            step=0.1,
                            label="Sampling temperature",
                            **self._fixed("sampling_temperature", "Randomness of the sampled tokens (0: argmax)"),
                        )
                    if self.is_text:
                        gr.Examples(SEEN_EXAMPLES, inputs=[condition], label="Example prompts", cache_examples=False)
                        gr.Examples(
                            HELD_OUT_EXAMPLES,
                            inputs=[condition],
                            label="Held-out colour–shape pairs (never in the training captions)",
                            cache_examples=False,
                        )
                    else:
                        gr.Examples(
                            [[str(i)] for i in self.class_examples],
                            inputs=[condition],
                            label="Example classes",
                            cache_examples=False,
                        )
                with gr.Column(scale=7, min_width=360):
                    gallery = gr.Gallery(
                        label="Images",
                        columns=4,
                        rows=1,  # more rows are added as needed; a fixed second row would be blank
                        height="auto",
                        fit_columns=False,
                        object_fit="contain",
                        format="png",
                        elem_classes=["pixelated"],
                        elem_id="enat-gallery",
                    )
                    stats = gr.Markdown(elem_id="enat-stats")
                    with gr.Row(equal_height=False):
                        reveal_gif = gr.Image(
                            label="Reveal of the first image",
                            type="filepath",
                            format="gif",
                            interactive=False,
                            elem_classes=["pixelated"],
                            elem_id="enat-reveal",
                        )
                        with gr.Column():
                            step_frame = gr.Image(
                                label="Reveal frame",
                                type="pil",
                                format="png",
                                interactive=False,
                                elem_classes=["pixelated"],
                                elem_id="enat-step-frame",
                            )
                            step_slider = gr.Slider(
                                1,
                                max(self.default_steps, 2),
                                value=1,
                                step=1,
                                label="Step",
                                interactive=False,
                                elem_id="enat-step-slider",
                            )
                    gr.Markdown(
                        "Faded cells are still [MASK]; crisp cells are tokens already fixed (they never change "
                        "again). Each frame decodes the model's current prediction of every token."
                    )
            reveal_state = gr.State()

            generate_inputs = [
                condition,
                steps,
                guidance,
                seed,
                mask_temperature,
                sampling_temperature,
                reuse,
                num_images,
            ]
            generate_outputs = [gallery, reveal_gif, reveal_state, step_slider, step_frame, stats]
            gr.on(
                [generate_button.click, condition.submit] if self.is_text else [generate_button.click],
                self.generate,
                inputs=generate_inputs,
                outputs=generate_outputs,
                api_name="generate",
                concurrency_limit=CONCURRENCY_LIMIT,
                concurrency_id="generate",
                trigger_mode="once",
            )
            randomise.click(random_seed, outputs=seed, api_name="random_seed", queue=False)
            step_slider.input(
                self.show_step,
                inputs=[reveal_state, step_slider],
                outputs=step_frame,
                api_visibility="private",
                queue=False,
                show_progress="hidden",
                trigger_mode="always_last",
            )
        blocks.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
        return blocks


def launch(blocks: gr.Blocks, **kwargs):
    """`blocks.launch` with the demo's theme and CSS (Gradio 6 takes them at launch)."""
    return blocks.launch(theme=THEME, css=CSS, **kwargs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run the ENAT Gradio demo.")
    parser.add_argument(
        "--model", default=None, help="Hub id or pipeline folder (default: $MODEL_ID, else pretrained/enat-shapes)."
    )
    parser.add_argument(
        "--host", default=None, help="Address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)."
    )
    parser.add_argument(
        "--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT, else 7860 or the next free one)."
    )
    parser.add_argument(
        "--max-images", type=int, default=MAX_IMAGES, help=f"Images per request at most (default {MAX_IMAGES})."
    )
    return parser.parse_args(argv)


def main(argv=None, prevent_thread_lock: bool = False):
    """Loads the pipeline once and serves the demo; returns the launched `gr.Blocks` with `prevent_thread_lock`."""
    args = parse_args(argv)
    if args.max_images < 1:
        sys.exit("error: --max-images must be at least 1")
    model_id = args.model or default_model_id()
    print(f"Loading {model_id} ...", flush=True)
    try:
        pipe = load_pipeline(model_id)
    except (OSError, ValueError) as error:  # FileNotFoundError, hub errors, broken folders
        sys.exit(f"error: could not load {model_id}: {error}")
    blocks = EnatDemo(pipe, model_id, max_images=args.max_images).build()
    launch(blocks, server_name=args.host, server_port=args.port, prevent_thread_lock=prevent_thread_lock)
    return blocks


if __name__ == "__main__":
    main()
