"""Quantized sampling the diffusers way: `from_pretrained(..., quantization_config=...)` with torchao.

A tiny pipeline is saved, loaded with its transformer quantized (the whole pipeline through
`PipelineQuantizationConfig`, or the transformer alone through `TorchAoConfig`), sampled, saved again (safetensors)
and loaded without any config. At temperature 0 (argmax sampling and argmax reveal), its token ids agree with float32's
on at least 85 % of the positions (int8 dynamic: 93 %, int8 weight-only: 99 % on these tiny random models; 4 steps and
guidance let a flipped token change what is revealed later, so agreement is below the per-step one). A saved int8
folder's weights, moved into FBGEMM's int8 GEMM (`use_fbgemm_int8`), keep their values and scales and sample as close.
"""

import pytest
import torch
from conftest import tiny_class_pipeline, tiny_vqvae
from diffusers import PipelineQuantizationConfig, TorchAoConfig
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig, quantize_
from torchao.utils import TorchAOBaseTensor

from enat_diffusers import ENATPipeline, ENATTransformer2DModel, MaskedTokenScheduler, NATTransformer2DModel
from enat_diffusers.models.transformer_enat import ENATAttention
from enat_diffusers.quantization import KEEP_FLOAT32, FBGEMMInt8Linear, use_fbgemm_int8


MIN_AGREEMENT = 0.85
LABELS = list(range(10)) * 2
CONFIGS = {"int8-dynamic": Int8DynamicActivationInt8WeightConfig, "int8-weight-only": Int8WeightOnlyConfig}


def tiny_nat_pipeline() -> ENATPipeline:
    torch.manual_seed(0)
    transformer = NATTransformer2DModel(
        sample_size=4, codebook_size=8, hidden_size=32, num_attention_heads=2, num_layers=2, mlp_ratio=2.0
    )
    with torch.no_grad():  # as conftest.tiny_transformer: every parameter matters
        for param in transformer.parameters():
            param.add_(0.2 * torch.randn_like(param))
    pipe = ENATPipeline(transformer.eval(), MaskedTokenScheduler(mask_token_id=8), tiny_vqvae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> torch.Tensor:
    return pipe(
        class_labels=LABELS,
        num_inference_steps=4,
        guidance_scale=2.0,
        mask_temperature=0.0,
        sampling_temperature=0.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def linear_weights(transformer) -> dict:
    return {name: module.weight for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}


def as_float(weight: torch.Tensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, TorchAOBaseTensor) else weight


def assert_quantized(transformer):
    """Every linear layer outside KEEP_FLOAT32 holds a torchao tensor; the kept ones hold float32 parameters."""
    weights = linear_weights(transformer)
    kept = {name for name in weights if any(f"{keep}." in f"{name}." for keep in KEEP_FLOAT32)}
    assert kept and len(kept) < len(weights)
    for name, weight in weights.items():
        if name in kept:
            assert not isinstance(weight, TorchAOBaseTensor) and weight.dtype == torch.float32, name
        else:
            assert isinstance(weight, TorchAOBaseTensor), name


@pytest.mark.parametrize("form", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["enat", "nat"])
@torch.no_grad()
def test_quantized_pipeline_saves_loads_and_samples_close_to_float32(tmp_path, kind, form):
    pipe = tiny_class_pipeline() if kind == "enat" else tiny_nat_pipeline()
    pipe.save_pretrained(tmp_path / "float32")
    reference = sample(pipe)

    config = TorchAoConfig(CONFIGS[form](), modules_to_not_convert=KEEP_FLOAT32)
    quantization_config = PipelineQuantizationConfig(quant_mapping={"transformer": config})
    # dtype: without it, diffusers loads a torchao-quantized model's other layers in bfloat16
    quantized = ENATPipeline.from_pretrained(
        tmp_path / "float32", quantization_config=quantization_config, dtype=torch.float32
    )
    quantized.set_progress_bar_config(disable=True)
    assert_quantized(quantized.transformer)
    assert quantized.vqvae.dtype == torch.float32
    ids = sample(quantized)
    agreement = (ids == reference).float().mean().item()
    assert agreement >= MIN_AGREEMENT

    quantized.save_pretrained(tmp_path / "quantized")  # safetensors (torchao's flattened tensors)
    assert (tmp_path / "quantized" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    # the folder's config says how it is quantized
    reloaded = ENATPipeline.from_pretrained(tmp_path / "quantized", dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    assert_quantized(reloaded.transformer)
    saved = linear_weights(quantized.transformer)
    for name, weight in linear_weights(reloaded.transformer).items():
        assert type(weight) is type(saved[name]) and torch.equal(as_float(weight), as_float(saved[name])), name
    assert torch.equal(sample(reloaded), ids)


@torch.no_grad()
def test_the_transformer_alone_takes_a_torchao_config(tmp_path):
    pipe = tiny_class_pipeline()
    pipe.transformer.save_pretrained(tmp_path)
    config = TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=KEEP_FLOAT32)
    transformer = ENATTransformer2DModel.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    assert_quantized(transformer)
    # a forward that reuses the state of a step where nothing was visible (an empty context for the encoder)
    masked = torch.full((2, 16), 8)
    first = transformer(masked, class_labels=torch.tensor([1, 10]))
    partly = masked.clone()
    partly[:, :3] = torch.tensor([1, 2, 3])
    reused = transformer(partly, class_labels=torch.tensor([1, 10]), reuse_state=first.reuse_state).logits
    expected = pipe.transformer(partly, class_labels=torch.tensor([1, 10])).logits
    error = (reused - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.05


@pytest.mark.parametrize("kind", ["enat", "nat"])
@torch.no_grad()
def test_saved_int8_folder_runs_with_fbgemm_close_to_float32(tmp_path, kind):
    pipe = tiny_class_pipeline() if kind == "enat" else tiny_nat_pipeline()
    reference = sample(pipe)
    config = TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=KEEP_FLOAT32)
    pipe.transformer.save_pretrained(tmp_path / "float32")
    transformer = type(pipe.transformer).from_pretrained(
        tmp_path / "float32", quantization_config=config, dtype=torch.float32
    )
    transformer.save_pretrained(tmp_path / "int8")
    transformer = type(pipe.transformer).from_pretrained(tmp_path / "int8", dtype=torch.float32)
    saved = {name: weight for name, weight in linear_weights(transformer).items() if isinstance(weight, Int8Tensor)}

    assert use_fbgemm_int8(transformer) == len(saved) > 0
    for name, module in transformer.named_modules():
        if name in saved:  # the saved int8 values and scales, unchanged, in FBGEMM's packed form
            assert isinstance(module, FBGEMMInt8Linear), name
            weight = module.weight()
            assert torch.equal(weight.int_repr(), saved[name].qdata), name
            assert torch.allclose(weight.q_per_channel_scales().float(), saved[name].scale.flatten()), name
        elif isinstance(module, torch.nn.Linear):  # KEEP_FLOAT32
            assert module.weight.dtype == torch.float32 and not isinstance(module.weight, TorchAOBaseTensor), name
    pipe.transformer = transformer
    ids = sample(pipe)
    assert (ids == reference).float().mean().item() >= MIN_AGREEMENT

    with pytest.raises(ValueError, match="no torchao int8 linear layer"):
        use_fbgemm_int8(transformer)  # nothing left to replace
    with pytest.raises(RuntimeError, match="cannot be saved"):
        transformer.save_pretrained(tmp_path / "fbgemm")  # not silently without its weights


def quantized_outside_keep(module, name) -> bool:
    return isinstance(module, torch.nn.Linear) and not any(f"{keep}." in f"{name}." for keep in KEEP_FLOAT32)


@torch.no_grad()
def test_fbgemm_fuses_each_attentions_projections_without_changing_the_result():
    pipe = tiny_class_pipeline()
    quantize_(pipe.transformer, Int8DynamicActivationInt8WeightConfig(), filter_fn=quantized_outside_keep)
    use_fbgemm_int8(pipe.transformer)
    attentions = [module for module in pipe.transformer.modules() if isinstance(module, ENATAttention)]
    assert attentions and all(attn.fused_projections for attn in attentions)
    for attn in attentions:  # each fused layer: its parts' int8 rows, scales and biases, in order
        for fused_name, part_names in attn.fused_projection_parts.items():
            fused, parts = getattr(attn, fused_name), [getattr(attn, part) for part in part_names]
            assert torch.equal(fused.weight().int_repr(), torch.cat([p.weight().int_repr() for p in parts]))
            assert torch.equal(
                fused.weight().q_per_channel_scales(), torch.cat([p.weight().q_per_channel_scales() for p in parts])
            )
            assert torch.equal(fused.bias, torch.cat([p.bias for p in parts]))
    fused_ids = sample(pipe)
    for attn in attentions:
        attn.unfuse_projections()  # back to the separate FBGEMM layers
    assert torch.equal(fused_ids, sample(pipe))


def test_fbgemm_linear_quantizes_each_input_row_on_its_own_scale():
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(linear, Int8DynamicActivationInt8WeightConfig())
    use_fbgemm_int8(linear)
    inputs = torch.randn(3, 64) * torch.tensor([[1.0], [1000.0], [0.001]])  # rows 6 orders of magnitude apart
    expected = torch.nn.functional.linear(inputs, linear[0].weight().dequantize(), linear[0].bias)
    output = linear(inputs)
    for row in range(3):  # per-tensor quantization would round the first and last rows to almost nothing
        error = (output[row] - expected[row]).norm() / (expected[row] - linear[0].bias).norm()
        assert error < 0.03, (row, error)
