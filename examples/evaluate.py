# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Evaluate an ENAT pipeline, or a folder of images: FID, Inception Score and CLIP score, on accelerate.

ENAT's protocol on ImageNet 256 (FID-50K, class-balanced labels, the reference statistics of ADM's ImageNet batch:
ENAT's `fid_stats_imagenet256_guided_diffusion.npz` or ADM's `VIRTUAL_imagenet256_labeled.npz`, both hold `mu` and
`sigma`):

    accelerate launch examples/evaluate.py --model enat-l-256 --num-images 50000 --batch-size 125 \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --reference-stats fid_stats_imagenet256_guided_diffusion.npz --inception-score --json fid50k.json

A text-to-image model against a folder of real images (statistics saved for the next run), with CLIP score:

    python examples/evaluate.py --model pretrained/enat-shapes --prompts shapes/validation/metadata.jsonl \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --reference-dir shapes/validation \\
        --save-reference-stats shapes-validation.npz --clip-model clip-vit-base-patch32 --json shapes.json

Images generated before (`--images-dir`, all images of the folder; CLIP score reads the prompts from its
`metadata.jsonl`, which `--save-images` writes), or only the reference statistics of a folder:

    python examples/evaluate.py --images-dir samples --reference-stats shapes-validation.npz --inception-weights W
    python examples/evaluate.py --reference-dir shapes/validation --save-reference-stats shapes-validation.npz \\
        --inception-weights W

The metrics are torchmetrics' on torch-fidelity's InceptionV3 (`enat_diffusers.evaluation.fid` says why). Image `i`
is generated from seed `--seed + i`; a class-conditional model gives image `i` class `i * num_classes // N` (ENAT's
balanced order, see `balanced_class_labels`), a text model prompt `i % len(prompts)`. Each process generates a
contiguous share of the images and the features are gathered in image order, so that the result does not depend on
the number of processes. The main process prints the table and writes --json, --save-images and
--save-reference-stats; existing files are refused unless --overwrite. `--fid-features 64` (or 192, 768) computes FID
on an earlier Inception block, for quick checks on a few hundred images; published FIDs use the default, 2048.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from enat_diffusers import ENATPipeline
from enat_diffusers.evaluation.fid import (
    FEATURE_DIMS,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_WEIGHTS_FILE,
    clip_scores,
    feature_statistics,
    frechet_distance,
    inception_score,
    list_images,
    load_clip,
    load_inception,
    load_statistics,
    read_images,
    save_statistics,
    sha256_of,
    to_uint8,
)
from enat_diffusers.utils.cli import (
    OutputFolder,
    UsageError,
    add_debug_argument,
    add_sampling_arguments,
    check_output_file,
    load_pipeline,
    report_errors,
    sampling_kwargs,
    write_file_atomically,
)


Batches = Iterator[Tuple[torch.Tensor, Optional[List[str]]]]  # uint8 images (B, 3, H, W), their prompts
SAVED_IMAGES = ("[0-9][0-9][0-9][0-9][0-9][0-9].png", "metadata.jsonl")  # what --save-images writes
STAGING = "evaluate"  # every process writes the saved images into SAVE_IMAGES/.staging-evaluate first


def balanced_class_labels(num_images: int, num_classes: int) -> List[int]:
    """Image `i` gets class `i * num_classes // num_images`: every class `floor(N / C)` or `ceil(N / C)` images, in
    class order. For `N` a multiple of `C` these are ENAT's evaluation labels (`np.arange(C).repeat(N // C)` in its
    `train.py`), which otherwise give the remaining `N mod C` images class 0."""
    return [i * num_classes // num_images for i in range(num_images)]


def read_prompts(path: Path) -> List[str]:
    """Prompts of a text file (one per line) or of a `.jsonl` (the `text` of each line, e.g. a metadata.jsonl)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [json.loads(line).get("text") for line in lines]
        if not all(isinstance(text, str) and text.strip() for text in lines):
            raise ValueError(f'every line of {path} needs a non-empty "text"')
    if not lines:
        raise ValueError(f"{path} has no prompts")
    return lines


def folder_prompts(folder: Path, paths: List[Path]) -> List[str]:
    """The `text` of each image in `folder/metadata.jsonl` (an imagefolder, or what --save-images writes)."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(f"CLIP score needs the prompts of --images-dir: {metadata} (file_name, text) not found")
    records = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = {record.get("file_name"): record.get("text") for record in records}
    prompts = [texts.get(path.relative_to(folder).as_posix()) for path in paths]
    missing = [path.name for path, prompt in zip(paths, prompts) if not isinstance(prompt, str)]
    if missing:
        raise ValueError(f"{metadata} gives no text for {len(missing)} images (e.g. {missing[0]})")
    return prompts


def process_share(num_items: int, accelerator) -> range:
    """This process's contiguous share of `range(num_items)`; the shares of all processes, in order, cover it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    return range(num_items * rank // world, num_items * (rank + 1) // world)


def gather_rows(rows: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Every process's rows, concatenated in process order (shares may differ in length by one, so they are padded
    for the gather and cut back)."""
    rows = rows.to(accelerator.device)
    counts = accelerator.gather(torch.tensor([len(rows)], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(rows, dim=0)
    chunks = accelerator.gather(padded).split(padded.shape[0])
    return torch.cat([chunk[:count] for chunk, count in zip(chunks, counts)]).cpu()


def folder_batches(paths: List[Path], prompts: Optional[List[str]], share: range, batch_size: int) -> Batches:
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        yield read_images(paths[start:stop]), prompts[start:stop] if prompts else None


def generated_batches(pipe, args, conditions: List[dict], share: range, accelerator: Accelerator) -> Batches:
    """Generates this process's share; image `i` has `conditions[i]` and seed `--seed + i`. With --save-images,
    writes `{i:06d}.png` and (the main process) `metadata.jsonl`."""
    save_dir = Path(args.save_images) / f".staging-{STAGING}" if args.save_images else None
    if save_dir is not None:
        if accelerator.is_main_process:
            with open(save_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
                for i, condition in enumerate(conditions):
                    record = {"file_name": f"{i:06d}.png", **condition, "seed": args.seed + i}
                    metadata.write(json.dumps(record, ensure_ascii=False) + "\n")
    for start in range(share.start, share.stop, args.batch_size):
        indices = range(start, min(start + args.batch_size, share.stop))
        prompts = [conditions[i]["text"] for i in indices] if "text" in conditions[0] else None
        images = pipe(
            prompt=prompts,
            class_labels=None if prompts else [conditions[i]["class_label"] for i in indices],
            **sampling_kwargs(args),
            generator=[torch.Generator().manual_seed(args.seed + i) for i in indices],
            output_type="pt",
        ).images
        images = to_uint8(images).cpu()
        if save_dir is not None:
            for i, image in zip(indices, images.permute(0, 2, 3, 1).numpy()):
                Image.fromarray(image).save(save_dir / f"{i:06d}.png")
        yield images, prompts


def image_source(args, accelerator: Accelerator) -> Tuple[int, Batches]:
    """The number of images to evaluate and this process's batches of them (read or generated lazily)."""
    if args.images_dir:
        paths = list_images(args.images_dir)[: args.num_images]
        prompts = folder_prompts(Path(args.images_dir), paths) if args.clip_model else None
        return len(paths), folder_batches(paths, prompts, process_share(len(paths), accelerator), args.batch_size)

    prompts = read_prompts(Path(args.prompts)) if args.prompts else None
    pipe = load_pipeline(ENATPipeline, args.model, dtype=getattr(torch, args.dtype)).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.is_text_to_image and not prompts:
        raise ValueError(f"{args.model} is a text-to-image model: give --prompts FILE")
    if not pipe.is_text_to_image and (prompts or args.clip_model):
        raise ValueError(f"{args.model} is class-conditional: --prompts and --clip-model are for text models")
    num_images = args.num_images or (len(prompts) if prompts else 50000)
    if prompts:
        conditions = [{"text": prompts[i % len(prompts)]} for i in range(num_images)]
    else:
        conditions = [
            {"class_label": c} for c in balanced_class_labels(num_images, pipe.transformer.config.num_classes)
        ]
    return num_images, generated_batches(pipe, args, conditions, process_share(num_images, accelerator), accelerator)


def measure(batches: Batches, inception, clip, accelerator: Accelerator, total: int) -> Dict[str, torch.Tensor]:
    """Inception features and logits and CLIP scores of this process's batches, gathered in image order."""
    dim = (
        int(inception.get_requested_features_list()[0]) if inception is not None else 0
    )  # rows of an empty share need it too
    rows = {"pool": [torch.zeros(0, dim)], "logits": [torch.zeros(0, 1008)], "clip": [torch.zeros(0)]}
    progress = tqdm(total=total, desc="images", disable=not accelerator.is_main_process)
    for images, prompts in batches:
        if inception is not None:
            with torch.no_grad():
                pool, logits = inception(images.to(accelerator.device))
            rows["pool"].append(pool.float().cpu())
            rows["logits"].append(logits.float().cpu())
        if clip is not None:
            rows["clip"].append(clip_scores(*clip, images, prompts).cpu())
        progress.update(len(images) * accelerator.num_processes)
    progress.close()
    wanted = {"pool": inception is not None, "logits": inception is not None, "clip": clip is not None}
    return {name: gather_rows(torch.cat(rows[name]), accelerator) for name in rows if wanted[name]}


def count_error(num_images: int, args) -> Optional[str]:
    if (args.reference_stats or args.reference_dir) and num_images < 2:
        return f"FID needs at least 2 images, got {num_images}"
    if args.inception_score and num_images < args.is_splits:
        return f"the Inception Score over {args.is_splits} splits needs at least as many images, got {num_images}"
    return None


def check_args(args) -> Optional[str]:
    """The errors that can be found before anything is loaded."""
    wants_fid = bool(args.reference_stats or args.reference_dir)
    if not (args.model or args.images_dir or args.save_reference_stats):
        return "give --model or --images-dir (the images to evaluate), or --reference-dir with --save-reference-stats"
    if (args.model or args.images_dir) and not (wants_fid or args.inception_score or args.clip_model):
        return "nothing to compute: give --reference-stats or --reference-dir (FID), --inception-score or --clip-model"
    if (wants_fid or args.inception_score) and not args.inception_weights:
        return "FID and the Inception Score need --inception-weights (pt_inception-2015-12-05-6726825d.pth)"
    if args.save_reference_stats and not args.reference_dir:
        return "--save-reference-stats needs --reference-dir (the images to compute them from)"
    if args.prompts and not args.model:
        return "--prompts is for generation with --model; --images-dir reads prompts from its metadata.jsonl"
    if args.prompts and not Path(args.prompts).is_file():
        return f"--prompts {args.prompts} not found"
    if args.save_images and not args.model:
        return "--save-images needs --model (it saves the generated images)"
    if args.num_images is not None and args.num_images < 1:
        return "--num-images must be at least 1"
    if args.num_images is not None and count_error(args.num_images, args):
        return count_error(args.num_images, args)
    inputs = input_paths(args)
    try:  # the output-folder policy (enat_diffusers.utils.cli), before anything is loaded
        for option in ("json", "save_reference_stats"):
            if getattr(args, option):
                check_output_file(getattr(args, option), inputs, "--" + option.replace("_", "-"), args.overwrite)
        if args.save_images:
            OutputFolder(args.save_images, SAVED_IMAGES, inputs, args.overwrite, "--save-images").check()
    except UsageError as error:
        return str(error)
    return None


def input_paths(args) -> List[Optional[str]]:
    names = ("model", "images_dir", "prompts", "reference_stats", "reference_dir", "inception_weights", "clip_model")
    return [getattr(args, name) for name in names]


def evaluate(args, accelerator: Accelerator) -> dict:
    """Computes what the arguments ask for (cheap checks first); returns the record that --json gets."""
    record = {"fid": None, "inception_score_mean": None, "inception_score_std": None, "clip_score": None}
    # 1. the images to evaluate and the FID reference: found, counted and checked; nothing heavy runs yet
    num_images, batches = image_source(args, accelerator) if args.model or args.images_dir else (None, None)
    if num_images is not None and count_error(num_images, args):
        raise ValueError(count_error(num_images, args))
    reference = load_statistics(args.reference_stats) if args.reference_stats else None
    if reference is not None and len(reference[0]) != args.fid_features:
        raise ValueError(
            f"{args.reference_stats} holds statistics of {len(reference[0])}-d features; pass --fid-features "
            f"{len(reference[0])} or statistics of {args.fid_features}-d ones"
        )
    reference_paths = list_images(args.reference_dir) if args.reference_dir else None
    # 2. the networks
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "overwrite")}
    settings["num_processes"] = accelerator.num_processes
    inception = None
    if args.reference_stats or args.reference_dir or args.inception_score:
        inception = load_inception(args.inception_weights, accelerator.device, args.fid_features)
        settings["inception_weights_sha256"] = sha256_of(args.inception_weights)
        standard = settings["inception_weights_sha256"].startswith(INCEPTION_SHA256_PREFIX)
        if not standard and accelerator.is_main_process:
            print(
                f"note: {args.inception_weights} is not the standard FID Inception file {INCEPTION_WEIGHTS_FILE}; "
                "these FIDs are not comparable with published ones",
                file=sys.stderr,
            )
    clip = load_clip(args.clip_model, accelerator.device) if args.clip_model else None
    # 3. the reference statistics of a folder
    if reference_paths is not None:
        share = process_share(len(reference_paths), accelerator)
        features = measure(
            folder_batches(reference_paths, None, share, args.batch_size),
            inception,
            None,
            accelerator,
            len(reference_paths),
        )
        reference = feature_statistics(features["pool"])
        record["reference_num_images"] = len(reference_paths)
        if args.save_reference_stats and accelerator.is_main_process:
            write_file_atomically(args.save_reference_stats, lambda path: save_statistics(path, *reference))
    if batches is None:
        return record
    # 4. the metrics
    measured = measure(batches, inception, clip, accelerator, num_images)
    record["num_images"] = num_images
    if reference is not None:
        record["fid"] = frechet_distance(measured["pool"], *reference)
    if args.inception_score:
        record["inception_score_mean"], record["inception_score_std"] = inception_score(
            measured["logits"], args.is_splits
        )
    if clip is not None:
        record["clip_score"] = max(measured["clip"].mean().item(), 0.0)
    record["settings"] = settings
    return record


def report(record: dict, args):
    """Prints the table and writes --json (main process)."""
    if args.save_reference_stats:
        print(
            f"wrote the statistics of the {record['reference_num_images']} images of {args.reference_dir} to "
            f"{args.save_reference_stats}"
        )
    if "num_images" not in record:
        return
    print(f"{'metric':<16} value")
    if record["fid"] is not None:
        print(f"{'FID':<16} {record['fid']:.4f}")
    if record["inception_score_mean"] is not None:
        print(f"{'Inception Score':<16} {record['inception_score_mean']:.4f} ± {record['inception_score_std']:.4f}")
    if record["clip_score"] is not None:
        print(f"{'CLIP score':<16} {record['clip_score']:.4f}")
    print(f"{'images':<16} {record['num_images']}")
    if args.json:
        write_file_atomically(args.json, lambda path: path.write_text(json.dumps(record, indent=2) + "\n"))
        print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    with report_errors(args.debug):
        error = check_args(args)
        if error:
            raise UsageError(error)
        accelerator = Accelerator()
        # --save-images: checked, locked and staged by the main process; moved into place once all are measured
        saved = contextlib.nullcontext()
        if args.save_images and accelerator.is_main_process:
            inputs = input_paths(args)
            saved = OutputFolder(args.save_images, SAVED_IMAGES, inputs, args.overwrite, "--save-images", STAGING)
        with saved:
            accelerator.wait_for_everyone()
            record = evaluate(args, accelerator)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            report(record, args)
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--model", help="pipeline folder or Hub repo id to generate the images with")
    images.add_argument("--images-dir", help="evaluate the images of this folder (recursive) instead")
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="default: 50000 (class models), one per prompt (text models), all (--images-dir)",
    )
    parser.add_argument("--prompts", help="text models: one prompt per line, or a .jsonl with `text` per line")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and batch")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (local file)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--reference-stats", help="FID reference statistics: .npz with mu and sigma (ADM, ENAT)")
    reference.add_argument("--reference-dir", help="FID reference: a folder of images (recursive)")
    parser.add_argument("--save-reference-stats", help="write the statistics of --reference-dir to this .npz")
    parser.add_argument(
        "--fid-features",
        type=int,
        choices=FEATURE_DIMS,
        default=2048,
        help="Inception features of FID: 2048 (pool3, the standard) or an earlier block's, for small sets",
    )
    parser.add_argument("--inception-score", action="store_true", help="also compute the Inception Score")
    parser.add_argument("--is-splits", type=int, default=10, help="splits of the Inception Score")
    parser.add_argument("--clip-model", help="text models: local folder of a transformers CLIPModel and processor")
    parser.add_argument("--json", help="write the results and settings to this file")
    parser.add_argument("--save-images", help="save the generated images and a metadata.jsonl to this folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (and earlier saved images)"
    )
    add_debug_argument(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
