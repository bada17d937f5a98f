"""Live call figures for operators: QPS, error rate, p50 and p99 per service, node and method.

The figures come from the providers' own ``rpc_server_call_duration_seconds`` histogram. A
``Sampler`` reads it in one of two ways:

- scraping: each live provider's znode names its ``/metrics`` endpoint
  (``additionalEndpoints.metrics``); every endpoint is fetched once per sample (providers of one
  process share one) and read as Prometheus text;
- from a Prometheus (``prometheus=URL``): the same series, read through its HTTP query API.

Figures are the difference between two samples: counter deltas over the seconds between them
(QPS = calls / seconds; error rate = calls that did not end ``ok`` or ``declared_exception`` /
calls), and quantiles interpolated in the bucket deltas like PromQL's ``histogram_quantile``. A
counter that went down (the provider restarted) counts from zero. The text parser is our own:
only ``thriftprobe.metrics`` may import prometheus_client, and the console must work without it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple

__all__ = ["Figures", "Sample", "Sampler", "compute", "parse_text", "quantile", "sample_from_text"]

log = logging.getLogger(__name__)

SERIES = "rpc_server_call_duration_seconds"
NOT_ERRORS = ("ok", "declared_exception")  # a declared exception is a normal answer
Key = Tuple[str, str, str, str]  # appkey, service, node, method


# -- the Prometheus text format --------------------------------------------------------------------


def _labels(text: str, i: int) -> Tuple[Dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at text[i] == "{"; returns (labels, index after "}")."""
    labels: Dict[str, str] = {}
    i += 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i < n and text[i] == "}":
            return labels, i + 1
        eq = text.index("=", i)
        name = text[i:eq].strip()
        i = text.index('"', eq) + 1
        value: List[str] = []
        while text[i] != '"':
            c = text[i]
            if c == "\\":
                nxt = text[i + 1]
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            else:
                value.append(c)
                i += 1
        labels[name] = "".join(value)
        i += 1
    raise ValueError("unterminated labels")


def parse_text(text: str, prefix: str = "") -> Iterable[Tuple[str, Dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text exposition format whose name
    starts with ``prefix``; comments and malformed lines are skipped."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#" or not line.startswith(prefix):
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name = line[:brace]
                labels, end = _labels(line, brace)
                rest = line[end:].split()
            else:
                name, labels, rest = line[:space], {}, line[space:].split()
            yield name, labels, float(rest[0])
        except (ValueError, IndexError):
            continue


# -- samples and figures ---------------------------------------------------------------------------


@dataclass
class Sample:
    """Cumulative counts at one moment: calls by outcome and bucket counts, per (appkey, service,
    node, method). ``sources`` names what was read (endpoints) and ``scope`` the (appkey, service)
    pairs read (None: all), so that a series seen for the first time in a source read both times,
    of a service in scope both times, counts from zero (its first calls), and any other series
    missing from the older sample (source not read, or service out of scope: it may have been
    counting all along) is left out of the deltas."""

    at: float
    calls: Dict[Key, Dict[str, float]] = field(default_factory=dict)
    buckets: Dict[Key, Dict[float, float]] = field(default_factory=dict)
    source_of: Dict[Key, str] = field(default_factory=dict)
    sources: Set[str] = field(default_factory=set)
    errors: Dict[str, str] = field(default_factory=dict)
    scope: Optional[Set[Tuple[str, str]]] = None

    def add(self, name: str, labels: Dict[str, str], value: float, source: str) -> None:
        if not math.isfinite(value) or value < 0:
            return  # not a count (NaN, Inf, negative): it would spoil every figure it joins
        try:
            key = (labels["appkey"], labels["rpc_service"], labels["node"], labels["rpc_method"])
        except KeyError:
            return
        self.source_of[key] = source
        if name == SERIES + "_count":
            outcomes = self.calls.setdefault(key, {})
            outcome = labels.get("outcome", "ok")
            outcomes[outcome] = outcomes.get(outcome, 0.0) + value
        elif name == SERIES + "_bucket":
            try:
                le = float(labels["le"])
            except (KeyError, ValueError):
                return
            buckets = self.buckets.setdefault(key, {})
            buckets[le] = buckets.get(le, 0.0) + value  # summed over outcomes


def sample_from_text(text: str, source: str, sample: Optional[Sample] = None, at: Optional[float] = None,
                     scope: Optional[Set[Tuple[str, str]]] = None) -> Sample:
    """Add the server call series of one ``/metrics`` page to ``sample`` (a new one by default);
    ``scope``: only these (appkey, service) pairs."""
    sample = sample if sample is not None else Sample(time.time() if at is None else at)
    sample.sources.add(source)
    if scope is not None:
        sample.scope = set(scope) | (sample.scope or set())
    for name, labels, value in parse_text(text, SERIES):
        if scope is not None and (labels.get("appkey"), labels.get("rpc_service")) not in scope:
            continue
        sample.add(name, labels, value, source)
    return sample


def quantile(q: float, buckets: Dict[float, float]) -> Optional[float]:
    """The q-quantile of a cumulative histogram {upper bound: count}, interpolated linearly in
    its bucket (PromQL's histogram_quantile). None without observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: the best we can say
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass
class Figures:
    """Calls over a window and what follows from them."""

    seconds: float
    calls: float = 0.0
    errors: float = 0.0
    outcomes: Dict[str, float] = field(default_factory=dict)
    buckets: Dict[float, float] = field(default_factory=dict)

    def add(self, outcomes: Dict[str, float], buckets: Dict[float, float]) -> None:
        for outcome, n in outcomes.items():
            if n:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0.0) + n
                self.calls += n
                if outcome not in NOT_ERRORS:
                    self.errors += n
        for le, n in buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n

    def to_dict(self) -> Dict[str, Any]:
        p50, p99 = quantile(0.5, self.buckets), quantile(0.99, self.buckets)
        return {
            "calls": round(self.calls),
            "errors": round(self.errors),
            "outcomes": {k: round(v) for k, v in sorted(self.outcomes.items())},
            "qps": round(self.calls / self.seconds, 3) if self.seconds > 0 else 0.0,
            "error_rate": round(self.errors / self.calls, 4) if self.calls else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }


def _delta(new: float, old: float) -> float:
    return new if new < old else new - old  # a counter that went down restarted from zero


def compute(old: Sample, new: Sample) -> Dict[str, Any]:
    """The figures between two samples, as a JSON-ready tree: services (appkey, service) with
    their figures, their methods, and their nodes (each with its methods)."""
    seconds = max(new.at - old.at, 1e-9)
    # one pass over the series, grouped as the tree is: linear in the number of series
    services: Dict[Tuple[str, str], Figures] = {}
    svc_methods: Dict[Tuple[str, str], Dict[str, Figures]] = {}
    nodes: Dict[Tuple[str, str], Dict[str, Figures]] = {}
    node_methods: Dict[Tuple[str, str, str], Dict[str, Figures]] = {}
    for key in set(new.calls) | set(new.buckets):
        appkey, service, node, method = key
        if key not in old.calls and key not in old.buckets:
            if new.source_of.get(key) not in old.sources:
                continue  # not read last time: no delta to take
            if old.scope is not None and (appkey, service) not in old.scope:
                continue  # out of scope last time (a node gone for a while): its counts are not new
        old_calls, new_calls = old.calls.get(key, {}), new.calls.get(key, {})
        outcomes = {o: _delta(n, old_calls.get(o, 0.0)) for o, n in new_calls.items()}
        old_b, new_b = old.buckets.get(key, {}), new.buckets.get(key, {})
        buckets = {le: _delta(n, old_b.get(le, 0.0)) for le, n in new_b.items()}
        sk = (appkey, service)
        for figs in (services.setdefault(sk, Figures(seconds)),
                     svc_methods.setdefault(sk, {}).setdefault(method, Figures(seconds)),
                     nodes.setdefault(sk, {}).setdefault(node, Figures(seconds)),
                     node_methods.setdefault((appkey, service, node), {}).setdefault(method, Figures(seconds))):
            figs.add(outcomes, buckets)
    result: List[Dict[str, Any]] = []
    for (appkey, service), figs in sorted(services.items()):
        entry: Dict[str, Any] = {"appkey": appkey, "service": service, **figs.to_dict()}
        entry["methods"] = [{"method": m, **f.to_dict()} for m, f in sorted(svc_methods[(appkey, service)].items())]
        entry["nodes"] = [
            {"node": node, **nf.to_dict(),
             "methods": [{"method": m, **f.to_dict()}
                         for m, f in sorted(node_methods[(appkey, service, node)].items())]}
            for node, nf in sorted(nodes[(appkey, service)].items())
        ]
        result.append(entry)
    return {"from": round(old.at, 3), "to": round(new.at, 3), "seconds": round(seconds, 3), "services": result}


# -- reading samples -------------------------------------------------------------------------------


MAX_BODY = 8 << 20  # bytes of one /metrics page or query answer; more is an error


def _fetch(url: str, timeout: float, deadline: Optional[float] = None, limit: int = MAX_BODY) -> str:
    """The body at ``url``; ``timeout`` bounds each socket operation, ``deadline`` (monotonic,
    default now + timeout) the whole read, so an endpoint that drips bytes cannot hold it longer;
    a body over ``limit`` bytes is an error."""
    deadline = time.monotonic() + timeout if deadline is None else deadline
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        chunks: List[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("reading the body took over %.1f s" % timeout)
            chunk = reply.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ValueError("body over %d bytes" % limit)
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")


class Sampler:
    """Reads samples for an environment (optionally one appkey / service) through a Governance
    (the live nodes and their metrics endpoints), or from a Prometheus at ``prometheus``."""

    def __init__(self, gov: Any, appkey: Optional[str] = None, service: Optional[str] = None,
                 prometheus: Optional[str] = None, timeout: float = 2.0) -> None:
        self.gov = gov
        self.appkey = appkey
        self.service = service
        self.prometheus = prometheus.rstrip("/") if prometheus else None
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="thriftprobe-scrape")
        self._busy: Set[str] = set()  # endpoints still being read: one fetch per endpoint at a time
        self._busy_lock = threading.Lock()

    def targets(self) -> Tuple[Set[Tuple[str, str]], Dict[str, str]]:
        """The (appkey, service) pairs in scope, and {metrics URL: a node it serves} of their live nodes."""
        scope: Set[Tuple[str, str]] = set()
        urls: Dict[str, str] = {}
        for appkey, service, node in self.gov.metrics_endpoints(self.appkey, self.service):
            scope.add((appkey, service))
            if node[2] is not None:
                host, port = node[2]
                urls.setdefault("http://%s:%d/metrics" % ("[%s]" % host if ":" in host else host, port),
                                "%s:%d" % node[:2])
        return scope, urls

    def sample(self) -> Sample:
        scope, urls = self.targets()
        if self.prometheus:
            return self._from_prometheus(scope)
        sample = Sample(time.time(), scope=set(scope))
        # one deadline for the whole sample: an endpoint not read by then is unreachable this time
        deadline = time.monotonic() + self.timeout
        futures: Dict[str, "Future[Optional[str]]"] = {}
        for url in urls:
            with self._busy_lock:
                if url in self._busy:  # a former read still runs (its own deadline ends it)
                    sample.errors[url] = "unreachable: still reading it from the last sample"
                    continue
                self._busy.add(url)
            try:
                futures[url] = self._pool.submit(self._read, url, deadline)
            except RuntimeError:  # closed
                self._done(url)
                sample.errors[url] = "unreachable: sampler closed"
        wait(list(futures.values()), timeout=max(0.0, deadline - time.monotonic()) + 0.05)
        for url, future in futures.items():
            if not future.done():
                sample.errors[url] = "unreachable: no answer within %.1f s" % self.timeout
                continue
            text = future.result()
            if text is None:
                sample.errors[url] = "unreachable"
                continue
            sample_from_text(text, url, sample, scope=scope)
        return sample

    def _done(self, url: str) -> None:
        with self._busy_lock:
            self._busy.discard(url)

    def _read(self, url: str, deadline: float) -> Optional[str]:
        try:
            return _fetch(url, self.timeout, deadline)
        except (OSError, ValueError) as err:
            log.debug("cannot read %s: %s", url, err)
            return None
        finally:
            self._done(url)

    def _from_prometheus(self, scope: Set[Tuple[str, str]]) -> Sample:
        sample = Sample(time.time(), scope=set(scope))
        source = self.prometheus or ""
        sample.sources.add(source)
        for series in (SERIES + "_count", SERIES + "_bucket"):
            url = "%s/api/v1/query?%s" % (source, urllib.parse.urlencode({"query": series}))
            try:
                data = json.loads(_fetch(url, self.timeout))
            except (OSError, ValueError) as err:
                sample.errors[source] = str(err)
                return sample
            for item in data.get("data", {}).get("result", []):
                labels = item.get("metric", {})
                if (labels.get("appkey"), labels.get("rpc_service")) not in scope:
                    continue
                sample.add(series, labels, float(item["value"][1]), source)
        return sample

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class History:
    """Samples every ``interval`` seconds in a background thread; keeps the last few samples
    (for figures over ``window`` seconds) and per-tick figures for charts (``keep`` seconds)."""

    def __init__(self, sampler: Sampler, interval: float = 1.0, window: float = 5.0, keep: float = 300.0) -> None:
        self.sampler = sampler
        self.interval = interval
        self.window = window
        self._samples: Deque[Sample] = deque(maxlen=max(2, int(window / interval) + 1))
        self._points: Deque[Dict[str, Any]] = deque(maxlen=max(2, int(keep / interval)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thriftprobe-live", daemon=True)
        self._started = False
        self._failure: Optional[str] = None
        self._figures: Optional[Dict[str, Any]] = None  # over the window, computed once per tick

    def start(self) -> "History":
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.tick()
                self._failure = None
            except Exception as err:
                if self._failure is None:
                    log.warning("live figures: sampling failed", exc_info=True)
                self._failure = "%s: %s" % (type(err).__name__, err)
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - began)))

    def tick(self) -> None:
        """Read a sample; the figures (last tick's for the chart, the window's for snapshot) are
        computed here, once, outside the lock (only this thread changes the samples)."""
        sample = self.sampler.sample()
        with self._lock:
            samples = list(self._samples)
        samples = [*samples, sample][-(self._samples.maxlen or 2):]
        point = _point(compute(samples[-2], sample)) if len(samples) >= 2 else None
        figures = compute(samples[0], sample) if len(samples) >= 2 else None
        with self._lock:
            self._samples.append(sample)
            if point is not None:
                self._points.append(point)
            self._figures = figures

    def stale_after(self) -> float:
        """Figures older than this (seconds) are stale: about two ticks, a tick being the interval
        or, with an endpoint answering slowly, the sampler's deadline."""
        return 2 * (self.interval + float(getattr(self.sampler, "timeout", 0.0)))

    def snapshot(self) -> Dict[str, Any]:
        """The figures over the window, the chart points (one per tick, oldest first), and the
        age of the newest sample (``age`` seconds; ``stale`` when over ``stale_after()``)."""
        with self._lock:
            samples = list(self._samples)
            points = list(self._points)
            figures = self._figures
        age = round(max(0.0, time.time() - samples[-1].at), 3) if samples else None
        return {"figures": figures, "points": points, "failure": self._failure,
                "unreachable": sorted(samples[-1].errors) if samples else [],
                "age": age, "stale": age is not None and age > self.stale_after()}

    def stop(self) -> None:
        """End the sampling; a tick under way ends by the sampler's deadline (not waited for
        longer than that: the thread is a daemon)."""
        self._stop.set()
        self.sampler.close()
        if self._started:
            self._thread.join(float(getattr(self.sampler, "timeout", 2.0)) + 1.0)


def _point(figures: Dict[str, Any]) -> Dict[str, Any]:
    """One chart point: {row id: [qps, error rate, p50 ms, p99 ms]} for services, nodes and methods."""
    rows: Dict[str, List[Any]] = {}

    def put(row: str, f: Dict[str, Any]) -> None:
        rows[row] = [f["qps"], f["error_rate"], f["p50_ms"], f["p99_ms"]]

    for s in figures["services"]:
        sid = "%s/%s" % (s["appkey"], s["service"])
        put(sid, s)
        for m in s["methods"]:
            put("%s#%s" % (sid, m["method"]), m)
        for n in s["nodes"]:
            put("%s/%s" % (sid, n["node"]), n)
            for m in n["methods"]:
                put("%s/%s#%s" % (sid, n["node"], m["method"]), m)
    return {"t": figures["to"], "rows": rows}
