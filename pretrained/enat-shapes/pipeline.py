from enat_diffusers import ENATPipeline  # noqa: F401
