"""Generate images with an ENAT pipeline folder or Hub repo; write them, a captioned grid, and the step-by-step reveal.

    python examples/generate.py --model pretrained/enat-shapes --prompt "a large red circle on the left" \
        "a small blue square at the top and a large green triangle at the bottom" --output-dir samples
    python examples/generate.py --model enat-l-256 --prompt "golden retriever" "tabby" --steps 8 --seed 0
    python examples/generate.py --model enat-l-256 --class-labels 207 281

Writes into --output-dir only: `image_00.png`, `image_01.png`, ... (numbered; `images.json` maps each file to its
prompt or class and seed), `grid.png` (the images with their prompts written underneath) and, for the first image,
`reveal.gif` and `reveal_strip.png` (the tokens appearing step by step, decoded after each step). Existing files of
these names are refused before anything is generated, unless --overwrite, which also removes the `image_*.png` of an
earlier run that this one does not write again. The files go to a staging folder first and are moved into place when
all are there; a second run into the same folder is refused while one runs. --output-dir may not hold the model.
Errors are one line (--debug shows the traceback).
"""

import argparse
import json

import torch

from enat_diffusers import ENATPipeline
from enat_diffusers.utils.cli import (
    OutputFolder,
    add_sampling_arguments,
    load_pipeline,
    positive_int,
    resolve_device,
    run_parser,
    sampling_kwargs,
)
from enat_diffusers.visualization import RevealRecorder, captioned_grid, reveal_strip, save_gif


# what a run writes: the images (as many as asked), their index, the grid and the reveal of the first image
OUTPUT_KINDS = ("image_*.png", "images.json", "grid.png", "reveal.gif", "reveal_strip.png")


def main(argv=None):
    run_parser(build_parser(), generate, argv)


def generate(args):
    conditions = args.prompt if args.prompt else args.class_labels
    num_images = len(conditions) * args.num_images_per_prompt
    device = resolve_device(args.device)
    # checked, locked and staged before the model is loaded; written into place only when everything is there
    with OutputFolder(args.output_dir, OUTPUT_KINDS, [args.model], args.overwrite, "--output-dir") as output:
        pipe = load_pipeline(ENATPipeline, args.model, dtype=getattr(torch, args.dtype)).to(device)
        seeds = [args.seed + i for i in range(num_images)]
        recorder = RevealRecorder()
        images = pipe(
            prompt=args.prompt,
            class_labels=args.class_labels,
            **sampling_kwargs(args),
            num_images_per_prompt=args.num_images_per_prompt,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            callback_on_step_end=recorder,
        ).images

        labels = [str(c) for c in conditions for _ in range(args.num_images_per_prompt)]
        if args.class_labels is not None and pipe.config.id2label:
            labels = [f"{c}: {pipe.config.id2label[int(c)]}" for c in labels]
        index = []
        for i, (image, label, seed) in enumerate(zip(images, labels, seeds)):
            image.save(output.path(f"image_{i:02d}.png"))
            index.append({"file": f"image_{i:02d}.png", "condition": label, "seed": seed})
        text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
        output.path("images.json").write_text(text, encoding="utf-8", errors="backslashreplace")
        captioned_grid(images, labels, columns=min(4, len(images))).save(output.path("grid.png"))
        frames = recorder.frames(pipe)
        save_gif(frames, output.path("reveal.gif"))
        reveal_strip(frames).save(output.path("reveal_strip.png"))
    output_dir = output.folder
    print(f"wrote {num_images} images ({images[0].width}x{images[0].height}) to {output_dir}/image_*.png")
    print(f"  grid with prompts:        {output_dir / 'grid.png'}")
    print(f"  reveal of {labels[0]!r}: {output_dir / 'reveal.gif'} and {output_dir / 'reveal_strip.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", nargs="+", help="text prompts, or class names for class-conditional models")
    condition.add_argument("--class-labels", nargs="+", type=int, help="class ids (class-conditional models)")
    add_sampling_arguments(parser)
    parser.add_argument("--num-images-per-prompt", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output-dir", default="samples", help="never the model folder or one holding it")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the files of the names above (and earlier image_*.png)"
    )
    return parser


if __name__ == "__main__":
    main()
