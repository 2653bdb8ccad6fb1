# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train or fine-tune an ENAT transformer (class-conditional or text-to-image) with accelerate.

The recipe is ENAT's (LeapLabTHU/ENAT `train.py`, `libs/nat_misc.py`):

- images are tokenised once by the pipeline's VQ model, each with its horizontal flip (`--no_random_flip` turns the
  flips off: do that when captions name left and right), and the token ids are cached on disk;
- one mask ratio per batch from Beta(12, 3) (`MaskedTokenScheduler.add_noise`; `--beta_alpha_beta` changes it),
  cross-entropy on the masked positions only with label smoothing 0.1, condition dropout p = 0.15 (null class /
  empty prompt) for guidance;
- AdamW (lr 4e-4, weight decay 0.03, betas (0.99, 0.99)) with a linear warm-up, an EMA of the weights (diffusers'
  `EMAModel`, decay `--ema_decay` per step; `--no_use_ema` trains without);
- editing masks (this package's addition, off by default): with `--region_mask_prob P` a batch is masked as
  inpainting masks it, the ratio applied inside a random half or quarter of each grid with the rest visible; it
  raised inpainting ShapesEval of the Shapes model from 31.0 to 37.3 % in a 250-step fine-tune (README, Editing);
- reuse training: with probability 0.5 the EMA model first runs (without gradients) on the input with a random
  fraction of its visible tokens masked as well, and the training forward takes that output's `reuse_state`, so the
  model learns to use the previous step's features as sampling will feed them.

`--use_lora` fine-tunes a LoRA (peft) of `--rank` on the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) of
a pretrained transformer instead of all its weights; the output folder then holds the adapter,
`pytorch_lora_weights.safetensors`, which `pipe.load_lora_weights(output_dir)` loads into the pretrained pipeline.

Data layouts (`--train_data_dir`, read with 🤗 datasets' `imagefolder`; `--resolution` defaults to the transformer's
grid side times the VQ model's downsampling factor):

- class-conditional: one sub-folder of images per class (torchvision `ImageFolder`; classes in sorted order);
- text-to-image, Hugging Face `imagefolder`: `metadata.jsonl` lines `{"file_name": ..., "text": ...}`;
- text-to-image, MS-COCO: `--coco_annotations_file captions_train2017.json --train_data_dir train2017/`.
  An image with several captions is one sample whose caption is drawn at random each time, so every caption is used.

The output folder ends as a complete pipeline (`ENATPipeline.from_pretrained(output_dir)`, EMA weights), next to
`checkpoint-*/`, `train_log.csv`, `loss_curve.png`, `validation/` grids and the TensorBoard logs. It must be new (or
empty) unless the run continues from one of its checkpoints, and it may not hold the inputs.

A new text-to-image model on the Shapes data set, from a trained VQ model and text encoder:

    accelerate launch examples/train_enat.py \\
        --vqvae_name_or_path vqgan-shapes --text_encoder_name_or_path clip-shapes \\
        --transformer_config shapes_transformer.json --train_data_dir shapes/train --no_random_flip \\
        --output_dir enat-shapes --train_batch_size 64 --max_train_steps 2000 --lr_warmup_steps 100 \\
        --ema_decay 0.999 --validation_prompts "a small red circle on the left" --validation_steps 500

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`.
"""

import copy
import csv
import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from diffusers import VQModel
from diffusers.training_utils import EMAModel, _collate_lora_metadata
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from enat_diffusers import (
    ENATPipeline,
    ENATReuseState,
    ENATTransformer2DModel,
    MaskedTokenScheduler,
    NATTransformer2DModel,
)
from enat_diffusers.schedulers.scheduling_masked_token import lowest_scores_mask
from enat_diffusers.utils.cli import (
    UsageError,
    check_config_types,
    check_output_dir,
    error_line,
    run_cli,
    write_file_atomically,
)
from enat_diffusers.utils.token_groups import expand_group_mask, grid_side, group_mask
from enat_diffusers.utils.training import (
    METADATA_FILE,
    EMAState,
    TrainingData,
    TrainingRun,
    add_common_arguments,
    check_positive,
    examples,
    list_images,
    load_image,
    make_optimizer,
    read_class_folders,
    read_coco_captions,
    read_imagefolder_captions,
    training_parser,
    vq_token_ids,
)
from enat_diffusers.visualization import captioned_grid


logger = get_logger(__name__, log_level="INFO")

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # the paper's MS-COCO text encoder
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of ENATAttention
LOG_FIELDS = ("step", "loss", "learning_rate", "mask_ratio", "reuse_fraction", "tokens_per_second", "seconds")


def parse_args(input_args=None):
    data_help = "Class sub-folders (class-conditional), or images with a metadata.jsonl, or the COCO image folder."
    parser = training_parser(__doc__, data_help, captions=True)
    # models
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help=(
            "A pipeline folder or Hub repo id. Its `vqvae/`, `scheduler/`, `text_encoder/` and `tokenizer/` are used "
            "when present, and its `transformer/` is fine-tuned unless --transformer_config is given."
        ),
    )
    parser.add_argument(
        "--ungroup",
        action="store_true",
        help=(
            "Fine-tune the pretrained token-group transformer (patch_size > 1) with one position per token "
            "(`ENATTransformer2DModel.ungroup`): the tokens of a group are then predicted, masked and revealed apart."
        ),
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of Hub repos.")
    parser.add_argument(
        "--transformer_config",
        type=str,
        default=None,
        help="JSON file with the config of a new transformer, trained from scratch: ENATTransformer2DModel "
        'arguments, or a plain NAT\'s with "_class_name": "NATTransformer2DModel".',
    )
    parser.add_argument(
        "--vqvae_name_or_path",
        type=str,
        default=None,
        help="A VQModel folder or repo (or one with a `vqvae/` sub-folder); overrides the pretrained pipeline's.",
    )
    parser.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help=(
            "A CLIP text encoder and its tokenizer (a folder or repo holding both, or one with `text_encoder/` and "
            "`tokenizer/` sub-folders); overrides the pretrained pipeline's. New text-to-image models default to "
            f"{DEFAULT_TEXT_ENCODER}."
        ),
    )
    parser.add_argument(
        "--coco_annotations_file",
        type=str,
        default=None,
        help="MS-COCO captions JSON (e.g. captions_train2017.json) whose images are in --train_data_dir.",
    )
    parser.add_argument(
        "--no_random_flip",
        action="store_true",
        help="Do not use horizontally flipped images (ENAT flips); needed when captions name left and right.",
    )
    parser.add_argument(
        "--token_cache_dir",
        type=str,
        default=None,
        help="Where the VQ token ids are cached (default: OUTPUT_DIR/token_cache); reused when nothing changed.",
    )
    parser.add_argument(
        "--text_embedding_cache_gb",
        type=float,
        default=4.0,
        help=(
            "Precompute the text encoder outputs of every distinct caption when they fit in this many GB of memory; "
            "otherwise captions are encoded batch by batch. 0 always encodes batch by batch."
        ),
    )
    parser.add_argument(
        "--encode_batch_size", type=int, default=64, help="Batch size of the VQ and text encoding passes."
    )
    # ENAT's recipe
    parser.add_argument(
        "--cond_dropout_prob", type=float, default=0.15, help="Probability to train a sample unconditionally."
    )
    parser.add_argument("--label_smoothing", type=float, default=0.1, help="Label smoothing of the cross-entropy.")
    parser.add_argument(
        "--beta_alpha_beta",
        type=float,
        nargs=2,
        metavar=("ALPHA", "BETA"),
        default=None,
        help="Training mask ratios ~ Beta(ALPHA, BETA), saved in the scheduler config (default: the scheduler's, "
        "ENAT/AutoNAT's Beta(12, 3), mean 0.8).",
    )
    parser.add_argument(
        "--sincos_position_embeddings",
        action="store_true",
        help="New models only: start the position embedding table from a 2D sine-cosine grid (scaled to the std 0.02 "
        "of the original initialisation) instead of N(0, 0.02): short runs learn spatial neighbourhoods sooner.",
    )
    parser.add_argument(
        "--region_mask_prob",
        type=float,
        default=0.0,
        help="Probability that a batch is masked as editing masks it (0: ENAT's recipe): each image gets a random "
        "half or quarter of its token grid (one size per batch) as the region to regenerate, and the batch's mask "
        "ratio applies inside that region only; everything outside stays visible, as the known tokens of "
        "ENATInpaintPipeline do.",
    )
    parser.add_argument(
        "--reuse_prob",
        type=float,
        default=None,
        help="Probability that a batch is trained with a reuse state (default: 0.5 for ENAT; a NAT has no reuse).",
    )
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument(
        "--use_ema",
        action="store_true",
        default=None,
        help="Keep an EMA of the weights (diffusers' EMAModel) and save it as the pipeline; the default, except "
        "with --use_lora.",
    )
    ema.add_argument("--no_use_ema", dest="use_ema", action="store_false", help="Train and save without an EMA.")
    parser.add_argument(
        "--ema_decay",
        type=float,
        default=0.9999,
        help="EMA decay per optimiser step, constant (ENAT: 0.9999 over 500k steps); use e.g. 0.999 for a few "
        "thousand steps. The first step's update copies the weights.",
    )
    parser.add_argument(
        "--use_lora",
        action="store_true",
        help="Fine-tune a LoRA adapter (peft) of the pretrained transformer's attention projections (to_q, to_k, "
        "to_v, to_out.0) instead of all its weights; saved as OUTPUT_DIR/pytorch_lora_weights.safetensors.",
    )
    parser.add_argument("--rank", type=int, default=4, help="--use_lora: the rank of the LoRA matrices.")
    parser.add_argument(
        "--lora_alpha", type=float, default=None, help="--use_lora: the LoRA scale numerator (default: --rank)."
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute block activations in the backward pass: less memory, slower.",
    )
    parser.add_argument("--logging_steps", type=int, default=10, help="Steps averaged per log line and CSV row.")
    parser.add_argument(
        "--validation_prompts",
        type=str,
        nargs="*",
        default=None,
        help="Prompts (text-to-image), or class ids or names (class-conditional), generated at each validation.",
    )
    parser.add_argument("--num_validation_images", type=int, default=2, help="Images per validation prompt.")
    parser.add_argument(
        "--validation_num_inference_steps", type=int, default=None, help="Decoding steps (default: the pipeline's)."
    )
    parser.add_argument(
        "--validation_guidance_scale", type=float, default=None, help="Guidance scale (default: the scheduler's)."
    )
    parser.add_argument(
        "--validation_mask_temperature", type=float, default=None, help="Mask temperature (default: the scheduler's)."
    )
    parser.add_argument(
        "--validation_sampling_temperature",
        type=float,
        default=None,
        help="Sampling temperature (default: the scheduler's; a new model's scheduler has ImageNet's settings).",
    )
    # ENAT's optimisation: AdamW, a linear warm-up then a constant learning rate, no gradient clipping
    add_common_arguments(parser, ("max_train_steps", "output_dir"), train_batch_size=64, learning_rate=4e-4)
    parser.set_defaults(lr_scheduler="constant_with_warmup", lr_warmup_steps=5000, adam_beta1=0.99, adam_beta2=0.99)
    parser.set_defaults(adam_weight_decay=0.03, max_grad_norm=None, resolution=None)

    args = parser.parse_args(input_args)

    if args.pretrained_model_name_or_path is None and args.vqvae_name_or_path is None:
        raise ValueError("Pass --pretrained_model_name_or_path or --vqvae_name_or_path: training needs a VQ model.")
    if args.pretrained_model_name_or_path is None and args.transformer_config is None:
        raise ValueError("Pass --transformer_config (a new model) or --pretrained_model_name_or_path (fine-tuning).")
    if args.transformer_config is not None and not Path(args.transformer_config).is_file():
        raise ValueError(f"--transformer_config {args.transformer_config} is not a file.")
    if not Path(args.train_data_dir).is_dir():
        raise ValueError(f"--train_data_dir {args.train_data_dir} is not a folder.")
    if args.coco_annotations_file is not None and not Path(args.coco_annotations_file).is_file():
        raise ValueError(f"--coco_annotations_file {args.coco_annotations_file} is not a file.")
    if args.beta_alpha_beta is not None and min(args.beta_alpha_beta) <= 0:
        raise ValueError(f"--beta_alpha_beta must be two positive numbers, got {args.beta_alpha_beta}.")
    if args.ungroup and (args.transformer_config is not None or args.pretrained_model_name_or_path is None):
        raise ValueError("--ungroup fine-tunes a pretrained token-group transformer: pass "
                         "--pretrained_model_name_or_path (and no --transformer_config).")  # fmt: skip
    if args.sincos_position_embeddings and args.transformer_config is None:
        raise ValueError("--sincos_position_embeddings initialises a new model: it needs --transformer_config.")
    for name in ("cond_dropout_prob", "region_mask_prob", "reuse_prob", "label_smoothing", "ema_decay"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "encode_batch_size"]
    positive += ["logging_steps", "checkpointing_steps", "validation_steps", "num_validation_images", "rank"]
    check_positive(args, positive)
    if args.use_lora:
        if args.transformer_config is not None or args.pretrained_model_name_or_path is None:
            raise ValueError("--use_lora fine-tunes a pretrained transformer: pass --pretrained_model_name_or_path "
                             "(and no --transformer_config).")  # fmt: skip
        if args.use_ema:
            raise ValueError("--use_lora trains without an EMA: drop --use_ema.")
    if args.use_ema is None:
        args.use_ema = not args.use_lora
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    return args


# ----------------------------------------------------------------------------------------------------------- data


def assign_class_ids(data: TrainingData, id2label: Optional[dict], num_classes: int) -> dict:
    """
    Sets the class ids of `data.labels` and returns the pipeline's class names. When every folder is named after a
    class of the pretrained pipeline (its `id2label`, case-insensitive), it trains that class; otherwise folder `i` in
    sorted order is class `i`, and that class takes the folder's name.
    """
    if len(data.class_names) > num_classes:
        raise ValueError(
            f"{data.root} has {len(data.class_names)} class folders but the transformer has num_classes={num_classes}."
        )
    pretrained = {int(label): name for label, name in (id2label or {}).items()}  # JSON keys are strings
    by_name = {name.strip().lower(): label for label, name in pretrained.items()}
    if pretrained and all(folder.lower() in by_name for folder in data.class_names):
        data.labels = [by_name[data.class_names[label].lower()] for label in data.labels]
        return pretrained
    if pretrained:
        renamed = [f"{label} {pretrained.get(label)!r} -> {name!r}" for label, name in enumerate(data.class_names)]
        logger.warning(
            "The class folders are not named after classes of the pretrained model: folder i (in sorted order) "
            f"trains class i, renamed: {examples(renamed)}."
        )
    return {**pretrained, **dict(enumerate(data.class_names))}


def read_training_data(args, text_to_image: bool) -> TrainingData:
    root = Path(args.train_data_dir)
    if not list_images(root):
        raise ValueError(f"No images in --train_data_dir {root} (searched recursively).")
    if args.coco_annotations_file is not None:
        if not text_to_image:
            raise ValueError("--coco_annotations_file gives captions, but the transformer is class-conditional.")
        return read_coco_captions(root, Path(args.coco_annotations_file))
    if text_to_image:
        if not (root / METADATA_FILE).is_file():
            raise ValueError(
                f"The images in {root} have no captions: a text-to-image model needs {root / METADATA_FILE} "
                "(Hugging Face imagefolder layout) or --coco_annotations_file."
            )
        return read_imagefolder_captions(root, args.caption_column)
    return read_class_folders(root)


# ------------------------------------------------------------------------------------------------- tokenisation


class ImageFiles(Dataset):
    """`(index, image tensor)`, or `(index, error message)` for a file that cannot be read as an image."""

    def __init__(self, root: Path, files: List[str], indices: List[int], resolution: int):
        self.root, self.files, self.indices, self.resolution = root, files, indices, resolution

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        try:
            return index, load_image(self.root / self.files[index], self.resolution)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return index, f"{type(error).__name__}: {error}"


@torch.no_grad()
def encode_images(vqvae, data: TrainingData, indices, resolution, flip, args, show_progress):
    """uint16 token ids `(n, views, L)` of the readable images among `indices`, their indices, unreadable files."""
    loader = DataLoader(
        ImageFiles(data.root, data.files, indices, resolution),
        batch_size=args.encode_batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=list,
    )
    num_views, seq_len = 2 if flip else 1, vqvae_grid(vqvae, resolution) ** 2
    kept, tokens, skipped = [], [np.zeros((0, num_views, seq_len), dtype=np.uint16)], []
    for batch in tqdm(loader, desc="Tokenising images", disable=not show_progress):
        images = []
        for index, item in batch:
            if isinstance(item, str):
                path = data.root / data.files[index]
                logger.warning(f"Skipping {path}: it cannot be read ({item}).", main_process_only=False)
                skipped.append(data.files[index])
            else:
                kept.append(index)
                images.append(item)
        if not images:
            continue
        pixels = torch.stack(images).to(vqvae.device, vqvae.dtype)
        views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
        ids = vq_token_ids(vqvae, views).reshape(num_views, len(images), seq_len).transpose(0, 1)
        tokens.append(ids.cpu().numpy().astype(np.uint16))  # check_compatibility: at most 2**16 codes
    return kept, np.concatenate(tokens), skipped


def _tensor_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def token_cache_key(data: TrainingData, vqvae: VQModel, resolution: int, flip: bool) -> str:
    """Changes whenever the tokens would: the image files (path, size, mtime), the VQ model, resolution, flips."""
    stats = [(file, (data.root / file).stat()) for file in data.files]
    content = {
        "format": 1,
        "files": [(file, stat.st_size, stat.st_mtime_ns) for file, stat in stats],
        "resolution": resolution,
        "flip": flip,
        "vqvae_config": {key: value for key, value in vqvae.config.items() if not key.startswith("_")},
        "vqvae_weights": _tensor_digest(vqvae),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def read_token_cache(tokens_path: Path, meta_path: Path, key: str, data: TrainingData, shape, codebook_size: int):
    """The cached token ids `(n, views, L)` and their description when the cache is there, made from the same inputs
    (`key`) and intact; None otherwise. A damaged cache (cut short, changed, ids out of range) gets a warning."""
    if not (tokens_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None  # made from other images or another VQ model
        if "sha256" in meta and hashlib.sha256(tokens_path.read_bytes()).hexdigest() != meta["sha256"]:
            raise ValueError(f"{tokens_path.name} changed after it was written (SHA-256)")
        tokens = np.load(tokens_path, allow_pickle=False)
        expected = (len(meta["files"]), *shape)
        if tokens.dtype != np.uint16 or tokens.shape != expected:
            raise ValueError(f"ids of shape {tokens.shape} ({tokens.dtype}), expected {expected} (uint16)")
        if tokens.size and int(tokens.max()) >= codebook_size:
            raise ValueError(f"id {int(tokens.max())} is outside the codebook of {codebook_size} codes")
        unknown = set(meta["files"]).difference(data.files)
        if unknown:
            raise ValueError(f"it names images that are not in the data: {examples(sorted(unknown))}")
        if not isinstance(meta["skipped"], list):
            raise ValueError("its list of skipped images is not a list")
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(f"The token cache {tokens_path} is damaged ({error}): tokenising the images again.")
        return None
    return tokens, meta


def load_or_extract_tokens(accelerator, data: TrainingData, vqvae, resolution, flip, cache_dir: Path, args):
    """
    Token ids of every readable image, `(N, views, L)` int32 on the CPU, and the data restricted to those images.

    The ids are cached as `tokens-<key>.npy` (uint16) with a `.json` description (and the file's SHA-256) in
    `cache_dir`; a later run with the same images, VQ model, resolution and flips reads them back, after checking
    them (`read_token_cache`). Extraction is shared by all processes (each encodes a contiguous shard); the main
    process writes the cache.
    """
    key = token_cache_key(data, vqvae, resolution, flip)
    tokens_path, meta_path = cache_dir / f"tokens-{key[:16]}.npy", cache_dir / f"tokens-{key[:16]}.json"
    shape = (2 if flip else 1, vqvae_grid(vqvae, resolution) ** 2)
    cached = read_token_cache(tokens_path, meta_path, key, data, shape, vqvae.config.num_vq_embeddings)
    if all(gather_object([cached is not None])):
        tokens, meta = cached
        logger.info(f"Read the token ids of {len(tokens)} images from {tokens_path}.")
    else:
        num_images, rank, world = len(data.files), accelerator.process_index, accelerator.num_processes
        shard = list(range(rank * num_images // world, (rank + 1) * num_images // world))
        result = encode_images(vqvae, data, shard, resolution, flip, args, accelerator.is_local_main_process)
        shards = gather_object([result])
        kept = [index for shard_kept, _, _ in shards for index in shard_kept]
        tokens = np.concatenate([shard_tokens for _, shard_tokens, _ in shards])
        skipped = [file for _, _, shard_skipped in shards for file in shard_skipped]
        meta = {"key": key, "files": [data.files[index] for index in kept], "skipped": skipped, "flip": flip}
        if accelerator.is_main_process:

            def write_tokens(path):
                with open(path, "wb") as file:
                    np.save(file, tokens)
                meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

            write_file_atomically(tokens_path, write_tokens)
            write_file_atomically(meta_path, lambda path: path.write_text(json.dumps(meta)))
            logger.info(f"Cached the token ids of {len(tokens)} images in {tokens_path}.")
        accelerator.wait_for_everyone()
    if meta["skipped"]:
        logger.warning(f"{len(meta['skipped'])} unreadable images were skipped: {examples(meta['skipped'])}.")
    if len(tokens) == 0:
        raise ValueError(f"None of the {len(data.files)} images in {data.root} could be read.")
    position = {file: index for index, file in enumerate(data.files)}
    data = data.subset([position[file] for file in meta["files"]])
    return torch.from_numpy(tokens.astype(np.int32)), data


def vqvae_downsampling(vqvae: VQModel) -> int:
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


def vqvae_grid(vqvae: VQModel, resolution: int) -> int:
    return resolution // vqvae_downsampling(vqvae)


# ------------------------------------------------------------------------------------------------------- models


def load_component(load, path: str, name: str, revision: Optional[str]):
    """`load(path, subfolder=name)` from a pipeline folder or repo with a `name/` component, else `load(path)`: the
    component itself."""
    try:
        return load(path, subfolder=name, revision=revision)
    except OSError:  # no `name/` there (diffusers and transformers raise EnvironmentError)
        return load(path, revision=revision)


def load_text_encoder(path: str, revision: Optional[str]):
    """A CLIP text encoder and tokenizer from a repo or folder holding both, or its text_encoder/tokenizer folders."""
    config = load_component(CLIPTextConfig.from_pretrained, path, "text_encoder", revision)
    model_class = CLIPTextModelWithProjection
    if "CLIPTextModelWithProjection" not in (config.architectures or []):
        model_class = CLIPTextModel

    def load_model(path, **kwargs):
        return model_class.from_pretrained(path, dtype=torch.float32, **kwargs)

    text_encoder = load_component(load_model, path, "text_encoder", revision)
    return text_encoder, load_component(CLIPTokenizer.from_pretrained, path, "tokenizer", revision)


TRANSFORMER_CLASSES = {cls.__name__: cls for cls in (ENATTransformer2DModel, NATTransformer2DModel)}


def transformer_class(config: dict, where: str):
    """The transformer class a config names by `_class_name` (ENAT when it names none)."""
    name = config.get("_class_name", ENATTransformer2DModel.__name__)
    if name not in TRANSFORMER_CLASSES:
        raise ValueError(f"{where} names the class {name!r}; this script trains {sorted(TRANSFORMER_CLASSES)}.")
    return TRANSFORMER_CLASSES[name]


def read_transformer_config(path: str):
    """The class and arguments of a new transformer, checked: JSON, known keys, values of the right types."""
    where = f"--transformer_config {path}"
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:
        raise UsageError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{where} is not a JSON object of transformer arguments.")
    cls = transformer_class(config, where)
    check_config_types(config, cls, where)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(key for key in config if not key.startswith("_") and key not in accepted)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted by {cls.__name__}: {sorted(accepted)}.")
    return cls, {key: value for key, value in config.items() if not key.startswith("_")}


def sincos_grid(side: int, dim: int, std: float = 0.02) -> torch.Tensor:
    """`(side * side, dim)` 2D sine-cosine position codes in raster order (half the channels for the row, half for
    the column; geometric frequencies), scaled to standard deviation `std`."""
    if dim % 4:
        raise ValueError(f"A 2D sine-cosine grid needs a width divisible by 4, got {dim}.")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    position = torch.arange(side, dtype=torch.float64)[:, None] * frequencies  # (side, dim / 4)
    codes = torch.cat([position.sin(), position.cos()], dim=1)  # (side, dim / 2)
    rows, columns = codes[:, None, :].expand(side, side, -1), codes[None, :, :].expand(side, side, -1)
    grid = torch.cat([rows, columns], dim=-1).reshape(side * side, dim)
    return (grid * std / grid.std()).float()


def load_models(args):
    """The transformer to train, scheduler, VQ model, text encoder/tokenizer (text models) and class names; the
    models in float32 (the frozen ones too: token ids and text embeddings do not depend on --mixed_precision)."""
    pretrained, revision = args.pretrained_model_name_or_path, args.revision
    if args.transformer_config is not None:
        cls, config = read_transformer_config(args.transformer_config)
        transformer = cls(**config)
        logger.info(f"Training a new transformer from {args.transformer_config}.")
        if args.sincos_position_embeddings:
            table = transformer.embed.position_embeddings.weight  # one row per position: token or token group
            with torch.no_grad():
                table.copy_(sincos_grid(grid_side(table.shape[0]), table.shape[1]))
    else:
        try:
            config = ENATTransformer2DModel.load_config(pretrained, subfolder="transformer", revision=revision)
            cls = transformer_class(config, f"{pretrained}/transformer/config.json")
            transformer = cls.from_pretrained(
                pretrained, subfolder="transformer", revision=revision, dtype=torch.float32
            )
        except OSError as error:
            raise UsageError(
                f"{pretrained} has no transformer/ to fine-tune ({error_line(error)}): pass --transformer_config for "
                "a new model."
            ) from None
        if args.ungroup:
            if getattr(transformer.config, "patch_size", 1) == 1:
                raise UsageError(f"--ungroup: the transformer of {pretrained} has no token groups (patch_size 1).")
            transformer = transformer.ungroup()
            logger.info(f"Fine-tuning the transformer of {pretrained} with one position per token (--ungroup).")
        else:
            logger.info(f"Fine-tuning the transformer of {pretrained}.")

    def load_vqvae(path, **kwargs):
        return VQModel.from_pretrained(path, dtype=torch.float32, **kwargs)

    vqvae = load_component(load_vqvae, args.vqvae_name_or_path or pretrained, "vqvae", revision)
    scheduler = MaskedTokenScheduler(mask_token_id=transformer.config.codebook_size)
    if pretrained is not None:
        try:
            scheduler = MaskedTokenScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
        except (OSError, TypeError, ValueError):  # a pretrained pipeline without a scheduler
            pass
    # the transformer's token groups are the scheduler's units (a pretrained pipeline's scheduler already has them)
    overrides = {"patch_size": getattr(transformer.config, "patch_size", 1)}
    if args.beta_alpha_beta is not None:
        overrides["beta_alpha"], overrides["beta_beta"] = args.beta_alpha_beta
    scheduler = MaskedTokenScheduler.from_config(scheduler.config, **overrides)

    text_encoder = tokenizer = None
    if transformer.config.text_embed_dim is not None:
        text_path = args.text_encoder_name_or_path
        if text_path is None and pretrained is not None:
            try:
                text_encoder, tokenizer = load_text_encoder(pretrained, revision)
            except OSError:  # the pretrained pipeline has no text encoder
                text_path = DEFAULT_TEXT_ENCODER
        elif text_path is None:
            text_path = DEFAULT_TEXT_ENCODER
        if text_path is not None:
            text_encoder, tokenizer = load_text_encoder(text_path, revision)

    id2label = None
    if pretrained is not None and args.transformer_config is None:
        try:
            id2label = ENATPipeline.load_config(pretrained, revision=revision).get("id2label")
        except OSError:  # a folder of components, not a pipeline
            pass
    return transformer, scheduler, vqvae, text_encoder, tokenizer, id2label


def check_compatibility(transformer, scheduler, vqvae, text_encoder, resolution: Optional[int]) -> int:
    """Raises if the components do not fit together; returns the training resolution."""
    config = transformer.config
    factor = vqvae_downsampling(vqvae)
    if config.codebook_size != vqvae.config.num_vq_embeddings:
        raise ValueError(
            f"The transformer's codebook_size is {config.codebook_size} but the VQ model has "
            f"{vqvae.config.num_vq_embeddings} codes (num_vq_embeddings): they must be equal."
        )
    if config.codebook_size > 2**16:
        raise ValueError(f"The token cache stores uint16 ids: at most 65536 codes, got {config.codebook_size}.")
    if not vqvae.config.lookup_from_codebook:
        raise ValueError("The VQ model needs `lookup_from_codebook=True` to decode token ids in ENATPipeline.")
    if scheduler.config.mask_token_id != config.codebook_size:
        raise ValueError(
            f"The scheduler's mask_token_id is {scheduler.config.mask_token_id} but the [MASK] id of the transformer "
            f"is its codebook_size, {config.codebook_size}: they must be equal."
        )
    resolution = resolution or config.sample_size * factor
    if resolution != config.sample_size * factor:
        raise ValueError(
            f"--resolution {resolution} gives a {resolution // factor}x{resolution // factor} token grid with this "
            f"VQ model ({factor}x downsampling), but the transformer's sample_size is {config.sample_size}: "
            f"sample_size must equal resolution / {factor} (use --resolution {config.sample_size * factor})."
        )
    if text_encoder is not None:
        sizes = {"hidden_size": text_encoder.config.hidden_size}  # last_hidden_state, and pooler_output
        if isinstance(text_encoder, CLIPTextModelWithProjection):
            sizes["projection_dim"] = text_encoder.config.projection_dim  # text_embeds
        wrong = {name: size for name, size in sizes.items() if size != config.text_embed_dim}
        if wrong:
            raise ValueError(
                f"The transformer's text_embed_dim is {config.text_embed_dim} but the text encoder's {wrong}: "
                "its token and pooled embeddings must both have text_embed_dim features."
            )
    return resolution


class ReuseTrainingWrapper(nn.Module):
    """
    The transformer with the reuse state passed as plain tensors.

    DDP moves forward inputs to the device with a recursion that rebuilds mappings as `type(obj)(pairs)`, which an
    `ENATReuseState` (a diffusers `BaseOutput` dataclass) does not survive; tensors do.
    """

    def __init__(self, transformer: ENATTransformer2DModel):
        super().__init__()
        self.transformer = transformer

    def forward(
        self, input_ids, reuse_hidden_states=None, reuse_mask=None, reuse_text_hidden_states=None, **condition
    ):
        reuse_state = None
        if reuse_mask is not None:
            reuse_state = ENATReuseState(reuse_hidden_states, reuse_mask, reuse_text_hidden_states)
        return self.transformer(input_ids, reuse_state=reuse_state, return_dict=False, **condition)[0]


def save_lora(folder, transformer: ENATTransformer2DModel):
    """`folder/pytorch_lora_weights.safetensors`: the adapter's weights and its config (rank, alpha, targets), as
    diffusers' LoRA scripts save them; `ENATPipeline.load_lora_weights(folder)` loads it."""
    ENATPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        **_collate_lora_metadata({"transformer": transformer}),
    )


def load_lora_state_dict(transformer: ENATTransformer2DModel, folder):
    """Loads the adapter weights a checkpoint holds (`pytorch_lora_weights.safetensors`) into `transformer`'s."""
    state = ENATPipeline.lora_state_dict(folder)
    state = {key.removeprefix("transformer."): value for key, value in state.items() if key.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UsageError(f"{folder}: the LoRA weights do not fit this adapter (unexpected: {examples(unexpected)})")


# ------------------------------------------------------------------------------------------------ conditioning


class TextConditions:
    """
    Caption embeddings from the frozen text encoder, as the pipeline computes them (`ENATPipeline.encode_prompt`).

    With every distinct caption's embeddings fitting in `max_cache_bytes`, they are computed once (for a few thousand
    short captions and a small encoder this takes seconds and saves a text-encoder pass per step); otherwise each
    batch's captions are encoded as they come.
    """

    def __init__(self, pipe, captions: List[List[str]], dtype, max_cache_bytes: float, batch_size: int):
        self.pipe, self.dtype, self.batch_size = pipe, dtype, batch_size
        self.unique = list(dict.fromkeys(text for texts in captions for text in texts))
        index = {text: i for i, text in enumerate(self.unique)}
        self.caption_ids = torch.tensor([index[text] for texts in captions for text in texts])
        self.counts = torch.tensor([len(texts) for texts in captions])
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.null_hidden, self.null_pooled = self.encode([""])  # the unconditional prompt
        element_size = torch.empty((), dtype=dtype).element_size()
        size = len(self.unique) * (self.null_hidden.shape[1] + 1) * self.null_hidden.shape[2] * element_size
        self.cache = None
        summary = f"{len(self.caption_ids)} captions, {len(self.unique)} distinct; text embeddings"
        if size <= max_cache_bytes:
            chunks = [self.encode(self.unique[i : i + batch_size]) for i in range(0, len(self.unique), batch_size)]
            self.cache = tuple(torch.cat(parts) for parts in zip(*chunks))
            logger.info(f"{summary} precomputed ({size / 2**20:.1f} MiB).")
        else:
            logger.info(f"{summary} computed per batch ({size / 2**30:.1f} GiB to cache them all).")

    @torch.no_grad()
    def encode(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        device = self.pipe.text_encoder.device
        hidden, pooled, _, _ = self.pipe.encode_prompt(texts, device, do_classifier_free_guidance=False)
        return hidden.to(self.dtype).cpu(), pooled.to(self.dtype).cpu()

    def __call__(self, image_indices, drop, generator):
        """`encoder_hidden_states` and `pooled_text_embeds` for one caption of each image (the null one if dropped)."""
        choice = (torch.rand(len(image_indices), generator=generator) * self.counts[image_indices]).long()
        caption_ids = self.caption_ids[self.offsets[image_indices] + choice]
        if self.cache is not None:
            hidden, pooled = self.cache[0][caption_ids], self.cache[1][caption_ids]
        else:
            hidden, pooled = self.encode([self.unique[i] for i in caption_ids.tolist()])
        hidden = torch.where(drop[:, None, None], self.null_hidden, hidden)
        pooled = torch.where(drop[:, None], self.null_pooled, pooled)
        return {"encoder_hidden_states": hidden, "pooled_text_embeds": pooled}


def mask_in_regions(
    clean: torch.LongTensor, mask_token_id: int, side: int, ratio: float, generator, patch_size: int = 1
) -> torch.LongTensor:
    """
    Editing-style training masks for `clean` `(B, side**2)`: the region to regenerate is a random half (left, right,
    top or bottom) of every image's grid, or a random quarter (one of the four quadrants), one size for the whole
    batch; `round(region_size * ratio)` tokens of the region (at least 1) are masked at random, none outside it.
    Every row gets the same count. With `patch_size > 1` all of this is on the grid of token groups, whose groups
    are masked whole.
    """
    batch_size = clean.shape[0]
    side //= patch_size
    line, half = torch.arange(side), side // 2
    # rows/columns of the first half, of the second half (equal sizes: an odd grid's middle line is in neither), all
    spans = torch.stack([line < half, line >= side - half, torch.ones(side, dtype=torch.bool)])
    choice = torch.randint(4, (batch_size,), generator=generator)
    if torch.rand((), generator=generator) < 0.5:  # halves: left, right (all rows), top, bottom (all columns)
        by_columns, end = choice < 2, choice % 2
        row_span, column_span = torch.where(by_columns, 2, end), torch.where(by_columns, end, 2)
    else:  # quarters
        row_span, column_span = choice // 2, choice % 2
    region = spans[row_span][:, :, None] & spans[column_span][:, None, :]  # (B, side, side)
    region = region.reshape(batch_size, -1)
    count = max(round(int(region[0].sum()) * ratio), 1)
    scores = torch.rand(region.shape, generator=generator).masked_fill(~region, 2.0)  # outside: never picked
    return clean.masked_fill(expand_group_mask(lowest_scores_mask(scores, count), patch_size), mask_token_id)


def mask_previous_step(
    input_ids: torch.LongTensor, mask_token_id: int, generator, patch_size: int = 1
) -> torch.LongTensor:
    """
    The input of a simulated previous sampling step for reuse training: the masked tokens of `input_ids` plus `k`
    more, `k = round(num_visible * u)` with `u ~ U[0, 1)`, the same `k` in every row (ENAT `train.py`). Tokens masked
    now are thus a subset of those masked then, and every row keeps an equal number of masked tokens. With
    `patch_size > 1` the units are token groups.
    """
    masked = group_mask(input_ids == mask_token_id, patch_size, "input_ids")
    num_visible = masked.shape[1] - int(masked[0].sum())
    num_extra = round(num_visible * torch.rand((), generator=generator).item())
    scores = torch.rand(masked.shape, generator=generator).masked_fill(masked, 2.0)  # masked ones never picked
    extra = expand_group_mask(lowest_scores_mask(scores, num_extra), patch_size)
    return input_ids.masked_fill(extra, mask_token_id)


class TrainingRNG:
    """
    The per-process generator of all training randomness (caption and flip choice, masks, dropout, reuse), seeded
    from `--seed` + process index. Checkpointed with every process's state, so a resumed run continues exactly.
    """

    def __init__(self, seed: int, process_index: int, num_processes: int):
        self.generator = torch.Generator().manual_seed(seed + process_index)
        self.process_index, self.num_processes = process_index, num_processes
        self.all_states = None

    def gather(self):
        """Collects every process's state for the next checkpoint (all processes must call it)."""
        self.all_states = gather_object([self.generator.get_state()])

    def state_dict(self):
        return {"generator_states": self.all_states}

    def load_state_dict(self, state):
        states = state["generator_states"]
        if not isinstance(states, list) or not all(isinstance(s, torch.Tensor) for s in states):
            raise TypeError("generator_states must be a list of generator states (uint8 tensors)")
        if len(states) == self.num_processes:
            self.generator.set_state(states[self.process_index])
        else:
            logger.warning(
                f"The checkpoint was saved by {len(states)} processes, not {self.num_processes}: the training "
                "randomness restarts from --seed instead of continuing."
            )


# -------------------------------------------------------------------------------------------------- checkpoints


def check_resume_config(checkpoint: Path, transformer: ENATTransformer2DModel):
    """Refuses a checkpoint of another transformer configuration, naming the differences."""
    config_file = checkpoint / "transformer" / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint of this script: it has no transformer/config.json.")
    saved = {key: value for key, value in json.loads(config_file.read_text()).items() if not key.startswith("_")}
    current = json.loads(
        json.dumps({key: value for key, value in transformer.config.items() if not key.startswith("_")})
    )
    differences = [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} was saved for another transformer configuration ({'; '.join(differences)}). Resume with "
            "the configuration it was trained with, or train into a new --output_dir."
        )


# ---------------------------------------------------------------------------------------------------- logging


class TrainingLog:
    """`train_log.csv`: one row per `--logging_steps` steps (averages over those steps); resuming drops later rows."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists():
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict):
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=LOG_FIELDS).writerow({key: row[key] for key in LOG_FIELDS})


def plot_loss_curve(csv_path: Path, png_path: Path):
    """The loss column of the CSV log as a PNG (skipped without matplotlib, which the CSV does not need)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (the numbers are in train_log.csv).")
        return
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot([int(row["step"]) for row in rows], [float(row["loss"]) for row in rows])
    axes.set(xlabel="step", ylabel="masked-token cross-entropy", title="ENAT training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def validation_requests(pipe: ENATPipeline, prompts: List[str]):
    """Pipeline keyword arguments and one caption per prompt; class prompts may be ids ("3") or class names."""
    if pipe.is_text_to_image:
        return {"prompt": list(prompts)}, list(prompts)
    labels = [int(prompt) if prompt.strip().isdigit() else pipe.get_label_ids(prompt)[0] for prompt in prompts]
    num_classes = pipe.transformer.config.num_classes
    if any(label >= num_classes for label in labels):
        raise ValueError(f"--validation_prompts has class ids outside [0, {num_classes - 1}]: {labels}.")
    names = pipe.config.id2label or {}
    return {"class_labels": labels}, [f"{label}: {names[label]}" if label in names else str(label) for label in labels]


def log_validation(pipe, args, accelerator, global_step: int, output_dir: Path):
    """Generates every validation prompt (fixed seeds) with the EMA weights; writes a captioned grid PNG."""
    request, captions = validation_requests(pipe, args.validation_prompts)
    count = args.num_validation_images
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(captions) * count)]
    images = pipe(
        **request,
        num_images_per_prompt=count,
        num_inference_steps=args.validation_num_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        mask_temperature=args.validation_mask_temperature,
        sampling_temperature=args.validation_sampling_temperature,
        generator=generator,
    ).images
    columns = count if count > 1 else min(len(images), 4)
    grid = captioned_grid(images, [caption for caption in captions for _ in range(count)], columns=columns)
    path = output_dir / "validation" / f"step-{global_step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), global_step, dataformats="HWC")
    logger.info(f"Validation images: {path}")


def warn_if_slow_bf16(accelerator):
    """bf16 autocast on a CPU without bf16 instructions is emulated, many times slower than float32."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "bf16":
        return
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (has_bf16 or has_amx):
        logger.warning(
            "This CPU has no AVX512-BF16/AMX instructions: bf16 autocast is emulated and much slower than float32 "
            "here; consider --mixed_precision no."
        )


# ------------------------------------------------------------------------------------------------------- main


def main(args) -> Optional[ENATPipeline]:
    """Trains; returns the final pipeline (EMA weights, or the trained ones) on the main process, None elsewhere."""
    output_dir = Path(args.output_dir)
    token_cache_dir = Path(args.token_cache_dir) if args.token_cache_dir else output_dir / "token_cache"
    inputs = [args.train_data_dir, args.coco_annotations_file, args.transformer_config]
    inputs += [args.pretrained_model_name_or_path, args.vqvae_name_or_path, args.text_encoder_name_or_path]
    # the reuse branch (prev_proj) and the text projection are not used by every batch
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    with TrainingRun(args, inputs, True, ignore=[token_cache_dir], kwargs_handlers=handlers) as run:
        if args.token_cache_dir:
            check_output_dir(token_cache_dir, inputs, "--token_cache_dir")
        return train(args, run, token_cache_dir)


def train(args, run: TrainingRun, token_cache_dir: Path) -> Optional[ENATPipeline]:
    accelerator, output_dir, resume_checkpoint = run.accelerator, run.output_dir, run.checkpoint
    logger.info(accelerator.state, main_process_only=False)
    warn_if_slow_bf16(accelerator)

    # 1. Components, data and output folder: every check runs before anything is written.
    transformer, scheduler, vqvae, text_encoder, tokenizer, id2label = load_models(args)
    resolution = check_compatibility(transformer, scheduler, vqvae, text_encoder, args.resolution)
    if resume_checkpoint is not None:
        check_resume_config(resume_checkpoint, transformer)
    if args.reuse_prob is None:
        args.reuse_prob = 0.5 if transformer.supports_reuse else 0.0
    elif args.reuse_prob and not transformer.supports_reuse:
        raise UsageError(f"--reuse_prob {args.reuse_prob}: {type(transformer).__name__} has no feature reuse; pass 0.")
    text_to_image = transformer.config.text_embed_dim is not None
    data = read_training_data(args, text_to_image)
    if not text_to_image:
        id2label = assign_class_ids(data, id2label, transformer.config.num_classes)
    logger.info(f"{len(data.files)} images ({data.layout}) in {data.root}.")

    vqvae.requires_grad_(False).eval().to(accelerator.device)
    if text_encoder is not None:
        text_encoder.requires_grad_(False).eval().to(accelerator.device)
    if args.use_lora:
        # only the adapter trains; peft's LoRA layers of the frozen attention projections (float32, as the model)
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )
    transformer.to(accelerator.device)
    ema, ema_model = None, None
    if args.use_ema:
        ema_model = copy.deepcopy(transformer).requires_grad_(False).eval()
        # diffusers' EMAModel with a constant decay; its shadow parameters are ema_model's own, updated in place
        ema = EMAModel([], decay=args.ema_decay, min_decay=args.ema_decay)
        ema.shadow_params = list(ema_model.parameters())
    result = ema_model if args.use_ema else transformer  # what the pipeline holds: validation, the saved model
    pipe = ENATPipeline(result, scheduler, vqvae, text_encoder=text_encoder, tokenizer=tokenizer, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    if args.validation_prompts:
        validation_requests(pipe, args.validation_prompts)  # fails now on a class name that does not exist

    run.output.start(accelerator)  # every process has checked the output folder; the main one holds its lock
    if accelerator.is_main_process:
        token_cache_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # 2. Token ids (cached) and conditions.
    tokens, data = load_or_extract_tokens(
        accelerator, data, vqvae, resolution, not args.no_random_flip, token_cache_dir, args
    )
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if text_to_image:
        conditions = TextConditions(
            pipe, data.captions, autocast_dtype, args.text_embedding_cache_gb * 1e9, args.encode_batch_size
        )
    else:
        labels = torch.tensor(data.labels)
        null_label = transformer.config.num_classes

        def conditions(image_indices, drop, generator):
            return {"class_labels": torch.where(drop, null_label, labels[image_indices])}

    # 3. Optimisation.
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    model = ReuseTrainingWrapper(transformer)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer, lr_scheduler = make_optimizer(args, trained, accelerator)
    train_dataloader = DataLoader(range(len(tokens)), batch_size=args.train_batch_size, shuffle=True)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    train_dataloader = accelerator.prepare_data_loader(train_dataloader, device_placement=False)
    rng = TrainingRNG(args.seed, accelerator.process_index, accelerator.num_processes)
    run.before_checkpoint.append(rng.gather)  # every process's generator state

    # checkpoints hold the transformer and its EMA in the diffusers format (with their config.json), or the adapter
    def save_model_hook(models, weights, checkpoint_dir):
        if args.use_lora:
            transformer.save_config(Path(checkpoint_dir, "transformer"))
            save_lora(checkpoint_dir, transformer)
        else:
            transformer.save_pretrained(Path(checkpoint_dir, "transformer"))
        if ema_model is not None:
            ema_model.save_pretrained(Path(checkpoint_dir, "transformer_ema"))
        weights.clear()

    def load_model_hook(models, checkpoint_dir):
        models.pop()
        if args.use_lora:
            load_lora_state_dict(transformer, checkpoint_dir)
        else:
            loaded = type(transformer).from_pretrained(checkpoint_dir, subfolder="transformer")
            transformer.load_state_dict(loaded.state_dict())
        if ema_model is not None:
            loaded = type(transformer).from_pretrained(checkpoint_dir, subfolder="transformer_ema")
            ema_model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # the generator (and the EMA's step count) go into every checkpoint as JSON and safetensors, never as a pickle
    state = {"rng": rng, **({"ema": EMAState(ema)} if ema is not None else {})}
    seq_len, num_views = transformer.config.sample_size**2, tokens.shape[1]
    describe = {"Images": f"{len(tokens)} x {num_views} views, {seq_len} tokens each"}
    global_step = run.start("train_enat", describe, **state)
    if accelerator.is_main_process:
        training_log = TrainingLog(output_dir / "train_log.csv", global_step)

    # 4. Train.
    mask_token_id = transformer.mask_token_id
    patch_size = scheduler.config.patch_size  # the transformer's (load_models)
    if args.lr_warmup_steps >= args.max_train_steps:
        logger.warning(f"--lr_warmup_steps {args.lr_warmup_steps} >= --max_train_steps: the run ends warming up.")

    def new_window():  # sums over the steps of one log row
        return {"loss": torch.zeros((), device=accelerator.device), "mask_ratio": 0.0, "reuse": 0, "batches": 0}

    window, window_tokens, window_start, run_start = new_window(), 0, time.perf_counter(), time.perf_counter()
    for image_indices in run.batches(train_dataloader):
        generator = rng.generator
        batch_size = len(image_indices)
        views = torch.randint(num_views, (batch_size,), generator=generator)
        clean = tokens[image_indices, views].long()  # (B, L)
        drop = torch.rand(batch_size, generator=generator) < args.cond_dropout_prob
        condition = {k: v.to(accelerator.device) for k, v in conditions(image_indices, drop, generator).items()}
        if args.region_mask_prob and torch.rand((), generator=generator) < args.region_mask_prob:
            ratio = scheduler.sample_mask_ratio(generator)
            input_ids = mask_in_regions(
                clean, mask_token_id, transformer.config.sample_size, ratio, generator, patch_size
            )
        else:
            input_ids = scheduler.add_noise(clean, generator=generator)
        masked = input_ids == mask_token_id
        reuse = bool(torch.rand((), generator=generator) < args.reuse_prob)
        previous_ids = mask_previous_step(input_ids, mask_token_id, generator, patch_size) if reuse else None
        window["mask_ratio"] += masked[0].float().mean().item()
        input_ids, clean, masked = (t.to(accelerator.device) for t in (input_ids, clean, masked))

        with accelerator.accumulate(model):
            reuse_inputs = {}
            if reuse:  # the previous step's features, from the EMA model as sampling will use it
                with torch.no_grad(), accelerator.autocast():
                    _, state = result(previous_ids.to(accelerator.device), **condition, return_dict=False)
                reuse_inputs = {
                    "reuse_hidden_states": state.hidden_states,
                    "reuse_mask": state.mask,
                    "reuse_text_hidden_states": state.text_hidden_states,
                }
            logits = model(input_ids, **reuse_inputs, **condition)  # (B, L, K)
            loss = F.cross_entropy(logits[masked].float(), clean[masked], label_smoothing=args.label_smoothing)
            run.optimizer_step(model, loss, optimizer, lr_scheduler)

        window["loss"] += loss.detach()
        window["reuse"] += reuse
        window["batches"] += 1
        window_tokens += batch_size * seq_len
        if not run.step_done():
            continue
        if ema is not None:
            ema.step(transformer.parameters())
        global_step = run.global_step

        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            statistics = torch.tensor(
                [window["loss"].item() / window["batches"], window_tokens], device=accelerator.device
            )
            statistics = accelerator.reduce(statistics, reduction="sum")
            seconds = time.perf_counter() - window_start
            row = {
                "step": global_step,
                "loss": statistics[0].item() / accelerator.num_processes,
                "learning_rate": lr_scheduler.get_last_lr()[0],
                "mask_ratio": window["mask_ratio"] / window["batches"],
                "reuse_fraction": window["reuse"] / window["batches"],
                "tokens_per_second": statistics[1].item() / seconds,
                "seconds": time.perf_counter() - run_start,
            }
            accelerator.log({f"train/{key}": value for key, value in row.items() if key != "step"}, step=global_step)
            run.progress.set_postfix(
                loss=f"{row['loss']:.3f}",
                lr=f"{row['learning_rate']:.2e}",
                tok_s=f"{row['tokens_per_second']:.0f}",
            )
            if accelerator.is_main_process:
                training_log.write(row)
            window, window_tokens, window_start = new_window(), 0, time.perf_counter()

        run.save_checkpoint_if_due()
        if args.validation_prompts and run.validation_due():
            log_validation(pipe, args, accelerator, global_step, output_dir)

    # 5. The pipeline folder (EMA weights) or the adapter, a last checkpoint and validation, the loss curve; then a
    # consistency check.
    run.save_checkpoint_if_due(final=True)
    if accelerator.is_main_process:
        if args.use_lora:
            run.output.save(lambda folder: save_lora(folder, transformer))
            logger.info(f"Saved the LoRA adapter to {output_dir} (pipe.load_lora_weights loads it).")
        else:
            run.output.save(pipe.save_pretrained)
            logger.info(f"Saved the pipeline to {output_dir}.")
        if args.validation_prompts and global_step % args.validation_steps != 0:
            log_validation(pipe, args, accelerator, global_step, output_dir)
        plot_loss_curve(output_dir / "train_log.csv", output_dir / "loss_curve.png")
    checksum = sum(parameter.detach().double().sum() for parameter in transformer.parameters())
    logger.info(
        f"Process {accelerator.process_index}: parameter checksum {checksum.item():.17g}", main_process_only=False
    )
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    if not torch.all(checksums == checksums[0]):
        raise RuntimeError(f"The processes ended with different parameters (checksums {checksums.tolist()}).")
    # drop the DDP model before its process group: torn down later, at exit, a gloo group can hang
    del model, optimizer, lr_scheduler
    accelerator.free_memory()
    return pipe if accelerator.is_main_process else None


if __name__ == "__main__":
    run_cli(main, parse_args)
