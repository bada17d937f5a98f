#!/usr/bin/env bash
# The benchmark command: installs what is missing, starts the local servers, runs tests/bench.py.
# Arguments go to tests/bench.py (--quick for a smoke run, --json FILE to keep the figures).
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$PY" tests/bench.py "$@"
