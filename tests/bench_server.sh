#!/usr/bin/env bash
# The server benchmark: installs what is missing and runs tests/bench_server.py (TThreadedServer vs
# the provider's server core; idle connections, slowloris, oversized requests). It needs none of
# the local servers, so they are not started unless THRIFTPROBE_NO_SERVICES=0.
# Arguments go to tests/bench_server.py (--quick for a smoke run, --json FILE to keep the figures).
export THRIFTPROBE_NO_SERVICES="${THRIFTPROBE_NO_SERVICES:-1}"
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$PY" tests/bench_server.py "$@"
