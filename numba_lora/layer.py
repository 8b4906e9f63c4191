"""``LoraLinear``: a frozen linear layer with a low-rank update.

The class holds state, validation and dtype/shape policy; every piece of
arithmetic is one call into :mod:`numba_lora.kernels`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import kernels
from ._base import FrozenWeight, LowRankFactors, readonly
from .kernels import train as train_kernels
# The kernels the forwards run, as entries that return nothing (see kernels._guard.quiet).
from .kernels.lora import _forward_batch_quiet, _forward_batch_stacked_quiet, _forward_stacked_quiet
from ._lock import RWLock
from ._validate import (
    as_array,
    as_factor,
    as_rng,
    check_flag,
    checked_weight,
    check_alpha,
    check_out,
    check_rank,
    check_scaling,
    stacked_copy,
)
from .errors import (
    LoraConfigError,
    LoraDtypeError,
    LoraNonFiniteError,
    LoraShapeError,
    LoraStateError,
    LoraTypeError,
)
from .training import TrainContext, check_dropout, dropout_mask, keep_scale

__all__ = ["LoraLinear"]

#: Batches of at most this many rows go through kernels.forward_batch_stacked
#: (a gemv over [W; A] per row: OpenBLAS's gemm is slower there); larger ones
#: through kernels.forward_batch (three BLAS products: 1.01-1.02x the dense
#: gemm at 4 and 8 rows, against 1.02-1.05x for one gemm over [W; A]).
STACKED_MAX_ROWS = kernels.lora.PER_ROW_MAX_ROWS

#: Initialisations of the factors (``init=`` of :class:`LoraLinear`).
INITS = ("peft", "gaussian", "pissa")


class LoraLinear(FrozenWeight, LowRankFactors):
    """A linear layer ``y = W x + scaling * B (A x)`` with frozen ``W``.

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features)
        Base weight.  The layer keeps its own C-contiguous copy.  float32 and
        float64 are kept as they are, float16 is widened to float32; other
        dtypes raise :class:`~numba_lora.LoraDtypeError`.
    rank : int
        Rank of the update, ``1 <= rank <= min(out_features, in_features)``.
    alpha : float
        Finite and > 0; ``scaling = alpha / rank``.
    seed : int, numpy.random.Generator or None, optional
        Source of ``lora_a``'s initial values, passed to
        :func:`numpy.random.default_rng`.
    use_rslora : bool, optional
        Rank-stabilised scaling, ``alpha / sqrt(rank)``.
    init : {"peft", "gaussian", "pissa"}, optional
        How the factors start, as PEFT's ``init_lora_weights``:

        - ``"peft"`` (default, PEFT's ``True``): A Kaiming-uniform (below), B zero;
        - ``"gaussian"``: A normal with standard deviation ``1 / rank``, B zero;
        - ``"pissa"``: from the SVD ``W = U S Vh`` (computed in float64):
          ``A = sqrt(S_r / scaling) Vh_r``, ``B = U_r sqrt(S_r / scaling)``
          (top ``rank`` triplets), and the layer's base weight becomes the
          residual ``W - scaling * B @ A`` (rounded once to the dtype), so
          the layer starts computing ``W x`` up to rounding.  A PiSSA layer's
          base is no longer the original W: to use the trained adapter with
          the original base in PEFT, convert it as PEFT's
          ``save_pretrained(path_initial_model_for_weight_conversion=...)``
          does (rank ``2 r``: ``A' = [A; A0]``, ``B' = [B, -B0]``, alpha
          doubled, or times ``sqrt(2)`` with rsLoRA).

        ``seed`` drives the random ones.

    Attributes
    ----------
    weight : ndarray, shape (out_features, in_features)
        Read-only view of the current W (with the update in it while merged).
    lora_a : ndarray, shape (rank, in_features)
        Read-only view of A.  Starts Kaiming-uniform (``a = sqrt(5)``), i.e.
        uniform on ``[-1/sqrt(in_features), 1/sqrt(in_features)]``.
    lora_b : ndarray, shape (out_features, rank)
        Read-only view of B.  Starts at zero, so a new layer computes ``W x``.

    See Also
    --------
    numba_lora.QLoraLinear : The same layer over an NF4-quantized W.
    numba_lora.MultiLoraLinear : One W shared by several adapters.
    numba_lora.LoraAdapter : Named layers under one configuration (PEFT files).

    Notes
    -----
    While disabled the layer computes ``W_base x`` in every state.  While
    merged and disabled it computes ``W_merged x - scaling * B (A x)``, which
    equals ``W_base x`` up to rounding, without touching W.

    Threads: any number of threads may call the forwards of one layer at
    once (they run side by side, without the GIL, and give the same bits as
    serial calls).  State changes (:meth:`merge`, :meth:`unmerge`, the
    factor setters, :meth:`enable`, :meth:`disable`) take the layer alone:
    they wait for running forwards to finish and hold new ones back until
    they are done, so no forward sees a half-merged W and two merges cannot
    both apply.  Copies and unpickled layers have their own lock.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import LoraLinear
    >>> layer = LoraLinear(np.eye(4, dtype=np.float32), rank=2, alpha=4.0, seed=0)
    >>> layer(np.ones(4, dtype=np.float32))
    array([1., 1., 1., 1.], dtype=float32)
    >>> layer.trainable_params, layer.total_params
    (16, 32)
    """

    def __init__(self, weight: ArrayLike, rank: int, alpha: float, *,
                 seed: int | np.random.Generator | None = None, use_rslora: bool = False,
                 init: str = "peft") -> None:
        rank = check_rank(rank)
        if not (isinstance(init, str) and init in INITS):
            raise LoraConfigError(f"init must be one of {INITS}, got {init!r}")
        alpha = check_alpha(alpha)
        checked = checked_weight(weight)
        out_features, in_features = checked[0].shape
        if rank > min(out_features, in_features):
            raise LoraConfigError(
                f"rank must be <= min(out_features, in_features) = "
                f"{min(out_features, in_features)} for weight of shape "
                f"{(out_features, in_features)}, got {rank}"
            )
        rng = as_rng(seed)
        # W and A are row blocks of one C-contiguous buffer, so that one
        # matrix-vector product over [W; A] reads both in a single pass
        # (kernels.forward_stacked); self._W and self._A are views of it.
        WA = stacked_copy(*checked, extra_rows=rank)
        bound = 1.0 / math.sqrt(in_features)
        use_rslora = check_flag(use_rslora, "use_rslora")
        scaling = check_scaling(alpha / (math.sqrt(rank) if use_rslora else rank), WA.dtype)
        # Drawn in float64 and rounded once, so float32 and float64 layers
        # with the same seed start from the same numbers.
        if init == "gaussian":
            WA[out_features:] = rng.normal(0.0, 1.0 / rank, size=(rank, in_features))
        elif init == "peft":
            WA[out_features:] = rng.uniform(-bound, bound, size=(rank, in_features))
        self._set_buffer(WA, out_features)
        self._B = np.zeros((out_features, rank), dtype=WA.dtype)
        if init == "pissa":
            self._pissa_init(rank, scaling)
        self._rank = rank
        self._alpha = alpha
        self._use_rslora = use_rslora
        self._scaling = scaling
        self._merged = False
        self._enabled = True
        self._lock = RWLock()
        self._reset_training_state()

    def _pissa_init(self, rank, scaling):
        W = self._W.astype(np.float64)
        U, S, Vh = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(S[:rank] / scaling)
        self._A[...] = root[:, None] * Vh[:rank]
        self._B[...] = U[:, :rank] * root[None, :]
        # The residual from the rounded factors, so that W_res + s B A is W
        # up to the one rounding of the residual.
        residual = W - scaling * (self._B.astype(np.float64) @ self._A.astype(np.float64))
        self._W[...] = residual

    def _reset_training_state(self):
        # Factor gradients: allocated by the first backward, reused after;
        # zero_grad only marks them stale, so the next backward overwrites
        # them (BLAS beta = 0) instead of a zeroing pass.
        self._grad_A = None
        self._grad_B = None
        self._grads_valid = False
        # Counts changes of A and B, so a backward can refuse a context made
        # before an optimizer step or a setter.
        self._version = 0

    def _set_buffer(self, WA, out_features):
        self._WA = WA
        self._W = WA[:out_features]
        self._A = WA[out_features:]

    # ------------------------------------------------------------- parameters
    def set_lora_a(self, a: ArrayLike) -> None:
        """Replace A with a copy of ``a``, shape (rank, in_features).

        Real input of another dtype is converted to the layer's dtype.  While
        merged, W is updated so that it stays ``W_base + scaling * B @ A_new``
        (up to one rounding per element).

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
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.set_lora_a([[1.0, 0.0, 0.0]])
        >>> layer.lora_a
        array([[1., 0., 0.]])
        """
        new = as_factor(a, "lora_a", (self._rank, self.in_features),
                        ("rank", "in_features"), self.dtype)
        self._replace_factors(new, self._B)

    def set_lora_b(self, b: ArrayLike) -> None:
        """Replace B with a copy of ``b``, shape (out_features, rank).

        See :meth:`set_lora_a` for conversion, errors and the merged case.

        Parameters
        ----------
        b : array_like, shape (out_features, rank)
            The new B; real numbers.

        See Also
        --------
        set_lora_a : The same for A (conversion, errors, the merged case).

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.set_lora_a([[1.0, 0.0, 0.0]])
        >>> layer.set_lora_b([[1.0], [0.0], [0.0]])
        >>> layer([1.0, 0.0, 0.0])                     # W x + 2 * B (A x)
        array([3., 0., 0.])
        """
        new = as_factor(b, "lora_b", (self.out_features, self._rank),
                        ("out_features", "rank"), self.dtype)
        self._replace_factors(self._A, new)

    def _replace_factors(self, A, B):
        # Validation is done; while merged, W must go from W_base + s B_old A_old
        # to W_base + s B_new A_new.  The check computes exactly what the
        # unmerge + merge below will, so a refusal leaves W, A, B untouched,
        # and an accepted change cannot fail half-way.
        with self._lock.write():
            if self._merged:
                bad = kernels.count_nonfinite_remerged(self._W, self._A, self._B, A, B,
                                                       self._scaling)
                if bad:
                    raise LoraNonFiniteError(
                        f"the new factor would leave {bad} of {self._W.size} elements of the "
                        "merged weight NaN or infinite; W, lora_a and lora_b are unchanged"
                    )
                kernels.unmerge(self._W, self._A, self._B, self._scaling)
                kernels.merge(self._W, A, B, self._scaling)
            if A is not self._A:
                self._A[...] = A  # in place: A stays stacked under W
            self._B = B
            self._version += 1

    # ------------------------------------------------------------------ state
    @property
    def is_merged(self) -> bool:
        """bool: Whether the update is currently added into W."""
        return self._merged

    def enable(self) -> None:
        """Let the low-rank update take part in the output again.

        See Also
        --------
        disable : The opposite.
        disable_adapter : Disabled for a ``with`` block.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((3, 1))
        >>> layer.disable()
        >>> layer.enable()
        >>> layer.is_enabled
        True
        """
        with self._lock.write():
            self._enabled = True

    def disable(self) -> None:
        """Compute ``W_base x`` only, whether merged or not.

        See Also
        --------
        enable : The opposite.
        disable_adapter : Disabled for a ``with`` block.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((3, 1))
        >>> layer.disable()
        >>> layer([1.0, 2.0, 3.0])                     # W x alone
        array([1., 2., 3.])
        """
        with self._lock.write():
            self._enabled = False

    def merge(self, *, check_finite: bool = False) -> None:
        """Add the update into W in place: ``W += scaling * B @ A``.

        Afterwards the forward pass is a single dense product.  No W-sized
        temporary is made.  The arithmetic is :func:`numba_lora.kernels.merge`'s:
        a fixed order per element, so the merged W is the same bits whatever
        the thread count, and equals PEFT's ``merge_and_unload()`` in float32.

        Parameters
        ----------
        check_finite : bool, optional
            First compute, without writing, every merged element exactly as
            the merge will (:func:`numba_lora.kernels.count_nonfinite_merged`);
            if any would be NaN or infinite, raise and leave W bit-identical.
            Costs about one more merge's time.

        Raises
        ------
        LoraStateError
            If the layer is already merged.
        LoraNonFiniteError
            With ``check_finite=True``, if the merge would produce NaN or
            infinity.  W is untouched.

        See Also
        --------
        unmerge : Take the update out of W again.
        numba_lora.kernels.merge : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((3, 1))
        >>> x = np.array([1.0, 2.0, 3.0])
        >>> y = layer(x)
        >>> layer.merge()
        >>> layer.is_merged, bool(np.allclose(layer(x), y))
        (True, True)
        """
        with self._lock.write():
            if self._merged:
                raise LoraStateError(
                    "cannot merge: the layer is already merged; call unmerge() first")
            if check_flag(check_finite, "check_finite"):
                self._check_merge_finite()
            kernels.merge(self._W, self._A, self._B, self._scaling)
            self._merged = True

    def _check_merge_finite(self, label="merge"):
        bad = kernels.count_nonfinite_merged(self._W, self._A, self._B, self._scaling)
        if bad:
            raise LoraNonFiniteError(
                f"{label} would leave {bad} of {self._W.size} weight elements NaN or "
                "infinite; W was left unchanged"
            )

    def unmerge(self) -> None:
        """Subtract the update from W in place: ``W -= scaling * B @ A``.

        Subtracts bitwise the delta :meth:`merge` added, so each element ends
        within one rounding of its value before the merge, and repeated
        merge/unmerge cycles do not drift.

        Raises
        ------
        LoraStateError
            If the layer is not merged.

        See Also
        --------
        merge : Add the update into W.
        numba_lora.kernels.unmerge : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((3, 1))
        >>> layer.merge()
        >>> layer.unmerge()
        >>> layer.is_merged, bool(np.allclose(layer.weight, np.eye(3)))
        (False, True)
        """
        with self._lock.write():
            if not self._merged:
                raise LoraStateError("cannot unmerge: the layer is not merged")
            kernels.unmerge(self._W, self._A, self._B, self._scaling)
            self._merged = False

    def _kernel_scaling(self):
        """The scaling the kernels apply on top of the current W."""
        if self._merged:
            return 0.0 if self._enabled else -self._scaling
        return self._scaling if self._enabled else 0.0

    # ---------------------------------------------------------------- forward
    def forward(self, x: ArrayLike, out: NDArray[np.floating] | None = None) -> NDArray[np.floating]:
        """Apply the layer to one vector.

        Parameters
        ----------
        x : array_like, shape (in_features,)
            Input; real input of another dtype is converted to the layer's.
        out : ndarray, shape (out_features,), optional
            Where to write the result (layer dtype, C-contiguous).

        Returns
        -------
        ndarray, shape (out_features,)
            In the layer's dtype.

        See Also
        --------
        forward_batch : Rows of a batch.
        __call__ : Any number of leading dimensions.
        numba_lora.kernels.forward : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer.lora_b = np.ones((3, 1))
        >>> x = np.array([1.0, 2.0, 3.0])
        >>> bool(np.allclose(layer.forward(x), x + 2.0 * layer.lora_b @ (layer.lora_a @ x)))
        True
        """
        # Decoding calls this once per token and layer, right after the
        # previous call streamed a W through the caches, so every line of
        # Python here runs on cold caches (measured: ~3.5 us warm, ~30 us
        # after a 4096 x 4096 product).  The usual input (a C-contiguous 1-D
        # array of the layer's dtype) skips the conversion helpers; anything
        # else takes the general path with its messages.
        given = x
        x, lean = self._forward_input(x, "x", False)
        W, B = self._W, self._B
        lock = self._lock
        lock.acquire_read()
        try:
            out = self._output((W.shape[0],), out, (given, x), lean)
            # One gemv over [W; A] (W x and A x in one pass), then B t added
            # in one serial pass: 1.004-1.018x the dense gemv at 4096 x 4096
            # float32 (docs/performance.rst, "Decoding").
            _forward_stacked_quiet(self._WA, B, self._kernel_scaling(), x, out)
            return out
        finally:
            lock.release_read()

    def forward_batch(self, X: ArrayLike, out: NDArray[np.floating] | None = None) -> NDArray[np.floating]:
        """Apply the layer to each row of a batch.

        Parameters
        ----------
        X : array_like, shape (batch, in_features)
            Input rows; ``batch`` may be 0.
        out : ndarray, shape (batch, out_features), optional
            Where to write the result (layer dtype, C-contiguous).

        Returns
        -------
        ndarray, shape (batch, out_features)
            In the layer's dtype.

        See Also
        --------
        forward : One vector.
        __call__ : Any number of leading dimensions.
        numba_lora.kernels.forward_batch : The kernel.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> X = np.arange(6.0).reshape(2, 3)
        >>> layer.forward_batch(X)                     # B is zero: W x alone
        array([[0., 1., 2.],
               [3., 4., 5.]])
        """
        # The same lean path as forward's for the usual input (a
        # C-contiguous 2-D array of the layer's dtype): decoding a few rows
        # per call runs this Python on caches the last product emptied.
        given = X
        X, lean = self._forward_input(X, "X", True)
        W, B = self._W, self._B
        lock = self._lock
        lock.acquire_read()
        try:
            out = self._output((X.shape[0], W.shape[0]), out, (given, X), lean)
            if X.shape[0] <= STACKED_MAX_ROWS:
                _forward_batch_stacked_quiet(self._WA, B, self._kernel_scaling(), X, out)
            else:
                _forward_batch_quiet(W, self._A, B, self._kernel_scaling(), X, out)
            return out
        finally:
            lock.release_read()

    def __call__(self, x: ArrayLike, out: NDArray[np.floating] | None = None) -> NDArray[np.floating]:
        """Apply the layer to ``x`` of shape (..., in_features).

        Returns shape (..., out_features); see :meth:`forward_batch`.

        Parameters
        ----------
        x : array_like, shape (..., in_features)
            Input; real input of another dtype is converted to the layer's.
        out : ndarray, shape (..., out_features), optional
            Where to write the result (layer dtype, C-contiguous).

        Returns
        -------
        ndarray, shape (..., out_features)
            In the layer's dtype.

        See Also
        --------
        forward : One vector.
        forward_batch : Rows of a batch.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> layer(np.ones((2, 4, 3))).shape
        (2, 4, 3)
        """
        given = x
        x = self._as_input(x, "x")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise LoraShapeError(
                f"x must have shape (..., in_features={self.in_features}), got {x.shape}"
            )
        lead = x.shape[:-1]
        if out is not None:
            # Against the caller's x too: the converted copy may be new memory.
            check_out(out, lead + (self.out_features,), self.dtype, (given, x))
        if x.ndim == 1:
            return self.forward(x, out=out)
        flat_out = None
        if out is not None:
            flat_out = out.reshape(-1, self.out_features)
        result = self.forward_batch(x.reshape(-1, self.in_features), out=flat_out)
        return result.reshape(lead + (self.out_features,))

    def _held(self):
        """The float arrays a forward reads (for the overlap check of ``out``)."""
        return (self._WA, self._B)

    # --------------------------------------------------------------- training
    def forward_train(self, X: ArrayLike, *, dropout: float = 0.0,
                      rng: int | np.random.Generator | None = None,
                      mask: ArrayLike | None = None
                      ) -> tuple[NDArray[np.floating], TrainContext]:
        """Training forward of a batch: the output and what :meth:`backward` needs.

        ``Y = X @ W.T + scaling * (Xl @ A.T) @ B.T`` with ``Xl = X``, or with
        LoRA dropout (PEFT's ``lora_dropout``, on the low-rank branch only)
        ``Xl = X * mask / (1 - p)``, the mask drawn from ``rng``.  The same
        arithmetic as :meth:`forward_batch` plus the (batch, rank) product
        ``H = Xl @ A.T`` kept for the backward
        (:func:`numba_lora.kernels.train.forward_train`).

        Parameters
        ----------
        X : array_like, shape (..., in_features)
            Input rows, e.g. (batch, in_features) or (batch, seq,
            in_features); any number of rows, 0 included.  Real input of
            another dtype is converted to the layer's.  Not copied when it already has the
            layer's dtype and is C-contiguous: do not write into it before
            the backward.
        dropout : float, optional
            Dropout probability ``p`` in ``[0, 1)`` of the LoRA branch's
            input.  ``0`` (the default, and PEFT's eval mode) draws nothing
            and costs nothing.
        rng : int, numpy.random.Generator or None, optional
            Where the dropout mask comes from (:func:`numpy.random.default_rng`
            of it; pass one Generator across steps for a reproducible run).
            The mask keeps each element with probability ``1 - p``
            (``rng.random(X.shape) >= p``).
        mask : array_like of bool, X's shape, optional
            Use this dropout mask (True keeps) instead of drawing one, e.g.
            to replay a mask torch drew; needs ``dropout > 0`` (it gives the
            scale ``1 / (1 - p)``).  Kept elements are multiplied by
            ``dtype(1) / dtype(1 - p)`` rounded once, dropped ones by 0, as
            torch's ``nn.Dropout`` does.

        Returns
        -------
        Y : ndarray, shape (..., out_features)
            The output, in the layer's dtype.
        ctx : TrainContext
            For :meth:`backward` of this layer.

        Raises
        ------
        LoraStateError
            If the layer is merged (training updates A and B, which a merged
            W would no longer match: unmerge first).
        LoraConfigError
            If ``dropout`` is not in ``[0, 1)``, or a ``mask`` comes with
            ``dropout=0``.
        LoraShapeError, LoraDtypeError
            If ``X`` or ``mask`` has the wrong shape, or ``mask`` is not bool.

        See Also
        --------
        backward : The gradients, from this forward's context.
        numba_lora.AdamW : A step over the gradients.
        numba_lora.kernels.train.forward_train : The kernel.

        Notes
        -----
        A disabled layer computes ``Y = X @ W.T``; its backward gives
        ``dX = dY @ W`` and leaves the factor gradients as they are.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> X = np.ones((2, 3))
        >>> Y, ctx = layer.forward_train(X, dropout=0.1, rng=0)
        >>> Y.shape, ctx.batch
        ((2, 3), 2)
        """
        p = check_dropout(dropout)
        given_mask = mask
        X = self._as_input(X, "X")
        if X.ndim == 0 or X.shape[-1] != self.in_features:
            raise LoraShapeError(
                f"X must have shape (..., in_features={self.in_features}), got {X.shape}")
        lead = X.shape[:-1]
        X = X.reshape(-1, self.in_features)  # a view: X is C-contiguous
        batch = X.shape[0]
        mask = None
        keep = 1.0
        XL = X
        if given_mask is not None:
            if p == 0:
                raise LoraConfigError("a dropout mask needs dropout > 0 (for its 1 / (1 - p))")
            given_mask = as_array(given_mask, "mask")
            if given_mask.dtype != np.bool_:
                raise LoraDtypeError(f"mask must be a bool array, got dtype {given_mask.dtype}")
            if given_mask.shape != lead + (self.in_features,):
                raise LoraShapeError(f"mask must have X's shape {lead + (self.in_features,)}, "
                                     f"got {given_mask.shape}")
            given_mask = given_mask.reshape(X.shape)
        if p > 0 and batch > 0 and self._enabled:
            if given_mask is None:
                mask = dropout_mask(as_rng(rng), X.shape, p)
            else:
                mask = np.array(given_mask, order="C", copy=True)
            keep = keep_scale(p, self.dtype)
            XL = np.empty_like(X)
            train_kernels.apply_dropout(X, mask, keep, XL)
        with self._lock.read():
            if self._merged:
                raise LoraStateError(
                    "cannot train a merged layer: its W holds the update that training would "
                    "change; call unmerge() first")
            Y = np.empty((batch, self.out_features), dtype=self.dtype)
            H = np.empty((batch, self._rank), dtype=self.dtype)
            lora = self._enabled
            train_kernels.forward_train(self._W, self._A, self._B,
                                        self._scaling if lora else 0.0, X, XL, Y, H)
            version = self._version
        ctx = TrainContext(self, version, X, XL, H, mask, p, keep, lora, lead)
        return Y.reshape(lead + (self.out_features,)), ctx

    def backward(self, dY: ArrayLike, ctx: TrainContext, *,
                 input_grad: bool = True) -> NDArray[np.floating] | None:
        """Backward of :meth:`forward_train`: accumulate the factor gradients, return dX.

        Adds ``scaling * (dY @ B).T @ Xl`` to :attr:`grad_a` and
        ``scaling * dY.T @ H`` to :attr:`grad_b` (after :meth:`zero_grad`, or
        before the first backward, they are overwritten instead: no zeroing
        pass), and returns
        ``dX = dY @ W + scaling * ((dY @ B) @ A) * mask / (1 - p)``
        (the mask only with dropout).

        Parameters
        ----------
        dY : array_like, shape (..., out_features)
            Gradient of the loss with respect to the forward's output (its
            shape).
        ctx : TrainContext
            What this layer's :meth:`forward_train` returned.
        input_grad : bool, optional
            Compute dX.  ``False`` (the first adapted layer of a network,
            whose input needs no gradient) skips the dense product
            ``dY @ W``, about half the backward's cost, and returns None.

        Returns
        -------
        ndarray, shape (..., in_features), or None
            The shape of the forward's X.

        Raises
        ------
        LoraStateError
            If the layer is merged, or its factors changed since the forward
            (an optimizer step, a setter): ``ctx`` is stale.
        LoraTypeError
            If ``ctx`` is not a TrainContext of this layer.
        LoraShapeError
            If ``dY`` does not have the forward output's shape.

        See Also
        --------
        forward_train : Makes ``ctx``.
        zero_grad : Forget the gradients.
        numba_lora.kernels.train.backward : The kernel.

        Notes
        -----
        The gradients of one layer are written by one backward at a time:
        do not run backwards of the same layer from two threads at once.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> X = np.ones((2, 3))
        >>> Y, ctx = layer.forward_train(X)
        >>> dX = layer.backward(np.ones_like(Y), ctx)
        >>> dX.shape, layer.grad_a.shape, layer.grad_b.shape
        ((2, 3), (1, 3), (3, 1))
        """
        input_grad = check_flag(input_grad, "input_grad")
        if not isinstance(ctx, TrainContext) or ctx.layer is not self:
            raise LoraTypeError(
                "ctx must be the TrainContext this layer's forward_train returned, got "
                f"{type(ctx).__name__}" + (" of another layer" if isinstance(ctx, TrainContext)
                                            else ""))
        dY = self._as_input(dY, "dY")
        if dY.shape != ctx.lead + (self.out_features,):
            raise LoraShapeError(
                f"dY must have the forward output's shape {ctx.lead + (self.out_features,)}, "
                f"got {dY.shape}")
        dY = dY.reshape(ctx.batch, self.out_features)
        shape = ctx.lead + (self.in_features,)
        with self._lock.read():
            if self._merged:
                raise LoraStateError("cannot run backward on a merged layer; unmerge() first")
            if ctx.version != self._version:
                raise LoraStateError(
                    "lora_a or lora_b changed since this forward_train (an optimizer step or "
                    "a setter): run forward_train again")
            dX = np.empty((ctx.batch, self.in_features), dtype=self.dtype) if input_grad else None
            if not ctx.lora:
                if input_grad:
                    np.matmul(dY, self._W, out=dX)
                    dX = dX.reshape(shape)
                return dX
            if self._grad_A is None:
                self._grad_A = np.empty_like(self._A)
                self._grad_B = np.empty_like(self._B)
            beta = 1.0 if self._grads_valid else 0.0
            args = (self._scaling, ctx._XL, ctx._H, dY)
            if not input_grad:
                train_kernels.backward_factors(self._B, *args, self._grad_A, self._grad_B, beta)
            elif ctx._mask is None:
                train_kernels.backward(self._W, self._A, self._B, *args, dX, self._grad_A,
                                       self._grad_B, beta)
            else:
                train_kernels.backward_dropout(self._W, self._A, self._B, *args, ctx._mask,
                                               ctx.keep_scale, dX, self._grad_A, self._grad_B,
                                               beta)
            self._grads_valid = True
        return None if dX is None else dX.reshape(shape)

    @property
    def grad_a(self) -> NDArray[np.floating] | None:
        """ndarray or None: Read-only view of the gradient of A, shape (rank, in_features).

        The sum over the backwards since the last :meth:`zero_grad`; None
        before the first backward and after :meth:`zero_grad`.
        """
        return readonly(self._grad_A) if self._grads_valid else None

    @property
    def grad_b(self) -> NDArray[np.floating] | None:
        """ndarray or None: Read-only view of the gradient of B, shape (out_features, rank)."""
        return readonly(self._grad_B) if self._grads_valid else None

    def zero_grad(self) -> None:
        """Forget the accumulated gradients (:attr:`grad_a`, :attr:`grad_b` become None).

        Nothing is written: the next :meth:`backward` overwrites the
        gradient buffers instead of adding to them.

        See Also
        --------
        backward : Writes the gradients.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> Y, ctx = layer.forward_train(np.ones((2, 3)))
        >>> _ = layer.backward(Y, ctx)
        >>> layer.zero_grad()
        >>> layer.grad_a is None and layer.grad_b is None
        True
        """
        self._grads_valid = False

    def _factors_for_update(self):
        """[(param, grad or None)] for A and B: the optimizer's view (call under the write lock)."""
        valid = self._grads_valid
        return [(self._A, self._grad_A if valid else None),
                (self._B, self._grad_B if valid else None)]

    # ------------------------------------------------------------- utilities
    def copy(self) -> LoraLinear:
        """An independent copy: its own arrays and lock, the same merge and enabled state.

        Returns
        -------
        LoraLinear
            A new layer, equal to this one and independent of it.

        See Also
        --------
        copy.deepcopy : The same.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(3), rank=1, alpha=2.0, seed=0)
        >>> twin = layer.copy()
        >>> twin.lora_b = np.ones((3, 1))
        >>> bool((layer.lora_b == 0).all())
        True
        """
        with self._lock.read():
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
            new._set_buffer(self._WA.copy(), self.out_features)
            new._B = self._B.copy()
            for name in ("_grad_A", "_grad_B"):
                if getattr(self, name) is not None:
                    setattr(new, name, getattr(self, name).copy())
        new._lock = RWLock()
        return new

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def __getstate__(self):
        with self._lock.read():  # a snapshot no state change can tear
            state = dict(self.__dict__, _WA=self._WA.copy(), _B=self._B.copy())
        # Views would pickle as separate arrays: keep the one buffer.
        for key in ("_lock", "_W", "_A"):  # a lock belongs to one process
            del state[key]
        return state

    def __setstate__(self, state):
        state = dict(state)
        if "_WA" not in state:  # pickled by numba_lora 0.1: W and A apart
            state["_WA"] = np.vstack([state.pop("_W"), state.pop("_A")])
        WA = state.pop("_WA")
        self._reset_training_state()  # layers pickled before training existed
        self.__dict__.update(state)
        self._set_buffer(WA, WA.shape[0] - self._rank)
        self._lock = RWLock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(out_features={self.out_features}, "
            f"in_features={self.in_features}, rank={self._rank}, alpha={self._alpha:g}, "
            f"scaling={self._scaling:g}, dtype={self.dtype}, "
            f"merged={self._merged}, enabled={self._enabled})"
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[LoraLinear]:
        """Disable the update for the ``with`` block, as PEFT's ``model.disable_adapter()``.

        Uses :meth:`disable` on entry; on exit, even by an exception, the
        layer gets back the enabled state it had on entry (:meth:`enable`
        or :meth:`disable`).

        Yields
        ------
        LoraLinear
            This layer.

        See Also
        --------
        disable, enable : The same state, changed for good.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear
        >>> layer = LoraLinear(np.eye(2), rank=1, alpha=1.0)
        >>> layer.lora_b = np.ones((2, 1))
        >>> with layer.disable_adapter():
        ...     layer([1.0, 0.0])  # W x alone
        array([1., 0.])
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
