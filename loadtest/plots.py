"""PNG plots of a load test run, from the files loadtest/loadtest_run.py writes into a results folder.

latency.png     per call: p50 / p95 / p99 response time (ms) over the run, from locust's
                locust_stats_history.csv (locust's rolling window of recent requests)
throughput.png  requests/s per call and in total, failures/s, and the number of locust users
cache.png       cache hits and misses per tier over the run (Admin.Stats deltas), with hit rates, and
                cumulative hits per tier over time (cache_timeline.csv)

python loadtest/plots.py loadtest/results/latest      # redraw the plots of a results folder
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

TTFP_SUFFIX = ":ttfp"
ITL_SUFFIX = ":itl"
TIER_ORDER = ("device", "host", "disk", "store")
"""Fastest first, as docs/architecture.md lists the cache tiers."""
QUANTILES = (("50%", "p50"), ("95%", "p95"), ("99%", "p99"))
Series = dict[str, list[float]]


def _number(text: str) -> float:
    """A CSV cell as a float; NaN for 'N/A' or empty."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def history_start(path: Path) -> float | None:
    """Unix time of the first row of locust_stats_history.csv (the origin of every plot's time axis)."""
    with path.open() as handle:
        first = next(csv.DictReader(handle), None)
    return _number(first["Timestamp"]) if first else None


def read_history(path: Path) -> dict[str, Series]:
    """locust_stats_history.csv as {request name: {column: values}} plus 't' (seconds since the first row).

    Percentiles of 0 (no request in the window yet) become NaN, so lines start where data does."""
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return {}
    start = _number(rows[0]["Timestamp"])
    by_name: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        series = by_name[row["Name"]]
        series["t"].append(_number(row["Timestamp"]) - start)
        for column in ("User Count", "Requests/s", "Failures/s"):
            series[column].append(_number(row[column]))
        for column, _ in QUANTILES:
            value = _number(row[column])
            series[column].append(value if value > 0 else math.nan)
    return dict(by_name)


def read_timeline(path: Path, start: float | None = None) -> dict[str, Series]:
    """cache_timeline.csv as {tier: {'t', 'hits', 'misses'}}, 't' in seconds since unix time `start`
    (locust's first history row, so the time axes of all plots agree), else since the first sample."""
    tiers: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    if path.exists():
        rows = list(csv.DictReader(path.open()))
        origin = start if start is not None else min((float(r["unix_time"]) for r in rows), default=0.0)
        for row in rows:
            tiers[row["tier"]]["t"].append(float(row["unix_time"]) - origin)
            for column in ("hits", "misses"):
                tiers[row["tier"]][column].append(float(row[column]))
    return dict(tiers)


def _tier_key(tier: str) -> tuple[int, str]:
    return (TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), tier)


def _calls(history: Mapping[str, Series]) -> list[str]:
    """Request names in plotting order: calls first, then time-to-first-piece entries."""
    names = [n for n in history if n != "Aggregated"]
    return sorted(names, key=lambda n: (n.endswith((TTFP_SUFFIX, ITL_SUFFIX)), n))


def plot_latency(history: Mapping[str, Series], path: Path) -> Path:
    """One panel per request name: p50, p95, p99 response time in ms against seconds since the start."""
    names = _calls(history) or ["Aggregated"]
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names, strict=False):
        series = history.get(name, {})
        for column, label in QUANTILES:
            ax.plot(series.get("t", []), series.get(column, []), label=label, linewidth=1.6)
        title = f"{name} (time to first piece)" if name.endswith(TTFP_SUFFIX) else name
        title = f"{name} (between pieces)" if name.endswith(ITL_SUFFIX) else title
        _decorate(ax, title, "response time (ms)")
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Latency percentiles over the run (locust's rolling window of recent requests)")
    return _save(fig, path)


def plot_throughput(history: Mapping[str, Series], path: Path) -> Path:
    """Requests/s per call and their total, failures/s, and locust users on a second axis."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    calls = [n for n in _calls(history) if not n.endswith(TTFP_SUFFIX)]
    for name in calls:
        ax.plot(history[name]["t"], history[name]["Requests/s"], label=name, linewidth=1.3)
    if calls:
        t, total = _sum_by_time([history[n] for n in calls], "Requests/s")
        t_fail, failures = _sum_by_time([history[n] for n in calls], "Failures/s")
        ax.plot(t, total, label="all calls", color="black", linewidth=2.2)
        ax.plot(t_fail, failures, label="failures", color="red", linewidth=1.6, linestyle="--")
    _decorate(ax, "Throughput over the run", "requests/s")
    ax.set_ylim(bottom=0)
    users = history.get("Aggregated", {})
    if users.get("t"):
        twin = ax.twinx()
        twin.plot(users["t"], users["User Count"], color="grey", linestyle=":", label="locust users")
        twin.set_ylabel("locust users (concurrent connections)")
        twin.set_ylim(bottom=0)
        twin.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _sum_by_time(series: Iterable[Series], column: str) -> tuple[list[float], list[float]]:
    """The sum of `column` over several request names' series, matched on their time stamps (NaN as 0;
    a name only has rows once its first request was made)."""
    total: dict[float, float] = defaultdict(float)
    for one in series:
        for t, value in zip(one["t"], one[column], strict=True):
            total[t] += 0.0 if math.isnan(value) else value
    times = sorted(total)
    return times, [total[t] for t in times]


def plot_cache(summary: Mapping[str, Any], timeline: Mapping[str, Series], path: Path) -> Path:
    """Left: hits and misses per tier during the run, hit rate on top. Right: cumulative hits per tier."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    counts: Mapping[str, Mapping[str, int]] = summary.get("cache", {})
    rates: Mapping[str, float | None] = summary.get("cache_hit_rate", {})
    tiers = sorted(counts, key=_tier_key)
    xs = range(len(tiers))
    hits = [counts[t]["hits"] for t in tiers]
    misses = [counts[t]["misses"] for t in tiers]
    left.bar([x - 0.2 for x in xs], hits, width=0.4, label="hits", color="tab:green")
    left.bar([x + 0.2 for x in xs], misses, width=0.4, label="misses", color="tab:orange")
    for x, tier in zip(xs, tiers, strict=True):
        rate = rates.get(tier)
        text = "no lookups" if rate is None else f"hit rate {rate:.1%}\nof {hits[x] + misses[x]:,}"
        left.annotate(
            text,
            (x, max(hits[x], misses[x])),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    left.set_ylim(0, max([*hits, *misses, 1]) * 1.5)  # room for the labels and the legend above the bars
    left.set_xticks(list(xs), tiers)
    left.set_xlabel("cache tier")
    _decorate(left, "Cache hits and misses per tier during the run", "lookups (count)", xlabel=False)
    left.legend(fontsize=8, loc="upper center", ncol=2)
    for ax in (left, right):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    styles = ("-", "--", "-.", ":")
    for n, tier in enumerate(sorted(timeline, key=_tier_key)):
        series = timeline[tier]
        base = series["hits"][0] if series["hits"] else 0.0
        right.plot(
            series["t"],
            [h - base for h in series["hits"]],
            label=tier,
            linewidth=1.8,
            linestyle=styles[n % len(styles)],
        )
    _decorate(right, "Cumulative cache hits per tier (Admin.Stats)", "hits since start (count)")
    right.set_ylim(bottom=0)
    return _save(fig, path)


def plot_streaming(summary: Mapping[str, Any], path: Path) -> Path:
    """Time to first token and inter-token latency of the streams: p50, p95, p99 over the whole run."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    labels = [label for _, label in QUANTILES]
    for n, (key, name) in enumerate((("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"))):
        figures = summary.get(key) or {}
        xs = [i + 0.4 * n for i in range(len(labels))]
        bars = ax.bar(xs, [figures.get(label, 0) for label in labels], width=0.4, label=name)
        ax.bar_label(bars, fmt="%g")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
    _decorate(ax, "Streaming latency (whole run)", "ms", xlabel=False)
    return _save(fig, path)


def _decorate(ax: Axes, title: str, ylabel: str, xlabel: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel("time since start (s)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results: Path) -> list[Path]:
    """Draw every plot whose inputs are in `results`; returns the PNG paths written."""
    written: list[Path] = []
    history_path = results / "locust_stats_history.csv"
    start = history_start(history_path) if history_path.exists() else None
    if history_path.exists():
        history = read_history(history_path)
        written += [
            plot_latency(history, results / "latency.png"),
            plot_throughput(history, results / "throughput.png"),
        ]
    summary_path = results / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        written.append(plot_cache(summary, read_timeline(results / "cache_timeline.csv", start), results / "cache.png"))
        if summary.get("ttft_ms") or summary.get("itl_ms"):
            written.append(plot_streaming(summary, results / "streaming.png"))
    return written


def main(argv: Iterable[str]) -> int:
    args = list(argv)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for path in make_plots(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
