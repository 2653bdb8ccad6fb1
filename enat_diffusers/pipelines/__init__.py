from .pipeline_enat import ENATPipeline
from .pipeline_enat_img2img import ENATImg2ImgPipeline
from .pipeline_enat_inpaint import ENATEditingMixin, ENATInpaintPipeline, box_mask, edit_mask_counts, outpaint_inputs


__all__ = ["ENATPipeline"]

__all__ += [
    "ENATEditingMixin",
    "ENATImg2ImgPipeline",
    "ENATInpaintPipeline",
    "box_mask",
    "edit_mask_counts",
    "outpaint_inputs",
]
