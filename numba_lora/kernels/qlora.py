"""Forward kernels over a 4-bit NF4 base weight: ``y = deq(W) x + scaling * B (A x)``.

Storage (as :mod:`numba_lora.nf4` writes it, bitsandbytes' layout): the
``n = out_features * in_features`` elements of the row-major flattened W
are packed two to a byte, element ``2k`` in the HIGH nibble of byte ``k``,
``2k + 1`` in the low nibble; ``absmax[b]`` scales the block of elements
``[b * blocksize, min((b + 1) * blocksize, n))`` (blocks cross rows when
``in_features`` is not a multiple of ``blocksize``; the last may be
partial).  The weight is ``code[q] * absmax[b]``, rounded to float32: the
kernels dequantize each element exactly as ``nf4.dequantize`` does, and
never keep more than a tile of it.

Double quantization replaces ``absmax`` by 8-bit codes: ``absmax[b] =
float32(nested_code[absmax_q[b]] * nested_absmax[b // 256]) + offset``,
each step rounded to float32; the ``_dq`` kernels compute it per block as
they go (no ``nblocks`` temporary for the one-vector kernel).

Order of the sums (float32 throughout; with ``reassoc`` on, LLVM may
split a chain into vector lanes, so sums are not bit-reproducible across
CPUs, only within 1e-5 of the float64 product relative to its terms).  One
vector: per output row, the products ``w_j * x_j`` go into 16 float32 lanes
(element ``j`` of a group of 16 into lane ``j % 16``; four groups in flight
in four vector accumulators on the AVX-512 path, one chain on the portable
path), partial blocks and odd elements into a scalar; the lanes are added
at the row's end, then ``scaling * (B[i] . t)`` with ``t = A x``.  Batches
of up to ``SMALL_BATCH`` rows: each thread dequantizes two rows of W at a
time into L1 scratch and sums ``W[r] . X[b]`` for a 2 x 4 block of (r, b)
(one chain per vector lane), then adds ``scaling * (B[r] . T[b])`` with
``T = X A^T``; no BLAS, so one thread pool.  Larger batches
(:mod:`.qlora_tiles`): each of Numba's threads dequantizes its own tiles of
rows of W and multiplies each by a one-thread sgemm (its own order), and
adds those columns of ``scaling * (X A^T) B^T`` the same way; where
the BLAS's thread count cannot be set, W is dequantized tile by tile
(``TILE_BYTES`` of float32 rows) on the calling thread and each tile
multiplied on BLAS's threads, then ``out += scaling * (X A^T) B^T`` by
sgemm with ``beta = 1``.  The low-rank term is skipped when ``scaling ==
0`` or ``rank == 0``.

Threads.  Numba's and BLAS's threads taking turns within one call spin
against each other (measured: 2-10x slower), so no kernel here mixes them.
The one-vector and small-batch kernels run on Numba's threads only.  The
tiled kernel calls sgemm inside its ``prange``, which the project's rule
otherwise forbids because BLAS threads times Numba threads oversubscribe
the cores: here the BLAS (NumPy's OpenBLAS) is set to ONE thread for the
duration of the loop, so sgemm runs on the Numba thread that calls it and
one thread pool does all the work; the count is put back before the call
returns.  Meanwhile a NumPy product in another Python thread sees a
one-thread BLAS (the count is process-wide).

Speed.  The one-vector product is bound by looking 4-bit codes up in the
16-value table.  On x86 with AVX-512 (checked at import from the features
Numba compiles for) the lookup is one ``vpermps``: 16 nibbles -> 16 int32
lane indices -> 16 weights per instruction, the block's table scaled by its
absmax once per block.  Elsewhere a portable Numba loop does the lookup one
nibble at a time (correct, several times slower).  :data:`FAST_PATH` names the
path in use; ``_forward_nf4_portable`` and friends run the portable path on
any CPU (the tests compare the two).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._config import EXACT_OPTIONS, JIT_OPTIONS
from ..errors import LoraShapeError
from ._blas import CBLAS_NO_TRANS, CBLAS_ROW_MAJOR, CBLAS_TRANS, _sgemm, gemm_nt, gemv_n
from ._guard import guarded, quiet
from .lora import _low_rank_rows
from .qlora_tiles import build_tiles

__all__ = ["forward_nf4", "forward_batch_nf4", "forward_nf4_dq", "forward_batch_nf4_dq",
           "FAST_PATH"]


def _compile_features():
    """The CPU features Numba compiles for (its own rule: NUMBA_CPU_FEATURES, else the host's)."""
    from llvmlite.binding import get_host_cpu_features
    from numba.core import config

    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    if config.CPU_NAME not in (None, "host"):
        # A named CPU without a feature list (e.g. "generic" for portable
        # caches): do not assume what the named CPU may lack.
        return set()
    return {name for name, on in get_host_cpu_features().items() if on}


#: True when the 16-lane permute (AVX-512F) is compiled in.
HAVE_AVX512 = "avx512f" in _compile_features()
#: The one-vector path the public kernels use: "avx512-vpermps" or "portable".
FAST_PATH = "avx512-vpermps" if HAVE_AVX512 else "portable"

#: Bytes of float32 scratch per dequantized tile of W in the batched kernels'
#: serial path, where the BLAS's thread count cannot be set (256 rows of
#: 4096: it stays in L3 while sgemm reads it; smaller tiles made sgemm pack
#: X once per tile, 1 MiB tiles were 5-10% slower at 512 rows).
TILE_BYTES = 4 << 20
#: Batches up to this many rows: each thread dequantizes one row of W at a
#: time and multiplies it in Numba; larger ones: tiles and BLAS.
SMALL_BATCH = 16
#: Rows of W per task of the one-vector kernels' parallel loop.
ROW_CHUNK = 16
#: Double-quant: blocks of absmax per nested absmax (bitsandbytes' fixed 256).
NESTED_BLOCK = 256

_LANES = 16

#: The 16 NF4 values (bitsandbytes' table, as float32): the double-quant
#: kernels take no code argument and use this one.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
_NF4 = NF4_CODE.copy()  # the copy Numba freezes into compiled code

# --------------------------------------------------------------- intrinsics


def _blocks_codegen(mode):
    """Code for the AVX-512 body shared by :func:`_nf4_dot_avx512` and :func:`_nf4_deq_avx512`.

    ``mode`` "dot": ``acc[0:16] += sum over groups of w * x`` (four vector
    accumulators, added at the end); "deq": the weights are stored to
    ``dst[d0 + 16 g: d0 + 16 g + 16]``.
    """

    def codegen(context, builder, signature, args):
        if mode == "dot":
            packed_, byte0, absmax_, b0, nblk, gpb, code_, x_, x0, acc_ = args
            packed_t, _, absmax_t, _, _, _, code_t, x_t, _, acc_t = signature.args
        else:
            packed_, byte0, absmax_, b0, nblk, gpb, code_, x_, x0 = args
            packed_t, _, absmax_t, _, _, _, code_t, x_t, _ = signature.args
        i8, i16, i32, i64 = (ir.IntType(b) for b in (8, 16, 32, 64))
        f32 = ir.FloatType()
        v16f = ir.VectorType(f32, 16)
        v16i = ir.VectorType(i32, 16)
        v16b = ir.VectorType(i8, 16)
        v8b = ir.VectorType(i8, 8)

        packed = context.make_array(packed_t)(context, builder, packed_)
        absmax = context.make_array(absmax_t)(context, builder, absmax_)
        code = context.make_array(code_t)(context, builder, code_)
        xarr = context.make_array(x_t)(context, builder, x_)

        def as64(v):
            return builder.sext(v, i64) if v.type != i64 else v

        byte0, b0, nblk, gpb, x0 = (as64(v) for v in (byte0, b0, nblk, gpb, x0))
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16f, [v16f, v16i]),
            "llvm.x86.avx512.permvar.sf.512")
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        table0 = builder.load(builder.bitcast(code.data, v16f.as_pointer()), align=4)
        undef = ir.Constant(v16f, ir.Undefined)
        zeros16 = ir.Constant(v16i, [0] * 16)
        lo_mask = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23]
        hi_mask = [m + 8 for m in lo_mask]

        def indices(raw, nbytes):
            """Lane indices (high nibble first) of the 2 * nbytes weights in ``raw``.

            The shift runs on 16-bit lanes, so each byte's upper nibble holds
            its neighbour's bits; vpermps reads only the low 4 bits of an index.
            """
            vt = ir.VectorType(i16, nbytes // 2)
            shifted = builder.bitcast(
                builder.lshr(builder.bitcast(raw, vt), ir.Constant(vt, [4] * (nbytes // 2))),
                raw.type)
            if nbytes == 8:
                both = builder.shuffle_vector(shifted, raw, ir.Constant(
                    v16i, [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]))
                return [builder.zext(both, v16i)]
            first = builder.shuffle_vector(shifted, raw, ir.Constant(v16i, lo_mask))
            second = builder.shuffle_vector(shifted, raw, ir.Constant(v16i, hi_mask))
            return [builder.zext(first, v16i), builder.zext(second, v16i)]

        def load_bytes(group, nbytes):
            ptr = builder.gep(packed.data, [builder.add(byte0, builder.mul(group, i64(8)))])
            vt = v16b if nbytes == 16 else v8b
            return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=1)

        def x_ptr(group):
            return builder.bitcast(
                builder.gep(xarr.data, [builder.add(x0, builder.mul(group, i64(16)))]),
                v16f.as_pointer())

        zero = ir.Constant(v16f, [0.0] * 16)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
        npair_quads = builder.udiv(gpb, i64(4))
        rest_start = builder.mul(npair_quads, i64(4))

        def consume(weights, group, slot):
            if mode == "dot":
                xv = builder.load(x_ptr(group), align=4)
                builder.store(builder.call(fma, [weights, xv, builder.load(accs[slot])]),
                              accs[slot])
            else:
                builder.store(weights, x_ptr(group), align=4)

        with cgutils.for_range(builder, nblk) as blk:
            k = blk.index
            scale = builder.load(builder.gep(absmax.data, [builder.add(b0, k)]))
            splat = builder.shuffle_vector(
                builder.insert_element(undef, scale, i32(0)), undef, zeros16)
            # Exact float32 products: the block's 16 weights as nf4.dequantize makes them.
            table = builder.fmul(table0, splat)
            first_group = builder.mul(k, gpb)
            with cgutils.for_range(builder, npair_quads) as quad:
                g = builder.add(first_group, builder.mul(quad.index, i64(4)))
                for half in range(2):
                    gh = builder.add(g, i64(2 * half))
                    for j, idx in enumerate(indices(load_bytes(gh, 16), 16)):
                        w = builder.call(permute, [table, idx])
                        consume(w, builder.add(gh, i64(j)), 2 * half + j)
            count = builder.sub(gpb, rest_start)
            with cgutils.for_range(builder, count) as single:
                g = builder.add(first_group, builder.add(rest_start, single.index))
                (idx,) = indices(load_bytes(g, 8), 8)
                consume(builder.call(permute, [table, idx]), g, 0)
        if mode == "dot":
            acc = context.make_array(acc_t)(context, builder, acc_)
            total = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                                 builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
            accp = builder.bitcast(acc.data, v16f.as_pointer())
            builder.store(builder.fadd(builder.load(accp, align=4), total), accp, align=4)
        return context.get_dummy_value()

    return codegen


def _intrinsic_types_ok(packed, absmax, code, x, extra=()):
    arrays = (absmax, code, x) + tuple(extra)
    return (isinstance(packed, types.Array) and packed.dtype == types.uint8
            and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in arrays))


@intrinsic
def _nf4_dot_avx512(typingctx, packed, byte0, absmax, b0, nblk, gpb, code, x, x0, acc):
    """``acc[:16] += lanes of sum w * x`` over ``nblk`` blocks of ``gpb`` groups of 16 weights.

    Group ``g`` (0 <= g < nblk * gpb) is bytes ``packed[byte0 + 8 g: byte0 + 8 g + 8]``,
    scaled by ``absmax[b0 + g // gpb]``, against ``x[x0 + 16 g: x0 + 16 g + 16]``.
    ``code`` has 16 values.  Nothing is checked: the caller keeps every index in range.
    """
    if not _intrinsic_types_ok(packed, absmax, code, x, (acc,)):
        return None
    sig = types.void(packed, byte0, absmax, b0, nblk, gpb, code, x, x0, acc)
    return sig, _blocks_codegen("dot")


@intrinsic
def _nf4_deq_avx512(typingctx, packed, byte0, absmax, b0, nblk, gpb, code, dst, d0):
    """The weights of :func:`_nf4_dot_avx512`'s groups, group g to ``dst[d0 + 16 g:][:16]``."""
    if not _intrinsic_types_ok(packed, absmax, code, dst):
        return None
    sig = types.void(packed, byte0, absmax, b0, nblk, gpb, code, dst, d0)
    return sig, _blocks_codegen("deq")


@intrinsic
def _rounded_mul_add(typingctx, a, b, c):
    """``float32(float32(a * b) + c)``: two roundings, never fused or reassociated.

    An intrinsic, because plain arithmetic is not enough: Numba compiles an
    ``@njit`` helper without ``fastmath`` with its caller's fastmath flags
    (its option inheritance), and ``contract`` would fuse the two steps.
    The instructions here carry no flags whoever calls them.
    """
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(builder.fmul(args[0], args[1]), args[2])

    return types.float32(a, b, c), codegen


@intrinsic
def _rounded_mul(typingctx, a, b):
    """``float32(a * b)`` as an instruction no fastmath flag can reassociate."""
    if not (a == types.float32 and b == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])

    return types.float32(a, b), codegen


# ------------------------------------------------- portable group kernels
@njit(**EXACT_OPTIONS)
def _scaled_table(code, scale, table):
    """``table[q] = code[q] * scale`` rounded to float32: the block's 16 weights."""
    for q in range(_LANES):
        table[q] = _rounded_mul(code[q], scale)


@njit(**JIT_OPTIONS)
def _nf4_dot_portable(packed, byte0, absmax, b0, nblk, gpb, code, x, x0, acc):
    """:func:`_nf4_dot_avx512` with the lookups one nibble at a time.

    Each group's 16 weights go to a small buffer, then into the 16 lanes of
    ``acc`` (element ``j`` of a group into lane ``j``, as on the AVX-512
    path): the lane loop vectorises where a single chain over the lookups
    would wait on each addition.
    """
    table = np.empty(_LANES, dtype=np.float32)
    buf = np.empty(_LANES, dtype=np.float32)
    for k in range(nblk):
        _scaled_table(code, absmax[b0 + k], table)
        for g in range(k * gpb, (k + 1) * gpb):
            first = byte0 + 8 * g
            for h in range(8):
                byte = np.int64(packed[first + h])
                buf[2 * h] = table[byte >> 4]
                buf[2 * h + 1] = table[byte & 15]
            base = x0 + 16 * g
            for lane in range(_LANES):
                acc[lane] += buf[lane] * x[base + lane]


@njit(**JIT_OPTIONS)
def _nf4_deq_portable(packed, byte0, absmax, b0, nblk, gpb, code, dst, d0):
    """:func:`_nf4_deq_avx512` one nibble at a time."""
    table = np.empty(_LANES, dtype=np.float32)
    for k in range(nblk):
        _scaled_table(code, absmax[b0 + k], table)
        first = (k * gpb) * 8
        for t in range(gpb * 8):
            byte = np.int64(packed[byte0 + first + t])
            j = d0 + 2 * (first + t)
            dst[j] = table[byte >> 4]
            dst[j + 1] = table[byte & 15]


# ----------------------------------------------------------- shared pieces
@njit(**EXACT_OPTIONS)
def _weight(packed, code, scale, j):
    """Element ``j`` of the flattened W, rounded as nf4.dequantize rounds it."""
    byte = np.int64(packed[j >> 1])
    q = (byte >> 4) if (j & 1) == 0 else (byte & 15)
    return _rounded_mul(code[q], scale)


@njit(**EXACT_OPTIONS)
def _dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax):
    """``absmax[b - b0]`` for blocks b0 <= b < b1, from double-quant state, each step rounded."""
    off = np.float32(offset)
    for b in range(b0, b1):
        absmax[b - b0] = _rounded_mul_add(nested_code[absmax_q[b]],
                                          nested_absmax[b // NESTED_BLOCK], off)


@njit(**JIT_OPTIONS)
def _low_rank(B, i, t, s_):
    """``s_ * (B[i] . t)`` in float32; 0 when t is empty (no low-rank term)."""
    acc = np.float32(0)
    for k in range(t.shape[0]):
        acc += B[i, k] * t[k]
    return s_ * acc


@njit(**JIT_OPTIONS)
def _down(A, X, scaling):
    """(T, s): ``T = X @ A.T`` in float32 (X 2-D) and scaling as float32; T has no columns
    when the low-rank term is skipped.  Serial: it is rank / out_features of the work."""
    rank = A.shape[0] if scaling != 0 else 0
    T = np.zeros((X.shape[0], rank), dtype=np.float32)
    for b in range(X.shape[0]):
        for k in range(rank):
            acc = np.float32(0)
            for j in range(X.shape[1]):
                acc += A[k, j] * X[b, j]
            T[b, k] = acc
    return T, np.float32(scaling)


@njit(**JIT_OPTIONS)
def _down_vector(A, x, scaling):
    """:func:`_down` for one vector: (t, s) with ``t = A @ x``."""
    rank = A.shape[0] if scaling != 0 else 0
    t = np.zeros(rank, dtype=np.float32)
    for k in range(rank):
        acc = np.float32(0)
        for j in range(x.shape[0]):
            acc += A[k, j] * x[j]
        t[k] = acc
    return t, np.float32(scaling)


@njit(**JIT_OPTIONS)
def _check_storage(n_packed, n_absmax, code, blocksize, out_features, in_features):
    if blocksize < 32 or blocksize > 4096 or (blocksize & (blocksize - 1)) != 0:
        raise LoraShapeError("blocksize must be a power of two from 32 to 4096")
    n = out_features * in_features
    if n_packed != (n + 1) // 2:
        raise LoraShapeError("packed must hold (out_features * in_features + 1) // 2 bytes")
    if n_absmax != (n + blocksize - 1) // blocksize:
        raise LoraShapeError("absmax (absmax_q) must hold ceil(out_features * in_features "
                             "/ blocksize) values")
    if code.shape[0] != 16:
        raise LoraShapeError("code must hold the 16 NF4 values")
    return n


@njit(**JIT_OPTIONS)
def _check_lora(A, B, out_features, in_features):
    if A.shape[1] != in_features:
        raise LoraShapeError("A must be (rank, in_features): A.shape[1] != in_features")
    if B.shape[0] != out_features:
        raise LoraShapeError("B must be (out_features, rank): B.shape[0] != out_features")
    if B.shape[1] != A.shape[0]:
        raise LoraShapeError("rank mismatch: B.shape[1] != A.shape[0]")
    if not (A.flags.c_contiguous and B.flags.c_contiguous):
        raise LoraShapeError("A and B must be C-contiguous")


@njit(**JIT_OPTIONS)
def _check_dq(absmax_q, nested_absmax, nested_code):
    if nested_absmax.shape[0] != (absmax_q.shape[0] + NESTED_BLOCK - 1) // NESTED_BLOCK:
        raise LoraShapeError("nested_absmax must hold ceil(len(absmax_q) / 256) values")
    if nested_code.shape[0] != 256:
        raise LoraShapeError("nested_code must hold 256 values")


def _build(tag, dot_groups, deq_groups):
    """The serial and parallel kernels over one group kernel pair (AVX-512 or portable).

    Built once per path, each function under a name of its own (Numba's cache
    tells cached functions apart by qualified name).
    """

    def named(function, name):
        function.__name__ = function.__qualname__ = f"_{name}_{tag}"
        return function

    def row_dot(packed, absmax, abase, code, blocksize, x, s, e, acc):
        """Flat elements [s, e) of W against x[0: e - s]; absmax[b - abase] scales block b."""
        gsize = blocksize // 16
        acc[:16] = 0
        tail = np.float32(0)
        j = s
        while j < e:
            b = j // blocksize
            end = min(e, (b + 1) * blocksize)
            scale = absmax[b - abase]
            if j % blocksize == 0 and end - j == blocksize:
                # Whole blocks: one call for all of them.
                nfull = (e - j) // blocksize
                dot_groups(packed, j >> 1, absmax, b - abase, nfull, gsize, code, x, j - s, acc)
                j += nfull * blocksize
                continue
            if j & 1:
                tail += _weight(packed, code, scale, j) * x[j - s]
                j += 1
            ngroups = (end - j) // 16
            if ngroups > 0:
                dot_groups(packed, j >> 1, absmax, b - abase, 1, ngroups, code, x, j - s, acc)
                j += 16 * ngroups
            while j < end:
                tail += _weight(packed, code, scale, j) * x[j - s]
                j += 1
        total = tail
        for lane in range(16):
            total += acc[lane]
        return total

    def row_deq(packed, absmax, abase, code, blocksize, s, e, dst):
        """dst[0: e - s] = the flat elements [s, e) of W; absmax[b - abase] scales block b."""
        gsize = blocksize // 16
        j = s
        while j < e:
            b = j // blocksize
            end = min(e, (b + 1) * blocksize)
            scale = absmax[b - abase]
            if j % blocksize == 0 and end - j == blocksize:
                nfull = (e - j) // blocksize
                deq_groups(packed, j >> 1, absmax, b - abase, nfull, gsize, code, dst, j - s)
                j += nfull * blocksize
                continue
            if j & 1:
                dst[j - s] = _weight(packed, code, scale, j)
                j += 1
            ngroups = (end - j) // 16
            if ngroups > 0:
                deq_groups(packed, j >> 1, absmax, b - abase, 1, ngroups, code, dst, j - s)
                j += 16 * ngroups
            while j < end:
                dst[j - s] = _weight(packed, code, scale, j)
                j += 1

    row_dot = njit(**JIT_OPTIONS)(named(row_dot, "row_dot"))
    row_deq = njit(**JIT_OPTIONS)(named(row_deq, "row_deq"))

    def gemv_rows(packed, absmax, code, blocksize, x, B, t, s_, out):
        """out = deq(W) @ x + s_ * B @ t, rows spread over Numba's threads (t may be empty)."""
        out_features = out.shape[0]
        in_features = x.shape[0]
        for c in prange((out_features + ROW_CHUNK - 1) // ROW_CHUNK):
            acc = np.empty(16, dtype=np.float32)
            for i in range(c * ROW_CHUNK, min(out_features, (c + 1) * ROW_CHUNK)):
                s = i * in_features
                out[i] = row_dot(packed, absmax, 0, code, blocksize, x, s, s + in_features,
                                 acc) + _low_rank(B, i, t, s_)

    def gemv_rows_dq(packed, absmax_q, nested_absmax, nested_code, offset, code, blocksize, x,
                     B, t, s_, out):
        """gemv_rows with each task's absmax decoded into task-sized scratch."""
        out_features = out.shape[0]
        in_features = x.shape[0]
        for c in prange((out_features + ROW_CHUNK - 1) // ROW_CHUNK):
            acc = np.empty(16, dtype=np.float32)
            r0 = c * ROW_CHUNK
            r1 = min(out_features, r0 + ROW_CHUNK)
            b0 = (r0 * in_features) // blocksize
            b1 = (r1 * in_features + blocksize - 1) // blocksize
            absmax = np.empty(b1 - b0, dtype=np.float32)
            _dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax)
            for i in range(r0, r1):
                s = i * in_features
                out[i] = row_dot(packed, absmax, b0, code, blocksize, x, s, s + in_features,
                                 acc) + _low_rank(B, i, t, s_)

    def dequantize_tile(packed, absmax, abase, code, blocksize, r0, tile):
        """tile[r] = row r0 + r of deq(W), on the calling thread.

        Serial on purpose: the tile then goes to BLAS's threads, and Numba's
        and BLAS's threads taking turns on the same cores spin against each
        other (measured: 50-180x slower under load).
        """
        in_features = tile.shape[1]
        for r in range(tile.shape[0]):
            s = (r0 + r) * in_features
            row_deq(packed, absmax, abase, code, blocksize, s, s + in_features, tile[r])

    def rows_small(packed, absmax, abase, code, blocksize, X, B, T, s_, out, r0, r1, wrow):
        """out[:, r] = X @ deq(W)[r] + s_ * T @ B[r] for r0 <= r < r1 (T may have no columns).

        Two rows of W are dequantized at a time into ``wrow``, (2,
        in_features) scratch that stays in L1; a 2 x 4 block of sums shares
        each load of two weights and four inputs.  Each sum is one float32
        chain per vector lane.  The low-rank term is added afterwards, one
        batch row at a time over rows r0..r1 of B: inside the 2 x 4 block it
        cost 30% of an 8-row product (4096 x 4096, rank 16), 4% outside.
        """
        batch, in_features = X.shape
        for r in range(r0, r1, 2):
            pair = min(2, r1 - r)
            for h in range(pair):
                s = (r + h) * in_features
                row_deq(packed, absmax, abase, code, blocksize, s, s + in_features, wrow[h])
            w0 = wrow[0]
            w1 = wrow[1] if pair == 2 else wrow[0]
            b = 0
            while b + 4 <= batch:
                x0, x1, x2, x3 = X[b], X[b + 1], X[b + 2], X[b + 3]
                a0 = np.float32(0)
                a1 = np.float32(0)
                a2 = np.float32(0)
                a3 = np.float32(0)
                c0 = np.float32(0)
                c1 = np.float32(0)
                c2 = np.float32(0)
                c3 = np.float32(0)
                for k in range(in_features):
                    u = w0[k]
                    v = w1[k]
                    a0 += u * x0[k]
                    a1 += u * x1[k]
                    a2 += u * x2[k]
                    a3 += u * x3[k]
                    c0 += v * x0[k]
                    c1 += v * x1[k]
                    c2 += v * x2[k]
                    c3 += v * x3[k]
                out[b, r] = a0
                out[b + 1, r] = a1
                out[b + 2, r] = a2
                out[b + 3, r] = a3
                if pair == 2:
                    out[b, r + 1] = c0
                    out[b + 1, r + 1] = c1
                    out[b + 2, r + 1] = c2
                    out[b + 3, r + 1] = c3
                b += 4
            while b < batch:
                xb = X[b]
                a0 = np.float32(0)
                c0 = np.float32(0)
                for k in range(in_features):
                    a0 += w0[k] * xb[k]
                    c0 += w1[k] * xb[k]
                out[b, r] = a0
                if pair == 2:
                    out[b, r + 1] = c0
                b += 1
        if T.shape[1] > 0:
            for b in range(batch):
                _low_rank_rows(out[b], T[b], B, s_, out[b], r0, r1)

    row_deq_tile = njit(**JIT_OPTIONS)(named(dequantize_tile, "dequantize_tile"))
    rows_small = njit(**JIT_OPTIONS)(named(rows_small, "rows_small"))

    def batch_small(packed, absmax, code, blocksize, X, B, T, s_, out):
        """out = X @ deq(W).T for few rows of X, rows of W spread over Numba's threads."""
        out_features = out.shape[1]
        for c in prange((out_features + ROW_CHUNK - 1) // ROW_CHUNK):
            wrow = np.empty((2, X.shape[1]), dtype=np.float32)
            r0 = c * ROW_CHUNK
            rows_small(packed, absmax, 0, code, blocksize, X, B, T, s_, out, r0,
                       min(out_features, r0 + ROW_CHUNK), wrow)

    def batch_small_dq(packed, absmax_q, nested_absmax, nested_code, offset, code, blocksize,
                       X, B, T, s_, out):
        """batch_small with each task's absmax decoded into task-sized scratch."""
        out_features = out.shape[1]
        in_features = X.shape[1]
        for c in prange((out_features + ROW_CHUNK - 1) // ROW_CHUNK):
            wrow = np.empty((2, in_features), dtype=np.float32)
            r0 = c * ROW_CHUNK
            r1 = min(out_features, r0 + ROW_CHUNK)
            b0 = (r0 * in_features) // blocksize
            b1 = (r1 * in_features + blocksize - 1) // blocksize
            absmax = np.empty(b1 - b0, dtype=np.float32)
            _dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax)
            rows_small(packed, absmax, b0, code, blocksize, X, B, T, s_, out, r0, r1, wrow)

    gemv_rows = njit(parallel=True, **JIT_OPTIONS)(named(gemv_rows, "gemv_rows"))
    gemv_rows_dq = njit(parallel=True, **JIT_OPTIONS)(named(gemv_rows_dq, "gemv_rows_dq"))
    batch_small = njit(parallel=True, **JIT_OPTIONS)(named(batch_small, "batch_small"))
    batch_small_dq = njit(parallel=True, **JIT_OPTIONS)(named(batch_small_dq, "batch_small_dq"))
    return (row_dot, row_deq, gemv_rows, gemv_rows_dq, row_deq_tile, batch_small,
            batch_small_dq)


_PORTABLE = _build("portable", _nf4_dot_portable, _nf4_deq_portable)
if HAVE_AVX512:
    _FAST = _build("avx512", _nf4_dot_avx512, _nf4_deq_avx512)
else:
    _FAST = _PORTABLE


# ------------------------------------------------------------ the products
@njit(**JIT_OPTIONS)
def _lora_vector(A, B, scaling, x, out):
    if scaling != 0 and A.shape[0] > 0:
        t = np.empty(A.shape[0], dtype=np.float32)
        gemv_n(1.0, A, x, 0.0, t)
        gemv_n(scaling, B, t, 1.0, out)


@njit(**JIT_OPTIONS)
def _lora_batch(A, B, scaling, X, out):
    if scaling != 0 and A.shape[0] > 0:
        T = np.empty((X.shape[0], A.shape[0]), dtype=np.float32)
        gemm_nt(1.0, X, A, 0.0, T)
        gemm_nt(scaling, T, B, 1.0, out)


@njit(**JIT_OPTIONS)
def _check_vector(n_packed, n_absmax, code, blocksize, A, B, x, out):
    out_features = out.shape[0]
    in_features = x.shape[0]
    if A.shape[1] != in_features or B.shape[0] != out_features:
        raise LoraShapeError("x must be (in_features,) and out (out_features,), with A "
                             "(rank, in_features) and B (out_features, rank)")
    _check_lora(A, B, out_features, in_features)
    _check_storage(n_packed, n_absmax, code, blocksize, out_features, in_features)
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("x and out must be contiguous")


@njit(**JIT_OPTIONS)
def _check_batch(n_packed, n_absmax, code, blocksize, A, B, X, out):
    out_features = out.shape[1]
    in_features = X.shape[1]
    if out.shape[0] != X.shape[0]:
        raise LoraShapeError("X must be (batch, in_features) and out (batch, out_features)")
    if A.shape[1] != in_features or B.shape[0] != out_features:
        raise LoraShapeError("X must be (batch, in_features) and out (batch, out_features), "
                             "with A (rank, in_features) and B (out_features, rank)")
    _check_lora(A, B, out_features, in_features)
    _check_storage(n_packed, n_absmax, code, blocksize, out_features, in_features)
    if not (X.flags.c_contiguous and out.flags.c_contiguous):
        raise LoraShapeError("X and out must be C-contiguous")


@njit(**JIT_OPTIONS)
def _sgemm_into(X, tile, out, c0):
    """out[:, c0: c0 + tile.shape[0]] = X @ tile.T (sgemm with ldc = out.shape[1]).

    The caller has checked: all three C-contiguous float32, X (batch, k),
    tile (rows, k), out (batch, n) with c0 + rows <= n.
    """
    m, k = X.shape
    rows = tile.shape[0]
    if (tile.shape[1] != k or out.shape[0] != m or c0 < 0 or c0 + rows > out.shape[1]
            or m == 0 or rows == 0 or k == 0):
        raise LoraShapeError("internal: tile product out of range")
    ldc = out.shape[1]
    _sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, m, rows, k, np.float32(1.0),
           X.ctypes, k, tile.ctypes, k, np.float32(0.0), out[0, c0:].ctypes, ldc)


def _tile_rows(out_features, in_features):
    return max(1, min(out_features, TILE_BYTES // (4 * max(1, in_features))))


_tile_rows = njit(**JIT_OPTIONS)(_tile_rows)


def _make_drivers(paths, tag):
    """The unguarded bodies of the four public kernels over one path."""
    _, _, gemv_rows, gemv_rows_dq, dequantize_tile, batch_small, batch_small_dq = paths
    tiles = build_tiles(tag, dequantize_tile, _dq_absmax)
    tiled, tiled_dq = tiles["tiled"], tiles["tiled_dq"]

    def named(function, name):
        function.__name__ = function.__qualname__ = f"_{name}_{tag}"
        return function

    def fwd(packed, absmax, code, blocksize, A, B, scaling, x, out):
        _check_vector(packed.shape[0], absmax.shape[0], code, blocksize, A, B, x, out)
        if out.shape[0] > 0:
            if x.shape[0] == 0:
                out[:] = 0
            else:
                t, s_ = _down_vector(A, x, scaling)
                gemv_rows(packed, absmax, code, blocksize, x, B, t, s_, out)
                return out
        _lora_vector(A, B, scaling, x, out)
        return out

    def fwd_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B, scaling,
               x, out):
        _check_vector(packed.shape[0], absmax_q.shape[0], _NF4, blocksize, A, B, x, out)
        _check_dq(absmax_q, nested_absmax, nested_code)
        if out.shape[0] > 0:
            if x.shape[0] == 0:
                out[:] = 0
            else:
                t, s_ = _down_vector(A, x, scaling)
                gemv_rows_dq(packed, absmax_q, nested_absmax, nested_code, offset, _NF4,
                             blocksize, x, B, t, s_, out)
                return out
        _lora_vector(A, B, scaling, x, out)
        return out

    def batch_tiles(packed, absmax, abase, code, blocksize, X, out, r0, r1, tile):
        dequantize_tile(packed, absmax, abase, code, blocksize, r0, tile[:r1 - r0])
        _sgemm_into(X, tile[:r1 - r0], out, r0)

    batch_tiles = njit(**JIT_OPTIONS)(named(batch_tiles, "batch_tiles"))

    def fwd_batch(packed, absmax, code, blocksize, A, B, scaling, X, out):
        _check_batch(packed.shape[0], absmax.shape[0], code, blocksize, A, B, X, out)
        batch, in_features = X.shape
        out_features = out.shape[1]
        if batch == 0 or out_features == 0:
            return out
        if in_features == 0:
            out[:] = 0
        elif batch <= SMALL_BATCH:
            T, s_ = _down(A, X, scaling)
            batch_small(packed, absmax, code, blocksize, X, B, T, s_, out)
            return out
        elif tiled(packed, absmax, code, blocksize, A, B, scaling, X, out):
            return out
        else:
            # No BLAS thread control: dequantize here, multiply on BLAS's threads.
            rows = _tile_rows(out_features, in_features)
            tile = np.empty((rows, in_features), dtype=np.float32)
            for r0 in range(0, out_features, rows):
                r1 = min(out_features, r0 + rows)
                batch_tiles(packed, absmax, 0, code, blocksize, X, out, r0, r1, tile)
        _lora_batch(A, B, scaling, X, out)
        return out

    def fwd_batch_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                     scaling, X, out):
        _check_batch(packed.shape[0], absmax_q.shape[0], _NF4, blocksize, A, B, X, out)
        _check_dq(absmax_q, nested_absmax, nested_code)
        batch, in_features = X.shape
        out_features = out.shape[1]
        if batch == 0 or out_features == 0:
            return out
        if in_features == 0:
            out[:] = 0
        elif batch <= SMALL_BATCH:
            T, s_ = _down(A, X, scaling)
            batch_small_dq(packed, absmax_q, nested_absmax, nested_code, offset, _NF4, blocksize,
                           X, B, T, s_, out)
            return out
        elif tiled_dq(packed, absmax_q, nested_absmax, nested_code, offset, _NF4, blocksize, A,
                      B, scaling, X, out):
            return out
        else:
            # No BLAS thread control: dequantize here, multiply on BLAS's threads.
            rows = _tile_rows(out_features, in_features)
            tile = np.empty((rows, in_features), dtype=np.float32)
            absmax = np.empty((rows * in_features) // blocksize + 2, dtype=np.float32)
            for r0 in range(0, out_features, rows):
                r1 = min(out_features, r0 + rows)
                b0 = (r0 * in_features) // blocksize
                b1 = (r1 * in_features + blocksize - 1) // blocksize
                _dq_absmax(absmax_q, nested_absmax, nested_code, offset, b0, b1, absmax)
                batch_tiles(packed, absmax, b0, _NF4, blocksize, X, out, r0, r1,
                            tile)
        _lora_batch(A, B, scaling, X, out)
        return out

    return {
        "forward_nf4": njit(**JIT_OPTIONS)(named(fwd, "forward_nf4")),
        "forward_nf4_dq": njit(**JIT_OPTIONS)(named(fwd_dq, "forward_nf4_dq")),
        "forward_batch_nf4": njit(**JIT_OPTIONS)(named(fwd_batch, "forward_batch_nf4")),
        "forward_batch_nf4_dq": njit(**JIT_OPTIONS)(named(fwd_batch_dq, "forward_batch_nf4_dq")),
    }


_DRIVERS_PORTABLE = _make_drivers(_PORTABLE, "portable")
_DRIVERS = _make_drivers(_FAST, "avx512") if HAVE_AVX512 else _DRIVERS_PORTABLE

_STORE = (("packed", "u8_1"), ("absmax", "f32_1"), ("code", "f32_1"), ("blocksize", "int"))
_STORE_DQ = (("packed", "u8_1"), ("absmax_q", "u8_1"), ("nested_absmax", "f32_1"),
             ("nested_code", "f32_1"), ("offset", "real"), ("blocksize", "int"))
_LORA = (("A", "f32_2"), ("B", "f32_2"), ("scaling", "real"))
_VEC = (("x", "f32_1"), ("out", "f32_1w"))
_BAT = (("X", "f32_2"), ("out", "f32_2w"))
_PARAMS = {
    "forward_nf4": _STORE + _LORA + _VEC,
    "forward_batch_nf4": _STORE + _LORA + _BAT,
    "forward_nf4_dq": _STORE_DQ + _LORA + _VEC,
    "forward_batch_nf4_dq": _STORE_DQ + _LORA + _BAT,
}


def _guards(drivers, suffix):
    return {name: guarded(name + suffix, _PARAMS[name], drivers[name]) for name in _PARAMS}


_CHECKED = _guards(_DRIVERS, "")
_CHECKED_PORTABLE = _guards(_DRIVERS_PORTABLE, "_portable")
_c_fwd = _CHECKED["forward_nf4"]
_c_fwd_batch = _CHECKED["forward_batch_nf4"]
_c_fwd_dq = _CHECKED["forward_nf4_dq"]
_c_fwd_batch_dq = _CHECKED["forward_batch_nf4_dq"]
_p_fwd = _CHECKED_PORTABLE["forward_nf4"]
_p_fwd_batch = _CHECKED_PORTABLE["forward_batch_nf4"]
_p_fwd_dq = _CHECKED_PORTABLE["forward_nf4_dq"]
_p_fwd_batch_dq = _CHECKED_PORTABLE["forward_batch_nf4_dq"]
# For QLoraLinear, which holds out already: the same kernels returning nothing.
_forward_nf4_quiet = quiet(_c_fwd)
_forward_batch_nf4_quiet = quiet(_c_fwd_batch)
_forward_nf4_dq_quiet = quiet(_c_fwd_dq)
_forward_batch_nf4_dq_quiet = quiet(_c_fwd_batch_dq)


@njit(**JIT_OPTIONS)
def forward_nf4(packed, absmax, code, blocksize, A, B, scaling, x, out):
    """One input vector over an NF4 weight: ``out = deq(W) @ x + scaling * B @ (A @ x)``.

    Reads each packed byte once and keeps no dequantized copy of W; see the
    module docstring for the storage layout and the order of the sums.

    Parameters
    ----------
    packed : ndarray of uint8, shape ((out_features * in_features + 1) // 2,)
        4-bit codes of the row-major flattened W, element ``2k`` in the high
        nibble of byte ``k``.
    absmax : ndarray of float32, shape (ceil(out_features * in_features / blocksize),)
        Scale of each block of ``blocksize`` consecutive elements.
    code : ndarray of float32, shape (16,)
        The 4-bit code values (the NF4 table).
    blocksize : int
        A power of two from 32 to 4096.
    A : ndarray of float32, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray of float32, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` (or ``rank == 0``) skips it.
    x : ndarray of float32, shape (in_features,)
        Contiguous.
    out : ndarray of float32, shape (out_features,)
        Contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (out_features,)
        The same array as ``out``.

    See Also
    --------
    forward_batch_nf4 : A batch of rows.
    forward_nf4_dq : With double-quantized scales.
    numba_lora.QLoraLinear.forward : The layer that calls it.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels, nf4
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 64)).astype(np.float32)
    >>> q = nf4.quantize(W, 64)
    >>> A = rng.standard_normal((2, 64)).astype(np.float32)
    >>> B = rng.standard_normal((8, 2)).astype(np.float32)
    >>> x = rng.standard_normal(64).astype(np.float32)
    >>> y = kernels.forward_nf4(q.packed, q.absmax, q.code, 64, A, B, 0.5, x,
    ...                         np.empty(8, np.float32))
    >>> ref = nf4.dequantize(q).astype(np.float64) @ x + 0.5 * B @ (A @ x)
    >>> bool(np.allclose(y, ref, rtol=1e-4, atol=1e-4))
    True
    """
    return _c_fwd(packed, absmax, code, blocksize, A, B, scaling, x, out)


@njit(**JIT_OPTIONS)
def forward_batch_nf4(packed, absmax, code, blocksize, A, B, scaling, X, out):
    """A batch of rows over an NF4 weight: ``out = X @ deq(W).T + scaling * (X @ A.T) @ B.T``.

    Up to ``SMALL_BATCH`` rows, each of Numba's threads dequantizes two rows
    of W at a time and multiplies them in Numba; in larger batches each of
    Numba's threads dequantizes a tile of rows at a time into its own scratch
    (never all of W) and multiplies it by a one-thread sgemm (the BLAS is set
    to one thread meanwhile; see :mod:`numba_lora.kernels.qlora_tiles`).

    Parameters
    ----------
    packed : ndarray of uint8, shape ((out_features * in_features + 1) // 2,)
        4-bit codes of the row-major flattened W, element ``2k`` in the high
        nibble of byte ``k``.
    absmax : ndarray of float32, shape (ceil(out_features * in_features / blocksize),)
        Scale of each block of ``blocksize`` consecutive elements.
    code : ndarray of float32, shape (16,)
        The 4-bit code values (the NF4 table).
    blocksize : int
        A power of two from 32 to 4096.
    A : ndarray of float32, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray of float32, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` (or ``rank == 0``) skips it.
    X : ndarray of float32, shape (batch, in_features)
        C-contiguous; ``batch`` may be 0.
    out : ndarray of float32, shape (batch, out_features)
        C-contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (batch, out_features)
        The same array as ``out``.

    See Also
    --------
    forward_nf4 : One input vector.
    forward_batch_nf4_dq : With double-quantized scales.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels, nf4
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 64)).astype(np.float32)
    >>> q = nf4.quantize(W, 64)
    >>> A, B = np.zeros((2, 64), np.float32), np.zeros((8, 2), np.float32)
    >>> X = rng.standard_normal((3, 64)).astype(np.float32)
    >>> Y = kernels.forward_batch_nf4(q.packed, q.absmax, q.code, 64, A, B, 1.0, X,
    ...                               np.empty((3, 8), np.float32))
    >>> bool(np.allclose(Y, X @ nf4.dequantize(q).T, rtol=1e-4, atol=1e-4))
    True
    """
    return _c_fwd_batch(packed, absmax, code, blocksize, A, B, scaling, X, out)


@njit(**JIT_OPTIONS)
def forward_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                   scaling, x, out):
    """:func:`forward_nf4` over double-quantized absmax, with the NF4 table :data:`NF4_CODE`.

    Block ``b``'s scale is ``float32(nested_code[absmax_q[b]] *
    nested_absmax[b // 256]) + offset``, each step rounded to float32.

    Parameters
    ----------
    packed : ndarray of uint8, shape ((out_features * in_features + 1) // 2,)
        4-bit codes of the row-major flattened W, element ``2k`` in the high
        nibble of byte ``k``.
    absmax_q : ndarray of uint8, shape (nblocks,)
        8-bit codes of the blocks' absmax,
        ``nblocks = ceil(out_features * in_features / blocksize)``.
    nested_absmax : ndarray of float32, shape (ceil(nblocks / 256),)
        Scale of each block of 256 codes.
    nested_code : ndarray of float32, shape (256,)
        The 8-bit map (:data:`numba_lora.nf4.DYNAMIC_CODE`).
    offset : float
        Added to every decoded absmax (rounded to float32 first).
    blocksize : int
        A power of two from 32 to 4096.
    A : ndarray of float32, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray of float32, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` (or ``rank == 0``) skips it.
    x : ndarray of float32, shape (in_features,)
        Contiguous.
    out : ndarray of float32, shape (out_features,)
        Contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (out_features,)
        The same array as ``out``.

    See Also
    --------
    forward_nf4 : With float32 scales.
    forward_batch_nf4_dq : A batch of rows.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels, nf4
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 64)).astype(np.float32)
    >>> q = nf4.quantize(W, 64, double_quant=True)
    >>> A, B = np.zeros((2, 64), np.float32), np.zeros((8, 2), np.float32)
    >>> x = rng.standard_normal(64).astype(np.float32)
    >>> y = kernels.forward_nf4_dq(q.packed, q.absmax_q, q.nested_absmax, q.nested_code,
    ...                            q.offset, 64, A, B, 1.0, x, np.empty(8, np.float32))
    >>> bool(np.allclose(y, nf4.dequantize(q) @ x, rtol=1e-4, atol=1e-4))
    True
    """
    return _c_fwd_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                     scaling, x, out)


@njit(**JIT_OPTIONS)
def forward_batch_nf4_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                         scaling, X, out):
    """:func:`forward_batch_nf4` over double-quantized absmax (see :func:`forward_nf4_dq`).

    Parameters
    ----------
    packed : ndarray of uint8, shape ((out_features * in_features + 1) // 2,)
        4-bit codes of the row-major flattened W, element ``2k`` in the high
        nibble of byte ``k``.
    absmax_q : ndarray of uint8, shape (nblocks,)
        8-bit codes of the blocks' absmax,
        ``nblocks = ceil(out_features * in_features / blocksize)``.
    nested_absmax : ndarray of float32, shape (ceil(nblocks / 256),)
        Scale of each block of 256 codes.
    nested_code : ndarray of float32, shape (256,)
        The 8-bit map (:data:`numba_lora.nf4.DYNAMIC_CODE`).
    offset : float
        Added to every decoded absmax (rounded to float32 first).
    blocksize : int
        A power of two from 32 to 4096.
    A : ndarray of float32, shape (rank, in_features)
        The LoRA down-projection.
    B : ndarray of float32, shape (out_features, rank)
        The LoRA up-projection.
    scaling : float
        Multiplier of the low-rank term; ``0`` (or ``rank == 0``) skips it.
    X : ndarray of float32, shape (batch, in_features)
        C-contiguous; ``batch`` may be 0.
    out : ndarray of float32, shape (batch, out_features)
        C-contiguous and writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (batch, out_features)
        The same array as ``out``.

    See Also
    --------
    forward_batch_nf4 : With float32 scales.
    forward_nf4_dq : One input vector.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels, nf4
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 64)).astype(np.float32)
    >>> q = nf4.quantize(W, 64, double_quant=True)
    >>> A, B = np.zeros((2, 64), np.float32), np.zeros((8, 2), np.float32)
    >>> X = rng.standard_normal((3, 64)).astype(np.float32)
    >>> Y = kernels.forward_batch_nf4_dq(q.packed, q.absmax_q, q.nested_absmax, q.nested_code,
    ...                                  q.offset, 64, A, B, 1.0, X, np.empty((3, 8), np.float32))
    >>> bool(np.allclose(Y, X @ nf4.dequantize(q).T, rtol=1e-4, atol=1e-4))
    True
    """
    return _c_fwd_batch_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A,
                           B, scaling, X, out)


# The portable path on any CPU, for tests and comparisons (same arguments).
@njit(**JIT_OPTIONS)
def _forward_nf4_portable(packed, absmax, code, blocksize, A, B, scaling, x, out):
    return _p_fwd(packed, absmax, code, blocksize, A, B, scaling, x, out)


@njit(**JIT_OPTIONS)
def _forward_batch_nf4_portable(packed, absmax, code, blocksize, A, B, scaling, X, out):
    return _p_fwd_batch(packed, absmax, code, blocksize, A, B, scaling, X, out)


@njit(**JIT_OPTIONS)
def _forward_nf4_dq_portable(packed, absmax_q, nested_absmax, nested_code, offset, blocksize,
                             A, B, scaling, x, out):
    return _p_fwd_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A, B,
                     scaling, x, out)


@njit(**JIT_OPTIONS)
def _forward_batch_nf4_dq_portable(packed, absmax_q, nested_absmax, nested_code, offset,
                                   blocksize, A, B, scaling, X, out):
    return _p_fwd_batch_dq(packed, absmax_q, nested_absmax, nested_code, offset, blocksize, A,
                           B, scaling, X, out)
