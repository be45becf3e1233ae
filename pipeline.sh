#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task, on a CPU: SFT, the reward model, PPO, the same PPO
# without its KL penalty (reward hacking), then the figures and a report. Everything lands in $OUT.
#
#   bash pipeline.sh                       # seed 1337, into out/
#   SEED=2 OUT=runs/seed2 bash pipeline.sh # another seed, passed to every stage, into its own folder
#   bash pipeline.sh --device cuda         # extra flags go to every stage
#   PPO_FLAGS="--iterations 300" bash pipeline.sh   # and SFT_FLAGS, REWARD_FLAGS to one stage's script
#   ROUNDS=3 bash pipeline.sh              # RLHF in rounds (below); round r >= 2 in $OUT/round<r>/
#   RESUME=1 bash pipeline.sh              # keep the finished stages, continue the stopped one
#   OMP_NUM_THREADS=1 bash pipeline.sh     # one thread per process (the two PPO runs go side by side)
#   SIDE_BY_SIDE=0 bash pipeline.sh        # the two PPO runs one after the other (e.g. a small GPU)
#   NPROC=2 bash pipeline.sh               # every stage under torchrun with 2 processes (GPUs, or CPU cores)
#   METHODS="grpo rloo dpo" bash pipeline.sh   # beside PPO, from the same SFT model and comparisons (below;
#                                              # DPO_FLAGS for train_dpo.py)
#
# Rounds (InstructGPT, Llama 2): round 1 is the pipeline above. In round r >= 2 the simulated labellers
# rank answers of round r-1's policies (in round 2 also the unleashed one's: its hacks get labelled),
# round r-1's reward model trains on, on the comparisons of every round so far, and PPO continues from
# round r-1's policy, still held by the KL penalty to the SFT model, the reference.
#
# The two round-1 PPO runs differ only in kl_coef, so they run at the same time, side by side, when the
# machine has a core for every thread of both: OMP_NUM_THREADS threads each, or, unset, half the cores
# each (on 2 cores: one thread each). Never more: two processes of two threads on a 2-core CPU take 5x
# longer than one after the other (bench/RESULTS.md). Each process computes exactly what it computes
# alone with as many threads. SIDE_BY_SIDE=0: one after the other, with the threads of the other stages.
# With NPROC > 1 each stage takes all NPROC processes, and the two run one after the other.
#
# METHODS: after round 1's PPO, other methods from the same SFT model, each into $OUT/<method>: a critic-free
# advantage of train_ppo.py (grpo, dr_grpo, rloo: 16 prompts x 4 answers, the rollout's size; reinforce), each
# also without its KL term ($OUT/<method>_nokl), or dpo (train_dpo.py on the reward model's comparisons).
# With SIDE_BY_SIDE=0 every stage runs alone, so the methods' times (methods.png) compare.
#
# Each stage's wall time is appended to $OUT/times.txt, and at the end the whole command's.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
SEED=${SEED:-1337}
ROUNDS=${ROUNDS:-1}
RESUME=${RESUME:-0}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-auto}
NPROC=${NPROC:-1}
METHODS=${METHODS:-}
usage() { echo "pipeline.sh: $1" >&2; exit 2; }
# every variable checked before the run folder is touched: a bad one must not cost a finished stage
[[ $SEED =~ ^[0-9]{1,9}$ ]] || usage "SEED=$SEED: give a whole number from 0 to 999999999"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || usage "ROUNDS=$ROUNDS: give the number of rounds, 1 or more"
[[ $RESUME =~ ^[01]$ ]] || usage "RESUME=$RESUME: use 1 (keep the finished stages) or 0"
[[ $SIDE_BY_SIDE =~ ^(auto|0)$ ]] || usage "SIDE_BY_SIDE=$SIDE_BY_SIDE: use auto (when the cores allow) or 0 (never)"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || usage "NPROC=$NPROC: give the number of processes per stage, 1 or more"
for method in $METHODS; do
    [[ $method =~ ^(grpo|dr_grpo|rloo|reinforce|dpo)$ ]] || usage "METHODS: $method is not grpo, dr_grpo, rloo, reinforce or dpo"
done
train=(python)  # how a training stage starts: one process, or NPROC under torchrun (support/distributed.py)
[ "$NPROC" = 1 ] || train=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
read -r -a sft_flags <<< "${SFT_FLAGS:-}"
read -r -a reward_flags <<< "${REWARD_FLAGS:-}"
read -r -a ppo_flags <<< "${PPO_FLAGS:-}"
read -r -a dpo_flags <<< "${DPO_FLAGS:-}"
mkdir -p "$OUT"
[ "$RESUME" = 1 ] || : > "$OUT/times.txt"

timed() {  # timed NAME COMMAND...: run it, and note how long it took
    local name=$1 start=$SECONDS
    shift
    "$@" || return  # its exit status (set -e does not act inside the || of a caller)
    echo "$name $((SECONDS - start)) s" >> "$OUT/times.txt"
}

stage() {  # stage DIR COMMAND...: a training stage writing DIR/ckpt.pt; with RESUME=1 a finished one is
    local dir=$1  # kept (if the same command made it) and a started one continues from its checkpoint
    shift
    if [ "$RESUME" = 1 ] && [ -f "$dir/done" ]; then
        if [ "$(cat "$dir/done")" != "$*" ]; then
            echo "pipeline.sh: $dir was made by another command ($(cat "$dir/done")); RESUME=1 needs the same" \
                "SEED and flags, or remove $dir to train it again" >&2
            exit 2
        fi
        echo "${dir#"$OUT"/}: finished before, kept"
        return
    fi
    rm -f "$dir/done"
    if [ "$RESUME" = 1 ] && [ -f "$dir/ckpt.pt" ]; then
        set -- "$@" --resume
    fi
    timed "${dir#"$OUT"/}" "$@" || {
        local status=$?
        if [ $status = 2 ]; then  # the script refused its input and said why, in the line above
            echo "pipeline.sh: ${dir#"$OUT"/} refused its input (exit 2): fix what the error says and run again" >&2
        else
            echo "pipeline.sh: ${dir#"$OUT"/} stopped (exit $status); RESUME=1 with the same OUT, SEED and ROUNDS" \
                "keeps the finished stages and continues this one from its last checkpoint" >&2
        fi
        exit $status
    }
    echo "$*" > "$dir/done"  # the command that finished it
}

sft=$OUT/sft/ckpt.pt
stage "$OUT/sft" "${train[@]}" train_sft.py --out_dir "$OUT/sft" --seed "$SEED" "${sft_flags[@]}" "$@"
stage "$OUT/reward" "${train[@]}" train_reward.py --sft "$sft" --out_dir "$OUT/reward" --seed "$SEED" "${reward_flags[@]}" "$@"
ppo=("${train[@]}" train_ppo.py --sft "$sft" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo" --seed "$SEED"
     "${ppo_flags[@]}" "$@")
nokl=("${train[@]}" train_ppo.py --sft "$sft" --reward "$OUT/reward/ckpt.pt" --out_dir "$OUT/ppo_nokl" --kl_coef 0
      --seed "$SEED" "${ppo_flags[@]}" "$@")
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
threads=${OMP_NUM_THREADS:-$((cores / 2))}  # unset: half the cores each
if [ "$SIDE_BY_SIDE" = auto ] && [ "$NPROC" = 1 ] && [[ $threads =~ ^[1-9][0-9]*$ ]] && ((2 * threads <= cores)); then
    echo "ppo_nokl: runs beside ppo ($threads of $cores cores each); its output goes to $OUT/ppo_nokl.log"
    # a stopped pipeline stops it too: a background job ignores Ctrl-C
    trap 'pkill -P "$beside" 2>/dev/null; kill "$beside" 2>/dev/null; true' EXIT
    [ "$RESUME" = 1 ] || : > "$OUT/ppo_nokl.log"  # a resumed run adds to the stopped run's log
    OMP_NUM_THREADS=$threads stage "$OUT/ppo_nokl" "${nokl[@]}" >> "$OUT/ppo_nokl.log" 2>&1 &
    beside=$!
    OMP_NUM_THREADS=$threads stage "$OUT/ppo" "${ppo[@]}"
    wait "$beside" || { status=$?; tail -n 4 "$OUT/ppo_nokl.log" >&2; exit $status; }
    trap - EXIT
    # its last eval (or "finished before, kept"), as it would have printed it here
    grep -E "^(iteration [0-9]+:|ppo_nokl: finished)" "$OUT/ppo_nokl.log" | tail -n 1 | sed "s/^iteration/ppo_nokl: iteration/" || true
else
    stage "$OUT/ppo" "${ppo[@]}"
    stage "$OUT/ppo_nokl" "${nokl[@]}"
fi

for method in $METHODS; do  # beside PPO: the same SFT model and reward model (or its comparisons)
    if [ "$method" = dpo ]; then
        stage "$OUT/dpo" "${train[@]}" train_dpo.py --sft "$sft" --data "$OUT/reward/comparisons.jsonl" \
            --out_dir "$OUT/dpo" --seed "$SEED" "${dpo_flags[@]}" "$@"
        continue
    fi
    group=()  # the group baselines compare 4 answers to a prompt: 16 prompts x 4, the rollout's 64 answers
    [ "$method" = reinforce ] || group=(--samples_per_prompt 4 --prompts_per_iter 16)
    for name in "$method" "${method}_nokl"; do
        kl=()
        [ "$name" = "$method" ] || kl=(--kl_coef 0)
        stage "$OUT/$name" "${train[@]}" train_ppo.py --sft "$sft" --reward "$OUT/reward/ckpt.pt" \
            --out_dir "$OUT/$name" --advantage "$method" "${group[@]}" "${kl[@]}" --seed "$SEED" "${ppo_flags[@]}" "$@"
    done
done

policies=$OUT/ppo/ckpt.pt,$OUT/ppo_nokl/ckpt.pt  # whose answers round 2's labellers rank
comparisons=$OUT/reward/comparisons.jsonl        # every round's comparisons so far
previous=$OUT/ppo/ckpt.pt                        # the policy the next round starts from
reward=$OUT/reward/ckpt.pt                       # the reward model the next one starts from
for ((r = 2; r <= ROUNDS; r++)); do
    dir=$OUT/round$r
    # new prompts for the labellers each round (another seed); PPO keeps --seed: the same held-out eval
    stage "$dir/reward" "${train[@]}" train_reward.py --sft "$sft" --policy "$policies" \
        --extra_data "$comparisons" --init "$reward" \
        --out_dir "$dir/reward" --seed $((SEED + r - 1)) "${reward_flags[@]}" "$@"
    stage "$dir/ppo" "${train[@]}" train_ppo.py --sft "$sft" --policy "$previous" \
        --reward "$dir/reward/ckpt.pt" --out_dir "$dir/ppo" --seed "$SEED" "${ppo_flags[@]}" "$@"
    comparisons=$comparisons,$dir/reward/comparisons.jsonl
    previous=$dir/ppo/ckpt.pt
    policies=$previous
    reward=$dir/reward/ckpt.pt
done

if [ "$RESUME" = 1 ]; then  # the figures, the report and the wall time are this run's, not a stopped one's
    sed -i -E '/^(figures|report|pipeline) /d' "$OUT/times.txt"
fi
timed figures python notebooks/plots.py "$OUT"
timed report python tools/report.py "$OUT"
# this command's wall time (the PPO runs may have overlapped; after RESUME=1, the resumed part only)
echo "pipeline $SECONDS s$([ "$RESUME" = 1 ] && echo ' (resumed)')" >> "$OUT/times.txt"
echo "pipeline done in $SECONDS s; figures in $OUT/*.png; stage times in $OUT/times.txt"
