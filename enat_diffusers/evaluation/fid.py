# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""FID and Inception Score of image sets, and CLIP score of image-text pairs (the library of `examples/evaluate.py`).

Implementation: **torchmetrics' `FrechetInceptionDistance` and `InceptionScore` on torch-fidelity's InceptionV3.**

- The network is torch-fidelity's `FeatureExtractorInceptionV3`, the PyTorch port of the TensorFlow Inception that
  the original FID and IS code (and ADM's evaluator) use. It takes the standard weights file
  `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's name; torch-fidelity's copy carries the same hash, the start
  of its SHA-256), takes uint8 images of any size and resizes them to 299 x 299 itself with TensorFlow 1's bilinear
  resize, and gives in one forward pass the 2048-d pool features (FID) and the unbiased logits (IS).
- The scores are torchmetrics': FID from float64 statistics with the eigenvalue form of the matrix square root (for
  2048-d features a 2048 x 2048 eigenvalue problem, about 10 s on one CPU thread), IS over 10 splits.
  torchmetrics' own Inception wrapper is not used: by default it resizes with antialiasing, which departs from the
  standard resize.
- Not chosen: clean-fid loads its own TorchScript Inception file, not pt_inception, and resizes differently;
  pytorch-fid (what ENAT's `train.py` evaluates with, on float images) builds its network from torchvision. torchvision
  has no build for CPU-only torch on the package index, and torch-fidelity's package `__init__` imports it for its
  CLIP, VGG and DINOv2 extractors: where torchvision is missing, `_import_torch_fidelity` registers the package without
  running that `__init__`, so that the InceptionV3 module, which needs torch alone, imports (torchmetrics imports it
  too).

So FIDs here follow the TensorFlow protocol of ADM's reference statistics (uint8 images, TF resize); ENAT's own
numbers come from float images resized by `F.interpolate`, which differs slightly.

CLIP score is torchmetrics' definition (mean over images of 100 * cos(image embedding, text embedding), floored at
0), computed with the CLIP model's own forward: torchmetrics' `CLIPScore` calls `get_image_features`, which returns an
output object instead of a tensor in transformers 5.
"""

import hashlib
import importlib.util
import io
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn


def _import_torch_fidelity():
    """Imports torch-fidelity, or where torchvision is missing registers its package without running `__init__`."""
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise
        spec = importlib.util.find_spec("torch_fidelity")
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)


_import_torch_fidelity()

from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402
from torchmetrics.image.inception import InceptionScore  # noqa: E402


INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
# the Inception features that FID can use (torchmetrics' `feature` choices): 2048 (pool3) is the standard one; the
# smaller ones (the average-pooled outputs of earlier blocks) give full-rank covariances from far fewer images
FEATURE_DIMS = (64, 192, 768, 2048)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class _FromStateDict(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3, with weights from a state dict read with `weights_only=True`.

    (torch-fidelity reads a weights path with `weights_only=False`; here it is handed an in-memory copy of the state
    dict that was already read safely.)
    """

    def __init__(self, state_dict: dict, feature_dim: int):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        features = [str(feature_dim), "logits_unbiased"]
        super().__init__("inception-v3-compat", features, feature_extractor_weights_path=buffer)


def sha256_of(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception(
    weights_path: Union[str, Path], device: Union[str, torch.device] = "cpu", feature_dim: int = 2048
) -> nn.Module:
    r"""
    The FID InceptionV3 with the weights of `weights_path` (read with `torch.load(..., weights_only=True)`).

    Calling it on uint8 images `(B, 3, H, W)` returns `(features (B, feature_dim), logits_unbiased (B, 1008))`, both
    float32; `feature_dim` is one of `FEATURE_DIMS` (2048: the pool features of standard FID).

    Raises:
        `FileNotFoundError` if the file is missing; `ValueError` if it is not a plain state dict of this network.
    """
    if feature_dim not in FEATURE_DIMS:
        raise ValueError(f"feature_dim must be one of {FEATURE_DIMS}, got {feature_dim}.")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} not found: download {INCEPTION_WEIGHTS_FILE} (the FID Inception of pytorch-fid "
            "and torch-fidelity, from their releases) and pass its path."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or a pickle that holds more than tensors
        raise ValueError(f"{path} is not a state dict that torch.load(weights_only=True) can read: {error}") from error
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(value) for value in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors ({INCEPTION_WEIGHTS_FILE} does).")
    try:
        inception = _FromStateDict(state_dict, feature_dim)
    except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
        raise ValueError(
            f"{path} does not hold the FID InceptionV3 weights ({INCEPTION_WEIGHTS_FILE}; torchvision's ImageNet "
            f"InceptionV3 is a different network): {error}"
        ) from error
    return inception.to(device)


def list_images(folder: Union[str, Path]) -> List[Path]:
    """The image files under `folder` (recursively), sorted by path; `ValueError` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"No images in {folder} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def read_images(paths: Sequence[Union[str, Path]]) -> torch.Tensor:
    """Reads images as one uint8 RGB tensor `(B, 3, H, W)`; they must all have the same size."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    for path, array in zip(paths, arrays):
        if array.shape != arrays[0].shape:
            raise ValueError(
                f"Images of different sizes: {paths[0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}, {path} is "
                f"{array.shape[1]}x{array.shape[0]}; resize or crop them to one size first."
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8, rounded as when they are saved as PNG (diffusers' `numpy_to_pil`)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def feature_statistics(features: Union[torch.Tensor, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean `(D,)` and covariance `(D, D)` of features `(N, D)`, in float64 (the `mu` and `sigma` of an `.npz`)."""
    features = np.asarray(torch.as_tensor(features).double().cpu())
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs the features of at least 2 images, got {len(features)}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: Union[str, Path], mu: np.ndarray, sigma: np.ndarray):
    """Writes reference statistics in the format of ADM's and ENAT's `.npz` files (keys `mu` and `sigma`) to exactly
    `path` (`np.savez` given a name would append `.npz`)."""
    with open(path, "wb") as file:
        np.savez(file, mu=mu, sigma=sigma)


def load_statistics(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Reads `mu` and `sigma` from a reference `.npz` (ADM's `VIRTUAL_imagenet256_labeled.npz`, ENAT's
    `fid_stats_imagenet256_guided_diffusion.npz`, or one written by `save_statistics`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Reference statistics {path} not found.")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path} has no {' or '.join(sorted(missing))} (keys: {', '.join(data.files) or 'none'}); "
                    "reference statistics need the Inception pool features' mean `mu` and covariance `sigma`."
                )
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, EOFError) as error:  # not an .npz at all
        raise ValueError(f"{path} is not a NumPy .npz file: {error}") from error
    if mu.ndim != 1 or mu.shape[0] not in FEATURE_DIMS or sigma.shape != (len(mu), len(mu)):
        raise ValueError(
            f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the statistics of Inception features "
            f"(dimension one of {FEATURE_DIMS})."
        )
    return mu, sigma


class _Precomputed(nn.Module):
    """Hands features through: the metrics below are fed the features of `load_inception`'s network."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features: Union[torch.Tensor, np.ndarray], mu: np.ndarray, sigma: np.ndarray) -> float:
    r"""
    FID between the images whose Inception features are `features` `(N, D)` (N >= 2) and reference statistics.

    torchmetrics' `FrechetInceptionDistance` keeps each side as running sums (sum of x, sum of x x^T, count); the
    reference enters as the sums of 2 samples with mean `mu` and covariance `sigma` (any count > 1 gives back exactly
    `mu` and `sigma`).
    """
    features = torch.as_tensor(features).double().cpu()
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
        raise ValueError(
            f"Features of shape {tuple(features.shape)} do not match reference statistics of {mu.shape[0]}-d features."
        )
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features)}.")
    metric = FrechetInceptionDistance(
        feature=_Precomputed(mu.shape[0]), reset_real_features=False, sync_on_compute=False
    )
    count = 2
    mu_t, sigma_t = torch.from_numpy(mu), torch.from_numpy(sigma)
    metric.real_features_sum = count * mu_t
    metric.real_features_cov_sum = (count - 1) * sigma_t + count * torch.outer(mu_t, mu_t)
    metric.real_features_num_samples = torch.tensor(count)
    metric.update(features, real=False)
    return float(metric.compute())


def inception_score(logits: torch.Tensor, splits: int = 10) -> Tuple[float, float]:
    """Inception Score (mean, std over `splits` splits) from the unbiased logits `(N, 1008)` (N >= splits)."""
    if len(logits) < splits:
        raise ValueError(
            f"The Inception Score over {splits} splits needs at least {splits} images, got {len(logits)}."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double().cpu())
    # torchmetrics shuffles the images with torch.randperm: seed it, leaving the global generator as it was
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def clip_scores(model: nn.Module, processor, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image `100 * cos(image embedding, text embedding)` of a transformers `CLIPModel` for uint8 images
    `(B, 3, H, W)` and one prompt each; the CLIP score of a set is `max(mean, 0)`."""
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
    inputs = processor(
        text=list(prompts),
        images=list(images.permute(0, 2, 3, 1).cpu().numpy()),
        return_tensors="pt",
        padding=True,
        truncation=True,
    )
    device = next(model.parameters()).device
    outputs = model(**{key: value.to(device) for key, value in inputs.items()})
    return 100 * (outputs.image_embeds * outputs.text_embeds).sum(dim=-1).float()


def load_clip(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None):
    """A transformers `CLIPModel` and its `CLIPProcessor` from a local folder (`save_pretrained` of both)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP model folder {path} not found.")
    try:
        model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        message = f"{path} is not a CLIP model folder with its processor (CLIPModel, CLIPProcessor): {error}"
        raise ValueError(message) from error
    return model.eval().to(device or "cpu"), processor
