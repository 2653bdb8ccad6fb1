"""ENAT (EfficientNAT) and AutoNAT masked-token image generation for diffusers.

Every public class is imported eagerly: diffusers finds the classes named in a saved `model_index.json` only in
modules that are already imported.
"""

from .clip_tokenizer import build_clip_tokenizer
from .models.transformer_enat import (
    ENATAttention,
    ENATAttnProcessor,
    ENATReuseState,
    ENATTransformer2DModel,
    ENATTransformer2DModelOutput,
)
from .models.transformer_nat import NATTransformer2DModel, NATTransformer2DModelOutput
from .pipelines.pipeline_enat import ENATPipeline
from .pipelines.pipeline_enat_img2img import ENATImg2ImgPipeline
from .pipelines.pipeline_enat_inpaint import ENATInpaintPipeline, box_mask, edit_mask_counts, outpaint_inputs
from .schedulers.scheduling_masked_token import MaskedTokenScheduler, MaskedTokenSchedulerOutput


__version__ = "0.1.0"
__all__ = [
    "ENATAttention",
    "ENATAttnProcessor",
    "ENATPipeline",
    "ENATReuseState",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "MaskedTokenScheduler",
    "MaskedTokenSchedulerOutput",
    "NATTransformer2DModel",
    "NATTransformer2DModelOutput",
    "build_clip_tokenizer",
]
__all__ += ["ENATImg2ImgPipeline", "ENATInpaintPipeline", "box_mask", "edit_mask_counts", "outpaint_inputs"]
