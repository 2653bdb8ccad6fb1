"""Sampling speed of the diffusers port vs. the original ENAT code's way of computing, side by side in one run.

    python benchmarks/benchmark_sampling.py --model enat-l-256 --dtype bfloat16 --batch-size 1

Variants, interleaved within every repeat (A, B, C, A, B, C, ...) after one warm-up each, under inference mode:

* O (only with `--original-repo DIR`, a checkout of LeapLabTHU/ENAT): the authors' own `libs/models.py` `DiT` and
  `libs/nat_misc.py` `NATSchedule.generate`, imported from the checkout (`authors_enat.py`; needs einops);
* A: `original_enat.generate`: re-statement of the original computation (two model calls per step, multiway kv,
  manual attention, boolean-index splits, host-syncing asserts, NumPy Gumbel noise);
* B: `ENATPipeline(..., reuse_features=True)`: ours (cond+uncond in one batch, feature reuse);
* C: `ENATPipeline(..., reuse_features=False)`: ours without ENAT's feature reuse;
* D: `ENATPipeline` around a vanilla NAT of the same width and depth (`NATTransformer2DModel`, AutoNAT's U-ViT with
  `num_layers` = ENAT's block count: every token through every block at every step), same schedule (`--no-nat`
  leaves it out).

Every variant's model FLOPs per image are counted analytically from the computed shapes (`model_flops.py`) and
cross-checked against torch's `FlopCounterMode`; a matmul probe measures the machine's peak for the dtype in the same
run, and the achieved FLOP/s of every variant is reported against it (utilisation).

All variants stop at token ids (B/C/D use `output_type="latent"`; no VQ decoding). `enat-l-*` models have random
weights with exactly the shapes of the released checkpoints (`tests/fixtures/original_keys/*.json`); speed does not
depend on the weight values because the number of masked tokens at every step is fixed by the schedule.

Before timing, a correctness gate runs: on the tiny fixture checkpoint, A and B (and O) must reproduce the ids
recorded from the original code exactly; then A and B are compared forward-by-forward on the benchmarked model, and
O's ids are compared with A's for the same seeds (required to be identical in float32). With `--dtype bfloat16`, B is
also sampled once from a float32 copy of the same weights with the same seed, and the fraction of final token ids
that agree is printed.

`--json PATH` also writes every measured number, unrounded (times, FLOPs, utilisation, the gate's and the id checks'
results, the goals), for tools and tests that must not parse the rounded table.
"""

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "conversion"))

from authors_enat import AuthorsENAT, import_authors_code  # noqa: E402
from model_flops import counted_flops, generation_flops  # noqa: E402
from original_enat import OriginalENAT, generate  # noqa: E402

from enat_diffusers import ENATPipeline, MaskedTokenScheduler, NATTransformer2DModel  # noqa: E402
from enat_diffusers.conversion import build_transformer  # noqa: E402


# model -> where the weights come from, architecture not stored in the file, sampling settings, and the sizes of the
# square matmuls that probe the peak (the tiny model is a functional check: a small probe)
ENAT_L_PROBE = (2048, 3072, 4096)
MODELS = {
    "tiny": dict(keys=None, heads=4, encoder_layers=3, cfg=2.0, mask_temp=0.0, samp_temp=0.0, probe=(256, 512)),
    "enat-l-256": dict(
        keys="enat_l_256.json", heads=16, encoder_layers=22, cfg=2.5, mask_temp=1.5, samp_temp=6.0, probe=ENAT_L_PROBE
    ),  # fmt: skip
    "enat-l-512": dict(
        keys="enat_l_512.json", heads=16, encoder_layers=22, cfg=3.5, mask_temp=1.5, samp_temp=4.0, probe=ENAT_L_PROBE
    ),  # fmt: skip
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED = 0


def original_state_dict(model: str) -> dict:
    """Original-format state dict: the tiny fixture, or seeded random weights with the released shapes.

    Random weights are N(0, 0.02^2), except the LayerNorm weights (the only 1-D `.weight` keys): 1 + N(0, 0.02^2), so
    that activations and logits are not scaled towards 0 and the A/B forward comparison is meaningful.
    """
    if MODELS[model]["keys"] is None:
        return torch.load(FIXTURES / "enat_tiny.pth", map_location="cpu", weights_only=True)
    shapes = json.loads((FIXTURES / "original_keys" / MODELS[model]["keys"]).read_text())
    generator = torch.Generator().manual_seed(SEED)
    state_dict = {}
    for key, shape in shapes.items():
        state_dict[key] = torch.randn(shape, generator=generator) * 0.02
        if key.endswith(".weight") and len(shape) == 1:
            state_dict[key] += 1
    return state_dict


def make_pipeline(transformer) -> ENATPipeline:
    """Our pipeline around a transformer; the tiny VQModel is never used with `output_type="latent"`."""
    codebook_size = transformer.config.codebook_size
    vqvae = VQModel(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=codebook_size,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    )
    pipe = ENATPipeline(transformer, MaskedTokenScheduler(mask_token_id=codebook_size), vqvae.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_original_rngs():
    """The original sampler draws from torch's and NumPy's global RNGs (A and O): seed both before every run."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ correctness


def correctness_gate(device: torch.device, authors_code=None) -> dict:
    """A and B (and the authors' code O) must reproduce the recorded generation (`gen.final_ids`) exactly, float32.

    Returns {variant: whether its ids equal the recorded ones}; the caller stops when one does not.
    """
    meta = json.loads((FIXTURES / "fixture_meta.json").read_text())
    settings, null_label = meta["generation_fixture"], meta["null_class_label"]
    config = json.loads((FIXTURES / "enat_tiny_config.json").read_text())
    heads, encoder_layers = config["num_heads"], config["enc_dec"][0]
    recorded = load_file(FIXTURES / "enat_tiny_io.safetensors")
    labels, expected = recorded["gen.class_labels"], recorded["gen.final_ids"]  # (3,), (3, 16)
    state_dict = original_state_dict("tiny")

    original = OriginalENAT.from_state_dict(state_dict, heads, encoder_layers).to(device)
    pipe = make_pipeline(build_transformer(state_dict, heads, encoder_layers)).to(device)
    steps, cfg = settings["num_steps"], settings["cfg_scale"]
    with torch.inference_mode():
        seed_original_rngs()
        ids_a = generate(original, labels.to(device), steps, cfg, settings["mask_temp"], settings["samp_temp"],
                         null_label).cpu()  # fmt: skip
        ids_b = pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance_scale=cfg,
                     mask_temperature=settings["mask_temp"], sampling_temperature=settings["samp_temp"],
                     output_type="latent").images.reshape(expected.shape).cpu()  # fmt: skip
    ok = {"A original-structure": torch.equal(ids_a, expected), "B ours (ENATPipeline)": torch.equal(ids_b, expected)}
    if authors_code is not None:
        authors = AuthorsENAT(authors_code, state_dict, heads, encoder_layers).to(device, torch.float32)
        seed_original_rngs()
        ids_o = authors.generate(labels.to(device), steps, cfg, settings["mask_temp"], settings["samp_temp"]).cpu()
        ok["O authors' code"] = torch.equal(ids_o, expected)
    print(f"gate (tiny fixture, labels {labels.tolist()}, {steps} steps, cfg {cfg}, temps 0, float32):")
    for name, equal in ok.items():
        print(f"  {name:<22} ids == recorded original ids: {equal}")
    return ok


@torch.inference_mode()
def compare_forwards(original: OriginalENAT, pipe: ENATPipeline, device: torch.device) -> dict:
    """Logits of A and B on the benchmarked model: a plain forward and a reuse forward (two schedule steps)."""
    transformer, K = pipe.transformer, original.codebook_size
    L = transformer.config.sample_size**2
    generator = torch.Generator().manual_seed(SEED)
    batch = 2
    labels = torch.tensor([1, transformer.config.num_classes], device=device)  # a class and the null class
    ids = torch.randint(0, K, (batch, L), generator=generator)
    order = torch.argsort(torch.rand(batch, L, generator=generator), dim=1)  # reveal in a random order per row
    masked_1, masked_2 = math.floor(L * math.cos(math.pi / 16)), math.floor(L * math.cos(math.pi / 8))
    ids_1 = ids.scatter(1, order[:, :masked_1], K).to(device)  # masked_1 masks per row
    ids_2 = ids.scatter(1, order[:, :masked_2], K).to(device)  # a subset of them stays masked
    out_a1 = original(ids_1, labels, return_dict=True)
    out_a2 = original(ids_2, labels, prev_dict=out_a1, return_dict=True)
    out_b1 = transformer(ids_1, class_labels=labels)
    out_b2 = transformer(ids_2, class_labels=labels, reuse_state=out_b1.reuse_state)
    diffs = {}
    for name, a, b in (("plain", out_a1["logits"], out_b1.logits), ("reuse", out_a2["logits"], out_b2.logits)):
        diffs[name] = (a.float() - b.float()).abs().max().item()
        print(f"  forward check ({name}): max |logits A - logits B| = {diffs[name]:.2e} "
              f"(max |logit| {a.abs().max():.2e})")  # fmt: skip
    return diffs


# ---------------------------------------------------------------------------------------------------- measurement


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="enat-l-256")
    parser.add_argument("--batch-size", type=int, default=1, help="images per generation")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights/activations of A, B, C")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-nat", action="store_true", help="leave out variant D (the vanilla NAT)")
    parser.add_argument(
        "--original-repo",
        type=Path,
        help="a checkout of the authors' code (LeapLabTHU/ENAT): also time their own DiT and NATSchedule (variant O)",
    )
    parser.add_argument("--json", type=Path, help="also write every measured number, unrounded, to this JSON file")
    return parser.parse_args(argv)


def vanilla_nat(transformer, dtype) -> NATTransformer2DModel:
    """A NAT of ENAT's width, heads and block count (random weights: speed does not depend on them)."""
    config = transformer.config
    torch.manual_seed(SEED)
    model = NATTransformer2DModel(
        sample_size=config.sample_size,
        codebook_size=config.codebook_size,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_encoder_layers + config.num_decoder_layers,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
    )
    return torch.nn.Module.to(model, dtype).eval()  # (ModelMixin.to warns about dtype casts)


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, sizes=(2048, 3072, 4096), repeats: int = 5) -> float:
    """The machine's matmul throughput for `dtype`: the best of `repeats` timed square matmuls of each size."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up
        seconds = min(timed(lambda: torch.matmul(a, b), device) for _ in range(repeats))
        best = max(best, 2 * size**3 / seconds / 1e12)
    return best


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec = torch.device(args.device), DTYPES[args.dtype], MODELS[args.model]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    results = {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(), "model": args.model,
        "dtype": args.dtype, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
    }  # fmt: skip

    def write_results():
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    authors_code = import_authors_code(args.original_repo) if args.original_repo else None
    results["gate"] = correctness_gate(device, authors_code)
    if not all(results["gate"].values()):
        write_results()
        raise SystemExit("correctness gate FAILED: not timing")

    start = time.perf_counter()
    state_dict = original_state_dict(args.model)
    original = OriginalENAT.from_state_dict(state_dict, spec["heads"], spec["encoder_layers"])
    pipe = make_pipeline(build_transformer(state_dict, spec["heads"], spec["encoder_layers"]))
    authors = None
    if authors_code is not None:
        authors = AuthorsENAT(authors_code, state_dict, spec["heads"], spec["encoder_layers"]).to(device, dtype)
    del state_dict
    original.to(device=device, dtype=dtype)
    pipe.to(device)
    # the same weights in float32, for the token agreement of a lower precision
    float32_pipe = make_pipeline(copy.deepcopy(pipe.transformer)).to(device) if dtype != torch.float32 else None
    torch.nn.Module.to(pipe.transformer, dtype)  # (ModelMixin.to warns about dtype casts)
    parameters = sum(p.numel() for p in original.parameters())
    print(f"model {args.model}: {parameters / 1e6:.1f}M parameters (original layout), {args.dtype}, "
          f"set up in {time.perf_counter() - start:.1f}s")  # fmt: skip
    results["forward_check_max_abs_diff"] = compare_forwards(original, pipe, device)

    num_classes = pipe.transformer.config.num_classes
    labels = [(7 * i + 1) % num_classes for i in range(args.batch_size)]
    cfg, mask_temp, samp_temp = spec["cfg"], spec["mask_temp"], spec["samp_temp"]
    print(f"sampling: batch {args.batch_size}, {args.steps} steps, cfg {cfg}, mask_temp {mask_temp}, "
          f"samp_temp {samp_temp}, labels {labels[:8]}{' ...' if len(labels) > 8 else ''}")  # fmt: skip

    def run_a():
        seed_original_rngs()
        label_tensor = torch.tensor(labels, device=device)
        return generate(original, label_tensor, args.steps, cfg, mask_temp, samp_temp, null_label=num_classes)

    def run_ours(pipe, reuse):
        generator = torch.Generator(device).manual_seed(SEED)
        return pipe(class_labels=labels, num_inference_steps=args.steps, guidance_scale=cfg,
                    mask_temperature=mask_temp, sampling_temperature=samp_temp, reuse_features=reuse,
                    generator=generator, output_type="latent").images  # fmt: skip

    def run_o():
        seed_original_rngs()
        return authors.generate(torch.tensor(labels, device=device), args.steps, cfg, mask_temp, samp_temp)

    variants = {"O authors' code": run_o} if authors is not None else {}
    variants |= {
        "A original structure": run_a,
        "B ours (reuse)": lambda: run_ours(pipe, True),
        "C ours (no reuse)": lambda: run_ours(pipe, False),
    }
    pipe.scheduler.set_timesteps(args.steps)
    ratios = pipe.scheduler.step_mask_ratios
    analytic = {  # the original computes the shapes of B (as two forwards per step: cond, then uncond), and the
        # adaLN modulation at every step
        name: generation_flops(pipe.transformer, ratios, cfg > 0, reuse, modulation_every_step=original) / 1e9
        for name, reuse, original in (
            ("A original structure", True, True),
            ("B ours (reuse)", True, False),
            ("C ours (no reuse)", False, False),
        )
    }
    if authors is not None:
        analytic["O authors' code"] = analytic["A original structure"]  # the same computation
        with torch.inference_mode():
            same = torch.equal(run_o().cpu(), run_a().cpu())
        print(f"  O authors' code ids == A original-structure ids (seed {SEED}, {args.dtype}): {same}")
        results["authors_ids_equal_original_structure"] = same
        if not same and dtype == torch.float32:
            write_results()
            raise SystemExit("O and A differ in float32: not timing")
    if float32_pipe is not None:
        with torch.inference_mode():
            agreement = (run_ours(pipe, True) == run_ours(float32_pipe, True)).float().mean().item()
        print(f"  final token ids of B, {args.dtype} vs float32 (seed {SEED}): {agreement:.1%} equal")
        results["token_agreement_vs_float32"] = agreement
        del float32_pipe
    if not args.no_nat and args.model != "tiny":
        nat_pipe = make_pipeline(vanilla_nat(pipe.transformer, dtype)).to(device)
        variants["D vanilla NAT"] = lambda: run_ours(nat_pipe, None)
        analytic["D vanilla NAT"] = generation_flops(nat_pipe.transformer, ratios, cfg > 0, False) / 1e9
    times = {name: [] for name in variants}
    gflops, peak_memory = {}, {}
    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up (also the peak-memory run on CUDA), then FLOPs
            if device.type == "cuda":  # the models stay resident: report the peak above what is allocated now
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            warmup = timed(fn, device)
            if device.type == "cuda":
                peak_memory[name] = (torch.cuda.max_memory_allocated(device) - resident) / 2**30
            gflops[name] = counted_flops(fn) / 1e9
            print(f"  warm-up {name}: {warmup:.3f}s")
        peak = matmul_peak_tflops(dtype, device, spec["probe"])
        for repeat in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
            print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.3f}s" for t in times.values()))
        # probed before and after the repeats: the better one
        peak = max(peak, matmul_peak_tflops(dtype, device, spec["probe"]))

    median = {name: statistics.median(values) for name, values in times.items()}
    # analytic: GFLOPs per image (generation_flops); TFLOP/s: the whole batch's FLOPs over the fastest run
    achieved = {name: analytic[name] * args.batch_size / min(times[name]) / 1e3 for name in variants}
    print()
    print(f"model {args.model} | {args.dtype} | batch {args.batch_size} | {args.steps} steps | {device} "
          f"| {args.repeats} repeats | matmul peak {peak:.3f} TFLOP/s ({args.dtype}, "
          f"square {spec['probe'][0]}-{spec['probe'][-1]})")  # fmt: skip
    header = (f"{'variant':<22} {'median s/gen':>12} {'min s/gen':>10} {'images/s':>9} {'GFLOPs/img':>11} "
              f"{'counted':>9} {'TFLOP/s':>8} {'util':>6}")  # fmt: skip
    print(header + (f" {'peak GiB*':>10}" if peak_memory else ""))
    for name in variants:
        row = (f"{name:<22} {median[name]:>12.3f} {min(times[name]):>10.3f} {args.batch_size / median[name]:>9.3f} "
               f"{analytic[name]:>11.4g} {gflops[name] / args.batch_size:>9.4g} {achieved[name]:>8.3f} "
               f"{achieved[name] / peak:>6.1%}")  # fmt: skip
        print(row + (f" {peak_memory[name]:>10.2f}" if peak_memory else ""))
    print(
        "GFLOPs/img: analytic (model_flops.py); counted: torch FlopCounterMode; TFLOP/s and util: the analytic "
        "count over the fastest run, against the matmul peak"
    )
    if peak_memory:
        weights = sum(p.numel() * p.element_size() for p in original.parameters()) / 2**30
        print(f"* torch.cuda.max_memory_allocated above the resident weights (weights per model: {weights:.2f} GiB)")
    a, b, c = (median[name] for name in ("A original structure", "B ours (reuse)", "C ours (no reuse)"))
    print(f"speed-up of ours over the original structure (A/B): {a / b:.2f}")
    print(f"speed-up from feature reuse (C/B): {c / b:.2f}")
    goals = []
    if authors is not None:
        o = median["O authors' code"]
        print(f"speed-up of ours over the authors' code (O/B): {o / b:.2f}")
        goals.append(("speed vs the authors' code, same dtype", o / b, 2.0))
    goals += [
        ("speed vs the original structure, same dtype", a / b, 2.0),
        ("FLOPs without / with reuse", analytic["C ours (no reuse)"] / analytic["B ours (reuse)"], 1.7),
    ]
    if "D vanilla NAT" in variants:
        goals.append(
            ("FLOPs vanilla NAT / ENAT with reuse", analytic["D vanilla NAT"] / analytic["B ours (reuse)"], 3.5)
        )
    goals.append(
        (
            "utilisation of the matmul peak (B)",
            achieved["B ours (reuse)"] / peak,
            0.5,
        )
    )
    print("goals:")
    for goal, value, target in goals:
        print(f"  {goal:<46} {value:>7.2f} (target >= {target}): {'met' if value >= target else 'MISSED'}")
    results["matmul_peak_tflops"] = peak
    results["variants"] = {
        name: {
            "times_s": times[name],
            "median_s": median[name],
            "min_s": min(times[name]),
            "images_per_s": args.batch_size / median[name],
            "gflops_per_image": analytic[name],
            "gflops_per_image_counted": gflops[name] / args.batch_size,
            "tflops": achieved[name],
            "utilisation": achieved[name] / peak,
            **({"peak_memory_gib": peak_memory[name]} if peak_memory else {}),
        }
        for name in variants
    }
    results["goals"] = [
        dict(goal=goal, value=value, target=target, met=value >= target) for goal, value, target in goals
    ]
    write_results()


if __name__ == "__main__":
    main()
