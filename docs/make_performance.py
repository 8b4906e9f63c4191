"""Turn ``python -m numba_lora bench --json`` output into the performance page's table and plot.

Usage (``docs/bench/run.sh`` does both steps)::

    python -m numba_lora bench --shape 4096x4096 --rank 4,16,64 --json reference.json
    python docs/make_performance.py reference.json [more.json ...]

Writes ``docs/performance_table.rst`` (included by ``performance.rst``) and
``docs/_static/performance.png`` (ratio to the dense product, by batch size
and rank).  Needs matplotlib (``pip install ".[docs]"``).
"""

import json
import sys
from pathlib import Path

from numba_lora.bench import describe_extras

HERE = Path(__file__).resolve().parent


def _case(r):
    return (r["out_features"], r["in_features"], r["rank"], r["dtype"], r["threads"])


def _caption(case):
    out_features, in_features, rank, dtype, threads = case
    return (f"{out_features} x {in_features}, rank {rank}, {dtype}, "
            f"{threads} thread{'s' if threads != 1 else ''}")


def table(report):
    """The page's tables: one ``csv-table`` per case, ratios first.

    One narrow table per case (shape, rank, dtype, threads) fits the content
    column where one table with every column ran past it; an em dash, not
    "-" (which reStructuredText reads as a bullet), marks a batch size that
    does not apply.  A case measured in two files (``source``) gets a table
    for each, its caption naming the file.
    """
    groups = {}
    for r in report["results"]:
        groups.setdefault((_case(r), r.get("source")), []).append(r)
    repeated = {case for case, _ in groups if sum(c == case for c, _ in groups) > 1}
    m = report["machine"]
    parts = [
        f"Measured with numba {m['numba']}, numpy {m['numpy']}, scipy {m['scipy']}, "
        f"Python {m['python']} on {m['cpus']} CPUs ({m['machine']}).  The baseline is "
        "the dense product for forward rows, ``np.copyto`` of W for merge rows, and a "
        "single-adapter ``forward_batch`` of the same rows for the multi-adapter rows "
        "(``multi_mixed``: 512 rows over 8 adapters; ``multi_per_row``: 64 rows, "
        "64 adapters).  Times in milliseconds."
    ]
    for (case, source), rows in groups.items():
        caption = _caption(case) + (f" ({source})" if case in repeated and source else "")
        lines = [f".. csv-table:: {caption}", "   :header-rows: 1", "   :align: left", "",
                 "   operation, batch, lora/base, numpy/base, numba_lora, numpy, baseline"]
        for r in rows:
            batch = "—" if r["op"] in ("merge", "unmerge") else str(r["batch"])
            lines.append(
                f"   {r['op']}, {batch}, {r['ratio']:.3f}, {r['numpy_ratio']:.3f}, "
                f"{r['numba_lora_s'] * 1e3:.3f}, {r['numpy_s'] * 1e3:.3f}, "
                f"{r['dense_s'] * 1e3:.3f}")
        parts.append("\n".join(lines))
    parts += list(describe_extras(report))
    return "\n\n".join(parts) + "\n"


def _label(r):
    dtype = {"float32": "f32", "float64": "f64"}.get(r["dtype"], r["dtype"])
    return (f"{r['out_features']}x{r['in_features']} r{r['rank']} "
            f"{dtype} {r['threads']}t")


def _unique(rows):
    """The first of rows measuring the same thing (a case repeated in a second file)."""
    seen, kept = set(), []
    for r in rows:
        key = (r["op"], _case(r), r["batch"] if r["op"] not in ("merge", "unmerge") else None)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def _barh(ax, rows, title, xlabel):
    labels = [f"{r['op']}  {_label(r)}" for r in rows]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r["ratio"] for r in rows], 0.4, label="numba_lora")
    ax.barh([y + 0.2 for y in ys], [r["numpy_ratio"] for r in rows], 0.4, label="NumPy")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(list(ys), labels, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    # Below the axes: a legend inside would cover the longest bars.
    # Room on the right for the legend, clear of the longest bars.
    ax.set_xlim(0, 1.3 * max(max(r["ratio"], r["numpy_ratio"]) for r in rows))
    ax.legend(fontsize=10, loc="lower right", frameon=True)


def plot(report, path):
    """Three panels stacked, each the content column's width, labels readable at 100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = _unique(report["results"])
    forward = [r for r in results if r["op"].startswith("forward")]
    merges = [r for r in results if r["op"] in ("merge", "unmerge")]
    multi = [r for r in results if r["op"].startswith("multi")]
    panels = 2 + bool(multi)
    heights = [4.5, 0.4 * len(merges) + 0.8] + ([0.4 * len(multi) + 0.8] if multi else [])
    fig, axes = plt.subplots(panels, 1, figsize=(10, sum(heights) + 2.2 * panels),
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    ax = axes[0]
    colors = plt.get_cmap("tab10")
    for n, key in enumerate(sorted({_case(r) for r in forward})):
        rows = sorted((r for r in forward if _case(r) == key), key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        color = colors(n % 10)
        ax.plot(xs, [r["ratio"] for r in rows], "o-", color=color, label=_label(rows[0]))
        ax.plot(xs, [r["numpy_ratio"] for r in rows], "x--", color=color, alpha=0.5)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.02, color="k", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.tick_params(labelsize=10)
    ax.set_xlabel("batch rows (1 = one vector)", fontsize=11)
    ax.set_ylabel("time / dense product", fontsize=11)
    ax.set_title("forward: ratio to the dense product\n"
                 "(solid: numba_lora, dashed: NumPy; dotted: the 1.02 target)", fontsize=12)
    ax.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
              frameon=False)
    _barh(axes[1], merges, "merge / unmerge: ratio to np.copyto of W", "time / copy of W")
    if multi:
        _barh(axes[2], multi, "many adapters: ratio to a single-adapter batch",
              "time / single-adapter forward_batch")
    fig.savefig(path, dpi=100)


def load(paths):
    """One report from several bench JSON files (results concatenated)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0])
    merged["results"] = [dict(r, source=Path(p).name)
                         for p, rep in zip(paths, reports) for r in rep["results"]]
    for rep in reports[1:]:
        for key in ("memory", "cold_start"):
            if key in rep:
                merged.setdefault(key, rep[key])
    return merged


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    report = load(argv)
    (HERE / "performance_table.rst").write_text(table(report))
    (HERE / "_static").mkdir(exist_ok=True)
    plot(report, HERE / "_static" / "performance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
