"""``MultiLoraLinear``: one frozen base weight, many named adapters, adapter chosen per row."""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import kernels
from ._base import FrozenWeight
from ._lock import RWLock
from ._validate import (
    as_factor,
    as_real_array,
    as_weight,
    check_alpha,
    check_flag,
    check_name,
    check_out,
    check_scaling,
    check_shape,
)
from .errors import LoraConfigError, LoraKeyError, LoraShapeError, LoraTypeError
from .layer import LoraLinear

__all__ = ["MultiLoraLinear"]

# What a forward call reads, replaced whole on every change, so that a call
# running in another thread always sees one consistent set of adapters.
_Packed = namedtuple("_Packed", "names index A_cat BT_cat offsets scalings ranks alphas")

_KERNELS = {"auto": kernels.forward_batch_multi,
            "segmented": kernels.forward_batch_multi_segmented,
            "rows": kernels.forward_batch_multi_rows}


class MultiLoraLinear(FrozenWeight):
    """A frozen weight ``W`` with many LoRA adapters, one chosen per input row.

    ``forward_batch(X, adapter_ids)`` computes, for each row ``b`` with
    adapter ``i = adapter_ids[b]``, ``W @ X[b] + s_i * B_i @ (A_i @ X[b])``,
    and ``W @ X[b]`` where the id is ``-1`` (or the name is ``None``).  The
    dense product is one BLAS call for the whole batch; see
    :mod:`numba_lora.kernels.multi` for the two paths that add the low-rank
    terms.  There is no "active adapter": the choice is per call, so Python
    threads may call ``forward_batch`` on one layer at the same time.

    Layers pickle and copy (:func:`copy.copy` and :func:`copy.deepcopy`
    both give an independent layer with its own arrays and lock).

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features)
        Base weight (float16 is widened to float32; see :class:`LoraLinear`).

    Raises
    ------
    LoraShapeError, LoraDtypeError, LoraTypeError
        If ``weight`` is not a 2-D array of real numbers.

    See Also
    --------
    LoraLinear : One adapter, merged into W or not.
    numba_lora.kernels.forward_batch_multi : The kernel behind
        :meth:`forward_batch`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import MultiLoraLinear
    >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
    >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
    >>> layer.add_adapter("b", np.zeros((2, 4)), np.zeros((4, 2)), alpha=2.0)
    >>> layer.forward_batch(np.ones((3, 4)), ["a", "b", None])
    array([[5., 5., 5., 5.],
           [1., 1., 1., 1.],
           [1., 1., 1., 1.]], dtype=float32)
    """

    def __init__(self, weight: ArrayLike) -> None:
        self._W = as_weight(weight)
        # Only changes take it (exclusively): a forward reads one _Packed
        # snapshot and needs no lock.
        self._lock = RWLock()
        out_features, in_features = self._W.shape
        self._packed = _Packed((), {}, np.empty((0, in_features), self._W.dtype),
                               np.empty((0, out_features), self._W.dtype),
                               np.zeros(1, np.int64), np.empty(0, np.float64), (), ())

    # ------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        """list of str: Adapter names; an adapter's id is its position here.

        A new list on each access, in the order the adapters were added
        (removing one shifts the later ones down).

        See Also
        --------
        add_adapter : Appends a name.
        remove_adapter : Removes one.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.adapter_names
        ['a']
        """
        return list(self._packed.names)

    def __len__(self) -> int:
        return len(self._packed.names)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._packed.index
        except TypeError:  # unhashable: never an adapter name
            return False

    def scaling(self, name: str) -> float:
        """The scaling of adapter ``name``.

        ``alpha / rank``, or ``alpha / sqrt(rank)`` for an rsLoRA adapter, as
        computed when it was added.

        Parameters
        ----------
        name : str
            An adapter's name.

        Returns
        -------
        float
            The multiplier of that adapter's low-rank term.

        Raises
        ------
        LoraKeyError
            If the layer has no adapter ``name``.

        See Also
        --------
        rank : The adapter's rank.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.scaling("a")
        1.0
        """
        return float(self._packed.scalings[self._id(name)])

    def rank(self, name: str) -> int:
        """The rank of adapter ``name``.

        Adapters of one layer may have different ranks.

        Parameters
        ----------
        name : str
            An adapter's name.

        Returns
        -------
        int
            The number of rows of the adapter's A factor.

        Raises
        ------
        LoraKeyError
            If the layer has no adapter ``name``.

        See Also
        --------
        scaling : The adapter's scaling.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.rank("a")
        1
        """
        return self._packed.ranks[self._id(name)]

    def add_adapter(self, name: str, A: ArrayLike, B: ArrayLike, alpha: float, *,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` with factors A (rank, in_features), B (out_features, rank).

        ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        Factors are copied and converted to the layer's dtype.  Ranks may
        differ between adapters.  The new adapter's id is the number of
        adapters before it.

        Parameters
        ----------
        name : str
            A name not yet used on this layer.
        A : array_like, shape (rank, in_features)
            LoRA down-projection, rank >= 1.
        B : array_like, shape (out_features, rank)
            LoRA up-projection.
        alpha : float
            LoRA alpha, finite and > 0.
        use_rslora : bool, default False
            ``scaling = alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``.

        Raises
        ------
        LoraTypeError
            If ``name`` is not a str or ``use_rslora`` not a bool.
        LoraConfigError
            If ``name`` is empty or taken, or ``alpha`` is not finite and
            > 0, or the scaling overflows the layer's dtype.
        LoraShapeError, LoraDtypeError
            If A or B has the wrong shape or does not hold real numbers.

        See Also
        --------
        add_layer : Takes the adapter of a :class:`LoraLinear`.
        remove_adapter : The reverse.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.add_adapter("b", np.zeros((4, 4)), np.zeros((4, 4)), alpha=8.0, use_rslora=True)
        >>> layer.adapter_names, layer.scaling("b")          # 8 / sqrt(4)
        (['a', 'b'], 4.0)
        """
        check_name(name, "adapter")
        alpha = check_alpha(alpha)
        use_rslora = check_flag(use_rslora, "use_rslora")
        A = as_real_array(A, "A", self.dtype)
        if A.ndim != 2 or A.shape[0] < 1:
            raise LoraShapeError(f"A must be 2-D (rank >= 1, in_features={self.in_features}), "
                                 f"got shape {A.shape}")
        rank = A.shape[0]
        A = as_factor(A, "A", (rank, self.in_features), ("rank", "in_features"), self.dtype)
        B = as_factor(B, "B", (self.out_features, rank), ("out_features", "rank"), self.dtype)
        scaling = check_scaling(alpha / (math.sqrt(rank) if use_rslora else rank), self.dtype,
                                f"scaling of adapter {name!r}")
        self._insert(name, A, B, scaling, alpha)

    def _insert(self, name, A, B, scaling, alpha):
        with self._lock.write():
            packed = self._packed
            if name in packed.index:
                raise LoraConfigError(f"layer already has an adapter named {name!r}")
            self._packed = self._pack(
                packed.names + (name,),
                [self._factors(packed, i) for i in range(len(packed.names))] + [(A, B.T)],
                np.append(packed.scalings, scaling),
                packed.alphas + (alpha,),
            )

    def add_layer(self, name: str, layer: LoraLinear) -> None:
        """Add the adapter of ``layer`` (a :class:`LoraLinear` over this base weight).

        Its ``lora_a``, ``lora_b`` and scaling are taken as they are (rsLoRA or
        not); its own weight is not looked at, only its shape and dtype are
        checked.

        Parameters
        ----------
        name : str
            A name not yet used on this layer.
        layer : LoraLinear
            A layer of this layer's shape; its factors are copied and converted
            to this layer's dtype.

        Raises
        ------
        LoraTypeError
            If ``name`` is not a str or ``layer`` not a :class:`LoraLinear`.
        LoraShapeError
            If ``layer`` has another shape.
        LoraConfigError
            If ``name`` is empty or taken, or the scaling overflows this
            layer's dtype.

        See Also
        --------
        add_adapter : From the factors themselves.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraLinear, MultiLoraLinear
        >>> W = np.eye(4, dtype=np.float32)
        >>> multi = MultiLoraLinear(W)
        >>> multi.add_layer("tuned", LoraLinear(W, rank=2, alpha=4.0, seed=0))
        >>> multi.rank("tuned"), multi.scaling("tuned")
        (2, 2.0)
        """
        check_name(name, "adapter")
        if not isinstance(layer, LoraLinear):
            raise LoraTypeError(f"layer must be a LoraLinear, got {type(layer).__name__}")
        if (layer.out_features, layer.in_features) != self._W.shape:
            raise LoraShapeError(
                f"layer {name!r} is {layer.out_features}x{layer.in_features}, "
                f"expected {self.out_features}x{self.in_features}"
            )
        # The layer's own scaling, as it is (rsLoRA or not): no recomputation;
        # checked again because a float64 layer's scaling may overflow float32.
        scaling = check_scaling(layer.scaling, self.dtype, f"scaling of adapter {name!r}")
        self._insert(name, np.array(layer.lora_a, self.dtype), np.array(layer.lora_b, self.dtype),
                     scaling, layer.alpha)

    def remove_adapter(self, name: str) -> None:
        """Remove adapter ``name``; later adapters' ids shift down by one.

        Forwards already running keep the adapters they started with.

        Parameters
        ----------
        name : str
            An adapter's name.

        Raises
        ------
        LoraKeyError
            If the layer has no adapter ``name``.

        See Also
        --------
        add_adapter : The reverse.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.remove_adapter("a")
        >>> len(layer)
        0
        """
        with self._lock.write():
            packed = self._packed
            drop = self._id(name, packed)
            keep = [i for i in range(len(packed.names)) if i != drop]
            self._packed = self._pack(
                tuple(packed.names[i] for i in keep),
                [self._factors(packed, i) for i in keep],
                packed.scalings[keep],
                tuple(packed.alphas[i] for i in keep),
            )

    @staticmethod
    def _factors(packed, i):
        r0, r1 = packed.offsets[i], packed.offsets[i + 1]
        return packed.A_cat[r0:r1], packed.BT_cat[r0:r1]

    def _pack(self, names, factors, scalings, alphas):
        ranks = tuple(a.shape[0] for a, _ in factors)
        offsets = np.zeros(len(names) + 1, np.int64)
        offsets[1:] = np.cumsum(ranks, dtype=np.int64)
        A_cat = np.empty((offsets[-1], self.in_features), self.dtype)
        BT_cat = np.empty((offsets[-1], self.out_features), self.dtype)
        for (a, bt), r0, r1 in zip(factors, offsets[:-1], offsets[1:]):
            A_cat[r0:r1] = a
            BT_cat[r0:r1] = bt
        return _Packed(names, {n: i for i, n in enumerate(names)}, A_cat, BT_cat, offsets,
                       np.ascontiguousarray(scalings, np.float64), ranks, alphas)

    def _id(self, name, packed=None):
        packed = packed or self._packed
        try:
            return packed.index[name]
        except (KeyError, TypeError):
            raise LoraKeyError(
                f"no adapter named {name!r} (adapters: {', '.join(map(repr, packed.names)) or 'none'})"
            ) from None

    # -------------------------------------------------------------- forward
    def _ids(self, adapter_ids, batch, packed):
        """``adapter_ids`` as a C-contiguous int64 array, every entry checked, nothing wrapped."""
        n = len(packed.names)
        if isinstance(adapter_ids, (set, frozenset, dict)):
            raise LoraTypeError(
                "adapter_ids must be an ordered sequence (one entry per row), got a "
                f"{type(adapter_ids).__name__}, whose order is not the rows'")
        if isinstance(adapter_ids, np.ndarray) and adapter_ids.dtype.kind in "biufc":
            if adapter_ids.dtype.kind not in "iu":
                raise LoraTypeError(
                    "adapter_ids must hold integer ids (or be a sequence of names and None), "
                    f"got an array of dtype {adapter_ids.dtype}"
                )
            self._check_count(adapter_ids.shape, batch)
            # Range-checked in the array's own dtype, before the cast to
            # int64: a uint64 2**64 - 1 must not wrap to -1 (base only).
            bad = adapter_ids >= n
            if adapter_ids.dtype.kind == "i":
                bad |= adapter_ids < -1
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise self._out_of_range(int(adapter_ids[row]), row, n)
            return np.ascontiguousarray(adapter_ids, dtype=np.int64)
        if (isinstance(adapter_ids, (str, bytes)) or not hasattr(adapter_ids, "__len__")
                or getattr(adapter_ids, "ndim", 1) == 0):
            raise LoraTypeError(
                "adapter_ids must be a sequence (one entry per row: an int id, a name, "
                f"or None), got {type(adapter_ids).__name__}"
            )
        self._check_count((len(adapter_ids),), batch)
        ids = np.empty(batch, np.int64)
        for row, entry in enumerate(adapter_ids):
            if entry is None:
                ids[row] = -1
            elif isinstance(entry, str):
                ids[row] = self._id(entry, packed)
            elif isinstance(entry, (int, np.integer)) and not isinstance(entry, (bool, np.bool_)):
                value = int(entry)  # Python int: no wrap, whatever the size
                if not -1 <= value < n:
                    raise self._out_of_range(value, row, n)
                ids[row] = value
            else:
                raise LoraTypeError(
                    f"adapter_ids[{row}] must be an int id, a name or None, "
                    f"got {type(entry).__name__} {entry!r}"
                )
        return ids

    @staticmethod
    def _check_count(shape, batch):
        if len(shape) != 1 or shape[0] != batch:
            raise LoraShapeError(
                f"adapter_ids must have one entry per row of X ({batch}), got shape {shape}"
            )

    @staticmethod
    def _out_of_range(value, row, n):
        return LoraKeyError(
            f"adapter id {value} at row {row} is out of range: expected -1 "
            f"(base only) or 0..{n - 1} for the {n} adapters"
        )

    def forward_batch(self, X: ArrayLike, adapter_ids: ArrayLike | Sequence[str | None],
                      out: NDArray[np.floating] | None = None, *,
                      path: Literal["auto", "segmented", "rows"] = "auto") -> NDArray[np.floating]:
        """Apply each row's adapter (or none) to a batch.

        One BLAS product for the dense part of the whole batch, then each
        row's low-rank term by the path ``path`` names.  Needs no lock: it
        reads one consistent snapshot of the adapters.

        Parameters
        ----------
        X : array_like, shape (batch, in_features)
            Input rows; converted to the layer's dtype.
        adapter_ids : array_like of int, or sequence of str or None
            One entry per row: an adapter's index in :attr:`adapter_names`
            (``-1`` for the base weight only), or its name (``None`` for the
            base weight only).
        out : ndarray, shape (batch, out_features), optional
            Where to write the result: C-contiguous, writable, of the layer's
            dtype, overlapping no input.
        path : {"auto", "segmented", "rows"}, optional
            Which kernel adds the low-rank terms (see
            :mod:`numba_lora.kernels.multi`); ``"auto"`` chooses by the
            batch's shape.

        Returns
        -------
        ndarray, shape (batch, out_features)
            The result, in the layer's dtype (``out`` when given).

        Raises
        ------
        LoraShapeError, LoraDtypeError
            If ``X``, ``adapter_ids`` or ``out`` has the wrong shape or dtype.
        LoraKeyError
            If an id is out of range or a name unknown.
        LoraTypeError, LoraConfigError
            If ``adapter_ids`` holds something else, or ``path`` is not one of
            the three.

        See Also
        --------
        numba_lora.kernels.forward_batch_multi : The kernel it calls.
        numba_lora.distributed.forward_batch : The same over a Dask array.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> layer.forward_batch(np.ones((2, 4)), [0, -1])
        array([[5., 5., 5., 5.],
               [1., 1., 1., 1.]], dtype=float32)
        """
        packed = self._packed
        if not isinstance(path, str):
            raise LoraTypeError(f"path must be 'auto', 'segmented' or 'rows', got "
                                f"{type(path).__name__} {path!r}")
        kernel = _KERNELS.get(path)
        if kernel is None:
            raise LoraConfigError(f"path must be 'auto', 'segmented' or 'rows', got {path!r}")
        X = np.asarray(as_real_array(X, "X", self.dtype), order="C")
        check_shape(X, (None, self.in_features), "X", ("batch", "in_features"))
        ids = self._ids(adapter_ids, X.shape[0], packed)
        if out is None:
            out = np.empty((X.shape[0], self.out_features), self.dtype)
        else:
            check_out(out, (X.shape[0], self.out_features), self.dtype,
                      (X, self._W, packed.A_cat, packed.BT_cat))
        return kernel(self._W, packed.A_cat, packed.BT_cat, packed.offsets, packed.scalings,
                      X, ids, out)

    # ---------------------------------------------------------- utilities
    def copy(self) -> MultiLoraLinear:
        """An independent copy: its own W, packed factors and lock.

        What :func:`copy.copy` and :func:`copy.deepcopy` return too.

        Returns
        -------
        MultiLoraLinear
            A layer equal to this one that shares no array with it.

        See Also
        --------
        copy.deepcopy : The same copy.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import MultiLoraLinear
        >>> layer = MultiLoraLinear(np.eye(4, dtype=np.float32))
        >>> layer.add_adapter("a", np.ones((1, 4)), np.ones((4, 1)), alpha=1.0)
        >>> twin = layer.copy()
        >>> twin.remove_adapter("a")
        >>> layer.adapter_names, twin.adapter_names
        (['a'], [])
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._W = self._W.copy()
        packed = self._packed
        new._packed = packed._replace(
            index=dict(packed.index), A_cat=packed.A_cat.copy(), BT_cat=packed.BT_cat.copy(),
            offsets=packed.offsets.copy(), scalings=packed.scalings.copy())
        new._lock = RWLock()
        return new

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(out_features={self.out_features}, "
                f"in_features={self.in_features}, dtype={self.dtype}, "
                f"adapters={list(self._packed.names)})")
