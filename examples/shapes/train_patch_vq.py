# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train the Shapes tokenizer whose token ids spell the pixels of their own patch (a diffusers `VQModel`).

Every 4x4 patch of a Shapes image is plain background, or one flat palette colour over a binary mask of the patch's
16 pixels (objects never overlap, and no patch of the data set holds two colours). The token id of a patch is that
pair: id 0 for plain background, and one id per (colour, mask) for the `--num_masks` masks that are most frequent in
the training images (97 % of all patches with 32 masks, 99 % with 64); a rarer mask takes the id of the nearest
frequent one (fewest differing pixels). So an id is a function of the 16 pixels of its patch and of nothing else,
and a patch reconstructs from its id alone.

A tokenizer trained with the usual VQ losses learns its ids itself, and on these images they come out non-local: the
encoder's GroupNorm layers normalise by image-wide statistics, and adding an object on the right changes many ids on
the left (`examples/shapes/tokenizer_report.py` measures it). A generator must then predict ids that its inputs do
not determine. Here the ids are fixed first, and the `VQModel` is trained to them:
- the decoder (with `post_quant_conv` and the codebook vectors) reconstructs the image from the codebook vectors of
  the patch ids (L1 loss);
- the encoder learns to put each patch's latent nearest to its id's codebook vector (cross-entropy over the negative
  squared distances to every code, the quantizer's own nearest-code rule).

The result, `OUTPUT_DIR/vqvae/`, is an ordinary `VQModel` with `lookup_from_codebook=True`: `encode` + `quantize` give
the patch ids (the held-out accuracy is printed), and `ENATPipeline` decodes them as any VQ model's. The mask list is
written to `OUTPUT_DIR/patch_codes.json`.

    accelerate launch examples/shapes/train_patch_vq.py --train_data_dir shapes/train \\
        --validation_data_dir shapes/validation --output_dir patch-vq --num_masks 48 --train_batch_size 32 \\
        --max_train_steps 1000 --learning_rate 3e-3

On the 30,000-image Shapes split this gives 241 ids, 99.4-99.5 % of held-out patches encoded to their id and
28.7-30.6 dB PSNR through them (about 6 minutes on 2 threads), and reconstructions that pass ShapesEval 99.5-99.8 % of
the time (seeds 0 and 1, 1 and 2 threads). The shipped Shapes model was trained with 600 steps (27.8 dB); with so
few, small triangles can come out in the wrong colour and small squares round, depending on the seed and the CPU.
`make train-demo` uses this command; how ENAT fares on these ids against learned ones is in
docs/shapes-model-experiments.md ("Ids that spell their patch" and after).

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import VQModel

from enat_diffusers.data.shapes import BACKGROUND, COLOURS
from enat_diffusers.utils.cli import UsageError, run_cli
from enat_diffusers.utils.training import (
    TrainingRun,
    add_common_arguments,
    check_positive,
    training_parser,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_vqgan import ImageFolderDataset, find_images, image_grid  # noqa: E402


PATCH = 4  # pixels per token side: 64x64 images -> 16x16 tokens
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def patch_masks_and_colours(images: np.ndarray) -> (np.ndarray, np.ndarray):
    """`images` `(N, H, W, 3)` uint8 -> `(masks, colours)`, each `(N, H/4 * W/4)` in raster order: the 16-bit mask of
    the non-background pixels of each patch (bit `4 * row + column`), and the palette index of the patch's colour
    (nearest palette colour to the mean of its non-background pixels; 0 where the patch is plain background)."""
    n, height, width, _ = images.shape
    side_y, side_x = height // PATCH, width // PATCH
    patches = images.reshape(n, side_y, PATCH, side_x, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, side_y * side_x, PATCH * PATCH, 3)
    foreground = (patches != np.array(BACKGROUND, dtype=images.dtype)).any(-1)  # (N, L, 16)
    masks = (foreground.astype(np.int64) << np.arange(PATCH * PATCH)).sum(-1)
    counts = foreground.sum(-1, keepdims=True)
    mean = (patches.astype(np.float32) * foreground[..., None]).sum(2) / np.maximum(counts, 1)
    colours = np.square(mean[:, :, None, :] - PALETTE).sum(-1).argmin(-1)
    return masks, np.where(masks > 0, colours, 0)


def frequent_masks(masks: np.ndarray, num_masks: int) -> np.ndarray:
    """The `num_masks` most frequent non-empty masks of `masks` (ties: the smaller mask value first)."""
    values, counts = np.unique(masks[masks > 0], return_counts=True)
    order = np.lexsort((values, -counts))
    return values[order[:num_masks]]


class PatchCodes:
    """The id of a patch: 0 for plain background, `1 + colour * num_masks + k` for colour index `colour` (order of
    `COLOURS`) over mask `masks[k]`, or over the mask of `masks` nearest to its own (fewest differing pixels, then the
    more frequent: `masks` is sorted by frequency)."""

    def __init__(self, masks):
        self.masks = np.asarray(masks, dtype=np.int64)
        self._nearest = {int(m): k for k, m in enumerate(self.masks)}

    @property
    def num_codes(self) -> int:
        return 1 + len(PALETTE) * len(self.masks)

    def mask_index(self, mask: int) -> int:
        if mask not in self._nearest:
            distances = [bin(mask ^ int(m)).count("1") for m in self.masks]
            self._nearest[mask] = int(np.argmin(distances))
        return self._nearest[mask]

    def ids(self, images: np.ndarray) -> np.ndarray:
        """`(N, H, W, 3)` uint8 images -> `(N, H/4 * W/4)` patch ids."""
        masks, colours = patch_masks_and_colours(images)
        values, inverse = np.unique(masks, return_inverse=True)
        index = np.array([self.mask_index(int(v)) for v in values], dtype=np.int64)[inverse.reshape(masks.shape)]
        return np.where(masks > 0, 1 + colours * len(self.masks) + index, 0)


def parse_args(input_args=None):
    data_help = "A Shapes imagefolder (captions are ignored)."
    parser = training_parser(__doc__, data_help, captions=False, held_out="images")
    parser.add_argument("--num_masks", type=int, default=48, help="Patch masks with ids of their own (%(default)s).")
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[16, 32, 32],
        help="Channels of the encoder blocks (the decoder mirrors them); 3 blocks: 4x4 patches.",
    )
    parser.add_argument("--latent_channels", type=int, default=16, help="Encoder output and codebook dimension.")
    parser.add_argument("--id_loss_weight", type=float, default=1.0, help="Weight of the encoder's id loss.")
    add_common_arguments(parser, overwrite=True, learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=50)
    parser.set_defaults(max_train_steps=800, train_batch_size=32, adam_beta2=0.99, adam_weight_decay=0.0)
    parser.set_defaults(output_dir="patch-vq", checkpointing_steps=200, validation_steps=200, mixed_precision="no")
    args = parser.parse_args(input_args)
    check_positive(args, ("num_masks", "max_train_steps", "train_batch_size", "checkpointing_steps"))
    if len(args.block_out_channels) != 3:
        raise ValueError(
            f"--block_out_channels needs 3 widths (two 2x downsamplings: one token per 4x4 patch), got "
            f"{args.block_out_channels}"
        )
    if args.resolution % PATCH:
        raise ValueError(f"--resolution must be a multiple of {PATCH}, got {args.resolution}")
    return args


def load_images(dataset: ImageFolderDataset, limit=None) -> np.ndarray:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    pixels = torch.stack([dataset[i] for i in range(count)])
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


class PatchIdDataset(torch.utils.data.Dataset):
    """(image in [0, 1], its patch ids) pairs."""

    def __init__(self, images: np.ndarray, ids: np.ndarray):
        self.images, self.ids = images, torch.from_numpy(ids)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 255, self.ids[index]


def code_logits(vqvae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Negative squared distances `(B * h * w, num_codes)` of the quantizer's inputs (`quant_conv` applied) to the
    codebook vectors: the quantizer picks the argmax."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    codebook = vqvae.quantize.embedding.weight
    return 2 * flat @ codebook.T - flat.square().sum(1, keepdim=True) - codebook.square().sum(1)


def decode_ids(vqvae: VQModel, ids: torch.Tensor) -> torch.Tensor:
    side = int(math.isqrt(ids.shape[1]))
    shape = (ids.shape[0], side, side, vqvae.config.vq_embed_dim)
    return vqvae.decode(ids.reshape(-1, side, side), force_not_quantize=True, shape=shape).sample


@torch.no_grad()
def evaluate(vqvae: VQModel, dataset: PatchIdDataset, batch_size: int) -> (dict, torch.Tensor):
    """Held-out: the share of patches whose encoded id is their patch id, and the reconstruction through the encoded
    ids (MSE, PSNR); with up to 8 (original, reconstruction) pairs."""
    vqvae.eval()
    right = total = 0
    squared_error, examples = 0.0, None
    for start in range(0, len(dataset), batch_size):
        images, ids = map(torch.stack, zip(*[dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]))
        encoded = vqvae.quantize(vqvae.encode(images).latents)[2][2].reshape(len(images), -1)
        right += (encoded == ids).sum().item()
        total += ids.numel()
        reconstructions = decode_ids(vqvae, encoded).clamp(0, 1)
        squared_error += (reconstructions - images).square().sum().item()
        if examples is None:
            examples = torch.stack([images[:8], reconstructions[:8]])
    vqvae.train()
    mse = squared_error / (len(dataset) * dataset[0][0].numel())
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    return {"val/id_accuracy": right / total, "val/mse": mse, "val/psnr": psnr}, examples


def main(args):
    with TrainingRun(args, [args.train_data_dir, args.validation_data_dir]) as run:
        return train(args, run)


def train(args, run: TrainingRun):
    accelerator = run.accelerator
    if accelerator.num_processes > 1:
        raise UsageError(
            f"train_patch_vq.py trains in one process (got {accelerator.num_processes}): its losses call the "
            "VQModel's encoder and decoder directly, which would not synchronise gradients across processes"
        )
    train_images = load_images(ImageFolderDataset(find_images(args.train_data_dir), args.resolution))
    validation_dir = args.validation_data_dir or args.train_data_dir
    validation_images = load_images(ImageFolderDataset(find_images(validation_dir), args.resolution), 512)
    masks, _ = patch_masks_and_colours(train_images)
    codes = PatchCodes(frequent_masks(masks, args.num_masks))
    exact = np.isin(masks, np.append(codes.masks, 0)).mean()
    accelerator.print(f"{codes.num_codes} ids; {exact:.2%} of the training patches have a mask of their own")
    train_dataset = PatchIdDataset(train_images, codes.ids(train_images))
    validation_dataset = PatchIdDataset(validation_images, codes.ids(validation_images))

    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=args.block_out_channels,
        layers_per_block=1,
        latent_channels=args.latent_channels,
        vq_embed_dim=args.latent_channels,
        num_vq_embeddings=codes.num_codes,
        norm_num_groups=8,
        sample_size=args.resolution,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        scaling_factor=1.0,
        force_upcast=False,
    )
    model, optimizer, dataloader, lr_scheduler = run.prepare(vqvae, train_dataset)
    describe = {"Training / held-out images": f"{len(train_dataset)} / {len(validation_dataset)}"}
    run.start("train_patch_vq", describe)
    # the losses call encode/decode/quantize separately, outside the wrapper's forward: one process only
    vq = accelerator.unwrap_model(model)
    for images, ids in run.batches(dataloader):
        with accelerator.accumulate(model):
            latents = vq.encode(images).latents
            id_loss = F.cross_entropy(code_logits(vq, latents), ids.reshape(-1))
            reconstruction_loss = F.l1_loss(decode_ids(vq, ids), images)
            loss = reconstruction_loss + args.id_loss_weight * id_loss
            run.optimizer_step(model, loss, optimizer, lr_scheduler)
        if not run.step_done():
            continue
        logs = {"loss": loss.item(), "id_loss": id_loss.item(), "reconstruction_loss": reconstruction_loss.item()}
        run.progress.set_postfix(id_loss=f"{id_loss.item():.4f}", l1=f"{reconstruction_loss.item():.4f}")
        accelerator.log(logs, step=run.global_step)
        run.save_checkpoint_if_due()
        if run.validation_due():
            metrics, _ = evaluate(accelerator.unwrap_model(model), validation_dataset, args.train_batch_size)
            accelerator.log(metrics, step=run.global_step)
            accelerator.print(f"step {run.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    vqvae = accelerator.unwrap_model(model)
    metrics, examples = evaluate(vqvae, validation_dataset, args.train_batch_size)

    def save(staging):
        vqvae.save_pretrained(staging / "vqvae")
        image_grid(examples).save(staging / "validation_reconstructions.png")
        record = {"patch": PATCH, "colours": list(COLOURS), "masks": codes.masks.tolist(), **metrics}
        (staging / "patch_codes.json").write_text(json.dumps(record, indent=1) + "\n")

    run.output.save(save)
    accelerator.print(
        f"Held-out ({len(validation_dataset)} images): encoded ids right {metrics['val/id_accuracy']:.2%}, PSNR "
        f"{metrics['val/psnr']:.2f} dB through them. The VQ model is in {run.output_dir}/vqvae."
    )
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args)
