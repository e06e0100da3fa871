#!/usr/bin/env bash
# The test suite: sets up .venv first, then runs pytest on every core (extra arguments go to pytest; -n 0 runs
# in one process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -n auto --dist loadfile "$@"
