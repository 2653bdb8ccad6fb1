from .pipeline_enat import ENATPipeline


__all__ = ["ENATPipeline"]
