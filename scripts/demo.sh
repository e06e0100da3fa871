#!/usr/bin/env bash
# The main job on the built-in default: SmolLM2-135M, SparseGPT 2:4 on the decoder linears (calibrated on the built-in
# Austen stream), ONNX, onnxruntime, report.
# Sets up .venv first. Extra arguments are passed on to `nexus-export prune` (later ones win).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/nexus-export" prune --model smollm2-135m --method sparsegpt --pattern 2:4 \
  --out "$root/out/demo" --force "$@"
