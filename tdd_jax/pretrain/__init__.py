"""The recipe that builds the tiny emoji SDXL shipped with the repo (launch/build_tiny_pipeline.sh).

Stages, each a ``python -m`` module writing into one work folder: ``tokenizer`` (CLIP-format BPE learned from
the emoji names), ``vae`` (AutoencoderKL), ``teacher`` (frozen seeded text encoders + the UNet), ``assemble``
(the diffusers-format pipeline folder) and ``contact_sheet`` (the teacher's samples). ``architecture`` holds the
component configs and ``loop`` the resumable training loop the two training stages share.
"""
