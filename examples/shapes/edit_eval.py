"""Measure editing with the Shapes pipeline: the numbers and the picture of the README's editing section.

    python examples/shapes/edit_eval.py --model pretrained/enat-shapes --output-dir outputs/edit-eval

1. Inpainting: validation-split scenes with a left and a right object. The right half of the image (x >= 32) is
   regenerated with the caption "<the kept left object> and <a new random right-hand object>"; ShapesEval checks the
   full caption (the kept left object must survive, the new one must appear).
2. img2img: validation-split scenes, re-generated at strengths 0.3 / 0.6 / 0.9 with a caption whose first object has
   another colour, for both `remask` choices: how often the original caption still holds, and how often the new one.

Writes `edit_eval.json`, `edit_eval.md` (the tables) and `inpaint_examples.png` (rows of before | mask | after, the
new caption under each row) into --output-dir.
"""

import argparse
import json
import random
import sys
from dataclasses import replace

import PIL.Image
import torch

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, box_mask
from enat_diffusers.data.shapes import (
    ALL_PAIRS,
    COLOURS,
    POSITIONS,
    SIZES,
    ShapeObject,
    ShapesDataset,
    caption_for,
    render_scene,
)
from enat_diffusers.evaluation.shapes import ShapesEval
from enat_diffusers.utils.cli import OutputFolder, load_pipeline, run_parser
from enat_diffusers.visualization import captioned_grid


OUTPUT_NAMES = ("edit_eval.json", "edit_eval.md", "inpaint_examples.png")


def scenes_with(num: int, seed: int, keep) -> list:
    """The first `num` validation-split scenes for which `keep(objects)` holds."""
    dataset, scenes, index = ShapesDataset(10**7, seed=seed, split="validation"), [], 0
    while len(scenes) < num:
        objects = dataset.scene(index)
        if keep(objects):
            scenes.append(objects)
        index += 1
    return scenes


def batched(pipe_call, items: list, batch_size: int, seed: int, **kwargs) -> list:
    """Runs `pipe_call(prompt=..., image=..., [mask_image=...])` over `items` (dicts of per-image inputs) in batches;
    image `i` always uses the generator seeded `seed + i`."""
    images = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = {key: [item[key] for item in chunk] for key in chunk[0]}
        generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe_call(**inputs, generator=generator, **kwargs).images
    return images


def inpaint_right_half(pipe, evaluator, num: int, seed: int, batch_size: int, steps: int):
    scenes = scenes_with(num, seed, lambda objects: {o.position for o in objects} == {"left", "right"})
    rng = random.Random(seed)
    mask = box_mask(64, 64, (32, 0, 64, 64))
    items, captions = [], []
    for objects in scenes:
        left = next(o for o in objects if o.position == "left")
        colour, shape = rng.choice(ALL_PAIRS)
        (x, y), _ = POSITIONS["right"]
        new_right = ShapeObject(shape, rng.choice(list(SIZES)), colour, "right", (x, y))
        captions.append(caption_for([left, new_right]))
        items.append({"prompt": captions[-1], "image": render_scene(objects), "mask_image": mask})
    with torch.inference_mode():
        images = batched(pipe, items, batch_size, seed, num_inference_steps=steps)
    report = evaluator.evaluate(images, captions)
    examples = []
    for item, image in list(zip(items, images))[:6]:
        examples += [(item["image"], "before"), (shade(item["image"], mask), "mask"), (image, item["prompt"])]
    return report, examples


def shade(image, mask):
    """`image` with the region to regenerate (white in `mask`) tinted dark grey."""
    dark = PIL.Image.blend(image, PIL.Image.new("RGB", image.size, (60, 60, 60)), 0.7)
    return PIL.Image.composite(dark, image, mask)


def recolour_first(objects) -> list:
    """The scene with its first object in the next colour of the palette."""
    names = list(COLOURS)
    first = objects[0]
    return [replace(first, colour=names[(names.index(first.colour) + 1) % len(names)])] + list(objects[1:])


def img2img_strengths(pipe, evaluator, num: int, seed: int, batch_size: int, steps: int, strengths):
    scenes = scenes_with(num, seed + 1, lambda objects: True)
    originals = [caption_for(objects) for objects in scenes]
    edited = [caption_for(recolour_first(objects)) for objects in scenes]
    items = [{"prompt": new, "image": render_scene(objects)} for new, objects in zip(edited, scenes)]
    rows = []
    for remask in ("random", "confidence"):
        for strength in strengths:
            with torch.inference_mode():
                images = batched(
                    pipe, items, batch_size, seed, strength=strength, remask=remask, num_inference_steps=steps
                )
            rows.append(
                {
                    "remask": remask,
                    "strength": strength,
                    "original_caption_holds": evaluator.evaluate(images, originals)["all"]["prompt"],
                    "new_caption_holds": evaluator.evaluate(images, edited)["all"]["prompt"],
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image Shapes pipeline folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-images", type=int, default=200, help="scenes per measurement")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run")
    run_parser(parser, _run, argv)


def _run(args):
    with OutputFolder(args.output_dir, OUTPUT_NAMES, [args.model], args.overwrite) as output:
        _measure(args, output)
    print(f"wrote {output.folder}/edit_eval.json, edit_eval.md, inpaint_examples.png", file=sys.stderr)


def _measure(args, output: OutputFolder):
    inpaint = load_pipeline(ENATInpaintPipeline, args.model)
    inpaint.set_progress_bar_config(disable=True)
    img2img = ENATImg2ImgPipeline(**inpaint.components)
    img2img.set_progress_bar_config(disable=True)
    evaluator = ShapesEval()

    report, examples = inpaint_right_half(inpaint, evaluator, args.num_images, args.seed, args.batch_size, args.steps)
    captioned_grid([image for image, _ in examples], [text for _, text in examples], columns=3).save(
        output.path("inpaint_examples.png")
    )
    inpaint_row = {group: report[group]["prompt"] for group in ("seen", "held_out", "all")}
    print({"inpaint_right_half": inpaint_row}, flush=True)
    rows = img2img_strengths(
        img2img, evaluator, args.num_images, args.seed, args.batch_size, args.steps, args.strengths
    )

    lines = [
        f"Inpainting the right half ({args.num_images} scenes, {args.steps} steps): ShapesEval on the full caption "
        f"{100 * inpaint_row['all']:.1f} % (seen captions {100 * (inpaint_row['seen'] or 0):.1f} %, captions with a "
        f"held-out pair {100 * (inpaint_row['held_out'] or 0):.1f} %)",
        "",
        "| img2img remask | strength | original caption holds | new caption (first object recoloured) holds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['remask']} | {r['strength']} | {100 * r['original_caption_holds']:.1f} % | "
        f"{100 * r['new_caption_holds']:.1f} % |"
        for r in rows
    ]
    output.path("edit_eval.json").write_text(
        json.dumps({"inpaint_right_half": report | {"results": None}, "img2img": rows}, indent=2) + "\n"
    )
    output.path("edit_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
