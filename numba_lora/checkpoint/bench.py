"""Checkpoint merge throughput and peak memory against a plain copy of the same files.

    python -m numba_lora.checkpoint.bench --dir /tmp/nl-bench --gib 1.2 --dtype bf16

Writes a synthetic Llama-shaped checkpoint (hidden 2048, intermediate 5632,
vocabulary 32000, GQA with 512-wide k/v, as many layers as make ``--gib``)
in shards of ``--shard-mib``, and a rank-16 PEFT adapter on all seven
projections (80% of a 1.2 GiB checkpoint's bytes), or on those ``--targets``
names (PEFT's default for Llama, ``q_proj,v_proj``: 9%), into ``--dir``
(kept between runs: delete it yourself).  Then, with the base's files in
the page cache (read once beforehand), it times, ``--repeat`` times,
interleaved:

- ``copy``: ``shutil.copyfile`` of every file into a new directory (the
  kernel copies: ``copy_file_range``/``sendfile``), then ``os.fsync`` of
  each, since the merge syncs its shards before renaming them;
- ``read+write``: the same files copied by reading and writing them through
  an 8 MiB buffer, as the merge moves its adapted tensors;
- ``merge``: :func:`numba_lora.checkpoint.merge`, once per ``--modes`` entry
  (the ways of writing in :data:`MODES`: ``default`` is what ``merge``
  does; ``direct``, ``mapped``, ``buffered`` and their ``-nosync``
  variants set ``numba_lora.checkpoint._write``'s switches), each run
  starting with another mode, in a fresh process, which
  records its resident memory after importing numba_lora and loading the
  kernels, resets the peak (``/proc/self/clear_refs``; where that is not
  allowed, the peak stays the process's ``ru_maxrss``), and reads the peak
  after the merge (``VmHWM``).

Both record CPU time (user + system), which a busy machine disturbs less
than wall time.  Figures are medians, and the best run; throughput is the
bytes of all the base's files per second.
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, KV, VOCAB, RANK = 2048, 5632, 512, 32000, 16
MODULES = (("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", KV, HIDDEN),
           ("self_attn.v_proj", KV, HIDDEN), ("self_attn.o_proj", HIDDEN, HIDDEN),
           ("mlp.gate_proj", INTERMEDIATE, HIDDEN), ("mlp.up_proj", INTERMEDIATE, HIDDEN),
           ("mlp.down_proj", HIDDEN, INTERMEDIATE))
_CODES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}


def _tensors(layers):
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        yield f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)
        for module, out, inn in MODULES:
            yield f"model.layers.{i}.{module}.weight", (out, inn)
        yield f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def _values(rng, shape, dtype):
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).ravel()
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    from .. import kernels

    return kernels.round_bf16(x, np.empty(x.size, np.uint16))


def _write_safetensors(path, items, dtype, rng):
    code, itemsize = _CODES[dtype]
    header, offset = {}, 0
    for name, shape in items:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for name, shape in items:
            fh.write(_values(rng, shape, dtype).tobytes())


def make_checkpoint(directory, gib, dtype, shard_mib, targets=None):
    """Write the synthetic base and adapter under ``directory``; return (base, adapter).

    ``targets``: the projections the adapter targets (names such as
    ``"q_proj"``); default all seven.
    """
    directory = Path(directory)
    modules = [m for m in MODULES if targets is None or m[0].split(".")[1] in targets]
    itemsize = _CODES[dtype][1]
    per_layer = sum(o * i for _, o, i in MODULES) + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, math.ceil((gib * 2**30 / itemsize - fixed) / per_layer))
    base = directory / f"base-{dtype}-{layers}l"
    adapter = directory / (f"adapter-{layers}l" if len(modules) == len(MODULES) else
                           f"adapter-{layers}l-" + "-".join(m[0].split(".")[1] for m in modules))
    rng = np.random.default_rng(0)
    if not (base / "model.safetensors.index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        shards, current, size = [], [], 0
        for name, shape in _tensors(layers):
            nbytes = math.prod(shape) * itemsize
            if current and size + nbytes > shard_mib * 2**20:
                shards.append(current)
                current, size = [], 0
            current.append((name, shape))
            size += nbytes
        shards.append(current)
        weight_map, total = {}, 0
        for k, items in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(base / file, items, dtype, rng)
            for name, shape in items:
                weight_map[name] = file
                total += math.prod(shape) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (base / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "hidden_size": HIDDEN}))
    if not (adapter / "adapter_model.safetensors").is_file():
        from safetensors.numpy import save_file

        adapter.mkdir(parents=True, exist_ok=True)
        factors = {}
        for i in range(layers):
            for module, out, inn in modules:
                key = f"base_model.model.model.layers.{i}.{module}"
                factors[f"{key}.lora_A.weight"] = (
                    rng.standard_normal((RANK, inn), dtype=np.float32) * np.float32(0.02))
                factors[f"{key}.lora_B.weight"] = (
                    rng.standard_normal((out, RANK), dtype=np.float32) * np.float32(0.02))
        save_file(factors, adapter / "adapter_model.safetensors")
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
            "target_modules": [m.split(".")[1] for m, _, _ in modules]}))
    return base, adapter


def _read_all(directory):
    for path in Path(directory).iterdir():
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _copy_user_space(base, out):
    """A read + write copy through an 8 MiB buffer (what the merge does for its tensors)."""
    out.mkdir()
    cpu = _cpu()
    start = time.perf_counter()
    buffer = memoryview(bytearray(8 << 20))
    for path in sorted(base.iterdir()):
        with open(path, "rb", buffering=0) as src, open(out / path.name, "wb", buffering=0) as dst:
            while True:
                n = src.readinto(buffer)
                if not n:
                    break
                dst.write(buffer[:n])
    return time.perf_counter() - start, _cpu() - cpu


def _copy(base, out):
    out.mkdir()
    cpu = _cpu()
    start = time.perf_counter()
    for path in sorted(base.iterdir()):
        shutil.copyfile(path, out / path.name)
    copied = time.perf_counter() - start
    cpu = _cpu() - cpu
    for path in out.iterdir():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    return copied, time.perf_counter() - start, cpu


_CHILD = """
import resource, sys, time
import numba_lora, numba_lora.checkpoint as c
from numba_lora import kernels
from numba_lora.checkpoint import _write
how = sys.argv[4]
if how != "default":
    _write.DIRECT_IO = how.startswith("direct")
    _write.MAP_WRITES = how.startswith("mapped")
import numpy as np
W = np.zeros((8, 8), np.uint16); A = np.zeros((2, 8), np.float32); B = np.zeros((8, 2), np.float32)
# Load the kernels first (from Numba's cache: about half a second, once per
# process), so that what is timed is the merge.
for kernel in (kernels.merge_bf16, kernels.merge_bf16_serial, kernels.merge_f16,
               kernels.merge_f16_serial):
    kernel(W, A, B, 1.0)
kernels.merge(W.astype(np.float32), A, B, 1.0); kernels.merge_serial(W.astype(np.float32), A, B, 1.0)
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
# The peak so far (imports, kernel loading) is reset, where Linux allows it,
# so that the peak read afterwards is the merge's own.
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
def rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
floor = rss("VmRSS:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = cpu()
r = c.merge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False,
            sync=not how.endswith("-nosync"))
spent = cpu() - before
peak = rss("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(floor, peak, r.seconds, r.bytes, spent)
"""


def _merge(base, adapter, out, how="default"):
    result = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(adapter), str(out), how],
                            capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr)
        result.check_returncode()
    floor_kib, peak_kib, seconds, nbytes, cpu = result.stdout.split()
    return float(seconds), int(floor_kib) * 1024, int(peak_kib) * 1024, int(nbytes), float(cpu)


#: Ways of writing the merge, as the child process sets ``_write``'s switches.
MODES = {
    "default": "numba_lora's defaults, as merge() runs",
    "direct": "O_DIRECT writes through one aligned chunk, synced",
    "mapped": "the shard copied by the kernel, adapted tensors merged in a shared mapping, synced",
    "buffered": "the shard copied by the kernel, merged tensors written from a buffer, synced",
    "mapped-nosync": "as mapped, left in the page cache (no fsync), as copyfile leaves its copy",
    "buffered-nosync": "as buffered, left in the page cache (no fsync)",
}


def _adapted_bytes(base, adapter):
    from . import plan_merge

    plan = plan_merge(base, adapter)
    where = {name: shard for shard in plan.checkpoint.shards for name in
             (info.name for info in shard.tensors)}
    return sum(where[m.tensor].tensor(m.tensor).stop - where[m.tensor].tensor(m.tensor).start
               for m in plan.merges)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m numba_lora.checkpoint.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/numba_lora-merge-bench", type=Path,
                   help="where the synthetic checkpoint and the outputs go")
    p.add_argument("--gib", type=float, default=1.2, help="base size in GiB (default 1.2)")
    p.add_argument("--dtype", choices=sorted(_CODES), default="bf16")
    p.add_argument("--shard-mib", type=int, default=500, help="shard size in MiB (default 500)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--targets", default=None,
                   help="comma-separated projections the adapter targets (default all seven; "
                        "PEFT's default for Llama is q_proj,v_proj)")
    p.add_argument("--modes", default="default",
                   help="comma-separated ways of writing the merge, each timed in its turn: "
                        + "; ".join(f"{k}: {v}" for k, v in MODES.items()))
    p.add_argument("--buffered", action="store_true",
                   help="also time the merge with buffered writes (mode 'buffered')")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if args.buffered and "buffered" not in modes:
        modes.append("buffered")
    for mode in modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    targets = None
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        known = [m.split(".")[1] for m, _, _ in MODULES]
        if not targets or any(t not in known for t in targets):
            p.error(f"--targets: choose from {', '.join(known)}")
    base, adapter = make_checkpoint(args.dir, args.gib, args.dtype, args.shard_mib, targets)
    total = sum(path.stat().st_size for path in base.glob("*.safetensors"))
    every = sum(path.stat().st_size for path in base.iterdir())
    shards = sorted(base.glob("*.safetensors"))
    largest_shard = max(path.stat().st_size for path in shards)
    adapted = _adapted_bytes(base, adapter)
    print(f"base {base}: {total / 2**30:.2f} GiB in {len(shards)} shards "
          f"(largest {largest_shard / 2**20:.0f} MiB), adapter rank {RANK} on "
          f"{args.targets or 'all seven projections'}: {adapted / total:.0%} of the bytes adapted")
    _read_all(base)
    _read_all(adapter)
    rows = {"copy": [], "copy+fsync": [], "copy_cpu": [], "read+write": [], "read+write_cpu": []}
    for mode in modes:
        for key in ("merge", "merge_cpu", "floor", "peak"):
            rows[f"{key}:{mode}"] = []
    for k in range(args.repeat):
        out = args.dir / "copy-out"
        shutil.rmtree(out, ignore_errors=True)
        copied, synced, cpu = _copy(base, out)
        shutil.rmtree(out)
        rows["copy"].append(copied)
        rows["copy+fsync"].append(synced)
        rows["copy_cpu"].append(cpu)
        seconds, cpu = _copy_user_space(base, out)
        shutil.rmtree(out)
        rows["read+write"].append(seconds)
        rows["read+write_cpu"].append(cpu)
        line = (f"  run {k + 1}: copy {copied:.2f} s (+fsync {synced:.2f} s, CPU "
                f"{rows['copy_cpu'][-1]:.2f} s), read+write {rows['read+write'][-1]:.2f} s")
        # A different mode first in each run: none always follows the copies.
        for mode in modes[k % len(modes):] + modes[:k % len(modes)]:
            out = args.dir / "merge-out"
            shutil.rmtree(out, ignore_errors=True)
            seconds, floor, peak, _, cpu = _merge(base, adapter, out, mode)
            shutil.rmtree(out)
            rows[f"merge:{mode}"].append(seconds)
            rows[f"merge_cpu:{mode}"].append(cpu)
            rows[f"floor:{mode}"].append(floor)
            rows[f"peak:{mode}"].append(peak)
            line += (f", {mode} {seconds:.2f} s (CPU {cpu:.2f} s, peak RSS +"
                     f"{(peak - floor) / 2**20:.0f} MiB)")
        print(line + f", load {os.getloadavg()[0]:.1f}", flush=True)
    med = {key: statistics.median(values) for key, values in rows.items()}
    best = {key: min(values) for key, values in rows.items()}
    largest_f32 = 4 * INTERMEDIATE * HIDDEN
    report = {
        "base_bytes": total, "all_files_bytes": every, "adapted_bytes": adapted,
        "adapted_fraction": adapted / total, "targets": targets or "all",
        "shards": len(shards), "largest_shard_bytes": largest_shard, "dtype": args.dtype,
        "rank": RANK, "copy_s": med["copy"], "copy_fsync_s": med["copy+fsync"],
        "copy_gib_s": every / med["copy"] / 2**30,
        "copy_fsync_gib_s": every / med["copy+fsync"] / 2**30,
        "best_copy_s": best["copy"], "best_copy_fsync_s": best["copy+fsync"],
        "copy_cpu_s": med["copy_cpu"],
        "read_write_s": med["read+write"], "read_write_cpu_s": med["read+write_cpu"],
        "largest_adapted_tensor_f32_bytes": largest_f32, "modes": {}, "runs": rows,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    print(f"copy {report['copy_gib_s']:.2f} GiB/s ({report['copy_fsync_gib_s']:.2f} with fsync; "
          f"CPU {med['copy_cpu']:.2f} s), read+write copy "
          f"{every / med['read+write'] / 2**30:.2f} GiB/s")
    for mode in modes:
        m = {
            "merge_s": med[f"merge:{mode}"], "best_merge_s": best[f"merge:{mode}"],
            "merge_gib_s": every / med[f"merge:{mode}"] / 2**30,
            "merge_vs_copy": med["copy"] / med[f"merge:{mode}"],
            "merge_vs_copy_fsync": med["copy+fsync"] / med[f"merge:{mode}"],
            "merge_vs_read_write": med["read+write"] / med[f"merge:{mode}"],
            "best_merge_vs_copy": best["copy"] / best[f"merge:{mode}"],
            "best_merge_vs_copy_fsync": best["copy+fsync"] / best[f"merge:{mode}"],
            "merge_cpu_s": med[f"merge_cpu:{mode}"],
            "rss_after_import_bytes": med[f"floor:{mode}"],
            "peak_rss_bytes": med[f"peak:{mode}"],
            "peak_over_import_bytes": med[f"peak:{mode}"] - med[f"floor:{mode}"],
        }
        report["modes"][mode] = m
        print(f"merge [{mode}] {m['merge_gib_s']:.2f} GiB/s: {m['merge_vs_copy']:.2f}x a copy "
              f"({m['merge_vs_copy_fsync']:.2f}x a synced copy, "
              f"{m['merge_vs_read_write']:.2f}x a read+write copy; best runs "
              f"{m['best_merge_vs_copy']:.2f}x and {m['best_merge_vs_copy_fsync']:.2f}x; "
              f"CPU {m['merge_cpu_s']:.2f} s vs {med['copy_cpu']:.2f} s); peak RSS "
              f"{m['peak_rss_bytes'] / 2**20:.0f} MiB = {m['rss_after_import_bytes'] / 2**20:.0f} "
              f"MiB after import + {m['peak_over_import_bytes'] / 2**20:.0f} MiB")
    # The first mode's figures under the keys earlier reports used.
    report.update(report["modes"][modes[0]])
    print(f"(largest shard {largest_shard / 2**20:.0f} MiB, largest adapted tensor in float32 "
          f"{largest_f32 / 2**20:.0f} MiB)")
    report["load_average"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
