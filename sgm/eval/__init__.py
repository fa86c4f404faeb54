"""Evaluation: held-out metrics of generated samples (FID/KID with Inception-V3, CLIP score, all from local
weights files), comparing runs, and the conditioning study's explainable image analysis."""
