"""Where the time of one ENAT-L generation goes: `torch.profiler` over `ENATPipeline` sampling (token ids only).

    python benchmarks/profile_sampling.py --model enat-l-256 --dtype float32 [--no-reuse] [--row-limit 15]

Random weights with the released checkpoint's shapes (as `benchmark_sampling.py`); one warm-up generation, then one
profiled generation. Prints the operators by total self time (CPU, or CUDA on a GPU) and the share of the matmul-like
ones (`mm`, `addmm`, `bmm`, `linear` and attention kernels).
"""

import argparse
import time

import torch
from benchmark_sampling import DTYPES, MODELS, SEED, make_pipeline, original_state_dict
from torch.profiler import ProfilerActivity, profile

from enat_diffusers.conversion import build_transformer


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="enat-l-256")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-reuse", action="store_true", help="profile reuse_features=False")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--row-limit", type=int, default=15)
    args = parser.parse_args(argv)

    device, spec = torch.device(args.device), MODELS[args.model]
    pipe = make_pipeline(build_transformer(original_state_dict(args.model), spec["heads"], spec["encoder_layers"]))
    pipe.to(device)
    torch.nn.Module.to(pipe.transformer, DTYPES[args.dtype])
    labels = [(7 * i + 1) % pipe.transformer.config.num_classes for i in range(args.batch_size)]

    def run():
        return pipe(class_labels=labels, num_inference_steps=args.steps, guidance_scale=spec["cfg"],
                    mask_temperature=spec["mask_temp"], sampling_temperature=spec["samp_temp"],
                    reuse_features=not args.no_reuse, generator=torch.Generator(device).manual_seed(SEED),
                    output_type="latent").images  # fmt: skip

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        run()  # warm-up
        start = time.perf_counter()
        with profile(activities=activities) as profiler:
            run()
        seconds = time.perf_counter() - start
    averages = profiler.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(event, key) for event in averages)
    matmul = sum(getattr(event, key) for event in averages if event.key in MATMUL_OPS)
    print(f"{args.model} {args.dtype} batch {args.batch_size}, {args.steps} steps, reuse {not args.no_reuse}, "
          f"{device}, {torch.get_num_threads()} threads: {seconds:.2f} s profiled")  # fmt: skip
    print(averages.table(sort_by=key, row_limit=args.row_limit))
    print(f"matmul-like operators ({', '.join(MATMUL_OPS)}): {matmul / total:.1%} of the self time")


if __name__ == "__main__":
    main()
