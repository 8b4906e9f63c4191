"""Kernels for NF4 storage: quantize a float32 weight, dequantize it (or rows of it), and the
8-bit double quantization of the per-block absmax.

The rules are bitsandbytes' CPU rules, stated in :mod:`numba_lora.nf4` (the
public module over these kernels) and pinned bit for bit by fixtures made
with bitsandbytes.  Every rounding is part of the contract, so every kernel
here takes ``EXACT_OPTIONS`` (no fastmath: ``arcp`` would turn the partial
block's division into a multiplication by a reciprocal, ``contract`` would
fuse the double-quant restore into one rounding).

Each public kernel is a one-line ``@njit`` function over a guarded body
(:func:`~numba_lora.kernels._guard.guarded`): argument types are checked
when the call is compiled, shapes and sizes when it runs, before any array
is touched.  Storage (the contract :mod:`numba_lora.kernels.qlora` reads):

- ``packed``: uint8, ``((n + 1) // 2,)`` for ``n = out_features * in_features``;
  element ``2k`` of the row-major flattened W in the HIGH nibble of byte ``k``;
- ``absmax``: float32, ``(ceil(n / blocksize),)``;
- ``code``: float32, ``(16,)``, sorted ascending (NF4: :data:`numba_lora.nf4.NF4_CODE`);
- double quantization: ``absmax_q`` uint8 ``(nblocks,)``, ``nested_absmax``
  float32 ``(ceil(nblocks / 256),)``, ``nested_code`` float32 ``(256,)`` and a
  float32 ``offset``; ``absmax[b] = float32(float32(nested_code[absmax_q[b]] *
  nested_absmax[b // 256]) + offset)``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._config import EXACT_OPTIONS
from ..errors import LoraConfigError, LoraNonFiniteError, LoraShapeError
from ._guard import guarded, python_errors

__all__ = [
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_serial",
    "dynamic_lut",
    "quantize_absmax",
    "dequantize_absmax",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
]

#: The blocksizes bitsandbytes' quantize_4bit accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: bitsandbytes' fixed blocksize of the 8-bit quantization of absmax.
NESTED_BLOCKSIZE = 256
#: Entries of bitsandbytes' table from a normalised value to an 8-bit code.
LUT_SIZE = 65536

_TINY = np.float32(1e-38)      # bitsandbytes' clamp of absmax before it scales a block
_INF_BITS = 0x7F800000         # float32 exponent all ones: infinity or NaN
_ABS_MASK = 0x7FFFFFFF
_ROWS_PER_TASK = 8             # rows of out per task of the parallel dequantize
_CODES_PER_TASK = 1 << 14      # elements per task of the parallel quantize


# ------------------------------------------------ roundings callers cannot change
# An @njit function without a fastmath option takes its caller's (Numba's
# flag inheritance): when a user's function compiled with fastmath on calls a
# kernel here, Numba compiles the kernel (and every helper it calls) with the
# caller's flags, and its fastmath pass then marks every float instruction
# that has no flags yet.  LLVM would fuse a multiply and an add into one
# rounding (contract), divide by multiplying with a reciprocal (arcp) and
# fold NaN checks away (nnan); and the dispatcher keeps that compilation for
# later calls of the same types, from Python too.  So every rounding-bearing
# operation here is one of these intrinsics: the IEEE instruction carrying
# the single flag ``nsz`` (no signed zeros), which the fastmath pass leaves
# alone because the instruction already has a flag.  ``nsz`` changes no
# result here: it only licenses folds with a constant zero operand, and no
# operand below is a constant zero.  NaN and infinity are tested on the bits.
_NSZ = ("nsz",)


def _unrelaxed(opname):
    def typer(typingctx, a, b):
        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, opname)(args[0], args[1], flags=_NSZ)

        return a(a, b), codegen
    typer.__name__ = typer.__qualname__ = f"_exact_{opname}"
    return intrinsic(typer)


_add = _unrelaxed("fadd")
_sub = _unrelaxed("fsub")
_mul = _unrelaxed("fmul")
_div = _unrelaxed("fdiv")


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32, as a uint32 (no float operation a flag could fold)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@njit(**EXACT_OPTIONS)
def _finite32(x):
    return (_f32_bits(x) & np.uint32(_INF_BITS)) != np.uint32(_INF_BITS)


@njit(**EXACT_OPTIONS)
def _valid_blocksize(blocksize):
    return 32 <= blocksize <= 4096 and (blocksize & (blocksize - 1)) == 0


@njit(**EXACT_OPTIONS)
def _bounds(code):
    """The 15 float32 midpoints between consecutive code values."""
    bounds = np.empty(15, dtype=np.float32)
    for i in range(15):
        bounds[i] = _div(_add(code[i], code[i + 1]), np.float32(2))
    return bounds


@njit(**EXACT_OPTIONS)
def _nibble(s, bounds):
    """The code of a scaled value: how many midpoints lie strictly below it.

    A value on a midpoint takes the lower code (torch.bucketize, right=False).
    The result is in 0..15 for any input, NaN included.
    """
    q = np.uint8(0)
    for i in range(15):
        q += np.uint8(s > bounds[i])
    return q


# ------------------------------------------------------------------ quantize
@njit(**EXACT_OPTIONS)
def _block_absmax_bits(bits, start, stop):
    """max |w| over bits[start:stop] as float32 bits; >= _INF_BITS if any is inf or NaN.

    On the bits, |w| is ``bits & 0x7fffffff`` and the order of non-negative
    floats is the order of their bit patterns, so the maximum is an integer
    maximum (which vectorises, and cannot skip a NaN as a float max can).
    """
    m = np.uint32(0)
    for i in range(start, stop):
        a = bits[i] & np.uint32(_ABS_MASK)
        if a > m:
            m = a
    return m


@njit(**EXACT_OPTIONS)
def _bits_to_float(bits):
    one = np.empty(1, dtype=np.uint32)
    one[0] = bits
    return one.view(np.float32)[0]


@njit(**EXACT_OPTIONS)
def _scaled_codes(W, start, count, factor, divide, bounds, q):
    """q[i] = code of W[start + i] * factor (or / factor), clipped to [-1, 1].

    Two loops, so that the common one (multiply) has no branch and vectorises.
    """
    one = np.float32(1)
    if divide:
        for i in range(count):
            s = min(max(_div(W[start + i], factor), -one), one)
            q[i] = _nibble(s, bounds)
    else:
        for i in range(count):
            s = min(max(_mul(W[start + i], factor), -one), one)
            q[i] = _nibble(s, bounds)


@njit(**EXACT_OPTIONS)
def _quantize_block(W, start, stop, full, absmax_b, bounds, pad, q, packed):
    """Codes of W[start:stop] (start even) into packed[start // 2 ...]; q is scratch."""
    clamped = max(absmax_b, _TINY)
    count = stop - start
    if full:
        _scaled_codes(W, start, count, _div(np.float32(1), clamped), False, bounds, q)
    else:
        _scaled_codes(W, start, count, clamped, True, bounds, q)
    if count % 2:  # only the last element of an odd n: padded with the code of 0.0
        q[count] = pad
    k0 = start // 2
    for k in range((count + 1) // 2):
        packed[k0 + k] = (q[2 * k] << 4) | q[2 * k + 1]


@njit(parallel=True, **EXACT_OPTIONS)
def _quantize_pass(W, bits, blocksize, bounds, pad, packed, absmax):
    """One pass over W: per block its absmax (from the bits, L1-resident), then its codes.

    Returns the number of blocks holding inf or NaN (their codes are
    meaningless, but in range); the caller writes into scratch and copies
    out only when that is 0.
    """
    n = W.shape[0]
    nblocks = absmax.shape[0]
    per_task = max(1, _CODES_PER_TASK // blocksize)
    tasks = (nblocks + per_task - 1) // per_task
    bad = 0
    for t in prange(tasks):
        q = np.empty(blocksize + 1, dtype=np.uint8)
        for b in range(t * per_task, min(nblocks, (t + 1) * per_task)):
            start = b * blocksize
            stop = min(start + blocksize, n)
            full = stop - start == blocksize
            mbits = _block_absmax_bits(bits, start, stop)
            if mbits >= np.uint32(_INF_BITS):
                bad += 1
                mbits = np.uint32(0)
            m = _bits_to_float(mbits)
            # bitsandbytes stores a full block's absmax as it is and the partial
            # last block's clamped to float32(1e-38) (its division needs the clamp).
            absmax[b] = m if full else max(m, _TINY)
            _quantize_block(W, start, stop, full, m, bounds, pad, q, packed)
    return bad


@njit(**EXACT_OPTIONS)
def _check_code(code):
    if code.shape[0] != 16:
        raise LoraShapeError("code must hold the 16 NF4 values: code.shape[0] != 16")


@njit(**EXACT_OPTIONS)
def _check_blocksize(blocksize):
    if not _valid_blocksize(blocksize):
        raise LoraConfigError("blocksize must be a power of two from 32 to 4096 "
                              "(the blocksizes bitsandbytes allows)")


@njit(**EXACT_OPTIONS)
def _quantize_nf4(W, code, blocksize, packed, absmax):
    _check_code(code)
    _check_blocksize(blocksize)
    n = W.shape[0]
    if n == 0:
        raise LoraShapeError("W must hold at least one element")
    nblocks = (n + blocksize - 1) // blocksize
    if packed.shape[0] != (n + 1) // 2:
        raise LoraShapeError("packed must have (n + 1) // 2 bytes for the n elements of W")
    if absmax.shape[0] != nblocks:
        raise LoraShapeError("absmax must have ceil(n / blocksize) elements")
    if not W.flags.c_contiguous:
        raise LoraShapeError("W must be contiguous")
    bounds = _bounds(code)
    pad = _nibble(np.float32(0), bounds)
    # Into scratch first (an eighth of W's bytes), so that a refusal writes nothing.
    packed_tmp = np.empty(packed.shape[0], dtype=np.uint8)
    absmax_tmp = np.empty(nblocks, dtype=np.float32)
    if _quantize_pass(W, W.view(np.uint32), blocksize, bounds, pad, packed_tmp, absmax_tmp) > 0:
        raise LoraNonFiniteError("W holds inf or NaN, which NF4 cannot store "
                                 "(bitsandbytes would dequantize its whole block to NaN); "
                                 "packed and absmax are unchanged")
    packed[:] = packed_tmp
    absmax[:] = absmax_tmp
    return packed


_quantize_nf4_checked = guarded(
    "quantize_nf4", (("W", "f32_1"), ("code", "f32_1"), ("blocksize", "int"),
                     ("packed", "u8_1w"), ("absmax", "f32_1w")), _quantize_nf4)


@njit(**EXACT_OPTIONS)
def quantize_nf4(W, code, blocksize, packed, absmax):
    """Quantize the flattened weight ``W`` to 4-bit codes, bitsandbytes' CPU rules.

    Blocks of ``blocksize`` consecutive elements (the last may be partial);
    ``absmax[b] = max |W[block b]|`` (the partial block's clamped to
    float32(1e-38)); a full block is scaled by ``float32(1 / max(absmax,
    1e-38))``, the partial one divided by ``max(absmax, 1e-38)``; clipped to
    [-1, 1]; the code is the number of midpoints ``(code[i] + code[i+1]) / 2``
    strictly below the value (a value on a midpoint takes the lower code).
    Codes go to scratch first and are copied out only when W is finite, so
    a refused call writes nothing.

    Parameters
    ----------
    W : ndarray of float32, shape (n,)
        The row-major flattened weight, contiguous, finite.
    code : ndarray of float32, shape (16,)
        Code values, sorted ascending (:data:`numba_lora.nf4.NF4_CODE`).
    blocksize : int
        32, 64, 128, 256, 512, 1024, 2048 or 4096.
    packed : ndarray of uint8, shape ((n + 1) // 2,)
        Output codes, two per byte (element 2k in the high nibble of byte k;
        an odd n's last low nibble holds the code of 0.0); overwritten.
    absmax : ndarray of float32, shape (ceil(n / blocksize),)
        Output scales; overwritten.

    Returns
    -------
    packed : ndarray of uint8
        The same array as ``packed``.

    Raises
    ------
    LoraNonFiniteError
        If W holds inf or NaN (nothing is written).

    See Also
    --------
    dequantize_nf4 : The weight (or rows of it) back from the codes.
    quantize_absmax : Double quantization of the scales this writes.
    numba_lora.nf4.quantize : The same, returning an :class:`~numba_lora.nf4.NF4Weight`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> from numba_lora.nf4 import NF4_CODE
    >>> W = np.linspace(-1, 1, 12, dtype=np.float32)     # a (3, 4) weight, flattened
    >>> packed, absmax = np.empty(6, np.uint8), np.empty(1, np.float32)
    >>> kernels.quantize_nf4(W, NF4_CODE, 32, packed, absmax)
    array([  1,  19,  70, 138, 205, 239], dtype=uint8)
    >>> absmax
    array([1.], dtype=float32)
    """
    return _quantize_nf4_checked(W, code, blocksize, packed, absmax)


# ---------------------------------------------------------------- dequantize
@njit(**EXACT_OPTIONS)
def _dequantize_row(packed, absmax, code, blocksize, e0, dst):
    """dst[j] = float32(code[q(e0 + j)] * absmax[(e0 + j) // blocksize])."""
    width = dst.shape[0]
    j = 0
    while j < width:
        e = e0 + j
        b = e // blocksize
        stop = min(width, (b + 1) * blocksize - e0)
        scale = absmax[b]
        if e % 2 == 1 and j < stop:  # a low nibble first: step to a byte boundary
            dst[j] = _mul(code[packed[e // 2] & 15], scale)
            j += 1
        k = (e0 + j) // 2
        while j + 1 < stop:
            byte = packed[k]
            dst[j] = _mul(code[byte >> 4], scale)
            dst[j + 1] = _mul(code[byte & 15], scale)
            j += 2
            k += 1
        if j < stop:  # a high nibble left over
            dst[j] = _mul(code[packed[(e0 + j) // 2] >> 4], scale)
            j += 1


@njit(**EXACT_OPTIONS)
def _check_dequantize(packed, absmax, code, blocksize, row0, out):
    _check_code(code)
    _check_blocksize(blocksize)
    rows, in_features = out.shape
    if row0 < 0:
        raise LoraShapeError("row0 must be >= 0")
    if rows > 0 and in_features > 0:
        # Compared by division first, so that a huge row0 cannot overflow the product.
        if row0 > (2 * packed.shape[0]) // in_features - rows:
            raise LoraShapeError("rows row0 .. row0 + out.shape[0] reach past the end of packed")
        end = (row0 + rows) * in_features
        if (end - 1) // blocksize >= absmax.shape[0]:
            raise LoraShapeError("rows row0 .. row0 + out.shape[0] reach past the end of absmax")
    if not out.flags.c_contiguous:
        raise LoraShapeError("out must be C-contiguous")


@njit(**EXACT_OPTIONS)
def _dequantize_nf4_serial(packed, absmax, code, blocksize, row0, out):
    _check_dequantize(packed, absmax, code, blocksize, row0, out)
    in_features = out.shape[1]
    for r in range(out.shape[0]):
        _dequantize_row(packed, absmax, code, blocksize, (row0 + r) * in_features, out[r])
    return out


@njit(parallel=True, **EXACT_OPTIONS)
def _dequantize_nf4(packed, absmax, code, blocksize, row0, out):
    _check_dequantize(packed, absmax, code, blocksize, row0, out)
    rows, in_features = out.shape
    tasks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(tasks):
        for r in range(t * _ROWS_PER_TASK, min(rows, (t + 1) * _ROWS_PER_TASK)):
            _dequantize_row(packed, absmax, code, blocksize, (row0 + r) * in_features, out[r])
    return out


_DEQ_PARAMS = (("packed", "u8_1"), ("absmax", "f32_1"), ("code", "f32_1"), ("blocksize", "int"),
               ("row0", "int"), ("out", "f32_2w"))
_dequantize_nf4_checked = guarded("dequantize_nf4", _DEQ_PARAMS, _dequantize_nf4)
_dequantize_nf4_serial_checked = guarded("dequantize_nf4_serial", _DEQ_PARAMS,
                                         _dequantize_nf4_serial)


@njit(**EXACT_OPTIONS)
def dequantize_nf4(packed, absmax, code, blocksize, row0, out):
    """Rows ``row0 .. row0 + out.shape[0]`` of the dequantized weight, into ``out``.

    ``out[r, j] = float32(code[q] * absmax[e // blocksize])`` for element
    ``e = (row0 + r) * in_features + j`` (``in_features = out.shape[1]``)
    and ``q`` its 4-bit code: bitsandbytes' dequantize, bit for bit.  With
    ``row0 = 0`` and ``out`` of shape (out_features, in_features) it is the
    whole weight; a smaller ``out`` is a tile of rows.

    Parameters
    ----------
    packed : ndarray of uint8, shape ((n + 1) // 2,)
        The codes, two per byte, as :func:`quantize_nf4` writes them.
    absmax : ndarray of float32, shape (ceil(n / blocksize),)
        Scales (for double quantization, restore them with
        :func:`dequantize_absmax` first).
    code : ndarray of float32, shape (16,)
        The code values (:data:`numba_lora.nf4.NF4_CODE`).
    blocksize : int
        32 .. 4096, a power of two.
    row0 : int
        First row of W to dequantize, >= 0.
    out : ndarray of float32, shape (rows, in_features)
        C-contiguous, writable; overwritten.

    Returns
    -------
    out : ndarray of float32
        The same array as ``out``.

    Raises
    ------
    LoraShapeError
        If the rows reach past the end of ``packed`` or ``absmax``.

    See Also
    --------
    dequantize_nf4_serial : The same on the calling thread.
    quantize_nf4 : Writes the codes and scales.
    numba_lora.nf4.dequantize : The whole weight of an :class:`~numba_lora.nf4.NF4Weight`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> from numba_lora.nf4 import NF4_CODE
    >>> W = np.linspace(-1, 1, 12, dtype=np.float32)
    >>> packed, absmax = np.empty(6, np.uint8), np.empty(1, np.float32)
    >>> _ = kernels.quantize_nf4(W, NF4_CODE, 32, packed, absmax)
    >>> out = np.empty((3, 4), np.float32)                 # rows 0..2 of the (3, 4) weight
    >>> _ = kernels.dequantize_nf4(packed, absmax, NF4_CODE, 32, 0, out)
    >>> out[2]
    array([0.44070983, 0.562617  , 0.72295684, 1.        ], dtype=float32)
    >>> row = np.empty((1, 4), np.float32)                 # one row alone: the same bits
    >>> _ = kernels.dequantize_nf4(packed, absmax, NF4_CODE, 32, 2, row)
    >>> bool((row[0] == out[2]).all())
    True
    """
    return _dequantize_nf4_checked(packed, absmax, code, blocksize, row0, out)


@njit(**EXACT_OPTIONS)
def dequantize_nf4_serial(packed, absmax, code, blocksize, row0, out):
    """:func:`dequantize_nf4` on the calling thread only, for a caller's own ``prange`` loop.

    Parameters
    ----------
    packed : ndarray of uint8, shape ((n + 1) // 2,)
        The codes, two per byte.
    absmax : ndarray of float32, shape (ceil(n / blocksize),)
        The scales.
    code : ndarray of float32, shape (16,)
        The code values (:data:`numba_lora.nf4.NF4_CODE`).
    blocksize : int
        32 .. 4096, a power of two.
    row0 : int
        First row of W to dequantize, >= 0.
    out : ndarray of float32, shape (rows, in_features)
        C-contiguous, writable; overwritten.

    Returns
    -------
    out : ndarray of float32
        The same array as ``out``.

    See Also
    --------
    dequantize_nf4 : The same, its rows split over Numba's threads.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> from numba_lora.nf4 import NF4_CODE
    >>> packed = np.array([0x7F, 0x07], np.uint8)          # codes 7 (0.0), 15 (1.0), 0 (-1.0), 7
    >>> absmax = np.array([2.0], np.float32)
    >>> out = np.empty((2, 2), np.float32)
    >>> kernels.dequantize_nf4_serial(packed, absmax, NF4_CODE, 32, 0, out)
    array([[ 0.,  2.],
           [-2.,  0.]], dtype=float32)
    """
    return _dequantize_nf4_serial_checked(packed, absmax, code, blocksize, row0, out)


# ------------------------------------------------------ double quantization
@njit(**EXACT_OPTIONS)
def _dynamic_lut(nested_code, lut):
    if nested_code.shape[0] != 256:
        raise LoraShapeError("nested_code must hold 256 values")
    if lut.shape[0] != LUT_SIZE:
        raise LoraShapeError("lut must have 65536 entries")
    mid = np.empty(255, dtype=np.float32)
    for i in range(255):
        mid[i] = _mul(np.float32(0.5), _add(nested_code[i], nested_code[i + 1]))
    c = 0
    for i in range(LUT_SIZE):
        val = _add(np.float32(-1), _div(_mul(np.float32(2), np.float32(i)),
                                        np.float32(LUT_SIZE - 1)))
        while c < 255 and mid[c] < val:
            c += 1
        lut[i] = c
    return lut


_dynamic_lut_checked = guarded("dynamic_lut", (("nested_code", "f32_1"), ("lut", "u8_1w")),
                               _dynamic_lut)


@njit(**EXACT_OPTIONS)
def dynamic_lut(nested_code, lut):
    """bitsandbytes' table from a normalised value's bin to its 8-bit code.

    bitsandbytes' CPU blockwise 8-bit quantizer does not search the code
    for the nearest value: it cuts [-1, 1] into 65536 bins and looks each
    value's bin up in this table (``lut[i]`` = the first code whose upper
    midpoint is not below the bin's value ``-1 + 2 i / 65535``).

    Parameters
    ----------
    nested_code : ndarray of float32, shape (256,)
        Sorted ascending (:data:`numba_lora.nf4.DYNAMIC_CODE`).
    lut : ndarray of uint8, shape (65536,)
        Overwritten.

    Returns
    -------
    lut : ndarray of uint8
    """
    return _dynamic_lut_checked(nested_code, lut)


@njit(**EXACT_OPTIONS)
def _lut_index(s):
    """The bin of ``s`` in [-1, 1], as bitsandbytes computes it (float32 steps, truncated)."""
    t = _mul(_add(s, np.float32(1)), np.float32(0.5))
    v = _add(_mul(t, np.float32(LUT_SIZE - 1)), np.float32(0.5))
    i = int(v)
    return min(max(i, 0), LUT_SIZE - 1)


@njit(parallel=True, **EXACT_OPTIONS)
def _quantize_absmax_blocks(absmax, offset, lut, absmax_q, nested_absmax):
    n = absmax.shape[0]
    one = np.float32(1)
    for b in prange(nested_absmax.shape[0]):
        start = b * NESTED_BLOCKSIZE
        stop = min(start + NESTED_BLOCKSIZE, n)
        m = np.float32(0)
        for i in range(start, stop):
            a = abs(_sub(absmax[i], offset))
            if a > m:
                m = a
        nested_absmax[b] = m
        if m == 0:
            for i in range(start, stop):
                absmax_q[i] = 0
            continue
        inv = _div(one, m)
        for i in range(start, stop):
            s = _mul(_sub(absmax[i], offset), inv)
            s = min(max(s, -one), one)
            absmax_q[i] = lut[_lut_index(s)]


@njit(**EXACT_OPTIONS)
def _quantize_absmax(absmax, offset, lut, absmax_q, nested_absmax):
    n = absmax.shape[0]
    if lut.shape[0] != LUT_SIZE:
        raise LoraShapeError("lut must have 65536 entries (see dynamic_lut)")
    if absmax_q.shape[0] != n:
        raise LoraShapeError("absmax_q must have as many elements as absmax")
    if nested_absmax.shape[0] != (n + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE:
        raise LoraShapeError("nested_absmax must have ceil(absmax.shape[0] / 256) elements")
    off = np.float32(offset)
    if not _finite32(off):
        raise LoraNonFiniteError("offset must be finite")
    for i in range(n):
        if not _finite32(_sub(absmax[i], off)):
            raise LoraNonFiniteError("absmax - offset must be finite (inf or NaN in absmax?)")
    _quantize_absmax_blocks(absmax, off, lut, absmax_q, nested_absmax)
    return absmax_q


_quantize_absmax_checked = guarded(
    "quantize_absmax", (("absmax", "f32_1"), ("offset", "real"), ("lut", "u8_1"),
                        ("absmax_q", "u8_1w"), ("nested_absmax", "f32_1w")), _quantize_absmax)


@njit(**EXACT_OPTIONS)
def quantize_absmax(absmax, offset, lut, absmax_q, nested_absmax):
    """bitsandbytes' double quantization: ``absmax - offset`` to 8 bits, blocks of 256.

    Per block of 256: ``nested_absmax = max |absmax - offset|``; a block
    whose maximum is 0 gets code 0 throughout; otherwise each value is
    scaled by ``float32(1 / nested_absmax)``, clipped to [-1, 1] and looked
    up in ``lut`` (its bin: ``int(float32((s + 1) * 0.5) * 65535 + 0.5)``,
    each step in float32).  All in float32, ``offset`` rounded to float32
    first.

    Parameters
    ----------
    absmax : ndarray of float32, shape (nblocks,)
        Finite.
    offset : float
        Subtracted first (bitsandbytes: the mean of absmax).
    lut : ndarray of uint8, shape (65536,)
        From :func:`dynamic_lut`.
    absmax_q : ndarray of uint8, shape (nblocks,)
        Overwritten.
    nested_absmax : ndarray of float32, shape (ceil(nblocks / 256),)
        Overwritten.

    Returns
    -------
    absmax_q : ndarray of uint8
        The same array as ``absmax_q``.

    See Also
    --------
    dequantize_absmax : The scales back from the 8-bit codes.
    dynamic_lut : Makes ``lut``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> from numba_lora.kernels.quantize import dynamic_lut
    >>> from numba_lora.nf4 import DYNAMIC_CODE
    >>> lut = dynamic_lut(DYNAMIC_CODE, np.empty(65536, np.uint8))
    >>> absmax = np.array([1, 2, 3, 4], np.float32)
    >>> q, nested = np.empty(4, np.uint8), np.empty(1, np.float32)
    >>> kernels.quantize_absmax(absmax, 2.5, lut, q, nested)
    array([  0,  47, 207, 255], dtype=uint8)
    >>> nested                                             # max |absmax - offset|
    array([1.5], dtype=float32)
    """
    return _quantize_absmax_checked(absmax, offset, lut, absmax_q, nested_absmax)


@njit(**EXACT_OPTIONS)
def _dequantize_absmax(absmax_q, nested_absmax, nested_code, offset, out):
    n = absmax_q.shape[0]
    if nested_code.shape[0] != 256:
        raise LoraShapeError("nested_code must hold 256 values")
    if out.shape[0] != n:
        raise LoraShapeError("out must have as many elements as absmax_q")
    if nested_absmax.shape[0] != (n + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE:
        raise LoraShapeError("nested_absmax must have ceil(absmax_q.shape[0] / 256) elements")
    off = np.float32(offset)
    for i in range(n):
        out[i] = _add(_mul(nested_code[absmax_q[i]], nested_absmax[i // NESTED_BLOCKSIZE]), off)
    return out


_dequantize_absmax_checked = guarded(
    "dequantize_absmax", (("absmax_q", "u8_1"), ("nested_absmax", "f32_1"),
                          ("nested_code", "f32_1"), ("offset", "real"), ("out", "f32_1w")),
    _dequantize_absmax)


@njit(**EXACT_OPTIONS)
def dequantize_absmax(absmax_q, nested_absmax, nested_code, offset, out):
    """The absmax a double-quantized weight stands for, into ``out``.

    ``out[b] = float32(float32(nested_code[absmax_q[b]] * nested_absmax[b //
    256]) + float32(offset))``: bitsandbytes' ``dequantize_blockwise`` then
    ``+ offset``, each rounded to float32.

    Parameters
    ----------
    absmax_q : ndarray of uint8, shape (nblocks,)
        The 8-bit codes of the scales.
    nested_absmax : ndarray of float32, shape (ceil(nblocks / 256),)
        The scale of each block of 256 codes.
    nested_code : ndarray of float32, shape (256,)
        The 8-bit map (:data:`numba_lora.nf4.DYNAMIC_CODE`).
    offset : float
        Added back last (rounded to float32 first).
    out : ndarray of float32, shape (nblocks,)
        Overwritten.

    Returns
    -------
    out : ndarray of float32
        The same array as ``out``.

    See Also
    --------
    quantize_absmax : Writes the 8-bit codes and nested scales.
    dequantize_nf4 : Takes the restored scales.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> from numba_lora.nf4 import DYNAMIC_CODE
    >>> q = np.array([0, 47, 207, 255], np.uint8)
    >>> nested = np.array([1.5], np.float32)
    >>> kernels.dequantize_absmax(q, nested, DYNAMIC_CODE, 2.5, np.empty(4, np.float32))
    array([1.0105469, 2.0019531, 2.9980469, 4.       ], dtype=float32)
    """
    return _dequantize_absmax_checked(absmax_q, nested_absmax, nested_code, offset, out)


# Calls from Python with arguments Numba cannot type (a dict, an object
# array) raise a LoraError naming the kernel, as the exported kernels do.
for _kernel in (quantize_nf4, dequantize_nf4, dequantize_nf4_serial, dynamic_lut, quantize_absmax,
                dequantize_absmax):
    python_errors(_kernel)
del _kernel
