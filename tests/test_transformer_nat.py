"""AutoNAT's NAT (`NATTransformer2DModel`) against fixtures recorded from the original ImprovedNAT code
(tests/fixtures/autonat/README.md): forward logits, every step's guided logits, and the generation traces."""

import json

import pytest
import torch
from conftest import FIXTURES, call_converter, tiny_vqvae
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline, MaskedTokenScheduler, NATTransformer2DModel
from enat_diffusers.conversion import checkpoints as convert
from enat_diffusers.models.transformer_enat import grid_rotary_table
from enat_diffusers.schedulers import scheduling_masked_token


AUTONAT = FIXTURES / "autonat"
META = json.loads((AUTONAT / "fixture_meta.json").read_text())
NULL_CLASS = 10


def converted(weights: str) -> NATTransformer2DModel:
    return convert.build_transformer(convert.load_original_checkpoint(AUTONAT / weights), num_attention_heads=4)


def strategy_config(strategy: dict) -> dict:
    """AutoNAT's yaml names -> the scheduler's config names."""
    names = {
        "manual_ratios": "mask_ratios",
        "manual_temp": "mask_temperatures",
        "manual_samp_temp": "sampling_temperatures",
        "manual_cfg": "guidance_scales",
    }
    return {names[key]: values for key, values in strategy.items()}


def nat_pipeline(transformer, strategy) -> ENATPipeline:
    pipe = ENATPipeline(
        transformer=transformer,
        scheduler=MaskedTokenScheduler(mask_token_id=32, **strategy_config(strategy)),
        vqvae=tiny_vqvae(num_codes=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_scheduler_inputs(pipe, monkeypatch) -> list:
    """Every `scheduler.step` call's (guided logits, input ids)."""
    calls, step = [], pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        calls.append((model_output.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    return calls


@pytest.fixture(scope="module")
def main_io():
    return load_file(AUTONAT / "autonat_tiny_io.safetensors")


@pytest.fixture(scope="module")
def sharp_io():
    return load_file(AUTONAT / "autonat_tiny_sharp_io.safetensors")


@pytest.mark.parametrize("weights, io", [("autonat_tiny.pth", "main_io"), ("autonat_tiny_sharp.pth", "sharp_io")])
@torch.no_grad()
def test_forward_matches_the_original(weights, io, request):
    data = request.getfixturevalue(io)
    model = converted(weights)
    assert model.config.num_layers == 4 and model.config.num_classes == NULL_CLASS
    logits = model(data["fwd.masked_ids"], data["fwd.class_labels"]).logits
    assert logits.shape == (3, 256, 32)
    torch.testing.assert_close(logits, data["fwd.logits"], atol=1e-4, rtol=1e-4)
    logits64 = model.double()(data["fwd.masked_ids"], data["fwd.class_labels"]).logits
    torch.testing.assert_close(logits64, data["fwd.logits_f64"], atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_guided_logits_of_every_step_match_the_original(main_io):
    pipe = nat_pipeline(converted("autonat_tiny.pth"), META["gen.strategy"])
    labels = main_io["gen.class_labels"].reshape(-1)
    scales = META["gen.strategy"]["manual_cfg"]
    for step in range(8):
        ids = main_io[f"gen.step{step}.input_ids"]
        cond, uncond = pipe.transformer(torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, 10)]))[
            0
        ].chunk(2)
        guided = cond + scales[step] * (cond - uncond)
        torch.testing.assert_close(guided, main_io[f"gen.step{step}.cfg_logits"], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_deterministic_trace_is_identical_to_the_original(sharp_io, monkeypatch):
    """The sharp set's 8-step trace (T8 ratios and guidance, temperatures 0) through the pipeline: the ids fed to every
    step, the guided logits of every step and the final ids."""
    pipe = nat_pipeline(converted("autonat_tiny_sharp.pth"), META["sharp_trace"]["strategy"])
    calls = record_scheduler_inputs(pipe, monkeypatch)
    labels = sharp_io["gen.class_labels"].reshape(-1).tolist()
    final = pipe(class_labels=labels, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert len(calls) == 8
    for step, (guided, ids) in enumerate(calls):
        assert torch.equal(ids, sharp_io[f"gen.step{step}.input_ids"]), f"step {step}"
        torch.testing.assert_close(guided, sharp_io[f"gen.step{step}.cfg_logits"], atol=1e-4, rtol=1e-4)
    assert torch.equal(final.reshape(4, 256), sharp_io["gen.final_ids"])


@torch.no_grad()
def test_stochastic_trace_replays_the_original_draws(main_io, monkeypatch):
    """The main set's trace with AutoNAT-L's real temperatures: given the original's raw categorical samples and
    Gumbel draws, the scheduler's re-masking produces the original's ids at every step."""
    pipe = nat_pipeline(converted("autonat_tiny.pth"), META["gen.strategy"])
    calls = record_scheduler_inputs(pipe, monkeypatch)
    draws = {"sample": iter(range(8)), "gumbel": iter(range(7))}  # the last step has no Gumbel noise

    def original_sample(log_probs, uniform):
        return main_io[f"gen.step{next(draws['sample'])}.categorical_sample"]

    def original_gumbel(shape, generator, device):
        return main_io[f"gen.step{next(draws['gumbel'])}.gumbel"].float()

    monkeypatch.setattr(scheduling_masked_token, "sample_categorical", original_sample)
    monkeypatch.setattr(scheduling_masked_token, "gumbel_noise", original_gumbel)
    labels = main_io["gen.class_labels"].reshape(-1).tolist()
    final = pipe(class_labels=labels, output_type="latent").images
    for step, (_, ids) in enumerate(calls):
        assert torch.equal(ids, main_io[f"gen.step{step}.input_ids"]), f"step {step}"
    assert torch.equal(final.reshape(4, 256), main_io["gen.final_ids"])


def test_autonat_count_clamp_reveals_a_token_every_step():
    """AutoNAT clamps the kept count to [1, masked - 1]: equal ratios still make progress, a ratio of 0 before the
    last step keeps one token masked."""
    scheduler = MaskedTokenScheduler(mask_token_id=8, mask_ratios=[0.5, 0.5, 0.0], mask_temperatures=[0, 0, 0])
    scheduler.set_timesteps(4)
    ids = torch.full((2, 16), 8)
    counts = []
    for t in scheduler.timesteps:
        ids = scheduler.step(torch.randn(2, 16, 8), t, ids).prev_sample
        counts.append(int((ids == 8).sum(1)[0]))
    assert counts == [8, 7, 1, 0]


def test_released_autonat_layout_converts_with_the_preset():
    shapes = json.loads((FIXTURES / "original_keys" / "autonat_l_256.json").read_text())
    generator = torch.Generator().manual_seed(0)
    original = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}
    settings = convert.PRESETS["autonat-l-256"]
    model = convert.build_transformer(original, settings["num_attention_heads"])
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_attention_heads, config.codebook_size) == (
        768,
        24,
        8,
        1024,
    )
    assert (config.num_classes, config.sample_size) == (1000, 16)
    assert model.num_parameters() == sum(v.numel() for v in original.values()) - 1  # minus the [MASK] output bias
    state, mapped = model.state_dict(), convert.convert_nat_state_dict(original)
    assert state.keys() == mapped.keys() and all(torch.equal(state[key], mapped[key]) for key in state)
    ids = torch.randint(0, 1024, (1, 256))
    ids[:, :200] = model.mask_token_id
    with torch.no_grad():
        logits = model(ids, class_labels=torch.tensor([207])).logits
    assert logits.shape == (1, 256, 1024) and torch.isfinite(logits).all()


def test_cli_converts_an_autonat_checkpoint_pair_into_a_pipeline(tmp_path, monkeypatch):
    out = tmp_path / "autonat"
    code, stderr = call_converter(
        "--transformer-checkpoint",
        AUTONAT / "autonat_tiny.pth",
        "--vqgan-checkpoint",
        FIXTURES / "vqgan_tiny.ckpt",
        "--num-attention-heads",
        4,
        "--output-dir",
        out,
    )
    assert code == 0, stderr
    pipe = ENATPipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, NATTransformer2DModel)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3], num_inference_steps=4, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    ids = torch.full((1, 256), 32)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.transformer(ids, torch.tensor([3])).logits,
            converted("autonat_tiny.pth")(ids, torch.tensor([3])).logits,
        )
    from test_generate import generate_here

    code, stderr = generate_here(
        "--model",
        out,
        "--class-labels",
        1,
        2,
        "--steps",
        4,
        "--output-dir",
        "gen",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
    )  # the example CLI runs a NAT folder as it is (no reuse)
    assert code == 0, stderr
    assert len(list((tmp_path / "gen").glob("*.png"))) >= 2
    code, stderr = call_converter(
        "--transformer-checkpoint", AUTONAT / "autonat_tiny.pth", "--num-attention-heads", 4,
        "--num-encoder-layers", 2, "--output-dir", tmp_path / "x",
    )  # fmt: skip
    assert code != 0 and "no encoder/decoder split" in stderr
    code, stderr = call_converter(
        "--transformer-checkpoint",
        AUTONAT / "autonat_tiny.pth",
        "--preset",
        "enat-l-256",
        "--output-dir",
        tmp_path / "y",
    )
    assert code != 0 and "is an AUTONAT checkpoint" in stderr
    code, stderr = call_converter(
        "--transformer-checkpoint",
        FIXTURES / "enat_tiny.pth",
        "--preset",
        "autonat-l-256",
        "--output-dir",
        tmp_path / "z",
    )
    assert code != 0 and "for AUTONAT checkpoints" in stderr


def test_preset_scheduler_runs_autonat_l_t8():
    scheduler = MaskedTokenScheduler(mask_token_id=1024, **convert.PRESETS["autonat-l-256"]["scheduler"])
    assert scheduler.strategy_num_steps == 8
    scheduler.set_timesteps(8)
    assert scheduler.step_guidance_scales == META["gen.strategy"]["manual_cfg"]


@torch.no_grad()
def test_pipeline_without_reuse_save_load_and_clear_errors(tmp_path):
    pipe = nat_pipeline(converted("autonat_tiny.pth"), META["gen.strategy"])
    generator = torch.Generator().manual_seed(0)
    first = pipe(class_labels=[1, 2], output_type="latent", generator=generator).images
    with pytest.raises(ValueError, match="has no feature reuse"):
        pipe(class_labels=[1], reuse_features=True, output_type="latent")
    with pytest.raises(ValueError, match="no feature reuse"):
        pipe.transformer(torch.full((1, 256), 32), torch.tensor([1]), reuse_state=object())
    with pytest.raises(ValueError, match="outside"):
        pipe.transformer(torch.full((1, 256), 33), torch.tensor([1]))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ENATPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.transformer, NATTransformer2DModel)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(class_labels=[1, 2], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(first, again) and first.shape == (2, 16, 16)


def test_diffusers_attention_processors_and_lora():
    """The blocks are diffusers' own: attention processors can be swapped, PEFT adapters attach to to_q/to_v."""
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig

    model = converted("autonat_tiny.pth")
    ids, labels = torch.full((2, 256), 32), torch.tensor([1, 10])
    ids[:, :100] = torch.randint(0, 32, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, labels).logits
        model.set_attn_processor(AttnProcessor())  # the plain (non-SDPA) processor computes the same
        torch.testing.assert_close(model(ids, labels).logits, reference, atol=1e-5, rtol=1e-5)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with torch.no_grad():
        assert not torch.allclose(model(ids, labels).logits, reference, atol=1e-3)


def test_training_step_with_gradient_checkpointing():
    model = converted("autonat_tiny.pth").train()
    model.enable_gradient_checkpointing()
    ids = torch.full((2, 256), 32)
    loss = model(ids, torch.tensor([0, 10])).logits.logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@torch.no_grad()
def test_editing_pipelines_run_a_nat_and_keep_the_known_tokens():
    from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, box_mask

    components = nat_pipeline(converted("autonat_tiny.pth"), META["gen.strategy"]).components
    components["scheduler"] = MaskedTokenScheduler(mask_token_id=32)  # an ENAT-formula schedule adapts to the edit
    inpaint = ENATInpaintPipeline(**components)
    inpaint.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = box_mask(32, 32, (0, 0, 16, 16))  # the top-left quarter of the tokens
    token_mask = inpaint.get_token_mask(mask)[0].reshape(-1)
    encoded = inpaint.encode_image(image)[0].reshape(-1)
    ids = inpaint(class_labels=[4], image=image, mask_image=mask, output_type="latent").images[0].reshape(-1)
    assert torch.equal(ids[~token_mask], encoded[~token_mask]) and token_mask.sum() == 64
    img2img = ENATImg2ImgPipeline(**components)
    img2img.set_progress_bar_config(disable=True)
    edited = img2img(class_labels=[4], image=image, strength=0.5, output_type="latent").images
    assert edited.shape == (1, 16, 16) and (edited.reshape(-1) != encoded).any()


def text_nat(**overrides) -> NATTransformer2DModel:
    """A tiny text-to-image NAT whose attention is far from uniform (query and key weights scaled up)."""
    torch.manual_seed(0)
    config = dict(sample_size=4, codebook_size=8, hidden_size=32, num_attention_heads=2, num_layers=2, mlp_ratio=2.0)
    model = NATTransformer2DModel(**{**config, "num_classes": None, "text_embed_dim": 16, **overrides}).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".to_q." in name or ".to_k." in name:
                parameter.mul_(30)
    return model


def text_inputs(batch_size=2, text_length=5):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (batch_size, 16), generator=generator)  # 8 = [MASK]
    text = torch.randn(batch_size, text_length, 16, generator=generator)
    return ids, text, torch.randn(batch_size, 16, generator=generator)


@torch.no_grad()
def test_text_nat_reads_both_text_embeddings_and_checks_its_condition():
    model = text_nat()
    ids, text, pooled = text_inputs()
    logits = model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits
    assert logits.shape == (2, 16, 8) and torch.isfinite(logits).all()
    # the pooled token and the text tokens are both read; neither is predicted
    assert not torch.allclose(model(ids, encoder_hidden_states=text, pooled_text_embeds=-pooled).logits, logits)
    assert not torch.allclose(model(ids, encoder_hidden_states=-text, pooled_text_embeds=pooled).logits, logits)
    # rows are independent: the first row alone gives the same logits
    alone = model(ids[:1], encoder_hidden_states=text[:1], pooled_text_embeds=pooled[:1]).logits
    torch.testing.assert_close(alone, logits[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="text-to-image model"):
        model(ids, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text-to-image model"):
        model(ids, pooled_text_embeds=pooled)
    with pytest.raises(ValueError, match=r"pooled_text_embeds must have shape \(2, 16\)"):
        model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled[:, :8])
    with pytest.raises(ValueError, match="encoder_hidden_states must have shape"):
        model(ids, encoder_hidden_states=text[:1], pooled_text_embeds=pooled)
    with pytest.raises(ValueError, match="class-conditional model"):
        converted("autonat_tiny.pth")(torch.full((1, 256), 32), torch.tensor([1]), pooled_text_embeds=pooled[:1])
    with pytest.raises(ValueError, match="exactly one of num_classes"):
        text_nat(num_classes=10)
    with pytest.raises(ValueError, match="exactly one of num_classes"):
        text_nat(text_embed_dim=None)


@torch.no_grad()
def test_rotary_nat_rotates_image_queries_and_keys_by_grid_position():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from enat_diffusers.models.transformer_nat import NATRotaryAttnProcessor

    model = text_nat(use_rotary_positional_embeddings=True)
    assert all(isinstance(p, NATRotaryAttnProcessor) for p in model.attn_processors.values())
    ids, text, pooled = text_inputs()
    rotated = model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits
    plain = text_nat()  # the same weights (same seed), without the rotations
    unrotated = plain(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits
    assert not torch.allclose(rotated, unrotated, atol=1e-4)
    # without rotations the processor computes what diffusers' own does
    plain.set_attn_processor(NATRotaryAttnProcessor())
    torch.testing.assert_close(
        plain(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits, unrotated, atol=1e-5, rtol=1e-5
    )
    # every block gets the rotations of [pooled, 5 text tokens, 16 image tokens in raster order]: none for the
    # condition tokens, the grid table's rows for the image tokens
    seen = []

    class Recording(NATRotaryAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            seen.append(rotary_emb)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    model.set_attn_processor(Recording())
    torch.testing.assert_close(model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits, rotated)
    cos, sin = grid_rotary_table(4, 16)
    assert len(seen) == 3  # in-block, mid-block, out-block
    for rotary_cos, rotary_sin in seen:
        assert rotary_cos.shape == rotary_sin.shape == (1, 22, 16)
        assert torch.equal(rotary_cos[0, :6], torch.ones(6, 16)) and torch.equal(rotary_sin[0, :6], torch.zeros(6, 16))
        assert torch.equal(rotary_cos[0, 6:], cos[:16]) and torch.equal(rotary_sin[0, 6:], sin[:16])
    model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="do not take them"):
        model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled)
    with pytest.raises(ValueError, match="head width divisible by 4"):
        text_nat(hidden_size=12, num_attention_heads=2, use_rotary_positional_embeddings=True)
