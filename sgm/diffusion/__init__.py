"""Diffusion pieces of SDXL, each a small object with one job, swapped by config.

`discretization` (the 1000-step scaled-linear sigma table and n-step schedules), `denoiser`
(eps / v scalings around a network), `weighting`, `noise_levels` and `loss` (training),
`samplers` and `guidance` (inference), `img2img` (SDEdit and the base -> refiner handoff) and
`sampling.sample`, which ties the inference pieces together.
"""
