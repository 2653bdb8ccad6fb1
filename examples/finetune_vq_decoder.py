"""Fine-tune the VQ decoder of a text-to-image ENATPipeline on its own transformer's sampling errors.

A masked-token model samples many tokens of a step in parallel, each from its own marginal, so neighbouring tokens of
an edge can disagree: decoded, straight edges come out bumpy and corners rounded. This script teaches the decoder to
map such token grids back to the real image. Every step tokenises real images with the pipeline's (frozen) VQ
encoder, masks a random fraction of each grid (uniform in `[--min_mask_ratio, --max_mask_ratio]`), lets the frozen
transformer fill every masked token in one parallel step (sampled at `--sampling_temperature`, conditioned on the
image's caption), and trains `post_quant_conv` and the decoder to reconstruct the real image from that grid (L1).
`--clean_fraction` of every batch keeps its real tokens, so reconstructions of real images stay as they were.

The encoder, the codebook and the transformer are not changed: the token ids mean what they meant, and the
transformer needs no retraining. The output is a complete pipeline folder (the input's components, the new `vqvae`).

    accelerate launch examples/finetune_vq_decoder.py --pretrained_model_name_or_path pretrained/enat-shapes \\
        --train_data_dir shapes/train --output_dir enat-shapes-robust-decoder --max_train_steps 600

`--resume_from_checkpoint latest` continues an interrupted run exactly (the batches of step `s` depend only on
`--seed` and `s`).
"""

import argparse
import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import VQModel
from torch import nn
from tqdm.auto import tqdm

from enat_diffusers import ENATPipeline
from enat_diffusers.utils.cli import UsageError, add_debug_argument, load_pipeline, run_cli
from enat_diffusers.utils.training import (
    TrainingOutput,
    check_positive,
    checkpoint_step,
    find_resume_checkpoint,
    load_checkpoint,
    load_image,
    make_accelerator,
    read_imagefolder_captions,
    register_training_state,
    save_checkpoint,
    vq_token_ids,
)


logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="a text-to-image ENATPipeline folder")
    parser.add_argument("--train_data_dir", required=True, help="imagefolder split with metadata.jsonl captions")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--output_dir", required=True, help="new pipeline folder (must not exist or be empty)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the VQ model's sample_size")
    parser.add_argument("--max_train_images", type=int, default=None, help="use the first N images only")
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--train_batch_size", type=int, default=32, help="per process")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--min_mask_ratio", type=float, default=0.1)
    parser.add_argument("--max_mask_ratio", type=float, default=0.8)
    parser.add_argument(
        "--sampling_temperature", type=float, default=None, help="default: the pipeline scheduler's setting"
    )
    parser.add_argument("--clean_fraction", type=float, default=0.25, help="rows of a batch that keep real tokens")
    parser.add_argument("--checkpointing_steps", type=int, default=200)
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.min_mask_ratio <= args.max_mask_ratio <= 1 or args.max_mask_ratio == 0:
        raise ValueError(
            f"Need 0 <= --min_mask_ratio <= --max_mask_ratio <= 1 with some masking, got {args.min_mask_ratio} and "
            f"{args.max_mask_ratio}."
        )
    if not 0 <= args.clean_fraction < 1:
        raise ValueError(f"--clean_fraction must be in [0, 1), got {args.clean_fraction}.")
    args.checkpoints_total_limit = 1  # keep the newest checkpoint only: the run is short
    check_positive(args, ("max_train_steps", "train_batch_size", "checkpointing_steps"))
    return args


class TokenDecoder(nn.Module):
    """The trainable half of a VQ model: codebook ids `(B, h, w)` -> images `(B, 3, H, W)`."""

    def __init__(self, vqvae: VQModel):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, ids: torch.LongTensor) -> torch.Tensor:
        shape = (*ids.shape, self.vqvae.config.vq_embed_dim or self.vqvae.config.latent_channels)
        return self.vqvae.decode(ids, force_not_quantize=True, shape=shape).sample


def corrupt(pipe: ENATPipeline, ids, captions, generator, args, temperature) -> torch.LongTensor:
    """Masks a random fraction of each row's tokens and fills them all in one parallel step of the transformer."""
    transformer = pipe.transformer
    batch_size, seq_len = ids.shape
    ratio = args.min_mask_ratio + (args.max_mask_ratio - args.min_mask_ratio) * torch.rand((), generator=generator)
    noisy = pipe.scheduler.add_noise(ids, generator=generator, mask_ratio=ratio.item())
    masked = noisy == transformer.mask_token_id
    text, pooled, _, _ = pipe.encode_prompt(captions, ids.device, do_classifier_free_guidance=False)
    logits = transformer(noisy, encoder_hidden_states=text, pooled_text_embeds=pooled).logits.float()
    if temperature == 0:
        sampled = logits.argmax(-1)
    else:
        probs = F.softmax(logits / temperature, dim=-1).reshape(-1, logits.shape[-1]).cpu()
        sampled = torch.multinomial(probs, 1, generator=generator).reshape(batch_size, seq_len).to(ids.device)
    corrupted = torch.where(masked, sampled, ids)
    num_clean = round(batch_size * args.clean_fraction)
    corrupted[:num_clean] = ids[:num_clean]
    return corrupted


def main(argv=None):
    """The command line: `train(parse_args(argv))`, errors as one line (`--debug`: the traceback)."""
    return run_cli(train, parse_args, argv)


def train(args):
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    resume = find_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    output = TrainingOutput(
        output_dir,
        inputs=[args.pretrained_model_name_or_path, args.train_data_dir],
        resuming=resume is not None,
        writes_pipeline=True,
    )
    try:
        return fine_tune(args, accelerator, output, resume)
    finally:
        output.release()


def fine_tune(args, accelerator, output: TrainingOutput, resume):
    output_dir = output.path
    output.check()
    pipe = load_pipeline(ENATPipeline, args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    pipe = pipe.to(accelerator.device)
    if not pipe.is_text_to_image:
        raise UsageError("The decoder is fine-tuned on captioned images: this needs a text-to-image ENATPipeline.")
    pipe.set_progress_bar_config(disable=True)
    temperature = pipe.scheduler.config.sampling_temperature
    temperature = temperature if args.sampling_temperature is None else args.sampling_temperature
    resolution = args.resolution or pipe.vqvae.config.sample_size
    data = read_imagefolder_captions(Path(args.train_data_dir), args.caption_column)
    num_images = len(data.files) if args.max_train_images is None else min(args.max_train_images, len(data.files))
    if num_images == 0:
        raise ValueError(f"{args.train_data_dir} holds no captioned images.")

    vqvae = pipe.vqvae
    vqvae.requires_grad_(False)
    trained = [*vqvae.post_quant_conv.parameters(), *vqvae.decoder.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    pipe.transformer.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False).eval()
    decoder = TokenDecoder(vqvae)
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0)
    decoder, optimizer = accelerator.prepare(decoder, optimizer)
    register_training_state(accelerator)  # nothing of its own: the batches of step s depend on --seed and s only
    output.start(accelerator)

    first_step = 0
    if resume is not None:
        load_checkpoint(accelerator, resume)
        first_step = checkpoint_step(resume)
        logger.info(f"Resumed from {resume} (step {first_step}).")
    log_path = output_dir / "train_log.csv"
    if accelerator.is_main_process:
        if first_step == 0 or not log_path.exists():
            log_path.write_text("step,loss,corrupted_fraction\n")

    logger.info(
        f"Fine-tuning the VQ decoder on {num_images} images, {args.max_train_steps} steps of "
        f"{args.train_batch_size} x {accelerator.num_processes}, sampling temperature {temperature}."
    )
    progress = tqdm(
        range(first_step, args.max_train_steps),
        initial=first_step,
        total=args.max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="Steps",
    )
    for step in progress:
        # the batch of step `step` on process `rank` depends on nothing else: resuming replays exactly
        generator = torch.Generator().manual_seed(
            args.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index
        )
        indices = torch.randint(0, num_images, (args.train_batch_size,), generator=generator).tolist()
        images = torch.stack([load_image(data.root / data.files[i], resolution) for i in indices])
        images = images.to(accelerator.device, vqvae.dtype)
        captions = [
            data.captions[i][torch.randint(0, len(data.captions[i]), (), generator=generator)] for i in indices
        ]
        with torch.no_grad(), accelerator.autocast():
            ids = vq_token_ids(vqvae, images)
            corrupted = corrupt(pipe, ids, captions, generator, args, temperature)
        with accelerator.autocast():
            grid = round(math.sqrt(ids.shape[1]))
            loss = F.l1_loss(decoder(corrupted.reshape(-1, grid, grid)).float(), images.float())
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()

        done = step + 1
        if accelerator.is_main_process and (done % 10 == 0 or done == args.max_train_steps):
            fraction = (corrupted != ids).float().mean().item()
            with open(log_path, "a", newline="") as file:
                csv.writer(file).writerow([done, loss.item(), fraction])
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if done % args.checkpointing_steps == 0 and done < args.max_train_steps:
            save_checkpoint(accelerator, output_dir, done, args.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe.vqvae = accelerator.unwrap_model(decoder).vqvae.eval().requires_grad_(False)
        output.save(pipe.save_pretrained)
        logger.info(f"Saved the pipeline with the fine-tuned decoder to {output_dir}.")
    accelerator.end_training()


if __name__ == "__main__":
    main()
