"""The sampling loop's contract: the scheduler owns the masked-count schedule, callbacks (edits in place or returned,
re-masking, interrupt, the CFG-cutoff override), inputs the pipeline would ignore, `encode_prompt`'s named outputs,
and `attention_kwargs` (the LoRA scale per call)."""

import ast
import inspect
import textwrap

import pytest
import torch
from conftest import tiny_class_pipeline, tiny_text_pipeline
from diffusers.utils.source_code_parsing_utils import ReturnNameVisitor

from enat_diffusers import ENATInpaintPipeline, ENATPipeline, MaskedTokenScheduler, box_mask


MASK = 8  # the tiny models: 4x4 tokens, codebook of 8, [MASK] = 8
ARGMAX = dict(mask_temperature=0, sampling_temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def class_pipe():
    return tiny_class_pipeline()


class Forwards:
    """Per transformer call: the input ids, whether a reuse state came in, and the logits."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append(dict(ids=args[0].clone(), reuse=kwargs.get("reuse_state") is not None, logits=output[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def ids_of(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images.reshape(-1, 16)


# ------------------------------------------------------------------------------------ the masked-count schedule


def test_the_scheduler_scales_the_reveal_to_the_masked_tokens():
    scheduler = MaskedTokenScheduler(mask_token_id=MASK)
    scheduler.set_timesteps(4, num_masked=4)
    ids = torch.full((1, 16), 3)
    ids[0, :4] = MASK
    counts = []
    for t in scheduler.timesteps:
        ids = scheduler.step(
            torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(int(t))), t, ids
        ).prev_sample
        counts.append(int((ids == MASK).sum()))
    assert counts == [3, 2, 1, 0]  # floor(4 * cos(pi/2 (k+1)/4)): every step reveals a token
    with pytest.raises(ValueError, match="4 masked tokens take 1 to 4 steps"):
        scheduler.set_timesteps(8, num_masked=4)


def test_a_partly_masked_start_runs_no_idle_steps(class_pipe):
    start = torch.randint(0, 8, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    start[0, 0] = MASK  # 4 of 16 tokens to generate
    record = []

    def count(pipe, step, timestep, tensors):
        record.append(int((tensors["latents"] == MASK).sum()))
        return {}

    with Forwards(class_pipe.transformer) as forwards:
        out = ids_of(class_pipe, class_labels=[2], latents=start, num_inference_steps=8, callback_on_step_end=count)
    assert record == [3, 2, 1, 0] and len(forwards.calls) == 4 == class_pipe.num_timesteps
    assert torch.equal(out[0, 4:], start.reshape(16)[4:])


def test_no_pipeline_writes_the_scheduler_state(class_pipe):
    inpaint = ENATInpaintPipeline(**class_pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inpaint(class_labels=[0], image=image, mask_image=box_mask(8, 8, (0, 0, 8, 4)), output_type="latent")
    fresh = MaskedTokenScheduler(mask_token_id=MASK)
    fresh.set_timesteps(inpaint.num_timesteps)
    assert inpaint.scheduler.step_mask_ratios == fresh.step_mask_ratios  # ENAT's cosine, not counts written into it


# ------------------------------------------------------------------------------------------------ callbacks


def edit_first_encoded_token(in_place):
    """A callback that, at step 1, changes the first token that was visible at step 1's input (so the reuse state
    holds its features): in place, or in a returned copy."""
    seen = {}

    def callback(pipe, step, timestep, tensors):
        ids = tensors["latents"]
        if step == 0:
            seen["encoded"] = ids != MASK
        if step != 1:
            return {}
        position = seen["encoded"][0].float().argmax()
        target = ids if in_place else ids.clone()
        target[:, position] = (target[:, position] + 1) % 8
        return {} if in_place else {"latents": target}

    return callback


def test_an_in_place_edit_of_an_encoded_token_drops_the_reuse_state(class_pipe):
    settings = dict(class_labels=[1], num_inference_steps=4, guidance_scale=0, **ARGMAX)
    results = {}
    for in_place in (True, False):
        with Forwards(class_pipe.transformer) as forwards:
            results[in_place] = ids_of(class_pipe, callback_on_step_end=edit_first_encoded_token(in_place), **settings)
        assert [call["reuse"] for call in forwards.calls] == [False, True, False, True], in_place
    assert torch.equal(results[True], results[False])


def test_an_edit_of_a_token_not_yet_encoded_keeps_the_reuse_state(class_pipe):
    def edit_revealed(pipe, step, timestep, tensors):
        ids = tensors["latents"]
        if step == 1:  # in place, a token revealed by step 1 itself: the reuse state has no features of it yet
            revealed = (forwards.calls[1]["ids"] == MASK) & (ids != MASK)
            position = revealed[0].float().argmax()
            ids[:, position] = (ids[:, position] + 1) % 8
        return {}

    with Forwards(class_pipe.transformer) as forwards:
        ids_of(class_pipe, class_labels=[1], num_inference_steps=4, callback_on_step_end=edit_revealed, **ARGMAX)
    assert [call["reuse"] for call in forwards.calls] == [False, True, True, True]


def test_an_interrupt_returns_what_the_callback_left(class_pipe):
    left = {}

    def remask_and_stop(pipe, step, timestep, tensors):
        if step == 1:
            ids = tensors["latents"]
            left["unrevealed"] = ids == MASK
            left["predicted"] = tensors["pred_original_sample"].clone()
            left["position"] = int((ids[0] != MASK).float().argmax())  # a token the model revealed
            left["old"] = int(ids[0, left["position"]])
            ids[:, left["position"]] = MASK  # re-masked in place
            left["ids"] = ids.clone()
            pipe._interrupt = True
        return {}

    settings = dict(class_labels=[3], num_inference_steps=4, guidance_scale=0, reuse_features=False, **ARGMAX)
    tensor_inputs = ["latents", "pred_original_sample"]
    with Forwards(class_pipe.transformer) as forwards:
        out = ids_of(
            class_pipe,
            callback_on_step_end=remask_and_stop,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            **settings,
        )
    # tokens the model never revealed get its last predictions; the callback's re-masked token is not restored to its
    # old id but generated by one final step, from exactly what the callback left
    filled = torch.where(left["unrevealed"], left["predicted"], left["ids"])
    assert len(forwards.calls) == 3
    assert int(forwards.calls[2]["ids"][0, left["position"]]) == MASK
    expected = ids_of(class_pipe, latents=filled.reshape(1, 4, 4), **{**settings, "num_inference_steps": 1})
    assert torch.equal(out, expected)
    keep = torch.arange(16) != left["position"]
    assert torch.equal(out[0, keep], filled[0, keep])


def test_a_cfg_cutoff_callback_reaches_the_sampler(class_pipe):
    """diffusers' CFG-cutoff pattern (`SDCFGCutoffCallback`): `pipe._guidance_scale = 0` from a callback switches
    guidance off for the following steps (and drops the unconditional batch)."""

    def cutoff(pipe, step, timestep, tensors):
        if step == 1:
            pipe._guidance_scale = 0.0
        return {}

    settings = dict(class_labels=[1, 6], num_inference_steps=4, **ARGMAX)
    with Forwards(class_pipe.transformer) as forwards:
        got = ids_of(class_pipe, guidance_scale=4.0, callback_on_step_end=cutoff, **settings)
    assert [call["ids"].shape[0] for call in forwards.calls] == [4, 4, 2, 2]
    # the same run with ENAT's ramp (k / 4) * 4.0 up to step 1 and 0 after, as an explicit per-step list
    listed = ENATPipeline(
        transformer=class_pipe.transformer,
        scheduler=MaskedTokenScheduler(mask_token_id=MASK, guidance_scales=[0.0, 1.0, 0.0, 0.0]),
        vqvae=class_pipe.vqvae,
    )
    listed.set_progress_bar_config(disable=True)
    assert torch.equal(got, ids_of(listed, **settings))
    assert not torch.equal(got, ids_of(class_pipe, guidance_scale=4.0, **settings))

    def switch_on(pipe, step, timestep, tensors):
        pipe._guidance_scale = 2.0
        return {}

    with pytest.raises(ValueError, match="guidance was off"):
        ids_of(class_pipe, guidance_scale=0, callback_on_step_end=switch_on, **settings)


# ----------------------------------------------------------------------------------- inputs that would be ignored


def test_arguments_the_pipeline_would_ignore_are_refused(class_pipe):
    text_pipe = tiny_text_pipeline()
    pooled = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds.*negative_prompt_embeds"):
        text_pipe("a red bus", negative_pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(ValueError, match="pooled_prompt_embeds.*prompt_embeds"):
        text_pipe("a red bus", pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(ValueError, match="takes no text inputs \\(negative_pooled_prompt_embeds\\)"):
        class_pipe(class_labels=[1], negative_pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(ValueError, match="attention_kwargs"):
        class_pipe(class_labels=[1], attention_kwargs={"scale": 1.0, "ip_adapter_masks": None}, num_inference_steps=1)


# ------------------------------------------------------------------------------------------- diffusers conventions


def test_encode_prompt_returns_its_values_by_name_and_works_in_isolation():
    visitor = ReturnNameVisitor()
    visitor.visit(ast.parse(textwrap.dedent(inspect.getsource(ENATPipeline.encode_prompt))))
    names = ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"]
    assert visitor.return_names == names
    # as diffusers' `test_encode_prompt_works_in_isolation`: the outputs, passed by those names to a pipeline
    # without text encoder, give the same images
    pipe = tiny_text_pipeline()
    embeds = dict(zip(names, pipe.encode_prompt("a red bus", negative_prompt="blurry")))
    no_text = ENATPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, vqvae=pipe.vqvae)
    no_text.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    from_text = ids_of(pipe, prompt="a red bus", negative_prompt="blurry", **settings)
    settings["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(ids_of(no_text, **embeds, **settings), from_text)


# ------------------------------------------------------------------------------------------------------- LoRA


def test_attention_kwargs_scale_sets_the_lora_scale_per_call():
    from peft import LoraConfig

    pipe = tiny_class_pipeline()
    ids = torch.full((1, 16), MASK)
    ids[0, :6] = torch.arange(6)
    labels = torch.tensor([3])
    with torch.no_grad():
        base_logits = pipe.transformer(ids, class_labels=labels).logits
    settings = dict(class_labels=[3, 5], num_inference_steps=4, guidance_scale=1.0, **ARGMAX)
    base_ids = ids_of(pipe, **settings)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        lora_logits = pipe.transformer(ids, class_labels=labels).logits
        off_logits = pipe.transformer(ids, class_labels=labels, attention_kwargs={"scale": 0.0}).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    assert torch.allclose(off_logits, base_logits, atol=1e-6)
    assert torch.equal(ids_of(pipe, attention_kwargs={"scale": 0.0}, **settings), base_ids)
    assert not torch.equal(ids_of(pipe, attention_kwargs={"scale": 1.0}, **settings), base_ids)
    # the scale is per call: the adapter is back at full strength afterwards
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(ids, class_labels=labels).logits, lora_logits, atol=1e-6)
