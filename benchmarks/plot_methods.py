"""Chart of ``benchmarks.methods`` rows: trainable parameters (log x) against bytes saved for backward (MB).

Usage::

    python -m benchmarks.plot_methods out.json --png docs/benchmark_methods.png

(``python -m benchmarks.methods ... --png PATH`` draws the same chart at the end of a run.) Needs matplotlib
(``pip install 'vpeft[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any, Optional

MB = 2**20


def _group(method: str) -> str:
    if method.startswith("peft_"):
        return "HF peft"
    if method in ("full_ft", "linear_probe"):
        return "baseline"
    return "vpeft"


def plot(rows: list[dict[str, Any]], path: str, title: Optional[str] = None) -> None:
    """Write the chart of ``rows`` (``benchmarks.methods`` JSON objects) to ``path``, one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vpeft": "tab:blue", "HF peft": "tab:orange", "baseline": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for group, color in colors.items():
        pts = [r for r in rows if _group(r["method"]) == group]
        if pts:
            ax.scatter([r["trainable_params"] for r in pts], [r["saved_bytes"] / MB for r in pts], c=color,
                       label=group, s=36, zorder=3)
    # points that nearly coincide share one label (their names stacked), so the chart stays readable
    ymax = max(r["saved_bytes"] for r in rows) / MB or 1.0
    clusters: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: (r["trainable_params"], r["saved_bytes"])):
        for c in clusters:
            if (abs(math.log10(max(r["trainable_params"], 1) / max(c[0]["trainable_params"], 1))) < 0.08
                    and abs(r["saved_bytes"] - c[0]["saved_bytes"]) / MB < 0.03 * ymax):
                c.append(r)
                break
        else:
            clusters.append([r])
    for c in clusters:
        x = statistics.fmean(math.log10(max(r["trainable_params"], 1)) for r in c)
        y = statistics.fmean(r["saved_bytes"] for r in c) / MB
        text = "\n".join(r["method"] for r in sorted(c, key=lambda r: r["method"]))
        ax.annotate(text, (10**x, y), fontsize=7, xytext=(6, -3), textcoords="offset points", va="top")
    ax.set_xscale("log")
    xs = [max(r["trainable_params"], 1) for r in rows]
    ax.set_xlim(min(xs) / 1.5, max(xs) * 4)  # room for the labels right of the points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("saved for backward, one training forward (MB, parameters excluded)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="rows written by python -m benchmarks.methods --json")
    ap.add_argument("--png", required=True)
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    with open(args.json) as f:
        rows = json.load(f)
    r0 = rows[0]
    plot(rows, args.png, args.title or f"{r0['model']}, batch {r0['batch_size']}, fp32, CPU")


if __name__ == "__main__":
    main()
