from .pipeline_enat import ENATPipeline
