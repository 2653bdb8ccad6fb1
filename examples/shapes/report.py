"""Measure the Shapes pipeline for its model card: ShapesEval at 4 / 8 / 12 steps with reuse on and off, and the loss
curves of the three training stages.

    python examples/shapes/report.py --model pretrained/enat-shapes --train-dir outputs/train-demo \
        --output-dir pretrained/enat-shapes/report

Writes `eval.json` (every ShapesEval report), `eval.md` (the tables) and `loss_curves.png` into --output-dir.
"""

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import torch

from enat_diffusers import ENATPipeline
from enat_diffusers.evaluation.shapes import ShapesEval, evaluation_prompts
from enat_diffusers.utils.cli import OutputFolder, load_pipeline, run_parser


OUTPUT_NAMES = ("eval.json", "eval.md", "loss_curves.png")


def tensorboard_scalars(folder: Path, tag: str):
    """(steps, values) of one scalar over every TensorBoard event file below `folder` (resumed runs included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for path in sorted(glob.glob(str(folder / "**" / "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points.update({event.step: event.value for event in events.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_losses(train_dir: Path, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [
        ("VQ model", train_dir / "vqgan", "loss"),
        ("CLIP text encoder", train_dir / "clip", "loss"),
        ("ENAT transformer", train_dir / "enat-shapes", "train/loss"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for axis, (title, folder, tag) in zip(axes, stages):
        steps, values = tensorboard_scalars(folder, tag)
        if steps:
            window = max(1, len(values) // 50)
            smooth = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            axis.plot(steps, values, alpha=0.3, linewidth=0.8)
            axis.plot(steps, smooth, linewidth=1.6)
        axis.set_title(title)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(tag)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-dir", help="the `make train-demo` folder, for the loss curves")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-prompts", type=int, default=500, help="seen prompts (and as many held-out ones)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run")
    run_parser(parser, _run, argv)


def _run(args):
    with OutputFolder(args.output_dir, OUTPUT_NAMES, [args.model, args.train_dir], args.overwrite) as output:
        _measure(args, output)
    print(
        f"wrote {output.folder}/eval.json, eval.md" + (", loss_curves.png" if args.train_dir else ""), file=sys.stderr
    )


def _measure(args, output: OutputFolder):
    if args.train_dir:
        plot_losses(Path(args.train_dir), output.path("loss_curves.png"))

    pipe = load_pipeline(ENATPipeline, args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ShapesEval()
    seen = evaluation_prompts(args.num_prompts, seed=0, held_out=False)
    held_out = evaluation_prompts(args.num_prompts, seed=0, held_out=True)
    prompts, flags = seen + held_out, [False] * len(seen) + [True] * len(held_out)
    results, lines = {}, []
    lines.append(
        "| steps | reuse | seen prompts | held-out prompts | seen colour / size / shape / position | s per image |"
    )
    lines.append("|---|---|---|---|---|---|")
    for steps in args.steps:
        for reuse in (True, False):
            start = time.perf_counter()
            with torch.inference_mode():
                report = evaluator.evaluate_pipeline(
                    pipe,
                    prompts,
                    held_out=flags,
                    num_inference_steps=steps,
                    batch_size=args.batch_size,
                    reuse_features=reuse,
                )
            seconds = (time.perf_counter() - start) / len(prompts)
            report.pop("results", None)
            report["seconds_per_image"] = seconds
            results[f"steps={steps},reuse={reuse}"] = report
            s, h = report["seen"], report["held_out"]
            attributes = " / ".join(f"{100 * s[a]:.1f}" for a in ("colour", "size", "shape", "position"))
            lines.append(
                f"| {steps} | {'on' if reuse else 'off'} | {100 * s['prompt']:.1f} % ({s['num_prompts']}) | "
                f"{100 * h['prompt']:.1f} % ({h['num_prompts']}) | {attributes} | {seconds:.3f} |"
            )
            print(lines[-1], flush=True)
    output.path("eval.json").write_text(json.dumps(results, indent=2) + "\n")
    output.path("eval.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
