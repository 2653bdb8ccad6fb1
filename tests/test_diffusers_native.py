"""diffusers building blocks and conventions: attention processors, fused projections, layerwise casting, group
offloading, compile, LoRA, callbacks, and the pipeline checks a diffusers reviewer runs."""

import pytest
import torch
from conftest import tiny_class_pipeline, tiny_text_pipeline, tiny_transformer, tiny_vqvae
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.attention_dispatch import attention_backend

from enat_diffusers import ENATAttention, ENATAttnProcessor, ENATPipeline, ENATTransformer2DModel, MaskedTokenScheduler
from enat_diffusers.schedulers.scheduling_masked_token import sample_categorical


def class_inputs(batch_size=3, seed=0, num_masked=9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (batch_size, 16), generator=generator)
    masked = torch.rand(batch_size, 16, generator=generator).argsort(1)[:, :num_masked]
    ids.scatter_(1, masked, 8)
    return ids, torch.tensor([1, 4, 10][:batch_size])


def model_logits(model, ids, labels, **kwargs):
    with torch.no_grad():
        return model(ids, class_labels=labels, **kwargs).logits


# ------------------------------------------------------------------------------------------------------ the model


def test_attention_is_a_diffusers_attention_module_with_processors():
    model = tiny_transformer()
    processors = model.attn_processors
    assert len(processors) == 3 and all(isinstance(p, ENATAttnProcessor) for p in processors.values())
    attention = model.encoder_blocks[0].attn
    assert isinstance(attention, ENATAttention)
    names = {name for name, _ in attention.named_parameters()}
    for projection in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"):
        assert f"{projection}.weight" in names and f"{projection}.bias" in names

    ids, labels = class_inputs()
    reference = model_logits(model, ids, labels)
    model.set_attn_processor(ENATAttnProcessor())
    assert torch.allclose(model_logits(model, ids, labels), reference, atol=1e-6)

    # dispatch_attention_fn is what computes attention: a processor choosing another backend changes nothing here
    calls = []

    class CountingProcessor(ENATAttnProcessor):
        def __call__(self, attn, *args, **kwargs):
            calls.append(attn)
            return super().__call__(attn, *args, **kwargs)

    model.set_attn_processor(CountingProcessor())
    with attention_backend("native"):
        assert torch.allclose(model_logits(model, ids, labels), reference, atol=1e-6)
    assert len(calls) == 3
    model.set_attn_processor(ENATAttnProcessor())
    model.set_attention_backend("native")
    assert torch.allclose(model_logits(model, ids, labels), reference, atol=1e-6)


def test_fused_projections_compute_the_same():
    model = tiny_transformer()
    ids, labels = class_inputs()
    reference = model(ids, class_labels=labels)
    model.fuse_qkv_projections()
    attention = model.decoder_blocks[0].attn
    assert attention.fused_projections and attention.to_qkv.weight.shape == (96, 32)
    assert attention.to_added_kv.weight.shape == (64, 32)
    fused = model(ids, class_labels=labels)
    assert torch.allclose(fused.logits, reference.logits, atol=1e-5)
    # with a reuse state as well
    still_masked = torch.sort((ids != 8).float(), dim=1, stable=True).indices[:, :3]  # 3 of the 9 masked
    revealed = torch.where(ids == 8, 5, ids).scatter(1, still_masked, 8)
    model.unfuse_qkv_projections()
    assert not hasattr(attention, "to_qkv")
    plain = model(revealed, class_labels=labels, reuse_state=reference.reuse_state).logits
    model.fuse_qkv_projections()
    assert torch.allclose(
        model(revealed, class_labels=labels, reuse_state=reference.reuse_state).logits, plain, atol=1e-5
    )


def test_layerwise_casting_to_float8_runs():
    model = tiny_transformer()
    ids, labels = class_inputs()
    reference = model_logits(model, ids, labels)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.encoder_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.embed.word_embeddings.weight.dtype == torch.float32  # skipped by default (lookup tables)
    cast = model_logits(model, ids, labels)
    assert torch.isfinite(cast).all()
    assert torch.corrcoef(torch.stack([cast.flatten(), reference.flatten()]))[0, 1] > 0.95


def test_sequential_cpu_offload_gives_the_same_logits():
    # accelerate's sequential offload keeps every weight on the meta device until its own module runs: the tied head
    # must get its table through the embedding module, not by reading `word_embeddings.weight`
    from accelerate import cpu_offload

    model = tiny_transformer()
    ids, labels = class_inputs()
    reference = model_logits(model, ids, labels)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.embed.word_embeddings.weight.device.type == "meta"
    torch.testing.assert_close(model_logits(model, ids, labels), reference)


def test_group_offloading_gives_the_same_logits():
    model = tiny_transformer()
    ids, labels = class_inputs()
    reference = model_logits(model, ids, labels)
    model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    assert torch.allclose(model_logits(model, ids, labels), reference, atol=1e-6)


def test_a_block_compiles_without_graph_breaks():
    model = tiny_transformer()
    block = model.encoder_blocks[0]
    hidden, modulation, context = torch.randn(2, 5, 32), torch.randn(2, 8 * 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        reference = block(hidden, modulation, context)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(hidden, modulation, context), reference, atol=1e-6)
    assert model._repeated_blocks == ["ENATBlock"]


def test_save_load_and_dtype_round_trip(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path)
    loaded = ENATTransformer2DModel.from_pretrained(tmp_path)
    ids, labels = class_inputs()
    assert torch.equal(model_logits(loaded, ids, labels), model_logits(model, ids, labels))
    half = ENATTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    logits = model_logits(half, ids, labels)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_lora_fine_tuning_and_pipeline_round_trip(tmp_path):
    from peft import LoraConfig

    pipe = tiny_class_pipeline()
    transformer = pipe.transformer
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # every attention projection got an adapter (encoder and decoder blocks)
    assert sum("to_out.0.lora_A" in name for name in trainable) == 3
    assert sum("add_v_proj.lora_B" in name for name in trainable) == 3

    ids, labels = class_inputs()
    targets_ids = torch.randint(0, 8, ids.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    transformer.train()
    losses = []
    for _ in range(5):
        logits = transformer(ids, class_labels=labels).logits
        loss = torch.nn.functional.cross_entropy(logits[ids == 8], targets_ids[ids == 8])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    transformer.eval()
    assert losses[-1] < losses[0]

    from peft.utils import get_peft_model_state_dict

    ENATPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    tuned = model_logits(transformer, ids, labels)
    fresh = tiny_class_pipeline()
    assert not torch.allclose(model_logits(fresh.transformer, ids, labels), tuned, atol=1e-4)
    fresh.load_lora_weights(tmp_path)
    assert torch.allclose(model_logits(fresh.transformer, ids, labels), tuned, atol=1e-5)
    # fused into the base weights, it computes the same
    fresh.fuse_lora()
    assert torch.allclose(model_logits(fresh.transformer, ids, labels), tuned, atol=1e-4)


# --------------------------------------------------------------------------------------------------- the scheduler


def test_a_zero_probability_token_is_never_drawn():
    log_probs = torch.tensor([0.0, 0.0, 1.0, 0.0]).log().expand(3, 4)
    uniform = torch.tensor([0.0, 0.5, 1.0 - 1e-7])
    assert sample_categorical(log_probs, uniform).tolist() == [2, 2, 2]
    # ordinary case: the interval of token k is [cdf[k-1], cdf[k])
    log_probs = torch.tensor([0.25, 0.25, 0.5]).log().expand(4, 3)
    assert sample_categorical(log_probs, torch.tensor([0.0, 0.2499, 0.25, 0.75])).tolist() == [0, 0, 1, 2]


def test_gumbel_keeps_tokens_with_softmax_probabilities_of_their_confidence():
    """Keeping 1 of 3 masked tokens by confidence + T * Gumbel is the Gumbel-max trick: token i is kept with
    probability softmax(confidence / T)_i. A flipped noise sign gives other frequencies."""
    codebook_size = 16
    scheduler = MaskedTokenScheduler(
        mask_token_id=codebook_size, mask_ratios=[0.7], mask_temperatures=[1.0], sampling_temperatures=[0, 0]
    )
    scheduler.set_timesteps(2)
    num_rows = 20000
    confidence = torch.tensor([0.0, -1.0, -2.0])  # log-prob of each position's argmax token (token 0)
    probs = torch.empty(3, codebook_size)
    probs[:, 0] = confidence.exp()
    probs[:, 1:] = ((1 - confidence.exp()) / (codebook_size - 1)).unsqueeze(1)
    logits = probs.clamp(min=1e-30).log()
    sample = torch.full((num_rows, 3), codebook_size)
    kept = scheduler.step(logits.expand(num_rows, -1, -1), 0, sample, generator=torch.Generator().manual_seed(0))
    frequencies = (kept.prev_sample != codebook_size).float().mean(0)
    assert torch.allclose(frequencies, confidence.softmax(0), atol=0.015), frequencies


# ---------------------------------------------------------------------------------------------------- the pipeline


def test_components_that_do_not_belong_together_are_refused():
    with pytest.raises(
        ValueError, match="scheduler's mask_token_id is 9 but the transformer's \\[MASK\\] id is its codebook_size, 8"
    ):
        ENATPipeline(
            transformer=tiny_transformer(), scheduler=MaskedTokenScheduler(mask_token_id=9), vqvae=tiny_vqvae()
        )
    with pytest.raises(ValueError, match="VQ model has 16 codes but the transformer predicts 8"):
        ENATPipeline(
            transformer=tiny_transformer(), scheduler=MaskedTokenScheduler(mask_token_id=8), vqvae=tiny_vqvae(16)
        )


def test_images_per_prompt_are_consecutive_and_match_single_runs():
    pipe = tiny_class_pipeline()

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = pipe(class_labels=[1, 4], num_images_per_prompt=2, generator=gens(0, 1, 2, 3), output_type="latent").images
    singles = [
        pipe(class_labels=[label], generator=gens(seed), output_type="latent").images[0]
        for label, seed in ((1, 0), (1, 1), (4, 2), (4, 3))
    ]
    assert torch.equal(batch, torch.stack(singles))
    assert not torch.equal(singles[0], singles[2])


def guided_reference(pipe, model_kwargs, uncond_kwargs, steps, guidance_scale):
    """The ENAT loop written out with separate cond and uncond forwards (no reuse, temperatures 0)."""
    pipe.scheduler.set_timesteps(steps, guidance_scale=guidance_scale, mask_temperature=0, sampling_temperature=0)
    batch_size = next(iter(model_kwargs.values())).shape[0]
    ids = torch.full((batch_size, 16), 8)
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.no_grad():
            cond = pipe.transformer(ids, **model_kwargs).logits
            uncond = pipe.transformer(ids, **uncond_kwargs).logits
        scale = pipe.scheduler.step_guidance_scales[i]
        ids = pipe.scheduler.step(cond + scale * (cond - uncond), t, ids).prev_sample
    return ids.reshape(batch_size, 4, 4)


def test_class_guidance_uses_the_labels_for_cond_and_the_null_class_for_uncond():
    pipe = tiny_class_pipeline()
    labels = torch.tensor([1, 4])
    expected = guided_reference(
        pipe, dict(class_labels=labels), dict(class_labels=torch.full_like(labels, 10)), 3, 4.0
    )
    settings = dict(num_inference_steps=3, guidance_scale=4.0, mask_temperature=0, sampling_temperature=0)
    got = pipe(class_labels=[1, 4], output_type="latent", reuse_features=False, **settings).images
    assert torch.equal(got, expected)


def test_text_guidance_uses_the_prompt_for_cond_and_the_negative_prompt_for_uncond():
    pipe = tiny_text_pipeline()
    prompts, negative = ["a red bus", "a green tree"], "a photo of a cat"
    embeds, pooled = pipe._encode_text(prompts, "cpu")
    negative_embeds, negative_pooled = pipe._encode_text([negative] * 2, "cpu")
    expected = guided_reference(
        pipe,
        dict(encoder_hidden_states=embeds, pooled_text_embeds=pooled),
        dict(encoder_hidden_states=negative_embeds, pooled_text_embeds=negative_pooled),
        3,
        4.0,
    )
    settings = dict(num_inference_steps=3, guidance_scale=4.0, mask_temperature=0, sampling_temperature=0)
    got = pipe(prompts, negative_prompt=negative, output_type="latent", reuse_features=False, **settings).images
    assert torch.equal(got, expected)


class Recorder:
    """Records the transformer's inputs and outputs of every call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append((args[0].clone(), kwargs.get("reuse_state"), output[0].clone()))

    def remove(self):
        self.handle.remove()


def first_visible(ids):
    """Position of the first visible token of each row."""
    return (ids != 8).float().argmax(1)


def test_a_callback_edit_of_visible_tokens_reaches_the_model_with_reuse():
    pipe = tiny_class_pipeline()
    settings = dict(num_inference_steps=4, guidance_scale=0, mask_temperature=0, sampling_temperature=0)
    edits = {}

    def edit(pipe, step, timestep, callback_kwargs):
        ids = callback_kwargs["latents"]
        if step != 1:
            return {}
        # change a token that was visible before step 1 (so the reuse state holds its features)
        position = first_visible(recorder.calls[1][0])
        edited = ids.clone()
        rows = torch.arange(ids.shape[0])
        edited[rows, position] = (ids[rows, position] + 1) % 8
        edits["ids"] = edited
        return {"latents": edited}

    recorder = Recorder(pipe.transformer)
    try:
        pipe(class_labels=[1, 4], callback_on_step_end=edit, output_type="latent", **settings)
    finally:
        recorder.remove()
    step2_input, step2_state, step2_logits = recorder.calls[2]
    assert torch.equal(step2_input, edits["ids"])
    # the model saw the edited ids: its step-2 logits are those of a fresh forward on them
    labels = torch.tensor([1, 4])
    assert torch.allclose(step2_logits, model_logits(pipe.transformer, edits["ids"], labels), atol=1e-6)
    # and reuse resumes afterwards
    assert step2_state is None and recorder.calls[3][1] is not None


def test_an_edit_of_newly_revealed_tokens_keeps_the_reuse_state():
    pipe = tiny_class_pipeline()
    settings = dict(num_inference_steps=4, guidance_scale=0, mask_temperature=0, sampling_temperature=0)

    def edit_new(pipe, step, timestep, callback_kwargs):
        ids = callback_kwargs["latents"]
        if step != 1:
            return {}
        before = recorder.calls[1][0]
        newly = (before == 8) & (ids != 8)
        position = newly.float().argmax(1)
        rows = torch.arange(ids.shape[0])
        edited = ids.clone()
        edited[rows, position] = (ids[rows, position] + 1) % 8
        return {"latents": edited}

    recorder = Recorder(pipe.transformer)
    try:
        pipe(class_labels=[1, 4], callback_on_step_end=edit_new, output_type="latent", **settings)
    finally:
        recorder.remove()
    assert all(state is not None for _, state, _ in recorder.calls[1:])


def test_a_callback_may_re_mask_tokens_even_at_the_last_step():
    pipe = tiny_class_pipeline()

    def remask(pipe, step, timestep, callback_kwargs):
        ids = callback_kwargs["latents"]
        visible = torch.sort((ids == 8).float(), dim=1, stable=True).indices[:, :2]  # two visible tokens per image
        return {"latents": ids.scatter(1, visible, 8)}

    result = pipe(class_labels=[1, 4], num_inference_steps=4, callback_on_step_end=remask, output_type="latent").images
    assert (result != 8).all()
    images = pipe(class_labels=[1, 4], num_inference_steps=4, callback_on_step_end=remask, output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "returned, error, message",
    [
        ([1, 2], TypeError, "must return a dict"),
        ({"latents": [[8] * 16] * 2}, TypeError, "integer torch.Tensor of token ids"),
        ({"latents": torch.zeros(2, 15, dtype=torch.long)}, ValueError, "shape"),
        ({"latents": torch.full((2, 16), 9)}, ValueError, "outside"),
        ({"latents": torch.tensor([[8] * 16, [0] * 16])}, ValueError, "different numbers of \\[MASK\\]"),
    ],
)
def test_bad_callback_outputs_are_clear_errors(returned, error, message):
    pipe = tiny_class_pipeline()
    with pytest.raises(error, match=message):
        pipe(class_labels=[1, 4], num_inference_steps=2, callback_on_step_end=lambda *args: returned)


def test_pipeline_callbacks_and_interrupt():
    pipe = tiny_class_pipeline()
    seen = []

    class Watch(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append((step_index, pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
            return callback_kwargs

    class Stop(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == 1:
                pipeline._interrupt = True
            return callback_kwargs

    recorder = Recorder(pipe.transformer)
    try:
        ids = pipe(
            class_labels=[1],
            num_inference_steps=6,
            guidance_scale=3.0,
            callback_on_step_end=MultiPipelineCallbacks([Watch(), Stop()]),
            output_type="latent",
        ).images
    finally:
        recorder.remove()
    assert seen == [(0, 3.0, True), (1, 3.0, True)]
    assert len(recorder.calls) == 2 and pipe.interrupt
    assert (ids != 8).all()  # the tokens still masked were filled with the last predictions
    assert pipe(class_labels=[1], num_inference_steps=2, guidance_scale=0, output_type="latent").images.shape == (
        1,
        4,
        4,
    )
    assert not pipe.interrupt and not pipe.do_classifier_free_guidance
