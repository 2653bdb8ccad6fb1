"""ENAT (EfficientNAT) and AutoNAT masked-token image generation for diffusers.

Every public class is imported eagerly: diffusers finds the classes named in a saved `model_index.json` only in
modules that are already imported.
"""

import diffusers

from .clip_tokenizer import build_clip_tokenizer
from .models.transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput
from .pipelines.pipeline_enat import ENATPipeline
from .schedulers.scheduling_masked_token import MaskedTokenScheduler, MaskedTokenSchedulerOutput


# `DiffusionPipeline.from_pretrained` looks the pipeline class up by name on the diffusers module.
setattr(diffusers, "ENATPipeline", ENATPipeline)

__version__ = "0.1.0"
__all__ = [
    "ENATPipeline",
    "ENATReuseState",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskedTokenScheduler",
    "MaskedTokenSchedulerOutput",
    "build_clip_tokenizer",
]
