"""The Shapes data set follows SHAPES_SPEC.md, and ShapesEval accepts its images and rejects wrong captions."""

import dataclasses
import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_text_pipeline
from PIL import Image, ImageFilter

from enat_diffusers.data import shapes
from enat_diffusers.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption_for,
    is_held_out,
    parse_caption,
    render_scene,
    write_imagefolder,
)
from enat_diffusers.evaluation import ShapesEval, evaluation_prompts
from enat_diffusers.evaluation import shapes as shapes_eval


SPEC_COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (38, 110, 210),
    "yellow": (240, 190, 30),
    "purple": (140, 70, 180),
}
SPEC_POSITIONS = {
    "centre": ((32, 32), "in the centre"),
    "left": ((16, 32), "on the left"),
    "right": ((48, 32), "on the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
}
PHRASE = r"a (small|large) (red|green|blue|yellow|purple) (circle|square|triangle) " + (
    r"(in the centre|on the left|on the right|at the top|at the bottom)"
)
CAPTION = re.compile(rf"{PHRASE}( and {PHRASE})?")
ROTATED = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}


@pytest.fixture(scope="module")
def validation():
    """600 validation samples (seen and held-out) with their scenes."""
    dataset = ShapesDataset(600, seed=1, split="validation")
    return [dataset[i] for i in range(len(dataset))], [dataset.scene(i) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def evaluator():
    return ShapesEval()


def object_pixels(image: np.ndarray, scene, obj) -> np.ndarray:
    """The mask of one object of a rendered scene: its colour, on its half of the image in two-object scenes."""
    mask = (image == obj.rgb).all(-1)
    if len(scene) == 2:
        half = np.zeros_like(mask)
        region = {"left": np.s_[:, :32], "right": np.s_[:, 32:], "top": np.s_[:32], "bottom": np.s_[32:]}
        half[region[obj.position]] = True
        mask &= half
    return mask


def test_constants_follow_the_spec():
    assert BACKGROUND == (236, 236, 236)
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == {"small": 14, "large": 24}
    assert COLOURS == SPEC_COLOURS
    assert POSITIONS == SPEC_POSITIONS
    assert set(HELD_OUT_PAIRS) == {("purple", "triangle"), ("green", "square")}


def test_images_have_exact_colours_extents_and_centres(validation):
    samples, scenes = validation
    jitters = set()
    for sample, scene in zip(samples[:300], scenes[:300]):
        image = np.asarray(sample["image"])
        assert sample["image"].mode == "RGB" and image.shape == (64, 64, 3)
        colours = {tuple(colour) for colour in image.reshape(-1, 3).tolist()}
        assert colours == {BACKGROUND} | {obj.rgb for obj in scene}  # flat colours only, no anti-aliasing
        assert sum(object_pixels(image, scene, obj).sum() for obj in scene) == (image != BACKGROUND).any(-1).sum()
        for obj in scene:
            ys, xs = np.nonzero(object_pixels(image, scene, obj))
            extent = SIZES[obj.size]
            assert xs.max() - xs.min() + 1 == extent and ys.max() - ys.min() + 1 == extent
            centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)  # bounding-box centre
            assert centre == obj.centre
            (x, y), _ = SPEC_POSITIONS[obj.position]
            assert abs(obj.centre[0] - x) <= 3 and abs(obj.centre[1] - y) <= 3
            jitters.add((obj.centre[0] - x, obj.centre[1] - y))
            fill = len(xs) / extent**2
            expected_fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape]
            assert abs(fill - expected_fill) < 0.08, (obj, fill)
            if obj.shape == "triangle":  # apex up, base = extent
                assert (ys == ys.max()).sum() == extent and (ys == ys.min()).sum() <= 2
    assert jitters == {(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4)}


def test_captions_follow_the_grammar(validation):
    samples, scenes = validation
    layouts, one_object_positions, orders = set(), set(), set()
    for sample, scene in zip(samples, scenes):
        assert CAPTION.fullmatch(sample["text"]), sample["text"]
        assert sample["text"] == caption_for(scene)
        assert [dataclasses.replace(obj, centre=obj.nominal_centre) for obj in scene] == parse_caption(sample["text"])
        positions = tuple(obj.position for obj in scene)
        if len(scene) == 1:
            one_object_positions.add(positions[0])
        else:
            layouts.add(frozenset(positions))
            orders.add(positions)
    assert one_object_positions == set(SPEC_POSITIONS)
    assert layouts == {frozenset({"left", "right"}), frozenset({"top", "bottom"})}
    assert orders == {("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")}
    num_single = sum(len(scene) == 1 for scene in scenes)
    assert 0.4 < num_single / len(scenes) < 0.6


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle on the left",
        "a small red circle on the left.",
        "A small red circle on the left",
        "a small red circle to the left",
        "a tiny red circle on the left",
        "a small red circle on the left and a small blue square at the top",
        "a small red circle on the left and a small blue square on the left",
        "a small red circle at the top and a small blue square at the bottom and a large red circle in the centre",
    ],
)
def test_parse_caption_rejects_captions_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="expected"):
        parse_caption(caption)


def test_held_out_pairs_only_in_validation():
    train = ShapesDataset(3000, seed=0, split="train")
    for index in range(len(train)):
        assert not any((obj.colour, obj.shape) in HELD_OUT_PAIRS for obj in train.scene(index))
    assert not any(train[index]["held_out"] for index in range(20))

    validation = ShapesDataset(500, seed=0, split="validation")
    scenes = [validation.scene(index) for index in range(len(validation))]
    pairs = {(obj.colour, obj.shape) for scene in scenes for obj in scene}
    assert set(HELD_OUT_PAIRS) <= pairs and len(pairs) == 15
    num_held_out = sum(is_held_out(scene) for scene in scenes)
    assert 0.35 < num_held_out / len(scenes) < 0.65
    for index in range(20):
        assert validation[index]["held_out"] == is_held_out(scenes[index])


def test_deterministic_from_seed():
    dataset = ShapesDataset(50, seed=3, split="train")
    later = dataset[40]
    first = [dataset[i] for i in range(50)]
    again = ShapesDataset(50, seed=3, split="train")
    assert [s["text"] for s in first] == [again[i]["text"] for i in range(50)]
    assert all(np.array_equal(np.asarray(s["image"]), np.asarray(again[i]["image"])) for i, s in enumerate(first))
    assert later["text"] == first[40]["text"]  # independent of the access order
    scenes = [dataset.scene(i) for i in range(50)]
    assert scenes != [ShapesDataset(50, seed=4, split="train").scene(i) for i in range(50)]
    assert scenes != [ShapesDataset(50, seed=3, split="validation").scene(i) for i in range(50)]
    with pytest.raises(IndexError):
        dataset[50]


def test_write_imagefolder_layout(tmp_path, capsys):
    output_dir = tmp_path / "shapes"
    shapes.main(["--output-dir", str(output_dir), "--num-train", "12", "--num-val", "8", "--seed", "5"])
    assert "wrote 12 images" in capsys.readouterr().out
    for split, count in (("train", 12), ("validation", 8)):
        records = [json.loads(line) for line in (output_dir / split / "metadata.jsonl").read_text().splitlines()]
        assert len(records) == count == len(list((output_dir / split).glob("*.png")))
        dataset = ShapesDataset(count, seed=5, split=split)
        for index, record in enumerate(records):
            assert set(record) == {"file_name", "text", "held_out"}
            assert record["text"] == dataset[index]["text"] and record["held_out"] == dataset[index]["held_out"]
            with Image.open(output_dir / split / record["file_name"]) as image:
                assert image.mode == "RGB" and image.size == (64, 64)
                assert np.array_equal(np.asarray(image), np.asarray(dataset[index]["image"]))


def test_write_imagefolder_refuses_a_non_empty_folder(tmp_path):
    output_dir = tmp_path / "shapes"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_imagefolder(output_dir, 2, 2, seed=0)
    assert not (output_dir / "train").exists()
    with pytest.raises(SystemExit, match="error: .* is not empty"):
        shapes.main(["--output-dir", str(output_dir), "--num-train", "2", "--num-val", "2"])
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="error: --output-dir .*pipeline is a pipeline folder"):
        shapes.main(["--output-dir", str(tmp_path / "pipeline"), "--num-train", "2", "--num-val", "2", "--overwrite"])

    summary = write_imagefolder(output_dir, 3, 2, seed=0, overwrite=True)
    assert summary["train"]["num_images"] == 3 and summary["validation"]["num_images"] == 2
    assert (output_dir / "notes.txt").read_text() == "mine"
    with pytest.warns(UserWarning, match="did not write"):  # a smaller rewrite leaves 000002.png behind
        write_imagefolder(output_dir, 2, 2, seed=0, overwrite=True)
    assert (output_dir / "train" / "000002.png").exists()


def test_shapes_eval_accepts_real_images(validation, evaluator):
    samples, _ = validation
    report = evaluator.evaluate([s["image"] for s in samples], [s["text"] for s in samples])
    assert report["seen"]["num_prompts"] > 250 and report["held_out"]["num_prompts"] > 250
    for group in ("seen", "held_out"):
        for metric in ("colour", "size", "shape", "position", "prompt"):
            assert report[group][metric] >= 0.99, (group, metric, report[group])
    json.dumps(report)  # JSON-serialisable


def test_shapes_eval_accepts_blurred_and_noisy_images(validation, evaluator):
    samples, _ = validation
    rng = np.random.default_rng(0)
    images = []
    for sample in samples[:150]:
        images.append(sample["image"].filter(ImageFilter.GaussianBlur(1.2)))
        noisy = np.asarray(sample["image"], dtype=np.float32) + rng.normal(0, 12, (64, 64, 3))
        images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    captions = [sample["text"] for sample in samples[:150] for _ in range(2)]
    assert evaluator.evaluate(images, captions)["all"]["prompt"] >= 0.99


def mutate(scene, kind, rng):
    """A wrong caption for a scene: one object with another colour, shape or size, or the objects moved."""
    scene = list(scene)
    index = rng.randrange(len(scene))
    obj = scene[index]
    if kind == "position":
        if len(scene) == 1:
            scene[0] = dataclasses.replace(obj, position=rng.choice([p for p in POSITIONS if p != obj.position]))
        else:  # left and right become top and bottom, or the reverse
            scene = [dataclasses.replace(o, position=ROTATED[o.position]) for o in scene]
        return caption_for(scene), None
    choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[kind]
    value = rng.choice([value for value in choices if value != getattr(obj, kind)])
    scene[index] = dataclasses.replace(obj, **{kind: value})
    return caption_for(scene), index


@pytest.mark.parametrize("kind", ["colour", "shape", "size", "position"])
def test_shapes_eval_rejects_wrong_captions(validation, evaluator, kind):
    samples, scenes = validation
    rng = random.Random(kind)
    num_accepted = 0
    for sample, scene in zip(samples[:500], scenes[:500]):
        caption, index = mutate(scene, kind, rng)
        result = evaluator.check(sample["image"], caption)
        num_accepted += result["correct"]
        if index is not None:  # the mutated attribute is the one that fails, the others hold
            assert not result["objects"][index][kind]
            others = [other for other in ("colour", "shape", "size", "position") if other != kind]
            assert all(result["objects"][index][other] for other in others)
    assert num_accepted / 500 <= 0.05


def test_shapes_eval_finds_nothing_on_a_blank_image(evaluator):
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    result = evaluator.check(blank, "a small red circle on the left")
    assert not result["correct"] and not result["objects"][0]["found"] and result["objects"][0]["measured"] is None


class FakePipeline:
    """Returns data-set renderings of the prompts' nominal scenes and records how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, num_inference_steps, generator, output_type, **kwargs):
        self.calls.append(
            dict(prompt=prompt, steps=num_inference_steps, seeds=[g.initial_seed() for g in generator], **kwargs)
        )
        assert output_type == "pil"
        return SimpleNamespace(images=[render_scene(parse_caption(p)) for p in prompt])


def test_evaluate_pipeline_batches_and_seeds(evaluator):
    prompts = evaluation_prompts(3, seed=0, held_out=False) + evaluation_prompts(2, seed=0, held_out=True)
    pipe = FakePipeline()
    report = evaluator.evaluate_pipeline(
        pipe, prompts, num_inference_steps=4, batch_size=2, seed=10, reuse_features=False
    )
    assert [call["prompt"] for call in pipe.calls] == [prompts[0:2], prompts[2:4], prompts[4:5]]
    assert [call["seeds"] for call in pipe.calls] == [[10, 11], [12, 13], [14]]
    assert all(call["steps"] == 4 and call["reuse_features"] is False for call in pipe.calls)
    assert report["seen"]["num_prompts"] == 3 and report["held_out"]["num_prompts"] == 2
    assert report["all"]["prompt"] == 1.0
    with pytest.raises(ValueError, match="expected"):
        evaluator.evaluate_pipeline(FakePipeline(), ["a red circle"])


def test_evaluation_prompts():
    seen, held_out = evaluation_prompts(40, seed=2), evaluation_prompts(40, seed=2, held_out=True)
    assert len(set(seen)) == 40 and len(set(held_out)) == 40
    assert not any(is_held_out(parse_caption(prompt)) for prompt in seen)
    assert all(is_held_out(parse_caption(prompt)) for prompt in held_out)
    assert seen == evaluation_prompts(40, seed=2) and seen != evaluation_prompts(40, seed=3)


def test_evaluation_cli_scores_an_imagefolder_split(tmp_path, capsys):
    write_imagefolder(tmp_path, 0, 30, seed=0)
    shapes_eval.main(["--images-dir", str(tmp_path / "validation"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["all"]["num_prompts"] == 30 and report["all"]["prompt"] == 1.0
    shapes_eval.main(["--images-dir", str(tmp_path / "validation"), "--num-prompts", "10"])
    table = capsys.readouterr().out
    assert "held-out" in table and "100.0%" in table


def test_evaluation_cli_runs_a_pipeline_folder(tmp_path, capsys):
    """The --model plumbing, on a tiny random-weight text-to-image pipeline (its images are noise)."""
    tiny_text_pipeline().save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left\n\na large purple triangle at the top\n")
    argv = ["--model", str(tmp_path / "pipe"), "--prompts", str(prompts), "--steps", "2", "--no-reuse", "--json"]
    shapes_eval.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert report["seen"]["num_prompts"] == 1 and report["held_out"]["num_prompts"] == 1
    captions = [result["caption"] for result in report["results"]]
    assert captions == ["a small red circle on the left", "a large purple triangle at the top"]


def test_mcnemar_p_value():
    assert shapes_eval.mcnemar_p_value(10, 0) == pytest.approx(2 / 2**10)
    assert shapes_eval.mcnemar_p_value(0, 10) == shapes_eval.mcnemar_p_value(10, 0)
    assert shapes_eval.mcnemar_p_value(10, 3) == pytest.approx(2 * (1 + 13 + 78 + 286) / 2**13)
    assert shapes_eval.mcnemar_p_value(5, 5) == 1.0 and shapes_eval.mcnemar_p_value(0, 0) == 1.0
    with pytest.raises(ValueError, match="gained and lost"):
        shapes_eval.mcnemar_p_value(-1, 2)


def paired_reports(evaluator):
    """Two reports of the same 12 seen + 4 held-out prompts: after gains 10 seen prompts and loses 3 held-out."""
    seen, held_out = evaluation_prompts(12, seed=0), evaluation_prompts(4, seed=0, held_out=True)
    prompts = seen + held_out
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    drawn = [render_scene(parse_caption(prompt)) for prompt in prompts]
    before_correct = set(range(2)) | set(range(12, 16))
    after_correct = set(range(12)) | {12}
    before = evaluator.evaluate([drawn[i] if i in before_correct else blank for i in range(16)], prompts)
    after = evaluator.evaluate([drawn[i] if i in after_correct else blank for i in range(16)], prompts)
    return before, after


def test_compare_reports_counts_gains_and_losses(evaluator):
    before, after = paired_reports(evaluator)
    comparison = shapes_eval.compare_reports(before, after)
    assert comparison["seen"] == {
        "num_prompts": 12, "before": 2, "after": 12, "gained": 10, "lost": 0, "p_value": pytest.approx(2 / 2**10)
    }  # fmt: skip
    assert comparison["held_out"] == {
        "num_prompts": 4, "before": 4, "after": 1, "gained": 0, "lost": 3, "p_value": pytest.approx(0.25)
    }  # fmt: skip
    assert (comparison["all"]["gained"], comparison["all"]["lost"]) == (10, 3)
    reverse = shapes_eval.compare_reports(after, before)
    assert (reverse["seen"]["gained"], reverse["seen"]["lost"]) == (0, 10)

    shuffled = {**after, "results": after["results"][::-1]}
    with pytest.raises(ValueError, match="Prompt 0 differs"):
        shapes_eval.compare_reports(before, shuffled)
    with pytest.raises(ValueError, match="15 prompts"):
        shapes_eval.compare_reports(before, {**after, "results": after["results"][:15]})
    with pytest.raises(ValueError, match="no per-prompt 'results'"):
        shapes_eval.compare_reports(before, after["seen"])
    broken = {**after, "results": [{"caption": r["caption"]} for r in after["results"]]}
    with pytest.raises(ValueError, match="lacks correct, held_out"):
        shapes_eval.compare_reports(before, broken)


def test_evaluation_cli_compares_two_reports(tmp_path, capsys, evaluator):
    before, after = paired_reports(evaluator)
    paths = [tmp_path / "before.json", tmp_path / "after.json"]
    for path, report in zip(paths, (before, after)):
        path.write_text(json.dumps(report))
    shapes_eval.main(["--compare", *map(str, paths)])
    table = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"seen\s+12\s+16\.7%\s+100\.0%\s+10\s+0\s+0\.00195", table[2])
    assert re.fullmatch(r"held-out\s+4\s+100\.0%\s+25\.0%\s+0\s+3\s+0\.25", table[3])
    shapes_eval.main(["--compare", *map(str, paths), "--json"])
    assert json.loads(capsys.readouterr().out)["all"]["gained"] == 10
    paths[1].write_text("{not json")
    with pytest.raises(SystemExit, match="error: Expecting property name"):
        shapes_eval.main(["--compare", *map(str, paths)])


@pytest.mark.parametrize("count", ["-1", "0", "1000000"])
def test_evaluation_cli_refuses_impossible_prompt_counts_at_once(tmp_path, capsys, count):
    with pytest.raises(SystemExit) as exit:
        shapes_eval.main(["--model", str(tmp_path / "no-model"), "--num-prompts", count])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and "--num-prompts" in error
    assert ("916 distinct held-out captions at most" if count == "1000000" else "must be a positive integer") in error


def test_evaluation_cli_reads_imagefolder_lines_clearly(tmp_path):
    write_imagefolder(tmp_path, 0, 3, seed=0)
    metadata = tmp_path / "validation" / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    metadata.write_text("\n".join([lines[0], json.dumps({"text": json.loads(lines[1])["text"]}), lines[2]]) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*metadata.jsonl line 2 has no file_name\.$"):
        shapes_eval.main(["--images-dir", str(tmp_path / "validation")])


def test_colour_copied_from_the_other_object_is_counted(evaluator):
    def scene(left_colour, right_colour):
        return shapes.render_scene(
            [
                shapes.ShapeObject("square", "large", left_colour, "left", (16, 32)),
                shapes.ShapeObject("circle", "large", right_colour, "right", (48, 32)),
            ]
        )

    caption = "a large red square on the left and a large blue circle on the right"
    images = [scene("red", "blue"), scene("red", "red"), scene("red", "green"), scene("blue", "blue")]
    report = evaluator.evaluate(images, [caption] * 4)["all"]
    # wrong colours: the right circle of image 1 (the left object's red), of image 2 (green, neither object's) and
    # the left square of image 3 (the right object's blue)
    assert report["wrong_colour_objects_of_two"] == 3
    assert report["wrong_colour_from_other_object"] == pytest.approx(2 / 3)
    one_object = evaluator.evaluate([scene("red", "blue")], ["a large red square on the left"])["all"]
    assert one_object["wrong_colour_objects_of_two"] == 0 and one_object["wrong_colour_from_other_object"] is None
    from enat_diffusers.evaluation.shapes import format_report

    table = format_report({"seen": report, "held_out": report, "all": report})
    assert table.splitlines()[-2] == (
        "two-object prompts: 3 objects found in the wrong colour, 66.7% of them in the other object's colour"
    )


def test_shape_accuracy_is_reported_per_named_size_and_shape(evaluator):
    def scene(*objects):
        return shapes.render_scene([shapes.ShapeObject(*obj) for obj in objects])

    small_square = ("square", "small", "red", "left", (16, 32))
    drawn_as_circle = ("circle", "small", "red", "left", (16, 32))
    large_circle = ("circle", "large", "blue", "right", (48, 32))
    caption = "a small red square on the left and a large blue circle on the right"
    images = [scene(small_square, large_circle), scene(drawn_as_circle, large_circle), scene(drawn_as_circle)]
    report = evaluator.evaluate(images, [caption] * 3)["all"]
    # small squares: right in image 0 only; large circles: right in images 0 and 1, missing in image 2
    assert report["shape_by_kind"] == {"small square": pytest.approx(1 / 3), "large circle": pytest.approx(2 / 3)}
    from enat_diffusers.evaluation.shapes import format_report

    table = format_report({"seen": report, "held_out": report, "all": report})
    assert (
        table.splitlines()[-1]
        == "shape right, by the caption's size and shape: small square 33.3%, large circle 66.7%"
    )
