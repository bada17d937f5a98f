#!/usr/bin/env bash
# The checks CI runs before the tests: ruff and mypy with the settings in pyproject.toml, at the
# versions pinned in setup.py's `lint` extra. Any finding fails. Needs no server.
THRIFTPROBE_NO_SERVICES=1 source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$PY" -m mypy
echo "[lint] ruff and mypy: no findings"
