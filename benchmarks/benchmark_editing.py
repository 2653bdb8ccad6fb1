"""Cost of editing vs. generating: inpainting a quarter of the image (and img2img at strength 0.25) against a full
generation, with ENAT's feature reuse on and off. Prints a markdown table.

    python benchmarks/benchmark_editing.py                      # random Shapes-sized model (see below)
    python benchmarks/benchmark_editing.py --model pretrained/enat-shapes --prompt "a large red circle on the left"

Default model: a randomly initialised **class-conditional** ENAT the size of the Shapes model (sample_size 16,
codebook 256, hidden 160, 4 heads, 6 encoder + 2 decoder layers, mlp_ratio 4, 10 classes) with a tiny random VQ model
(factor 4: 64x64 images, 256 codes). Class-conditional so that the table counts image tokens only (a text model also
encodes its 77 text tokens once, at the first step of every run). The amount of computation does not depend on the
weights: the schedule fixes how many tokens each step encodes and decodes. `--model DIR` benchmarks a saved pipeline
folder instead (text models take `--prompt`).

Variants (all `output_type="latent"`: the VQ decoding, the same for all, is left out; the edits include the VQ
encoding of their input image):

* generate: `ENATPipeline`, all tokens masked, `--steps` steps;
* inpaint 1/4: `ENATInpaintPipeline`, the top-left quarter masked (64 of 256 tokens on the default model);
* img2img 0.25 random / confidence: `ENATImg2ImgPipeline(strength=0.25)` (confidence adds 4 scoring forwards).

Reported per variant: steps run, tokens through the encoder and the decoder per image (summed over steps and
forwards, counted by forward pre-hooks on the first encoder and decoder block), transformer GFLOPs and total GFLOPs of
one call (`torch.utils.flop_counter.FlopCounterMode`, 2 per multiply-add, plus the CPU attention kernel's formula,
which torch does not count), and seconds per call: minimum and median over `--repeats` rounds, every round running
every variant in turn (interleaved), after one warm-up each, under `torch.inference_mode()`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import VQModel

from enat_diffusers import (
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATTransformer2DModel,
    MaskedTokenScheduler,
    box_mask,
)


sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_flops import flop_counter  # noqa: E402


def shapes_sized_pipeline() -> ENATPipeline:
    torch.manual_seed(0)
    transformer = ENATTransformer2DModel(
        sample_size=16,
        codebook_size=256,
        hidden_size=160,
        num_attention_heads=4,
        num_encoder_layers=6,
        num_decoder_layers=2,
        mlp_ratio=4.0,
        num_classes=10,
    )
    vqvae = VQModel(
        block_out_channels=[8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=256,
        sample_size=64,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    )
    scheduler = MaskedTokenScheduler(mask_token_id=256)
    return ENATPipeline(transformer=transformer.eval(), scheduler=scheduler, vqvae=vqvae.eval())


def count_flops(fn) -> (float, float):
    """(transformer GFLOPs, total GFLOPs) of one call."""
    with flop_counter() as counter:
        fn()
    per_module = counter.get_flop_counts()
    transformer = sum(per_module.get("ENATTransformer2DModel", {}).values())
    return transformer / 1e9, counter.get_total_flops() / 1e9


class TokenCounter:
    """Tokens per image entering the first encoder and the first decoder block, and the number of forwards."""

    def __init__(self, transformer):
        self.encoder = self.decoder = self.forwards = 0
        self.handles = [
            transformer.encoder_blocks[0].register_forward_pre_hook(self.count("encoder")),
            transformer.decoder_blocks[0].register_forward_pre_hook(self.count("decoder")),
            transformer.register_forward_pre_hook(self.count("forwards")),
        ]

    def count(self, name):
        def hook(module, args):
            setattr(self, name, getattr(self, name) + (1 if name == "forwards" else args[0].shape[1]))

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: random Shapes-sized class model)")
    parser.add_argument("--prompt", default="a large red circle on the left", help="prompt of text models")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    base = ENATPipeline.from_pretrained(args.model) if args.model else shapes_sized_pipeline()
    base = base.to(device)
    base.set_progress_bar_config(disable=True)
    inpaint = ENATInpaintPipeline(**base.components)
    img2img = ENATImg2ImgPipeline(**base.components)
    for pipe in (inpaint, img2img):
        pipe.set_progress_bar_config(disable=True)
    size = inpaint.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    quarter = box_mask(size, size, (0, 0, size // 2, size // 2))
    if base.is_text_to_image:
        condition = dict(prompt=[args.prompt] * args.batch_size)
    else:
        condition = dict(class_labels=[0] * args.batch_size)

    def call(pipe, reuse, **kwargs):
        def run():
            generator = [torch.Generator().manual_seed(i) for i in range(args.batch_size)]
            return pipe(
                **condition,
                num_inference_steps=args.steps,
                reuse_features=reuse,
                generator=generator,
                output_type="latent",
                **kwargs,
            )

        return run

    variants = {}
    for reuse in (True, False):
        tag = "on" if reuse else "off"
        variants[("generate", tag)] = call(base, reuse)
        variants[("inpaint 1/4", tag)] = call(inpaint, reuse, image=image, mask_image=quarter)
    variants[("img2img 0.25 random", "on")] = call(img2img, True, image=image, strength=0.25, remask="random")
    variants[("img2img 0.25 confidence", "on")] = call(img2img, True, image=image, strength=0.25, remask="confidence")

    stats = {}
    with torch.inference_mode():
        for key, fn in variants.items():
            counter = TokenCounter(base.transformer)
            fn()  # warm-up, and the token counts
            counter.remove()
            transformer_gflops, total_gflops = count_flops(fn)
            stats[key] = dict(
                encoder=counter.encoder,
                decoder=counter.decoder,
                forwards=counter.forwards,
                transformer=transformer_gflops,
                total=total_gflops,
                times=[],
            )
        for _ in range(args.repeats):
            for key, fn in variants.items():
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                stats[key]["times"].append(time.perf_counter() - start)

    reference = stats[("generate", "on")]
    print(
        f"model: {args.model or 'random Shapes-sized class model'}; {args.steps} steps requested, batch "
        f"{args.batch_size}, {args.repeats} repeats, device {args.device}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| variant | reuse | forwards | encoder tokens/img | decoder tokens/img | transformer GFLOPs | total GFLOPs "
        "| min s | median s | time vs generate (reuse) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, tag), row in stats.items():
        print(
            f"| {name} | {tag} | {row['forwards']} | {row['encoder']} | {row['decoder']} | {row['transformer']:.3f} "
            f"| {row['total']:.3f} | {min(row['times']):.4f} | {statistics.median(row['times']):.4f} "
            f"| {min(row['times']) / min(reference['times']):.2f} |"
        )


if __name__ == "__main__":
    main()
