"""``LoraAdapter``: the LoRA layers of one adapter, by module name, sharing a config."""

from __future__ import annotations

import contextlib
import os
from collections.abc import ItemsView, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validate import as_array, check_flag
from .config import LoraConfig
from .errors import LoraConfigError, LoraKeyError, LoraTypeError
from .io.peft import check_module_name, module_aliases
from .layer import LoraLinear

__all__ = ["LoraAdapter", "AdapterSummary"]


@dataclass(frozen=True)
class AdapterSummary:
    """Totals of an adapter, from :meth:`LoraAdapter.summary`.

    Attributes
    ----------
    num_layers : int
        Number of layers.
    total_trainable : int
        Elements of every layer's A and B.
    total_original : int
        Elements of every layer's base weight.
    compression_ratio : float
        ``total_trainable / (total_original + total_trainable)``.
    rank : int
        The config's ``r``.
    alpha : float
        The config's ``lora_alpha``.

    See Also
    --------
    LoraAdapter.summary : Makes it.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import LoraAdapter, LoraConfig
    >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
    >>> fc = adapter.add_layer("fc", np.eye(3))
    >>> s = adapter.summary()
    >>> s.num_layers, s.total_trainable, s.total_original, s.compression_ratio
    (1, 6, 9, 0.4)
    """

    num_layers: int
    total_trainable: int
    total_original: int
    compression_ratio: float
    rank: int
    alpha: float


class LoraAdapter:
    """A named, ordered collection of :class:`~numba_lora.LoraLinear` layers.

    Parameters
    ----------
    config : LoraConfig
        Rank, alpha and the rest, shared by the layers (``rank_pattern`` and
        ``alpha_pattern`` override them per module name).

    See Also
    --------
    LoraAdapter.from_peft : Load a PEFT adapter directory.
    numba_lora.LoraLinear : One layer.
    numba_lora.LoraConfig : The shared configuration.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_lora import LoraAdapter, LoraConfig
    >>> adapter = LoraAdapter(LoraConfig(r=8, lora_alpha=16))
    >>> adapter.add_layer("q_proj", np.zeros((64, 32), np.float32))
    LoraLinear(out_features=64, in_features=32, rank=8, alpha=16, scaling=2, dtype=float32, merged=False, enabled=True)
    >>> adapter.add_layer("v_proj", np.zeros((64, 32), np.float32)).rank
    8
    >>> adapter.total_trainable_params, adapter.total_original_params
    (1536, 4096)
    """

    def __init__(self, config: LoraConfig) -> None:
        if not isinstance(config, LoraConfig):
            raise LoraTypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        self.config = config.validate()
        self._layers = {}

    # ------------------------------------------------------------- building
    def add_layer(self, name: str, weight: ArrayLike, *,
                  seed: int | np.random.Generator | None = None,
                  init: str = "peft", quantize: str | None = None) -> LoraLinear:
        """Add a layer over base ``weight`` and return it.

        ``weight`` is (out_features, in_features), or (in_features,
        out_features) when the config has ``fan_in_fan_out``.  Rank and alpha
        come from the config after ``rank_pattern``/``alpha_pattern``.
        ``init`` is :class:`LoraLinear`'s (``"peft"``, ``"gaussian"`` or
        ``"pissa"``; a PiSSA layer's base becomes the residual, see there).

        ``name`` must survive :meth:`save_peft` and :meth:`from_peft`
        unchanged (see :func:`numba_lora.io.peft.check_module_name`): dotted
        components, none empty, no whitespace, no ``lora_A``/``lora_B``
        component, no leading ``base_model.model.``.  And since base weights
        are looked up with or without a leading ``model.``, ``x`` and
        ``model.x`` cannot both be layers.

        Parameters
        ----------
        name : str
            The module name, as PEFT spells it (``"model.layers.0.self_attn.q_proj"``).
        weight : array_like
            The base weight (see above for its orientation).
        seed : int, numpy.random.Generator or None, optional
            Source of the layer's initial ``lora_a``.
        init : {"peft", "gaussian", "pissa"}, optional
            How the factors start, as for :class:`LoraLinear`.
        quantize : {None, "nf4"}, optional
            ``"nf4"``: the layer is a :class:`~numba_lora.QLoraLinear`, its
            base quantized to NF4 (blocksize 64, bitsandbytes' format);
            only ``init="peft"`` then (the 4-bit base cannot hold a PiSSA
            residual exactly).

        Returns
        -------
        LoraLinear or QLoraLinear
            The new layer (also ``adapter[name]``).

        Raises
        ------
        LoraTypeError
            If ``name`` is not a string, or ``seed`` is not something
            :func:`numpy.random.default_rng` takes.
        LoraConfigError
            If ``name`` breaks the rule above or is already used, or
            ``quantize`` is not None or ``"nf4"`` (or is ``"nf4"`` with
            another ``init``).
        LoraShapeError, LoraDtypeError
            If ``weight`` is not a 2-D float array.

        See Also
        --------
        numba_lora.LoraLinear : The layer it makes.
        numba_lora.QLoraLinear : The layer it makes with ``quantize="nf4"``.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> fc.rank, fc.scaling, adapter["fc"] is fc
        (1, 2.0, True)
        """
        check_module_name(name)
        if quantize not in (None, "nf4"):
            raise LoraConfigError(f"quantize must be None or 'nf4', got {quantize!r}")
        if quantize is not None and init != "peft":
            raise LoraConfigError(
                f"init={init!r} cannot be combined with quantize={quantize!r}: only PEFT's "
                "default init ('peft') starts a layer over a quantized base")
        if name in self._layers:
            raise LoraConfigError(f"adapter already has a layer named {name!r}")
        for alias in sorted(module_aliases(name)):
            if alias in self._layers:
                raise LoraConfigError(
                    f"layer name {name!r} clashes with layer {alias!r}: base weights are looked "
                    "up with or without a leading 'model.', so the two could not be loaded back"
                )
        weight = as_array(weight, "weight")
        if self.config.fan_in_fan_out:
            weight = weight.T
        if quantize == "nf4":
            from .qlora import QLoraLinear

            layer = QLoraLinear(weight, self.config.rank_for(name), self.config.alpha_for(name),
                                seed=seed, use_rslora=self.config.use_rslora)
        else:
            layer = LoraLinear(weight, self.config.rank_for(name), self.config.alpha_for(name),
                               seed=seed, use_rslora=self.config.use_rslora, init=init)
        self._layers[name] = layer
        return layer

    # -------------------------------------------------------------- mapping
    def __getitem__(self, name: str) -> LoraLinear:
        try:
            return self._layers[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            known = ", ".join(repr(n) for n in list(self._layers)[:5])
            more = ", ..." if len(self._layers) > 5 else ""
            raise LoraKeyError(
                f"adapter has no layer named {name!r} (it has {len(self._layers)}: {known}{more})"
            ) from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._layers
        except TypeError:  # unhashable: never a layer name
            return False

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    @property
    def layer_names(self) -> list[str]:
        """list of str: Layer names in insertion order."""
        return list(self._layers)

    def items(self) -> ItemsView[str, LoraLinear]:
        """(name, layer) pairs in insertion order.

        Returns
        -------
        ItemsView of (str, LoraLinear)
            A live view of the layers by name.

        See Also
        --------
        layers : The layers alone.
        layer_names : The names alone.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> [(name, layer.rank) for name, layer in adapter.items()]
        [('fc', 1)]
        """
        return self._layers.items()

    def layers(self) -> list[LoraLinear]:
        """list of LoraLinear: The layers in insertion order.

        Returns
        -------
        list of LoraLinear
            A new list.

        See Also
        --------
        items : With the names.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.layers()[0] is fc
        True
        """
        return list(self._layers.values())

    # ------------------------------------------------------------- training
    def zero_grad(self) -> None:
        """:meth:`LoraLinear.zero_grad` on every layer.

        Training runs layer by layer (``adapter[name].forward_train(...)``,
        ``adapter[name].backward(...)``); an optimizer of
        :mod:`numba_lora.optim` takes the adapter itself and updates every
        layer's factors.

        See Also
        --------
        numba_lora.LoraLinear.zero_grad : The same for one layer.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> Y, ctx = fc.forward_train(np.ones((2, 3)))
        >>> _ = fc.backward(Y, ctx)
        >>> adapter.zero_grad()
        >>> fc.grad_a is None
        True
        """
        for layer in self._layers.values():
            layer.zero_grad()

    # -------------------------------------------------------------- compute
    def forward_layer(self, name: str, x: ArrayLike,
                      out: NDArray[np.floating] | None = None) -> NDArray[np.floating]:
        """``self[name].forward(x, out)``: one vector through one layer.

        Parameters
        ----------
        name : str
            The layer's name.
        x : array_like, shape (in_features,)
            Input vector.
        out : ndarray, shape (out_features,), optional
            Where to write the result (layer dtype, C-contiguous).

        Returns
        -------
        ndarray, shape (out_features,)
            In the layer's dtype.

        See Also
        --------
        forward_batch_layer : A batch through one layer.
        numba_lora.LoraLinear.forward : What it calls.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.forward_layer("fc", [1.0, 2.0, 3.0])
        array([1., 2., 3.])
        """
        return self[name].forward(x, out=out)

    def forward_batch_layer(self, name: str, X: ArrayLike,
                            out: NDArray[np.floating] | None = None) -> NDArray[np.floating]:
        """``self[name].forward_batch(X, out)``: a batch through one layer.

        Parameters
        ----------
        name : str
            The layer's name.
        X : array_like, shape (batch, in_features)
            Input rows.
        out : ndarray, shape (batch, out_features), optional
            Where to write the result (layer dtype, C-contiguous).

        Returns
        -------
        ndarray, shape (batch, out_features)
            In the layer's dtype.

        See Also
        --------
        forward_layer : One vector through one layer.
        numba_lora.LoraLinear.forward_batch : What it calls.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.forward_batch_layer("fc", np.ones((2, 3))).shape
        (2, 3)
        """
        return self[name].forward_batch(X, out=out)

    def merge_all(self, *, check_finite: bool = False) -> None:
        """Merge every layer that is not merged yet (idempotent).

        With ``check_finite=True`` every layer is checked before any is
        merged, so a refusal leaves the whole adapter as it was.

        Parameters
        ----------
        check_finite : bool, optional
            Check every layer's merge, without writing, before merging any; see
            :meth:`LoraLinear.merge <numba_lora.LoraLinear.merge>`.

        See Also
        --------
        unmerge_all : The opposite.
        numba_lora.LoraLinear.merge : One layer.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.merge_all()
        >>> fc.is_merged
        True
        """
        pending = [layer for layer in self._layers.values() if not layer.is_merged]
        check_finite = check_flag(check_finite, "check_finite")
        for layer in pending:
            if not isinstance(layer, LoraLinear):
                # A QLoraLinear (quantize="nf4") cannot merge: its merge()
                # raises, and must do so before any other layer is merged.
                layer.merge()
        if check_finite:
            for name, layer in self._layers.items():
                if not layer.is_merged:
                    layer._check_merge_finite(f"merging layer {name!r}")
        for layer in pending:
            layer.merge()

    def unmerge_all(self) -> None:
        """Unmerge every merged layer (idempotent).

        See Also
        --------
        merge_all : The opposite.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.merge_all()
        >>> adapter.unmerge_all()
        >>> fc.is_merged
        False
        """
        for layer in self._layers.values():
            if layer.is_merged:
                layer.unmerge()

    def enable_all(self) -> None:
        """Enable every layer.

        See Also
        --------
        disable_all : The opposite.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.disable_all()
        >>> adapter.enable_all()
        >>> fc.is_enabled
        True
        """
        for layer in self._layers.values():
            layer.enable()

    def disable_all(self) -> None:
        """Disable every layer: each computes its base product only.

        See Also
        --------
        enable_all : The opposite.
        disable_adapter : Disabled for a ``with`` block.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.disable_all()
        >>> fc.is_enabled
        False
        """
        for layer in self._layers.values():
            layer.disable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[LoraAdapter]:
        """Disable every layer for the ``with`` block, as PEFT's ``model.disable_adapter()``.

        On exit, even by an exception, each layer gets back the enabled
        state it had on entry (a layer that was disabled stays disabled).
        Layers added inside the block are left as they are.

        Yields
        ------
        LoraAdapter
            This adapter.

        See Also
        --------
        disable_all, enable_all : The same state, changed for good.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=1))
        >>> layer = adapter.add_layer("fc", np.eye(2))
        >>> layer.lora_b = np.ones((2, 1))
        >>> with adapter.disable_adapter():
        ...     adapter.forward_layer("fc", [1.0, 0.0])  # the base model alone
        array([1., 0.])
        >>> layer.is_enabled
        True
        """
        states = [(layer, layer.is_enabled) for layer in self._layers.values()]
        try:
            for layer, _ in states:
                layer.disable()
            yield self
        finally:
            for layer, was_enabled in states:
                if was_enabled:
                    layer.enable()
                else:
                    layer.disable()

    # --------------------------------------------------------------- totals
    @property
    def total_trainable_params(self) -> int:
        """int: Sum of the layers' ``trainable_params``."""
        return sum(layer.trainable_params for layer in self._layers.values())

    @property
    def total_original_params(self) -> int:
        """int: Sum of ``in_features * out_features`` over the layers."""
        return sum(layer.in_features * layer.out_features for layer in self._layers.values())

    @property
    def overall_compression_ratio(self) -> float:
        """float: trainable / (original + trainable); 0.0 for an empty adapter."""
        trainable = self.total_trainable_params
        total = self.total_original_params + trainable
        return trainable / total if total else 0.0

    def summary(self) -> AdapterSummary:
        """An :class:`AdapterSummary` of the totals and the config's rank and alpha.

        Returns
        -------
        AdapterSummary
            The totals and the config's rank and alpha.

        See Also
        --------
        total_trainable_params, total_original_params : The totals alone.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> adapter.summary().num_layers
        1
        """
        return AdapterSummary(
            num_layers=len(self._layers),
            total_trainable=self.total_trainable_params,
            total_original=self.total_original_params,
            compression_ratio=self.overall_compression_ratio,
            rank=self.config.r,
            alpha=self.config.lora_alpha,
        )

    # ----------------------------------------------------------------- PEFT
    @classmethod
    def from_peft(cls, path: str | os.PathLike[str],
                  base_weights: Mapping[str, ArrayLike] | str | os.PathLike[str], *,
                  quantize: str | None = None) -> LoraAdapter:
        """Load a PEFT LoRA adapter directory onto base weights.

        Parameters
        ----------
        path : str or os.PathLike
            Directory with ``adapter_config.json`` and
            ``adapter_model.safetensors``, as PEFT's ``save_pretrained`` writes.
        base_weights : mapping or str or os.PathLike
            Base weights by module name (``layers.0.self_attn.q_proj``) or by
            state-dict key (``...q_proj.weight``, optionally prefixed with
            ``model.`` or ``base_model.model.``); or where they are stored:
            a ``.safetensors`` file, the ``model.safetensors.index.json`` of
            a sharded checkpoint (``model-00001-of-00004.safetensors``, ...),
            or a model directory holding either.  From files, only the
            weights the adapter needs are read, one tensor at a time, and
            only from the shards that hold them.
        quantize : {None, "nf4"}, optional
            ``"nf4"``: quantize each base weight as it is read (QLoRA: every
            layer a :class:`~numba_lora.QLoraLinear`, blocksize 64), so the
            adapter holds 4.5 bits per base weight instead of 32.

        Returns
        -------
        LoraAdapter
            One layer per adapted module, named as in the adapter file
            (without the ``base_model.model.`` prefix), unmerged and enabled.

        Raises
        ------
        LoraUnsupportedError
            For a feature numba_lora does not implement (DoRA, LoRA biases,
            ``modules_to_save``, embedding or convolution adapters, ...).
        LoraFormatError
            For a malformed adapter or base-weights file: a file that is not
            well-formed safetensors or UTF-8 JSON, a config entry of the
            wrong type, missing, unpaired or duplicate tensors, a dtype that
            is not float16/bfloat16/float32/float64, shapes that do not fit,
            a rank that disagrees with the config, or two base weights for
            one module; a shard index without a ``weight_map``, naming a
            shard that does not exist or a tensor its shard does not hold; a
            directory with no (or more than one set of) safetensors weights.
            The message names the file and the key.
        LoraKeyError
            If no base weight matches an adapter module.
        LoraTypeError
            If ``path`` is not a path, or ``base_weights`` neither a mapping
            nor a path.
        LoraDtypeError
            If a base weight in a mapping is not a float array.

        Notes
        -----
        A bfloat16 (or float16) base weight is widened to float32 as it is
        read, exactly, so each layer holds twice the bytes the checkpoint
        stores for it (a 4096 x 4096 projection: 32 MiB in bfloat16, 64 MiB
        in the layer).  The forward is a float32 BLAS product, and Numba has
        no bfloat16 type; keeping ``W`` in bfloat16 would need a forward that
        widens one tile of ``W`` at a time, as the NF4 path does, which is not
        built.  For less memory than bfloat16, ``quantize="nf4"`` (4.5 bits
        per weight); to write a merged bfloat16 checkpoint, bit for bit as
        PEFT, :func:`numba_lora.checkpoint.merge`, which keeps bfloat16 in
        the files.  See the design notes (``docs/design.rst``).
        """
        from .io.peft import load_peft

        return load_peft(cls, path, base_weights, quantize=quantize)

    def save_peft(self, path: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to directory ``path``.

        PEFT's ``PeftModel.from_pretrained`` loads the result.  Factors are
        written in the layers' dtype.  The files are written under temporary
        names and renamed into place, so a failed write leaves the directory
        as it was.

        ``adapter_config.json`` gets the config's fields (``r``,
        ``lora_alpha``, ..., ``base_model_name_or_path``, ``revision``,
        ``task_type``), the layer names as ``target_modules``, and every
        other entry of the file the adapter was loaded from
        (``config.extra``), unchanged.  Set ``base_model_name_or_path`` (and
        ``task_type``) for PEFT's ``AutoPeftModelForCausalLM.from_pretrained``
        to find the base model::

            adapter.config.base_model_name_or_path = "meta-llama/Llama-3.2-1B"
            adapter.config.task_type = "CAUSAL_LM"
            adapter.save_peft("my-adapter/")

        Parameters
        ----------
        path : str or os.PathLike
            The directory (created if missing): ``adapter_config.json`` and
            ``adapter_model.safetensors`` are written into it.

        Raises
        ------
        LoraFormatError
            If the adapter has no layers.
        LoraConfigError
            If a layer's rank, alpha or rsLoRA setting no longer matches the
            config (changed after the layer was added), a config field no
            longer validates, or ``path`` exists and is not a directory.
        LoraUnsupportedError
            If ``config.extra`` turns on a feature numba_lora refuses on
            reading (``use_dora``, ``modules_to_save``, ...).
        LoraTypeError
            If ``path`` is not a str or os.PathLike.
        OSError
            If the file system refuses the write (permissions, disk full);
            nothing is left behind.

        See Also
        --------
        LoraAdapter.from_peft : Reads it back.

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from numba_lora import LoraAdapter, LoraConfig
        >>> adapter = LoraAdapter(LoraConfig(r=1, lora_alpha=2, target_modules=["fc"]))
        >>> fc = adapter.add_layer("fc", np.eye(3))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     adapter.save_peft(d)
        ...     sorted(os.listdir(d))
        ...     back = LoraAdapter.from_peft(d, {"fc": np.eye(3)})
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> bool((back["fc"].lora_a == fc.lora_a).all())
        True
        """
        from .io.peft import save_peft

        save_peft(self, path)

    def __copy__(self) -> LoraAdapter:
        # A shallow copy shares the layers but not the mapping: adding a
        # layer to the copy must not add it to the original.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._layers = dict(self._layers)
        return new

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}({len(self)} layers, r={c.r}, lora_alpha={c.lora_alpha:g}, "
                f"use_rslora={c.use_rslora})")

