"""ENAT (EfficientNAT) and AutoNAT generation for diffusers."""

from .models.transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput

__version__ = "0.1.0"
