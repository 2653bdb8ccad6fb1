from .transformer_enat import ENATReuseState, ENATTransformer2DModel, ENATTransformer2DModelOutput


__all__ = ["ENATReuseState", "ENATTransformer2DModel", "ENATTransformer2DModelOutput"]
