# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
What the training scripts of `examples/` (`train_vqgan.py`, `train_text_encoder.py`, `train_enat.py`,
`finetune_vq_decoder.py`) share: their common arguments, the training data (read with 🤗 datasets), image loading,
the output folder, and checkpoints.

**Checkpoints hold no pickles that are loaded with code.** The state of the objects a script registers
(`register_training_state`: the sampling generator, the codebook monitor, the EMA's counters) is written into every
checkpoint as `training_state.json` and `training_state.safetensors`. Accelerate's own
`register_for_checkpointing` would write them as `custom_checkpoint_*.pkl` and unpickle those on resume, running
whatever code such a file holds; nothing here reads that name. (The optimizer, scheduler and random states accelerate
writes itself are read with `torch.load(weights_only=True)`.)

**Checkpoints are complete or ignored.** `save_checkpoint` writes into a hidden staging folder, adds
`checkpoint_manifest.json` (every file with its size) and renames the folder to `checkpoint-<step>`.
`find_resume_checkpoint` checks it against the manifest before anything is loaded (a file missing, cut short, changed
or added is refused): `--resume_from_checkpoint latest` then skips that checkpoint with a warning and resumes from the
newest intact one.
"""

import argparse
import hashlib
import json
import logging
import math
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import VQModel
from diffusers.optimization import SchedulerType, get_scheduler
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cli import (
    OutputLock,
    UsageError,
    add_debug_argument,
    check_output_dir,
    commit_staging_dir,
    error_line,
    is_bookkeeping,
    model_folder_kind,
    move_into_place,
    new_staging_dir,
)


logger = get_logger(__name__)

METADATA_FILE = "metadata.jsonl"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
MANIFEST_FILE = "checkpoint_manifest.json"
TRAINING_STATE = "training_state"


# ---------------------------------------------------------------------------------------------------- arguments


def training_parser(
    description: str, data_help: str, captions: bool, held_out: Optional[str] = None
) -> argparse.ArgumentParser:
    """A training script's parser (its docstring as `description`), with the data arguments: `--train_data_dir`
    (`data_help` says what it holds), `--resolution`, `--dataloader_num_workers`; with `captions`,
    `--caption_column`; with `held_out` ("images", "pairs"), `--validation_data_dir` and
    `--num_validation_<held_out>`. `add_common_arguments` adds the rest."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, required=True, help=data_help)
    if captions:
        data.add_argument("--caption_column", type=str, default="text", help="Caption key of metadata.jsonl lines.")
    if held_out:
        data.add_argument(
            "--validation_data_dir",
            type=str,
            default=None,
            help=f"Folder of held-out {held_out}. Default: hold out --num_validation_{held_out} of the training ones.",
        )
        data.add_argument(
            f"--num_validation_{held_out}",
            type=int,
            default=64,
            help=f"Number of {held_out} held out of --train_data_dir without --validation_data_dir (%(default)s).",
        )
    data.add_argument(
        "--resolution", type=int, default=64, help="Images are resized (shorter side) and centre-cropped to it."
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Subprocesses that read the images.")
    return parser
    return parser


def add_common_arguments(
    parser: argparse.ArgumentParser,
    required: Sequence[str] = (),
    overwrite: bool = False,
    validation: bool = True,
    **defaults,
):
    """The optimisation, output and checkpoint arguments of every training script (with `overwrite`,
    `--overwrite_output_dir`; with `validation`, `--validation_steps`); `defaults` sets the script's own values (shown
    in `--help`), `required` names those it needs on the command line. The other defaults are diffusers' scripts'."""
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--train_batch_size", type=int, help="Batch size per device (%(default)s).")
    optimisation.add_argument("--max_train_steps", type=int, help="Number of optimiser steps (%(default)s).")
    optimisation.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimiser step."
    )
    optimisation.add_argument("--learning_rate", type=float, help="Peak learning rate (%(default)s).")
    optimisation.add_argument(
        "--lr_scheduler",
        type=str,
        choices=[s.value for s in SchedulerType],
        help="Learning-rate schedule of diffusers.optimization.get_scheduler (%(default)s).",
    )
    optimisation.add_argument("--lr_warmup_steps", type=int, help="Linear warm-up steps (%(default)s).")
    optimisation.add_argument("--adam_beta1", type=float, help="AdamW beta1 (%(default)s).")
    optimisation.add_argument("--adam_beta2", type=float, help="AdamW beta2 (%(default)s).")
    optimisation.add_argument("--adam_weight_decay", type=float, help="AdamW weight decay (%(default)s).")
    optimisation.add_argument("--adam_epsilon", type=float, help="AdamW epsilon (%(default)s).")
    optimisation.add_argument("--max_grad_norm", type=float, help="Clip gradients to this norm (%(default)s).")
    optimisation.add_argument(
        "--mixed_precision",
        type=str,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision (%(default)s; None: the accelerate config). Weights stay float32.",
    )
    optimisation.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, data order, masks.")
    output = parser.add_argument_group("output, logging, checkpoints")
    output.add_argument("--output_dir", type=str, help="Where everything is written (%(default)s).")
    output.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder inside --output_dir.")
    output.add_argument(
        "--report_to", type=str, default="tensorboard", help='Tracker for accelerate ("tensorboard", or "none").'
    )
    output.add_argument(
        "--checkpointing_steps",
        type=int,
        help="Save the training state to OUTPUT_DIR/checkpoint-STEP every N steps (%(default)s).",
    )
    output.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-STEP folder, or "latest": the newest complete checkpoint in --output_dir (a new run if '
        "there is none).",
    )
    if overwrite:
        output.add_argument(
            "--overwrite_output_dir",
            action="store_true",
            help="Start a new run in a --output_dir that holds files already (its earlier checkpoints are removed; "
            "other files are replaced only where this run writes the same names). Never a pipeline or model folder.",
        )
    if validation:
        output.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (%(default)s).")
    add_debug_argument(parser)
    base = dict(train_batch_size=16, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500)
    base.update(adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0)
    parser.set_defaults(**{**base, "mixed_precision": None, "checkpointing_steps": 500, **defaults})
    for action in parser._actions:
        if action.dest in required:
            action.required = True


def check_positive(args, names: Iterable[str]):
    for name in names:
        value = getattr(args, name)
        if value is None or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")


def make_accelerator(args, **kwargs) -> Accelerator:
    """The run's `Accelerator` (trackers and logs in `--output_dir`; the data order of epoch `e` drawn from
    `--seed` and `e`, so that a resumed run sees the batches an uninterrupted one would), with logging set up."""
    output_dir = Path(args.output_dir)
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    accelerator = Accelerator(
        gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        mixed_precision=args.mixed_precision,
        log_with=None if getattr(args, "report_to", "none") == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / getattr(args, "logging_dir", "logs"))
        ),
        **kwargs,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return accelerator


def make_optimizer(args, parameters, accelerator: Accelerator):
    """AdamW with the script's `--adam_*` settings and diffusers' learning-rate schedule."""
    optimizer = torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


def tracker_config(args) -> dict:
    """`vars(args)` as TensorBoard's hyper-parameter table takes it (scalars and strings only, no None)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items() if v is not None}


# --------------------------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """Training images (paths relative to `root`, posix style) and their class ids or captions (several per image
    are possible)."""

    root: Path
    layout: str
    files: List[str]
    labels: Optional[List[int]] = None
    class_names: Optional[List[str]] = None
    captions: Optional[List[List[str]]] = None

    def subset(self, keep: List[int]) -> "TrainingData":
        return TrainingData(
            root=self.root,
            layout=self.layout,
            files=[self.files[i] for i in keep],
            labels=None if self.labels is None else [self.labels[i] for i in keep],
            class_names=self.class_names,
            captions=None if self.captions is None else [self.captions[i] for i in keep],
        )

    def paths(self) -> List[Path]:
        return [self.root / file for file in self.files]


def examples(items, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, with the total when there are more."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _imagefolder(root: Path, **kwargs):
    """🤗 datasets' `imagefolder` of `root` (the "train" split), its images as paths (not decoded)."""
    import datasets

    if not list_images(root):
        return None
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", **kwargs)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:  # e.g. a metadata line that is not JSON
        cause = error.__cause__ or error
        raise ValueError(f"{root / METADATA_FILE} cannot be read: {' '.join(str(cause).split())}") from None
    return dataset.cast_column("image", datasets.Image(decode=False))


def _relative(root: Path, path: Optional[str]) -> Optional[str]:
    return None if path is None else Path(path).relative_to(root.absolute()).as_posix()


def list_images(root: Path) -> List[str]:
    """The image files under `root` (recursive), as sorted posix paths relative to it: the files that 🤗 datasets'
    `imagefolder` reads (its image extensions; no hidden files or folders, nor ones whose name starts with `__`),
    listed directly, as `load_dataset` takes about 25 s to resolve 30,000 files."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"the data folder {root} does not exist")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.suffix.lower() in extensions and path.is_file():
            if not any(part.startswith((".", "__")) for part in relative.parts):
                files.append(relative.as_posix())
    return sorted(files)


def _check_caption(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no caption (a non-empty string); every image needs one.")
    return text


def read_imagefolder_captions(root: Path, caption_column: str = "text") -> TrainingData:
    """A 🤗 `imagefolder` with captions: `root/metadata.jsonl` lines `{"file_name": ..., caption_column: ...}`. An
    image with several lines has several captions. Every line must name an existing image and give a caption, and
    every image needs one."""
    root = Path(root)
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise UsageError(
            f"no captions: {metadata} does not exist. The data must be a Hugging Face imagefolder with captions: "
            f'{metadata} with one line {{"file_name": ..., "{caption_column}": ...}} per image'
        )
    dataset = _imagefolder(root)
    if dataset is None:
        raise UsageError(f"{root} holds no images")
    if caption_column not in dataset.column_names:
        raise ValueError(f"{metadata} has no {caption_column!r} column (it has {dataset.column_names}).")
    captions: Dict[str, List[str]] = {}
    no_file_name = []
    for image, text in zip(dataset["image"], dataset[caption_column]):
        if image is None:
            no_file_name.append(repr(text))
            continue
        file = _relative(root, image["path"])
        captions.setdefault(file, []).append(_check_caption(text, f"{metadata}: {file!r}, column {caption_column!r}"))
    if no_file_name:
        raise ValueError(
            f"{len(no_file_name)} lines of {metadata} have no file_name (their captions: {examples(no_file_name)})."
        )
    missing = [file for file in captions if not (root / file).is_file()]
    if missing:
        raise ValueError(f"{metadata} names {len(missing)} images that are not in {root}: {examples(missing)}.")
    uncaptioned = sorted(set(list_images(root)).difference(captions))
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} images in {root} have no caption in {METADATA_FILE}: {examples(uncaptioned)}."
        )
    return TrainingData(root, METADATA_FILE, list(captions), captions=list(captions.values()))


def read_coco_captions(root: Path, annotations_file: Path) -> TrainingData:
    """MS-COCO captions (`images`: id, file_name; `annotations`: image_id, caption) mapped onto the `imagefolder` of
    `root`: every annotated image must be there, and each gets all its captions."""
    root, annotations_file = Path(root), Path(annotations_file)
    with open(annotations_file, encoding="utf-8") as file:
        try:
            data = json.load(file)
        except ValueError as error:
            raise ValueError(f"{annotations_file} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise ValueError(f"{annotations_file} is not an MS-COCO captions file (no `images` and `annotations` lists).")
    files = {image["id"]: Path(image["file_name"]).as_posix() for image in data["images"]}
    by_file = {file: [] for file in files.values()}
    for annotation in data["annotations"]:
        if annotation.get("image_id") not in files:
            raise ValueError(
                f"{annotations_file}: annotation {annotation.get('id')} refers to image id "
                f"{annotation.get('image_id')}, which is not in `images`."
            )
        where = f"{annotations_file}: annotation {annotation.get('id')}"
        by_file[files[annotation["image_id"]]].append(_check_caption(annotation.get("caption"), where))
    uncaptioned = [file for file, texts in by_file.items() if not texts]
    if uncaptioned:
        raise ValueError(f"{len(uncaptioned)} images of {annotations_file} have no caption: {examples(uncaptioned)}.")
    dataset = _imagefolder(root, drop_labels=True, drop_metadata=True)
    if dataset is None:
        raise UsageError(f"{root} holds no images")
    dataset = dataset.map(lambda row: {"file": _relative(root, row["image"]["path"])}, remove_columns=["image"])
    dataset = dataset.filter(lambda row: row["file"] in by_file)  # the folder may hold images of other splits
    dataset = dataset.map(lambda row: {"captions": by_file[row["file"]]})
    found = set(dataset["file"])
    missing = [file for file in by_file if file not in found]
    if missing:
        raise ValueError(
            f"{annotations_file} names {len(missing)} images that are not in {root}: {examples(missing)}."
        )
    return TrainingData(root, "MS-COCO captions", dataset["file"], captions=dataset["captions"])


def read_class_folders(root: Path) -> TrainingData:
    """torchvision `ImageFolder` layout: `root/<class name>/**/<image>`; class ids follow the sorted folder names."""
    root = Path(root)
    class_names = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        raise ValueError(
            f"{root} has images but no class sub-folders: a class-conditional model needs one folder of images per "
            "class (a text-to-image model's transformer config has `text_embed_dim` instead of `num_classes`)."
        )
    files = [file for file in list_images(root) if "/" in file and file.split("/")[0] in class_names]
    label_of = {name: label for label, name in enumerate(class_names)}
    labels = [label_of[file.split("/")[0]] for file in files]
    empty = [name for label, name in enumerate(class_names) if label not in labels]
    if empty:
        raise ValueError(f"These class folders of {root} hold no images: {examples(empty)}.")
    return TrainingData(root, "class folders", files, labels=labels, class_names=class_names)


def readable(paths: Sequence[Path]) -> List[Path]:
    """The `paths` PIL can open (checked without decoding); the others are skipped with a warning naming them."""
    kept = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            logger.warning(f"skipping unreadable image {path}: {error}")
            continue
        kept.append(path)
    return kept


def split_held_out(items: list, count: int, seed: int, what: str, flag: str) -> Tuple[list, list]:
    """`items` without and with `count` of them held out for validation (a seeded permutation picks them)."""
    if count >= len(items):
        raise ValueError(
            f"{flag} {count} leaves no training {what} out of {len(items)}; lower it or pass --validation_data_dir"
        )
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held_out], [x for i, x in enumerate(items) if i in held_out]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB in [0, 1], shape (3, resolution, resolution): short side resized to `resolution`, centre crop (ADM's)."""
    with Image.open(path) as file:
        image = ImageOps.exif_transpose(file).convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    if size != image.size:
        image = image.resize(size, resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def vq_token_ids(vqvae: VQModel, pixels: torch.Tensor) -> torch.LongTensor:
    """(B, 3, H, W) images in [0, 1] -> (B, h * w) codebook ids in raster order."""
    latents = vqvae.encode(pixels).latents
    _, _, (_, _, indices) = vqvae.quantize(latents)
    return indices.reshape(pixels.shape[0], -1)


# ------------------------------------------------------------------------------------------------ output folder


def checkpoint_dirs(output_dir: Path) -> List[Path]:
    """`checkpoint-<step>` folders in `output_dir`, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [path for path in Path(output_dir).iterdir() if CHECKPOINT_PATTERN.fullmatch(path.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.fullmatch(Path(path).name).group(1))


class TrainingOutput:
    r"""
    A training run's `--output_dir` under the output-folder policy (`enat_diffusers.utils.cli`): checked before any
    work, locked against a second run while this one lives, and given its final model files through a staging folder.

    Args:
        output_dir: the folder.
        inputs: the run's inputs (data folders, models, config files), which the folder may not hold.
        resuming (`bool`): the run continues a checkpoint of this folder.
        overwrite (`bool`): a new run may use a folder that holds files already; its stale checkpoints are removed.
        writes_pipeline (`bool`): the script's result is a pipeline folder (so the folder may be one when resuming).
        ignore: entries of the folder that do not make it "used" (the token cache, say).
        overwrite_flag (`str`, *optional*): the script's option that sets `overwrite`, for the messages.
    """

    def __init__(
        self,
        output_dir,
        inputs=(),
        resuming=False,
        overwrite=False,
        writes_pipeline=False,
        ignore=(),
        overwrite_flag=None,
    ):
        self.path = Path(output_dir)
        self.overwrite_flag = overwrite_flag
        self.inputs, self.resuming, self.overwrite = tuple(inputs), resuming, overwrite
        self.writes_pipeline, self.ignore = writes_pipeline, {Path(p).resolve() for p in ignore}
        self.lock, self.started = None, False

    def check(self):
        kind = model_folder_kind(self.path) if self.path.is_dir() else None
        allowed = self.writes_pipeline and self.resuming
        if kind and not allowed:
            job = "this script does not update it"
            if self.writes_pipeline:
                job = "it is continued only from its own checkpoints"
            raise UsageError(
                f"--output_dir {self.path} is {kind}: {job}, so nothing in it is replaced; choose another folder"
            )
        check_output_dir(self.path, self.inputs, "--output_dir", allow_model_folder=allowed)
        if self.resuming or self.overwrite or not self.path.is_dir():
            return
        used = sorted(
            entry.name
            for entry in self.path.iterdir()
            if not is_bookkeeping(entry.name) and entry.resolve() not in self.ignore
        )
        if used:
            also = f", or pass {self.overwrite_flag} to start a new run in it" if self.overwrite_flag else ""
            raise UsageError(
                f"--output_dir {self.path} is not empty ({examples(used, 3)}): use a new folder, continue the run "
                f"that is there with --resume_from_checkpoint latest{also}"
            )

    def start(self, accelerator: Accelerator):
        """Checks (every process), then the main process creates and locks the folder; a new run with `overwrite`
        removes the checkpoints an earlier run left there. Once per run: a second call does nothing."""
        if self.started:
            return
        self.started = True
        self.check()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.lock = OutputLock(self.path, f"--output_dir {self.path}").acquire()
            if self.overwrite and not self.resuming:
                for stale in checkpoint_dirs(self.path):
                    logger.warning(f"Removing {stale}: a checkpoint of an earlier run (--overwrite_output_dir).")
                    shutil.rmtree(stale)
        accelerator.wait_for_everyone()

    def save(self, save):
        """`save(staging_dir)` on the main process; then every entry it wrote replaces the one of that name."""
        staging = new_staging_dir(self.path)
        try:
            save(staging)
            return commit_staging_dir(staging, self.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class TrainingRun:
    r"""
    The skeleton the training scripts share: the accelerator, the checked and locked `--output_dir`, the checkpoint to
    resume from, the epoch loop over a dataloader (a resumed run skips the batches it trained), optimiser steps,
    checkpoints and the progress bar. Use it as a context manager: the folder's lock is released at the end.

    Args:
        args: the script's arguments (`add_common_arguments`).
        inputs: the run's input paths (never inside `--output_dir`).
        writes_pipeline (`bool`): the result is a pipeline folder (see `TrainingOutput`).
        ignore: entries of `--output_dir` that do not make it "used".
        accelerator_kwargs: more arguments of the `Accelerator`.
    """

    def __init__(self, args, inputs, writes_pipeline=False, ignore=(), **accelerator_kwargs):
        self.args = args
        self.accelerator = make_accelerator(args, **accelerator_kwargs)
        set_seed(args.seed)  # the initialisation of new models
        self.checkpoint = find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
        overwrite = getattr(args, "overwrite_output_dir", False)
        self.output = TrainingOutput(
            args.output_dir,
            inputs,
            resuming=self.checkpoint is not None,
            # a component script asked to resume may start in a used folder (not a model folder) without checkpoints
            overwrite=overwrite or (args.resume_from_checkpoint is not None and not writes_pipeline),
            writes_pipeline=writes_pipeline,
            ignore=ignore,
            overwrite_flag="--overwrite_output_dir" if hasattr(args, "overwrite_output_dir") else None,
        )
        self.output_dir = self.output.path
        self.global_step, self.last_checkpoint = 0, None
        self.before_checkpoint = []  # callables every process runs before a checkpoint is written
        self.progress = None

    def __enter__(self):
        self.output.check()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if self.progress is not None:
            self.progress.close()
        if exc_type is None:
            self.accelerator.end_training()
        self.output.release()

    def dataloader(self, dataset, **kwargs) -> torch.utils.data.DataLoader:
        """Shuffled batches of `--train_batch_size` (a last short batch only when it is the only one); once
        prepared, the order of each epoch comes from `--seed` and the epoch."""
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.args.train_batch_size,
            shuffle=True,
            drop_last=len(dataset) >= self.args.train_batch_size,
            num_workers=self.args.dataloader_num_workers,
            **kwargs,
        )

    def prepare(self, model: torch.nn.Module, dataset):
        """AdamW on the trainable parameters of `model` (`make_optimizer`), batches of `dataset`
        (`dataloader`), all prepared by accelerate: `(model, optimizer, dataloader, lr_scheduler)`."""
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer, lr_scheduler = make_optimizer(self.args, trainable, self.accelerator)
        return self.accelerator.prepare(model, optimizer, self.dataloader(dataset), lr_scheduler)

    def start(self, name: str, describe: Dict[str, str], **state) -> int:
        """After `accelerator.prepare`: registers the objects of `state` for checkpoints (JSON and safetensors),
        locks the folder, starts the trackers, loads the checkpoint, logs `describe`. Returns the step to continue
        from."""
        args, accelerator = self.args, self.accelerator
        register_training_state(accelerator, **state)
        self.output.start(accelerator)
        if accelerator.is_main_process:
            accelerator.init_trackers(name, config=tracker_config(args))
        total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        for what, value in {**describe, "Total batch size (parallel, accumulation)": total_batch_size}.items():
            logger.info(f"  {what} = {value}")
        logger.info(f"  Optimisation steps = {args.max_train_steps}")
        if self.checkpoint is not None:
            accelerator.print(f"Resuming from checkpoint {self.checkpoint}")
            load_checkpoint(accelerator, self.checkpoint)
            self.global_step = self.last_checkpoint = checkpoint_step(self.checkpoint)
        self.progress = tqdm(
            total=args.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        return self.global_step

    def batches(self, dataloader):
        """The batches left, epoch after epoch (a resumed run's first epoch skips those it trained), until
        `--max_train_steps` optimiser steps are done."""
        args, accelerator = self.args, self.accelerator
        steps_per_epoch, epochs = num_epochs(args.max_train_steps, len(dataloader), args.gradient_accumulation_steps)
        first_epoch, skip = resume_position(self.global_step, steps_per_epoch, args.gradient_accumulation_steps)
        for epoch in range(first_epoch, epochs):
            dataloader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(dataloader, skip) if epoch == first_epoch and skip else dataloader
            for batch in batches:
                if self.global_step >= args.max_train_steps:
                    return
                yield batch

    def optimizer_step(self, model, loss, optimizer, lr_scheduler):
        """Backward, clipping to `--max_grad_norm` (when set, on the steps that update), the optimiser and
        scheduler steps; inside `accelerator.accumulate(model)`."""
        self.accelerator.backward(loss)
        if self.args.max_grad_norm is not None and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def step_done(self) -> bool:
        """After a batch: whether it completed an optimiser step (then counted)."""
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        self.progress.update(1)
        return True

    def save_checkpoint(self):
        """`checkpoint-<step>` of the current step (every process calls it)."""
        for prepare in self.before_checkpoint:
            prepare()
        save_checkpoint(self.accelerator, self.output_dir, self.global_step, self.args.checkpoints_total_limit)
        self.last_checkpoint = self.global_step

    def save_checkpoint_if_due(self, final: bool = False):
        """A checkpoint every `--checkpointing_steps` steps, and with `final` at the end of the run if the last step
        has none yet."""
        if self.global_step % self.args.checkpointing_steps == 0 or final and self.last_checkpoint != self.global_step:
            self.save_checkpoint()

    def validation_due(self) -> bool:
        return self.global_step % self.args.validation_steps == 0 and self.accelerator.is_main_process


# ------------------------------------------------------------------------------------------------- checkpoints


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when `path` is a checkpoint exactly as its save wrote it (every file of its manifest there, with its
    size and SHA-256, and no other file), else what is wrong."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return f"it has no {MANIFEST_FILE} (an interrupted save, or a checkpoint of an earlier version)"
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its {MANIFEST_FILE} cannot be read ({error!r})"
    on_disk = {file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file()} - {MANIFEST_FILE}
    missing = sorted(set(expected) - on_disk)
    if missing:
        return f"{examples(missing, 3)} {'is' if len(missing) == 1 else 'are'} missing"
    extra = sorted(on_disk - set(expected))
    if extra:
        return f"it holds {examples(extra, 3)}, which its save did not write (and which is never loaded)"
    changed = [
        name
        for name, (size, sha256) in expected.items()
        if (path / name).stat().st_size != size or file_sha256(path / name) != sha256
    ]
    if changed:
        return f"{examples(changed, 3)} changed after the save (size or SHA-256)"
    return None


def find_resume_checkpoint(resume_from_checkpoint: Optional[str], output_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: None for a new run; "latest" is the newest complete checkpoint of `output_dir`
    (incomplete newer ones are skipped with a warning; a UsageError when every checkpoint there is incomplete)."""
    if resume_from_checkpoint is None:
        return None
    output_dir = Path(output_dir)
    if resume_from_checkpoint == "latest":
        skipped = []
        for path in reversed(checkpoint_dirs(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                for other, reason in skipped:
                    logger.warning(f"{other} is incomplete ({reason}): resuming from {path} instead.")
                return path
            skipped.append((path, problem))
        if skipped:
            reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
            raise UsageError(
                f"no complete checkpoint in {output_dir} ({reasons}); delete them to start a new run there"
            )
        logger.info(f"No checkpoint in {output_dir}: starting a new run.")
        return None
    path = Path(resume_from_checkpoint)
    path = path if path.is_dir() else output_dir / path
    if not path.is_dir() or not CHECKPOINT_PATTERN.fullmatch(path.name):
        raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint} is not a checkpoint-<step> folder")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UsageError(f"--resume_from_checkpoint {path} is incomplete: {problem}")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path):
    """`accelerator.load_state(path)`, with what its files may hold that this run cannot load (a pickle refused by
    `weights_only`, tensors of another model, a file its manifest was rewritten for) as a UsageError naming `path`."""
    try:
        accelerator.load_state(str(path))
    except UsageError:
        raise
    except pickle.UnpicklingError as error:
        raise UsageError(
            f"the checkpoint {path} cannot be loaded: a file in it holds objects that loading with weights_only "
            "refuses (it was not written by this run's save); resume from another checkpoint or delete it"
        ) from error
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, SafetensorError) as error:
        raise UsageError(
            f"the checkpoint {path} cannot be loaded ({type(error).__name__}: {error_line(error)}); "
            "resume from another checkpoint or delete it"
        ) from error


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: Optional[int] = None) -> Path:
    """
    Every process calls it; the main process writes `output_dir/checkpoint-<step>` (`accelerator.save_state`) into a
    staging folder, adds the manifest and renames it into place, after removing the oldest checkpoints beyond
    `total_limit`.
    """
    output_dir = Path(output_dir)
    path = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        if total_limit is not None:
            existing = [old for old in checkpoint_dirs(output_dir) if old != path]
            for old in existing[: max(0, len(existing) - total_limit + 1)]:
                logger.info(f"Removing {old} (--checkpoints_total_limit {total_limit}).")
                shutil.rmtree(old)
        staging = new_staging_dir(output_dir)
        try:
            accelerator.save_state(str(staging))
            files = {
                file.relative_to(staging).as_posix(): {"size": file.stat().st_size, "sha256": file_sha256(file)}
                for file in sorted(staging.rglob("*"))
                if file.is_file()
            }
            (staging / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
            move_into_place(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info(f"Saved the training state to {path}.")
    accelerator.wait_for_everyone()
    return path


def resume_position(step: int, steps_per_epoch: int, gradient_accumulation_steps: int) -> Tuple[int, int]:
    """(epoch, batches of that epoch to skip) of a run resumed after `step` optimiser steps."""
    epoch, steps = divmod(step, steps_per_epoch)
    return epoch, steps * gradient_accumulation_steps


def num_epochs(max_train_steps: int, num_batches: int, gradient_accumulation_steps: int) -> Tuple[int, int]:
    """(optimiser steps per epoch, epochs) of a run."""
    steps_per_epoch = math.ceil(num_batches / gradient_accumulation_steps)
    return steps_per_epoch, math.ceil(max_train_steps / steps_per_epoch)


# -------------------------------------------------------------------------------------- state without pickles


def save_training_state(folder: Path, objects: Dict[str, object]):
    """Writes `obj.state_dict()` of every named object: tensors (alone or in lists) into
    `training_state.safetensors`, every other value (JSON types only) into `training_state.json`."""
    tensors, description = {}, {"format": 1, "objects": {}}
    for name, obj in objects.items():
        values, tensor_keys = {}, {}
        for key, value in obj.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
                tensor_keys[key] = None
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                for index, item in enumerate(value):
                    tensors[f"{name}.{key}.{index}"] = item.detach().cpu().contiguous()
                tensor_keys[key] = len(value)
            else:
                values[key] = value
        description["objects"][name] = {"values": values, "tensors": tensor_keys}
    folder = Path(folder)
    save_file(tensors, folder / f"{TRAINING_STATE}.safetensors")
    (folder / f"{TRAINING_STATE}.json").write_text(json.dumps(description, indent=1) + "\n")


def load_training_state(folder: Path, objects: Dict[str, object]):
    """Restores what `save_training_state` wrote, checking it: a UsageError names the file and what is wrong."""
    folder = Path(folder)
    json_file, tensor_file = folder / f"{TRAINING_STATE}.json", folder / f"{TRAINING_STATE}.safetensors"
    for file in (json_file, tensor_file):
        if not file.is_file():
            raise UsageError(f"{folder} is not a checkpoint of this script: it has no {file.name}")
    try:
        saved = json.loads(json_file.read_text())["objects"]
        if not isinstance(saved, dict):
            raise TypeError("`objects` is not a mapping")
        tensors = load_file(tensor_file)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise UsageError(f"the training state in {folder} cannot be read: {error}") from None
    for name, obj in objects.items():
        entry = saved.get(name)
        try:
            state = dict(entry["values"])
            for key, count in entry["tensors"].items():
                if count is None:
                    state[key] = tensors[f"{name}.{key}"]
                else:
                    state[key] = [tensors[f"{name}.{key}.{index}"] for index in range(int(count))]
            obj.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
            raise UsageError(f"{json_file}: the saved state of {name!r} does not fit this run ({error!r})") from None


class EMAState:
    """The counters of a diffusers `EMAModel` (`optimization_step`, the decay settings) as a checkpointable object:
    its `state_dict` without the shadow parameters, which are saved as a model."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {key: value for key, value in self.ema.state_dict().items() if key != "shadow_params"}

    def load_state_dict(self, state: dict):
        self.ema.load_state_dict({key: value for key, value in state.items() if key != "shadow_params"})


def register_training_state(accelerator: Accelerator, **objects):
    """Saves the state of `objects` (each with `state_dict()` and `load_state_dict()`) into every checkpoint and
    restores it on `accelerator.load_state`, as JSON and safetensors (`save_training_state`): never as a pickle."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_training_state(Path(output_dir), objects)

    def load_hook(models, input_dir):
        load_training_state(Path(input_dir), objects)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
