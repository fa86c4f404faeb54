"""sgm: train SDXL-class text-to-image diffusion models."""
