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


def table(report):
    rows = [("operation", "shape", "rank", "dtype", "batch", "threads",
             "numba_lora ms", "numpy ms", "baseline ms", "lora/base", "numpy/base")]
    for r in report["results"]:
        rows.append((
            r["op"], f"{r['out_features']}x{r['in_features']}", str(r["rank"]), r["dtype"],
            "-" if r["op"] in ("merge", "unmerge") else str(r["batch"]), str(r["threads"]),
            f"{r['numba_lora_s'] * 1e3:.3f}", f"{r['numpy_s'] * 1e3:.3f}",
            f"{r['dense_s'] * 1e3:.3f}", f"{r['ratio']:.3f}", f"{r['numpy_ratio']:.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows[1:]]
    lines.append(rule)
    m = report["machine"]
    head = (f"Measured with numba {m['numba']}, numpy {m['numpy']}, scipy {m['scipy']}, "
            f"Python {m['python']} on {m['cpus']} CPUs ({m['machine']}).  The baseline is "
            "the dense product for forward rows, ``np.copyto`` of W for merge rows, and a "
            "single-adapter ``forward_batch`` of the same rows for the multi-adapter rows "
            "(``multi_mixed``: 512 rows over 8 adapters; ``multi_per_row``: 64 rows, "
            "64 adapters).\n\n")
    extra = "".join(f"\n\n{sentence}" for sentence in describe_extras(report))
    return head + "\n".join(lines) + "\n" + extra


def _label(r):
    return (f"{r['out_features']}x{r['in_features']} r={r['rank']} "
            f"{r['dtype']} {r['threads']}t")


def _barh(ax, rows, title, xlabel):
    labels = [f"{r['op']} {_label(r)}" for r in rows]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r["ratio"] for r in rows], 0.4, label="numba_lora")
    ax.barh([y + 0.2 for y in ys], [r["numpy_ratio"] for r in rows], 0.4, label="numpy")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(ys), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    forward = [r for r in results if r["op"].startswith("forward")]
    merges = [r for r in results if r["op"] in ("merge", "unmerge")]
    multi = [r for r in results if r["op"].startswith("multi")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ax = axes[0]
    keys = sorted({(r["out_features"], r["in_features"], r["rank"], r["dtype"], r["threads"])
                   for r in forward})
    colors = plt.get_cmap("tab10")
    for n, key in enumerate(keys):
        rows = sorted((r for r in forward
                       if (r["out_features"], r["in_features"], r["rank"], r["dtype"], r["threads"]) == key),
                      key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        color = colors(n % 10)
        ax.plot(xs, [r["ratio"] for r in rows], "o-", color=color, label=_label(rows[0]))
        ax.plot(xs, [r["numpy_ratio"] for r in rows], "x--", color=color, alpha=0.5)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.02, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch rows (1 = one vector)", fontsize=8)
    ax.set_ylabel("time / dense product (solid: numba_lora, dashed: NumPy)", fontsize=8)
    ax.set_title("forward: ratio to the dense product (dotted: 1.02 target)", fontsize=9)
    ax.legend(fontsize=6)
    _barh(axes[1], merges, "merge / unmerge: ratio to np.copyto of W", "time / copy of W")
    if multi:
        _barh(axes[2], multi, "many adapters: ratio to a single-adapter batch",
              "time / single-adapter forward_batch")
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load(paths):
    """One report from several bench JSON files (results concatenated)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0])
    merged["results"] = [r for rep in reports for r in rep["results"]]
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
