#!/usr/bin/env bash
# Build the tiny emoji SDXL shipped in tdd_jax/assets/tiny_sdxl from scratch, with fixed seeds, on CPU:
#   emoji dataset -> tokenizer -> VAE -> teacher UNet (+ frozen seeded text encoders) -> pipeline folder
#   -> teacher contact sheet (tdd_jax/assets/tiny_sdxl_teacher.png: per emoji name, its training image, then
#      4 teacher samples, 25 DDIM steps, CFG 4)
#   -> edge-map ControlNet for the pipeline (tdd_jax/assets/tiny_controlnet_edges, with its recipe.json)
#   -> sepia style LoRA for the pipeline (tdd_jax/assets/tiny_style_sepia.safetensors, recipe in .json beside it).
#
#   bash launch/build_tiny_pipeline.sh [WORK_DIR]      # default WORK_DIR: workdirs/tiny_sdxl_build
#
# Budget: <= 90 minutes on a 2-core CPU machine; measured 74 min on 2026-11-23 (VAE 18, teacher 55, data +
# tokenizer + assembly + contact sheet 1.5; sizes in tdd_jax/pretrain/architecture.py), plus the ControlNet and
# the style LoRA (added later; see their recipes' "seconds"). Every stage prints
# progress with an ETA; re-running the script skips finished stages and resumes an interrupted one from its last
# checkpoint (WORK_DIR/runs/<stage>/); delete WORK_DIR to rebuild from scratch. Step counts can be overridden for quick trials
# (VAE_STEPS=20 TEACHER_STEPS=20 ...), which changes the result; the defaults below are the recipe.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$repo/workdirs/tiny_sdxl_build}
out=${OUT:-$repo/tdd_jax/assets/tiny_sdxl}
sheet=${SHEET:-$repo/tdd_jax/assets/tiny_sdxl_teacher.png}
controlnet=${CONTROLNET:-$repo/tdd_jax/assets/tiny_controlnet_edges}
style_lora=${STYLE_LORA:-$repo/tdd_jax/assets/tiny_style_sepia.safetensors}
py=${PYTHON:-python3}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

SEED=0
VAE_STEPS=${VAE_STEPS:-1000}
VAE_BATCH=16
VAE_LR=1e-3
TEACHER_STEPS=${TEACHER_STEPS:-6000}
TEACHER_BATCH=32
TEACHER_LR=1e-3
CONTROLNET_STEPS=${CONTROLNET_STEPS:-2000}
CONTROLNET_BATCH=16
CONTROLNET_LR=1e-3
STYLE_STEPS=${STYLE_STEPS:-800}
STYLE_BATCH=16
STYLE_LR=2e-3
STYLE_RANK=8

start=$SECONDS
stage() { echo "=== $1 ($(( (SECONDS - start) / 60 )) min elapsed)"; }

stage "1/8 emoji dataset"
"$py" -c "from tdd_jax.data.emoji import build_emoji_dataset; build_emoji_dataset('$work/data', 64)"

stage "2/8 tokenizer"
"$py" -m tdd_jax.pretrain.tokenizer --data_dir "$work/data" --out "$work/tokenizer"

stage "3/8 VAE"
[[ -f $work/runs/vae/stage.json ]] ||
  "$py" -m tdd_jax.pretrain.vae --work_dir "$work" --steps "$VAE_STEPS" --batch_size $VAE_BATCH --lr $VAE_LR \
    --seed $SEED

stage "4/8 teacher UNet"
[[ -f $work/runs/teacher/stage.json ]] ||
  "$py" -m tdd_jax.pretrain.teacher --work_dir "$work" --steps "$TEACHER_STEPS" --batch_size $TEACHER_BATCH \
    --lr $TEACHER_LR --seed $SEED

stage "5/8 pipeline folder"
"$py" -m tdd_jax.pretrain.assemble --work_dir "$work" --out "$out"

stage "6/8 contact sheet"
"$py" -m tdd_jax.pretrain.contact_sheet --pipeline "$out" --out "$sheet" --seed $SEED --data_dir "$work/data"

stage "7/8 edge-map ControlNet"
# The add-ons get their own work dirs: the pipeline's recipe.json collects every stage under $work/runs.
[[ -f $work/controlnet/runs/controlnet/stage.json ]] ||
  "$py" -m tdd_jax.pretrain.controlnet --pipeline "$out" --data_dir "$work/data" --work_dir "$work/controlnet" \
    --out "$controlnet" --steps "$CONTROLNET_STEPS" --batch_size $CONTROLNET_BATCH --lr $CONTROLNET_LR \
    --caption_dropout 0.5 --ema_decay 0.99 --seed $SEED

stage "8/8 sepia style LoRA"
[[ -f $work/style_lora/runs/style_lora/stage.json ]] ||
  "$py" -m tdd_jax.pretrain.style_lora --pipeline "$out" --data_dir "$work/data" --work_dir "$work/style_lora" \
    --out "$style_lora" --steps "$STYLE_STEPS" --batch_size $STYLE_BATCH --lr $STYLE_LR --rank $STYLE_RANK --seed $SEED

stage "done: $out, $controlnet, $style_lora"
