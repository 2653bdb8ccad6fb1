"""Does a Shapes pipeline's transformer draw the shape its caption names? Its loss on one-object scenes next to the
exact distribution's, with the true caption and with the shape word swapped.

    python examples/shapes/shape_condition.py --model pretrained/enat-shapes --scenes-per-kind 20

For every shape and size, `--scenes-per-kind` one-object scenes (random colour, position and jitter) are tokenised by
the pipeline's VQ model and shown to the transformer in two states: every token masked (the first decoding step),
and half of the object's tokens and half of the others masked (the completion of a partly drawn object). For the
masked object tokens it reports the transformer's cross-entropy and top-1 accuracy under the true caption and under
the same caption with each other shape word, next to the cross-entropy of the exact distribution of that caption:
`sampler_ceiling.py`'s oracle (the tokenisations of the caption's 49 jitters that agree with the visible tokens, or
agree most where none agrees fully, as when the visible tokens are of another shape), capped at -log(1e-4) per
token.

A transformer that reads the shape from its condition loses much more under a swapped shape word than under the true
one, as the exact distribution does; one whose losses under both are close draws the same tokens for both shapes.
"""

import argparse
import json
import random
from collections import defaultdict

import numpy as np
import torch
from sampler_ceiling import candidate_scenes, oracle_logits, tokenise

from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import (
    COLOURS,
    JITTER,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    caption_for,
    render_scene,
)
from enat_diffusers.utils.cli import load_pipeline


STATES = {"all masked": None, "half masked": 0.5}
EXACT_CAP = -float(np.log(1e-4))


def random_scene(shape: str, size: str, rng: random.Random) -> ShapeObject:
    position = rng.choice(list(POSITIONS))
    (x, y), _ = POSITIONS[position]
    jitter = (rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER))
    return ShapeObject(shape, size, rng.choice(list(COLOURS)), position, (x + jitter[0], y + jitter[1]))


def state_mask(is_object: torch.BoolTensor, ratio, generator: torch.Generator) -> torch.BoolTensor:
    """All tokens (`ratio` None), or `ratio` of the object tokens and `ratio` of the others, at random."""
    if ratio is None:
        return torch.ones_like(is_object)
    mask = torch.zeros_like(is_object)
    for part in (is_object, ~is_object):
        where = part.nonzero()[:, 0]
        chosen = torch.randperm(len(where), generator=generator)[: max(1, round(ratio * len(where)))]
        mask[where[chosen]] = True
    return mask


@torch.inference_mode()
def measure(pipe: ENATPipeline, scenes_per_kind: int, seed: int):
    transformer, mask_id = pipe.transformer, pipe.transformer.mask_token_id
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    candidates_of = {}
    sums = defaultdict(lambda: np.zeros(4))  # (state, size, shape, caption) -> model CE, model top-1, exact CE, n
    for shape in SHAPES:
        for size in SIZES:
            for _ in range(scenes_per_kind):
                scene = random_scene(shape, size, rng)
                ids = tokenise(pipe.vqvae, [render_scene([scene])])[0]
                is_object = ids != torch.mode(ids).values  # background is the commonest token of a one-object grid
                caption = caption_for([scene])
                captions = {"true": caption}
                captions.update({f"as {other}": caption.replace(shape, other) for other in SHAPES if other != shape})
                embeds, pooled, _, _ = pipe.encode_prompt(list(captions.values()), do_classifier_free_guidance=False)
                for state, ratio in STATES.items():
                    mask = state_mask(is_object, ratio, generator)
                    inputs = torch.where(mask, mask_id, ids).expand(len(captions), -1)
                    logits = transformer(inputs, encoder_hidden_states=embeds, pooled_text_embeds=pooled).logits
                    log_probs = logits.float().log_softmax(-1)
                    scored = mask & is_object
                    target = ids[scored]
                    for row, (name, text) in enumerate(captions.items()):
                        if text not in candidates_of:
                            candidates_of[text] = tokenise(pipe.vqvae, candidate_scenes(text, 49, seed=0))
                        exact = oracle_logits(candidates_of[text], inputs[row], mask_id)[0][scored]
                        model = log_probs[row][scored]
                        sums[(state, size, shape, name)] += [
                            -model.gather(1, target[:, None]).sum().item(),
                            (model.argmax(1) == target).sum().item(),
                            (-exact.gather(1, target[:, None])).clamp(0, EXACT_CAP).sum().item(),
                            len(target),
                        ]
    return {
        " | ".join(key): {
            "cross_entropy": ce / n,
            "top1": top1 / n,
            "exact_cross_entropy": exact / n,
            "num_tokens": int(n),
        }
        for key, (ce, top1, exact, n) in sums.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image Shapes pipeline folder")
    parser.add_argument("--scenes-per-kind", type=int, default=20, help="one-object scenes per shape and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.scenes_per_kind < 1:
        parser.error("--scenes-per-kind must be positive")
    pipe = load_pipeline(ENATPipeline, args.model)
    numbers = measure(pipe, args.scenes_per_kind, args.seed)
    print(f"{args.model}: masked object tokens of one-object scenes, cross-entropy (top-1) of the transformer | exact")
    for key, row in numbers.items():
        print(
            f"  {key:<40} {row['cross_entropy']:6.3f} ({100 * row['top1']:5.1f} %) | "
            f"{row['exact_cross_entropy']:6.3f}   {row['num_tokens']} tokens"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "scenes_per_kind": args.scenes_per_kind, "numbers": numbers}, f, indent=1)


if __name__ == "__main__":
    main()
