"""What each quantized form (`quantization_forms.py`) costs in quality, against float32 with the same seeds.

Real weights, the shipped Shapes model: ShapesEval on `--num-prompts` seen validation prompts (image i: seed i, as
`python -m enat_diffusers.evaluation.shapes`), per form, then the paired comparison with float32 (the ShapesEval
McNemar test), and the fraction of final token ids equal to float32's:

    python benchmarks/quantization_quality.py --model pretrained/enat-shapes --num-prompts 500 \\
        --forms float32 int8-dynamic int8-dynamic-fbgemm int8-weight-only float8-weight-only --output-dir DIR

Random weights with ENAT-L-256's shapes (`benchmark_sampling.py`'s): the max logit error at step 1 (every token
masked: the same input for every form) and the token agreement of a whole generation (batch 4, 8 steps, the
released sampling settings, seed 0):

    python benchmarks/quantization_quality.py --model enat-l-256 --forms float32 int8-dynamic ... --output-dir DIR

Which modules must stay float32 (`--keep-study FORM`): the form applied with the default `KEEP_FLOAT32`, with
nothing kept, and with each kept group quantized in turn; the token agreement with float32 on the Shapes prompts and
the max logit error at step 1 (the first image's prompt) of each.

Every form's report is written to `DIR/<model>-<form>.json` and reused when it exists for the same settings (delete
it to measure again), so forms can be measured in separate runs and compared afterwards.

int8 on CPUs without a fast `torch._int_mm`: torch 2.13 runs it (and bfloat16 matmuls) as a reference loop on CPUs
whose capability is AVX2 (`benchmark_quantization.py` measures it: about 100x below float32 on an AVX2-only EPYC).
Unless `--torch-int-mm`, this script computes `torch._int_mm` as float32 matmuls over chunks of at most 1024 products,
whose sums (at most 128 * 128 * 1024 = 2**24 in magnitude) float32 holds exactly, added up in int32: the same int32
result, bit for bit, at float32 speed. Its first calls are checked against `torch._int_mm` (an error if they
differ). Only this quality script does this; every timing uses torch's own kernel.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization_forms import (  # noqa: E402
    FORMS,
    KEEP_FLOAT32,
    FormRefused,
    cpu_description,
    describe_cpu,
    load_transformer,
)


SEED = 0
ENAT_L_LABELS = [1, 8, 15, 22]  # benchmark_sampling.py's labels at batch 4
CHECKED_INT_MM_CALLS = 3


# --------------------------------------------------------------------------------------------- exact int8 matmul


@contextlib.contextmanager
def exact_int_mm(enabled: bool = True):
    """`torch._int_mm` computed exactly through float32 matmuls (see the module docstring), inside the block."""
    if not enabled:
        yield
        return
    original, calls = torch._int_mm, [0]

    def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = None
        for start in range(0, a.shape[1], 1024):
            part = (a[:, start : start + 1024].float() @ b[start : start + 1024].float()).to(torch.int32)
            out = part if out is None else out.add_(part)
        if calls[0] < CHECKED_INT_MM_CALLS:
            calls[0] += 1
            if not torch.equal(out, original(a, b)):
                raise RuntimeError("the float32 computation of torch._int_mm differs from torch's: run --torch-int-mm")
        return out

    torch._int_mm = int_mm
    try:
        yield
    finally:
        torch._int_mm = original


# ------------------------------------------------------------------------------------------------------- Shapes


class RecordingPipeline:
    """Calls a pipeline for token ids, keeps them, then decodes them: ShapesEval scores the images it returns."""

    def __init__(self, pipe):
        self.pipe, self.ids = pipe, []

    def __call__(self, output_type="pil", **kwargs):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        ids = self.pipe(output_type="latent", **kwargs).images
        side = self.pipe.transformer.config.sample_size
        ids = ids.reshape(ids.shape[0], side, side)
        self.ids.extend(ids.reshape(ids.shape[0], -1).tolist())
        return ImagePipelineOutput(images=self.pipe.decode_tokens(ids, output_type))


def shapes_pipeline(model: str, form, keep_float32):
    from enat_diffusers import ENATPipeline

    transformer = load_transformer(model, form, keep_float32, subfolder="transformer")
    pipe = ENATPipeline.from_pretrained(model, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_report(model: str, form, keep_float32, prompts, steps: int, batch_size: int, int_mm_exact: bool):
    """ShapesEval report of the form on the prompts, with every image's final token ids and the step-1 logits."""
    from enat_diffusers.evaluation.shapes import ShapesEval

    pipe = shapes_pipeline(model, form, keep_float32)
    recorder = RecordingPipeline(pipe)
    start = time.perf_counter()
    with torch.inference_mode(), exact_int_mm(int_mm_exact and form.name == "int8-dynamic"):
        report = ShapesEval().evaluate_pipeline(
            recorder, prompts, [False] * len(prompts), steps, batch_size=batch_size, seed=SEED
        )
        logits = shapes_step1_logits(pipe, prompts[0])
    report["ids"] = recorder.ids
    report["step1_logits"] = logits.tolist()
    report["seconds"] = time.perf_counter() - start
    return report


def shapes_step1_logits(pipe, prompt: str) -> torch.Tensor:
    """The transformer's logits for one prompt with every token masked (the first step's input)."""
    transformer = pipe.transformer
    prompt_embeds, pooled, _, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    seq_len = transformer.config.sample_size**2
    ids = torch.full((1, seq_len), transformer.config.codebook_size)
    return transformer(ids, encoder_hidden_states=prompt_embeds, pooled_text_embeds=pooled).logits[0].float()


# ----------------------------------------------------------------------------------------------------- ENAT-L


def enat_l_folder(directory: Path) -> Path:
    """ENAT-L-256 with benchmark_sampling.py's seeded random weights, saved once as a float32 diffusers folder."""
    from benchmark_sampling import MODELS, original_state_dict

    from enat_diffusers.conversion import build_transformer

    folder = directory / "enat-l-256-random"
    if not (folder / "config.json").exists():
        spec = MODELS["enat-l-256"]
        build_transformer(original_state_dict("enat-l-256"), spec["heads"], spec["encoder_layers"]).save_pretrained(
            folder
        )
    return folder


def enat_l_report(folder: Path, form, keep_float32, steps: int, int_mm_exact: bool):
    from benchmark_sampling import MODELS, make_pipeline

    spec = MODELS["enat-l-256"]
    transformer = load_transformer(folder, form, keep_float32)
    pipe = make_pipeline(transformer)
    num_classes, seq_len = transformer.config.num_classes, transformer.config.sample_size**2
    start = time.perf_counter()
    with torch.inference_mode(), exact_int_mm(int_mm_exact and form.name == "int8-dynamic"):
        labels = torch.tensor(ENAT_L_LABELS + [num_classes])  # and the null class
        masked = torch.full((len(labels), seq_len), transformer.config.codebook_size)
        logits = transformer(masked, class_labels=labels).logits.float()
        ids = pipe(class_labels=ENAT_L_LABELS, num_inference_steps=steps, guidance_scale=spec["cfg"],
                   mask_temperature=spec["mask_temp"], sampling_temperature=spec["samp_temp"],
                   generator=torch.Generator().manual_seed(SEED), output_type="latent").images  # fmt: skip
    return {
        "ids": ids.reshape(len(ENAT_L_LABELS), -1).tolist(),
        "step1_logits": logits.tolist(),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------------ reports


def token_agreement(ids, reference) -> float:
    ids, reference = torch.tensor(ids), torch.tensor(reference)
    return (ids == reference).float().mean().item()


def logit_error(logits, reference) -> dict:
    logits, reference = torch.tensor(logits), torch.tensor(reference)
    return {
        "max_abs": (logits - reference).abs().max().item(),
        "max_abs_logit": reference.abs().max().item(),
        # how often the most likely token at a position changes
        "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def measure(args, form, keep_float32, prompts, label: str, folder=None) -> dict:
    """The form's report, read from `--output-dir` when it was measured with the same settings."""
    settings = {"model": args.model, "form": form.name, "keep_float32": list(keep_float32), "steps": args.steps}
    if folder is None:
        settings |= {"num_prompts": len(prompts), "seed": SEED}
    path = args.output_dir / f"{Path(args.model).name}-{label}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"  {label}: read {path}", flush=True)
            return saved
    print(f"  {label}: measuring ...", flush=True)
    exact = not args.torch_int_mm
    try:
        if folder is None:
            report = shapes_report(args.model, form, keep_float32, prompts, args.steps, args.batch_size, exact)
        else:
            report = enat_l_report(folder, form, keep_float32, args.steps, exact)
    except FormRefused as refusal:
        print(f"  {refusal}", flush=True)
        return {"refused": str(refusal)}
    report["settings"] = settings
    report["int_mm"] = "float32 chunks (exact)" if exact and form.name == "int8-dynamic" else "torch"
    report["cpu"] = cpu_description()
    path.write_text(json.dumps(report) + "\n")
    print(f"  {label}: {report['seconds']:.0f}s, written to {path}", flush=True)
    return report


def summary_row(report: dict, reference: dict) -> dict:
    from enat_diffusers.evaluation.shapes import compare_reports

    if "refused" in report:
        return {"refused": report["refused"]}
    row = {
        "token_agreement": token_agreement(report["ids"], reference["ids"]),
        "step1_logits": logit_error(report["step1_logits"], reference["step1_logits"]),
    }
    if "seen" in report:
        comparison = compare_reports(reference, report)["seen"]
        row |= {
            "accuracy": report["seen"]["prompt"],
            "accuracy_float32": reference["seen"]["prompt"],
            "gained": comparison["gained"],
            "lost": comparison["lost"],
            "p_value": comparison["p_value"],
        }
    return row


def print_table(rows: dict, shapes: bool):
    width = max([4] + [len(name) for name in rows])
    header = f"{'form':<{width}} {'tokens = fp32':>13} {'step-1 max |dlogit|':>20} {'argmax =':>9}"
    if shapes:
        header += f" {'ShapesEval seen':>16} {'change':>8} {'gained/lost':>12} {'McNemar p':>10}"
    print(header)
    for name, row in rows.items():
        if "refused" in row:
            print(f"{name:<{width}} refused by torchao on this machine")
            continue
        error = row["step1_logits"]
        line = (f"{name:<{width}} {row['token_agreement']:>13.1%} {error['max_abs']:>10.3g} "
                f"(of {error['max_abs_logit']:.3g}) {error['argmax_agreement']:>9.1%}")  # fmt: skip
        if shapes:
            change = 100 * (row["accuracy"] - row["accuracy_float32"])
            line += (f" {row['accuracy']:>15.1%} {change:>+7.1f}pt {row['gained']:>6}/{row['lost']:<5} "
                     f"{row['p_value']:>10.3g}")  # fmt: skip
        print(line)


def keep_variants(keep_float32):
    """(label, modules kept float32): the default, nothing kept, and each kept group quantized in turn."""
    variants = [("keep KEEP_FLOAT32 (default)", list(keep_float32)), ("keep nothing", [])]
    for group in keep_float32:
        variants.append((f"also quantize {group}", [keep for keep in keep_float32 if keep != group]))
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image Shapes pipeline folder, or enat-l-256")
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=["float32"])
    parser.add_argument("--keep-float32", nargs="*", default=KEEP_FLOAT32, help="modules no form quantizes")
    parser.add_argument("--keep-study", choices=sorted(name for name, f in FORMS.items() if f.torchao is not None),
                        help="which modules must stay float32, for this form")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=500, help="seen validation prompts (Shapes model)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call (Shapes model)")
    parser.add_argument("--torch-int-mm", action="store_true", help="int8-dynamic with torch's own torch._int_mm")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging

    logging.disable_progress_bar()
    print(describe_cpu(cpu_description()), f"| torch {torch.__version__}", flush=True)

    shapes = args.model != "enat-l-256"
    folder, prompts = None, None
    if shapes:
        from enat_diffusers.evaluation.shapes import evaluation_prompts

        prompts = evaluation_prompts(args.num_prompts, SEED, held_out=False)
    else:
        folder = enat_l_folder(args.output_dir)
    reference = measure(args, FORMS["float32"], [], prompts, "float32", folder)
    reports = {}
    if args.keep_study:
        form = FORMS[args.keep_study]
        for label, keep in keep_variants(args.keep_float32):
            name = f"{form.name}, {label}"
            reports[name] = measure(args, form, keep, prompts, f"{form.name}-keep-{'-'.join(keep) or 'none'}", folder)
    else:
        for name in args.forms:
            if name != "float32":
                reports[name] = measure(args, FORMS[name], args.keep_float32, prompts, name, folder)
    rows = {name: summary_row(report, reference) for name, report in reports.items()}
    if shapes:
        what = f"{len(prompts)} seen prompts (float32: ShapesEval {reference['seen']['prompt']:.1%})"
    else:
        what = f"random weights, labels {ENAT_L_LABELS}"
    print(f"\n{args.model}: {what}, {args.steps} steps, seed {SEED}; every form against float32")
    print_table(rows, shapes)
    if args.json:
        import torchao

        summary = {
            "model": args.model,
            "num_prompts": len(prompts) if shapes else None,
            "steps": args.steps,
            "seed": SEED,
            "keep_float32": list(args.keep_float32),
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "int8_dynamic_int_mm": "torch" if args.torch_int_mm else "float32 chunks (exact)",
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
