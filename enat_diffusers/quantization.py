# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Quantized sampling on CPUs: what stays float32, and FBGEMM's int8 GEMM for torchao's int8 weights.

Quantize a pipeline the diffusers way, with torchao's int8 dynamic form, and keep `KEEP_FLOAT32` out of it:

    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    config = TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=KEEP_FLOAT32)
    pipe = ENATPipeline.from_pretrained(
        path, quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": config}),
        dtype=torch.float32,
    )
    pipe.save_pretrained("model-int8")  # int8 weights (safetensors); loads again without any config

torchao multiplies int8 activations by int8 weights with `torch._int_mm`. On a CPU without AVX512-VNNI or AMX,
torch has no fast kernel for it (on an AVX2 CPU it runs tens of times slower than float32), while FBGEMM, torch's
own int8 library, does the same products at about twice float32's speed. `use_fbgemm_int8` moves the loaded int8
weights, unchanged, into FBGEMM's packed format:

    pipe = ENATPipeline.from_pretrained("model-int8", dtype=torch.float32)
    use_fbgemm_int8(pipe.transformer)

The activations are then quantized per row at every call, as torchao does, but in 7 bits (FBGEMM's x86 scheme,
so that its AVX2 kernels cannot overflow). `benchmarks/benchmark_quantization.py` measures which form
is fastest on the CPU it runs on, and `benchmarks/quantization_quality.py` bounds each form's accuracy.
"""

import warnings
from typing import List

import torch
from torch import nn


# The modules that stay float32 in every quantized form (measured: benchmarks/README.md, "What stays float32"): the
# adaLN modulation, the output head's dense layer, the text and pooled-text embedders, and ENAT's `prev_proj`.
KEEP_FLOAT32: List[str] = ["adaLN_modulation", "mlm_head", "context_embedder", "pooled_text_embedder", "prev_proj"]


def _int8_weight(weight):
    """`(int8 values (out, in), float scales (out,))` of a torchao int8 weight with one scale per output row and no
    zero point; `None` for any other weight."""
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:  # torchao is optional: without it nothing can be an int8 torchao weight
        return None
    if not isinstance(weight, Int8Tensor):
        return None
    qdata, scale, zero_point = weight.qdata, weight.scale, weight.zero_point
    if qdata.dim() != 2 or tuple(weight.block_size) != (1, qdata.shape[1]):
        raise ValueError(
            f"use_fbgemm_int8 needs one scale per output channel (torchao's default PerRow granularity); this weight "
            f"has blocks of {list(weight.block_size)} in a {list(qdata.shape)} matrix."
        )
    if zero_point is not None and bool((zero_point != 0).any()):
        raise ValueError("use_fbgemm_int8 needs symmetric int8 weights (zero points 0), as torchao's int8 forms make.")
    return qdata, scale.reshape(-1)


def use_fbgemm_int8(model: nn.Module) -> int:
    r"""
    Runs every `nn.Linear` of `model` whose weight is a torchao int8 weight (`Int8DynamicActivationInt8WeightConfig`
    or `Int8WeightOnlyConfig`, as loaded from a quantized folder) with FBGEMM's dynamic int8 GEMM, in place.

    The int8 weights and their per-channel scales are kept exactly; the layer is replaced by an `FBGEMMInt8Linear`,
    which quantizes its input per row at every call and multiplies in int8 on the CPU. Linear layers with float
    weights (e.g. `KEEP_FLOAT32`) are left as they are. The result samples on the CPU only, and cannot be saved with
    `save_pretrained` (it raises): save the torchao form before calling this.

    Returns:
        `int`: the number of layers replaced.

    Raises:
        `ValueError`: when `model` has no torchao int8 linear layer, or one of a layout FBGEMM cannot take.
        `RuntimeError`: when this torch build has no FBGEMM engine.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"This torch build has no FBGEMM engine (supported: {torch.backends.quantized.supported_engines})."
        )
    targets = {}  # name -> (int8 values, scales, bias), all read before any layer is replaced
    for name, module in model.named_modules():
        weight = _int8_weight(module.weight) if isinstance(module, nn.Linear) else None
        if weight is not None:
            if weight[0].device.type != "cpu":
                raise ValueError(f"FBGEMM runs on the CPU; the weight of {name} is on {weight[0].device}.")
            targets[name] = (*weight, module.bias)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no torchao int8 linear layer: load it with a TorchAoConfig of "
            "Int8DynamicActivationInt8WeightConfig (or Int8WeightOnlyConfig), or from a folder saved so."
        )
    for name, (qdata, scale, bias) in targets.items():
        model.set_submodule(name, FBGEMMInt8Linear(qdata, scale, bias))
    _fuse_projections(model, targets)
    return len(targets)


def _fuse_projections(model: nn.Module, targets: dict):
    """
    Fuses the int8 projections that read the same input (an ENAT attention's query/key/value, and its context
    key/value) into one FBGEMM layer each, as `fuse_projections` does in float: the input is quantized once and the
    GEMM is wider. Per output channel the products, scales and biases are those of the separate layers, which stay
    (`unfuse_projections` goes back to them).
    """
    for name, module in model.named_modules():
        groups = getattr(module, "fused_projection_parts", None)
        if groups is None or module.fused_projections:
            continue
        fused = {}
        for fused_name, part_names in groups.items():
            parts = [targets.get(f"{name}.{part}") for part in part_names]
            if any(part is None for part in parts) or len({part[2] is None for part in parts}) > 1:
                break  # not all int8, or with and without bias: the separate layers stay in use
            qdata, scale, bias = (None if values[0] is None else torch.cat(values) for values in zip(*parts))
            fused[fused_name] = FBGEMMInt8Linear(qdata, scale, bias)
        else:
            for fused_name, layer in fused.items():
                setattr(module, fused_name, layer)
            module.fused_projections = True


class FBGEMMInt8Linear(nn.Module):
    r"""
    A linear layer with int8 weights (one scale per output channel) that multiplies in int8 with FBGEMM, its inputs
    quantized per row at every call.

    FBGEMM's dynamic GEMM quantizes its input per tensor (7 bits on x86). Each row is first divided by its largest
    magnitude and the product multiplied by it again, which makes that per-row quantization: one outlier row (a
    text token, say) no longer coarsens the steps of every other row.
    """

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias):
        super().__init__()
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        with warnings.catch_warnings():  # torch's quantized tensors are deprecated in favour of torchao; still shipped
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                qdata, scale.double(), torch.zeros_like(scale, dtype=torch.long), axis=0
            )
            self._packed = torch.ops.quantized.linear_prepack(weight, None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        """The int8 weight as a per-channel quantized tensor."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.float()
        # the largest magnitude of each row; amax and amin are vectorised reductions on the CPU, unlike abs().amax(),
        # aminmax and the infinity norm, which cost ten times more here
        row_max = torch.maximum(hidden_states.amax(-1, keepdim=True), hidden_states.amin(-1, keepdim=True).neg())
        row_max = row_max.clamp_min(torch.finfo(torch.float32).tiny)
        output = torch.ops.quantized.linear_dynamic(hidden_states / row_max, self._packed, True)
        return output.mul_(row_max) if self.bias is None else torch.addcmul(self.bias, output, row_max, out=output)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            "A layer prepared by use_fbgemm_int8 cannot be saved (FBGEMM's packed weights): save the torchao int8 "
            "form (the folder it was loaded from) instead."
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
