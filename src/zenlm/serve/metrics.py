"""Counters, gauges and histograms for ``GET /metrics``, written in the Prometheus text format by hand.

Thread-safe: the engine thread and the HTTP handlers update them concurrently.
"""

from __future__ import annotations

import bisect
import threading

# Latency buckets (seconds), shared by every histogram.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HELP = {
    "zenlm_requests_total": ("counter", "HTTP requests by route and status code"),
    "zenlm_prompt_tokens_total": ("counter", "prompt tokens prefilled"),
    "zenlm_completion_tokens_total": ("counter", "tokens generated"),
    "zenlm_finished_sequences_total": ("counter", "sequences finished, by finish reason"),
    "zenlm_cancelled_sequences_total": ("counter", "sequences stopped because the client went away"),
    "zenlm_rejected_requests_total": ("counter", "requests answered 429 (server full)"),
    "zenlm_queue_depth": ("gauge", "sequences waiting for a slot"),
    "zenlm_running_sequences": ("gauge", "sequences being decoded"),
    "zenlm_request_seconds": ("histogram", "HTTP request latency"),
    "zenlm_queue_seconds": ("histogram", "time a sequence waited for a slot"),
    "zenlm_time_to_first_token_seconds": ("histogram", "submission to first sampled token"),
    "zenlm_inter_token_seconds": ("histogram", "time between consecutive tokens of a sequence"),
}


def _key(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(key: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in key] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


class Metrics:
    """A tiny registry: ``inc`` counters, ``set_gauge`` gauges, ``observe`` histograms, ``render`` text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, list[float]]] = {}  # bucket counts..., +Inf count, sum

    def inc(self, name: str, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            series[_key(labels)] = series.get(_key(labels), 0.0) + amount

    def set_gauge(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = float(value)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            h = self._hists.setdefault(name, {}).setdefault(_key(labels), [0.0] * (len(BUCKETS) + 2))
            h[bisect.bisect_left(BUCKETS, value)] += 1  # the first bucket whose bound >= value
            h[-1] += value

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name in sorted(set(self._values) | set(self._hists) | set(HELP)):
                kind, doc = HELP.get(name, ("gauge", name))
                lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    series = self._values.get(name) or {(): 0.0}
                    for key, v in sorted(series.items()):
                        lines.append(f"{name}{_fmt_labels(key)} {v:g}")
                    continue
                for key, h in sorted(self._hists.get(name, {(): [0.0] * (len(BUCKETS) + 2)}).items()):
                    cum = 0.0
                    for bound, n in zip(BUCKETS, h, strict=False):
                        cum += n
                        le = f'le="{bound:g}"'
                        lines.append(f"{name}_bucket{_fmt_labels(key, le)} {cum:g}")
                    cum += h[len(BUCKETS)]
                    inf = 'le="+Inf"'
                    lines.append(f"{name}_bucket{_fmt_labels(key, inf)} {cum:g}")
                    lines.append(f"{name}_sum{_fmt_labels(key)} {h[-1]:g}")
                    lines.append(f"{name}_count{_fmt_labels(key)} {cum:g}")
        return "\n".join(lines) + "\n"
