"""What a perfect transformer would score with a given VQ tokenizer and sampler: the ceiling that neither more
training nor a better network can pass.

    python examples/shapes/sampler_ceiling.py --model pretrained/enat-shapes --num-prompts 100 --steps 1 2 4 8 12

A Shapes caption fixes its image up to the jitter of each object (an integer offset in [-3, 3] on each axis). The
exact distribution of the token grid given the caption is therefore uniform over the tokenisations of those jitter
combinations (all 49 for one object; a random subset of `--max-candidates` of the 2,401 for two). This script
replaces the transformer by that distribution: at every step the candidates that agree with the tokens visible so
far (the closest ones when none agrees exactly: parallel sampling can combine tokens of different jitters) give each
masked token its marginal distribution, and the pipeline's own `MaskedTokenScheduler` samples, re-masks and anneals
as it does for the transformer. The final grid is decoded by the VQ model and checked by ShapesEval.

Reported per step count: ShapesEval accuracy (seen prompts) and how often the final grid is exactly one candidate's.
A trained pipeline far below this ceiling is limited by its transformer, not by its tokenizer or sampler.
"""

import argparse
import itertools
import json
import random
from typing import List, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import VQModel

from enat_diffusers import MaskedTokenScheduler
from enat_diffusers.data.shapes import JITTER, ShapeObject, parse_caption, render_scene
from enat_diffusers.evaluation.shapes import ShapesEval, evaluation_prompts


def candidate_scenes(caption: str, max_candidates: int, seed: int) -> List[PIL.Image.Image]:
    """Renders the caption at every jitter combination (a seeded subset when there are more than `max_candidates`)."""
    objects = parse_caption(caption)
    offsets = list(itertools.product(range(-JITTER, JITTER + 1), repeat=2))
    combinations = list(itertools.product(offsets, repeat=len(objects)))
    if len(combinations) > max_candidates:
        combinations = random.Random(seed).sample(combinations, max_candidates)
    scenes = []
    for combination in combinations:
        placed = []
        for obj, (dx, dy) in zip(objects, combination):
            x, y = obj.nominal_centre
            placed.append(ShapeObject(obj.shape, obj.size, obj.colour, obj.position, (x + dx, y + dy)))
        scenes.append(render_scene(placed))
    return scenes


@torch.inference_mode()
def tokenise(vqvae: VQModel, images: Sequence[PIL.Image.Image]) -> torch.LongTensor:
    """`(N, L)` token ids of RGB images, as the training scripts tokenise them."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255
    ids = [vqvae.quantize(vqvae.encode(chunk).latents)[2][2].reshape(len(chunk), -1) for chunk in pixels.split(128)]
    return torch.cat(ids)


@torch.inference_mode()
def decode(vqvae: VQModel, ids: torch.LongTensor) -> PIL.Image.Image:
    side = int(ids.numel() ** 0.5)
    shape = (1, side, side, vqvae.config.vq_embed_dim)
    image = vqvae.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample.clamp(0, 1)[0]
    return PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def oracle_logits(candidates: torch.LongTensor, ids: torch.LongTensor, mask_token_id: int) -> torch.Tensor:
    """`(1, L, K)` log-marginals of the `candidates` `(C, L)` that agree most with the visible tokens of `ids` `(L,)`
    (every candidate that agrees with all of them, when one does)."""
    visible = ids != mask_token_id
    agreement = (candidates[:, visible] == ids[visible]).sum(1)
    weights = (agreement == agreement.max()).float()
    one_hot = torch.nn.functional.one_hot(candidates, mask_token_id).float()  # (C, L, K)
    marginals = torch.einsum("c,clk->lk", weights, one_hot) / weights.sum()
    return torch.log(marginals + 1e-6)[None]


def oracle_sample(
    candidates: torch.LongTensor, scheduler: MaskedTokenScheduler, num_steps: int, generator: torch.Generator
) -> torch.LongTensor:
    """Samples one `(L,)` grid with `scheduler`, the oracle's marginals standing in for the transformer's logits."""
    mask_id = scheduler.config.mask_token_id
    ids = torch.full((1, candidates.shape[1]), mask_id, dtype=torch.long)
    scheduler.set_timesteps(num_steps)
    for step in scheduler.timesteps:
        ids = scheduler.step(oracle_logits(candidates, ids[0], mask_id), step, ids, generator=generator).prev_sample
    return ids[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Shapes pipeline folder: its vqvae/ and scheduler/ are used")
    parser.add_argument("--num-prompts", type=int, default=100, help="seen validation prompts (evaluation_prompts)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8], help="decoding step counts to measure")
    parser.add_argument("--max-candidates", type=int, default=400, help="jitter combinations per two-object caption")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    vqvae = VQModel.from_pretrained(args.model, subfolder="vqvae").eval()
    scheduler = MaskedTokenScheduler.from_pretrained(args.model, subfolder="scheduler")
    if scheduler.config.mask_token_id != vqvae.config.num_vq_embeddings:
        raise SystemExit("error: the scheduler's mask id is not the VQ model's codebook size")
    evaluator = ShapesEval()
    correct = {steps: [] for steps in args.steps}
    exact = {steps: [] for steps in args.steps}
    for index, caption in enumerate(evaluation_prompts(args.num_prompts)):
        candidates = tokenise(vqvae, candidate_scenes(caption, args.max_candidates, seed=index))
        for steps in args.steps:
            ids = oracle_sample(candidates, scheduler, steps, torch.Generator().manual_seed(index))
            exact[steps].append(bool((candidates == ids).all(1).any()))
            correct[steps].append(evaluator.check(decode(vqvae, ids), caption)["correct"])
    numbers = {
        str(steps): {
            "shapes_eval": 100 * float(np.mean(correct[steps])),
            "exact_grid": 100 * float(np.mean(exact[steps])),
        }
        for steps in args.steps
    }
    print(f"{args.model}: a perfect transformer with this tokenizer and sampler, {args.num_prompts} seen prompts")
    for steps, row in numbers.items():
        print(
            f"  {steps:>2} steps: ShapesEval {row['shapes_eval']:5.1f} %, final grid is a real tokenisation {row['exact_grid']:5.1f} %"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "num_prompts": args.num_prompts, "steps": numbers}, f, indent=1)


if __name__ == "__main__":
    main()
