"""Evaluation of generated samples by simple, explainable image analysis (no downloaded networks)."""
