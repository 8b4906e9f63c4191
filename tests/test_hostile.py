"""Hostile input for the whole public API: every outcome a clear error or a correct result.

The cases (``tests/hostile/``) attack what a careless or malicious caller
would: every NumPy dtype, mixed dtypes, wrong and empty dimensions, strided,
Fortran-ordered and read-only arrays, ``out`` that aliases an input,
NaN/inf/huge/subnormal values, odd scalar types (bools, complex, NumPy
scalars, ``2**70``), shapes off by one in every dimension, bad offsets and
ids, corrupt PEFT files, hostile paths.  Each outcome is classified as

- a clear error: a ``numba_lora.LoraError`` whose message is not empty and
  names the argument at fault, with every array and piece of state the call
  could touch bit-identical afterwards; or
- a correct result: equal to a float64 NumPy reference within the dtype's
  tolerance (merges: bit for bit to the promised arithmetic), inputs unchanged;

and anything else fails the test.  Kernel arrays sit against ``PROT_NONE``
guard pages with canaries around them (inputs on read-only pages), so an
out-of-bounds access or a write to an input faults; the cases run in five
subprocess groups, so a fault fails one test instead of the run.  Library
bugs the cases found are pinned by the tests at the end of this module:
strict ``xfail`` for the open ones (their inputs kept out of the generated
cases), plain tests for the ones fixed since.

Counts (seed 0; ``python -m pytest -s tests/test_hostile.py`` prints them, and
by call):

    area                                       cases  errors correct
    kernels (22 public kernels)                5,460   1,080   4,380
    LoraLinear                                 1,632     861     771
    MultiLoraLinear                            1,237     684     553
    LoraConfig, LoraAdapter, set_num_threads   1,059     517     542
    PEFT files (from_peft, save_peft)            700     524     176
    total                                     10,088   3,666   6,422

with 203 distinct kernel argument-type combinations (compilations).

Time on 2 cores: ~15 s with the Numba cache warm; ~50 s when only the
kernels' plain float32/float64 versions are cached (as after the rest of the
suite); 2-3 minutes from an empty cache, most of it numba_lora compiling its
own kernels (the merge family and the half-precision merges take ~2 minutes
of CPU).  The groups use the inherited cache; with
``NUMBA_LORA_HOSTILE_PRIVATE_CACHE=1`` each gets one of its own that a single
process fills (see "the runs" below).  ``NUMBA_LORA_HOSTILE_SEED=<n>`` runs
another seed.
"""

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import numba_lora
from numba_lora import (
    LoraAdapter,
    LoraConfig,
    LoraError,
    LoraFormatError,
    LoraLinear,
    MultiLoraLinear,
    kernels,
)

HERE = pathlib.Path(__file__).resolve().parent
RUNNER = HERE / "hostile" / "run_cases.py"
SEED = int(os.environ.get("NUMBA_LORA_HOSTILE_SEED", "0"))
#: In the order they are best started: the groups that compile the most first.
GROUPS = ["float64", "float32", "convert", "multi", "api"]
TIMEOUT = 600
MIN_CASES = 2000
AREAS = [("kernels", "kernels"), ("LoraLinear", "LoraLinear"),
         ("MultiLoraLinear", "MultiLoraLinear"),
         (("LoraConfig", "LoraAdapter", "set_num_threads"),
          "LoraConfig, LoraAdapter, set_num_threads"),
         (("from_peft", "save_peft"), "PEFT files (from_peft, save_peft)")]


# ---------------------------------------------------------------- the runs
# The groups' subprocesses share the inherited Numba cache (the suite's), so
# kernels the rest of the suite compiled are not compiled again.  With
# NUMBA_LORA_HOSTILE_PRIVATE_CACHE=1 each group gets a cache of its own instead,
# filled by one process only and kept for the next run: results then cannot
# depend on code other processes left in the shared cache (two processes once
# compiled two kernels under one symbol: see
# test_kernels_cached_by_different_processes_stay_distinct).  A private cache
# that a run did not finish is emptied, since its later filling would come
# from another process.
def _cache_key(name):
    from numba_lora._cache import source_digest

    digest = hashlib.sha256()
    for path in sorted((HERE / "hostile").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    for part in (source_digest(), np.__version__, sys.executable, str(SEED),
                 os.environ.get("NUMBA_BOUNDSCHECK", "")):
        digest.update(part.encode())
    return f"{name}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _private_cache(name):
    """(NUMBA_CACHE_DIR for ``name`` alone, a function to call when its run finished)."""
    try:
        import fcntl
    except ImportError:  # no file locks: a fresh cache every run
        with tempfile.TemporaryDirectory(prefix="numba_lora_hostile_") as directory:
            yield directory, lambda: None
        return
    base = pathlib.Path(os.environ.get("NUMBA_CACHE_DIR") or tempfile.gettempdir())
    root = base / "numba_lora_hostile"
    directory = root / _cache_key(name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session running the same group waits
        marker = directory / "complete"
        if not marker.exists():
            shutil.rmtree(directory / "numba", ignore_errors=True)
        _prune(root, name, directory, fcntl)
        yield str(directory / "numba"), marker.touch


def _prune(root, name, keep, fcntl):
    """Empty the caches of ``name`` for other sources, unused for an hour and not in use."""
    for old in root.glob(f"{name}-" + "[0-9a-f]" * 16):
        try:
            if old == keep or time.time() - old.stat().st_mtime < 3600:
                continue
            with open(old / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(old / "numba", ignore_errors=True)
                (old / "complete").unlink(missing_ok=True)
        except OSError:
            continue


def _run(group):
    if os.environ.get("NUMBA_LORA_HOSTILE_PRIVATE_CACHE") == "1":
        cache = _private_cache(group)
    else:
        cache = contextlib.nullcontext((os.environ.get("NUMBA_CACHE_DIR"), lambda: None))
    with cache as (cache_dir, finished):
        env = dict(os.environ)
        if cache_dir:
            env["NUMBA_CACHE_DIR"] = cache_dir
        try:
            proc = subprocess.run([sys.executable, str(RUNNER), group, "--seed", str(SEED)],
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  cwd=HERE.parent, env=env)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return f"timed out after {TIMEOUT} s", out, err
        if proc.returncode == 0 and '{"done"' in proc.stdout:
            finished()
        return proc.returncode, proc.stdout, proc.stderr


#: Subprocess jobs of single tests (name: (test, function)), started with the groups so
#: that all of them share the cores; filled in below, beside the tests.
JOBS = {}
#: The order to start groups and jobs in: the longest first.
ORDER = ["float64", "float32", "collision", "convert", "multi", "rows_path", "api"]


@pytest.fixture(scope="module")
def runs(request):
    """{group or job: future of its result}: the selected ones, started at once."""
    items = [item for item in request.session.items if item.module is request.module]
    selected = {item.callspec.params["group"] for item in items
                if hasattr(item, "callspec") and "group" in item.callspec.params}
    if any(item.name == "test_case_counts" for item in items):
        selected = set(GROUPS)
    names = {item.originalname for item in items}
    selected |= {job for job, (test, _) in JOBS.items() if test in names}
    workers = max(1, min(4, os.cpu_count() or 1))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    futures = {name: pool.submit(_run, name) if name in GROUPS else pool.submit(JOBS[name][1])
               for name in ORDER if name in selected}
    yield futures
    pool.shutdown(wait=True)


def _parse(stdout):
    records, starts, done = [], {}, None
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "start" in record:
            starts[record["start"]] = record
        elif "done" in record:
            done = record
        else:
            records.append(record)
    return records, starts, done


@pytest.mark.parametrize("group", GROUPS)
def test_group(runs, group):
    """Every case of ``group``: a clear error or a correct result; the process survives."""
    rc, stdout, stderr = runs[group].result()
    records, starts, done = _parse(stdout)
    if rc != 0 or done is None:
        finished = {r["i"] for r in records}
        dying = [s for i, s in sorted(starts.items()) if i not in finished]
        pytest.fail(f"the {group} runner died (exit status {rc}) after {len(records)} cases"
                    + (f"; in case {dying[0]}" if dying else "")
                    + f"\nstderr (end):\n{stderr[-3000:]}")
    failures = [r for r in records if r["outcome"] == "fail"]
    if failures:
        shown = collections.Counter()
        lines = []
        for r in failures:
            key = (r["area"], r["detail"][:50])
            shown[key] += 1
            if shown[key] <= 2 and len(lines) < 30:
                lines.append(f"- [{r['area']}] {r['what']}\n    {r['detail'][:600]}")
        pytest.fail(f"{len(failures)} of {len(records)} {group} cases failed:\n"
                    + "\n".join(lines))


def _area(record):
    for key, label in AREAS:
        keys = key if isinstance(key, tuple) else (key,)
        if any(record["area"].startswith(k) for k in keys):
            return label
    return record["area"]


def test_case_counts(runs):
    """At least 2,000 cases in all; print the counts by API area and outcome."""
    table = collections.defaultdict(collections.Counter)
    detail = collections.defaultdict(collections.Counter)
    sigs = set()
    for group in GROUPS:
        rc, stdout, _ = runs[group].result()
        for record in _parse(stdout)[0]:
            table[_area(record)][record["outcome"]] += 1
            detail[record["area"]][record["outcome"]] += 1
            if record.get("sig"):
                sigs.add(record["sig"])
    lines = [f"{'area':40s} {'cases':>7s} {'errors':>7s} {'correct':>7s} {'fail':>5s}"]
    total = collections.Counter()
    for _, label in AREAS:
        c = table.pop(label, collections.Counter())
        total.update(c)
        lines.append(f"{label:40s} {sum(c.values()):7,d} {c['error']:7,d} {c['correct']:7,d} "
                     f"{c['fail']:5d}")
    for label, c in table.items():  # an area not in AREAS: still counted
        total.update(c)
        lines.append(f"{label:40s} {sum(c.values()):7,d} {c['error']:7,d} {c['correct']:7,d}")
    lines.append(f"{'total':40s} {sum(total.values()):7,d} {total['error']:7,d} "
                 f"{total['correct']:7,d} {total['fail']:5d}")
    kernel_areas = sorted(a for a in detail if a.startswith("kernels."))
    lines.append(f"{len(kernel_areas)} kernels, {len(sigs)} distinct kernel argument-type "
                 f"combinations; seed {SEED}")
    lines.append("")
    lines.append(f"{'by call':40s} {'cases':>7s} {'errors':>7s} {'correct':>7s}")
    for area in sorted(detail):
        c = detail[area]
        lines.append(f"{area:40s} {sum(c.values()):7,d} {c['error']:7,d} {c['correct']:7,d}")
    print("\nhostile cases:\n" + textwrap.indent("\n".join(lines), "  "))
    assert sum(total.values()) >= MIN_CASES


def test_guard_page_faults_on_overrun():
    """The harness itself: reading one element past a guarded array kills the process."""
    from hostile import memory

    if not memory.GUARDED:
        pytest.skip("no mprotect here: canaries only")
    code = textwrap.dedent("""
        import ctypes, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from hostile.memory import place
        a, region = place(np.ones(5))
        print(a.sum(), flush=True)
        ctypes.c_double.from_address(a.ctypes.data + a.nbytes).value
        print("read past the end without a fault")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(HERE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "5.0" and proc.returncode != 0, (proc.returncode, proc.stdout)


def _lora(dtype=np.float64, o=3, i=4, r=2):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((o, i)).astype(dtype), rng.standard_normal((r, i)).astype(dtype),
            rng.standard_normal((o, r)).astype(dtype))


# ------------------------------------------- bugs this suite found, fixed since
# Each failed here (as a strict xfail) until numba_lora fixed it (c80bad2, 632fcc8).

# Was a strict xfail: kernels: a non-contiguous (A-layout) out makes the kernel body fail to
# compile (_blas._scale calls out.reshape(-1)): a Numba TypingError instead of a LoraShapeError
@pytest.mark.parametrize("kernel", ["forward", "forward_batch", "forward_batch_multi"])
def test_kernels_refuse_a_strided_out(kernel):
    W, A, B = _lora()
    X = np.ones((2, 4))
    with pytest.raises(LoraError, match="out"):
        if kernel == "forward":
            kernels.forward(W, A, B, 1.0, X[0], np.empty(6)[::2])
        elif kernel == "forward_batch":
            kernels.forward_batch(W, A, B, 1.0, X, np.empty((2, 6))[:, ::2])
        else:
            kernels.forward_batch_multi(W, A, B.T.copy(), np.array([0, 2]), np.array([1.0]), X,
                                        np.array([0, -1]), np.empty((2, 6))[:, ::2])


# Was a strict xfail: LoraLinear(use_rslora=...) takes any truthy or falsy value
# (bool(use_rslora)); MultiLoraLinear.add_adapter and LoraConfig refuse them
@pytest.mark.parametrize("value", ["no", None, 1, "False"])
def test_lora_linear_use_rslora_is_checked(value):
    with pytest.raises(LoraError, match="use_rslora"):
        LoraLinear(np.ones((3, 3)), 1, 1.0, use_rslora=value)


# Was a strict xfail: merge(check_finite=...) and merge_all(check_finite=...) take any truthy
# value: 'no' checks, None does not
@pytest.mark.parametrize("how", ["LoraLinear.merge", "LoraAdapter.merge_all"])
def test_check_finite_is_checked(how):
    with pytest.raises(LoraError, match="check_finite"):
        if how == "LoraLinear.merge":
            LoraLinear(np.ones((3, 3)), 1, 1.0).merge(check_finite="no")
        else:
            adapter = LoraAdapter(LoraConfig(1, 1.0))
            adapter.add_layer("q", np.ones((3, 3)))
            adapter.merge_all(check_finite="no")


# Was a strict xfail: the 'read-only' views of weight, lora_a and lora_b are views of writable
# arrays: view.flags.writeable = True succeeds, and writes through them change the layer
@pytest.mark.parametrize("attribute", ["LoraLinear.weight", "LoraLinear.lora_a",
                                       "LoraLinear.lora_b", "MultiLoraLinear.weight"])
def test_read_only_views_stay_read_only(attribute):
    owner, name = attribute.split(".")
    layer = LoraLinear(np.ones((3, 3)), 1, 1.0) if owner == "LoraLinear" else \
        MultiLoraLinear(np.ones((3, 3)))
    view = getattr(layer, name)
    with pytest.raises(ValueError):
        view.flags.writeable = True


# Was a strict xfail: MultiLoraLinear(weight) hands weight to as_weight, which takes any tuple
# (ndarray, x) for its own internal (array, dtype) pair: two rows given as a tuple raise
# ValueError, (W, np.int8) makes an int8 layer
@pytest.mark.parametrize("weight", ["two rows", "array and dtype"])
def test_multi_weight_tuple_of_two_rows(weight):
    value = (np.ones(3), np.ones(3)) if weight == "two rows" else (np.ones((2, 3)), np.int8)
    if weight == "two rows":
        assert MultiLoraLinear(value).weight.shape == (2, 3)
    else:
        with pytest.raises(LoraError, match="weight"):
            MultiLoraLinear(value)


# Was a strict xfail: MultiLoraLinear.forward_batch takes a set (or dict) of adapter ids or
# names: rows get adapters in hash order, which for names changes with PYTHONHASHSEED
@pytest.mark.parametrize("ids", [{"a", "b"}, {"a": 0, "b": 1}])
def test_multi_ids_must_be_a_sequence(ids):
    layer = MultiLoraLinear(np.eye(3))
    layer.add_adapter("a", np.ones((1, 3)), np.ones((3, 1)), 1.0)
    layer.add_adapter("b", -np.ones((1, 3)), np.ones((3, 1)), 1.0)
    with pytest.raises(LoraError, match="adapter_ids"):
        layer.forward_batch(np.ones((2, 3)), ids)


# Was a strict xfail: LoraConfig.rank_for/alpha_for with a non-str module name: a bare TypeError
# from re.match when a pattern is set (and the default, silently, when none is)
@pytest.mark.parametrize("name", [None, 5, b"q"])
def test_config_pattern_lookup_refuses_non_strings(name):
    config = LoraConfig(2, 4.0, rank_pattern={"q": 3})
    with pytest.raises(LoraError):
        config.rank_for(name)


# Was a strict xfail: guard closures of every kernel shared one qualified name, so two
# processes could compile two kernels under one symbol, and a process loading both
# from the disk cache ran the first loaded for both (unmerge_serial added the delta).
_COLLIDE = textwrap.dedent("""
    import sys
    import numpy as np
    from numba_lora import kernels
    A, B = np.ones((1, 3), np.float32), np.ones((2, 1), np.float32)
    for name in sys.argv[1:]:
        W = np.zeros((2, 3), np.float32)
        getattr(kernels, name)(W, A, B, 1.0)
        print(name, W[0, 0])
""")


def _collision_job():
    with _private_cache("collision") as (cache_dir, finished):
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        # Each kernel compiled (or, on later runs, loaded) by a process of its own, side by
        # side; then both loaded in a third.
        first = [subprocess.Popen([sys.executable, "-c", _COLLIDE, name], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("merge_serial", "unmerge_serial")]
        for proc in first:
            _, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                return proc.returncode, "", err
        proc = subprocess.run([sys.executable, "-c", _COLLIDE, "merge_serial", "unmerge_serial"],
                              env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            finished()
        return proc.returncode, proc.stdout, proc.stderr


JOBS["collision"] = ("test_kernels_cached_by_different_processes_stay_distinct", _collision_job)


def test_kernels_cached_by_different_processes_stay_distinct(runs):
    rc, stdout, stderr = runs["collision"].result()
    assert rc == 0, stderr
    assert stdout.split() == ["merge_serial", "1.0", "unmerge_serial", "-1.0"]


# ------------------------------------------------------- known library bugs
# Each is kept out of the generated cases; each test fails until the bug is fixed.
# Was a strict xfail: float16 made Numba raise NotImplementedError while lowering the guard's
# refusal; calls from Python now go through kernels._guard.python_errors.
@pytest.mark.parametrize("what", ["x float16", "scaling np.float16"])
def test_kernels_refuse_float16(what):
    W, A, B = _lora(np.float32)
    x, out = np.ones(4, np.float32), np.empty(3, np.float32)
    if what == "x float16":
        x = x.astype(np.float16)
    scaling = np.float16(1.0) if what == "scaling np.float16" else 1.0
    with pytest.raises(LoraError, match="x|scaling"):
        kernels.forward(W, A, B, scaling, x, out)


# Was a strict xfail (but for the empty list): arguments Numba cannot type never reached the
# guard; calls from Python now go through kernels._guard.python_errors.
_EMPTY_LIST_XFAIL = pytest.mark.xfail(
    strict=True, reason="kernels: an empty list fails in Numba's C dispatcher (fingerprint) "
    "before any Python hook runs: ValueError instead of a LoraTypeError")


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPendingDeprecationWarning")
@pytest.mark.parametrize("what", ["x object array", "x big-endian", "scaling 2**64",
                                  "scaling longdouble", "scaling Fraction", "A nested list",
                                  pytest.param("x empty list", marks=_EMPTY_LIST_XFAIL),
                                  "x dict"])
def test_kernels_refuse_untypeable_arguments(what):
    import fractions

    W, A, B = _lora()
    x, out, scaling = np.ones(4), np.empty(3), 1.0
    if what == "x object array":
        x = x.astype(object)
    elif what == "x big-endian":
        x = x.astype(">f8")
    elif what == "scaling 2**64":
        scaling = 2 ** 64
    elif what == "scaling longdouble":
        scaling = np.longdouble(1)
    elif what == "scaling Fraction":
        scaling = fractions.Fraction(1, 2)
    elif what == "A nested list":
        A = A.tolist()
    elif what == "x empty list":
        x = []
    else:
        x = {0: 1.0}
    with pytest.raises(LoraError):
        kernels.forward(W, A, B, scaling, x, out)


# Was a strict xfail: a huge n_adapters reached np.zeros(n_adapters + 1): ValueError (or
# MemoryError) instead of a LoraError
@pytest.mark.parametrize("n", [2 ** 62, 2 ** 63 - 1])
def test_group_rows_refuses_huge_n_adapters(n):
    with pytest.raises(LoraError, match="n_adapters"):
        kernels.group_rows(np.array([0, -1]), n)


# Was a strict xfail: the shape errors came from the shared _check_lora_shapes and said
# 'A'/'B', not A_old/B_old/A_new/B_new
def test_count_nonfinite_remerged_names_the_pair():
    W, A, B = _lora()
    with pytest.raises(LoraError, match="B_new.shape.1. != A_new"):
        kernels.count_nonfinite_remerged(W, A, B, A[:1].copy(), B, 1.0)
    with pytest.raises(LoraError, match="A_old and A_new"):
        kernels.count_nonfinite_remerged(W, A[:, :2].copy(), B, A, B, 1.0)


# Was a strict xfail: out aliasing an input was not checked (documented: "the result would be
# wrong"); the guard now compares the byte ranges of every written array with the others.
@pytest.mark.parametrize("how", ["out is x", "out overlaps x", "W overlaps A (merge)",
                                 "X[1] is out (batch)"])
def test_kernels_refuse_out_aliasing_an_input(how):
    W, A, B = _lora(o=4, i=4)
    x = np.ones(4)
    before = [a.copy() for a in (W, A, B, x)]
    with pytest.raises(LoraError, match="must not overlap"):
        if how == "out is x":
            kernels.forward(W, A, B, 1.0, x, x)
        elif how == "out overlaps x":
            buf = np.arange(7.0)
            kernels.forward(W, A, B, 1.0, buf[:4], buf[3:])
        elif how == "W overlaps A (merge)":
            WA = np.vstack([W, A])
            kernels.merge(WA[:4], WA[3:4], B, 1.0)
        else:
            X = np.ones((2, 4))
            kernels.forward_batch(W, A, B, 1.0, X, X)
    for a, b in zip((W, A, B, x), before):
        np.testing.assert_array_equal(a, b)


def test_kernels_take_disjoint_views_of_one_buffer():
    W, A, B = _lora(o=4, i=4)
    buf = np.arange(8.0)
    out = kernels.forward(W, A, B, 1.0, buf[:4], buf[4:])
    np.testing.assert_allclose(out, W @ buf[:4] + B @ (A @ buf[:4]))
    WA = np.vstack([W, A])  # as LoraLinear stores them: W and A adjacent, not overlapping
    kernels.merge(WA[:4], WA[4:], B, 1.0)


def test_out_overlapping_a_strided_input_is_refused():
    layer = LoraLinear(np.eye(4), 1, 1.0)
    buf = np.arange(8.0)
    with pytest.raises(LoraError, match="overlap"):
        layer.forward(buf[::2], out=buf[1:5])


def test_multi_rows_path_skips_a_scaling_that_rounds_to_zero(runs):
    rc, stdout, stderr = runs["rows_path"].result()
    assert rc == 0, stderr
    assert stdout.split() == ["segmented", "1.0", "1.0", "1.0", "rows", "1.0", "1.0", "1.0"]


def _rows_path_job():
    # In a process and cache of its own: the two paths' kernels share argument types, so
    # code from a shared cache could swap them (test_kernels_cached_by_...).
    code = textwrap.dedent("""
        import numpy as np
        from numba_lora import MultiLoraLinear
        layer = MultiLoraLinear(np.eye(3, dtype=np.float32))
        layer.add_adapter("tiny", np.ones((1, 3)), np.array([[np.nan], [1.0], [1.0]]),
                          alpha=1e-300)
        for path in ("segmented", "rows"):
            print(path, *layer.forward_batch(np.ones((1, 3)), ["tiny"], path=path)[0])
    """)
    with _private_cache("rows_path") as (cache_dir, finished):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, NUMBA_CACHE_DIR=cache_dir))
        if proc.returncode == 0:
            finished()
        return proc.returncode, proc.stdout, proc.stderr


JOBS["rows_path"] = ("test_multi_rows_path_skips_a_scaling_that_rounds_to_zero", _rows_path_job)


def _peft_dir(tmp_path):
    rng = np.random.default_rng(0)
    adapter = LoraAdapter(LoraConfig(2, 4.0))
    base = {}
    for name in ("q", "v"):
        W = rng.standard_normal((6, 6)).astype(np.float32)
        layer = adapter.add_layer(name, W)
        layer.lora_b = rng.standard_normal((6, 2))
        base[f"{name}.weight"] = W
    adapter.save_peft(tmp_path / "a")
    return tmp_path / "a", base


# Was a strict xfail: the safetensors reader accepted what the format (and the safetensors
# library) refuses: overlapping data_offsets (one tensor read from another's bytes), holes,
# trailing bytes.  io.safetensors.SafetensorsFile now checks the data is covered exactly.
@pytest.mark.parametrize("what", ["overlap", "hole", "trailing"])
def test_from_peft_refuses_malformed_offsets(tmp_path, what):
    directory, base = _peft_dir(tmp_path)
    path = directory / "adapter_model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    a, b = (k for k in keys if k.endswith("q.lora_A.weight") or k.endswith("v.lora_A.weight"))
    if what == "overlap":
        header[b]["data_offsets"] = header[a]["data_offsets"]
    elif what == "hole":
        data += b"\0" * 8
        for k in keys:
            start, stop = header[k]["data_offsets"]
            if start >= header[b]["data_offsets"][0]:
                header[k]["data_offsets"] = [start + 8, stop + 8]
        hole_start = header[b]["data_offsets"][0] - 8
        data = data[:hole_start] + b"\0" * 8 + data[hole_start:-8]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data
                     + (b"junk" if what == "trailing" else b""))
    with pytest.raises(LoraFormatError):
        LoraAdapter.from_peft(directory, base)


# Was a strict xfail: save_peft into a path under a regular file raised NotADirectoryError,
# while a path that is a file was a LoraConfigError; both are LoraConfigError now.
def test_save_peft_under_a_file_is_a_lora_error(tmp_path):
    adapter = LoraAdapter(LoraConfig(1, 1.0))
    adapter.add_layer("q", np.ones((2, 2)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraError):
        adapter.save_peft(tmp_path / "file" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


#: The public kernels the cases attack (kernel_cases.py).
COVERED_KERNELS = {
    "forward", "forward_batch", "forward_stacked", "forward_batch_stacked", "merge", "unmerge",
    "merge_serial", "unmerge_serial", "count_nonfinite_merged", "count_nonfinite_remerged",
    "forward_batch_multi", "forward_batch_multi_segmented", "forward_batch_multi_rows",
    "group_rows", "merge_bf16", "merge_bf16_serial", "merge_f16", "merge_f16_serial",
    "widen_bf16", "round_bf16", "widen_f16", "round_f16"}


def test_the_attacked_api_still_exists():
    """Every kernel and class the cases attack is still public (a rename needs new cases)."""
    assert COVERED_KERNELS <= set(kernels.__all__)
    for name in ("LoraLinear", "MultiLoraLinear", "LoraConfig", "LoraAdapter", "set_num_threads"):
        assert name in numba_lora.__all__


def test_every_public_kernel_refuses_untypeable_arguments_from_python():
    import inspect

    from numba.core.dispatcher import Dispatcher

    checked = 0
    for name in kernels.__all__:
        kernel = getattr(kernels, name)
        if not isinstance(kernel, Dispatcher):
            continue
        n = len(inspect.signature(kernel.py_func).parameters)
        with pytest.raises(LoraError, match=f"kernels.{name}"):
            kernel(*([{"not": "an array"}] * n))
        checked += 1
    assert checked >= 10
