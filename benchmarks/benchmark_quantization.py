"""float32, bfloat16 and each quantized form of ENAT sampling, side by side on the CPU this runs on, and which to use.

    python benchmarks/benchmark_quantization.py --model enat-l-256 --batch-size 4 --steps 8 --original-repo DIR

Random weights with the released ENAT-L checkpoint's shapes (`benchmark_sampling.py`'s), saved once as a float32
diffusers folder and loaded in every form of `quantization_forms.py` through `from_pretrained` (torchao forms:
diffusers' `TorchAoConfig`, quantized on load). With `--original-repo`, a checkout of the authors' code
(LeapLabTHU/ENAT), their own `DiT` and `NATSchedule.generate` sample in float32, their default (`authors_enat.py`;
the gate of `benchmark_sampling.py` runs first: the authors' code, the re-statement and ours must reproduce the
recorded original ids).

Every form gets its own probe: one `nn.Linear` in that form on square inputs (256 to 2048, while a call takes under
a second), the best throughput taken as the form's peak on this CPU; utilisation is the form's model FLOP/s (the
analytic count of `model_flops.py`, the same for every form) over its own probe. A form whose probe runs more than
`--max-slowdown` times below float32's is not timed (on CPUs without native kernels a generation would take hours):
the table says so, with its probe. Every other form is warmed up with a one-step generation, then the forms are timed
in turn within every repeat (interleaved), under `torch.inference_mode()`, to token ids (`output_type="latent"`);
the final token ids of a form's first timed run (seed 0) are compared with float32's: the token agreement.

Which form to use: the fastest timed form whose quality is bounded, i.e. whose recorded ShapesEval result (the
shipped Shapes model, 500 seen prompts, same seeds, `quantization_quality.py`, kept in `--quality`) is at most 1 point
below float32's and not significantly different from it (paired McNemar p > 0.05; a gain counts as no loss). float32
is always eligible. The quality of a form is a property of its numerics, the same on every CPU; its speed is this
CPU's, measured here.

`--json PATH` writes every number unrounded.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from authors_enat import AuthorsENAT, import_authors_code  # noqa: E402
from benchmark_sampling import (  # noqa: E402
    MODELS,
    SEED,
    correctness_gate,
    make_pipeline,
    original_state_dict,
    seed_original_rngs,
    timed,
)
from model_flops import generation_flops  # noqa: E402
from quantization_forms import (  # noqa: E402
    FORMS,
    FormRefused,
    cpu_description,
    describe_cpu,
    load_transformer,
    quantized_linear,
)

from enat_diffusers.conversion import build_transformer  # noqa: E402


AUTHORS = "authors' code, float32"
DEFAULT_FORMS = ["float32", "bfloat16", "int8-dynamic", "int8-dynamic-fbgemm", "int8-weight-only", "float8-dynamic",
                 "float8-weight-only"]  # fmt: skip
QUALITY = Path(__file__).resolve().parent / "quantization_quality_shapes.json"
PROBE_SIZES = (256, 512, 1024, 2048)


def probe_tflops(form, max_call_seconds: float = 1.0, repeats: int = 3) -> float:
    """The form's throughput on a square `nn.Linear` (n rows, n x n weight): the best over growing n."""
    generator = torch.Generator().manual_seed(SEED)
    best = 0.0
    for size in PROBE_SIZES:
        linear = quantized_linear(form, size, size, generator)
        x = torch.randn(size, size, generator=generator).to(form.dtype)
        with torch.inference_mode():
            first = timed(lambda: linear(x), torch.device("cpu"))  # warm-up
            seconds = min([first] + [timed(lambda: linear(x), torch.device("cpu")) for _ in range(repeats)])
        best = max(best, 2 * size**3 / seconds / 1e12)
        if first > max_call_seconds:
            break
    return best


def quality_bounds(path: Path) -> dict:
    """{form: its recorded Shapes quality row} from `quantization_quality.py --json` (empty when absent)."""
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text())["rows"]


def within_bound(row: dict) -> bool:
    """ShapesEval (seen prompts) at most 1 point below float32's, and no significant change (McNemar p > 0.05)."""
    if row is None or "accuracy" not in row:
        return False
    return row["accuracy"] - row["accuracy_float32"] >= -0.01 and row["p_value"] > 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="enat-l-256", help="tiny: a smoke test")
    parser.add_argument("--batch-size", type=int, default=4, help="images per generation")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=DEFAULT_FORMS)
    parser.add_argument(
        "--max-slowdown",
        type=float,
        default=4.0,
        help="do not time a form whose probe is more than this many times slower than float32's",
    )
    parser.add_argument("--probe-rounds", type=int, default=3, help="interleaved rounds of the per-form probes")
    parser.add_argument("--original-repo", type=Path, help="a checkout of LeapLabTHU/ENAT: time the authors' code")
    parser.add_argument("--quality", type=Path, default=QUALITY, help="quality rows of quantization_quality.py")
    parser.add_argument("--json", type=Path, help="also write every number, unrounded, to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torchao
    from diffusers.utils import logging

    logging.disable_progress_bar()
    device, spec = torch.device("cpu"), MODELS[args.model]
    cpu = cpu_description()
    print(describe_cpu(cpu))
    print(f"torch {torch.__version__}, torchao {torchao.__version__}")
    results = {"cpu": cpu, "torch": torch.__version__, "torchao": torchao.__version__, "model": args.model,
               "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats}  # fmt: skip

    authors_code = import_authors_code(args.original_repo) if args.original_repo else None
    results["gate"] = correctness_gate(device, authors_code)
    if not all(results["gate"].values()):
        raise SystemExit("correctness gate FAILED: not timing")

    start = time.perf_counter()
    state_dict = original_state_dict(args.model)
    authors = None
    if authors_code is not None:
        authors = AuthorsENAT(authors_code, state_dict, spec["heads"], spec["encoder_layers"])
        authors.to(device, torch.float32)
    pipes, refused = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        build_transformer(state_dict, spec["heads"], spec["encoder_layers"]).save_pretrained(folder)
        del state_dict
        for name in args.forms:
            try:
                pipes[name] = make_pipeline(load_transformer(folder, FORMS[name]))
            except FormRefused as refusal:
                refused[name] = str(refusal)
                print(f"  {refusal}")
    print(f"model {args.model}: {len(pipes)} forms loaded in {time.perf_counter() - start:.1f}s")

    reference = pipes.get("float32") or next(iter(pipes.values()))
    num_classes = reference.transformer.config.num_classes
    labels = [(7 * i + 1) % num_classes for i in range(args.batch_size)]
    cfg, mask_temp, samp_temp = spec["cfg"], spec["mask_temp"], spec["samp_temp"]
    print(f"sampling: batch {args.batch_size}, {args.steps} steps, cfg {cfg}, mask_temp {mask_temp}, "
          f"samp_temp {samp_temp}, labels {labels[:8]}{' ...' if len(labels) > 8 else ''}")  # fmt: skip
    reference.scheduler.set_timesteps(args.steps)
    ratios = reference.scheduler.step_mask_ratios
    gflops = generation_flops(reference.transformer, ratios, cfg > 0, True) / 1e9
    # the authors' code computes the adaLN modulation at every step, ours at the first
    authors_gflops = generation_flops(reference.transformer, ratios, cfg > 0, True, modulation_every_step=True) / 1e9

    def run_ours(pipe, steps):
        generator = torch.Generator(device).manual_seed(SEED)
        return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=cfg,
                    mask_temperature=mask_temp, sampling_temperature=samp_temp, generator=generator,
                    output_type="latent").images  # fmt: skip

    def run_authors(steps):
        seed_original_rngs()
        return authors.generate(torch.tensor(labels, device=device), steps, cfg, mask_temp, samp_temp)

    print(f"probes (one nn.Linear per form, square inputs; the best of {args.probe_rounds} interleaved rounds):")
    by_form = {name: 0.0 for name in ["float32"] + list(pipes)}
    for _ in range(args.probe_rounds):
        for form in by_form:
            by_form[form] = max(by_form[form], probe_tflops(FORMS[form]))
    probes = {name: by_form["float32" if name == AUTHORS else name] for name in [AUTHORS] * (authors is not None)}
    probes |= {name: by_form[name] for name in pipes}
    for name, tflops in probes.items():
        print(f"  {name:<22} {tflops:.4f} TFLOP/s", flush=True)
    float32_probe = by_form["float32"]
    variants, skipped = {}, {}
    if authors is not None:
        variants[AUTHORS] = run_authors
    for name, pipe in pipes.items():
        slowdown = float32_probe / probes[name]
        if slowdown > args.max_slowdown:
            skipped[name] = slowdown
            minutes = gflops * args.batch_size / (probes[name] * 1e3) / 60
            print(f"  {name}: its probe is {slowdown:.0f}x below float32's: not timed (a generation would take about "
                  f"{minutes:.0f} min at its probe's rate)")  # fmt: skip
        else:
            variants[name] = lambda steps, pipe=pipe: run_ours(pipe, steps)

    ids, times = {}, {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in variants.items():  # a one-step generation: first-call costs stay out of the timings
            print(f"  warm-up {name} (1 step): {timed(lambda: fn(1), device):.2f}s", flush=True)
        for repeat in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                output = fn(args.steps)
                times[name].append(time.perf_counter() - start)
                if repeat == 0:  # the same seed every time: the final ids of the first run
                    ids[name] = output.reshape(args.batch_size, -1).cpu()
            print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.2f}s" for t in times.values()),
                  flush=True)  # fmt: skip

    quality = quality_bounds(args.quality)
    rows = {}
    for name in variants:
        median = statistics.median(times[name])
        row_gflops = authors_gflops if name == AUTHORS else gflops
        rows[name] = {
            "times_s": times[name],
            "median_s": median,
            "min_s": min(times[name]),
            "gflops_per_image": row_gflops,
            "probe_tflops": probes[name],
            "utilisation": row_gflops * args.batch_size / min(times[name]) / 1e3 / probes[name],
            # the authors' sampler draws from other random streams: its ids are checked in the gate instead
            "token_agreement": None if name == AUTHORS or "float32" not in ids else
            (ids[name] == ids["float32"]).float().mean().item(),
            "quality_bounded": name in ("float32", AUTHORS) or within_bound(quality.get(name)),
        }  # fmt: skip
    authors_median = rows[AUTHORS]["median_s"] if AUTHORS in rows else None
    float32_median = rows["float32"]["median_s"] if "float32" in rows else None

    print()
    print(describe_cpu(cpu))
    print(f"model {args.model} (random weights) | batch {args.batch_size} | {args.steps} steps | {args.repeats} "
          f"repeats, interleaved | {gflops:.1f} GFLOPs/image (the authors' code: {authors_gflops:.1f})")  # fmt: skip
    print(f"{'form':<22} {'median s/gen':>12} {'min s/gen':>10} {'vs authors':>10} {'vs fp32':>8} "
          f"{'probe TFLOP/s':>13} {'util':>6} {'tokens = fp32':>13} {'quality bound':>13}")  # fmt: skip
    for name, row in rows.items():
        vs_authors = f"{authors_median / row['median_s']:.2f}x" if authors_median else "-"
        vs_float32 = f"{float32_median / row['median_s']:.2f}x" if float32_median else "-"
        agreement = "-" if row["token_agreement"] is None else f"{row['token_agreement']:.1%}"
        bound = "met" if row["quality_bounded"] else ("MISSED" if name in quality else "not measured")
        if name in ("float32", AUTHORS):
            bound = "(reference)"
        print(f"{name:<22} {row['median_s']:>12.2f} {row['min_s']:>10.2f} {vs_authors:>10} {vs_float32:>8} "
              f"{row['probe_tflops']:>13.4f} {row['utilisation']:>6.1%} {agreement:>13} {bound:>13}")  # fmt: skip
    for name, slowdown in skipped.items():
        print(f"{name:<22} {'not timed':>12} {'':>10} {'':>10} {'':>8} {probes[name]:>13.4f} "
              f"{'':>6} {'':>13}  probe {slowdown:.0f}x below float32's")  # fmt: skip
    for name, reason in refused.items():
        print(f"{name:<22} refused: {reason.split(': ', 1)[1]}")
    print("s/gen: one generation of the whole batch; vs: median over median; util: the model's FLOPs over the fastest "
          "run, against the form's own probe; quality bound: ShapesEval >= float32's - 1 point, McNemar p > 0.05 "
          f"({args.quality.name if args.quality else 'none'})")  # fmt: skip

    def describe(name):
        line = f"{name} ({rows[name]['median_s']:.2f} s/generation"
        if float32_median:
            line += f", {float32_median / rows[name]['median_s']:.2f}x float32"
        if authors_median:
            line += f", {authors_median / rows[name]['median_s']:.2f}x the authors' float32 code"
        return line + ")"

    candidates = [name for name in rows if name != AUTHORS and rows[name]["quality_bounded"]]
    choice = min(candidates, key=lambda name: rows[name]["median_s"]) if candidates else None
    if choice is not None:
        print(f"use on this CPU: {describe(choice)}")
    for name, row in rows.items():
        faster = name not in ("float32", AUTHORS) and float32_median and row["median_s"] < float32_median
        if faster and not row["quality_bounded"]:
            print(f"  {name} is faster here but its quality is not bounded ({args.quality.name}): not chosen")

    results |= {
        "gflops_per_image": gflops,
        "probes_tflops": probes,
        "rows": rows,
        "refused": refused,
        "not_timed": {name: {"probe_slowdown": slowdown} for name, slowdown in skipped.items()},
        "choice": choice,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
