"""Check a VQ tokenizer on Shapes validation images: how deterministic its background tokens are, and whether its
reconstructions still pass ShapesEval.

    python examples/shapes/tokenizer_report.py --vqvae pretrained/enat-shapes/vqvae --data shapes/validation

With `--min-shapes-eval P` it exits with an error when fewer than P % of the reconstructions pass ShapesEval: a
generator trained on that tokenizer's ids could not do better (`make train-demo` stops there). `--json FILE` also
writes the numbers.

A background token is one whose 20x20 px neighbourhood (its 4x4 patch plus 8 px on every side) is all background.
Reported: how many codes those tokens use, the entropy of their ids, and that entropy given the token's position (what
a generator has to guess for plain background); the token entropy over all tokens; MSE / PSNR and ShapesEval of the
reconstructions through the token-id path the pipeline decodes with.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import VQModel

from enat_diffusers.data.shapes import BACKGROUND
from enat_diffusers.evaluation.shapes import ShapesEval


def entropy(ids) -> float:
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", required=True, help="a VQModel folder (64x64 images -> 16x16 tokens)")
    parser.add_argument("--data", required=True, help="an imagefolder split with metadata.jsonl")
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--min-shapes-eval", type=float, help="fail when fewer reconstructions (%%) pass ShapesEval")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    vqvae = VQModel.from_pretrained(args.vqvae).eval()
    data = Path(args.data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()][: args.num_images]
    images = np.stack([np.asarray(PIL.Image.open(data / row["file_name"]).convert("RGB")) for row in rows])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ids, reconstructions = [], []
    with torch.inference_mode():
        for chunk in pixels.split(100):
            _, _, (_, _, chunk_ids) = vqvae.quantize(vqvae.encode(chunk).latents)
            chunk_ids = chunk_ids.reshape(len(chunk), -1)
            side = int(chunk_ids.shape[1] ** 0.5)
            shape = (len(chunk), side, side, vqvae.config.vq_embed_dim)
            decoded = vqvae.decode(chunk_ids.reshape(-1), force_not_quantize=True, shape=shape).sample
            ids.append(chunk_ids.reshape(len(chunk), side, side))
            reconstructions.append(decoded.clamp(0, 1))
    ids, reconstructions = torch.cat(ids).numpy(), torch.cat(reconstructions)
    factor = images.shape[1] // side

    background = (images == np.array(BACKGROUND)).all(-1)
    by_position = defaultdict(list)
    for image_ids, image_background in zip(ids, background):
        for y in range(side):
            for x in range(side):
                window = image_background[
                    max(0, factor * y - 8) : factor * (y + 1) + 8, max(0, factor * x - 8) : factor * (x + 1) + 8
                ]
                if window.all():
                    by_position[(y, x)].append(image_ids[y, x])
    background_ids = [i for position in by_position.values() for i in position]
    conditional = sum(len(v) * entropy(v) for v in by_position.values()) / len(background_ids)
    mse = (reconstructions - pixels).square().mean().item()
    decoded_images = [
        PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        for image in reconstructions
    ]
    report = ShapesEval().evaluate(decoded_images, [row["text"] for row in rows])

    print(f"{args.vqvae}: {vqvae.config.num_vq_embeddings} codes, {len(rows)} images")
    print(
        f"background tokens: {len(np.unique(background_ids))} codes, entropy {entropy(background_ids):.2f} nats, "
        f"{conditional:.2f} nats given the position"
    )
    print(f"all tokens: {len(np.unique(ids))} codes used, entropy {entropy(ids):.2f} nats")
    accuracy = 100 * report["all"]["prompt"]
    psnr = -10 * np.log10(mse)
    print(f"reconstructions: MSE {mse:.5f}, PSNR {psnr:.2f} dB, ShapesEval {accuracy:.1f} %")
    if args.json:
        numbers = dict(
            vqvae=args.vqvae,
            num_images=len(rows),
            background_codes=len(np.unique(background_ids)),
            background_entropy=entropy(background_ids),
            background_entropy_given_position=conditional,
            codes_used=len(np.unique(ids)),
            token_entropy=entropy(ids),
            mse=mse,
            psnr=psnr,
            shapes_eval=accuracy,
        )
        Path(args.json).write_text(json.dumps(numbers, indent=1))
    if args.min_shapes_eval is not None and accuracy < args.min_shapes_eval:
        sys.exit(
            f"{args.vqvae}: only {accuracy:.1f} % of the reconstructions pass ShapesEval (required: "
            f"{args.min_shapes_eval:g} %); a generator trained on its token ids cannot draw the shapes better."
        )


if __name__ == "__main__":
    main()
