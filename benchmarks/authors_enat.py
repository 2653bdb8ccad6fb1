"""The authors' own ENAT code (a checkout of LeapLabTHU/ENAT, never vendored here) as a benchmark variant.

`benchmark_sampling.py --original-repo DIR` imports `DIR/libs/models.py` (`DiT`) and `DIR/libs/nat_misc.py`
(`NATSchedule`), loads the benchmark's original-format weights into `DiT` with `strict=True` and samples with
`NATSchedule.generate`, exactly as the authors' `train.py` evaluation does. The checkout's own `timm/` (the authors
modified it: multiway key/value projections) must win over any installed timm, so nothing named `libs` or `timm`
may be imported before; the code also needs `einops`.

The vendored timm imports `torchvision` at import time (`timm/data/transforms.py`, `transforms_factory.py`: image
transforms for training data, never used by sampling), and no torchvision build may match the installed torch (the
CPU wheel of torch has none on the package index). Where torchvision is missing, `import_authors_code` puts a
stand-in into `sys.modules` for the duration of that import only, and removes it afterwards: a module whose every
attribute access raises an error that names the shim. It is limited to this benchmark; nothing else sees it.

`NATSchedule.generate` hard-codes the unconditional label 1000 (ImageNet's), so a model with fewer classes (the tiny
fixture: 10 classes + null) gets its label table padded to 1001 rows with its null row last: the computation for its
real labels and for the null label is unchanged.
"""

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from original_enat import architecture


NULL_LABEL = 1000  # `NATSchedule.generate`'s `empty_ctx`
REQUIRED_FILES = ("libs/models.py", "libs/nat_misc.py")


TORCHVISION_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _MissingTorchvision(ModuleType):
    """Stands in for torchvision while the authors' timm is imported; any use raises."""

    def __getattr__(self, name):
        if name.startswith("__"):  # import machinery probes (__path__, __spec__ ...)
            raise AttributeError(name)
        raise RuntimeError(
            f"{self.__name__}.{name}: torchvision is not installed; the ENAT benchmark's import shim stood in for it "
            "only so that the authors' timm could be imported (sampling never uses it)"
        )


@contextlib.contextmanager
def torchvision_shim():
    """Import-time stand-ins for torchvision's modules when it is not installed (removed on exit)."""
    if importlib.util.find_spec("torchvision") is not None:
        yield False
        return
    shims = {name: _MissingTorchvision(name) for name in TORCHVISION_MODULES}
    shims["torchvision"].transforms = shims["torchvision.transforms"]
    shims["torchvision.transforms"].functional = shims["torchvision.transforms.functional"]
    sys.modules.update(shims)
    try:
        yield True
    finally:
        for name, module in shims.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_authors_code(repo: Path):
    """(`libs.models`, `libs.nat_misc`) imported from the checkout `repo`, with clear errors for what is wrong."""
    repo = Path(repo).resolve()
    missing = [name for name in REQUIRED_FILES if not (repo / name).is_file()]
    if missing:
        raise SystemExit(f"--original-repo {repo}: no {', '.join(missing)} (expected a checkout of LeapLabTHU/ENAT)")
    clashing = sorted(name for name in sys.modules if name.split(".")[0] in ("libs", "timm"))
    if clashing:
        raise SystemExit(
            f"--original-repo: {clashing[0]} is already imported; the authors' libs/ and timm/ must be imported "
            "from the checkout"
        )
    sys.path.insert(0, str(repo))
    try:
        with torchvision_shim():
            models = importlib.import_module("libs.models")
            nat_misc = importlib.import_module("libs.nat_misc")
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"--original-repo {repo}: the authors' code needs the module {error.name!r} (pip install {error.name})"
        ) from error
    for module in (models, nat_misc):
        if not Path(module.__file__).resolve().is_relative_to(repo):
            raise SystemExit(f"--original-repo {repo}: {module.__name__} was imported from {module.__file__}")
    return models, nat_misc


class AuthorsENAT:
    """The authors' `DiT` holding an original-format state dict, and their sampler around it."""

    def __init__(self, code, state_dict: dict, num_heads: int, num_encoder_blocks: int):
        """code: `import_authors_code(repo)`; the state dict is loaded with `strict=True`."""
        self.models, self.nat_misc = code
        shapes = architecture(state_dict, num_encoder_blocks)
        state_dict = dict(state_dict)
        table = state_dict["y_embedder.embedding_table.weight"]  # (num_classes + 1, D), null row last
        if shapes["num_classes"] < NULL_LABEL:
            padded = table.new_zeros(NULL_LABEL + 1, table.shape[1])
            padded[: shapes["num_classes"]] = table[:-1]
            padded[NULL_LABEL] = table[-1]
            state_dict["y_embedder.embedding_table.weight"] = padded
            shapes["num_classes"] = NULL_LABEL
        self.side, self.codebook_size = shapes["input_size"], shapes["codebook_size"]
        enc_dec = list(shapes.pop("enc_dec"))
        self.args = SimpleNamespace(enc_dec=enc_dec, seq_len=self.side**2)
        self.model = self.models.DiT(num_heads=num_heads, depth=sum(enc_dec), args=self.args, **shapes)
        self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()

    def to(self, device: torch.device, dtype: torch.dtype) -> "AuthorsENAT":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, steps: int, cfg_scale: float, mask_temp: float, samp_temp: float):
        """`NATSchedule.generate` with the sampling settings; labels (n,) -> final sampled ids (n, L).

        Randomness as in the original: torch's global RNG (Categorical) and NumPy's global RNG (Gumbel); seed both.
        """
        args = SimpleNamespace(**vars(self.args), cfg_scale=cfg_scale, mask_temp=mask_temp, samp_temp=samp_temp)
        schedule = self.nat_misc.NATSchedule(self.codebook_size, labels.device, args=args)
        n = labels.shape[0]
        return schedule.generate(
            steps, n, self.model, lambda ids: ids.reshape(n, -1), self.side, context=labels.reshape(n, 1)
        )
