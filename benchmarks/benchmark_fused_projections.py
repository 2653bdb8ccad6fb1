"""Does `fuse_qkv_projections()` make ENAT faster? Times one sampling-like forward pass (with a reuse state) of the
same transformer with separate and with fused projections, interleaved (A, B, A, B, ...), minimum of the repeats.

    python benchmarks/benchmark_fused_projections.py [--width 1024 --heads 16 --encoder 22 --decoder 2] [--batch 4]

Prints a markdown table: seconds per forward, separate vs fused, and their ratio. The logits of both must agree
(max difference printed) before anything is timed.
"""

import argparse
import platform
import time

import torch

from enat_diffusers import ENATTransformer2DModel


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--encoder", type=int, default=22)
    parser.add_argument("--decoder", type=int, default=2)
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ENATTransformer2DModel(
        sample_size=args.sample_size,
        hidden_size=args.width,
        num_attention_heads=args.heads,
        num_encoder_layers=args.encoder,
        num_decoder_layers=args.decoder,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.to(getattr(torch, args.dtype))
    length = args.sample_size**2
    generator = torch.Generator().manual_seed(0)
    order = torch.rand(args.batch, length, generator=generator).argsort(1)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    previous = torch.randint(0, 1024, (args.batch, length), generator=generator).scatter(
        1, order[:, : length // 2], 1024
    )
    current = previous.scatter(1, order[:, : length // 3], 1024)  # a third still masked: a mid-sampling step
    current = torch.where(previous == 1024, torch.where(current == 1024, 1024, 7), previous)

    with torch.inference_mode():
        state = model(previous, class_labels=labels).reuse_state

        def forward():
            return model(current, class_labels=labels, reuse_state=state).logits

        separate = forward()
        model.fuse_qkv_projections()
        fused = forward()
        difference = (separate.float() - fused.float()).abs().max().item()
        results = {"separate": [], "fused": []}
        forward()
        for _ in range(args.repeats):
            model.unfuse_qkv_projections()
            results["separate"] += timed(forward, 1)
            model.fuse_qkv_projections()
            results["fused"] += timed(forward, 1)

    a, b = min(results["separate"]), min(results["fused"])
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"model: width {args.width}, {args.encoder}+{args.decoder} layers, batch {args.batch}, {args.dtype}; "
        f"max |logit difference| {difference:.2e}"
    )
    print("| projections | s per forward (min) |\n|---|---|")
    print(
        f"| separate (to_q, to_k, to_v; add_k_proj, add_v_proj) | {a:.4f} |\n| fused (to_qkv; to_added_kv) | {b:.4f} |"
    )
    print(f"fused / separate time: {b / a:.3f}")


if __name__ == "__main__":
    main()
