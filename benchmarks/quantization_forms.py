"""The numeric forms that the quantization benchmarks compare, built the diffusers way, and the CPU they run on.

Every quantized form goes through diffusers' own mechanism: `TorchAoConfig(<torchao config>,
modules_to_not_convert=KEEP_FLOAT32)` handed to `from_pretrained` (of the transformer, or of the pipeline through
`PipelineQuantizationConfig`). torchao then replaces the weight of every other `nn.Linear` by a quantized tensor;
the activations (and every module kept out) stay float32.

* `float32`: the reference.
* `bfloat16`: the whole transformer cast to bfloat16 (weights and activations).
* `int8-dynamic`: int8 weights (a scale per output channel); at every call the activations are quantized per row
  and multiplied in int8 x int8 -> int32 (`torch._int_mm`).
* `int8-weight-only`: int8 weights, converted back to float32 at every call; float32 matmul.
* `float8-weight-only`: float8 e4m3 weights (a scale per output channel), converted back at every call.
* `float8-dynamic`: float8 weights and activations (`torch._scaled_mm`); torchao refuses it without a CUDA GPU of
  compute capability 8.9 or more (or MI300, XPU).
* `int8-dynamic-fbgemm`: the `int8-dynamic` weights as loaded, moved into FBGEMM's int8 GEMM after loading
  (`enat_diffusers.quantization.use_fbgemm_int8`): activations quantized per row (7 bits) at every call. The saved
  folder is `int8-dynamic`'s; only the kernel differs, for CPUs where `torch._int_mm` has no fast kernel (README.md).

`KEEP_FLOAT32` (`enat_diffusers.quantization`), the modules no form quantizes, is measured by
`quantization_quality.py --keep-study` (the results: README.md, "Quantization"). The token and class embeddings are
`nn.Embedding` tables (and the head scores against the token table): torchao never quantizes them.
"""

import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from enat_diffusers.quantization import KEEP_FLOAT32, use_fbgemm_int8


class FormRefused(Exception):
    """torchao refuses the form on this machine."""


@dataclass(frozen=True)
class Form:
    """A numeric form: the dtype the transformer is loaded in and, for a torchao form, its torchao config."""

    name: str
    dtype: torch.dtype
    torchao: Optional[Callable[[], object]] = None  # -> a torchao `AOBaseConfig`
    fbgemm: bool = False  # its int8 weights run with FBGEMM's int8 GEMM after loading (`use_fbgemm_int8`)


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _float8_dynamic():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return Float8DynamicActivationFloat8WeightConfig()


def _float8_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


FORMS: Dict[str, Form] = {
    form.name: form
    for form in (
        Form("float32", torch.float32),
        Form("bfloat16", torch.bfloat16),
        Form("int8-dynamic", torch.float32, _int8_dynamic),
        Form("int8-weight-only", torch.float32, _int8_weight_only),
        Form("float8-dynamic", torch.float32, _float8_dynamic),
        Form("float8-weight-only", torch.float32, _float8_weight_only),
        Form("int8-dynamic-fbgemm", torch.float32, _int8_dynamic, fbgemm=True),
    )
}


def torchao_config(form: Form, keep_float32: Sequence[str] = KEEP_FLOAT32):
    """diffusers' `TorchAoConfig` of a torchao form (None for the others)."""
    if form.torchao is None:
        return None
    from diffusers import TorchAoConfig

    return TorchAoConfig(form.torchao(), modules_to_not_convert=list(keep_float32))


def load_transformer(path, form: Form, keep_float32: Sequence[str] = KEEP_FLOAT32, subfolder=None):
    """`ENATTransformer2DModel.from_pretrained` in `form` (quantized on load by diffusers for a torchao form).

    Raises `FormRefused` for a form that torchao refuses here (e.g. float8 dynamic without a recent CUDA GPU).
    """
    from diffusers.utils import logging

    from enat_diffusers import ENATTransformer2DModel

    config = torchao_config(form, keep_float32)
    kwargs = {} if config is None else {"quantization_config": config}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that integer forms want bfloat16 activations: float32 is meant
    try:
        transformer = ENATTransformer2DModel.from_pretrained(path, subfolder=subfolder, dtype=form.dtype, **kwargs)
    except (AssertionError, NotImplementedError, RuntimeError) as error:
        raise FormRefused(f"{form.name}: torchao refuses it here: {error}") from error
    finally:
        logging.set_verbosity(verbosity)
    if form.fbgemm:
        use_fbgemm_int8(transformer)
    return transformer.eval()


def quantized_linear(form: Form, in_features: int, out_features: int, generator: torch.Generator):
    """One `nn.Linear` in `form` (random weights): the probe of the form's kernel."""
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=generator)
        linear.bias.zero_()
    if form.torchao is not None:
        from torchao.quantization import quantize_

        linear = torch.nn.Sequential(linear)  # a container, so that use_fbgemm_int8 can replace the layer
        quantize_(linear, form.torchao())
        if form.fbgemm:
            use_fbgemm_int8(linear)
        return linear[0]
    return linear.to(form.dtype)


def cpu_description() -> Dict[str, object]:
    """The CPU by name, its vector/matrix extensions that matter here, and torch's view of it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        model = match.group(1).strip() if match else model
        match = re.search(r"^Flags:\s*(.+)$", lscpu, re.M)
        flags = set(match.group(1).split()) if match else set()
    except (OSError, subprocess.CalledProcessError):
        pass
    wanted = [flag for flag in sorted(flags) if flag.startswith(("avx512", "amx")) or flag in ("avx2", "avx_vnni")]
    return {
        "model": model,
        "flags": wanted,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def describe_cpu(info: Dict[str, object]) -> str:
    flags = " ".join(info["flags"]) or "none of avx2/avx512*/amx*"
    return (
        f"CPU: {info['model']} | flags: {flags} | torch CPU capability: {info['torch_cpu_capability']} | "
        f"{info['threads']} threads"
    )
