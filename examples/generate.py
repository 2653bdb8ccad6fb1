"""Generate images with an ENAT pipeline folder or Hub repo; write them, a captioned grid, and the step-by-step reveal.

    python examples/generate.py --model pretrained/enat-shapes --prompt "a large red circle on the left" \
        "a small blue square at the top and a large green triangle at the bottom" --output-dir samples
    python examples/generate.py --model enat-l-256 --prompt "golden retriever" "tabby" --steps 8 --seed 0
    python examples/generate.py --model enat-l-256 --class-labels 207 281

Writes into --output-dir only: `image_00.png`, `image_01.png`, ... (numbered; `images.json` maps each file to its
prompt or class and seed), `grid.png` (the images with their prompts written underneath) and, for the first image,
`reveal.gif` and `reveal_strip.png` (the tokens appearing step by step, decoded after each step). Existing files of
these names are refused before anything is generated, unless --overwrite.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from enat_diffusers import ENATPipeline
from enat_diffusers.visualization import RevealRecorder, captioned_grid, reveal_strip, save_gif


def output_paths(output_dir: Path, num_images: int) -> dict:
    paths = {f"image_{i:02d}": output_dir / f"image_{i:02d}.png" for i in range(num_images)}
    paths.update(
        index=output_dir / "images.json",
        grid=output_dir / "grid.png",
        gif=output_dir / "reveal.gif",
        strip=output_dir / "reveal_strip.png",
    )
    return paths


def main(argv=None):
    args = parse_args(argv)
    conditions = args.prompt if args.prompt else args.class_labels
    num_images = len(conditions) * args.num_images_per_prompt
    output_dir = Path(args.output_dir)
    paths = output_paths(output_dir, num_images)
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not args.overwrite:
        sys.exit(
            f"error: {existing[0]} exists; pass --overwrite (replaces only the files listed in --help) "
            "or another --output-dir"
        )
    if output_dir.exists() and not output_dir.is_dir():
        sys.exit(f"error: --output-dir {output_dir} is a file")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = ENATPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    seeds = [args.seed + i for i in range(num_images)]
    recorder = RevealRecorder()
    try:
        images = pipe(
            prompt=args.prompt,
            class_labels=args.class_labels,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            mask_temperature=args.mask_temperature,
            sampling_temperature=args.sampling_temperature,
            reuse_features=False if args.no_reuse else None,  # None: reuse where the model has it (ENAT)
            num_images_per_prompt=args.num_images_per_prompt,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            callback_on_step_end=recorder,
        ).images
    except (ValueError, TypeError) as error:
        sys.exit(f"error: {error}")

    output_dir.mkdir(parents=True, exist_ok=True)
    labels = [str(c) for c in conditions for _ in range(args.num_images_per_prompt)]
    if args.class_labels is not None and pipe.config.id2label:
        labels = [f"{c}: {pipe.config.id2label[int(c)]}" for c in labels]
    index = []
    for i, (image, label, seed) in enumerate(zip(images, labels, seeds)):
        image.save(paths[f"image_{i:02d}"])
        index.append({"file": paths[f"image_{i:02d}"].name, "condition": label, "seed": seed})
    paths["index"].write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    captioned_grid(images, labels, columns=min(4, len(images))).save(paths["grid"])
    frames = recorder.frames(pipe)
    save_gif(frames, paths["gif"])
    reveal_strip(frames).save(paths["strip"])
    print(f"wrote {num_images} images ({images[0].width}x{images[0].height}) to {output_dir}/image_*.png")
    print(f"  grid with prompts:        {paths['grid']}")
    print(f"  reveal of '{labels[0]}': {paths['gif']} and {paths['strip']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", nargs="+", help="text prompts, or class names for class-conditional models")
    condition.add_argument("--class-labels", nargs="+", type=int, help="class ids (class-conditional models)")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: the scheduler's, 8)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's setting; 0 = off")
    parser.add_argument("--mask-temperature", type=float, default=None, help="default: the model's setting")
    parser.add_argument("--sampling-temperature", type=float, default=None, help="default: the model's setting")
    parser.add_argument("--no-reuse", action="store_true", help="re-encode every visible token at every step")
    parser.add_argument("--num-images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output-dir", default="samples")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files of the names above")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
