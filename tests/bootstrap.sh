# Sourced by tests/run.sh, tests/demo.sh, tests/bench.sh and tests/lint.sh: a virtualenv
# ($THRIFTPROBE_VENV) with thriftprobe installed from this checkout with the extras
# $THRIFTPROBE_EXTRAS (test and lint tools by default), and the local servers
# (ZooKeeper, Redis, Redis Cluster, MariaDB) up on 127.0.0.1 unless THRIFTPROBE_NO_SERVICES=1.
# Works on a fresh Debian machine (installs what is missing) and is quick when all is in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THRIFTPROBE_VENV:-$ROOT/.venv}"
EXTRAS="${THRIFTPROBE_EXTRAS:-test,lint}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        echo "[bootstrap] python3 -m venv failed; installing python3-venv" >&2
        rm -rf "$VENV"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-pip
        python3 -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q -e "$ROOT[$EXTRAS]"

if [[ "${THRIFTPROBE_NO_SERVICES:-0}" != 1 ]]; then
    # Debian packages the tests drive: Chromium (the console's browser test, through Playwright,
    # with no browser download) and the Apache Thrift compiler (generated peers).
    missing=()
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    [[ -x /usr/bin/thrift ]] || missing+=(thrift-compiler)
    if (( ${#missing[@]} )); then
        echo "[bootstrap] installing ${missing[*]} for the tests" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi

    export THRIFTPROBE_PYTHON="$PY"
    bash "$ROOT/tests/services.sh" start
    export THRIFTPROBE_SERVICES_READY=1
fi
