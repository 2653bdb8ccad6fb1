"""Generate images with an ENAT pipeline folder or Hub repo.

python examples/generate.py --model enat-l-256 --prompt "golden retriever" "tabby" --output-dir samples
python examples/generate.py --model enat-l-256 --class-labels 207 281 --steps 8 --seed 0
python examples/generate.py --model my-text-model --prompt "a red bus in the snow"
"""

import argparse
from pathlib import Path

import torch

from enat_diffusers import ENATPipeline  # importing enat_diffusers registers its classes with diffusers


def main(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = ENATPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    conditions = args.prompt if args.prompt else args.class_labels
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(conditions))]
    images = pipe(
        prompt=args.prompt,
        class_labels=args.class_labels,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generators,
    ).images

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        output_dir / f"{i:02d}_{str(c).replace(' ', '_')[:40]}_seed{args.seed + i}.png"
        for i, c in enumerate(conditions)
    ]
    existing = [path for path in paths if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {existing[0]} exists; pass --overwrite or another --output-dir")
    for image, path in zip(images, paths):
        image.save(path)
        print(f"saved {path} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", nargs="+", help="text prompts, or class names for class-conditional models")
    condition.add_argument("--class-labels", nargs="+", type=int, help="class ids (class-conditional models)")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: the scheduler's, 8)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's released setting")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output-dir", default="samples")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images of the same names")
    main(parser.parse_args())
