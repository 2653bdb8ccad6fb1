"""The analytic FLOP counts of the benchmarks (benchmarks/model_flops.py) against torch's FlopCounterMode, exactly."""

import pytest
import torch
from conftest import tiny_class_pipeline, tiny_text_encoder, tiny_text_pipeline, tiny_tokenizer, tiny_vqvae
from model_flops import counted_flops, generation_flops

from enat_diffusers import ENATPipeline, MaskedTokenScheduler, NATTransformer2DModel


def run(pipe, reuse, guidance_scale, **condition):
    return pipe(
        num_inference_steps=5, guidance_scale=guidance_scale, reuse_features=reuse, output_type="latent", **condition
    )


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
@pytest.mark.parametrize("kind", ["class", "text", "grouped", "ungrouped"])
@torch.no_grad()
def test_enat_generation_flops_are_exact(kind, reuse, guidance_scale):
    if kind == "grouped":  # 2x2 token groups: 4 positions, so at most 4 steps
        pipe = tiny_class_pipeline(patch_size=2)
        pipe.scheduler = MaskedTokenScheduler(mask_token_id=8, patch_size=2)
        kind = "class"
    elif kind == "ungrouped":  # one position per token, with the input projection `ungroup` keeps
        pipe = tiny_class_pipeline(patch_size=2)
        pipe.transformer = pipe.transformer.ungroup()
        kind = "class"
    else:
        pipe = tiny_class_pipeline() if kind == "class" else tiny_text_pipeline()
    condition = {"class_labels": [1, 2]} if kind == "class" else {"prompt": ["a red circle", "a blue square"]}
    counted = counted_flops(lambda: run(pipe, reuse, guidance_scale, **condition))
    num_text = 0 if kind == "class" else pipe.tokenizer.model_max_length
    per_image = generation_flops(
        pipe.transformer, pipe.scheduler.step_mask_ratios, guidance_scale > 0, reuse, num_text
    )
    text_encoder = 0
    if kind == "text":  # the CLIP text encoder's FLOPs (cond and, with guidance, the empty prompt)
        text_encoder = counted_flops(lambda: pipe.encode_prompt(condition["prompt"], "cpu", 1, guidance_scale > 0))
    assert counted - text_encoder == 2 * per_image


def test_reuse_saves_flops_and_a_nat_of_the_same_size_costs_more():
    pipe = tiny_class_pipeline()  # 3 blocks, width 32
    pipe.scheduler.set_timesteps(8)
    ratios = pipe.scheduler.step_mask_ratios
    nat = NATTransformer2DModel(sample_size=4, codebook_size=8, hidden_size=32, num_attention_heads=2, num_layers=2)
    with_reuse = generation_flops(pipe.transformer, ratios, True, True)
    without_reuse = generation_flops(pipe.transformer, ratios, True, False)
    assert with_reuse < without_reuse < generation_flops(nat, ratios, True, False)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["class", "text"])
def test_nat_generation_flops_are_exact(kind):
    torch.manual_seed(0)
    condition = {"num_classes": 10} if kind == "class" else {"num_classes": None, "text_embed_dim": 16}
    transformer = NATTransformer2DModel(
        sample_size=4, codebook_size=8, hidden_size=32, num_attention_heads=2, num_layers=4, **condition
    ).eval()
    text = {} if kind == "class" else {"text_encoder": tiny_text_encoder(), "tokenizer": tiny_tokenizer()}
    pipe = ENATPipeline(transformer, MaskedTokenScheduler(mask_token_id=8), tiny_vqvae(), **text)
    pipe.set_progress_bar_config(disable=True)
    if kind == "class":
        counted = counted_flops(lambda: run(pipe, None, 2.0, class_labels=[1, 2, 3]))
        num_text = 0
    else:
        prompts = ["a red circle", "a blue square", "a green triangle"]
        counted = counted_flops(lambda: run(pipe, None, 2.0, prompt=prompts))
        counted -= counted_flops(lambda: pipe.encode_prompt(prompts, "cpu", 1, True))  # the CLIP text encoder's
        num_text = pipe.tokenizer.model_max_length
    ratios = pipe.scheduler.step_mask_ratios
    assert counted == 3 * generation_flops(transformer, ratios, True, False, num_text)
