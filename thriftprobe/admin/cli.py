"""The ``thriftprobe`` command: operators' tools on top of the library.

Exit codes: 0 success; 1 the operation failed (unreachable backend, unknown appkey...);
2 bad usage; 3 (``call``) the remote method raised an exception.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from thriftpy2.transport import TTransportException

from .. import config as config_mod
from .._version import __version__
from ..errors import InvalidArgument, ThriftProbeError
from ..limits import MAX_CONCURRENCY, MAX_QPS, ServiceLimits
from ..stores import appkeys, audit, mysql
from ..stores.limits_audit import describe_limit
from .governance import Governance, LimitChange, check_weight

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REMOTE = 0, 1, 2, 3

_PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() also accepts "²"
_INT_RE = re.compile(r"-?[0-9]{1,18}")
HISTORY_MAX = 10000


class Output:
    """Writes either human lines or one JSON document per command (``--json``)."""

    def __init__(self, as_json: bool, stream: TextIO) -> None:
        self.as_json = as_json
        self.stream = stream

    def line(self, text: str = "") -> None:
        if not self.as_json:
            print(text, file=self.stream, flush=True)

    def data(self, payload: Any) -> None:
        if self.as_json:
            print(json.dumps(payload, indent=2, sort_keys=True, default=str), file=self.stream, flush=True)

    def event(self, payload: Dict[str, Any], text: str) -> None:
        """One streamed record: a JSON line with --json, else text."""
        print(json.dumps(payload, sort_keys=True) if self.as_json else text, file=self.stream, flush=True)


# -- commands -------------------------------------------------------------------------------------


def _cfg(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, args.env)


def cmd_db_init(args: argparse.Namespace, out: Output) -> int:
    cfg = _cfg(args)
    done = mysql.create_schema(cfg.mysql)
    out.data({"database": cfg.mysql.describe(), "changes": done})
    for line in done:
        out.line(line)
    out.line("schema of %s is up to date" % cfg.mysql.describe())
    return EXIT_OK


def cmd_appkey_add(args: argparse.Namespace, out: Output) -> int:
    cfg = _cfg(args)
    added = appkeys.add_appkey(cfg.mysql, args.appkey, args.owner, args.description)  # validates the name
    out.data({"appkey": args.appkey, "added": added})
    out.line("appkey %s %s" % (args.appkey, "registered" if added else "was already registered (unchanged)"))
    return EXIT_OK


def cmd_appkey_list(args: argparse.Namespace, out: Output) -> int:
    keys = appkeys.list_appkeys(_cfg(args).mysql)
    out.data([vars(k) for k in keys])
    for k in keys:
        out.line("%-32s %-16s %s  %s" % (k.appkey, k.owner or "-", k.created_at, k.description))
    if not keys:
        out.line("no appkeys registered")
    return EXIT_OK


def cmd_appkey_remove(args: argparse.Namespace, out: Output) -> int:
    removed = appkeys.remove_appkey(_cfg(args).mysql, args.appkey)
    out.data({"appkey": args.appkey, "removed": removed})
    if not removed:
        out.line("appkey %s is not registered" % args.appkey)
        return EXIT_FAILED
    out.line("appkey %s removed" % args.appkey)
    return EXIT_OK


def _uptime(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%dd%02dh" % (days, hours)
    if hours:
        return "%dh%02dm" % (hours, minutes)
    return "%dm%02ds" % (minutes, secs)


def _traffic(traffic: Dict[str, Any]) -> str:
    """What ``ls`` adds to a node's line: ``  version 1.4.2 group blue priority 1 zone=eu warming 40%``."""
    parts = ["%s %s" % (key, traffic[key]) for key in ("version", "group", "priority") if key in traffic]
    parts.extend("%s=%s" % pair for pair in sorted(traffic.get("tags", {}).items()))
    if "warming" in traffic:
        parts.append("warming %d%%" % round(traffic["warming"] * 100))
    return "  " + " ".join(parts) if parts else ""


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        nodes = gov.fleet(args.appkey, args.service)
        env = gov.env
    if args.hide_offline:
        nodes = [n for n in nodes if n.state != "offline"]
    out.data({"env": env, "nodes": [n.to_dict() for n in nodes]})
    out.line("env %s" % env)
    appkey = service = None
    for n in nodes:
        if n.appkey != appkey:
            appkey, service = n.appkey, None
            out.line("  %s" % appkey)
        if n.service != service:
            service = n.service
            out.line("    %s" % service)
        address = "%s:%d" % (n.host, n.port)
        settings = "weight %-4s %-3s" % (
            "-" if n.weight is None else n.weight,
            "-" if n.valid is None else "on" if n.valid else "off",
        )
        if n.problem is not None:
            out.line("      %-21s %s CORRUPT znode: %s" % (address, settings, n.problem))
        else:
            line = "      %-21s %s %-7s up %s" % (address, settings, n.state, _uptime(n.uptime))
            out.line(line + _traffic(n.traffic))
    if not nodes:
        out.line("  (no nodes)")
    return EXIT_OK


def _address(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not _PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host.strip("[]"), int(port)


def _int_in(low: int, high: Optional[int], what: str) -> Callable[[str], int]:
    """An argparse type: an integer of ASCII digits within low..high (high None: no bound)."""

    def parse(text: str) -> int:
        if not _INT_RE.fullmatch(text) or not low <= int(text) <= (int(text) if high is None else high):
            raise argparse.ArgumentTypeError(
                "%s must be an integer %d..%s, got %r" % (what, low, "" if high is None else high, text)
            )
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("expected a number of seconds > 0, got %r" % text)
    return value


def cmd_node(args: argparse.Namespace, out: Output) -> int:
    host, port = args.address
    weight = None if args.weight is None else check_weight(args.weight)
    valid = True if args.enable else False if args.disable else None
    with Governance(_cfg(args)) as gov:
        change = gov.set_node(args.appkey, args.service, host, port, weight=weight, valid=valid, actor=args.actor)
    out.data(change.to_dict())
    old = change.old
    out.line(
        "%s/%s %s:%d: %s -> weight %d %s (rev %d)"
        % (
            change.appkey,
            change.service,
            host,
            port,
            "no settings" if old is None else "weight %d %s" % (old.weight, "on" if old.valid else "off"),
            change.new.weight,
            "on" if change.new.valid else "off",
            change.new.rev,
        )
    )
    if change.live:
        out.line("applied to the live node; running consumers follow it now")
    else:
        out.line("note: this node is not registered now; the change is stored and applies when it starts")
    return EXIT_OK


def cmd_node_prune(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        pruned = gov.prune(args.older_than, args.appkey, actor=args.actor, dry_run=args.dry_run)
    out.data({"dry_run": args.dry_run, "older_than": args.older_than, "pruned": [p.to_dict() for p in pruned]})
    verb = "would remove" if args.dry_run else "removed (audited)"
    for p in pruned:
        out.line("%s/%s %s:%d offline for %s: settings %s" % (
            p.appkey, p.service, p.host, p.port, _describe_duration(p.offline_for), verb))
    out.line("%d node(s) offline for longer than %s" % (len(pruned), _describe_duration(args.older_than)))
    return EXIT_OK


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h`` or ``7d``, in seconds (> 0)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError("%r is not a duration > 0 (like 3600, 90m, 12h or 7d)" % text)
    return value


def _describe_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%.1f%s" % (seconds / size, unit)
    return "%.0fs" % seconds


def cmd_node_forget(args: argparse.Namespace, out: Output) -> int:
    host, port = args.address
    with Governance(_cfg(args)) as gov:
        removed = gov.forget_node(args.appkey, args.service, host, port, actor=args.actor)
    out.data({"appkey": args.appkey, "service": args.service, "host": host, "port": port, "removed": removed})
    if not removed:
        out.line("%s/%s %s:%d has no stored settings: nothing to forget" % (args.appkey, args.service, host, port))
        return EXIT_FAILED
    out.line("%s/%s %s:%d: settings removed (audited)" % (args.appkey, args.service, host, port))
    return EXIT_OK


def _limit_line(change: LimitChange) -> str:
    return "%s/%s %s: %s -> %s (rev %d)" % (
        change.appkey, change.service, change.method, describe_limit(change.old), describe_limit(change.new),
        change.limits.rev,
    )


def _limit_notes(change: LimitChange, out: Output) -> None:
    """Say that a corrupt record was replaced, and what the operator should check."""
    if change.replaced_corrupt is not None:
        out.line("replaced the CORRUPT limits record %r (audited as such); the record now holds rev %d: %s"
                 % (change.replaced_corrupt, change.limits.rev,
                    ", ".join("%s %s" % (m, describe_limit(v)) for m, v in change.limits.methods.items())
                    or "no limits"))
    for warning in change.warnings:
        out.line("WARNING: %s" % warning)


def cmd_limit_set(args: argparse.Namespace, out: Output) -> int:
    if args.qps is None and args.burst is None and args.concurrency is None:
        raise InvalidArgument("nothing to set: give --qps and/or --concurrency ('thriftprobe limit clear' removes)")
    with Governance(_cfg(args)) as gov:
        change = gov.set_limit(args.appkey, args.service, args.method, qps=args.qps, burst=args.burst,
                               concurrency=args.concurrency, actor=args.actor)
    out.data(change.to_dict())
    out.line(_limit_line(change))
    out.line("stored, audited and pushed to the running providers (per provider node; each applies it within a "
             "second)")
    _limit_notes(change, out)
    return EXIT_OK


def cmd_limit_clear(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        change = gov.clear_limit(args.appkey, args.service, args.method, actor=args.actor)
    out.data(None if change is None else change.to_dict())
    if change is None:
        out.line("%s/%s %s has no limits: nothing to clear" % (args.appkey, args.service, args.method))
        return EXIT_FAILED
    out.line(_limit_line(change))
    out.line("stored, audited and pushed to the running providers")
    _limit_notes(change, out)
    return EXIT_OK


def cmd_limit_reset(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        change = gov.reset_limits(args.appkey, args.service, actor=args.actor)
    out.data(None if change is None else change.to_dict())
    if change is None:
        out.line("%s/%s has no limits: nothing to reset" % (args.appkey, args.service))
        return EXIT_FAILED
    out.line("%s/%s: every limit dropped (%s) (rev %d)" % (
        args.appkey, args.service, ", ".join(change.dropped or []) or "none were in force", change.limits.rev))
    out.line("stored, audited and pushed to the running providers")
    _limit_notes(change, out)
    return EXIT_OK


def _limits_lines(limits: ServiceLimits, out: Output, indent: str = "    ") -> None:
    for method, limit in limits.methods.items():
        out.line("%s%-24s %s" % (indent, method, describe_limit(limit)))
    if not limits.methods:
        out.line("%s(no limits)" % indent)


def cmd_limit_show(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        views = gov.limits(args.appkey, args.service)
        env = gov.env
    out.data({"env": env, "services": [v.to_dict() for v in views]})
    out.line("env %s (limits are per provider node)" % env)
    for v in views:
        name = "%s/%s" % (v.appkey, v.service)
        pushed = v.pushed
        if v.limits is None and pushed is not None:  # the providers follow the push: say so first
            why = "CORRUPT record (%s)" % v.problem if v.recorded else "RECORD LOST (no record in Redis)"
            out.line("  %s  %s; the providers follow the pushed limits, rev %d (ZooKeeper):" % (name, why, pushed.rev))
            _limits_lines(pushed, out)
            if not v.recorded:
                out.line("    ('thriftprobe limit set/clear' writes the record again, above rev %d)" % pushed.rev)
            continue
        if v.limits is None:
            out.line("  %s CORRUPT limits: %s" % (name, v.problem))
            continue
        if v.in_step or pushed is None:
            note = "" if v.in_step else (
                "  NOT PUSHED (pushed: none; providers read it at their next audit)")
            out.line("  %s  rev %d%s" % (name, v.limits.rev, note))
            _limits_lines(v.limits, out)
            continue
        follows = {
            "pushed": "the providers follow the PUSHED limits (higher rev %d)" % pushed.rev,
            "record": "NOT PUSHED: the providers follow the record (rev %d) from their next audit" % v.limits.rev,
            "either": "DIFFERENT limits at the same rev %d: each provider keeps the one it saw first" % pushed.rev,
        }[v.follows]
        out.line("  %s  record and pushed limits DIFFER; %s" % (name, follows))
        out.line("    record (Redis) rev %d%s:" % (v.limits.rev, "  <- in force" if v.follows == "record" else ""))
        _limits_lines(v.limits, out, "      ")
        out.line("    pushed (ZooKeeper) rev %d%s:" % (pushed.rev, "  <- in force" if v.follows == "pushed" else ""))
        _limits_lines(pushed, out, "      ")
    if not views:
        out.line("  (no limits set)")
    return EXIT_OK


def cmd_limit_history(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        entries = gov.limits_history(args.appkey, args.service, args.limit)
    out.data([e.to_dict() for e in entries])
    for e in entries:
        out.line(e.describe())
    if not entries:
        out.line("no changes of limits recorded")
    return EXIT_OK


def _qps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_QPS):
        raise argparse.ArgumentTypeError("--qps must be a number above 0 and at most %d, got %r" % (MAX_QPS, text))
    return int(value) if value.is_integer() else value


def cmd_callers(args: argparse.Namespace, out: Output) -> int:
    with Governance(_cfg(args)) as gov:
        deps = gov.callers(args.appkey, args.service)
    out.data(deps.to_dict())
    out.line("env %s" % deps.env)
    if not deps.consumers:
        out.line("  (no consumers registered)")
        return EXIT_OK

    def clients(entry: Dict[str, Any]) -> str:
        return "%d client(s) on %s" % (entry["count"], ", ".join(entry["hosts"]) or "-")

    out.line("who calls each service:")
    for svc in deps.services:
        out.line("  %s/%s" % (svc["appkey"], svc["service"]))
        for c in svc["callers"]:
            out.line("    %-30s %s" % (c["caller"], clients(c)))
    out.line("what each caller calls:")
    for caller in deps.callers:
        out.line("  %s" % caller["caller"])
        for c in caller["calls"]:
            out.line("    %-30s %s" % ("%s/%s" % (c["appkey"], c["service"]), clients(c)))
    problems = [c for c in deps.consumers if "problem" in c]
    for c in problems:
        out.line("CORRUPT consumer entry %s/%s/%s: %s" % (c["appkey"], c["service"], c["name"], c["problem"]))
    return EXIT_OK


def _top_lines(env: str, figures: Dict[str, Any], unreachable: List[str]) -> List[str]:
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else "%.2f" % v

    def row(label: str, f: Dict[str, Any]) -> str:
        return "%-46s %9.1f %6.1f%% %9s %9s %8d" % (
            label[:46], f["qps"], 100 * f["error_rate"], ms(f["p50_ms"]), ms(f["p99_ms"]), f["calls"])

    lines = [
        "thriftprobe top   env %s   %s   figures over the last %.1f s"
        % (env, time.strftime("%H:%M:%S", time.localtime(figures["to"])), figures["seconds"]),
        "%-46s %9s %7s %9s %9s %8s" % ("SERVICE / NODE / #METHOD", "QPS", "ERR", "P50 ms", "P99 ms", "CALLS"),
    ]
    for s in figures["services"]:
        lines.append(row("%s/%s" % (s["appkey"], s["service"]), s))
        # declared methods not called are in --json, at 0
        lines.extend(row("  #" + m["method"], m) for m in s["methods"] if m["calls"])
        for n in s["nodes"]:
            lines.append(row("  " + n["node"], n))
            lines.extend(row("    #" + m["method"], m) for m in n["methods"] if m["calls"])
    if not figures["services"]:
        lines.append("  (no calls recorded: no live provider with a metrics endpoint, or no traffic)")
    lines.extend("unreachable: %s" % url for url in unreachable)
    return lines


def cmd_top(args: argparse.Namespace, out: Output) -> int:
    from .live import Sampler, compute

    if args.window is None:
        args.window = 1.0 if args.once else 5.0
    with Governance(_cfg(args)) as gov:
        sampler = Sampler(gov, args.appkey, args.service, prometheus=args.prometheus)
        try:
            if args.once:
                first = sampler.sample()
                time.sleep(args.window)
                last = sampler.sample()
                figures = compute(first, last)
                unreachable = sorted(set(first.errors) | set(last.errors))
                out.data({"env": gov.env, **figures, "unreachable": unreachable})
                for line in _top_lines(gov.env, figures, unreachable):
                    out.line(line)
                return EXIT_OK
            samples: List[Any] = [sampler.sample()]
            keep = max(2, round(args.window / args.interval) + 1)
            tty = out.stream.isatty() and not out.as_json
            until = None if args.duration is None else time.monotonic() + args.duration
            try:
                while until is None or time.monotonic() + args.interval <= until:
                    time.sleep(args.interval)
                    samples = ([*samples, sampler.sample()])[-keep:]
                    figures = compute(samples[0], samples[-1])
                    if out.as_json:
                        out.event({"env": gov.env, **figures, "unreachable": sorted(samples[-1].errors)}, "")
                        continue
                    text = "\n".join(_top_lines(gov.env, figures, sorted(samples[-1].errors)))
                    print(("\x1b[H\x1b[2J" if tty else "") + text + ("" if tty else "\n"), file=out.stream, flush=True)
            except KeyboardInterrupt:
                pass
            return EXIT_OK
        finally:
            sampler.close()


def cmd_history(args: argparse.Namespace, out: Output) -> int:
    cfg = _cfg(args)
    entries = audit.history(cfg.mysql, cfg.env, args.appkey, args.service, args.limit)  # MySQL alone
    out.data([e.to_dict() for e in entries])
    for e in entries:
        out.line(e.describe())
    if not entries:
        out.line("no changes recorded")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, out: Output) -> int:
    done = threading.Event()
    with Governance(_cfg(args)) as gov:
        stop = gov.watch(lambda e: out.event(e.to_dict(), e.describe()), args.appkey, args.service)
        try:
            done.wait(args.duration)  # None = until Ctrl-C
        except KeyboardInterrupt:
            pass
        finally:
            stop()
    return EXIT_OK


def _tag(text: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("--tag must be NAME=VALUE, got %r" % text)
    return name, value


def cmd_call(args: argparse.Namespace, out: Output) -> int:
    from .call import call_method

    status, payload = call_method(
        args.thrift_file,
        args.appkey,
        args.service,
        args.method,
        args.json_args,
        config=_cfg(args),
        timeout_ms=args.timeout,
        version=args.version,
        group=args.group,
        tags=dict(args.tag),
    )
    print(json.dumps(payload, indent=None if args.compact else 2, sort_keys=True), file=out.stream, flush=True)
    return EXIT_OK if status == "ok" else EXIT_REMOTE


def cmd_doctor(args: argparse.Namespace, out: Output) -> int:
    from .doctor import run_checks

    results = run_checks(args.config, args.env)
    out.data([r.to_dict() for r in results])
    for r in results:
        out.line("%-4s %-10s %s" % ("ok" if r.ok else "FAIL", r.name, r.detail))
    failed = [r for r in results if not r.ok]
    out.line("all checks passed" if not failed else "%d check(s) failed" % len(failed))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_console(args: argparse.Namespace, out: Output) -> int:
    from .console import serve

    cfg = _cfg(args)
    console_cfg = config_mod.load_console(cfg)
    port = console_cfg.port if args.port is None else args.port
    serve(cfg, console_cfg, host=args.host or console_cfg.host, port=port, out=out.line, prometheus=args.prometheus)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--config/--env/--json, accepted before or after the command name."""
    p = argparse.ArgumentParser(add_help=False)
    kw: Dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "--config",
        help="config file (default: $THRIFTPROBE_CONFIG, else ./config/config.yml)",
        **({"default": None} if not suppress else kw),
    )
    p.add_argument(
        "--env",
        help="environment (default: $THRIFTPROBE_ENV, else by hostname)",
        **({"default": None} if not suppress else kw),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text", **kw)
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog="thriftprobe",
        description="Operate thriftprobe services: appkeys, nodes, weights, on/off switches.",
        parents=[_common(suppress=False)],
        epilog="Exit codes: 0 ok, 1 failed, 2 bad usage, 3 the called method raised.",
    )
    parser.add_argument("--version", action="version", version="thriftprobe " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[..., int], help_text: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    dbp = sub.add_parser("db", help="the MySQL schema", description="the MySQL schema", parents=[common])
    dbsub = dbp.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    command("init", cmd_db_init, "create or upgrade the MySQL schema (serviceapp, settings_audit, limits_audit)",
            dbsub)

    ap = sub.add_parser("appkey", help="register appkeys", description="register appkeys", parents=[common])
    asub = ap.add_subparsers(dest="appkey_command", metavar="COMMAND", required=True)
    p = command("add", cmd_appkey_add, "register an appkey", asub)
    p.add_argument("appkey")
    p.add_argument("--owner", default="", help="who owns it (team or person)")
    p.add_argument("--description", default="", help="what it is")
    command("list", cmd_appkey_list, "list registered appkeys", asub)
    p = command("remove", cmd_appkey_remove, "unregister an appkey", asub)
    p.add_argument("appkey")

    p = command("ls", cmd_ls, "show env -> appkey -> service -> nodes (weight, on/off, live/offline, uptime)")
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p.add_argument("--hide-offline", action="store_true", help="leave out nodes with settings but no running provider")

    # 'node forget' is its own command ('node-forget' inside: see main); its name cannot also be
    # an appkey of 'node APPKEY ...'.
    p = sub.add_parser(
        "node-forget",
        prog="thriftprobe node forget",
        description="remove the stored settings of a node that is not running (audited)",
        parents=[common],
    )
    p.set_defaults(func=cmd_node_forget, command="node forget")
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("address", metavar="HOST:PORT", type=_address)
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")

    p = sub.add_parser(
        "node-prune",
        prog="thriftprobe node prune",
        description="remove the stored settings of every node that has not run for a while (each audited)",
        parents=[common],
    )
    p.set_defaults(func=cmd_node_prune, command="node prune")
    p.add_argument("--older-than", required=True, type=_duration, metavar="DURATION",
                   help="offline for longer than this: seconds, or 90m, 12h, 7d")
    p.add_argument("--appkey", default=None, help="only this appkey's nodes (default: every appkey of the env)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed; change nothing")
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")

    p = command("node", cmd_node, "set a node's weight, or switch it off or on (live and persisted)")
    p.epilog = (
        "thriftprobe node forget APPKEY SERVICE HOST:PORT removes the settings of a node that is gone; "
        "thriftprobe node prune --older-than 7d removes those of every node gone that long."
    )
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("address", metavar="HOST:PORT", type=_address)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weight", type=int, help="0..1000 (0 = no traffic)")
    what.add_argument("--disable", action="store_true", help="switch the node off (valid = 0)")
    what.add_argument("--enable", action="store_true", help="switch the node on (valid = 1)")
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")

    lp = sub.add_parser("limit", help="request limits per service and method (per provider node)",
                        description="request limits per service and method, per provider node: set live, "
                        "persisted in Redis, audited, pushed to running providers", parents=[common])
    lsub = lp.add_subparsers(dest="limit_command", metavar="COMMAND", required=True)
    p = command("set", cmd_limit_set, "set a method's limits (METHOD '*': the service as a whole), replacing "
                "those it had", lsub)
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("method", metavar="METHOD", help="a method of the service, or '*' for all of them together")
    p.add_argument("--qps", type=_qps, default=None, help="requests per second (a token bucket)")
    p.add_argument("--burst", type=_int_in(1, MAX_CONCURRENCY, "--burst"), default=None,
                   help="the bucket's size (needs --qps; default a tenth of a second's worth)")
    p.add_argument("--concurrency", type=_int_in(1, MAX_CONCURRENCY, "--concurrency"), default=None,
                   help="requests admitted and not yet answered")
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")
    p = command("clear", cmd_limit_clear, "remove a method's limits (METHOD '*': the service-wide ones)", lsub)
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")
    p = command("reset", cmd_limit_reset, "drop every limit of a service (also replaces a corrupt record)", lsub)
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("--actor", default=None, help="who makes the change, for the audit (default: the OS user)")
    p = command("show", cmd_limit_show, "show the limits set (and whether they were pushed)", lsub)
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p = command("history", cmd_limit_history, "show recorded changes of limits, newest first", lsub)
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p.add_argument("--limit", type=_int_in(1, HISTORY_MAX, "--limit"), default=50,
                   help="how many (1..%d, default 50)" % HISTORY_MAX)

    p = command("callers", cmd_callers, "show who calls whom: each service's callers (appkey, hosts, clients), "
                "and what each caller calls")
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")

    p = command("top", cmd_top, "live calls per service, node and method: QPS, error rate, p50, p99 "
                "(read from the providers' metrics endpoints, or a Prometheus); Ctrl-C stops")
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p.add_argument("--once", action="store_true", help="sample twice, --window seconds apart, print, and exit")
    p.add_argument("--window", type=_seconds, default=None, metavar="SECONDS",
                   help="figures over this many seconds (default 5; 1 with --once)")
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    p.add_argument("--for", dest="duration", type=_seconds, default=None, metavar="SECONDS",
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--prometheus", default=None, metavar="URL",
                   help="read the series from this Prometheus (http://host:9090) instead of scraping providers")

    p = command("history", cmd_history, "show recorded changes, newest first")
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p.add_argument(
        "--limit",
        type=_int_in(1, HISTORY_MAX, "--limit"),
        default=50,
        help="how many (1..%d, default 50)" % HISTORY_MAX,
    )

    p = command("watch", cmd_watch, "stream joins, leaves and changes as they happen (Ctrl-C stops)")
    p.add_argument("appkey", nargs="?")
    p.add_argument("service", nargs="?")
    p.add_argument(
        "--for", dest="duration", type=_seconds, default=None, metavar="SECONDS", help="stop after this many seconds"
    )

    p = command("call", cmd_call, "call a method through discovery and print the result as JSON")
    p.add_argument("thrift_file")
    p.add_argument("appkey")
    p.add_argument("service")
    p.add_argument("method")
    p.add_argument(
        "json_args",
        nargs="?",
        default=None,
        metavar="JSON_ARGS",
        help='arguments as a JSON object {"name": value} or array [value, ...]',
    )
    p.add_argument(
        "--timeout", type=_int_in(1, None, "--timeout"), default=3000, help="socket timeout in ms (default 3000)"
    )
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.add_argument("--version", default="*",
                   help="only nodes of this version: exact, '1.*' or '>=1.2,<2' (default: any)")
    p.add_argument("--group", default="",
                   help="only nodes of this group, '*' for any (default: nodes without a group)")
    p.add_argument("--tag", action="append", default=[], type=_tag, metavar="NAME=VALUE",
                   help="only nodes with this tag (repeatable; VALUE '*' for any value)")

    command("doctor", cmd_doctor, "check config, ZooKeeper, Redis and MySQL (reachability and schema)")

    p = command("console", cmd_console, "serve the web console (127.0.0.1 by default; needs console credentials)")
    p.add_argument("--host", default=None, help="listen address (default: console.<env>.host or 127.0.0.1)")
    p.add_argument(
        "--port",
        type=_int_in(0, 65535, "--port"),
        default=None,
        help="listen port, 0 = any free one (default: console.<env>.port or 8700)",
    )
    p.add_argument("--prometheus", default=None, metavar="URL",
                   help="read the live figures from this Prometheus instead of scraping the providers")
    return parser


def _subcommand_words(argv: Sequence[str]) -> List[str]:
    """``node forget|prune ...`` -> ``node-forget|node-prune ...`` (argparse cannot have both
    ``node APPKEY`` and ``node forget``); everything else as it is."""
    words = list(argv)
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in ("--config", "--env") else 1
    if words[i : i + 2] in (["node", "forget"], ["node", "prune"]):
        words[i : i + 2] = ["node-" + words[i + 1]]
    return words


def main(argv: Optional[Sequence[str]] = None, stream: Optional[TextIO] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_subcommand_words(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # No logging set-up: with no handler configured, Python's last-resort handler prints
    # warnings and errors to stderr, and a program embedding main() keeps its own logging.
    out = Output(args.json, stream or sys.stdout)
    try:
        return int(args.func(args, out))
    except InvalidArgument as err:
        print("thriftprobe %s: %s" % (args.command, err), file=sys.stderr)
        return EXIT_USAGE
    except (ThriftProbeError, TTransportException) as err:
        print("thriftprobe %s: %s: %s" % (args.command, type(err).__name__, err), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
