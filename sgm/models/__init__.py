"""Plain PyTorch modules: UNet, attention blocks, VAE, text encoders, conditioner."""
