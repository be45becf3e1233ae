#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task, on a CPU: SFT, the reward model, PPO, the same PPO
# without its KL penalty (reward hacking), then the figures. Everything lands in $OUT (default out/).
# Extra flags go to every PPO run, e.g.  bash pipeline.sh --device cuda
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
python train_sft.py --out_dir "$OUT/sft"
python train_reward.py --sft "$OUT/sft/ckpt.pt" --out_dir "$OUT/reward"
python train_ppo.py --sft "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo" "$@"
python train_ppo.py --sft "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo_nokl" --kl_coef 0 --iterations 60 "$@"
python notebooks/plots.py "$OUT"
