#!/usr/bin/env bash
# The demo command: installs what is missing, starts the local servers, runs tests/demo.py.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$PY" tests/demo.py "$@"
