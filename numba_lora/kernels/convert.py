"""Half-precision weights: merge into bfloat16 / float16 bits, and the exact conversions.

NumPy has no bfloat16 and Numba no float16, so both are handled as their
bits, a ``uint16`` array (``W.view(np.uint16)`` of a float16 array).  The
merge widens W to float32 exactly, adds the float32 delta that
:func:`numba_lora.kernels.merge` adds (the same private row kernel, so the
same bits), and rounds the sum once to the stored format, to nearest with
ties to even.  That is PEFT's default ``merge_and_unload()`` for a bfloat16 or
float16 model on a CPU: its LoRA factors are float32 (``autocast_adapter_dtype``)
and ``weight += delta`` computes ``float32(W) + delta`` and rounds it once.

Row blocks go through float32 tiles of ``COL_TILE`` columns, so the only
memory beyond W is a few tiles per thread: no float32 copy of W.

NaN: a NaN stays a quiet NaN of the same sign (bfloat16: the float32's top
16 bits with the quiet bit set; float16: its top payload bits).  torch
itself writes different NaN bits on its scalar and vectorised paths, so NaN
payloads are not part of any bit-identity promise; every other value is.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._config import EXACT_OPTIONS
from ..errors import LoraShapeError
from ._guard import BLOCK_ROWS, guarded
from .lora import COL_TILE, ROW_BLOCK, _check_lora_shapes, _rows_delta, _scratch

__all__ = [
    "merge_bf16",
    "merge_bf16_serial",
    "merge_f16",
    "merge_f16_serial",
    "widen_bf16",
    "round_bf16",
    "widen_f16",
    "round_f16",
]

_BF16, _F16 = 0, 1

# ------------------------------------------------------------ bit casts
@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (an integer; the low 32 bits are used)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, i32)
        elif value.type.width < 32:
            value = builder.zext(value, i32)
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    """The bits of the float32 ``value``, as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


# --------------------------------------------------- scalar conversions
@njit(**EXACT_OPTIONS)
def _bf16_to_bits32(h):
    """float32 bits of bfloat16 bits ``h``: bfloat16 is the top half of a float32."""
    return np.uint32(h) << np.uint32(16)


@njit(**EXACT_OPTIONS)
def _bits32_to_bf16(u):
    """float32 bits ``u`` rounded to bfloat16 bits, to nearest, ties to even."""
    u = np.int64(u)
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep sign and top payload, make it quiet
        return np.uint16((u >> 16) | 0x40)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly
    # when the dropped half is above the midpoint, or at it with an odd
    # kept half; a carry out of the mantissa steps the exponent (to infinity
    # past the largest finite value), which is the correct rounding too.
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(**EXACT_OPTIONS)
def _f16_to_bits32(h):
    """float32 bits of float16 bits ``h`` (exact: every float16 is a float32)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0x1F:  # infinity, NaN (payload kept)
        return np.uint32(sign | 0x7F800000 | (mantissa << 13))
    if exponent != 0:
        return np.uint32(sign | ((exponent + 112) << 23) | (mantissa << 13))
    if mantissa == 0:
        return np.uint32(sign)
    # Subnormal: mantissa * 2**-24, a normal float32; shift the leading bit
    # up to the implicit position.
    e = 113
    while (mantissa & 0x400) == 0:
        mantissa <<= 1
        e -= 1
    return np.uint32(sign | (e << 23) | ((mantissa & 0x3FF) << 13))


@njit(**EXACT_OPTIONS)
def _bits32_to_f16(u):
    """float32 bits ``u`` rounded to float16 bits, to nearest, ties to even."""
    u = np.int64(u)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: quiet, sign and top payload bits kept
        return np.uint16(sign | 0x7E00 | ((a >> 13) & 0x3FF))
    if a >= 0x477FF000:  # 65520 and above (and infinity) round to infinity
        return np.uint16(sign | 0x7C00)
    if a >= 0x38800000:  # normal in float16 (>= 2**-14): 13 bits dropped
        return np.uint16(sign | (((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10)))
    # Subnormal or zero in float16: n = round(value * 2**24), ties to even.
    # A float32 subnormal is below 2**-126 and rounds to 0.
    exponent = a >> 23
    if exponent == 0:
        return np.uint16(sign)
    shift = 126 - exponent  # >= 14
    if shift > 24:
        return np.uint16(sign)
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> shift
    rest = m & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rest > half or (rest == half and (q & 1) == 1):
        q += 1
    return np.uint16(sign | q)  # q == 0x400 is the smallest normal: right as it is


# ------------------------------------------------------------------ merge
@njit(**EXACT_OPTIONS)
def _merge_half_rows(W, A, B, s, r0, r1, fmt):
    """Rows r0..r1-1 of the half-precision bits W: ``W = round(float32(W) + delta)``.

    ``delta = (B @ A) * s`` in float32, each element computed by
    :func:`~numba_lora.kernels.lora._rows_delta` and added exactly as
    ``kernels.merge`` adds it, then rounded once to the format.
    """
    in_features = W.shape[1]
    acc, part = _scratch(A)
    for i0 in range(r0, r1, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, r1 - i0)
        for j0 in range(0, in_features, COL_TILE):
            width = min(COL_TILE, in_features - j0)
            _rows_delta(A, B, i0, rows, j0, width, acc, part)
            for r in range(rows):
                w = W[i0 + r, j0:j0 + width]
                d = acc[r]
                if fmt == _BF16:
                    for j in range(width):
                        value = _f32_from_bits(_bf16_to_bits32(w[j])) + d[j] * s
                        w[j] = _bits32_to_bf16(_bits_of_f32(value))
                else:
                    for j in range(width):
                        value = _f32_from_bits(_f16_to_bits32(w[j])) + d[j] * s
                        w[j] = _bits32_to_f16(_bits_of_f32(value))


@njit(parallel=True, **EXACT_OPTIONS)
def _merge_half_parallel(W, A, B, s, fmt):
    n = (W.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK
    for ib in prange(n):
        _merge_half_rows(W, A, B, s, ib * ROW_BLOCK, min(W.shape[0], (ib + 1) * ROW_BLOCK), fmt)


@njit(**EXACT_OPTIONS)
def _merge_half(W, A, B, scaling, fmt, parallel):
    _check_lora_shapes(W, A, B)
    # Rounded once to float32, as PEFT's float32 delta is scaled.
    s = np.float32(scaling)
    if parallel:
        _merge_half_parallel(W, A, B, s, fmt)
    else:
        _merge_half_rows(W, A, B, s, 0, W.shape[0], fmt)


@njit(**EXACT_OPTIONS)
def _merge_bf16_threads(W, A, B, scaling):
    _merge_half(W, A, B, scaling, _BF16, True)


@njit(**EXACT_OPTIONS)
def _merge_bf16_alone(W, A, B, scaling):
    _merge_half(W, A, B, scaling, _BF16, False)


@njit(**EXACT_OPTIONS)
def _merge_f16_threads(W, A, B, scaling):
    _merge_half(W, A, B, scaling, _F16, True)


@njit(**EXACT_OPTIONS)
def _merge_f16_alone(W, A, B, scaling):
    _merge_half(W, A, B, scaling, _F16, False)


_HALF = (("W", "u16_2w"), ("A", "f32_2"), ("B", "f32_2"), ("scaling", "real"))
_merge_bf16_checked = guarded("merge_bf16", _HALF, _merge_bf16_threads)
_merge_bf16_serial_checked = guarded("merge_bf16_serial", _HALF, _merge_bf16_alone)
_merge_f16_checked = guarded("merge_f16", _HALF, _merge_f16_threads)
_merge_f16_serial_checked = guarded("merge_f16_serial", _HALF, _merge_f16_alone)


@njit(**EXACT_OPTIONS)
def merge_bf16(W, A, B, scaling):
    """In place, bfloat16 ``W = round(float32(W) + scaling * B @ A)``, on Numba's threads.

    The delta is float32 and bit-identical to the one
    :func:`~numba_lora.kernels.merge` adds to a float32 W (same order, the
    scaling rounded once to float32); the sum ``float32(W) + delta`` is
    rounded once to bfloat16, to nearest with ties to even.  This is PEFT's
    default ``merge_and_unload()`` on a bfloat16 model.  Rows are split over
    threads, never an element's sum, so the result is the same bits for
    any thread count.  Memory: a few float32 tiles per thread, no copy of W.

    Parameters
    ----------
    W : ndarray of uint16, shape (out_features, in_features)
        The bfloat16 weight's bits, C-contiguous and writable; updated
        in place.
    A : ndarray of float32, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray of float32, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term; rounded once to float32.

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: W not a writable 2-D uint16 array, A or
        B not 2-D float32 arrays.
    LoraShapeError
        When it runs: shapes that do not fit together, or an array not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge_bf16_serial : The same bits on the calling thread.
    merge_f16 : The same for float16 bits.
    numba_lora.kernels.merge : The float32 and float64 merge.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> W32 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    >>> W = (W32.view(np.uint32) >> 16).astype(np.uint16)    # exact: these are bfloat16 values
    >>> A = np.ones((1, 2), np.float32)
    >>> B = np.full((2, 1), 0.5, np.float32)
    >>> kernels.merge_bf16(W, A, B, 1.0)
    >>> merged = np.empty(4, np.float32)
    >>> kernels.widen_bf16(W.ravel(), merged).tolist()
    [1.5, 2.5, 3.5, 4.5]
    """
    _merge_bf16_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def merge_bf16_serial(W, A, B, scaling):
    """:func:`merge_bf16` on the calling thread only; bit-identical to it.

    For a caller's own ``prange`` loop (one layer per iteration), where the
    threaded kernel would oversubscribe the cores.

    Parameters
    ----------
    W : ndarray of uint16, shape (out_features, in_features)
        The bfloat16 weight's bits, C-contiguous and writable; updated
        in place.
    A : ndarray of float32, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray of float32, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term; rounded once to float32.

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: W not a writable 2-D uint16 array, A or
        B not 2-D float32 arrays.
    LoraShapeError
        When it runs: shapes that do not fit together, or an array not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge_bf16 : The same on Numba's threads.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> W32 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    >>> W = (W32.view(np.uint32) >> 16).astype(np.uint16)    # exact: these are bfloat16 values
    >>> A = np.ones((1, 2), np.float32)
    >>> B = np.full((2, 1), 0.5, np.float32)
    >>> kernels.merge_bf16_serial(W, A, B, 1.0)
    >>> merged = np.empty(4, np.float32)
    >>> kernels.widen_bf16(W.ravel(), merged).tolist()
    [1.5, 2.5, 3.5, 4.5]
    """
    _merge_bf16_serial_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def merge_f16(W, A, B, scaling):
    """:func:`merge_bf16` for float16: ``W`` holds float16 bits (``W16.view(np.uint16)``).

    ``float32(W) + delta`` is rounded once to float16, to nearest with ties
    to even (overflow to infinity, gradual underflow), as NumPy's and
    torch's conversions round.

    Parameters
    ----------
    W : ndarray of uint16, shape (out_features, in_features)
        The float16 weight's bits (``W16.view(np.uint16)``), C-contiguous and writable; updated
        in place.
    A : ndarray of float32, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray of float32, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term; rounded once to float32.

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: W not a writable 2-D uint16 array, A or
        B not 2-D float32 arrays.
    LoraShapeError
        When it runs: shapes that do not fit together, or an array not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge_f16_serial : The same bits on the calling thread.
    merge_bf16 : The same for bfloat16 bits.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> W16 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float16)
    >>> A = np.ones((1, 2), np.float32)
    >>> B = np.full((2, 1), 0.5, np.float32)
    >>> kernels.merge_f16(W16.view(np.uint16), A, B, 1.0)
    >>> W16.tolist()
    [[1.5, 2.5], [3.5, 4.5]]
    """
    _merge_f16_checked(W, A, B, scaling)


@njit(**EXACT_OPTIONS)
def merge_f16_serial(W, A, B, scaling):
    """:func:`merge_f16` on the calling thread only; bit-identical to it.

    For a caller's own ``prange`` loop, as :func:`merge_bf16_serial`.

    Parameters
    ----------
    W : ndarray of uint16, shape (out_features, in_features)
        The float16 weight's bits (``W16.view(np.uint16)``), C-contiguous and writable; updated
        in place.
    A : ndarray of float32, shape (rank, in_features)
        LoRA down-projection, C-contiguous.
    B : ndarray of float32, shape (out_features, rank)
        LoRA up-projection, C-contiguous.
    scaling : float
        Multiplier of the low-rank term; rounded once to float32.

    Returns
    -------
    None
        W is updated in place.

    Raises
    ------
    LoraTypeError, LoraDtypeError, LoraShapeError
        When the call is compiled: W not a writable 2-D uint16 array, A or
        B not 2-D float32 arrays.
    LoraShapeError
        When it runs: shapes that do not fit together, or an array not
        C-contiguous.  Nothing has been written then.

    See Also
    --------
    merge_f16 : The same on Numba's threads.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> W16 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float16)
    >>> A = np.ones((1, 2), np.float32)
    >>> B = np.full((2, 1), 0.5, np.float32)
    >>> kernels.merge_f16_serial(W16.view(np.uint16), A, B, 1.0)
    >>> W16.tolist()
    [[1.5, 2.5], [3.5, 4.5]]
    """
    _merge_f16_serial_checked(W, A, B, scaling)


# ------------------------------------------------------ array conversions
@njit(**EXACT_OPTIONS)
def _widen_bf16(bits, out):
    if bits.shape[0] != out.shape[0]:
        raise LoraShapeError("bits and out must have the same length")
    for j in range(bits.shape[0]):
        out[j] = _f32_from_bits(_bf16_to_bits32(bits[j]))
    return out


@njit(**EXACT_OPTIONS)
def _round_bf16(x, out):
    if x.shape[0] != out.shape[0]:
        raise LoraShapeError("x and out must have the same length")
    for j in range(x.shape[0]):
        out[j] = _bits32_to_bf16(_bits_of_f32(x[j]))
    return out


@njit(**EXACT_OPTIONS)
def _widen_f16(bits, out):
    if bits.shape[0] != out.shape[0]:
        raise LoraShapeError("bits and out must have the same length")
    for j in range(bits.shape[0]):
        out[j] = _f32_from_bits(_f16_to_bits32(bits[j]))
    return out


@njit(**EXACT_OPTIONS)
def _round_f16(x, out):
    if x.shape[0] != out.shape[0]:
        raise LoraShapeError("x and out must have the same length")
    for j in range(x.shape[0]):
        out[j] = _bits32_to_f16(_bits_of_f32(x[j]))
    return out


_WIDEN = (("bits", "u16_1"), ("out", "f32_1w"))
_ROUND = (("x", "f32_1"), ("out", "u16_1w"))
_widen_bf16_checked = guarded("widen_bf16", _WIDEN, _widen_bf16)
_round_bf16_checked = guarded("round_bf16", _ROUND, _round_bf16)
_widen_f16_checked = guarded("widen_f16", _WIDEN, _widen_f16)
_round_f16_checked = guarded("round_f16", _ROUND, _round_f16)


@njit(**EXACT_OPTIONS)
def widen_bf16(bits, out):
    """Convert bfloat16 bits to float32, exactly.

    A bfloat16 is the top half of a float32, so every value (NaN payloads
    included) widens without rounding.

    Parameters
    ----------
    bits : ndarray of uint16, shape (n,)
        The bfloat16 values as their bits (the top 16 bits of a float32).
    out : ndarray of float32, shape (n,)
        Writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (n,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError
        When the call is compiled: ``bits`` not a 1-D uint16 array, or
        ``out`` not a writable 1-D float32 array.
    LoraShapeError
        If the lengths differ.

    See Also
    --------
    round_bf16 : The other way, rounded.
    widen_f16 : The same for float16 bits.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> bits = np.array([0x3F80, 0xC040], np.uint16)        # 1.0 and -3.0
    >>> kernels.widen_bf16(bits, np.empty(2, np.float32)).tolist()
    [1.0, -3.0]
    """
    return _widen_bf16_checked(bits, out)


@njit(**EXACT_OPTIONS)
def round_bf16(x, out):
    """Round float32 to bfloat16 bits, to nearest, ties to even.

    Values past bfloat16's largest finite value round to infinity; a NaN
    stays a quiet NaN of the same sign.

    Parameters
    ----------
    x : ndarray of float32, shape (n,)
        Values to round.
    out : ndarray of uint16, shape (n,)
        Writable; overwritten with the bfloat16 bits.

    Returns
    -------
    out : ndarray of uint16, shape (n,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError
        When the call is compiled: ``x`` not a 1-D float32 array, or
        ``out`` not a writable 1-D uint16 array.
    LoraShapeError
        If the lengths differ.

    See Also
    --------
    widen_bf16 : The other way, exactly.
    round_f16 : The same for float16.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8], np.float32)   # two ties
    >>> bits = kernels.round_bf16(x, np.empty(3, np.uint16))
    >>> kernels.widen_bf16(bits, np.empty(3, np.float32)).tolist()
    [1.0, 1.0, 1.015625]
    """
    return _round_bf16_checked(x, out)


@njit(**EXACT_OPTIONS)
def widen_f16(bits, out):
    """Convert float16 bits to float32, exactly.

    The bits are ``x.view(np.uint16)`` of a float16 array; subnormals,
    infinities and NaN payloads are kept.

    Parameters
    ----------
    bits : ndarray of uint16, shape (n,)
        The float16 values as their bits.
    out : ndarray of float32, shape (n,)
        Writable; overwritten.

    Returns
    -------
    out : ndarray of float32, shape (n,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError
        When the call is compiled: ``bits`` not a 1-D uint16 array, or
        ``out`` not a writable 1-D float32 array.
    LoraShapeError
        If the lengths differ.

    See Also
    --------
    round_f16 : The other way, rounded.
    widen_bf16 : The same for bfloat16 bits.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> x16 = np.array([0.5, -2.0, 6e-8], np.float16)
    >>> out = kernels.widen_f16(x16.view(np.uint16), np.empty(3, np.float32))
    >>> bool((out == x16.astype(np.float32)).all())
    True
    """
    return _widen_f16_checked(bits, out)


@njit(**EXACT_OPTIONS)
def round_f16(x, out):
    """Round float32 to float16 bits, to nearest, ties to even (as NumPy's ``astype``).

    Overflow goes to infinity, small values to float16's subnormals or
    zero; a NaN stays a quiet NaN of the same sign.

    Parameters
    ----------
    x : ndarray of float32, shape (n,)
        Values to round.
    out : ndarray of uint16, shape (n,)
        Writable; overwritten with the float16 bits.

    Returns
    -------
    out : ndarray of uint16, shape (n,)
        The same array as ``out``.

    Raises
    ------
    LoraTypeError, LoraDtypeError
        When the call is compiled: ``x`` not a 1-D float32 array, or
        ``out`` not a writable 1-D uint16 array.
    LoraShapeError
        If the lengths differ.

    See Also
    --------
    widen_f16 : The other way, exactly.
    round_bf16 : The same for bfloat16.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import kernels
    >>> x = np.array([0.1, 3.0, 1e-6], np.float32)
    >>> bits = kernels.round_f16(x, np.empty(3, np.uint16))
    >>> bool((bits == x.astype(np.float16).view(np.uint16)).all())
    True
    """
    return _round_f16_checked(x, out)
