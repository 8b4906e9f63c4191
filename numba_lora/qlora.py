"""``QLoraLinear``: LoRA over a frozen 4-bit NF4 base weight (QLoRA), served without dequantizing W.

The class holds state, validation and policy, as :class:`~numba_lora.LoraLinear`
does; the base weight is an immutable :class:`~numba_lora.nf4.NF4Weight`
(bitsandbytes' layout, bit for bit), and every forward is one call into
:mod:`numba_lora.kernels.qlora`, which reads the 4-bit codes directly and
never makes a W-sized float temporary.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import nf4
from ._base import LowRankFactors
from ._lock import RWLock
from ._validate import (as_factor, as_rng, check_alpha, check_flag, check_out, check_rank,
                        check_scaling)
from .errors import LoraConfigError, LoraShapeError, LoraStateError, LoraTypeError, \
    LoraUnsupportedError
from .kernels.qlora import (_forward_batch_nf4_dq_quiet, _forward_batch_nf4_quiet,
                            _forward_nf4_dq_quiet, _forward_nf4_quiet)

if TYPE_CHECKING:
    from .layer import LoraLinear

__all__ = ["QLoraLinear"]

_F32 = np.dtype(np.float32)


class QLoraLinear(LowRankFactors):
    """A linear layer ``y = deq(W) x + scaling * B (A x)`` with ``W`` frozen in 4-bit NF4.

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features)
        Base weight (float16, float32 or float64), quantized on construction
        with :func:`numba_lora.nf4.quantize` (bitsandbytes' rules; float64 is
        rounded to float32 first).  Must be finite.
    rank : int
        Rank of the update, ``1 <= rank <= min(out_features, in_features)``.
    alpha : float
        Finite and > 0; ``scaling = alpha / rank``.
    blocksize : int, optional
        Elements per absmax block: 32, 64 (default), 128, ..., 4096.
    double_quant : bool, optional
        Also quantize the absmax to 8 bits (bitsandbytes' ``compress_statistics``).
    seed : int, numpy.random.Generator or None, optional
        Source of ``lora_a``'s initial values (as :class:`~numba_lora.LoraLinear`).
    use_rslora : bool, optional
        Rank-stabilised scaling, ``alpha / sqrt(rank)``.

    Attributes
    ----------
    quantized : NF4Weight
        The frozen base weight.
    lora_a : ndarray of float32, shape (rank, in_features)
        Read-only view of A; starts Kaiming-uniform on
        ``[-1/sqrt(in_features), 1/sqrt(in_features)]`` (drawn in float64 and
        rounded, so the same seed gives a :class:`~numba_lora.LoraLinear`'s A).
    lora_b : ndarray of float32, shape (out_features, rank)
        Read-only view of B; starts at zero, so a new layer computes ``deq(W) x``.

    See Also
    --------
    numba_lora.LoraLinear : The same layer over a float W (can merge).
    numba_lora.nf4.quantize : The quantization of W.
    numba_lora.kernels.forward_nf4 : The forward kernel.

    Notes
    -----
    Everything is float32: inputs of another real dtype are converted, and
    outputs, A and B are float32.

    There is no in-place merge: rounding ``deq(W) + scaling * B A`` back to
    4 bits throws most of the update away (:meth:`merge` explains and names
    the alternatives).  Serve unmerged, the fast path here, or call
    :meth:`to_lora_linear` for a float32 :class:`~numba_lora.LoraLinear`
    that can merge exactly.

    Threads: as :class:`~numba_lora.LoraLinear`, forwards share the layer,
    state changes (the factor setters, :meth:`enable`, :meth:`disable`)
    take it alone.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora.qlora import QLoraLinear
    >>> W = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    >>> layer = QLoraLinear(W, rank=8, alpha=16.0, seed=0)
    >>> layer(np.ones(128, dtype=np.float32)).shape
    (64,)
    >>> layer.quantized.nbytes / W.nbytes   # 4.5 bits per weight at blocksize 64
    0.140625
    """

    def __init__(self, weight: ArrayLike, rank: int, alpha: float, *, blocksize: int = 64,
                 double_quant: bool = False, seed: int | np.random.Generator | None = None,
                 use_rslora: bool = False) -> None:
        rank = check_rank(rank)
        alpha = check_alpha(alpha)
        blocksize = nf4.check_blocksize(blocksize)
        double_quant = check_flag(double_quant, "double_quant")
        use_rslora = check_flag(use_rslora, "use_rslora")
        shape = np.shape(weight) if isinstance(weight, np.ndarray) else None
        if shape is not None and len(shape) == 2:
            _check_rank_fits(rank, shape)  # before the quantization's cost
        q = nf4.quantize(weight, blocksize, double_quant=double_quant)
        self._setup(q, rank, alpha, seed, use_rslora)

    @classmethod
    def from_quantized(cls, q: nf4.NF4Weight, rank: int, alpha: float, *,
                       seed: int | np.random.Generator | None = None,
                       use_rslora: bool = False) -> QLoraLinear:
        """A layer over an already-quantized weight (shared: it is immutable).

        Parameters
        ----------
        q : NF4Weight
            From :func:`numba_lora.nf4.quantize`, :func:`numba_lora.nf4.from_bnb_state_dict`,
            or built from arrays (packed codes, absmax or the double-quant state).
        rank, alpha, seed, use_rslora
            As for the constructor.
        """
        if not isinstance(q, nf4.NF4Weight):
            raise LoraTypeError(f"q must be an NF4Weight, got {type(q).__name__}")
        rank = check_rank(rank)
        alpha = check_alpha(alpha)
        use_rslora = check_flag(use_rslora, "use_rslora")
        self = object.__new__(cls)
        self._setup(q, rank, alpha, seed, use_rslora)
        return self

    @classmethod
    def from_bnb_state_dict(cls, tensors: Mapping[str, ArrayLike], rank: int, alpha: float, *, prefix: str = "",
                            seed: int | np.random.Generator | None = None,
                            use_rslora: bool = False) -> QLoraLinear:
        """A layer over a ``bitsandbytes.nn.Linear4bit`` state dict, read without torch.

        See :func:`numba_lora.nf4.from_bnb_state_dict` for the keys.
        """
        return cls.from_quantized(nf4.from_bnb_state_dict(tensors, prefix), rank, alpha,
                                  seed=seed, use_rslora=use_rslora)

    @classmethod
    def from_bnb_safetensors(cls, path: str | os.PathLike[str], rank: int, alpha: float, *, prefix: str = "",
                             seed: int | np.random.Generator | None = None,
                             use_rslora: bool = False) -> QLoraLinear:
        """A layer over a ``Linear4bit`` state dict saved in a safetensors file (no torch)."""
        return cls.from_quantized(nf4.load_bnb_safetensors(path, prefix), rank, alpha,
                                  seed=seed, use_rslora=use_rslora)

    def _setup(self, q, rank, alpha, seed, use_rslora):
        _check_rank_fits(rank, q.shape)
        scaling = check_scaling(alpha / (math.sqrt(rank) if use_rslora else rank), _F32)
        rng = as_rng(seed)
        bound = 1.0 / math.sqrt(q.in_features)
        self._q = q
        self._A = rng.uniform(-bound, bound, size=(rank, q.in_features)).astype(np.float32)
        self._B = np.zeros((q.out_features, rank), dtype=np.float32)
        self._rank = rank
        self._alpha = alpha
        self._use_rslora = use_rslora
        self._scaling = scaling
        self._enabled = True
        self._lock = RWLock()

    # ------------------------------------------------------------------ shape
    @property
    def quantized(self) -> nf4.NF4Weight:
        """NF4Weight: The frozen 4-bit base weight."""
        return self._q

    @property
    def in_features(self) -> int:
        """int: Length of an input vector."""
        return self._q.in_features

    @property
    def out_features(self) -> int:
        """int: Length of an output vector."""
        return self._q.out_features

    @property
    def dtype(self) -> np.dtype:
        """numpy.dtype: float32, the dtype of outputs and of A and B."""
        return _F32

    @property
    def blocksize(self) -> int:
        """int: Elements per absmax block of the base weight."""
        return self._q.blocksize

    @property
    def double_quant(self) -> bool:
        """bool: Whether the base weight's absmax is itself 8-bit quantized."""
        return self._q.double_quant

    # ------------------------------------------------------------- parameters
    def set_lora_a(self, a: ArrayLike) -> None:
        """Replace A with a float32 copy of ``a``, shape (rank, in_features).

        Parameters
        ----------
        a : array_like, shape (rank, in_features)
            The new A; real numbers.

        Raises
        ------
        LoraShapeError
            If ``a`` has the wrong shape; the message names the dimension.
        LoraDtypeError
            If ``a`` does not hold real numbers.

        See Also
        --------
        set_lora_b : The same for B.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> layer.set_lora_a(np.ones((1, 64)))
        >>> layer.lora_a.dtype
        dtype('float32')
        """
        new = as_factor(a, "lora_a", (self._rank, self.in_features), ("rank", "in_features"),
                        _F32)
        with self._lock.write():
            self._A = new

    def set_lora_b(self, b: ArrayLike) -> None:
        """Replace B with a float32 copy of ``b``, shape (out_features, rank).

        See :meth:`set_lora_a`.

        Parameters
        ----------
        b : array_like, shape (out_features, rank)
            The new B; real numbers.

        See Also
        --------
        set_lora_a : The same for A (conversion and errors).

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> x = np.ones(64, np.float32)
        >>> layer.set_lora_a(np.ones((1, 64)) / 64)
        >>> layer.set_lora_b(np.ones((4, 1)))
        >>> bool(np.allclose(layer(x), layer.dequantize_weight() @ x + 2.0, atol=1e-4))
        True
        """
        new = as_factor(b, "lora_b", (self.out_features, self._rank), ("out_features", "rank"),
                        _F32)
        with self._lock.write():
            self._B = new

    @property
    def nbytes(self) -> int:
        """int: Bytes the layer holds: the quantized base (:attr:`NF4Weight.nbytes`) plus A and B."""
        return self._q.nbytes + self._A.nbytes + self._B.nbytes

    @property
    def memory_saved_bytes(self) -> int:
        """int: Bytes saved against a float32 base weight: ``4 * out * in - quantized.nbytes``."""
        return 4 * self._q.size - self._q.nbytes

    def dequantize_weight(self) -> NDArray[np.float32]:
        """The base weight as float32, shape (out_features, in_features): a new array.

        Bit for bit what bitsandbytes' dequantize gives (see :mod:`numba_lora.nf4`).

        Returns
        -------
        ndarray of float32, shape (out_features, in_features)
            A new, writable array.

        See Also
        --------
        numba_lora.nf4.dequantize : The same for an :class:`~numba_lora.nf4.NF4Weight`.
        to_lora_linear : A float layer over this weight.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> Wq = layer.dequantize_weight()
        >>> Wq.shape, float(np.abs(Wq - W).max()) < 0.5
        ((4, 64), True)
        """
        return nf4.dequantize(self._q)

    # ------------------------------------------------------------------ state
    @property
    def is_merged(self) -> bool:
        """bool: Always False: a 4-bit base is never merged into (see :meth:`merge`)."""
        return False

    def enable(self) -> None:
        """Let the low-rank update take part in the output again.

        See Also
        --------
        disable : The opposite.
        disable_adapter : Disabled for a ``with`` block.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> layer.disable()
        >>> layer.enable()
        >>> layer.is_enabled
        True
        """
        with self._lock.write():
            self._enabled = True

    def disable(self) -> None:
        """Compute ``deq(W) x`` only.

        See Also
        --------
        enable : The opposite.
        disable_adapter : Disabled for a ``with`` block.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((4, 1))
        >>> layer.disable()
        >>> x = np.ones(64, np.float32)
        >>> bool(np.allclose(layer(x), layer.dequantize_weight() @ x, atol=1e-4))
        True
        """
        with self._lock.write():
            self._enabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[QLoraLinear]:
        """Disable the update for the ``with`` block, as PEFT's ``model.disable_adapter()``.

        On exit, even by an exception, the layer gets back the enabled state
        it had on entry.

        Yields
        ------
        QLoraLinear
            This layer.

        See Also
        --------
        disable, enable : The same state, changed for good.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> with layer.disable_adapter():
        ...     layer.is_enabled
        False
        >>> layer.is_enabled
        True
        """
        was_enabled = self.is_enabled
        self.disable()
        try:
            yield self
        finally:
            if was_enabled:
                self.enable()
            else:
                self.disable()

    def merge(self, *, check_finite: bool = False) -> None:
        """Refused: merging into 4-bit storage rounds the update away.

        ``deq(W) + scaling * B A`` rounded back to NF4 moves each weight to
        one of 16 levels per block; a LoRA update is usually far smaller than
        the step between levels, so requantizing loses about all of it
        (measured with bitsandbytes' rules, 1024 x 1024 at rank 16: the
        merged layer's output error is 1.05-1.15x the size of the update).

        Parameters
        ----------
        check_finite : bool, optional
            Accepted for the same signature as :meth:`LoraLinear.merge
            <numba_lora.LoraLinear.merge>`; the call is refused either way.

        Raises
        ------
        LoraUnsupportedError
            Always; nothing is changed.  Alternatives: serve unmerged (the
            fast path here: the forward reads the 4-bit codes plus A and B),
            or :meth:`to_lora_linear` for a float32 layer with the
            dequantized base and the same A and B, which merges exactly.

        See Also
        --------
        to_lora_linear : A float32 layer that merges exactly.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> from numba_lora import LoraUnsupportedError
        >>> try:
        ...     layer.merge()
        ... except LoraUnsupportedError:
        ...     print("refused")
        refused
        """
        raise LoraUnsupportedError(
            "QLoraLinear cannot merge: rounding deq(W) + scaling * B @ A back to 4-bit NF4 "
            "throws the update away (the merged output's error is about the size of the "
            "update itself). Serve unmerged (the fast path), or call to_lora_linear() for a "
            "float32 LoraLinear with the dequantized base and the same A and B, and merge that."
        )

    def unmerge(self) -> None:
        """Refused: a QLoraLinear is never merged.

        Raises
        ------
        LoraStateError
            Always.

        See Also
        --------
        merge : Refused too.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> from numba_lora import LoraStateError
        >>> try:
        ...     layer.unmerge()
        ... except LoraStateError:
        ...     print("refused")
        refused
        """
        raise LoraStateError("cannot unmerge: a QLoraLinear is never merged")

    def to_lora_linear(self) -> LoraLinear:
        """A float32 :class:`~numba_lora.LoraLinear` with the dequantized base and copies of A, B.

        Same alpha, rank, rsLoRA and enabled state; its forward equals this
        layer's up to float32 rounding, and its :meth:`~numba_lora.LoraLinear.merge`
        is exact (float32 W + delta).  Costs a float32 W (4 bytes per weight).

        Returns
        -------
        LoraLinear
            A new float32 layer, independent of this one.

        See Also
        --------
        dequantize_weight : The base weight alone.
        numba_lora.LoraLinear.merge : What the float layer can do.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> dense = layer.to_lora_linear()
        >>> dense.merge()
        >>> x = np.ones(64, np.float32)
        >>> bool(np.allclose(dense(x), layer(x), atol=1e-4))
        True
        """
        from .layer import LoraLinear

        with self._lock.read():
            A, B, enabled = self._A.copy(), self._B.copy(), self._enabled
        layer = LoraLinear(self.dequantize_weight(), self._rank, self._alpha, seed=0,
                           use_rslora=self._use_rslora)
        layer.set_lora_a(A)
        layer.set_lora_b(B)
        if not enabled:
            layer.disable()
        return layer

    # ---------------------------------------------------------------- forward
    def _held(self):
        """The float arrays a forward reads (for the overlap check of ``out``)."""
        return (self._A, self._B)

    def _run(self, plain, double_quant, x, out):
        """Run ``plain`` or ``double_quant``, the kernel for this layer's storage; return ``out``."""
        scaling = self._scaling if self._enabled else 0.0
        kernel = double_quant if self._q.double_quant else plain
        kernel(*self._kernel_args(), self._A, self._B, scaling, x, out)
        return out

    def _kernel_args(self):
        """Storage arguments for the kernels (before A, B, scaling)."""
        q = self._q
        if q.double_quant:
            return (q.packed, q.absmax_q, q.nested_absmax, q.nested_code, q.offset, q.blocksize)
        return (q.packed, q.absmax, nf4.NF4_CODE, q.blocksize)

    def forward(self, x: ArrayLike, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Apply the layer to one vector.

        Parameters
        ----------
        x : array_like, shape (in_features,)
            Input; real input of another dtype is converted to float32.
        out : ndarray of float32, shape (out_features,), optional
            Where to write the result (C-contiguous, not overlapping x).

        Returns
        -------
        ndarray of float32, shape (out_features,)
            ``out`` when given, else a new array.

        See Also
        --------
        forward_batch : Rows of a batch.
        numba_lora.kernels.forward_nf4 : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> x = np.ones(64, np.float32)
        >>> bool(np.allclose(layer.forward(x), layer.dequantize_weight() @ x, atol=1e-4))
        True
        """
        # LoraLinear.forward's lean path: decoding calls this right after the
        # previous layer's product emptied the caches.  The usual input (a
        # C-contiguous float32 vector) skips the conversion helpers.
        given = x
        x, lean = self._forward_input(x, "x", False)
        lock = self._lock
        lock.acquire_read()
        try:
            out = self._output((self._B.shape[0],), out, (given, x), lean)
            return self._run(_forward_nf4_quiet, _forward_nf4_dq_quiet, x, out)
        finally:
            lock.release_read()

    def forward_batch(self, X: ArrayLike,
                      out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Apply the layer to each row of a batch.

        Parameters
        ----------
        X : array_like, shape (batch, in_features)
            Input rows; ``batch`` may be 0.
        out : ndarray of float32, shape (batch, out_features), optional
            Where to write the result (C-contiguous, not overlapping X).

        Returns
        -------
        ndarray of float32, shape (batch, out_features)
            ``out`` when given, else a new array.

        See Also
        --------
        forward : One vector.
        numba_lora.kernels.forward_batch_nf4 : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> X = np.ones((3, 64), np.float32)
        >>> layer.forward_batch(X).shape
        (3, 4)
        """
        given = X
        X, lean = self._forward_input(X, "X", True)
        lock = self._lock
        lock.acquire_read()
        try:
            out = self._output((X.shape[0], self._B.shape[0]), out, (given, X), lean)
            return self._run(_forward_batch_nf4_quiet, _forward_batch_nf4_dq_quiet, X, out)
        finally:
            lock.release_read()

    def __call__(self, x: ArrayLike,
                 out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Apply the layer to ``x`` of shape (..., in_features); returns (..., out_features).

        Parameters
        ----------
        x : array_like, shape (..., in_features)
            Input; real input of another dtype is converted to float32.
        out : ndarray of float32, shape (..., out_features), optional
            Where to write the result (C-contiguous, not overlapping x).

        Returns
        -------
        ndarray of float32, shape (..., out_features)
            ``out`` when given, else a new array.

        See Also
        --------
        forward : One vector.
        forward_batch : Rows of a batch.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> layer(np.ones((2, 5, 64))).shape
        (2, 5, 4)
        """
        given = x
        x = self._as_input(x, "x")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise LoraShapeError(
                f"x must have shape (..., in_features={self.in_features}), got {x.shape}")
        lead = x.shape[:-1]
        if out is not None:
            check_out(out, lead + (self.out_features,), _F32, (given, x))
        if x.ndim == 1:
            return self.forward(x, out=out)
        flat_out = None if out is None else out.reshape(-1, self.out_features)
        result = self.forward_batch(x.reshape(-1, self.in_features), out=flat_out)
        return out if out is not None else result.reshape(lead + (self.out_features,))

    # ------------------------------------------------------------- utilities
    def copy(self) -> QLoraLinear:
        """An independent copy: its own A, B and lock; the immutable base is shared.

        Returns
        -------
        QLoraLinear
            A new layer, equal to this one; its factors are its own.

        See Also
        --------
        copy.deepcopy : The same.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import QLoraLinear
        >>> W = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> layer = QLoraLinear(W, rank=1, alpha=2.0, seed=0)
        >>> twin = layer.copy()
        >>> twin.quantized is layer.quantized, twin.lora_a is layer.lora_a
        (True, False)
        """
        with self._lock.read():
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
            new._A = self._A.copy()
            new._B = self._B.copy()
        new._lock = RWLock()
        return new

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def __getstate__(self):
        with self._lock.read():
            state = dict(self.__dict__, _A=self._A.copy(), _B=self._B.copy())
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = RWLock()

    def __repr__(self) -> str:
        dq = ", double_quant=True" if self.double_quant else ""
        return (f"{type(self).__name__}(out_features={self.out_features}, "
                f"in_features={self.in_features}, rank={self._rank}, alpha={self._alpha:g}, "
                f"scaling={self._scaling:g}, blocksize={self.blocksize}{dq}, "
                f"enabled={self._enabled})")


def _check_rank_fits(rank, shape):
    limit = min(shape)
    if rank > limit:
        raise LoraConfigError(
            f"rank must be <= min(out_features, in_features) = {limit} for weight of shape "
            f"{tuple(shape)}, got {rank}")
