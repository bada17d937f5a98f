#!/usr/bin/env bash
# The test command: installs what is missing, starts the local servers, runs every test.
# Extra arguments go to pytest (e.g. bash tests/run.sh -k weight).
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
