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

HERE = Path(__file__).resolve().parent


def table(report):
    rows = [("operation", "shape", "rank", "dtype", "batch", "threads",
             "numba_lora ms", "numpy ms", "dense ms", "lora/dense", "numpy/dense")]
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
            f"Python {m['python']} on {m['cpus']} CPUs ({m['machine']}).\n\n")
    extra = ""
    for row in report.get("memory", []):
        extra += (f"\n\nPeak extra memory of one merge, {row['out_features']}x{row['in_features']} "
                  f"rank {row['rank']} {row['dtype']} (growth of peak RSS in a fresh process): "
                  f"numba_lora {row['numba_lora_extra_bytes'] / 2**20:.2f} MiB "
                  f"({100 * row['numba_lora_extra_fraction']:.2f}% of W's bytes), NumPy's "
                  f"``W += s * (B @ A)`` {row['numpy_extra_bytes'] / 2**20:.1f} MiB "
                  f"({100 * row['numpy_extra_fraction']:.0f}% of W's bytes).")
    if "cold_start" in report:
        cs = report["cold_start"]
        extra += (f"\n\nCold start, a fresh process importing numba_lora and running the first "
                 f"forward: {cs['warm_cache_s']:.2f} s with a warm cache, "
                 f"{cs['cold_cache_s']:.2f} s compiling from scratch.\n")
    return head + "\n".join(lines) + "\n" + extra


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    forward = [r for r in report["results"] if r["op"].startswith("forward")]
    for key in sorted({(r["out_features"], r["in_features"], r["rank"], r["dtype"], r["threads"])
                       for r in forward}):
        pts = sorted((r["batch"], r["ratio"], r["numpy_ratio"]) for r in forward
                     if (r["out_features"], r["in_features"], r["rank"], r["dtype"], r["threads"]) == key)
        label = f"{key[0]}x{key[1]} r={key[2]} {key[3]} t={key[4]}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"numba_lora {label}")
        ax1.plot([p[0] for p in pts], [p[2] for p in pts], "x--", alpha=0.6, label=f"numpy {label}")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch rows (1 = one vector)")
    ax1.set_ylabel("time / dense product")
    ax1.set_title("forward")
    ax1.legend(fontsize=6)
    merges = [r for r in report["results"] if r["op"] in ("merge", "unmerge")]
    labels = [f"{r['op']}\n{r['out_features']}x{r['in_features']}\nr={r['rank']} {r['dtype']}"
              for r in merges]
    xs = range(len(merges))
    ax2.bar([x - 0.2 for x in xs], [r["ratio"] for r in merges], 0.4, label="numba_lora")
    ax2.bar([x + 0.2 for x in xs], [r["numpy_ratio"] for r in merges], 0.4, label="numpy")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(list(xs), labels, fontsize=6)
    ax2.set_ylabel("time / np.copyto of W")
    ax2.set_title("merge / unmerge")
    ax2.legend(fontsize=7)
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
    if not argv:
        print(__doc__)
        return 2
    report = load(argv)
    (HERE / "performance_table.rst").write_text(table(report))
    (HERE / "_static").mkdir(exist_ok=True)
    plot(report, HERE / "_static" / "performance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
