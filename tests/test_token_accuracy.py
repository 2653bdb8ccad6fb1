"""examples/shapes/token_accuracy.py: the context-use measure (does a transformer read the visible tokens?)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from enat_diffusers import ENATPipeline
from enat_diffusers.data.shapes import BACKGROUND, COLOURS, ShapeObject, render_scene


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "shapes"))
import token_accuracy  # noqa: E402


def image(colour="red", shape="square", centre=(33, 31)) -> np.ndarray:
    return np.asarray(render_scene([ShapeObject(shape, "large", colour, "centre", centre)]).convert("RGB"))


class CopyLeftNeighbour(torch.nn.Module):
    """A 'transformer' that predicts every token as the id of its left neighbour (its right one in column 0): it
    reads nothing but the visible tokens."""

    def __init__(self, transformer):
        super().__init__()
        self.mask_token_id, self.config = transformer.mask_token_id, transformer.config

    def forward(self, input_ids, **kwargs):
        side = self.config.sample_size
        grid = input_ids.reshape(-1, side, side)
        source = torch.cat([grid[:, :, 1:2], grid[:, :, :-1]], dim=2).reshape(input_ids.shape)
        logits = torch.nn.functional.one_hot(source.clamp(max=self.mask_token_id - 1), self.mask_token_id).float()
        return type("Output", (), {"logits": logits})()


class CaptionOnly(torch.nn.Module):
    """The transformer shown only [MASK] tokens: it predicts from the caption and the position, never from the grid."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer, self.mask_token_id, self.config = transformer, transformer.mask_token_id, transformer.config

    def forward(self, input_ids, **kwargs):
        return self.transformer(torch.full_like(input_ids, self.mask_token_id), **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return ENATPipeline.from_pretrained(ROOT / "pretrained" / "enat-shapes")


def test_recolour_moves_every_object_pixel_to_the_next_colour():
    original = image("purple")
    recoloured = token_accuracy.recolour(original)
    background = (original == np.array(BACKGROUND)).all(-1)
    assert (recoloured[background] == np.array(BACKGROUND)).all()
    assert (recoloured[~background] == np.array(COLOURS["red"])).all()  # purple is the last colour: back to red


def test_context_use_separates_a_transformer_that_reads_the_grid_from_one_that_does_not(pipe):
    images = np.stack([image("red"), image("blue", "circle", (30, 34)), image("yellow", "triangle")])
    captions = ["a large red square in the centre", "a large blue circle in the centre",
                "a large yellow triangle in the centre"]  # fmt: skip
    shipped = token_accuracy.context_use(pipe, images, captions)
    objects = token_accuracy.tokenise_images(pipe, images)[1]
    assert shipped["num_tokens"] == int(objects.sum())

    def with_transformer(transformer):
        changed = ENATPipeline(**{**pipe.components, "transformer": pipe.transformer})
        changed.transformer = transformer
        return changed

    copier = token_accuracy.context_use(with_transformer(CopyLeftNeighbour(pipe.transformer)), images, captions)
    blind = token_accuracy.context_use(with_transformer(CaptionOnly(pipe.transformer)), images, captions)
    # the copier follows the recoloured grid about as often as it is right in the image's own grid; the shipped
    # transformer (rotary positions) reads the grid too; the same transformer shown no grid never follows it
    assert copier["recoloured_grid_follows"] > 0.3
    assert abs(copier["recoloured_grid_follows"] - copier["own_grid_top1"]) < 0.2
    assert shipped["recoloured_grid_follows"] > 0.5
    assert blind["recoloured_grid_follows"] < 0.05 and blind["num_tokens"] == shipped["num_tokens"]
    assert token_accuracy.context_use(pipe, images[:0], [])["num_tokens"] == 0


def test_decoder_attention_locality_is_uniform_for_constant_scores_and_high_for_local_ones(pipe):
    images = np.stack([image("red"), image("blue", "circle", (30, 34))])
    captions = ["a large red square in the centre", "a large blue circle in the centre"]
    ids = token_accuracy.tokenise_images(pipe, images)[0]

    def measured(transformer):
        changed = ENATPipeline(**{**pipe.components, "transformer": transformer})
        return token_accuracy.decoder_attention_locality(changed, ids, captions, torch.Generator().manual_seed(0))

    def constant_queries_and_keys(transformer, bias):
        with torch.no_grad():
            for block in transformer.decoder_blocks:
                for linear in (block.attn.to_q, block.attn.to_k, block.attn.add_k_proj):
                    linear.weight.zero_()
                    linear.bias.fill_(bias)
        return transformer

    def with_rotary(rotary):
        config = pipe.transformer.config
        transformer = type(pipe.transformer).from_config(config, use_rotary_positional_embeddings=rotary)
        transformer.load_state_dict(pipe.transformer.state_dict())
        return transformer.eval()

    # every query-key score equal (no rotary positions): each head's share on the neighbours is the uniform share
    flat = measured(constant_queries_and_keys(with_rotary(False), 1.0))
    layers_and_heads = (pipe.transformer.config.num_decoder_layers, pipe.transformer.config.num_attention_heads)
    assert np.shape(flat["neighbour_share"]) == layers_and_heads and 0.01 < flat["uniform_share"] < 0.06
    assert np.allclose(flat["neighbour_share"], flat["uniform_share"], atol=1e-6)
    # the same constant queries and keys rotated by grid position score nearby tokens highest
    local = measured(constant_queries_and_keys(with_rotary(True), 2.0))
    assert np.min(local["neighbour_share"]) > 5 * local["uniform_share"]
    assert local["uniform_share"] == pytest.approx(flat["uniform_share"])  # the same masks
