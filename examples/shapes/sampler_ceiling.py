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

`--hybrid K [K ...]` also samples with the pipeline's transformer (its guidance, no feature reuse): alone, for the
first K steps with the oracle after them, and after K oracle steps. It tells which steps the transformer gets wrong:
the layout it draws from the caption in the first steps, or the completion of a partly revealed grid in the last.
"""

import argparse
import itertools
import json
import random
from collections import defaultdict
from typing import Callable, List, Optional, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import VQModel

from enat_diffusers import ENATPipeline, MaskedTokenScheduler
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


def sample(
    candidates: torch.LongTensor,
    scheduler: MaskedTokenScheduler,
    num_steps: int,
    generator: torch.Generator,
    transformer_logits: Optional[Callable[[int, torch.LongTensor], torch.Tensor]] = None,
    transformer_steps: Sequence[int] = (),
) -> torch.LongTensor:
    """Samples one `(L,)` grid with `scheduler`: the oracle's marginals stand in for the transformer's logits, except
    at `transformer_steps`, where `transformer_logits(step, ids)` gives them."""
    mask_id = scheduler.config.mask_token_id
    ids = torch.full((1, candidates.shape[1]), mask_id, dtype=torch.long)
    scheduler.set_timesteps(num_steps)
    for step in scheduler.timesteps:
        if int(step) in transformer_steps:
            logits = transformer_logits(int(step), ids)
        else:
            logits = oracle_logits(candidates, ids[0], mask_id)
        ids = scheduler.step(logits, step, ids, generator=generator).prev_sample
    return ids[0]


def guided_logits(pipe: ENATPipeline, caption: str) -> Callable[[int, torch.LongTensor], torch.Tensor]:
    """The pipeline's guided logits for `caption` at a step (ENAT's `cond + s * (cond - uncond)`, no reuse)."""
    embeds, pooled, negative_embeds, negative_pooled = pipe.encode_prompt(caption, do_classifier_free_guidance=True)
    condition = dict(
        encoder_hidden_states=torch.cat([embeds, negative_embeds]),
        pooled_text_embeds=torch.cat([pooled, negative_pooled]),
    )

    @torch.inference_mode()
    def logits(step: int, ids: torch.LongTensor) -> torch.Tensor:
        cond, uncond = pipe.transformer(torch.cat([ids, ids]), return_dict=False, **condition)[0].float().chunk(2)
        return cond + pipe.scheduler.step_guidance_scales[step] * (cond - uncond)

    return logits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Shapes pipeline folder: its vqvae/ and scheduler/ are used")
    parser.add_argument("--num-prompts", type=int, default=100, help="seen validation prompts (evaluation_prompts)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8], help="decoding step counts to measure")
    parser.add_argument("--max-candidates", type=int, default=400, help="jitter combinations per two-object caption")
    parser.add_argument("--hybrid", type=int, nargs="*", default=[], help="also mix in the transformer (see above)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or any(steps < 1 for steps in args.steps):
        parser.error("--num-prompts and --steps must be positive")
    if any(not 0 < k < max(args.steps) for k in args.hybrid):
        parser.error(f"every --hybrid K must lie between 0 and the step count, got {args.hybrid}")

    pipe = ENATPipeline.from_pretrained(args.model) if args.hybrid else None
    vqvae = pipe.vqvae if pipe else VQModel.from_pretrained(args.model, subfolder="vqvae")
    scheduler = pipe.scheduler if pipe else MaskedTokenScheduler.from_pretrained(args.model, subfolder="scheduler")
    if scheduler.config.mask_token_id != vqvae.config.num_vq_embeddings:
        raise SystemExit("error: the scheduler's mask id is not the VQ model's codebook size")
    runs = {}  # name -> (step count, transformer steps)
    for steps in args.steps:
        runs[f"oracle, {steps} steps"] = (steps, ())
        if args.hybrid:
            runs[f"transformer, {steps} steps"] = (steps, tuple(range(steps)))
        for k in (k for k in args.hybrid if k < steps):
            runs[f"transformer for {k} then oracle, {steps} steps"] = (steps, tuple(range(k)))
            runs[f"oracle for {k} then transformer, {steps} steps"] = (steps, tuple(range(k, steps)))

    evaluator = ShapesEval()
    correct, exact = defaultdict(list), defaultdict(list)
    for index, caption in enumerate(evaluation_prompts(args.num_prompts)):
        candidates = tokenise(vqvae, candidate_scenes(caption, args.max_candidates, seed=index))
        logits = guided_logits(pipe, caption) if pipe else None
        for name, (steps, transformer_steps) in runs.items():
            generator = torch.Generator().manual_seed(index)
            ids = sample(candidates, scheduler, steps, generator, logits, transformer_steps)
            exact[name].append(bool((candidates == ids).all(1).any()))
            correct[name].append(evaluator.check(decode(vqvae, ids), caption)["correct"])
    numbers = {
        name: {"shapes_eval": 100 * float(np.mean(correct[name])), "exact_grid": 100 * float(np.mean(exact[name]))}
        for name in runs
    }
    print(f"{args.model}, {args.num_prompts} seen prompts: ShapesEval; how often the final grid is a real one")
    for name, row in numbers.items():
        print(f"  {name:<42} {row['shapes_eval']:5.1f} %  {row['exact_grid']:5.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "num_prompts": args.num_prompts, "runs": numbers}, f, indent=1)


if __name__ == "__main__":
    main()
