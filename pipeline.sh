#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task, on a CPU: SFT, the reward model, PPO, the same PPO
# without its KL penalty (reward hacking), then the figures. Everything lands in $OUT (default out/).
#
#   bash pipeline.sh                       # seed 1337, into out/
#   SEED=2 OUT=runs/seed2 bash pipeline.sh # another seed, passed to every stage, into its own folder
#   bash pipeline.sh --device cuda         # extra flags go to every stage
#
# Each stage's wall time is appended to $OUT/times.txt.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
SEED=${SEED:-1337}
mkdir -p "$OUT"
: > "$OUT/times.txt"

stage() {  # stage NAME COMMAND...: run it, and note how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start)) s" >> "$OUT/times.txt"
}

stage sft python train_sft.py --out_dir "$OUT/sft" --seed "$SEED" "$@"
stage reward python train_reward.py --sft "$OUT/sft/ckpt.pt" --out_dir "$OUT/reward" --seed "$SEED" "$@"
stage ppo python train_ppo.py --sft "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo" \
    --seed "$SEED" "$@"
stage ppo_nokl python train_ppo.py --sft "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo_nokl" \
    --kl_coef 0 --seed "$SEED" "$@"
stage figures python notebooks/plots.py "$OUT"
stage report python report.py "$OUT"
echo "pipeline done in $SECONDS s; figures in $OUT/*.png; stage times in $OUT/times.txt"
