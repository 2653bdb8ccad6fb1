"""Edit an image with an ENAT pipeline folder or Hub repo: inpaint a region, outpaint a border, or img2img.

    python examples/edit.py inpaint --model pretrained/enat-shapes --image in.png --box 0 0 32 32 \
        --prompt "a small blue square at the top" --output-dir edits
    python examples/edit.py inpaint --model pretrained/enat-shapes --image in.png --mask mask.png --prompt "..."
    python examples/edit.py outpaint --model pretrained/enat-shapes --image in.png --pad 16 0 16 0 --prompt "..."
    python examples/edit.py img2img --model pretrained/enat-shapes --image in.png --strength 0.4 \
        --remask confidence --prompt "a large green triangle at the bottom"
    python examples/edit.py inpaint --model enat-l-256 --image dog.png --box 64 64 192 192 --class-labels 207

The image (and --mask) is resized to the model's size if it differs (a note says so); --box is in pixels of the
model's size (x0 y0 x1 y1, end exclusive). outpaint shrinks the image into the canvas minus the padding (LEFT TOP
RIGHT BOTTOM pixels), pads it and regenerates the border.

Writes into --output-dir only: `before.png` (the pipeline's input), `mask.png` (white: the tokens regenerated, at
token resolution; for img2img, the tokens whose id changed), `after.png` and `side_by_side.png` (before | mask |
after). Existing files of these names are refused before anything runs, unless --overwrite. --output-dir may not hold
the inputs (--image, --mask, the model); the files are staged and moved into place together, and a second run into
the same folder is refused while one runs. Errors are one line (--debug shows the traceback).
"""

import argparse

import numpy as np
import PIL.Image
import torch

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, box_mask, outpaint_inputs
from enat_diffusers.utils.cli import (
    OutputFolder,
    add_debug_argument,
    add_sampling_arguments,
    load_pipeline,
    open_image,
    report_errors,
    resolve_device,
    sampling_kwargs,
)


OUTPUT_NAMES = ("before.png", "mask.png", "after.png", "side_by_side.png")


def side_by_side(images, gap: int = 4) -> PIL.Image.Image:
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    height = max(image.height for image in images)
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return canvas


def token_mask_image(token_mask: torch.Tensor, factor: int) -> PIL.Image.Image:
    """`(h, w)` bool -> a white-on-black PIL image of the pixel size (each token a `factor x factor` cell)."""
    cells = token_mask.cpu().numpy().astype(np.uint8) * 255
    return PIL.Image.fromarray(np.kron(cells, np.ones((factor, factor), dtype=np.uint8)), mode="L")


def fit(image: PIL.Image.Image, size: int, what: str, resample) -> PIL.Image.Image:
    if image.size != (size, size):
        print(f"note: {what} is {image.width}x{image.height}; resized to the model's {size}x{size}")
        image = image.resize((size, size), resample)
    return image


def main(argv=None):
    args = parse_args(argv)
    with report_errors(args.debug):
        edit(args)


def edit(args):
    device = resolve_device(args.device)
    inputs = [args.model, args.image, getattr(args, "mask", None)]
    with OutputFolder(args.output_dir, OUTPUT_NAMES, inputs, args.overwrite, "--output-dir") as output:
        image = open_image(args.image, "--image")
        mask = open_image(args.mask, "--mask", mode="L") if getattr(args, "mask", None) else None
        pipeline_class = ENATImg2ImgPipeline if args.command == "img2img" else ENATInpaintPipeline
        pipe = load_pipeline(pipeline_class, args.model, dtype=getattr(torch, args.dtype)).to(device)
        size, factor = pipe.image_size, pipe.vae_scale_factor

        sampling = dict(
            prompt=args.prompt,
            class_labels=args.class_labels,
            negative_prompt=args.negative_prompt,
            **sampling_kwargs(args),
            generator=torch.Generator().manual_seed(args.seed),
            output_type="latent",
        )
        if args.command == "outpaint":
            image, mask = outpaint_inputs(image, *args.pad, size=(size, size))
        else:
            image = fit(image, size, "--image", PIL.Image.BICUBIC)
        if args.command == "inpaint":
            mask = box_mask(size, size, tuple(args.box)) if args.box else fit(mask, size, "--mask", PIL.Image.NEAREST)
        if args.command == "img2img":
            ids = pipe(image=image, strength=args.strength, remask=args.remask, **sampling).images
            regenerated = ids[0] != pipe.encode_image(image)[0]
        else:
            ids = pipe(image=image, mask_image=mask, **sampling).images
            regenerated = pipe.get_token_mask(mask)[0]
        with torch.no_grad():
            after = pipe.decode_tokens(ids, "pil")[0]
        mask_image = token_mask_image(regenerated, factor)

        image.save(output.path("before.png"))
        mask_image.save(output.path("mask.png"))
        after.save(output.path("after.png"))
        side_by_side([image, mask_image, after]).save(output.path("side_by_side.png"))
    print(f"{args.command}: {int(regenerated.sum())} of {regenerated.numel()} tokens regenerated/changed")
    print(f"wrote {', '.join(str(output.folder / name) for name in OUTPUT_NAMES)}")


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    common.add_argument("--image", required=True, help="the image to edit (resized to the model's size if needed)")
    condition = common.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", help="text prompt, or a class name for class-conditional models")
    condition.add_argument("--class-labels", type=int, help="class id (class-conditional models)")
    common.add_argument("--negative-prompt", default=None, help="text of the unconditional branch (text models)")
    add_sampling_arguments(common)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    common.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    common.add_argument("--output-dir", default="edits", help="never a folder holding the inputs")
    common.add_argument("--overwrite", action="store_true", help="replace existing files of the names above")
    add_debug_argument(common)

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True)
    inpaint = commands.add_parser(
        "inpaint", parents=[common], help="regenerate a masked region", description=__doc__, formatter_class=raw
    )
    region = inpaint.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", help="mask image, white = regenerate (resized to the model's size if needed)")
    region.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="pixel box to regenerate")
    outpaint = commands.add_parser(
        "outpaint",
        parents=[common],
        help="extend the image beyond its border",
        description=__doc__,
        formatter_class=raw,
    )
    outpaint.add_argument(
        "--pad",
        type=int,
        nargs=4,
        required=True,
        metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
        help="border to generate, in pixels of the model's size",
    )
    img2img = commands.add_parser(
        "img2img",
        parents=[common],
        help="re-mask a fraction of the tokens and regenerate",
        description=__doc__,
        formatter_class=raw,
    )
    img2img.add_argument("--strength", type=float, default=0.5, help="fraction of tokens re-masked, in (0, 1]")
    img2img.add_argument(
        "--remask",
        choices=["random", "confidence"],
        default="random",
        help="which tokens: at random (default) or the model's least confident",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
