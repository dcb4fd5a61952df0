"""Flax NNX models in SDXL's architecture (UNet, CLIP text encoders, VAE), LoRA, and weight loading."""
