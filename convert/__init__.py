"""Bridges to the PyTorch world: LoRA export (diffusers/kohya), fused UNet export, single-file SDXL import.

Each module is a command: ``python -m convert.export_lora``, ``python -m convert.fuse_unet``,
``python -m convert.import_checkpoint`` (``--help`` for their flags).
"""
