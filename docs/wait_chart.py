"""Draw docs/images/wait-times.png from `examples/checkout.py --metrics` output.

    python examples/checkout.py --metrics wait.json
    python docs/wait_chart.py wait.json docs/images/wait-times.png

Percentiles are estimated from the `keyedlock.lock.wait.duration` histogram buckets the way
PromQL's `histogram_quantile` does (linear within a bucket), so the chart shows what a
dashboard built on these metrics would show. Needs matplotlib (the `docs` extra).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

QUANTILES = (0.5, 0.9, 0.99)
WAIT = "keyedlock.lock.wait.duration"


def wait_histogram(metrics: dict[str, Any]) -> tuple[list[float], list[int]]:
    """Bucket bounds and counts of the wait histogram, summed over its series."""
    bounds: list[float] = []
    counts: list[int] = []
    for resource in metrics["resource_metrics"]:
        for scope in resource["scope_metrics"]:
            for metric in scope["metrics"]:
                if metric["name"] != WAIT:
                    continue
                for point in metric["data"]["data_points"]:
                    bounds = point["explicit_bounds"]
                    if not counts:
                        counts = [0] * len(point["bucket_counts"])
                    counts = [a + b for a, b in zip(counts, point["bucket_counts"], strict=True)]
    return bounds, counts


def quantile(q: float, bounds: list[float], counts: list[int]) -> float:
    """`histogram_quantile(q, ...)`: linear interpolation inside the bucket holding rank q."""
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if seen + count >= rank and count:
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index] if index < len(bounds) else bounds[-1]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def draw(runs: list[dict[str, Any]], out: str) -> None:
    levels = [run["checkouts"] for run in runs]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for q in QUANTILES:
        values = [quantile(q, *wait_histogram(run["metrics"])) * 1000 for run in runs]
        axes.plot(levels, values, marker="o", label=f"p{round(q * 100)}")
    axes.set_xlabel("concurrent checkouts for one user (examples/checkout.py)")
    axes.set_ylabel("wait for the key (ms)")
    axes.set_title("keyedlock.lock.wait.duration, from the histogram buckets")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="the JSON written by examples/checkout.py --metrics")
    parser.add_argument("out", help="the PNG to write")
    args = parser.parse_args()
    with open(args.metrics) as source:
        runs = json.load(source)["runs"]
    draw(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
