"""TDD distillation of SDXL: the paper's / official run (train_tdd.sh), as defaults of every field.

    SDXL_DIR=/path/to/sdxl-base TDD_DATA='/data/laion/{00000..01023}.tar' \\
        python -m tdd_jax.train --config=configs/tdd_sdxl.py --workdir=runs/tdd

The argument names the method: ``configs/tdd_sdxl.py:lcm`` (or ``:pcm``, ``:tcd``) is that baseline, which
changes only the target rule and its method settings (``configs/methods.py``), so a comparison differs in
nothing else; ``:tdd_adv`` is TDD with the adversarial term (the paper's "Ours(adv)"), ``:pcm_adv`` PCM with it;
``:lcm_paper``, ``:pcm_paper``, ``:tcd_paper`` are the baselines with every number of their published recipes
(learning rate, weight decay, batch, ...), not the same-budget comparison.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs.methods import apply_method
from tdd_jax.data import default_data_config
from tdd_jax.models.lora import TDD_TARGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SDXL run of the method ``arg`` (None: TDD)."""
    cfg = ml_collections.ConfigDict()
    cfg.pipeline_dir = os.environ.get("SDXL_DIR", "")  # diffusers folder of stable-diffusion-xl-base-1.0
    cfg.resolution = 1024
    cfg.seed = 0
    cfg.num_train_steps = 100_000
    cfg.log_every = 50
    cfg.max_nonfinite_steps = 10  # this many steps in a row with a NaN/Inf loss or gradient stop the run

    cfg.lora = ml_collections.ConfigDict()
    cfg.lora.rank = 64
    cfg.lora.alpha = 8.0  # PEFT's default when lora_alpha is unset (official): scale 8/64
    cfg.lora.targets = TDD_TARGETS

    cfg.solver = ml_collections.ConfigDict()
    cfg.solver.num_steps = 250  # DDIM teacher grid [1..250]*4 - 1

    cfg.target = ml_collections.ConfigDict()
    cfg.target.kind = "tdd"
    cfg.target.k_min = 4
    cfg.target.k_max = 8
    cfg.target.bound = config_dict.placeholder(int)  # None: round(1.04 * T / k_min) = 260, the official bound
    cfg.target.eta = 0.3
    cfg.target.pcm_phases = 4  # used by kind='pcm' only

    cfg.guidance = ml_collections.ConfigDict()
    cfg.guidance.w_min = 3.5  # w' (LCM form c + w(c - u), i.e. CFG scale 4.5), fixed
    cfg.guidance.w_max = 3.5
    cfg.guidance.rho = 0.2  # fraction of captions replaced by the empty prompt
    cfg.guidance.mode = "decoupled"  # paper: no CFG on empty-prompt samples; 'official': as train_tdd.py

    cfg.loss = ml_collections.ConfigDict()
    cfg.loss.kind = "huber"
    cfg.loss.huber_c = 0.001

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.lr = 1e-6
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.999
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.0
    cfg.optim.grad_clip = 1.0
    cfg.optim.schedule = "constant"  # official; or "warmup" (linear over warmup_steps), "cosine" (warm-up, then to 0)
    cfg.optim.warmup_steps = 0

    cfg.ema_decay = 0.0  # 0: the target is the online LoRA under stop-gradient (official)

    # The adversarial term (TDD-adv, train_tdd_adv.py; PCM's adversarial recipe), off here: ``:tdd_adv`` and
    # ``:pcm_adv`` turn it on. Numbers: the official TDD-adv / PCM SDXL runs.
    cfg.adv = ml_collections.ConfigDict()
    cfg.adv.enabled = False
    cfg.adv.g_weight = 0.1  # lambda: LoRA loss = consistency + lambda * hinge G loss (PCM --adv_weight=0.1)
    cfg.adv.lr = 1e-5  # the discriminator heads' AdamW (PCM --adv_lr=1e-5), constant
    cfg.adv.b1 = 0.0
    cfg.adv.b2 = 0.999
    cfg.adv.eps = 1e-8
    cfg.adv.weight_decay = 1e-3
    cfg.adv.grad_clip = 1.0  # PCM clips the heads' gradients with the trainer's max_grad_norm
    cfg.adv.window = 250  # discriminator timestep ~ U{tau .. min(tau + 250, T) - 1} (PCM: T / 4 phases)
    cfg.adv.head_groups = 32  # GroupNorm groups in every head layer (PCM: 32; 10-40 channels a group on SDXL)

    cfg.batch = ml_collections.ConfigDict()
    cfg.batch.global_batch = 512  # = per-device batch x devices x grad_accum (official: 16 x 8 GPUs x 4)
    cfg.batch.grad_accum = 4

    cfg.model = ml_collections.ConfigDict()
    cfg.model.dtype = "bfloat16"  # compute
    cfg.model.param_dtype = "float32"  # storage of the frozen base weights (LoRA, EMA and optimizer: always float32)
    cfg.model.remat = "full"  # gradient checkpointing of every resnet/transformer block
    cfg.model.scan_blocks = True  # each stack of SDXL's 2- and 10-deep transformer blocks compiles as one lax.scan
    cfg.model.attention_impl = config_dict.placeholder(str)  # None: XLA picks; 'cudnn' on GPUs; 'splash' on TPUs

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1  # frozen UNet sharded over every device; the batch over (data, fsdp)
    cfg.mesh.min_shard_size = 2**16  # smaller arrays (biases, norms) are replicated
    # The LoRA, its EMA, the adversarial heads and their optimizer moments: 'fsdp' (the base weights' size rule
    # above) or 'replicated' (a whole copy per device; no all-gather of the LoRA per use, no reduce-scatter of its
    # gradients). 'fsdp': the rank-64 SDXL LoRA is 197M parameters, so LoRA + Adam moments + gradient take ~2.9 GiB
    # per device replicated (EMA: +0.7) against ~0.4 GiB split 8 ways, which v5e's 16 GiB needs for activations.
    cfg.mesh.lora_sharding = "fsdp"
    # XLA's windowed einsums on TPU (an FSDP all-gather or reduce-scatter turned into a loop of collective permutes
    # overlapped with the matmul). False turns them off in the train step and the validation grid: they multiply
    # the temporaries where the FSDP axis is long (16 devices; docs/tpu.md).
    cfg.mesh.windowed_einsum = True

    cfg.data = default_data_config()
    cfg.data.source = "webdataset"  # LAION-style (image, caption) .tar shards
    cfg.data.path = os.environ.get("TDD_DATA", "")  # e.g. /data/laion-aesthetics/{00000..01023}.tar
    cfg.data.resolution = cfg.get_ref("resolution")
    cfg.data.batch_size = cfg.batch.get_ref("global_batch")
    cfg.data.seed = cfg.get_ref("seed")
    # The official run's --use_fix_crop_and_size: time_ids (1024, 1024, 0, 0, 1024, 1024) for every image. False
    # gives each image its real original size and crop (SDXL's own micro-conditioning).
    cfg.data.fixed_time_ids = True

    cfg.checkpoint = ml_collections.ConfigDict()
    cfg.checkpoint.every = 1000
    cfg.checkpoint.keep = 3

    cfg.validation = ml_collections.ConfigDict()
    cfg.validation.every = 1000
    cfg.validation.prompts = (
        "a photo of an astronaut riding a horse on mars",
        "a red fox sitting in a snowy forest, golden hour, detailed",
        "a watercolor painting of a lighthouse by the sea",
        "portrait of an old man wearing a hat, cinematic lighting",
    )
    cfg.validation.seed = 0
    cfg.validation.steps = (4, 8)
    cfg.validation.guidance_scale = 1.7  # official demo: CFG 1.7, eta (gamma) 0.2
    cfg.validation.gamma = 0.2
    # Reference columns beside the student's: the teacher (LoRA off, DDIM) at 25 steps, and at the student's step
    # counts, with SDXL's usual CFG.
    cfg.validation.teacher_steps = 25
    cfg.validation.teacher_guidance_scale = 5.0
    return apply_method(cfg, arg)
