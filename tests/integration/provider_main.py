"""A provider in its own process, for tests that kill or signal it.

usage: provider_main.py CONFIG ENV APPKEY TAG PORT
Prints "READY <port>" once registered (then closes stdout), and serves until SIGTERM/SIGINT.
"""

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import IDL, Handler

from thriftprobe import start_service


def main() -> None:
    config_path, env, appkey, tag, port = sys.argv[1:6]
    svc = start_service(
        IDL,
        appkey,
        "Calculator",
        Handler(tag),
        int(port),
        config=config_path,
        env=env,
        bind_host="127.0.0.1",
        block=False,
    )
    # serve_forever installs these handlers too; installed before READY, a signal sent as soon
    # as the test reads it never meets the default action (which would kill the process).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, svc._on_signal)
    print("READY %d" % svc.port, flush=True)
    sys.stdout.close()
    svc.serve_forever()
    print("provider %s stopped, %d thread(s) left" % (tag, threading.active_count()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
