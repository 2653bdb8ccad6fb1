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
    pipe_copy = ENATPipeline(**{**pipe.components, "transformer": pipe.transformer})
    pipe_copy.transformer = CopyLeftNeighbour(pipe.transformer)
    copier = token_accuracy.context_use(pipe_copy, images, captions)
    # the copier follows the recoloured grid about as often as it is right in the image's own grid; the shipped
    # transformer, which predicts object tokens from the caption, follows it far less
    assert copier["recoloured_grid_follows"] > 0.3
    assert abs(copier["recoloured_grid_follows"] - copier["own_grid_top1"]) < 0.2
    assert shipped["recoloured_grid_follows"] < copier["recoloured_grid_follows"] - 0.2
    assert token_accuracy.context_use(pipe, images[:0], [])["num_tokens"] == 0


def test_decoder_attention_locality_is_uniform_for_constant_scores_and_high_for_local_ones(pipe):
    import copy

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

    # every query-key score equal: each head's share on the neighbours is the uniform share
    flat = measured(constant_queries_and_keys(copy.deepcopy(pipe.transformer), 1.0))
    assert np.shape(flat["neighbour_share"]) == (2, 4) and 0.01 < flat["uniform_share"] < 0.06
    assert np.allclose(flat["neighbour_share"], flat["uniform_share"], atol=1e-6)
    # the same constant queries and keys rotated by grid position score nearby tokens highest
    rotary = type(pipe.transformer).from_config(pipe.transformer.config, use_rotary_positional_embeddings=True)
    rotary.load_state_dict(pipe.transformer.state_dict())
    local = measured(constant_queries_and_keys(rotary.eval(), 2.0))
    assert np.min(local["neighbour_share"]) > 5 * local["uniform_share"]
    assert local["uniform_share"] == pytest.approx(flat["uniform_share"])  # the same masks
