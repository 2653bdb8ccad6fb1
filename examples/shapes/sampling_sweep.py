"""Choose the sampling defaults of a Shapes pipeline by ShapesEval: a grid over the guidance scale and the two
temperatures of `MaskedTokenScheduler`, at a fixed number of steps.

    python examples/shapes/sampling_sweep.py --model outputs/train-demo/enat-shapes --json sweep.json --write-best

The prompts are seen validation prompts drawn with another seed than the ones ShapesEval reports on by default
(`--prompt-seed 1` against 0), so the reported accuracy is not measured on the prompts the settings were chosen on.
The best setting is the one with the highest whole-prompt accuracy (ties: the lower guidance, then the lower
temperatures). `--write-best` stores it as the defaults of the folder's scheduler (`scheduler/scheduler_config.json`,
the only file changed).
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

from enat_diffusers import ENATPipeline
from enat_diffusers.evaluation.shapes import ShapesEval, evaluation_prompts
from enat_diffusers.utils.cli import (
    check_output_file,
    load_pipeline,
    run_parser,
    write_json_atomically,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image Shapes pipeline folder")
    parser.add_argument("--num-prompts", type=int, default=100, help="seen prompts per setting")
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--sampling-temperatures", type=float, nargs="+", default=[0.5])
    parser.add_argument("--mask-temperatures", type=float, nargs="+", default=[1.5, 4.5, 9.0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", help="write every setting's scores to this file")
    parser.add_argument("--write-best", action="store_true", help="store the best setting in the folder's scheduler")
    run_parser(parser, _run, argv)


def _run(args):
    if args.json:  # replaced if it exists (the Makefile writes a temporary name)
        check_output_file(args.json, [args.model], "--json", overwrite=True)
    pipe = load_pipeline(ENATPipeline, args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ShapesEval()
    prompts = evaluation_prompts(args.num_prompts, seed=args.prompt_seed, held_out=False)
    rows = []
    grid = itertools.product(args.guidance_scales, args.sampling_temperatures, args.mask_temperatures)
    for guidance_scale, sampling_temperature, mask_temperature in grid:
        settings = {
            "guidance_scale": guidance_scale,
            "sampling_temperature": sampling_temperature,
            "mask_temperature": mask_temperature,
        }
        with torch.inference_mode():
            report = evaluator.evaluate_pipeline(
                pipe, prompts, num_inference_steps=args.steps, batch_size=args.batch_size, **settings
            )
        rows.append({**settings, "prompt_accuracy": report["seen"]["prompt"]})
        print(
            f"guidance {guidance_scale:g}  sampling temperature {sampling_temperature:g}  mask temperature "
            f"{mask_temperature:g}: {100 * rows[-1]['prompt_accuracy']:.1f} %",
            flush=True,
        )
    best = max(
        rows,
        key=lambda r: (r["prompt_accuracy"], -r["guidance_scale"], -r["sampling_temperature"], -r["mask_temperature"]),
    )
    print(f"best: {best}")
    if args.json:
        write_json_atomically(args.json, {"steps": args.steps, "rows": rows, "best": best})
    if args.write_best:
        settings = {key: best[key] for key in ("guidance_scale", "sampling_temperature", "mask_temperature")}
        pipe.scheduler.register_to_config(**settings)
        pipe.scheduler.save_pretrained(Path(args.model) / "scheduler")
        print(f"wrote the best setting into {args.model}/scheduler/scheduler_config.json", file=sys.stderr)


if __name__ == "__main__":
    main()
