# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train a VQ image tokenizer (a diffusers `VQModel`) for a new image domain.

ENAT generates images as grids of VQ token ids; this script trains the tokenizer that maps images to those ids and
back. The result, `OUTPUT_DIR/vqvae/`, is a `VQModel` with `lookup_from_codebook=True`, the form `ENATPipeline`
decodes with (`vqvae.decode(ids, force_not_quantize=True, shape=(B, h, w, vq_embed_dim))`). Images are used in
[0, 1], without normalisation to [-1, 1], as everywhere in enat_diffusers.

Loss: an L1 (or MSE) reconstruction loss plus the commitment/codebook loss that diffusers' `VectorQuantizer` returns
(with the VQ-VAE paper's weighting by default, see `--quantizer_loss`). There is no perceptual (LPIPS) or adversarial
loss: both need pretrained networks that would have to be downloaded, and flat synthetic images do not need them.

Codebook: small codebooks collapse onto a few codes, and on flat images the codes tend to lump the object colours
together. So the first `--quantizer_warmup_steps` steps train a plain autoencoder (no quantization), after which the
codebook is set to k-means centres of the encoder outputs; then every `--codebook_restart_steps` steps the codes that
no image used since the previous check are re-initialised from encoder outputs of the current batch (drawn as
k-means++ seeds, i.e. where the quantisation error is largest). Codebook usage is logged. At the end the model is
evaluated on held-out images through the token-id path the pipeline uses (MSE, PSNR, codebook usage; printed, and
`OUTPUT_DIR/validation_reconstructions.png` shows originals above reconstructions).

Data: `--train_data_dir` is searched recursively for images (an HF `imagefolder` with a `metadata.jsonl` works as
is; the captions are ignored). Files that cannot be read as images are skipped with a warning naming each of them.

Recommended for the Shapes data set: 64x64 images -> 16x16 tokens, 32 codes, 240 k parameters (a 1.0 MB `vqvae/`). Keep
the codebook small when the images are simple: every code is kept in use (k-means initialisation, restarts), so spare
codes split the flat background by its surroundings, and the token a generator must predict for plain background
becomes a guess among many equivalent ids. Measured on Shapes validation images (patches whose 20x20 px neighbourhood
is all background): 256 codes put that background on 80 codes (entropy 3.6 nats; 2.6 nats even given the token's
position), 32 codes on 14 (2.1 nats; 0.8 given the position), while reconstructions still pass ShapesEval on every
image (PSNR 29 dB); `examples/shapes/tokenizer_report.py` measures this. The 1200 steps (batch 16) took 13 minutes on
one CPU thread, with another training job on the second core. Check the colours in `validation_reconstructions.png`:
they are the last thing a VQ model gets right.

    accelerate launch examples/train_vqgan.py \\
        --train_data_dir shapes/train --output_dir vqgan-shapes \\
        --resolution 64 --block_out_channels 16 32 32 --layers_per_block 1 --norm_num_groups 8 \\
        --latent_channels 16 --vq_embed_dim 16 --num_vq_embeddings 32 \\
        --train_batch_size 16 --max_train_steps 1200 --learning_rate 2e-3 --lr_scheduler cosine --lr_warmup_steps 50 \\
        --quantizer_warmup_steps 150 --codebook_restart_steps 25 --checkpointing_steps 400 --seed 0

On a CPU shared with other jobs, `OMP_NUM_THREADS=1` can be faster than 2 threads.

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedDataParallelKwargs
from diffusers import VQModel
from PIL import Image

from enat_diffusers.utils.cli import run_cli
from enat_diffusers.utils.training import (
    TrainingRun,
    add_common_arguments,
    check_positive,
    list_images,
    load_image,
    readable,
    split_held_out,
    training_parser,
)


DATA_HELP = "Folder of training images, searched recursively (an imagefolder's captions are ignored)."


def parse_args(input_args=None):
    parser = training_parser(__doc__, DATA_HELP, captions=False, held_out="images")
    # model
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[16, 32, 32],
        help="Channels of the encoder blocks (the decoder mirrors them); len - 1 = number of 2x downsamplings.",
    )
    parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per encoder block.")
    parser.add_argument("--norm_num_groups", type=int, default=8, help="GroupNorm groups; must divide every width.")
    parser.add_argument("--latent_channels", type=int, default=16, help="Channels of the encoder output.")
    parser.add_argument(
        "--vq_embed_dim", type=int, default=None, help="Dimension of the codebook vectors (default: latent_channels)."
    )
    parser.add_argument("--num_vq_embeddings", type=int, default=256, help="Codebook size (number of token ids).")
    # loss
    parser.add_argument("--reconstruction_loss", choices=["l1", "mse"], default="l1", help="Pixel loss.")
    parser.add_argument(
        "--vq_loss_weight", type=float, default=1.0, help="Weight of the quantizer's commitment/codebook loss."
    )
    parser.add_argument(
        "--quantizer_loss",
        choices=["standard", "legacy"],
        default="standard",
        help="VQ loss weighting: standard = codebook 1 + 0.25 commitment (VQ-VAE paper); legacy = diffusers' default, "
        "commitment 1 + 0.25 codebook.",
    )
    parser.add_argument(
        "--quantizer_warmup_steps",
        type=int,
        default=150,
        help="Train the first N steps as a plain autoencoder (no quantization), then set the codebook to k-means "
        "centres of the encoder outputs. 0: quantize from the first step (the codebook is then initialised after it).",
    )
    parser.add_argument(
        "--codebook_restart_steps",
        type=int,
        default=25,
        help="Every N steps after the warm-up, re-initialise the codes unused since the last check from encoder "
        "outputs of the current batch, drawn as k-means++ seeds (0 disables).",
    )
    parser.add_argument(
        "--codebook_restart_until",
        type=float,
        default=0.9,
        help="Stop restarting codes after this fraction of --max_train_steps, so that the decoder can settle.",
    )
    add_common_arguments(parser, overwrite=True, learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=50)
    parser.set_defaults(max_train_steps=1500, adam_beta2=0.99, adam_weight_decay=0.0, mixed_precision="no")
    parser.set_defaults(output_dir="vqgan-model", checkpointing_steps=250, validation_steps=250)

    args = parser.parse_args(input_args)
    if args.vq_embed_dim is None:
        args.vq_embed_dim = args.latent_channels
    check_positive(args, ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"))
    if not 0 <= args.quantizer_warmup_steps < args.max_train_steps:
        raise ValueError(
            f"--quantizer_warmup_steps must be in [0, --max_train_steps), got {args.quantizer_warmup_steps}: the "
            "codebook is set up when the warm-up ends"
        )
    if args.num_vq_embeddings < 2:
        raise ValueError(f"--num_vq_embeddings must be >= 2, got {args.num_vq_embeddings}")
    downsampling = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % downsampling:
        raise ValueError(
            f"--resolution {args.resolution} is not divisible by {downsampling}, the downsampling factor of "
            f"--block_out_channels {' '.join(map(str, args.block_out_channels))} (len - 1 = "
            f"{len(args.block_out_channels) - 1} halvings)"
        )
    bad_widths = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad_widths:
        raise ValueError(f"--norm_num_groups {args.norm_num_groups} does not divide the widths {bad_widths}")
    return args


def find_images(data_dir: str) -> list[Path]:
    """The readable image files under `data_dir` (recursively, sorted); unreadable ones are skipped with a warning."""
    root = Path(data_dir)
    paths = readable([root / file for file in list_images(root)])
    if not paths:
        raise ValueError(f"no readable images found in {root} (searched recursively)")
    return paths


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images as `(3, resolution, resolution)` float tensors in [0, 1]."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths = paths
        self.resolution = resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.resolution)


def split_images(args) -> (list[Path], list[Path]):
    """Training and held-out image paths; the held-out ones come from a seeded permutation of the training folder
    unless `--validation_data_dir` is given."""
    train_paths = find_images(args.train_data_dir)
    if args.validation_data_dir is not None:
        return train_paths, find_images(args.validation_data_dir)
    return split_held_out(train_paths, args.num_validation_images, args.seed, "image", "--num_validation_images")


def kmeans(latents: torch.Tensor, num_codes: int, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
    """`num_codes` k-means centres of `latents` `(num_vectors, dim)`: k-means++ seeding, then Lloyd iterations."""
    centres = latents[torch.randint(len(latents), (1,), generator=generator).to(latents.device)]
    distances = (latents - centres).square().sum(1)
    for _ in range(num_codes - 1):
        pick = torch.multinomial(distances.cpu() + 1e-12, 1, generator=generator).to(latents.device)
        centres = torch.cat([centres, latents[pick]])
        distances = torch.minimum(distances, (latents - latents[pick]).square().sum(1))
    for _ in range(iterations):
        assignment = torch.cdist(latents, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, latents)
        counts = torch.bincount(assignment, minlength=num_codes)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its seed
    return centres


class CodebookMonitor:
    """
    Codebook statistics and maintenance, through a forward hook on the quantizer.

    The hook keeps the encoder outputs (the quantizer's input, flattened to `(num_vectors, vq_embed_dim)`) and the code
    ids of the latest call. While `quantize` is False (the quantizer warm-up) it passes the encoder outputs through
    unquantized, with no VQ loss: the model trains as a plain autoencoder, so that its latents learn to carry
    everything (with a quantizer from the start, codes tend to lump the object colours together). `update` adds a
    training batch's ids to the per-code counts since the last restart check; `state_dict`/`load_state_dict` let
    accelerate checkpoint them.

    New codes are drawn from encoder outputs with probability proportional to their squared distance to the nearest
    code (k-means++ seeding; Łańcucki et al., "Robust Training of Vector Quantized Bottleneck Models", 2020), so they
    go where the quantisation error is largest: on flat images, the few object patches rather than the background.
    """

    def __init__(self, quantizer: torch.nn.Module, num_codes: int):
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.long)
        self.quantize = True
        self.latents = None
        self.ids = None
        quantizer.register_forward_hook(self._record)

    def _record(self, module, inputs, outputs):
        latents = inputs[0]
        self.latents = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        self.ids = outputs[2][2].detach().reshape(-1)
        if not self.quantize:
            return latents, latents.new_zeros(()), outputs[2]  # the quantizer's outputs: (z_q, loss, info)

    def update(self, ids: torch.Tensor) -> float:
        """Counts `ids`; returns the fraction of the codebook they use."""
        batch_counts = torch.bincount(ids.cpu(), minlength=self.num_codes)
        self.counts += batch_counts
        return (batch_counts > 0).float().mean().item()

    @torch.no_grad()
    def initialise_codebook(self, embedding: torch.nn.Embedding, latents: torch.Tensor, generator, optimizer):
        """Sets the whole codebook to k-means centres of `latents` and resets its AdamW moments and the counts."""
        embedding.weight.copy_(kmeans(latents, self.num_codes, generator).to(embedding.weight.dtype))
        self._reset(embedding, optimizer, torch.arange(self.num_codes, device=embedding.weight.device))

    @torch.no_grad()
    def restart_dead_codes(self, embedding: torch.nn.Embedding, latents: torch.Tensor, generator, optimizer) -> int:
        """Re-initialises every code unused since the last check with a row of `latents`, drawn as k-means++ seeds;
        resets their AdamW moments and the counts. Returns the number of codes restarted."""
        dead = (self.counts == 0).nonzero().squeeze(1).to(embedding.weight.device)
        if len(dead):
            weights = torch.cdist(latents, embedding.weight.float()).amin(dim=1).square().cpu() + 1e-12
            picks = torch.multinomial(weights, len(dead), replacement=len(latents) < len(dead), generator=generator)
            embedding.weight[dead] = latents[picks.to(latents.device)].to(embedding.weight.dtype)
        self._reset(embedding, optimizer, dead)
        return len(dead)

    def _reset(self, embedding, optimizer, codes):
        for moment in optimizer.state.get(embedding.weight, {}).values():
            if moment.shape == embedding.weight.shape:  # exp_avg and exp_avg_sq, not the step counter
                moment[codes] = 0
        self.counts.zero_()

    def state_dict(self):
        return {"counts": self.counts}

    def load_state_dict(self, state_dict):
        counts = state_dict["counts"]
        if counts.shape != self.counts.shape or counts.dtype != self.counts.dtype:
            raise ValueError(f"code counts of shape {tuple(counts.shape)} ({counts.dtype}), expected {self.num_codes}")
        self.counts = counts.clone()


@torch.no_grad()
def evaluate(vqvae: VQModel, dataset: ImageFolderDataset, batch_size: int, device) -> (dict, torch.Tensor):
    """Held-out reconstruction through the token-id path the pipeline uses (encode -> ids -> decode). Returns the
    metrics (MSE, PSNR, codebook usage) and up to 8 (original, reconstruction) pairs as a `(2, n, 3, H, W)` tensor."""
    vqvae.eval()
    squared_error, num_pixels, counts, examples = 0.0, 0, torch.zeros(vqvae.config.num_vq_embeddings), None
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        images = images.to(device, memory_format=torch.channels_last)
        latents = vqvae.encode(images).latents
        ids = vqvae.quantize(latents)[2][2].reshape(latents.shape[0], *latents.shape[2:])  # (B, h, w)
        shape = (*ids.shape, vqvae.config.vq_embed_dim or vqvae.config.latent_channels)
        reconstructions = vqvae.decode(ids, force_not_quantize=True, shape=shape).sample.float().clamp(0, 1)
        squared_error += (reconstructions - images).pow(2).sum().item()
        num_pixels += images.numel()
        counts += torch.bincount(ids.flatten().cpu(), minlength=len(counts))
        if examples is None:
            examples = torch.stack([images[:8], reconstructions[:8]]).cpu()
    vqvae.train()
    mse = squared_error / num_pixels
    probabilities = counts / counts.sum()
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
    metrics = {
        "val/mse": mse,
        "val/psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "val/codebook_usage": (counts > 0).float().mean().item(),
        "val/codebook_perplexity": entropy.exp().item(),
    }
    return metrics, examples


def image_grid(examples: torch.Tensor) -> Image.Image:
    """`(rows, cols, 3, H, W)` tensor in [0, 1] -> one PIL image."""
    rows, cols, _, height, width = examples.shape
    grid = examples.permute(0, 3, 1, 4, 2).reshape(rows * height, cols * width, 3)
    return Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))


def log_validation(vqvae, dataset, args, accelerator, step):
    """Logs the held-out metrics and, to TensorBoard, a grid of originals above their reconstructions."""
    metrics, examples = evaluate(vqvae, dataset, args.train_batch_size, accelerator.device)
    accelerator.log(metrics, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            grid = np.asarray(image_grid(examples))
            tracker.writer.add_image("val/reconstructions", grid, step, dataformats="HWC")


def main(args) -> dict | None:
    """Trains, saves and evaluates; returns the held-out metrics on the main process (None elsewhere)."""
    # during the quantizer warm-up the codebook gets no gradient
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=args.quantizer_warmup_steps > 0)]
    with TrainingRun(args, [args.train_data_dir, args.validation_data_dir], kwargs_handlers=handlers) as run:
        return train(args, run)


def train(args, run: TrainingRun) -> dict | None:
    accelerator = run.accelerator
    train_paths, validation_paths = split_images(args)
    train_dataset = ImageFolderDataset(train_paths, args.resolution)
    validation_dataset = ImageFolderDataset(validation_paths, args.resolution)

    num_blocks = len(args.block_out_channels)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks,
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        vq_embed_dim=args.vq_embed_dim,
        num_vq_embeddings=args.num_vq_embeddings,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
        mid_block_add_attention=False,  # no attention: a purely convolutional tokenizer, as ENAT's
        lookup_from_codebook=True,  # the pipeline decodes token ids
        scaling_factor=1.0,
        force_upcast=False,
    )
    # channels-last convolutions are markedly faster on CPU (and under autocast on GPU)
    vqvae.to(memory_format=torch.channels_last).train()
    # diffusers' quantizer defaults to the "legacy" loss, which weights the commitment term 1 and the codebook term
    # beta = 0.25, the reverse of the VQ-VAE paper; training only reads this flag (encode/decode are unaffected)
    vqvae.quantize.legacy = args.quantizer_loss == "legacy"
    monitor = CodebookMonitor(vqvae.quantize, args.num_vq_embeddings)
    num_parameters = sum(p.numel() for p in vqvae.parameters())

    model, optimizer, train_dataloader, lr_scheduler = run.prepare(vqvae, train_dataset)
    describe = {
        "Training / held-out images": f"{len(train_dataset)} / {len(validation_dataset)}",
        "Parameters": f"{num_parameters / 1e6:.3f} M ({num_parameters * 4 / 2**20:.2f} MiB in fp32)",
    }
    run.start("train_vqgan", describe, codebook_monitor=monitor)  # the monitor: JSON and safetensors, no pickle

    embedding = accelerator.unwrap_model(model).quantize.embedding
    restart_until = args.codebook_restart_until * args.max_train_steps
    for pixel_values in run.batches(train_dataloader):
        pixel_values = pixel_values.to(memory_format=torch.channels_last)
        monitor.quantize = run.global_step >= args.quantizer_warmup_steps
        with accelerator.accumulate(model):
            reconstructions, vq_loss = model(pixel_values, return_dict=False)
            if args.reconstruction_loss == "l1":
                reconstruction_loss = F.l1_loss(reconstructions.float(), pixel_values)
            else:
                reconstruction_loss = F.mse_loss(reconstructions.float(), pixel_values)
            loss = reconstruction_loss + args.vq_loss_weight * vq_loss
            run.optimizer_step(model, loss, optimizer, lr_scheduler)
            batch_usage = monitor.update(accelerator.gather(monitor.ids))
        if not run.step_done():
            continue
        step = run.global_step
        logs = {
            "loss": accelerator.gather(loss.detach()).mean().item(),
            "reconstruction_loss": accelerator.gather(reconstruction_loss.detach()).mean().item(),
            "vq_loss": accelerator.gather(vq_loss.detach()).mean().item(),
            "codebook_usage": batch_usage,
            "lr": lr_scheduler.get_last_lr()[0],
        }
        initialise = step == max(args.quantizer_warmup_steps, 1)
        restart = (
            args.codebook_restart_steps
            and step % args.codebook_restart_steps == 0
            and args.quantizer_warmup_steps < step <= restart_until
        )
        if initialise or restart:
            # the same latents and generator on every process keep the codebook replicas identical
            latents = accelerator.gather(monitor.latents)
            generator = torch.Generator().manual_seed(args.seed + step)
            if initialise:
                monitor.initialise_codebook(embedding, latents, generator, optimizer)
            else:
                logs["restarted_codes"] = monitor.restart_dead_codes(embedding, latents, generator, optimizer)
        run.progress.set_postfix(loss=f"{logs['loss']:.4f}", usage=f"{batch_usage:.2f}")
        accelerator.log(logs, step=step)
        run.save_checkpoint_if_due()
        if run.validation_due():
            log_validation(accelerator.unwrap_model(model), validation_dataset, args, accelerator, step)

    accelerator.wait_for_everyone()
    metrics = None
    if accelerator.is_main_process:
        vqvae = accelerator.unwrap_model(model)
        metrics, examples = evaluate(vqvae, validation_dataset, args.train_batch_size, accelerator.device)
        accelerator.log(metrics, step=run.global_step)

        def save(staging):
            vqvae.save_pretrained(staging / "vqvae")
            image_grid(examples).save(staging / "validation_reconstructions.png")

        run.output.save(save)
        accelerator.print(
            f"Held-out reconstruction ({len(validation_dataset)} images): MSE {metrics['val/mse']:.6f}, PSNR "
            f"{metrics['val/psnr']:.2f} dB, codebook usage {metrics['val/codebook_usage']:.1%} of "
            f"{args.num_vq_embeddings} codes (perplexity {metrics['val/codebook_perplexity']:.1f}). The VQ model is "
            f"in {run.output_dir}/vqvae."
        )
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args)
