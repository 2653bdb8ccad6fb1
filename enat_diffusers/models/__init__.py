from .transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput
from .transformer_nat import NATTransformer2DModel, NATTransformer2DModelOutput


__all__ = [
    "ENATReuseState",
    "ENATTransformer2DModel",
    "ENATTransformer2DModelOutput",
    "NATTransformer2DModel",
    "NATTransformer2DModelOutput",
]
