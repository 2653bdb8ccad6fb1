"""`torch.compile` on ENAT sampling: eager vs compiled transformer, side by side in one run.

    python benchmarks/benchmark_compile.py --model pretrained/enat-shapes --batch-size 50
    python benchmarks/benchmark_compile.py --model enat-l-256 --batch-size 1

The token counts change at every step (the encoder sees the visible tokens, the decoder the masked ones, reuse the
newly revealed ones), so the transformer is compiled with `dynamic=True`: one graph per code path instead of one per
shape. The compiled transformer is a copy of the eager one (`copy.deepcopy(...).compile(dynamic=True)`, inductor);
both run the same sampler with the same seeds, interleaved (eager, compiled, eager, ...) after the compiled model's
warm-up (the compilation, reported apart), under `torch.inference_mode()`, to token ids only
(`output_type="latent"`). Reported: the compilation time, the minimum and median seconds per generation, and the
fraction of final token ids that agree (compiled kernels round differently, and a sampler amplifies any difference).

`--model` is a pipeline folder (text models take `--prompt`), or `enat-l-256` / `enat-l-512`: a class-conditional
ENAT-L with random weights in the released checkpoints' shapes (as in `benchmark_sampling.py`).

`--form` loads the transformer in a numeric form of `quantization_forms.py` (e.g. `int8-weight-only`, quantized by
diffusers' `TorchAoConfig` on load): the compiled transformer is then a second copy loaded the same way.
"""

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_sampling import MODELS, make_pipeline, original_state_dict, timed  # noqa: E402
from quantization_forms import FORMS, load_transformer  # noqa: E402

from enat_diffusers import ENATPipeline  # noqa: E402
from enat_diffusers.conversion import build_transformer  # noqa: E402


def load(model: str, form: str = "float32", copies: int = 1):
    """`copies` pipelines of the model, each with its own transformer in `form`."""
    if model in MODELS and model != "tiny":
        spec = MODELS[model]
        transformer = build_transformer(original_state_dict(model), spec["heads"], spec["encoder_layers"])
        if form == "float32":
            return [make_pipeline(copy.deepcopy(transformer) if i else transformer) for i in range(copies)]
        with tempfile.TemporaryDirectory() as folder:
            transformer.save_pretrained(folder)
            return [make_pipeline(load_transformer(folder, FORMS[form])) for _ in range(copies)]
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(f"--model {model}: neither a pipeline folder nor one of enat-l-256, enat-l-512")
    if form == "float32":
        return [ENATPipeline.from_pretrained(model) for _ in range(copies)]
    return [
        ENATPipeline.from_pretrained(model, transformer=load_transformer(model, FORMS[form], subfolder="transformer"))
        for _ in range(copies)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/enat-shapes")
    parser.add_argument("--prompt", default="a large red circle on the left and a small blue square on the right")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reuse", action="store_true", help="sample without ENAT's feature reuse")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--form", choices=sorted(FORMS), default="float32", help="the transformer's numeric form")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    eager, compiled = (pipe.to(device) for pipe in load(args.model, args.form, copies=2))
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    compiled.transformer.compile(dynamic=True)
    if eager.is_text_to_image:
        condition = dict(prompt=[args.prompt] * args.batch_size)
    else:
        condition = dict(
            class_labels=[(7 * i + 1) % eager.transformer.config.num_classes for i in range(args.batch_size)]
        )

    def run(pipe):
        generator = [torch.Generator(device).manual_seed(i) for i in range(args.batch_size)]
        return pipe(
            **condition,
            num_inference_steps=args.steps,
            reuse_features=False if args.no_reuse else None,
            generator=generator,
            output_type="latent",
        ).images

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, model {args.model}, "
          f"form {args.form}, batch {args.batch_size}, {args.steps} steps, "
          f"reuse {'off' if args.no_reuse else 'default'}")  # fmt: skip
    times = {"eager": [], "compiled": []}
    with torch.inference_mode():
        warm_eager = timed(lambda: run(eager), device)
        compile_seconds = timed(lambda: run(compiled), device)
        second_compiled = timed(lambda: run(compiled), device)  # shapes the first call did not see compile here
        print(
            f"warm-up: eager {warm_eager:.2f}s; compiled: first call {compile_seconds:.1f}s, "
            f"second {second_compiled:.2f}s"
        )
        for repeat in range(args.repeats):
            for name, pipe in (("eager", eager), ("compiled", compiled)):
                times[name].append(timed(lambda: run(pipe), device))
            print(
                f"  repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{times[n][-1]:.3f}s" for n in ("eager", "compiled"))
            )

        agreement = (run(eager) == run(compiled)).float().mean().item()
    print()
    print("| variant | min s | median s | images/s (median) |")
    print("|---|---|---|---|")
    for name in ("eager", "compiled"):
        median = statistics.median(times[name])
        print(f"| {name} | {min(times[name]):.3f} | {median:.3f} | {args.batch_size / median:.2f} |")
    speedup = min(times["eager"]) / min(times["compiled"])
    print(f"compiled / eager speed-up (minimum): {speedup:.2f}; compilation: {compile_seconds:.1f}s")
    print(f"final token ids equal to eager's: {agreement:.1%}")


if __name__ == "__main__":
    main()
