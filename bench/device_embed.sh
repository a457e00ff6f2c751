#!/usr/bin/env bash
# Issue 26's device check, one short run on whatever GPU this machine has (CPU when none):
# ViT-B-32 and ViT-L-14 with random weights saved locally, 20,000 generated images in shards of
# 2,000, the stage (with and without the text tower) against the bare forward, peak GPU memory.
# Needs the project's environment (.venv from `make .venv/.installed`, or PYTHON=... with it).
# The JSON lines go to $OUT/device_embed.jsonl (the device tool's folder) or /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
"${PYTHON:-.venv/bin/python}" bench/device_embed.py --images "${IMAGES:-20000}" \
  --json "${OUT:-/tmp}/device_embed.jsonl" "$@"
