# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""ShapesEval: checks images of the Shapes world against their captions by plain image analysis (no learned judge).

For every object of a caption, the object found in the window around its nominal position (±(extent/2 + 6) px)
must have the named colour, size and shape and be centred near the nominal position; a prompt is correct when every
object is. Accuracies are reported per attribute and per prompt, for seen and held-out prompts separately.

Score a text-to-image pipeline on validation-split prompts, or on prompts of a file (one caption per line):

    python -m enat_diffusers.evaluation.shapes --model shapes-enat --num-prompts 100 --steps 8
    python -m enat_diffusers.evaluation.shapes --model shapes-enat --prompts prompts.txt --json

Score the images of an `imagefolder` split (to check real data, or generated images saved with a metadata.jsonl):

    python -m enat_diffusers.evaluation.shapes --images-dir shapes/validation

Compare two reports of the same prompts and image seeds (e.g. two models, or two sampling strategies), prompt by
prompt, with an exact McNemar test:

    python -m enat_diffusers.evaluation.shapes --json --model before --num-prompts 500 > before.json
    python -m enat_diffusers.evaluation.shapes --json --model after --num-prompts 500 > after.json
    python -m enat_diffusers.evaluation.shapes --compare before.json after.json
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.shapes import (
    ALL_PAIRS,
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    TWO_OBJECT_LAYOUTS,
    ShapesDataset,
    caption_for,
    is_held_out,
    parse_caption,
    shape_mask,
)
from ..pipelines.pipeline_enat import ENATPipeline
from ..utils.cli import add_debug_argument, load_pipeline, open_image, positive_int, report_errors, resolve_device


ATTRIBUTES = ("colour", "size", "shape", "position")
# half-size of an object's window beyond half its extent: 3 px of jitter and 3 px of margin
WINDOW_MARGIN = 6

_COLOUR_NAMES = list(COLOURS)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32) - _BACKGROUND  # (colours, 3)


def _label_components(mask: np.ndarray) -> np.ndarray:
    """Labels the 4-connected components of a boolean mask: 0 outside the mask, 1, 2, ... for the components."""
    height, width = mask.shape
    inside = mask.ravel().tolist()
    labels = [0] * (height * width)
    count = 0
    for start in np.flatnonzero(mask).tolist():
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            index = stack.pop()
            y, x = divmod(index, width)
            for neighbour, valid in (
                (index - width, y > 0),
                (index + width, y < height - 1),
                (index - 1, x > 0),
                (index + 1, x < width - 1),
            ):
                if valid and inside[neighbour] and not labels[neighbour]:
                    labels[neighbour] = count
                    stack.append(neighbour)
    return np.array(labels, dtype=np.int32).reshape(height, width)


def _grow_labels(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Extends labels into the unlabelled pixels of `mask`, one 4-neighbour step at a time (ties: larger label)."""
    labels = labels.copy()
    while True:
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        frontier = mask & (labels == 0) & (grown > 0)
        if not frontier.any():
            return labels
        labels[frontier] = grown[frontier]


class ShapesEval:
    r"""
    Checks Shapes images against their captions.

    Segmentation: every pixel is read as a blend `background + alpha * (colour - background)` of the background and
    the palette colour whose blend line passes closest to it (so the blurred edges of a blue object read as blue, not
    as the nearest palette colour, purple). Pixels with `alpha >= foreground_alpha` are foreground. Objects are the
    4-connected components of the pixels with `alpha >= seed_alpha`, grown back over the foreground, so that a blurred
    seam between two nearby objects does not merge them (foreground pieces without such a core are objects too).

    For each object of the caption, the segmented object with the most pixels in the caption object's window (its
    nominal centre ±(extent/2 + 6) px) is measured:

    - colour: the most frequent palette colour of its pixels must be the named one;
    - shape: from the fill ratio of its bounding box (area / box area; as rendered: circle 0.78-0.80, square 1,
      triangle 0.54-0.57): a triangle below `triangle_max_fill`, a square from `square_min_fill`, a circle in
      between; a mask whose centre of mass lies `triangle_min_drop` box heights or more below its box centre
      (rendered triangles: 0.14-0.15, circles and squares: 0) is a triangle too, as blur blunts a triangle's apex and
      raises its fill ratio;
    - size: its area must lie within a factor `size_tolerance` of the rendered area of the named size for the shape
      it has (so that a wrong shape does not also count as a wrong size);
    - position: the centre of its bounding box must lie within `position_tolerance` px (per axis) of the nominal
      centre.

    A caption object is correct when all four hold; when no object of at least `min_object_area` pixels reaches into
    its window, all four fail. A prompt is correct when all its objects are.

    Args:
        foreground_alpha (`float`, defaults to 0.5): Blend weight from which a pixel is foreground.
        seed_alpha (`float`, defaults to 0.75): Blend weight of the cores that objects are grown from.
        min_object_area (`int`, defaults to 40): Smallest object in pixels (a small triangle has 112).
        position_tolerance (`float`, defaults to 8): The data set jitters by up to 3 px; nominal positions are 16 px
            apart.
        triangle_max_fill (`float`, defaults to 0.67), square_min_fill (`float`, defaults to 0.89),
            triangle_min_drop (`float`, defaults to 0.06): Shape boundaries (see above).
        size_tolerance (`float`, defaults to 24 / 14): Area factor; the default is half of the (logarithmic) distance
            between the areas of the two sizes, so that an area is judged by the nearer size.
    """

    def __init__(
        self,
        foreground_alpha: float = 0.5,
        seed_alpha: float = 0.75,
        min_object_area: int = 40,
        position_tolerance: float = 8,
        triangle_max_fill: float = 0.67,
        square_min_fill: float = 0.89,
        triangle_min_drop: float = 0.06,
        size_tolerance: float = SIZES["large"] / SIZES["small"],
    ):
        self.foreground_alpha = foreground_alpha
        self.seed_alpha = seed_alpha
        self.min_object_area = min_object_area
        self.position_tolerance = position_tolerance
        self.triangle_max_fill = triangle_max_fill
        self.square_min_fill = square_min_fill
        self.triangle_min_drop = triangle_min_drop
        self.size_tolerance = size_tolerance
        self.expected_areas = {
            (shape, size): int(shape_mask(shape, extent).sum()) for shape in SHAPES for size, extent in SIZES.items()
        }

    def segment(self, image: Image.Image):
        r"""
        Segments an image (resized to 64 x 64 if needed) into objects.

        Returns:
            `(labels, colours)`: `(64, 64)` arrays of object labels (0 for the background) and of the palette index
            of every pixel (in the order of `COLOURS`).
        """
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        offsets = np.asarray(image, dtype=np.float32) - _BACKGROUND  # (H, W, 3)
        dots = offsets @ _DIRECTIONS.T  # (H, W, colours)
        squared_lengths = (_DIRECTIONS**2).sum(-1)
        alphas = np.clip(dots / squared_lengths, 0, 1)
        # |offset - alpha * direction|^2, without the |offset|^2 that all colours share
        squared_residuals = alphas**2 * squared_lengths - 2 * alphas * dots
        colours = squared_residuals.argmin(-1)
        alpha = np.take_along_axis(alphas, colours[..., None], -1)[..., 0]
        foreground = alpha >= self.foreground_alpha
        labels = _grow_labels(_label_components(alpha >= self.seed_alpha), foreground)
        unseeded = _label_components(foreground & (labels == 0))
        labels = np.where(unseeded > 0, unseeded + labels.max(), labels)
        return labels, colours

    def _check_object(self, obj, labels: np.ndarray, colours: np.ndarray) -> Dict:
        (x, y), half = obj.nominal_centre, obj.extent // 2 + WINDOW_MARGIN
        window = labels[max(y - half, 0) : y + half, max(x - half, 0) : x + half]
        areas = np.bincount(labels.ravel())
        counts = np.bincount(window.ravel(), minlength=len(areas))
        counts[areas < self.min_object_area] = 0
        counts[0] = 0  # the background
        label = int(counts.argmax())
        result = {"phrase": obj.phrase, "found": bool(counts[label] > 0)}
        if not result["found"]:
            result.update({attribute: False for attribute in ATTRIBUTES}, correct=False, measured=None)
            return result

        component = labels == label
        area = int(areas[label])
        ys, xs = np.nonzero(component)
        width, height = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
        fill = area / (width * height)
        # how far below the box centre the mask's centre of mass lies, in box heights: 0 for circles and squares
        drop = float((ys + 0.5).mean() - centre[1]) / height
        if fill < self.triangle_max_fill or drop >= self.triangle_min_drop:
            shape = "triangle"
        elif fill >= self.square_min_fill:
            shape = "square"
        else:
            shape = "circle"
        colour_counts = np.bincount(colours[component], minlength=len(_COLOUR_NAMES))
        colour = _COLOUR_NAMES[int(colour_counts.argmax())]
        area_ratio = area / self.expected_areas[(shape, obj.size)]

        result.update(
            colour=colour == obj.colour,
            size=bool(1 / self.size_tolerance <= area_ratio <= self.size_tolerance),
            shape=shape == obj.shape,
            position=bool(max(abs(centre[0] - x), abs(centre[1] - y)) <= self.position_tolerance),
        )
        result["correct"] = all(result[attribute] for attribute in ATTRIBUTES)
        result["measured"] = {
            "colour": colour,
            "colour_fraction": round(float(colour_counts.max() / area), 3),
            "area": area,
            "bbox_size": [width, height],
            "fill": round(fill, 3),
            "drop": round(drop, 3),
            "shape": shape,
            "centre": [float(centre[0]), float(centre[1])],
        }
        return result

    def check(self, image: Image.Image, caption: str) -> Dict:
        r"""
        Checks one image against its caption.

        Returns:
            `Dict`: `{"caption", "correct", "objects"}`; `objects` holds, per object of the caption, its `phrase`,
            whether an object was `found`, the booleans `colour`, `size`, `shape`, `position` and `correct`, and what
            was `measured` (`None` when nothing was found).

        Raises:
            `ValueError`: when the caption does not follow the data set's grammar.
        """
        objects = parse_caption(caption)
        labels, colours = self.segment(image)
        results = [self._check_object(obj, labels, colours) for obj in objects]
        return {"caption": caption, "correct": all(result["correct"] for result in results), "objects": results}

    def evaluate(
        self, images: Sequence[Image.Image], captions: Sequence[str], held_out: Optional[Sequence[bool]] = None
    ) -> Dict:
        r"""
        Scores images against their captions.

        Args:
            images (`Sequence[PIL.Image.Image]`), captions (`Sequence[str]`): One caption per image.
            held_out (`Sequence[bool]`, *optional*): Which prompts are held-out; by default those with a held-out
                colour-shape pair.

        Returns:
            `Dict`: `{"seen", "held_out", "all", "results"}`: per group, `num_prompts`, `num_objects`, the accuracy of
            each attribute over objects and the whole-prompt accuracy `prompt` (`None` for an empty group); `results`
            holds the `check` of every image, with its `held_out` flag.
        """
        if len(images) != len(captions):
            raise ValueError(f"Got {len(images)} images for {len(captions)} captions.")
        scenes = [parse_caption(caption) for caption in captions]  # fail before any work on a bad caption
        if held_out is None:
            held_out = [is_held_out(objects) for objects in scenes]
        elif len(held_out) != len(captions):
            raise ValueError(f"Got {len(held_out)} held-out flags for {len(captions)} captions.")

        results = [
            {**self.check(image, caption), "held_out": bool(flag)}
            for image, caption, flag in zip(images, captions, held_out)
        ]
        groups = {
            "seen": [result for result in results if not result["held_out"]],
            "held_out": [result for result in results if result["held_out"]],
            "all": results,
        }
        report = {name: _summarise(group) for name, group in groups.items()}
        report["results"] = results
        return report

    def evaluate_pipeline(
        self,
        pipe,
        prompts: Sequence[str],
        held_out: Optional[Sequence[bool]] = None,
        num_inference_steps: int = 8,
        batch_size: int = 16,
        seed: int = 0,
        **pipe_kwargs,
    ) -> Dict:
        r"""
        Generates one image per prompt with a text-to-image pipeline and scores it (see `evaluate`).

        Image `i` is generated with `torch.Generator().manual_seed(seed + i)`, so it does not depend on the batch
        size.

        Args:
            pipe: An [`ENATPipeline`] (or any callable with its signature) trained on the Shapes world.
            prompts (`Sequence[str]`): Captions in the data set's grammar.
            held_out (`Sequence[bool]`, *optional*): See `evaluate`.
            num_inference_steps (`int`, defaults to 8), batch_size (`int`, defaults to 16), seed (`int`, defaults to
                0): Decoding steps, prompts per pipeline call, and the seed of the first image.
            pipe_kwargs: Further arguments of the pipeline call, e.g. `guidance_scale` or `reuse_features`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        for prompt in prompts:  # fail before generating anything
            parse_caption(prompt)
        images = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            output = pipe(
                prompt=batch,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="pil",
                **pipe_kwargs,
            )
            images.extend(output.images)
        return self.evaluate(images, prompts, held_out)


def _summarise(results: List[Dict]) -> Dict:
    objects = [obj for result in results for obj in result["objects"]]
    summary = {"num_prompts": len(results), "num_objects": len(objects)}
    for attribute in ATTRIBUTES:
        summary[attribute] = sum(obj[attribute] for obj in objects) / len(objects) if objects else None
    summary["prompt"] = sum(result["correct"] for result in results) / len(results) if results else None
    # objects of two-object prompts found in the wrong colour, and how many of them have the other object's colour
    wrong = [
        (obj, other)
        for result in results
        if len(result["objects"]) == 2
        for obj, other in (result["objects"], result["objects"][::-1])
        if obj["found"] and not obj["colour"]
    ]
    summary["wrong_colour_objects_of_two"] = len(wrong)
    summary["wrong_colour_from_other_object"] = (
        sum(obj["measured"]["colour"] == parse_caption(other["phrase"])[0].colour for obj, other in wrong) / len(wrong)
        if wrong
        else None
    )
    # the share of objects drawn in their caption's shape, per named size and shape ("small square": ...)
    by_kind = {f"{size} {shape}": [] for size in SIZES for shape in SHAPES}
    for obj in objects:
        named = parse_caption(obj["phrase"])[0]
        by_kind[f"{named.size} {named.shape}"].append(obj["shape"])
    summary["shape_by_kind"] = {kind: sum(right) / len(right) for kind, right in by_kind.items() if right}
    return summary


def evaluation_prompts(num_prompts: int, seed: int = 0, held_out: bool = False) -> List[str]:
    r"""
    Distinct captions of validation-split scenes (`ShapesDataset(..., seed, "validation")`, in index order) that are
    held-out (with a held-out colour-shape pair) or seen, as asked.

    Raises:
        `ValueError`: when the validation split does not yield `num_prompts` distinct captions of the kind.
    """
    max_scenes = 1000 + 100 * num_prompts
    dataset = ShapesDataset(max_scenes, seed, "validation")
    prompts = {}  # an ordered set
    for index in range(max_scenes):
        if len(prompts) == num_prompts:
            break
        objects = dataset.scene(index)
        if is_held_out(objects) == held_out:
            prompts[caption_for(objects)] = None
    if len(prompts) < num_prompts:
        kind = "held-out" if held_out else "seen"
        raise ValueError(f"Found only {len(prompts)} distinct {kind} captions in {max_scenes} validation scenes.")
    return list(prompts)


def mcnemar_p_value(gained: int, lost: int) -> float:
    r"""
    Two-sided exact McNemar test: the probability, were both settings equally good, of a split of the
    `gained + lost` discordant prompts at least as uneven as the one observed (a sign test on them).
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"gained and lost must be >= 0, got {gained} and {lost}.")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare_reports(before: Dict, after: Dict) -> Dict:
    r"""
    Paired comparison of two ShapesEval reports (`ShapesEval.evaluate`, or the CLI's `--json` output) of the same
    prompts in the same order, e.g. two models or two sampling strategies on the same prompts and image seeds.

    Returns:
        `Dict`: for `"seen"`, `"held_out"` and `"all"`: `num_prompts`, `before` and `after` (prompts correct),
        `gained` (wrong before, correct after), `lost` (the reverse) and `p_value` (`mcnemar_p_value`).

    Raises:
        `ValueError`: when the reports do not hold the same captions in the same order.
    """
    pairs = []
    for name, report in (("before", before), ("after", after)):
        if not isinstance(report, dict) or "results" not in report:
            raise ValueError(f"The {name} report has no per-prompt 'results' (a ShapesEval report is needed).")
    if len(before["results"]) != len(after["results"]):
        raise ValueError(f"The reports hold {len(before['results'])} and {len(after['results'])} prompts.")
    for index, (a, b) in enumerate(zip(before["results"], after["results"])):
        missing = sorted({"caption", "held_out", "correct"} - (set(a) & set(b)))
        if missing:
            raise ValueError(f"Result {index} of a report lacks {', '.join(missing)} (not a ShapesEval report).")
        if a["caption"] != b["caption"]:
            raise ValueError(f"Prompt {index} differs between the reports: {a['caption']!r} vs {b['caption']!r}.")
        pairs.append((bool(a["held_out"]), bool(a["correct"]), bool(b["correct"])))
    comparison = {}
    for group, keep in (("seen", lambda h: not h), ("held_out", lambda h: h), ("all", lambda h: True)):
        chosen = [(x, y) for held_out, x, y in pairs if keep(held_out)]
        gained = sum(1 for x, y in chosen if y and not x)
        lost = sum(1 for x, y in chosen if x and not y)
        comparison[group] = {
            "num_prompts": len(chosen),
            "before": sum(x for x, _ in chosen),
            "after": sum(y for _, y in chosen),
            "gained": gained,
            "lost": lost,
            "p_value": mcnemar_p_value(gained, lost),
        }
    return comparison


def format_comparison(comparison: Dict) -> str:
    """A `compare_reports` result as a table: whole-prompt accuracy before and after, per group."""
    lines = [f"{'':10}{'prompts':>9}{'before':>9}{'after':>9}{'gained':>8}{'lost':>6}{'McNemar p':>11}"]
    for name, label in (("seen", "seen"), ("held_out", "held-out"), ("all", "all")):
        group = comparison[name]
        n = group["num_prompts"]
        if n == 0:
            lines.append(f"{label:10}{0:>9}{'-':>9}{'-':>9}{'-':>8}{'-':>6}{'-':>11}")
            continue
        lines.append(
            f"{label:10}{n:>9}{100 * group['before'] / n:>8.1f}%{100 * group['after'] / n:>8.1f}%"
            f"{group['gained']:>8}{group['lost']:>6}{group['p_value']:>11.3g}"
        )
    return "\n".join(lines)


def format_report(report: Dict) -> str:
    """The summary of a report as a table: one row per group, per-attribute and whole-prompt accuracies in %."""
    columns = ("prompts", "objects") + ATTRIBUTES + ("prompt",)
    lines = [f"{'':10}" + "".join(f"{column:>10}" for column in columns)]
    for name, label in (("seen", "seen"), ("held_out", "held-out"), ("all", "all")):
        group = report[name]
        cells = [f"{group['num_prompts']:>10}", f"{group['num_objects']:>10}"]
        for column in ATTRIBUTES + ("prompt",):
            value = group[column]
            cells.append(f"{'-':>10}" if value is None else f"{100 * value:>9.1f}%")
        lines.append(f"{label:10}" + "".join(cells))
    group = report["all"]
    if group.get("wrong_colour_objects_of_two"):
        lines.append(
            f"two-object prompts: {group['wrong_colour_objects_of_two']} objects found in the wrong colour, "
            f"{100 * group['wrong_colour_from_other_object']:.1f}% of them in the other object's colour"
        )
    if group.get("shape_by_kind"):
        shares = ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in group["shape_by_kind"].items())
        lines.append(f"shape right, by the caption's size and shape: {shares}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ CLI


def max_evaluation_prompts() -> int:
    """The largest `--num-prompts` of the validation prompts: the number of distinct held-out captions (fewer than
    the seen ones) that the caption grammar allows; `evaluation_prompts` finds them all."""
    sizes, held_out = len(SIZES), len(ALL_PAIRS) - len(SEEN_PAIRS)
    one_object = len(POSITIONS) * sizes * held_out
    # two objects: each layout in either order; at least one object of a held-out pair
    two_objects = 2 * len(TWO_OBJECT_LAYOUTS) * ((sizes * len(ALL_PAIRS)) ** 2 - (sizes * len(SEEN_PAIRS)) ** 2)
    return one_object + two_objects


def _read_imagefolder_split(split_dir: Path, limit: Optional[int]):
    metadata_path = split_dir / "metadata.jsonl"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} not found; --images-dir takes a split folder (shapes/validation).")
    images, captions, held_out = [], [], []
    with open(metadata_path, encoding="utf-8") as metadata:
        for number, line in enumerate(metadata, 1):
            if limit is not None and len(images) == limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{metadata_path} line {number} is not JSON ({error}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                raise ValueError(f"{metadata_path} line {number} has no file_name.")
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{metadata_path} line {number} has no text (the caption).")
            images.append(open_image(split_dir / record["file_name"], f"{metadata_path} line {number}:"))
            captions.append(record["text"])
            held_out.append(record.get("held_out", is_held_out(parse_caption(record["text"]))))
    return images, captions, held_out


def _evaluate_model(evaluator: ShapesEval, args, prompts: List[str], held_out: Optional[List[bool]]) -> Dict:
    device = resolve_device(args.device)
    pipe = load_pipeline(ENATPipeline, args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    print(f"generating {len(prompts)} images on {device} ...", file=sys.stderr)
    pipe_kwargs = {"reuse_features": False if args.no_reuse else None}  # None: reuse where the model has it
    if args.guidance_scale is not None:
        pipe_kwargs["guidance_scale"] = args.guidance_scale
    return evaluator.evaluate_pipeline(
        pipe, prompts, held_out, args.steps, batch_size=args.batch_size, seed=args.seed, **pipe_kwargs
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="ENATPipeline folder or Hub repo id of a text-to-image Shapes model")
    source.add_argument("--images-dir", type=Path, help="imagefolder split (metadata.jsonl and images) to score")
    source.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="two JSON reports of the same prompts (--json output): prompt-by-prompt comparison, exact McNemar test",
    )
    parser.add_argument("--prompts", type=Path, help="file of captions, one per line (default: validation prompts)")
    parser.add_argument(
        "--num-prompts",
        type=positive_int,
        default=None,
        help=f"validation prompts per group, seen and held-out (default 100, at most {max_evaluation_prompts()}); "
        "with --prompts or --images-dir, use at most this many (default all)",
    )
    parser.add_argument("--steps", type=positive_int, default=8, help="decoding steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation prompts; image i uses seed + i")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per pipeline call")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's setting")
    parser.add_argument("--no-reuse", action="store_true", help="disable ENAT's feature reuse (reuse_features=False)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (the full report; with --compare the comparison) instead of a table",
    )
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    uses_validation_prompts = args.model is not None and args.prompts is None
    if uses_validation_prompts and args.num_prompts is not None and args.num_prompts > max_evaluation_prompts():
        parser.error(
            f"--num-prompts {args.num_prompts}: the validation split has {max_evaluation_prompts()} distinct "
            "held-out captions at most (pass at most that, or --prompts FILE)"
        )
    with report_errors(args.debug):
        _run(args)


def _run(args):
    evaluator = ShapesEval()
    if args.compare is not None:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        comparison = compare_reports(before, after)
        if args.json:
            print(json.dumps(comparison, indent=2))
        else:
            print(f"ShapesEval whole-prompt accuracy, {args.compare[0]} -> {args.compare[1]}")
            print(format_comparison(comparison))
        return
    if args.images_dir is not None:
        images, captions, held_out = _read_imagefolder_split(args.images_dir, args.num_prompts)
        report = evaluator.evaluate(images, captions, held_out)
        title = f"ShapesEval of {len(images)} images in {args.images_dir}"
    else:
        if args.prompts is not None:
            prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
            prompts = prompts[: args.num_prompts]
            held_out = None
        else:
            num_prompts = 100 if args.num_prompts is None else args.num_prompts
            seen = evaluation_prompts(num_prompts, args.seed, held_out=False)
            unseen = evaluation_prompts(num_prompts, args.seed, held_out=True)
            prompts, held_out = seen + unseen, [False] * len(seen) + [True] * len(unseen)
        if not prompts:
            raise ValueError(f"{args.prompts} holds no prompts.")
        for prompt in prompts:  # before loading the model
            parse_caption(prompt)
        report = _evaluate_model(evaluator, args, prompts, held_out)
        title = f"ShapesEval of {args.model}: {len(prompts)} prompts, {args.steps} steps, seed {args.seed}"

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(title)
        print(format_report(report))


if __name__ == "__main__":
    main()
