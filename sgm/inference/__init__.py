"""Inference: generation (text-to-image, image-to-image, the refiner handoff), the sampling CLI, PNG metadata.

Models come from `sgm.checkpoint.model_source.load_model`; nothing here imports `sgm.training`.
"""

from sgm.inference.generate import generate_latents, image_grid, latents_to_uint8, micro_conditioning_batch

__all__ = ["generate_latents", "image_grid", "latents_to_uint8", "micro_conditioning_batch"]
