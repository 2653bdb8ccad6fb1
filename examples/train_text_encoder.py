# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train a small CLIP text encoder for a new domain, contrastively on (image, caption) pairs.

A text-to-image ENAT model is conditioned on a text encoder: its projected pooled embedding (`text_embeds`) is the
adaLN condition and its `last_hidden_state` gives the text tokens. For a domain far from web images (such as the
synthetic Shapes data set) a small CLIP trained from scratch is enough and cheap. This script trains a
transformers `CLIPModel` (a small text transformer and a tiny ViT) with CLIP's contrastive loss and saves the text
tower for the pipeline:

- `OUTPUT_DIR/text_encoder/`: a `CLIPTextModelWithProjection` (the text transformer and `text_projection` of the
  trained model; the script checks that its outputs equal the trained model's text features);
- `OUTPUT_DIR/tokenizer/`: the real CLIP tokenizer (`enat_diffusers.build_clip_tokenizer`, built offline) with
  `model_max_length = --max_length`, which is also the text encoder's number of positions.

Captions are tokenized as the pipeline does: padded to `--max_length` with `<|endoftext|>`, no attention mask.

Data: an HF `imagefolder` with captions, i.e. `DIR/metadata.jsonl` with one `{"file_name": ..., "text": ...}` line
per image (`file_name` relative to DIR). Images that cannot be read are skipped with a warning naming each of them.
At the end the held-out pairs are scored by retrieval: top-1 accuracy of caption -> image (and image -> caption)
among `--validation_batch_size` candidates; a retrieved item with the very same caption counts as a hit. The scores
are written to `OUTPUT_DIR/held_out_retrieval.json`, and `--min_held_out_retrieval` makes a weak encoder an error.

Plain contrastive training learns a bag of words: among random in-batch negatives, "a red circle on the left and a
blue square on the right" and the same caption with the positions (or colours) swapped almost never compete, so
their embeddings end up nearly equal. `--hard_negative_weight` adds NegCLIP's word-swap hard negatives
(`WordSwapNegatives`, on by default), which teach word order and attribute binding; the final report measures it.

Recommended for the Shapes data set: 3.27 M parameters (a 13.1 MB `text_encoder/`, nearly all of it the 49408 x 64
token embedding) and a 3.6 MB `tokenizer/`; a step costs about 0.25 s of one CPU core, so 2000 steps take roughly
5-9 minutes on 2 cores.

    accelerate launch examples/train_text_encoder.py \\
        --train_data_dir shapes/train --output_dir clip-shapes --max_length 32 \\
        --text_hidden_size 64 --text_num_layers 2 --text_num_heads 4 --projection_dim 64 \\
        --vision_hidden_size 64 --vision_num_layers 2 --vision_num_heads 4 --resolution 64 --patch_size 8 \\
        --train_batch_size 64 --max_train_steps 2000 --learning_rate 2e-3 --lr_warmup_steps 100 \\
        --hard_negative_weight 1.0 --seed 0

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`.
"""

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection

from enat_diffusers import build_clip_tokenizer
from enat_diffusers.utils.cli import UsageError, run_cli
from enat_diffusers.utils.training import (
    TrainingRun,
    add_common_arguments,
    check_positive,
    load_image,
    read_imagefolder_captions,
    readable,
    split_held_out,
    training_parser,
)


logger = get_logger(__name__)
DATA_HELP = 'An imagefolder with captions: DIR/metadata.jsonl lines {"file_name": ..., "text": ...}.'


# the sizes of the two towers: the text one is kept, the vision one discarded after training
TOWER_SIZES = {
    "text_hidden_size": (64, "Width of the text transformer."),
    "text_num_layers": (2, "Layers of the text transformer."),
    "text_num_heads": (4, "Attention heads of the text transformer."),
    "text_intermediate_size": (None, "MLP width of the text transformer (default 4x)."),
    "projection_dim": (64, "Size of the projected (pooled) embedding."),
    "vision_hidden_size": (64, "Width of the ViT."),
    "vision_num_layers": (2, "Layers of the ViT."),
    "vision_num_heads": (4, "Attention heads of the ViT."),
    "patch_size": (8, "ViT patch size; must divide --resolution."),
}


def parse_args(input_args=None):
    parser = training_parser(__doc__, DATA_HELP, captions=True, held_out="pairs")
    parser.add_argument(
        "--validation_batch_size",
        type=int,
        default=64,
        help="Number of candidates among which retrieval accuracy is measured.",
    )
    # text tower (kept)
    parser.add_argument(
        "--max_length",
        type=int,
        default=77,
        help="Token length of the padded captions: tokenizer.model_max_length and the encoder's positions.",
    )
    for name, (default, help) in TOWER_SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=help)
    parser.add_argument(
        "--hard_negative_weight",
        type=float,
        default=1.0,
        help="Weight of the word-swap hard-negative loss (NegCLIP): each image must prefer its caption over the "
        "caption with two words of one kind swapped. Teaches word order and attribute binding; 0: plain CLIP.",
    )
    parser.add_argument(
        "--min_held_out_retrieval",
        type=float,
        default=None,
        help="Fail (exit status 1) when the final held-out caption -> image top-1 is below this fraction; the "
        "encoder and OUTPUT_DIR/held_out_retrieval.json are still written. A weak text encoder caps every "
        "text-to-image model trained on it, so a pipeline stops here rather than after the transformer's training.",
    )
    add_common_arguments(parser, overwrite=True, learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=100)
    parser.set_defaults(train_batch_size=64, max_train_steps=2000, adam_beta2=0.98, adam_epsilon=1e-6)
    parser.set_defaults(
        mixed_precision="no", output_dir="clip-model", checkpointing_steps=1000, num_validation_pairs=256
    )

    args = parser.parse_args(input_args)
    if args.text_intermediate_size is None:
        args.text_intermediate_size = 4 * args.text_hidden_size
    check_positive(args, ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"))
    if args.train_batch_size < 2 or args.validation_batch_size < 2:
        raise ValueError("contrastive training and retrieval need batches of at least 2 pairs")
    if args.resolution % args.patch_size:
        raise ValueError(f"--patch_size {args.patch_size} does not divide --resolution {args.resolution}")
    for tower in ("text", "vision"):
        hidden, heads = getattr(args, f"{tower}_hidden_size"), getattr(args, f"{tower}_num_heads")
        if hidden % heads:
            raise ValueError(f"--{tower}_hidden_size {hidden} is not divisible by --{tower}_num_heads {heads}")
    if args.min_held_out_retrieval is not None and not 0 < args.min_held_out_retrieval <= 1:
        raise ValueError(f"--min_held_out_retrieval must be in (0, 1], got {args.min_held_out_retrieval}")
    if args.max_length < 3:
        raise ValueError(f"--max_length must hold at least the bos and eos tokens and one word, got {args.max_length}")
    return args


def read_pairs(data_dir: str, caption_column: str) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of an imagefolder's `metadata.jsonl` (one per caption); unreadable images are
    skipped with a warning."""
    data = read_imagefolder_captions(Path(data_dir), caption_column)
    paths = set(readable(data.paths()))
    pairs = [
        (path, text.strip()) for path, texts in zip(data.paths(), data.captions) if path in paths for text in texts
    ]
    if not pairs:
        raise ValueError(f"no readable (image, caption) pairs in {data_dir}")
    return pairs


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items `{"pixel_values": (3, resolution, resolution) in [0, 1], "input_ids": (max_length,), "caption": str}`; the
    captions are tokenized once, as the pipeline does (padded to `max_length`, truncated)."""

    def __init__(self, pairs: list[tuple[Path, str]], tokenizer, resolution: int):
        self.paths = [path for path, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        self.resolution = resolution
        self.input_ids = tokenizer(
            self.captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        lengths = [len(ids) for ids in tokenizer(self.captions).input_ids]
        too_long = [caption for caption, length in zip(self.captions, lengths) if length > tokenizer.model_max_length]
        if too_long:
            logger.warning(
                f"{len(too_long)} captions are longer than --max_length {tokenizer.model_max_length} tokens and are "
                f"truncated, e.g. {too_long[0]!r} ({max(lengths)} tokens is the longest)"
            )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return {
            "pixel_values": load_image(self.paths[index], self.resolution),
            "input_ids": self.input_ids[index],
            "caption": self.captions[index],
        }


def split_pairs(args) -> (list, list):
    """Training and held-out pairs; the held-out ones come from a seeded permutation of the training folder unless
    `--validation_data_dir` is given."""
    train_pairs = read_pairs(args.train_data_dir, args.caption_column)
    if args.validation_data_dir is not None:
        return train_pairs, read_pairs(args.validation_data_dir, args.caption_column)
    return split_held_out(train_pairs, args.num_validation_pairs, args.seed, "pair", "--num_validation_pairs")


class WordSwapNegatives:
    """
    Hard-negative captions made by swapping two words of the same kind, as in NegCLIP (Yuksekgonul et al., "When and
    why vision-language models behave like bags-of-words", ICLR 2023): "a red circle on the left and a blue square on
    the right" -> "... on the right and ... on the left" (or "a blue circle ... a red square ..."). An in-batch
    contrastive loss rarely meets such pairs, so without them the embedding tends to ignore word order.

    The kinds are induced from the training captions, with no tagger: two words are of one kind when they occur
    between the same neighbours somewhere ("red" and "blue" both in "small _ circle"). A caption with no two different
    words of one kind (a single object, say) has no negative. A swap can occasionally give an equivalent caption ("a
    cat and a dog"); NegCLIP accepts that noise.
    """

    def __init__(self, captions: list[str]):
        slots = defaultdict(set)  # (previous word, next word) -> the words seen between them
        for caption in captions:
            words = ["<s>", *caption.split(), "</s>"]
            for previous, word, following in zip(words, words[1:], words[2:]):
                slots[(previous, following)].add(word)
        self.same_kind = defaultdict(set)
        for words in slots.values():
            for word in words:
                self.same_kind[word] |= words - {word}

    def swaps(self, caption: str) -> list[tuple[int, int]]:
        """Word-index pairs `(i, j)` of `caption` that hold two different words of one kind."""
        words = caption.split()
        return [
            (i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[j] in self.same_kind[words[i]]
        ]

    def sample(self, caption: str, generator: torch.Generator) -> str | None:
        """`caption` with one random swap applied, or None if it has none."""
        swaps = self.swaps(caption)
        if not swaps:
            return None
        i, j = swaps[torch.randint(len(swaps), (1,), generator=generator).item()]
        words = caption.split()
        words[i], words[j] = words[j], words[i]
        return " ".join(words)


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss over a square `(batch, batch)` similarity matrix, as `CLIPModel(...,
    return_loss=True)` computes it; written out so that hard-negative captions can share the forward pass."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


def hard_negative_loss(logits_per_text: torch.Tensor, with_negative: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy: image `with_negative[k]` against its caption (row `with_negative[k]`) and its negative
    caption (row `batch + k`) of the `(batch + num_negatives, batch)` similarity matrix."""
    batch_size = logits_per_text.shape[1]
    rows = torch.arange(len(with_negative), device=logits_per_text.device)
    positive = logits_per_text[with_negative, with_negative]
    negative = logits_per_text[batch_size + rows, with_negative]
    pair_logits = torch.stack([positive, negative], dim=1)  # (num_negatives, 2)
    return F.cross_entropy(pair_logits, torch.zeros_like(rows))


def add_negatives(input_ids, captions, negatives: WordSwapNegatives, tokenizer, generator):
    """Appends the tokenized hard negatives of `captions` to `input_ids`; returns the texts `(batch + num_negatives,
    max_length)` and the indices of the captions that have a negative."""
    samples = [negatives.sample(caption, generator) for caption in captions]
    with_negative = [i for i, sample in enumerate(samples) if sample is not None]
    if with_negative:
        negative_ids = tokenizer(
            [samples[i] for i in with_negative],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        input_ids = torch.cat([input_ids, negative_ids.to(input_ids.device)])
    return input_ids, torch.tensor(with_negative, dtype=torch.long, device=input_ids.device)


def build_clip(args, tokenizer) -> CLIPModel:
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": args.text_hidden_size,
        "intermediate_size": args.text_intermediate_size,
        "num_hidden_layers": args.text_num_layers,
        "num_attention_heads": args.text_num_heads,
        "max_position_embeddings": args.max_length,
        "projection_dim": args.projection_dim,
        # pooling reads the first eos position; pad == eos (the first occurrence is the real one)
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": args.vision_hidden_size,
        "intermediate_size": 4 * args.vision_hidden_size,
        "num_hidden_layers": args.vision_num_layers,
        "num_attention_heads": args.vision_num_heads,
        "image_size": args.resolution,
        "patch_size": args.patch_size,
        "projection_dim": args.projection_dim,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)
    return CLIPModel(config)


def extract_text_encoder(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The text transformer and text projection of `clip` as a standalone `CLIPTextModelWithProjection`."""
    text_config = clip.config.text_config
    text_config.projection_dim = clip.config.projection_dim
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder.text_model.load_state_dict(clip.text_model.state_dict())
    text_encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return text_encoder.eval()


@torch.no_grad()
def check_text_encoder(text_encoder: CLIPTextModelWithProjection, clip: CLIPModel, input_ids: torch.Tensor):
    """Raises if the extracted text encoder does not reproduce the CLIP model's text features."""
    clip_outputs = clip.text_model(input_ids=input_ids)
    outputs = text_encoder(input_ids=input_ids)
    for name, expected, actual in [
        ("text_embeds", clip.text_projection(clip_outputs.pooler_output), outputs.text_embeds),
        ("last_hidden_state", clip_outputs.last_hidden_state, outputs.last_hidden_state),
    ]:
        if not torch.allclose(expected, actual, atol=1e-5, rtol=1e-5):
            raise RuntimeError(f"the extracted text encoder's {name} differs from the CLIP model's")


@torch.no_grad()
def evaluate(
    clip: CLIPModel, dataset: ImageCaptionDataset, batch_size: int, negatives: WordSwapNegatives, tokenizer, device
) -> dict:
    """Held-out scores, over consecutive groups of `batch_size` pairs (a last group smaller than 2 is dropped):

    - retrieval: top-1 accuracy caption -> image and image -> caption within a group; a retrieved item whose caption
      equals the query's counts as a hit (equal captions are indistinguishable);
    - word order: how often an image prefers its caption to the caption with two words swapped (`WordSwapNegatives`,
      fixed seed), over the pairs that have such a negative.
    """
    clip.eval()
    text_hits, image_hits, total, order_hits, order_total = 0, 0, 0, 0, 0
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(dataset) - 1, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        if len(items) < 2:
            break
        captions = [item["caption"] for item in items]
        pixel_values = torch.stack([item["pixel_values"] for item in items]).to(device) * 2 - 1
        input_ids = torch.stack([item["input_ids"] for item in items]).to(device)
        input_ids, with_negative = add_negatives(input_ids, captions, negatives, tokenizer, generator)
        logits = clip(input_ids=input_ids, pixel_values=pixel_values).logits_per_text.float()
        logits_per_text, negative_logits = logits[: len(items)], logits[len(items) :]
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device)
        rows = torch.arange(len(items), device=device)
        text_hits += same[rows, logits_per_text.argmax(1)].sum().item()
        image_hits += same[rows, logits_per_text.argmax(0)].sum().item()
        total += len(items)
        positive = logits_per_text[with_negative, with_negative]
        order_hits += (positive > negative_logits[torch.arange(len(with_negative)), with_negative]).sum().item()
        order_total += len(with_negative)
    clip.train()
    return {
        "val/text_to_image_top1": text_hits / max(total, 1),
        "val/image_to_text_top1": image_hits / max(total, 1),
        "val/word_order_accuracy": order_hits / max(order_total, 1),
    }


def main(args) -> dict | None:
    """Trains, saves and evaluates; returns the held-out metrics on the main process (None elsewhere)."""
    with TrainingRun(args, [args.train_data_dir, args.validation_data_dir]) as run:
        return train(args, run)


def train(args, run: TrainingRun) -> dict | None:
    accelerator = run.accelerator
    train_pairs, validation_pairs = split_pairs(args)
    tokenizer = build_clip_tokenizer(model_max_length=args.max_length)
    train_dataset = ImageCaptionDataset(train_pairs, tokenizer, args.resolution)
    validation_dataset = ImageCaptionDataset(validation_pairs, tokenizer, args.resolution)
    negatives = WordSwapNegatives(train_dataset.captions)

    clip = build_clip(args, tokenizer)
    clip.train()
    num_text_parameters = sum(p.numel() for p in clip.text_model.parameters()) + clip.text_projection.weight.numel()
    model, optimizer, train_dataloader, lr_scheduler = run.prepare(clip, train_dataset)
    describe = {
        "Training / held-out pairs": f"{len(train_dataset)} / {len(validation_dataset)}",
        "Text encoder parameters": f"{num_text_parameters / 1e6:.3f} M",
    }
    run.start("train_text_encoder", describe)  # the run's randomness depends on --seed and the step only

    for batch in run.batches(train_dataloader):
        input_ids, with_negative = batch["input_ids"], None
        if args.hard_negative_weight:
            generator = torch.Generator().manual_seed(args.seed + run.global_step)
            input_ids, with_negative = add_negatives(input_ids, batch["caption"], negatives, tokenizer, generator)
        with accelerator.accumulate(model):
            # the vision tower sees the [0, 1] images centred to [-1, 1]
            outputs = model(input_ids=input_ids, pixel_values=batch["pixel_values"] * 2 - 1)
            batch_size = len(batch["input_ids"])
            loss = contrastive_loss(outputs.logits_per_text[:batch_size])
            if with_negative is not None and len(with_negative):
                loss = loss + args.hard_negative_weight * hard_negative_loss(outputs.logits_per_text, with_negative)
            run.optimizer_step(model, loss, optimizer, lr_scheduler)
        if not run.step_done():
            continue
        logits = outputs.logits_per_text[:batch_size].detach()
        batch_accuracy = (logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
        logs = {
            "loss": accelerator.gather(loss.detach()).mean().item(),
            "batch_text_to_image_top1": accelerator.gather(batch_accuracy).mean().item(),
            "logit_scale": accelerator.unwrap_model(model).logit_scale.exp().item(),
            "lr": lr_scheduler.get_last_lr()[0],
        }
        run.progress.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['batch_text_to_image_top1']:.2f}")
        accelerator.log(logs, step=run.global_step)
        run.save_checkpoint_if_due()
        if run.validation_due():
            clip = accelerator.unwrap_model(model)
            metrics = evaluate(
                clip, validation_dataset, args.validation_batch_size, negatives, tokenizer, accelerator.device
            )
            accelerator.log(metrics, step=run.global_step)

    accelerator.wait_for_everyone()
    metrics = None
    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(model).eval()
        text_encoder = extract_text_encoder(clip).to(accelerator.device)
        check_text_encoder(
            text_encoder, clip, validation_dataset.input_ids[: args.validation_batch_size].to(accelerator.device)
        )

        metrics = evaluate(
            clip, validation_dataset, args.validation_batch_size, negatives, tokenizer, accelerator.device
        )
        accelerator.log(metrics, step=run.global_step)

        def save(staging):
            text_encoder.save_pretrained(staging / "text_encoder")
            tokenizer.save_pretrained(staging / "tokenizer")
            (staging / "held_out_retrieval.json").write_text(json.dumps(metrics, indent=2) + "\n")

        run.output.save(save)
        accelerator.print(
            f"Held-out retrieval ({len(validation_dataset)} pairs, top-1 among {args.validation_batch_size}): caption "
            f"-> image {metrics['val/text_to_image_top1']:.1%}, image -> caption "
            f"{metrics['val/image_to_text_top1']:.1%}; an image prefers its caption to a word-swapped one "
            f"{metrics['val/word_order_accuracy']:.1%} of the time. The text encoder and tokenizer are in "
            f"{run.output_dir}."
        )
        minimum = args.min_held_out_retrieval
        if minimum is not None and metrics["val/text_to_image_top1"] < minimum:
            raise UsageError(
                f"Held-out caption -> image retrieval is {metrics['val/text_to_image_top1']:.1%}, below "
                f"--min_held_out_retrieval {minimum:.1%}: a text-to-image model trained on this encoder would confuse "
                "the captions it cannot tell apart. Train it again into another folder with another --seed."
            )
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args)
