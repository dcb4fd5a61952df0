"""Trainer configs: ``tdd_sdxl`` (the paper's / official SDXL run) and ``tdd_tiny`` (the embedded tiny emoji SDXL).

Each ``get_config(arg)`` takes the method as its argument (absl ``config_flags`` syntax ``path.py:arg``):
``configs/tdd_sdxl.py:lcm`` is the LCM-LoRA baseline on SDXL, ``configs/tdd_tiny.py:pcm`` PCM on the tiny
pipeline. ``methods`` holds what each method changes, so a method or a scale is one argument, not a copied file.
"""
