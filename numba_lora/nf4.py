"""NF4 (4-bit NormalFloat) weights, stored and rounded exactly as bitsandbytes does on a CPU.

A weight of shape (out_features, in_features) is stored as 4-bit codes into
:data:`NF4_CODE` plus one float32 scale per block of ``blocksize`` elements:
4.5 bits per weight at blocksize 64 (0.14x the float32 bytes), about 4.13
with double quantization (0.13x).  :func:`quantize` and :func:`dequantize`
give bit for bit what bitsandbytes 0.50 (``quantize_4bit`` /
``dequantize_4bit`` with ``quant_type="nf4"``) gives on a CPU, checked
against fixtures made with it; :func:`from_bnb_state_dict` and
:func:`load_bnb_safetensors` read a ``bitsandbytes.nn.Linear4bit`` state
dict without torch.

The rules
---------
Let ``n = out_features * in_features`` and ``w`` the row-major flattened
weight, rounded to float32 (float16 is widened exactly; float64 is rounded
to the nearest float32 first, what bitsandbytes' own kernel does with
``.float()``; its public ``quantize_4bit`` refuses float64).

- Blocks are ``blocksize`` consecutive elements of ``w``: they cross rows
  when ``in_features`` is not a multiple of ``blocksize``; the last block
  may be partial.  ``blocksize`` is 32, 64, 128, 256, 512, 1024, 2048 or 4096.
- ``absmax[b] = max |w|`` over the block.  A full block's is stored as it is
  (0 for a block of zeros); the partial last block's is stored clamped to
  ``float32(1e-38)`` (bitsandbytes clamps it before dividing and stores the
  clamped value).
- A full block is scaled by ``r = float32(1 / max(absmax, 1e-38))``, each
  element ``float32(w * r)``; the partial last block is divided:
  ``float32(w / max(absmax, 1e-38))``.  Scaled values are clipped to [-1, 1].
- The code of a scaled value ``s`` is the number of float32 midpoints
  ``float32((NF4_CODE[i] + NF4_CODE[i+1]) / 2)`` strictly below ``s``: the
  nearest code value, and on a midpoint the lower one.
- Element ``2k`` goes to the HIGH nibble of byte ``k``, ``2k + 1`` to the low
  nibble; for odd ``n`` the last low nibble holds the code of 0.0 (7).
- Dequantized: ``float32(NF4_CODE[q] * absmax[b])``.
- inf and NaN are refused (:class:`~numba_lora.LoraNonFiniteError`):
  bitsandbytes stores an inf or NaN absmax for such a block, which then
  dequantizes to NaN throughout (0 * inf).

Double quantization (``double_quant=True``; bitsandbytes'
``compress_statistics=True``):

- ``offset`` = the mean of ``absmax``, a float32;
- ``absmax - offset`` (float32) is quantized to 8 bits in blocks of 256
  with the signed dynamic map :data:`DYNAMIC_CODE`: per block
  ``nested_absmax = max |absmax - offset|``; a block whose maximum is 0
  gets code 0 throughout, otherwise each value is scaled by
  ``float32(1 / nested_absmax)``, clipped to [-1, 1], and its code is read
  from bitsandbytes' 65536-bin table (not the nearest code: see
  :func:`numba_lora.kernels.quantize.dynamic_lut`);
- restored: ``absmax[b] = float32(float32(nested_code[absmax_q[b]] *
  nested_absmax[b // 256]) + offset)``, the formula the forward kernels use.

One difference: bitsandbytes takes ``offset`` from torch's float32
``mean()``, whose summation order depends on the CPU's vector width and
on torch's thread count (it splits sums over 32768 elements between
threads), so the same weight can get offsets one float32 step apart on two
machines; in the fixtures it is one step from the correctly rounded mean.
numba_lora takes the mean in float64, rounded to float32 (the same on
every machine).  Given the same offset everything else is bit-identical
(tested), and a state dict read from bitsandbytes keeps its own offset, so
its dequantized weight is bitsandbytes' bit for bit.

bitsandbytes' native CPU dequantize kernel on AVX-512 machines uses the
absmax of the wrong block when ``in_features`` is a multiple of 16 but not
of ``blocksize``; numba_lora follows bitsandbytes' portable path (what its
kernel does everywhere else), not that bug.
"""

from __future__ import annotations

import json
import os
import numbers
import operator
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validate import as_array, check_flag, checked_weight
from .errors import (LoraConfigError, LoraDtypeError, LoraFormatError, LoraNonFiniteError,
                     LoraShapeError, LoraTypeError, LoraUnsupportedError)
from .kernels import quantize as _k

__all__ = [
    "NF4_CODE",
    "DYNAMIC_CODE",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4Weight",
    "quantize",
    "dequantize",
    "from_bnb_state_dict",
    "load_bnb_safetensors",
    "to_bnb_state_dict",
]

BLOCKSIZES = _k.BLOCKSIZES
NESTED_BLOCKSIZE = _k.NESTED_BLOCKSIZE


def _readonly(array):
    array.flags.writeable = False
    return array


#: The 16 NF4 code values (float32, ascending): bitsandbytes' table.
NF4_CODE = _readonly(np.array([float.fromhex(h) for h in (
    "-0x1.0p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.946540p-2",
    "-0x1.23449ap-2", "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0.0p+0",
    "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c34970p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1.0p+0",
)], dtype=np.float32))


def _linspace32(start, stop, steps):
    """torch.linspace in float32: the first half counted up from ``start``, the rest down from
    ``stop``, ``start + step * i`` computed in float64 and rounded to float32 (what torch's
    vectorised kernel gives with a fused multiply-add; the test checks the whole table
    against bitsandbytes')."""
    start, stop = np.float32(start), np.float32(stop)
    step = np.float64(np.float32((stop - start) / np.float32(steps - 1)))
    i = np.arange(steps)
    up = np.float64(start) + step * i
    down = np.float64(stop) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def _dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), in float32.

    For exponents 10**-6 .. 10**0, the midpoints of ``linspace(0.1, 1, 2**i + 1)``
    scaled by the exponent, with both signs; then 0 and 1; padded with zeros
    to 256 values and sorted.
    """
    values = []
    for i in range(7):
        bounds = _linspace32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values.append(scale * means)
        values.append(-scale * means)
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    data = np.concatenate(values).astype(np.float32)
    data = np.concatenate([data, np.zeros(256 - data.size, dtype=np.float32)])
    return np.sort(data)


#: bitsandbytes' signed dynamic 8-bit map (256 float32 values, ascending): the
#: code of double-quantized absmax.
DYNAMIC_CODE = _readonly(_dynamic_map())

_LUT = None


def _dynamic_lut():
    global _LUT
    if _LUT is None:
        lut = np.empty(_k.LUT_SIZE, dtype=np.uint8)
        _k.dynamic_lut(DYNAMIC_CODE, lut)
        _LUT = _readonly(lut)
    return _LUT


def _nblocks(n, blocksize):
    return -(-n // blocksize)


def check_blocksize(blocksize, what="blocksize"):
    """Return ``blocksize`` as an int if bitsandbytes allows it, else LoraConfigError."""
    if isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, numbers.Integral):
        raise LoraConfigError(f"{what} must be one of {BLOCKSIZES}, got "
                              f"{type(blocksize).__name__} {blocksize!r}")
    value = operator.index(blocksize)
    if value not in BLOCKSIZES:
        raise LoraConfigError(f"{what} must be one of {BLOCKSIZES} (the blocksizes bitsandbytes "
                              f"allows), got {value}")
    return value


def _owned(array, dtype):
    return _readonly(np.array(array, dtype=dtype, order="C", copy=True))


# ----------------------------------------------------------------- container
class NF4Weight:
    """An NF4-quantized weight: 4-bit codes and per-block scales, immutable.

    Made by :func:`quantize`, :func:`from_bnb_state_dict` or directly from
    arrays (each is checked and copied; the copies are read-only).

    Parameters
    ----------
    shape : (int, int)
        (out_features, in_features), both >= 1.
    blocksize : int
        32 .. 4096, a power of two.
    packed : array_like of uint8, shape ((n + 1) // 2,)
        Two codes per byte, element 2k in the high nibble of byte k.
    absmax : array_like of float32, shape (ceil(n / blocksize),), optional
        Per-block scales, finite and >= 0; give either this or the three
        double-quant arrays and ``offset``.
    absmax_q : array_like of uint8, shape (nblocks,), optional
        Double quantization: the 8-bit code of each block's scale.
    nested_absmax : array_like of float32, shape (ceil(nblocks / 256),), optional
        Double quantization: the scale of each block of 256 codes.
    nested_code : array_like of float32, shape (256,), optional
        Double quantization: the 8-bit map; defaults to :data:`DYNAMIC_CODE`.
    offset : float, optional
        Rounded to float32.
    source_dtype : str
        The dtype the weight had before quantization ("float32", "float16",
        "bfloat16"), kept for :func:`to_bnb_state_dict`.

    Attributes
    ----------
    shape, out_features, in_features, size, blocksize, nblocks, double_quant,
    packed, code, absmax (None when double-quantized), absmax_q,
    nested_absmax, nested_code, offset (None unless double-quantized),
    source_dtype, nbytes.
    """

    __slots__ = ("_shape", "_blocksize", "_packed", "_absmax", "_absmax_q", "_nested_absmax",
                 "_nested_code", "_offset", "_source_dtype")

    def __init__(self, shape: tuple[int, int], blocksize: int, packed: ArrayLike,
                 absmax: ArrayLike | None = None, *, absmax_q: ArrayLike | None = None,
                 nested_absmax: ArrayLike | None = None, nested_code: ArrayLike | None = None,
                 offset: float | None = None, source_dtype: str = "float32") -> None:
        shape = _check_shape(shape)
        blocksize = check_blocksize(blocksize)
        n = shape[0] * shape[1]
        nblocks = _nblocks(n, blocksize)
        packed = _checked_array(packed, "packed", np.uint8, ((n + 1) // 2,))
        dq_parts = (absmax_q, nested_absmax, offset)
        if absmax is not None:
            if any(part is not None for part in dq_parts + (nested_code,)):
                raise LoraConfigError("give either absmax or the double-quant state "
                                      "(absmax_q, nested_absmax, offset), not both")
            absmax = _checked_array(absmax, "absmax", np.float32, (nblocks,))
            _check_scales(absmax, "absmax")
        else:
            if any(part is None for part in dq_parts):
                raise LoraConfigError("give absmax, or all of absmax_q, nested_absmax and offset "
                                      "(double quantization)")
            absmax_q = _checked_array(absmax_q, "absmax_q", np.uint8, (nblocks,))
            nested_absmax = _checked_array(nested_absmax, "nested_absmax", np.float32,
                                           (_nblocks(nblocks, NESTED_BLOCKSIZE),))
            _check_scales(nested_absmax, "nested_absmax")
            nested_code = DYNAMIC_CODE if nested_code is None else nested_code
            nested_code = _checked_array(nested_code, "nested_code", np.float32, (256,))
            if not np.isfinite(nested_code).all():
                raise LoraNonFiniteError("nested_code holds inf or NaN")
            offset = _check_offset(offset)
        if source_dtype not in ("float32", "float16", "bfloat16"):
            raise LoraConfigError("source_dtype must be 'float32', 'float16' or 'bfloat16', "
                                  f"got {source_dtype!r}")
        self._set(shape, blocksize, packed, absmax, absmax_q, nested_absmax, nested_code, offset,
                  source_dtype)

    def _set(self, *values):
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    @classmethod
    def _trusted(cls, shape, blocksize, packed, absmax, absmax_q, nested_absmax, nested_code,
                 offset, source_dtype):
        """From arrays this module made (already checked, owned and read-only)."""
        self = object.__new__(cls)
        self._set(shape, blocksize, packed, absmax, absmax_q, nested_absmax, nested_code, offset,
                  source_dtype)
        return self

    def __setattr__(self, name, value):
        raise LoraTypeError(f"NF4Weight is immutable (cannot set {name!r}); make a new one")

    def __delattr__(self, name):
        raise LoraTypeError(f"NF4Weight is immutable (cannot delete {name!r})")

    def __reduce__(self):
        return (_restore, (self._shape, self._blocksize, self._packed, self._absmax,
                           self._absmax_q, self._nested_absmax, self._nested_code, self._offset,
                           self._source_dtype))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # ---------------------------------------------------------------- facts
    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return self._shape

    @property
    def out_features(self) -> int:
        """Rows of the weight."""
        return self._shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight."""
        return self._shape[1]

    @property
    def size(self) -> int:
        """Number of weights, n."""
        return self._shape[0] * self._shape[1]

    @property
    def blocksize(self) -> int:
        """Elements per scale block."""
        return self._blocksize

    @property
    def nblocks(self) -> int:
        """Number of scale blocks, ceil(n / blocksize)."""
        return _nblocks(self.size, self._blocksize)

    @property
    def double_quant(self) -> bool:
        """Whether the scales are themselves quantized to 8 bits."""
        return self._absmax is None

    @property
    def packed(self) -> NDArray[np.uint8]:
        """uint8 ((n + 1) // 2,), read-only."""
        return self._packed

    @property
    def code(self) -> NDArray[np.float32]:
        """The 16 code values, :data:`NF4_CODE`."""
        return NF4_CODE

    @property
    def absmax(self) -> NDArray[np.float32] | None:
        """float32 (nblocks,), read-only; None when double-quantized."""
        return self._absmax

    @property
    def absmax_q(self) -> NDArray[np.uint8] | None:
        """uint8 (nblocks,), read-only; None unless double-quantized."""
        return self._absmax_q

    @property
    def nested_absmax(self) -> NDArray[np.float32] | None:
        """float32 (ceil(nblocks / 256),), read-only; or None."""
        return self._nested_absmax

    @property
    def nested_code(self) -> NDArray[np.float32] | None:
        """float32 (256,) 8-bit map, read-only; or None."""
        return self._nested_code

    @property
    def offset(self) -> np.float32 | None:
        """float32 scalar, or None."""
        return self._offset

    @property
    def source_dtype(self) -> str:
        """The dtype before quantization: 'float32', 'float16', 'bfloat16'."""
        return self._source_dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the per-weight storage: codes and scales (with double quantization the
        8-bit absmax, the nested absmax and the 4-byte offset).  The shared code tables
        (:data:`NF4_CODE`, 64 bytes; the 1 KiB nested map) are not counted."""
        if self._absmax is not None:
            return self._packed.nbytes + self._absmax.nbytes
        return self._packed.nbytes + self._absmax_q.nbytes + self._nested_absmax.nbytes + 4

    def absmax_float32(self) -> NDArray[np.float32]:
        """The per-block scales as float32 (restored from the 8-bit state when double-quantized).

        Returns
        -------
        ndarray of float32, shape (nblocks,)
            A new, writable array.
        """
        if self._absmax is not None:
            return self._absmax.copy()
        out = np.empty(self.nblocks, dtype=np.float32)
        _k.dequantize_absmax(self._absmax_q, self._nested_absmax, self._nested_code,
                             self._offset, out)
        return out

    def __eq__(self, other):
        if not isinstance(other, NF4Weight):
            return NotImplemented
        mine, theirs = self.__reduce__()[1], other.__reduce__()[1]
        for a, b in zip(mine, theirs):
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                        and a.shape == b.shape and a.tobytes() == b.tobytes()):
                    return False
            elif isinstance(a, np.float32) or isinstance(b, np.float32):
                if a is None or b is None or np.float32(a).tobytes() != np.float32(b).tobytes():
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None

    def __repr__(self):
        dq = ", double_quant=True" if self.double_quant else ""
        return (f"NF4Weight(shape={self._shape}, blocksize={self._blocksize}{dq}, "
                f"nbytes={self.nbytes})")


def _restore(shape, blocksize, packed, absmax, absmax_q, nested_absmax, nested_code, offset,
             source_dtype):
    arrays = [None if a is None else _readonly(np.array(a, copy=True))
              for a in (packed, absmax, absmax_q, nested_absmax, nested_code)]
    packed, absmax, absmax_q, nested_absmax, nested_code = arrays
    return NF4Weight._trusted(tuple(shape), blocksize, packed, absmax, absmax_q, nested_absmax,
                              nested_code, offset, source_dtype)


def _check_shape(shape):
    try:
        dims = tuple(shape)
    except TypeError:
        raise LoraTypeError(f"shape must be (out_features, in_features), got "
                            f"{type(shape).__name__} {shape!r}") from None
    if len(dims) != 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                 and d >= 1 for d in dims):
        raise LoraShapeError(f"shape must be (out_features, in_features) with both >= 1, "
                             f"got {shape!r}")
    return int(dims[0]), int(dims[1])


def _checked_array(value, name, dtype, shape):
    array = as_array(value, name)
    if array.dtype != dtype:
        raise LoraDtypeError(f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if array.shape != shape:
        raise LoraShapeError(f"{name} must have shape {shape}, got {array.shape}")
    return _owned(array, dtype)


def _check_scales(array, name):
    if not np.isfinite(array).all():
        raise LoraNonFiniteError(f"{name} holds inf or NaN")
    if (array < 0).any():
        raise LoraConfigError(f"{name} holds negative values; block scales are >= 0")


def _check_offset(offset):
    if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, numbers.Real):
        if isinstance(offset, np.ndarray) and offset.shape == () and offset.dtype.kind == "f":
            offset = offset[()]
        else:
            raise LoraTypeError(f"offset must be a real number, got {type(offset).__name__} "
                                f"{offset!r}")
    value = np.float32(offset)
    if not np.isfinite(value):
        raise LoraNonFiniteError(f"offset must be finite in float32, got {offset!r}")
    return value


# --------------------------------------------------------- quantize / dequantize
def quantize(weight: ArrayLike, blocksize: int = 64, *, double_quant: bool = False) -> NF4Weight:
    """Quantize a float weight to NF4, bit for bit as bitsandbytes does on a CPU.

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features)
        float16, float32 or float64, finite.  float64 is rounded to float32 first.
    blocksize : int, default 64
        32, 64, 128, 256, 512, 1024, 2048 or 4096.
    double_quant : bool, default False
        Also quantize the absmax to 8 bits (bitsandbytes' ``compress_statistics``).

    Returns
    -------
    NF4Weight
        The codes and scales, immutable; :func:`dequantize` gives the weight back.

    Raises
    ------
    LoraShapeError, LoraDtypeError
        If ``weight`` is not a non-empty 2-D float array.
    LoraConfigError
        If ``blocksize`` is not one of the above.
    LoraNonFiniteError
        If ``weight`` holds inf or NaN (or float64 values beyond float32's range).
    """
    blocksize = check_blocksize(blocksize)
    double_quant = check_flag(double_quant, "double_quant")
    array, _ = checked_weight(weight)
    source = "float16" if array.dtype == np.float16 else "float32"
    if array.dtype == np.float64:
        big = np.abs(array).max()
        if np.isfinite(big) and big > np.finfo(np.float32).max:
            raise LoraNonFiniteError(
                f"weight holds float64 values up to {big:.4g}, beyond float32's range "
                f"({np.finfo(np.float32).max:.4g}); NF4 scales are float32")
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    n = flat.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(_nblocks(n, blocksize), dtype=np.float32)
    _k.quantize_nf4(flat, NF4_CODE, blocksize, packed, absmax)
    shape = (int(array.shape[0]), int(array.shape[1]))
    if not double_quant:
        return NF4Weight._trusted(shape, blocksize, _readonly(packed), _readonly(absmax),
                                  None, None, None, None, source)
    offset = np.float32(np.sum(absmax, dtype=np.float64) / absmax.size)
    absmax_q, nested_absmax = _quantize_absmax(absmax, offset)
    return NF4Weight._trusted(shape, blocksize, _readonly(packed), None, _readonly(absmax_q),
                              _readonly(nested_absmax), DYNAMIC_CODE, offset, source)


def _quantize_absmax(absmax, offset):
    absmax_q = np.empty(absmax.size, dtype=np.uint8)
    nested_absmax = np.empty(_nblocks(absmax.size, NESTED_BLOCKSIZE), dtype=np.float32)
    _k.quantize_absmax(absmax, offset, _dynamic_lut(), absmax_q, nested_absmax)
    return absmax_q, nested_absmax


def dequantize(q: NF4Weight, *, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """The float32 weight an :class:`NF4Weight` stands for: ``NF4_CODE[q] * absmax``.

    Parameters
    ----------
    q : NF4Weight
        The quantized weight.
    out : ndarray of float32, shape (out_features, in_features), optional
        C-contiguous, writable; overwritten.

    Returns
    -------
    ndarray of float32, shape (out_features, in_features)
        ``out`` when given, else a new array.
    """
    if not isinstance(q, NF4Weight):
        raise LoraTypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray):
            raise LoraTypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise LoraDtypeError(f"out must be float32, got {out.dtype}")
        if out.shape != q.shape:
            raise LoraShapeError(f"out must have shape {q.shape}, got {out.shape}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise LoraShapeError("out must be C-contiguous and writable")
    _k.dequantize_nf4(q.packed, q.absmax_float32() if q.double_quant else q.absmax, NF4_CODE,
                      q.blocksize, 0, out)
    return out


# ------------------------------------------------------------ bitsandbytes files
_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
_NESTED_JSON_KEYS = {"nested_blocksize", "nested_dtype", "nested_offset"}


def _fmt(where, message):
    return LoraFormatError(f"{where}: {message}")


def _parse_quant_state(raw, where):
    array = as_array(raw, _STATE_KEY)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise _fmt(where, f"{_STATE_KEY!r} must be a 1-D uint8 tensor holding JSON, got "
                          f"dtype {array.dtype} with shape {array.shape}")
    try:
        state = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fmt(where, f"{_STATE_KEY!r} does not hold UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise _fmt(where, f"{_STATE_KEY!r} holds a JSON {type(state).__name__}, not an object")
    unknown = set(state) - _JSON_KEYS - _NESTED_JSON_KEYS
    missing = _JSON_KEYS - set(state)
    if unknown or missing:
        raise _fmt(where, f"{_STATE_KEY!r} has keys {sorted(state)}; expected {sorted(_JSON_KEYS)}"
                          f" (and with double quantization {sorted(_NESTED_JSON_KEYS)})")
    if state["quant_type"] != "nf4":
        raise LoraUnsupportedError(f"{where}: quant_type {state['quant_type']!r}; only 'nf4' is "
                                   "supported")
    blocksize = state["blocksize"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise _fmt(where, f"blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    if state["dtype"] not in ("float32", "float16", "bfloat16"):
        raise _fmt(where, f"dtype {state['dtype']!r}; expected 'float32', 'float16' or 'bfloat16'")
    shape = state["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise _fmt(where, f"shape {shape!r}; expected [out_features, in_features], both >= 1")
    nested = _NESTED_JSON_KEYS & set(state)
    if nested and nested != _NESTED_JSON_KEYS:
        raise _fmt(where, f"has {sorted(nested)} but not all of {sorted(_NESTED_JSON_KEYS)}")
    if nested:
        if state["nested_blocksize"] != NESTED_BLOCKSIZE or isinstance(state["nested_blocksize"],
                                                                        bool):
            raise _fmt(where, f"nested_blocksize {state['nested_blocksize']!r}; bitsandbytes "
                              f"uses {NESTED_BLOCKSIZE}")
        if state["nested_dtype"] != "float32":
            raise _fmt(where, f"nested_dtype {state['nested_dtype']!r}; expected 'float32'")
        offset = state["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) \
                or not abs(offset) <= float(np.finfo(np.float32).max):
            raise _fmt(where, f"nested_offset {offset!r} is not a finite number")
    return state


def _tensor(tensors, key, where):
    if key not in tensors:
        raise _fmt(where, f"has no tensor {key!r}")
    return as_array(tensors[key], key)


def _expect(array, key, dtype, shape, where):
    if array.dtype != dtype:
        raise _fmt(where, f"tensor {key!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.shape not in shape:
        raise _fmt(where, f"tensor {key!r} has shape {array.shape}, expected "
                          f"{' or '.join(map(str, shape))}")
    return array.reshape(-1)


def from_bnb_state_dict(tensors: Mapping[str, ArrayLike], prefix: str = "", *,
                        where: str = "state dict") -> NF4Weight:
    """An :class:`NF4Weight` from a ``bitsandbytes.nn.Linear4bit`` state dict (no torch needed).

    Parameters
    ----------
    tensors : Mapping[str, array_like]
        Holds ``{prefix}weight`` (uint8 packed codes, shape ((n + 1) // 2, 1)),
        ``{prefix}weight.absmax``, ``{prefix}weight.quant_map`` and
        ``{prefix}weight.quant_state.bitsandbytes__nf4`` (uint8 bytes of JSON:
        quant_type, blocksize, dtype, shape, and with double quantization
        nested_blocksize, nested_dtype, nested_offset), plus
        ``{prefix}weight.nested_absmax`` and ``{prefix}weight.nested_quant_map``
        with double quantization.  Other keys are ignored.  NumPy arrays, or
        anything ``numpy.asarray`` reads (CPU torch tensors).
    prefix : str
        Prepended to every key (``"model.layers.0.mlp.down_proj."``).
    where : str
        Names the source in error messages.

    Returns
    -------
    NF4Weight
        The weight the state dict holds, with its own scales (and offset).

    Raises
    ------
    LoraFormatError
        On a missing tensor, a wrong dtype or length, JSON that is not what
        bitsandbytes writes, a quant_map that is not NF4's, non-finite scales.
    LoraUnsupportedError
        For FP4 (``quant_type="fp4"``).
    """
    if not isinstance(tensors, Mapping):
        raise LoraTypeError(f"tensors must be a mapping of names to arrays, got "
                            f"{type(tensors).__name__}")
    if not isinstance(prefix, str):
        raise LoraTypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if f"{prefix}weight.quant_state.bitsandbytes__fp4" in tensors:
        raise LoraUnsupportedError(f"{where}: {prefix}weight is FP4-quantized; only NF4 is "
                                   "supported")
    state = _parse_quant_state(_tensor(tensors, prefix + _STATE_KEY, where), where)
    out_features, in_features = state["shape"]
    n = out_features * in_features
    blocksize = state["blocksize"]
    nblocks = _nblocks(n, blocksize)
    key = prefix + "weight"
    packed = _expect(_tensor(tensors, key, where), key, np.uint8,
                     [((n + 1) // 2, 1), ((n + 1) // 2,)], where)
    key = prefix + "weight.quant_map"
    quant_map = _expect(_tensor(tensors, key, where), key, np.float32, [(16,)], where)
    if quant_map.tobytes() != NF4_CODE.tobytes():
        raise _fmt(where, f"tensor {key!r} is not the NF4 code table (bitsandbytes ignores it "
                          "and dequantizes with its own table, so the file is inconsistent)")
    dq = "nested_offset" in state
    key = prefix + "weight.absmax"
    absmax = _expect(_tensor(tensors, key, where), key, np.uint8 if dq else np.float32,
                     [(nblocks,)], where)
    try:
        if not dq:
            for key in ("weight.nested_absmax", "weight.nested_quant_map"):
                if prefix + key in tensors:
                    raise _fmt(where, f"has {prefix + key!r} but its quant state has no "
                                      "nested_offset (double quantization is half there)")
            return NF4Weight(state["shape"], blocksize, packed, absmax,
                             source_dtype=state["dtype"])
        key = prefix + "weight.nested_absmax"
        nested_absmax = _expect(_tensor(tensors, key, where), key, np.float32,
                                [(_nblocks(nblocks, NESTED_BLOCKSIZE),)], where)
        key = prefix + "weight.nested_quant_map"
        nested_code = _expect(_tensor(tensors, key, where), key, np.float32, [(256,)], where)
        return NF4Weight(state["shape"], blocksize, packed, absmax_q=absmax,
                         nested_absmax=nested_absmax, nested_code=nested_code,
                         offset=state["nested_offset"], source_dtype=state["dtype"])
    except (LoraNonFiniteError, LoraConfigError) as exc:
        raise _fmt(where, str(exc)) from None


def load_bnb_safetensors(path: str | os.PathLike[str], prefix: str = "") -> NF4Weight:
    """:func:`from_bnb_state_dict` over the tensors of a safetensors file (read with NumPy only).

    Parameters
    ----------
    path : str or os.PathLike
        A file saved from a ``Linear4bit`` state dict (``safetensors.torch.save_file``).
    prefix : str
        Prepended to the key names.

    Returns
    -------
    NF4Weight
        The weight the file holds.
    """
    from .io.safetensors import SafetensorsFile

    if not isinstance(prefix, str):
        raise LoraTypeError(f"prefix must be a str, got {type(prefix).__name__}")
    file = SafetensorsFile(path)
    keys = [k for k in file.keys() if k.startswith(prefix + "weight")]
    return from_bnb_state_dict(file.read_many(keys), prefix, where=str(file.path))


def to_bnb_state_dict(q: NF4Weight, prefix: str = "") -> dict[str, np.ndarray]:
    """The tensors of a ``bitsandbytes.nn.Linear4bit`` state dict for ``q``, as NumPy arrays.

    The keys and layout a ``Linear4bit`` state dict has (``weight`` is
    ``((n + 1) // 2, 1)`` uint8; the quant state is JSON in a uint8 tensor).
    Saved with ``safetensors.numpy.save_file`` and read with
    ``safetensors.torch.load_file``, bitsandbytes 0.50 takes them as it takes
    its own files: ``Params4bit.from_prequantized(tensors["weight"],
    {k[7:]: v for k, v in tensors.items() if k.startswith("weight.")},
    device="cpu", module=layer)`` (what transformers does); its dequantized
    weight is then this module's bit for bit (checked by hand with
    bitsandbytes 0.50.2).  :func:`from_bnb_state_dict` reads them back to an
    equal :class:`NF4Weight`.

    Parameters
    ----------
    q : NF4Weight
        The weight to write out.
    prefix : str
        Prepended to every key (``"model.layers.0.mlp.down_proj."``).

    Returns
    -------
    dict[str, ndarray]
        New arrays, keyed ``{prefix}weight``, ``{prefix}weight.absmax`` and so on.
    """
    if not isinstance(q, NF4Weight):
        raise LoraTypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.source_dtype,
             "shape": list(q.shape)}
    tensors = {prefix + "weight": q.packed.reshape(-1, 1).copy(),
               prefix + "weight.quant_map": NF4_CODE.copy()}
    if q.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(q.offset))
        tensors[prefix + "weight.absmax"] = q.absmax_q.copy()
        tensors[prefix + "weight.nested_absmax"] = q.nested_absmax.copy()
        tensors[prefix + "weight.nested_quant_map"] = q.nested_code.copy()
    else:
        tensors[prefix + "weight.absmax"] = q.absmax.copy()
    tensors[prefix + _STATE_KEY] = np.frombuffer(json.dumps(state).encode("utf-8"),
                                                 dtype=np.uint8).copy()
    return tensors
