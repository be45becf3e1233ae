#!/usr/bin/env bash
# One prepared command for the day a GPU is lent (see bench/gpu_check.py for what it runs and reports).
#   bash bench/gpu_check.sh              # on one CUDA GPU after the README's install: under 8 minutes on an H100
#   bash bench/gpu_check.sh --dry-run    # the same code paths, tiny, on the CPU (a few minutes)
# Writes bench/gpu_check_report.md (or bench/gpu_check_dry_run.md); extra flags go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# The GPT-2 tokenizer files, where the checkout keeps them (as .ci/run does); tiktoken downloads otherwise.
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$PWD/../shared/data/tiktoken_cache" ]; then
    export TIKTOKEN_CACHE_DIR="$PWD/../shared/data/tiktoken_cache"
fi
exec python bench/gpu_check.py "$@"
