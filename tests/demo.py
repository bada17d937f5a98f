"""The thriftprobe demo: three providers with weights 1, 3 and 6, one consumer.

    python tests/demo.py                 run the whole demo (needs tests/services.sh start)
    python tests/demo.py provider TAG    run one provider in the foreground (Ctrl-C stops it)

Uses the config tests/services.sh writes (env dev, the ports it used) and the appkey demo.calc
it registers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import thriftpy2
from thriftpy2.rpc import make_client

from thriftprobe import build_client, config, start_service
from thriftprobe.admin.governance import Governance

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported
from local_servers import DEMO_CONFIG

ROOT = Path(__file__).resolve().parents[1]
IDL = str(ROOT / "idl" / "demo.thrift")
CONFIG = str(DEMO_CONFIG)  # written by tests/services.sh with the ports it used
APPKEY = "demo.calc"
WEIGHTS = {"alpha": 1, "beta": 3, "gamma": 6}
BASE_PORT = 19090

demo = thriftpy2.load(IDL, module_name="demo_thrift")


class Calculator:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def ping(self) -> str:
        return self.tag

    def compute(self, operation):  # type: ignore[no-untyped-def]
        if operation.op == "+":
            value = operation.left + operation.right
        elif operation.op == "/":
            if operation.right == 0:
                raise demo.CalcError(message="division by zero")
            value = operation.left // operation.right
        else:
            raise demo.CalcError(message="unknown operator %r" % operation.op)
        return demo.Answer(value=value, served_by=self.tag)

    def echo(self, text: str) -> str:
        return text

    def sleep_ms(self, ms: int) -> None:
        time.sleep(ms / 1000.0)

    def record(self, event: str) -> None:
        logging.getLogger("demo").info("%s recorded %r", self.tag, event)


def run_provider(tag: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s " + tag + " %(name)s: %(message)s")
    logging.getLogger("thriftprobe").setLevel(logging.INFO)
    port = BASE_PORT + list(WEIGHTS).index(tag)
    svc = start_service(
        IDL, APPKEY, "Calculator", Calculator(tag), port, config=CONFIG, env="dev", bind_host="127.0.0.1", block=False
    )
    print("READY", flush=True)
    svc.serve_forever()  # what block=True does: serve until SIGTERM / Ctrl-C


def main() -> None:
    cfg = config.load(CONFIG, "dev")
    # An operator sets the weights before the providers start (as `thriftprobe node` would);
    # providers read them from Redis when they start.
    with Governance(cfg) as gov:
        for i, weight in enumerate(WEIGHTS.values()):
            gov.set_node(APPKEY, "Calculator", "127.0.0.1", BASE_PORT + i, weight=weight, valid=True, actor="demo")

    procs = {}
    try:
        for tag in WEIGHTS:
            proc = subprocess.Popen([sys.executable, __file__, "provider", tag], stdout=subprocess.PIPE, text=True)
            if proc.stdout.readline().strip() != "READY":  # type: ignore[union-attr]
                raise SystemExit("provider %s failed to start" % tag)
            procs[tag] = proc
        print("started providers %s on ports %d-%d" % (", ".join(WEIGHTS), BASE_PORT, BASE_PORT + len(WEIGHTS) - 1))

        with build_client(IDL, APPKEY, "Calculator", config=cfg) as client:
            print(
                "consumer sees: "
                + ", ".join("%s:%d weight %d" % (n.host, n.port, n.weight) for n in client.table.snapshot.available)
            )
            n = 10000
            spread = Counter(client.ping() for _ in range(n))
            total = sum(WEIGHTS.values())
            print("\n%-8s %6s %8s %8s" % ("node", "weight", "calls", "expected"))
            for tag, weight in WEIGHTS.items():
                print("%-8s %6d %8d %8d" % (tag, weight, spread[tag], n * weight / total))

            answer = client.compute(demo.Operation(left=20, right=22))
            print("\ncompute(20 + 22) = %d, served by %s" % (answer.value, answer.served_by))
            try:
                client.compute(demo.Operation(left=1, right=0, op="/"))
            except demo.CalcError as err:
                print("compute(1 / 0) raised CalcError(%r)" % err.message)
            client.record("demo finished its calls")  # oneway: returns at once

            raw = make_client(demo.Calculator, "127.0.0.1", BASE_PORT + 2)
            rates = {"thriftprobe": [], "raw": []}
            for _ in range(5):  # interleaved rounds, so machine drift hits both alike
                for name, target in (("thriftprobe", client), ("raw", raw)):
                    began = time.perf_counter()
                    for _ in range(1000):
                        target.echo("x" * 32)
                    rates[name].append(1000 / (time.perf_counter() - began))
            raw.close()
            probe_rate, raw_rate = (sorted(r)[len(r) // 2] for r in (rates["thriftprobe"], rates["raw"]))
            print(
                "\necho, 1 thread, median of 5 interleaved rounds: thriftprobe %.0f calls/s, "
                "plain thriftpy2 on a kept connection %.0f calls/s (ratio %.2f)"
                % (probe_rate, raw_rate, probe_rate / raw_rate)
            )

            print("\nstopping gamma (SIGTERM): it deregisters first, then drains")
            procs["gamma"].terminate()
            procs.pop("gamma").wait(10)
            client.table.wait_for(lambda s: len(s.available) == 2, timeout=10)
            spread = Counter(client.ping() for _ in range(1000))
            print("1000 calls after: " + ", ".join("%s %d" % kv for kv in sorted(spread.items())))
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["provider"]:
        run_provider(sys.argv[2])
    else:
        main()
