#!/usr/bin/env bash
# The GPU checks in one command, for a machine lent for minutes (python3 there has a CUDA torch and no network):
# the CUDA tests, CUDA against CPU on a 70B-wide block, torch's 2:4 kernels, the quick loop with a GPU visible, and
# what a two-process CUDA run on one GPU says. Each step has its own time limit and log under $OUT (default
# out/gpu); the end of each log is printed as it finishes, so a step that runs out of time costs only itself.
#
#     bash bench/gpu_checks.sh                  # on the GPU machine, from the repository root
#
# The machine's image may hold older packages than nexus-export needs (seen: transformers 5.17, which cannot capture
# a model with its cache: 5.24 is the oldest that can). Wheels in .whl/ are installed first, to /tmp/site, ahead of
# the image's: here, `pip download --no-deps` them into .whl (transformers 5.25.0 and what it needs that the image
# lacks: huggingface_hub 2.4.0, httpx2, httpcore2, truststore, kernels, tomlkit, click, idna, hf-xet, regex), and
# name .whl in the device tool's carry.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NEXUS_EXPORT_CACHE=${NEXUS_EXPORT_CACHE:-/tmp/nexus-export-cache}
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, print the log's end
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-20}" "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

step setup 90 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; nproc; free -g;
  $PY -c 'import torch, transformers, onnxruntime; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(),
  transformers.__version__, onnxruntime.__version__, onnxruntime.get_available_providers())';
  $PY -c 'import tensorrt' 2>&1 | tail -1;
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . &&
  $PY -c 'from nexus_export.registry import pass_names; print(pass_names())'"
step cuda-tests 90 $PY -m pytest -n 0 -q -rs -p no:cacheprovider tests/nexus_export/test_device.py \
  tests/runtimes/test_gpu_runtimes.py
# nvidia-smi beside the parity run: the GPU memory the process holds, seen from outside it
( while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null; done ) >"$OUT/gpu-memory.log" &
SAMPLER=$!
step parity 240 $PY bench/device_parity.py --json "$OUT/parity.json"
kill $SAMPLER
echo "GPU memory used, most seen from outside: $(sort -n "$OUT/gpu-memory.log" | tail -1) MiB"
step two-four 75 bash -c "$PY bench/gpu_24.py --sizes 4096,8192,16384 --model \
  \$($PY -c 'import sys; sys.path.insert(0, \"bench\"); from scale import checkpoint; print(checkpoint(\"135m\"))')"
TAIL=40 step two-ranks 40 $PY -m torch.distributed.run --nproc-per-node 2 -m nexus_export.cli prune --model tiny-llama \
  --method wanda --sparsity 0.5 --device cuda --out /tmp/two-ranks --force
grep -h "nexus-export: error" "$OUT/two-ranks.log"
TAIL=40 step quick-loop 100 $PY -m pytest -n 8 -q -m "not slow" -p no:cacheprovider --tb=line -rfE
