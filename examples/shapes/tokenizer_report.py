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

Two measures of whether the ids are a function of the local pixels (what a generator needs to predict them from
their neighbours): the codes that spell an empty image (all tokens, and without the outer 2-token ring), and the
non-locality: over `--num-pairs` scenes of a left and a right object, the share of ids in the left 3/8 of the grid
(at least 2 tokens from any right object) and of the left object's own tokens that change when the right object is
added. `examples/shapes/token_accuracy.py` has the 8-neighbour lookup baseline, and
`examples/shapes/sampler_ceiling.py` what a perfect transformer would score with the tokenizer.
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

from enat_diffusers.data.shapes import BACKGROUND, COLOURS, JITTER, SHAPES, SIZES, ShapeObject, render_scene
from enat_diffusers.evaluation.shapes import ShapesEval
from enat_diffusers.utils.cli import (
    check_output_file,
    open_image,
    run_parser,
    write_json_atomically,
)


def entropy(ids) -> float:
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.inference_mode()
def token_ids(vqvae: VQModel, images) -> np.ndarray:
    """`(N, side, side)` token ids of RGB uint8 images `(N, H, W, 3)`."""
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    ids = [vqvae.quantize(vqvae.encode(chunk).latents)[2][2].reshape(len(chunk), -1) for chunk in pixels.split(100)]
    ids = torch.cat(ids).numpy()
    side = int(ids.shape[1] ** 0.5)
    return ids.reshape(len(ids), side, side)


def locality(vqvae: VQModel, num_pairs: int, seed: int = 0) -> dict:
    """Codes of an empty image, and how many ids on the left change when an object is added on the right."""
    empty = token_ids(vqvae, np.full((1, 64, 64, 3), BACKGROUND, dtype=np.uint8))[0]
    rng = np.random.default_rng(seed)

    def random_object(position):
        jitter = rng.integers(-JITTER, JITTER + 1, size=2)
        x, y = {"left": (16, 32), "right": (48, 32)}[position]
        return ShapeObject(
            str(rng.choice(SHAPES)),
            str(rng.choice(list(SIZES))),
            str(rng.choice(list(COLOURS))),
            position,
            (x + int(jitter[0]), y + int(jitter[1])),
        )

    scenes = [(random_object("left"), random_object("right")) for _ in range(num_pairs)]
    alone = np.stack([np.asarray(render_scene([left])) for left, _ in scenes])
    both = np.stack([np.asarray(render_scene([left, right])) for left, right in scenes])
    ids_alone, ids_both = token_ids(vqvae, alone), token_ids(vqvae, both)
    side = ids_alone.shape[1]
    factor = alone.shape[1] // side
    changed = ids_alone != ids_both
    left_columns = changed[:, :, : (3 * side) // 8]
    left_object = (alone != np.array(BACKGROUND)).any(-1).reshape(num_pairs, side, factor, side, factor).any((2, 4))
    return dict(
        empty_image_codes=int(len(np.unique(empty))),
        empty_image_interior_codes=int(len(np.unique(empty[2:-2, 2:-2]))),
        non_locality_left_columns=100 * float(left_columns.mean()),
        non_locality_left_object=100 * float(changed[left_object].mean()),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", required=True, help="a VQModel folder (64x64 images -> 16x16 tokens)")
    parser.add_argument("--data", required=True, help="an imagefolder split with metadata.jsonl")
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--num-pairs", type=int, default=200, help="left/right scene pairs for the non-locality")
    parser.add_argument("--min-shapes-eval", type=float, help="fail when fewer reconstructions (%%) pass ShapesEval")
    parser.add_argument("--json", help="also write the numbers to this file")
    run_parser(parser, _run, argv)


def _run(args):
    if args.json:  # replaced if it exists (the Makefile writes a temporary name)
        check_output_file(args.json, [args.vqvae, args.data], "--json", overwrite=True)
    vqvae = VQModel.from_pretrained(args.vqvae).eval()
    data = Path(args.data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()][: args.num_images]
    images = np.stack([np.asarray(open_image(data / row["file_name"], "--data image")) for row in rows])
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
    local = locality(vqvae, args.num_pairs)
    print(
        f"empty image: {local['empty_image_codes']} codes ({local['empty_image_interior_codes']} without the outer "
        f"2-token ring); adding a right object changes {local['non_locality_left_columns']:.1f} % of the ids in the "
        f"left 3/8 of the grid and {local['non_locality_left_object']:.1f} % of the left object's ids"
    )
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
            **local,
        )
        write_json_atomically(args.json, numbers, indent=1)
    if args.min_shapes_eval is not None and accuracy < args.min_shapes_eval:
        sys.exit(
            f"{args.vqvae}: only {accuracy:.1f} % of the reconstructions pass ShapesEval (required: "
            f"{args.min_shapes_eval:g} %); a generator trained on its token ids cannot draw the shapes better."
        )


if __name__ == "__main__":
    main()
