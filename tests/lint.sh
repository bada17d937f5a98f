#!/usr/bin/env bash
# The checks CI runs before the tests: ruff and mypy with the settings in pyproject.toml, at the
# versions pinned in setup.py's `lint` extra, in a virtualenv of their own (.venv-lint) whose
# runtime dependencies are pinned too (tests/lint-constraints.txt): mypy reads their types.
# Any finding fails. Needs no server.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_CONSTRAINT="$ROOT/tests/lint-constraints.txt"
THRIFTPROBE_VENV="$ROOT/.venv-lint" THRIFTPROBE_EXTRAS=lint THRIFTPROBE_NO_SERVICES=1 \
    source "$ROOT/tests/bootstrap.sh"
unset PIP_CONSTRAINT
cd "$ROOT"
"$VENV/bin/ruff" check .
"$PY" -m mypy
echo "[lint] ruff and mypy: no findings"
