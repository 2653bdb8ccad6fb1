"""Transformers with `patch_size > 1`: one position per square group of tokens. The group layout, the model's
checks and outputs, the scheduler's group-wise decoding and training masks, the pipelines' group-aligned editing, and
a grouped model trained, saved and loaded."""

import pytest
import torch
from conftest import tiny_transformer, tiny_vqvae

from enat_diffusers import (
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATTransformer2DModel,
    MaskedTokenScheduler,
)
from enat_diffusers.utils.token_groups import expand_group_mask, group_mask, group_tokens, ungroup_tokens


pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 8  # tiny models: 8 codes, 4x4 tokens in 2x2 groups of 2x2, 8x8 images


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def grouped_pipeline(scheduler_patch_size=2, cls=ENATPipeline):
    pipe = cls(
        transformer=tiny_transformer(patch_size=2),
        scheduler=MaskedTokenScheduler(mask_token_id=MASK, patch_size=scheduler_patch_size),
        vqvae=tiny_vqvae(),
        id2label={i: f"class {i}" for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_groups_are_square_blocks_in_raster_order():
    grid = torch.arange(16).reshape(1, 16)  # a 4x4 grid
    grouped = group_tokens(grid, 2)
    assert grouped.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    assert torch.equal(ungroup_tokens(grouped, 2), grid)
    features = torch.randn(3, 36, 5)  # 6x6 grid, 3x3 groups, trailing feature dimension
    assert torch.equal(ungroup_tokens(group_tokens(features, 3), 3), features)
    assert expand_group_mask(torch.tensor([[False, True, False, False]]), 2).reshape(4, 4).tolist() == [
        [False, False, True, True],
        [False, False, True, True],
        [False, False, False, False],
        [False, False, False, False],
    ]
    assert group_mask(expand_group_mask(torch.tensor([[True, False, False, True]]), 2), 2).tolist() == [
        [True, False, False, True]
    ]
    with pytest.raises(ValueError, match="masks part of a 2x2 token group"):
        group_mask(torch.tensor([[True] + [False] * 15]), 2)
    with pytest.raises(ValueError, match="divides the token grid's side 4"):
        group_tokens(grid, 3)


def test_model_runs_on_groups_and_predicts_every_token():
    model = tiny_transformer(patch_size=2)
    assert model.embed.position_embeddings.num_embeddings == 4  # 2x2 positions for 4x4 tokens
    ids = torch.randint(0, MASK, (2, 16), generator=seeded())
    ids[:, [2, 3, 6, 7]] = MASK  # the top-right group
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        output = model(ids, class_labels=labels)
    assert output.logits.shape == (2, 16, MASK)
    assert output.reuse_state.hidden_states.shape == (2, 4, 32) and output.reuse_state.mask.shape == (2, 4)
    assert output.reuse_state.mask.tolist() == [[False, True, False, False]] * 2
    # each token of a group has its own prediction (proj_out gives one feature per token of the group)
    masked_logits = output.logits[0, [2, 3, 6, 7]]
    assert all(not torch.allclose(masked_logits[0], masked_logits[k]) for k in (1, 2, 3))

    # the prediction of the masked group reads every token of a visible group, each at its own place
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % MASK
    swapped = ids.clone()
    swapped[:, [0, 1]] = ids[:, [1, 0]]
    with torch.no_grad():
        for other in (changed, swapped):
            if torch.equal(other, ids):
                continue
            assert not torch.allclose(model(other, class_labels=labels).logits[:, 2], output.logits[:, 2])

    partial = ids.clone()
    partial[:, 0] = MASK
    with pytest.raises(ValueError, match="input_ids masks part of a 2x2 token group"):
        model(partial, class_labels=labels)
    with pytest.raises(ValueError, match="divides the token grid's side 4"):
        tiny_transformer(patch_size=3)


def test_reuse_state_of_groups_feeds_the_next_step():
    model = tiny_transformer(patch_size=2)
    labels = torch.tensor([3])
    first = torch.full((1, 16), MASK)
    first[0, [0, 1, 4, 5]] = torch.tensor([1, 2, 3, 4])
    second = first.clone()
    second[0, [10, 11, 14, 15]] = torch.tensor([5, 6, 7, 0])  # one more group revealed
    with torch.no_grad():
        state = model(first, class_labels=labels).reuse_state
        reused = model(second, class_labels=labels, reuse_state=state).logits
        plain = model(second, class_labels=labels).logits
    assert reused.shape == plain.shape == (1, 16, MASK)
    assert not torch.allclose(reused, plain)  # the reused features (through prev_proj) are what the step reads
    hidden_again = first.clone()
    hidden_again[0, 0:2] = MASK
    hidden_again[0, 4:6] = MASK
    with pytest.raises(ValueError, match="revealed, never hidden again"):
        model(hidden_again, class_labels=labels, reuse_state=model(second, class_labels=labels).reuse_state)


def test_scheduler_reveals_the_group_with_the_highest_summed_log_probability():
    # two of four groups masked; code 0 is every token's most likely id. Group 0's first token and its weakest are
    # less sure than all of group 1's, but its summed log-probability is higher: it is the group revealed.
    top = {0: -0.9, 1: -0.01, 4: -0.01, 5: -0.01, 2: -0.25, 3: -0.25, 6: -0.25, 7: -0.25}  # sums -0.93 and -1.0
    log_probs = torch.zeros(1, 16, MASK)
    for token, value in top.items():
        rest = (1 - torch.tensor(value).exp()) / (MASK - 1)
        log_probs[0, token] = rest.log()
        log_probs[0, token, 0] = value
    logits = log_probs + torch.randn(1, 16, 1, generator=seeded())  # a shift per token leaves the softmax
    sample = torch.full((1, 16), 5)
    sample[0, [0, 1, 4, 5, 2, 3, 6, 7]] = MASK  # groups 0 and 1 masked
    scheduler = MaskedTokenScheduler(
        mask_token_id=MASK, patch_size=2, mask_ratios=[0.25], mask_temperatures=[0.0], sampling_temperatures=[0, 0]
    )
    scheduler.set_timesteps(2, num_masked=8)
    prev = scheduler.step(logits, 0, sample).prev_sample
    assert (prev[0, [0, 1, 4, 5]] == 0).all()  # revealed: summed log-prob -0.93 against -1.0
    assert (prev[0, [2, 3, 6, 7]] == MASK).all()  # the whole other group stays masked
    assert torch.equal(prev[0, 8:], sample[0, 8:])

    with pytest.raises(ValueError, match="not a whole number of 2x2 token groups"):
        scheduler.set_timesteps(2, num_masked=6)
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        MaskedTokenScheduler(patch_size=0)


def test_scheduler_schedule_and_training_masks_count_groups():
    scheduler = MaskedTokenScheduler(mask_token_id=MASK, patch_size=2)
    ids = torch.full((3, 64), MASK)  # 8x8 tokens, 16 groups
    scheduler.set_timesteps(4)
    masked_groups = []
    for step in scheduler.timesteps:
        logits = torch.randn(3, 64, MASK, generator=seeded(int(step)))
        ids = scheduler.step(logits, step, ids, generator=seeded(10 + int(step))).prev_sample
        masked_groups.append(group_mask(ids == MASK, 2).sum(1).tolist())  # raises on a partial group
    assert masked_groups == [[14] * 3, [11] * 3, [6] * 3, [0] * 3]  # floor(16 * cos(pi/2 * (k + 1)/4))

    clean = torch.randint(0, MASK, (5, 64), generator=seeded())
    noisy = scheduler.add_noise(clean, generator=seeded(), mask_ratio=0.3)
    assert group_mask(noisy == MASK, 2).sum(1).tolist() == [5] * 5  # round(16 * 0.3) groups per row
    assert torch.equal(noisy[noisy != MASK], clean[noisy != MASK])


def test_pipeline_generates_with_groups_and_names_a_scheduler_that_does_not_fit():
    pipe = grouped_pipeline()
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append(group_mask(tensors["latents"].reshape(1, 16) == MASK, 2).sum().item())
        return {}

    images = pipe(class_labels=[1], num_inference_steps=3, output_type="pt", callback_on_step_end=record).images
    assert images.shape == (1, 3, 8, 8)
    assert seen == [3, 2, 0]  # floor(4 * cos(pi/2 * (k + 1)/3)) masked groups after each step
    with pytest.raises(ValueError, match=r"scheduler has patch_size 1: load the scheduler with patch_size=2"):
        grouped_pipeline(scheduler_patch_size=1)(class_labels=[1], num_inference_steps=2)


def test_editing_regenerates_whole_groups():
    inpaint = grouped_pipeline(cls=ENATInpaintPipeline)
    image = torch.rand(1, 3, 8, 8, generator=seeded())
    tokens = inpaint.encode_image(image).reshape(1, 16)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 5, 1] = 1.0  # one pixel of token (2, 0), which is in the bottom-left group
    token_mask = inpaint.get_token_mask(mask).reshape(16)
    assert token_mask.nonzero().flatten().tolist() == [8, 9, 12, 13]
    first = []

    def record(pipeline, step, timestep, tensors):
        first.append(tensors["latents"].reshape(16).clone())
        return {}

    out = inpaint(
        class_labels=[1], image=image, mask_image=mask, num_inference_steps=4, output_type="latent",
        generator=seeded(), callback_on_step_end=record,
    ).images  # fmt: skip
    assert len(first) == 1  # one masked group: one step
    kept = ~token_mask
    assert torch.equal(out.reshape(16)[kept], tokens[0][kept])

    img2img = ENATImg2ImgPipeline(**inpaint.components)
    for remask in ("random", "confidence"):
        chosen = img2img.select_remask(tokens, 8, remask, seeded(), model_kwargs={"class_labels": torch.tensor([1])})
        assert group_mask(chosen, 2).sum().item() == 2  # 8 tokens: two whole groups
    seen = []
    img2img(
        class_labels=[1], image=image, strength=0.3, num_inference_steps=4, generator=seeded(),
        callback_on_step_end=lambda p, s, t, x: seen.append(x["latents"].clone()) or {},
    )  # fmt: skip
    assert len(seen) == 1  # round(4 * 0.3) = 1 group re-masked: one step


def test_grouped_model_saves_and_loads(tmp_path):
    model = tiny_transformer(patch_size=2)
    model.save_pretrained(tmp_path / "t")
    loaded = ENATTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    assert loaded.config.patch_size == 2
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    ids, labels = torch.full((1, 16), MASK), torch.tensor([0])
    with torch.no_grad():
        assert torch.allclose(
            model(ids, class_labels=labels).logits, loaded(ids, class_labels=labels).logits, atol=1e-5
        )
    assert "proj_out.weight" in loaded.state_dict() and "embed.patch_embed.weight" in loaded.state_dict()
    assert "proj_out.weight" not in tiny_transformer().state_dict()  # patch_size 1 keeps the released layout
