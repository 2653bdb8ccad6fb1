"""How well a Shapes pipeline's transformer predicts masked tokens of real images, per mask ratio, for object tokens
(tokens whose 4x4 patch has a non-background pixel) and background tokens separately, next to a model-free baseline.

    python examples/shapes/token_accuracy.py --model pretrained/enat-shapes --data shapes/validation

Each validation image is tokenised by the pipeline's VQ model; at each mask ratio a random `round(L * ratio)`
tokens are masked (the training masking) and the transformer predicts them from the caption and the visible tokens.
Reported per ratio: cross-entropy and top-1 accuracy on masked object tokens and on masked background tokens. The
baseline predicts a token from its 8 neighbours' ids alone (the most frequent id for that neighbourhood on the
training split's tokens, when `--train-data` is given): what local structure alone determines.

Context use: for the one-object images, every object token is masked alone (all other tokens visible) and predicted,
first in the image's own grid, then in the grid of the same image with its object recoloured to the next palette
colour (pixels recoloured, then tokenised; the caption unchanged). A transformer that reads the visible tokens
follows the recolouring; one that predicts from the caption and the position alone does not.

Decoder attention locality: with half the tokens masked, the share of each decoder head's attention to visible image
tokens that falls on a masked token's 8 neighbours, next to the share a uniform attention would give. A head that
finds the neighbours is far above uniform.
"""

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import BACKGROUND, COLOURS
from enat_diffusers.models import transformer_enat
from enat_diffusers.utils.cli import (
    check_output_file,
    load_pipeline,
    run_parser,
    write_json_atomically,
)


RATIOS = (0.05, 0.2, 0.5, 0.8, 0.95)


def read_split(folder: Path, limit: int):
    """`(images (N, H, W, 3) uint8, captions)` of the first `limit` images of an imagefolder split."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()[:limit]]
    images = np.stack([np.asarray(PIL.Image.open(folder / row["file_name"]).convert("RGB")) for row in rows])
    return images, [row["text"] for row in rows]


def tokenise(pipe, folder: Path, limit: int):
    """`(ids (N, L), object-token mask (N, L), captions)` of the first `limit` images of an imagefolder split."""
    images, captions = read_split(folder, limit)
    ids, objects = tokenise_images(pipe, images)
    return ids, objects, captions


def tokenise_images(pipe, images: np.ndarray):
    """`(ids (N, L), object-token mask (N, L))` of `(N, H, W, 3)` uint8 images."""
    rows = range(len(images))
    factor = images.shape[1] // pipe.transformer.config.sample_size
    side = pipe.transformer.config.sample_size
    foreground = (images != np.array(BACKGROUND)).any(-1)  # (N, H, W)
    objects = foreground.reshape(len(rows), side, factor, side, factor).any(axis=(2, 4)).reshape(len(rows), -1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ids = []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            latents = pipe.vqvae.encode(pixels[start : start + 64]).latents
            ids.append(pipe.vqvae.quantize(latents)[2][2].reshape(latents.shape[0], -1))
    return torch.cat(ids), torch.from_numpy(objects)


def recolour(image: np.ndarray) -> np.ndarray:
    """The image with every object pixel in the next palette colour (red -> green -> ... -> purple -> red)."""
    palette = np.array(list(COLOURS.values()))
    out = image.copy()
    for index, colour in enumerate(palette):
        out[(image == colour).all(-1)] = palette[(index + 1) % len(palette)]
    return out


@torch.no_grad()
def context_use(pipe, images: np.ndarray, captions) -> dict:
    """Object tokens of (up to 64) one-object images masked one at a time, every other token visible: the share
    predicted right in the image's own grid, and the share that follows its recoloured grid (caption unchanged)."""
    single = [i for i, caption in enumerate(captions) if " and " not in caption][:64]
    if not single:
        return {"num_tokens": 0}
    own, objects = tokenise_images(pipe, images[single])
    other, _ = tokenise_images(pipe, np.stack([recolour(images[i]) for i in single]))
    embeds, pooled, _, _ = pipe.encode_prompt([captions[i] for i in single], "cpu", 1, False)
    right = Counter()
    for row in range(len(single)):
        positions = objects[row].nonzero().flatten()
        for name, grid in (("own", own[row]), ("recoloured", other[row])):
            batch = grid.repeat(len(positions), 1)
            batch[torch.arange(len(positions)), positions] = pipe.transformer.mask_token_id
            logits = pipe.transformer(
                batch,
                encoder_hidden_states=embeds[row : row + 1].expand(len(positions), -1, -1),
                pooled_text_embeds=pooled[row : row + 1].expand(len(positions), -1),
            ).logits
            predicted = logits[torch.arange(len(positions)), positions].argmax(-1)
            right[name] += (predicted == grid[positions]).sum().item()
        right["n"] += len(positions)
    return {
        "num_tokens": right["n"],
        "own_grid_top1": right["own"] / right["n"],
        "recoloured_grid_follows": right["recoloured"] / right["n"],
    }


@torch.no_grad()
def decoder_attention_locality(pipe, ids: torch.Tensor, captions, generator, ratio: float = 0.5) -> dict:
    """
    `ids` `(N, L)` with `round(L * ratio)` tokens masked at random, run without reuse: for every decoder layer and
    head, the share of a masked token's attention to visible image tokens that falls on its 8 neighbours (mean over
    masked tokens and images), and the share that uniform attention would give. The attention weights are computed
    from the queries and keys that the attention processor hands to `dispatch_attention_fn` (after any rotation);
    keys come as [text, visible tokens in raster order, masked tokens].
    """
    transformer = pipe.transformer
    side, mask_id = transformer.config.sample_size, transformer.mask_token_id
    noisy = pipe.scheduler.add_noise(ids, generator=generator, mask_ratio=ratio)
    masked = noisy == mask_id
    embeds, pooled, _, _ = pipe.encode_prompt(list(captions), "cpu", 1, False)
    captured, in_decoder = [], [False]
    original = transformer_enat.dispatch_attention_fn

    def recording(query, key, value, **kwargs):
        if in_decoder[0]:  # (B, N, H, Dh) -> weights (B, H, Nq, Nk)
            scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * query.shape[-1] ** -0.5
            captured.append(scores.softmax(-1))
        return original(query, key, value, **kwargs)

    hooks = []
    for block in transformer.decoder_blocks:
        hooks.append(block.register_forward_pre_hook(lambda *_: in_decoder.__setitem__(0, True)))
        hooks.append(block.register_forward_hook(lambda *_: in_decoder.__setitem__(0, False)))
    transformer_enat.dispatch_attention_fn = recording
    try:
        transformer(noisy, encoder_hidden_states=embeds, pooled_text_embeds=pooled)
    finally:
        transformer_enat.dispatch_attention_fn = original
        for hook in hooks:
            hook.remove()
    rows, cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    num_text, num_visible = embeds.shape[1], int((~masked[0]).sum())
    shares, uniform = [], []
    for weights in captured:  # one decoder layer
        per_image = []
        for b in range(len(ids)):
            visible, queries = (~masked[b]).nonzero().flatten(), masked[b].nonzero().flatten()
            distance = torch.maximum(
                (rows[queries, None] - rows[None, visible]).abs(), (cols[queries, None] - cols[None, visible]).abs()
            )
            near = (distance == 1).float()  # (n_masked, n_visible)
            on_visible = weights[b, :, :, num_text : num_text + num_visible]  # (H, n_masked, n_visible)
            per_image.append(((on_visible * near).sum(-1) / on_visible.sum(-1).clamp_min(1e-12)).mean(-1))
            uniform.append((near.sum(-1) / num_visible).mean())
        shares.append(torch.stack(per_image).mean(0).tolist())
    return {"mask_ratio": ratio, "neighbour_share": shares, "uniform_share": float(torch.stack(uniform).mean())}


def neighbourhoods(ids: torch.Tensor, side: int) -> np.ndarray:
    """`(N * L, 8)` ids of each token's 8 neighbours (-1 outside the grid)."""
    grid = np.pad(ids.reshape(-1, side, side).numpy(), ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    around = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return np.stack([grid[:, 1 + dy : 1 + dy + side, 1 + dx : 1 + dx + side] for dy, dx in around], -1).reshape(-1, 8)


def neighbour_baseline(train_ids, ids, objects, side: int) -> float:
    """Top-1 accuracy on object tokens of predicting each id from its 8 neighbours' ids (a lookup table)."""
    table = defaultdict(Counter)
    for key, token in zip(map(tuple, neighbourhoods(train_ids, side)), train_ids.reshape(-1).tolist()):
        table[key][token] += 1
    keys, targets = neighbourhoods(ids, side), ids.reshape(-1).tolist()
    hits = [
        bool(table[tuple(key)]) and table[tuple(key)].most_common(1)[0][0] == target
        for key, target, is_object in zip(keys, targets, objects.reshape(-1).tolist())
        if is_object
    ]
    return float(np.mean(hits))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image ENATPipeline folder trained on Shapes")
    parser.add_argument("--data", required=True, help="an imagefolder split with metadata.jsonl (validation)")
    parser.add_argument("--train-data", help="the training split, for the neighbour baseline")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--num-train-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    run_parser(parser, _run, argv)


def _run(args):
    if args.json:
        check_output_file(args.json, [args.model, args.data, args.train_data], "--json", overwrite=True)
    pipe = load_pipeline(ENATPipeline, args.model)
    images, captions = read_split(Path(args.data), args.num_images)
    ids, objects = tokenise_images(pipe, images)
    mask_id, side = pipe.transformer.mask_token_id, pipe.transformer.config.sample_size
    generator = torch.Generator().manual_seed(args.seed)
    report = {"model": args.model, "num_images": len(captions), "ratios": {}}
    print(f"{'mask ratio':>10} {'object CE':>10} {'object top-1':>13} {'background CE':>14} {'background top-1':>17}")
    with torch.no_grad():
        embeds, pooled, _, _ = pipe.encode_prompt(captions, "cpu", 1, False)
        for ratio in RATIOS:
            sums = Counter()
            for start in range(0, len(captions), 64):
                clean = ids[start : start + 64]
                noisy = pipe.scheduler.add_noise(clean, generator=generator, mask_ratio=ratio)
                logits = pipe.transformer(
                    noisy,
                    encoder_hidden_states=embeds[start : start + 64],
                    pooled_text_embeds=pooled[start : start + 64],
                ).logits
                masked = noisy == mask_id
                for name, where in (
                    ("object", masked & objects[start : start + 64]),
                    ("background", masked & ~objects[start : start + 64]),
                ):
                    sums[f"{name}_ce"] += F.cross_entropy(logits[where], clean[where], reduction="sum").item()
                    sums[f"{name}_hits"] += (logits[where].argmax(-1) == clean[where]).sum().item()
                    sums[f"{name}_n"] += int(where.sum())
            row = {
                f"{name}_{kind}": sums[f"{name}_{key}"] / max(sums[f"{name}_n"], 1)
                for name in ("object", "background")
                for kind, key in (("ce", "ce"), ("top1", "hits"))
            }
            report["ratios"][ratio] = row
            print(f"{ratio:>10} {row['object_ce']:>10.3f} {row['object_top1']:>13.1%} {row['background_ce']:>14.3f} "
                  f"{row['background_top1']:>17.1%}")  # fmt: skip
    report["context_use"] = use = context_use(pipe, images, captions)
    if use["num_tokens"]:
        print(f"context use ({use['num_tokens']} object tokens of one-object images, each masked alone): right "
              f"{use['own_grid_top1']:.1%}; with the object recoloured, the prediction follows the visible tokens "
              f"{use['recoloured_grid_follows']:.1%}")  # fmt: skip
    report["decoder_attention"] = locality = decoder_attention_locality(
        pipe, ids[:64], captions[:64], torch.Generator().manual_seed(args.seed)
    )
    heads = "; ".join(
        f"layer {i}: " + " ".join(f"{share:.2f}" for share in layer)
        for i, layer in enumerate(locality["neighbour_share"])
    )
    print(f"decoder attention to visible tokens on the 8 neighbours (mask ratio {locality['mask_ratio']}), per head: "
          f"{heads} (uniform: {locality['uniform_share']:.3f})")  # fmt: skip
    if args.train_data:
        train_ids, _, _ = tokenise(pipe, Path(args.train_data), args.num_train_images)
        report["neighbour_baseline_object_top1"] = neighbour_baseline(train_ids, ids, objects, side)
        print(f"8-neighbour lookup baseline, object tokens: {report['neighbour_baseline_object_top1']:.1%} top-1")
    if args.json:
        write_json_atomically(args.json, report)


if __name__ == "__main__":
    main()
