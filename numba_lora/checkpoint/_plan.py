"""Matching a PEFT adapter to a checkpoint's tensors: everything checked, nothing written.

A :class:`MergePlan` is the whole merge as data: for every shard, which
tensors change and with which factors (by key in the adapter file) and
scaling.  It is built from headers alone, pickles small, and is what a
worker needs to write one shard (see :meth:`MergePlan.write_shard`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from ..errors import LoraConfigError, LoraFormatError, LoraKeyError, LoraTypeError
# The adapter reader of io.peft, so that a merged checkpoint honours and
# refuses exactly what LoraAdapter.from_peft does (one list of refusals).
from ..io.peft import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_modules,
    check_float_tensor,
    read_adapter_config,
)
from ..io.safetensors import SafetensorsFile, as_path
from ._layout import FLOAT_DTYPES, read_checkpoint

__all__ = ["MergePlan", "TensorMerge", "FactorSource", "plan_merge", "DTYPES", "COMBINATIONS"]

#: Accepted values of ``dtype``.
DTYPES = ("keep",)

#: Accepted values of ``combination`` (PEFT's ``add_weighted_adapter`` types that are exact
#: functions of the factors: no SVD, no pruning, no randomness).
COMBINATIONS = ("cat", "linear")


@dataclass(frozen=True)
class FactorSource:
    """One adapter's factors of one module: where they are, and how they are weighed.

    ``scaling`` is the adapter's own (``lora_alpha / r``, or ``/ sqrt(r)``
    with rsLoRA, after the patterns); ``weight`` the caller's weight for
    this adapter in a weighted merge (1.0 in a plain one).
    """

    adapter_file: object
    a_key: str
    b_key: str
    rank: int
    scaling: float
    weight: float = 1.0


@dataclass(frozen=True)
class TensorMerge:
    """One base tensor to update: ``W += scaling * B @ A`` (transposed for fan_in_fan_out).

    In a plain merge ``sources`` holds one adapter's factors and ``A``, ``B``
    are its own.  In a weighted merge (``combination`` ``"cat"`` or
    ``"linear"``) the factors of every adapter that adapts the tensor are
    combined first, as PEFT's ``add_weighted_adapter`` combines them; ``rank``
    and ``scaling`` are then the combined adapter's.
    """

    tensor: str
    shard: str
    module: str
    sources: tuple  # of FactorSource
    rank: int
    scaling: float
    fan_in_fan_out: bool
    combination: str = "none"

    @property
    def a_key(self) -> str:
        """str: The lora_A key of the first (in a plain merge, the only) adapter."""
        return self.sources[0].a_key

    @property
    def b_key(self) -> str:
        """str: The lora_B key of the first (in a plain merge, the only) adapter."""
        return self.sources[0].b_key


@dataclass(frozen=True)
class MergePlan:
    """A checked merge: the base checkpoint's layout, the adapter files, the tensors to update.

    Built by :func:`plan_merge` from headers alone; small, and it pickles
    (a Dask task gets it whole).

    Attributes
    ----------
    checkpoint : Checkpoint
        The base: directory, index name, shards with their tensors' byte
        ranges, the other files to copy.
    adapter_files : tuple of pathlib.Path
        ``adapter_model.safetensors`` of each adapter; factors are read from
        them per tensor.
    merges : tuple of TensorMerge
        One per adapted tensor.
    dtype : str
        ``"keep"``.
    combination : str
        ``"none"`` (one adapter, merged as it is), ``"cat"`` or ``"linear"``.
    """

    checkpoint: object
    adapter_files: tuple
    merges: tuple
    dtype: str
    combination: str = "none"

    @property
    def adapter_file(self) -> Path:
        """pathlib.Path: The first (in a plain merge, the only) adapter's weights file."""
        return self.adapter_files[0]

    @property
    def shards(self) -> tuple[str, ...]:
        """tuple of str: The shard file names, in the index's order."""
        return tuple(shard.name for shard in self.checkpoint.shards)

    def merges_in(self, shard: str) -> dict[str, TensorMerge]:
        """``{tensor name: TensorMerge}`` for the tensors of ``shard`` that change."""
        return {m.tensor: m for m in self.merges if m.shard == shard}


def _normalise(key):
    # As io.peft looks base weights up: without '.weight', without PEFT's prefix.
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _candidates(module):
    other = module[len("model."):] if module.startswith("model.") else "model." + module
    return [module, other]


def _finite_scaling(value, where, what="scaling", fix="lower lora_alpha"):
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(value)):
            raise LoraConfigError(f"{where}: {what} {value!r} is not finite in float32; {fix}")
    return value


def _scaling(config, module, rank, adapter_file):
    alpha = config.alpha_for(module)
    value = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    return _finite_scaling(value, f"{adapter_file}: module {module!r}")


def _read_adapter(adapter):
    """(config, weights file, {module: (a_key, b_key, a_shape, b_shape, rank)}) of one adapter."""
    adapter_dir = as_path(adapter, "adapter")
    if not adapter_dir.is_dir():
        raise LoraFormatError(f"adapter {adapter_dir} is not a directory")
    config = read_adapter_config(adapter_dir)
    adapter_file = adapter_dir / WEIGHTS_NAME
    if not adapter_file.is_file():
        raise LoraFormatError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    weights = SafetensorsFile(adapter_file)
    modules = adapter_modules(weights)
    if not modules:
        raise LoraFormatError(f"{adapter_file} holds no LoRA tensors")
    entries = {}
    for module, keys in modules.items():
        a_key, b_key = keys["A"], keys["B"]
        for key in (a_key, b_key):
            check_float_tensor(weights, key, "LoRA factors")
        a_shape, b_shape = weights.shape(a_key), weights.shape(b_key)
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise LoraFormatError(
                f"{adapter_file}: tensor {b_key!r} has shape {b_shape}, expected "
                f"(out_features, {rank}) to match {a_key!r} of shape {a_shape}")
        if rank != config.rank_for(module):
            raise LoraFormatError(
                f"{adapter_file}: tensor {a_key!r} has rank {rank}, but {CONFIG_NAME} gives "
                f"module {module!r} rank {config.rank_for(module)} (r or rank_pattern)")
        entries[module] = (a_key, b_key, a_shape, b_shape, rank)
    return config, adapter_file, entries


def _check_weighting(adapter, weights, combination):
    """``(list of adapter paths, list of float weights, combination)``, checked."""
    if isinstance(adapter, (list, tuple)):
        adapters = list(adapter)
        if not adapters:
            raise LoraConfigError("adapter is an empty list; give one adapter directory or more")
        if weights is None:
            raise LoraConfigError(
                f"a weighted merge of {len(adapters)} adapter(s) needs weights=[...], one "
                "number per adapter")
    else:
        if weights is not None or combination is not None:
            raise LoraConfigError(
                "weights and combination are for a weighted merge: give adapter as a list of "
                "adapter directories")
        return [adapter], None, "none"
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise LoraTypeError(
            f"weights must be a list of numbers, one per adapter, got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) != len(adapters):
        raise LoraConfigError(
            f"weights has {len(weights)} number(s) for {len(adapters)} adapter(s); give one each")
    checked = []
    for i, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.integer,
                                                                   np.floating)):
            raise LoraTypeError(f"weights[{i}] must be a real number, got {type(w).__name__} "
                                f"{w!r}")
        w = float(w)
        with np.errstate(over="ignore"):
            finite = math.isfinite(w) and np.isfinite(np.float32(w))
        if not finite:
            raise LoraConfigError(f"weights[{i}] must be finite in float32, got {w!r}")
        checked.append(w)
    if combination is None:
        combination = "cat"
    if not isinstance(combination, str) or combination not in COMBINATIONS:
        raise LoraConfigError(
            f"combination must be one of {', '.join(map(repr, COMBINATIONS))} (PEFT's "
            f"add_weighted_adapter types that are exact), got {combination!r}")
    if len(adapters) == 1:
        combination = "linear"  # as PEFT: one adapter is always combined linearly
    return adapters, checked, combination


def plan_merge(base: str | os.PathLike[str],
               adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
               dtype: str = "keep", weights: Sequence[float] | None = None,
               combination: str | None = None) -> MergePlan:
    """Check adapters against a checkpoint and return the :class:`MergePlan`.

    Reads the checkpoint's index and shard headers and the adapters'
    configs and headers; no tensor data.  Parameters as for
    :func:`numba_lora.checkpoint.merge`.
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LoraConfigError(
            f"dtype must be 'keep' (each tensor keeps its stored dtype), got {dtype!r}")
    adapters, weights, combination = _check_weighting(adapter, weights, combination)
    checkpoint = read_checkpoint(base)
    read = [_read_adapter(a) for a in adapters]
    files = [adapter_file for _, adapter_file, _ in read]
    if len(set(files)) != len(files):
        raise LoraConfigError("the same adapter directory is given twice; give each once "
                              "(its weight can be any number)")
    configs = [config for config, _, _ in read]
    fan_in_fan_out = configs[0].fan_in_fan_out
    for config, adapter_file in zip(configs, files):
        if config.fan_in_fan_out != fan_in_fan_out:
            raise LoraConfigError(
                f"{files[0].parent} and {adapter_file.parent} disagree on fan_in_fan_out; "
                "adapters merged together must be for the same layout")

    lookup = {}
    for name in checkpoint.where:
        lookup.setdefault(_normalise(name), []).append(name)
    found = {}  # tensor -> [(adapter index, module, entry)], in first-seen order
    for k, (_, adapter_file, entries) in enumerate(read):
        claimed = {}
        for module, entry in entries.items():
            candidates = _candidates(module)
            hits = [key for c in candidates for key in lookup.get(c, ())]
            if not hits:
                raise LoraKeyError(
                    f"{adapter_file}: no tensor in {checkpoint.directory} for adapter module "
                    f"{module!r} (looked for " + ", ".join(repr(c) for c in candidates)
                    + ", with or without a '.weight' suffix)")
            if len(hits) > 1:
                raise LoraFormatError(
                    f"{checkpoint.directory} holds {len(hits)} tensors for adapter module "
                    f"{module!r}: " + " and ".join(repr(k) for k in hits) + "; keep one")
            tensor = hits[0]
            if tensor in claimed:
                raise LoraFormatError(
                    f"{adapter_file}: modules {claimed[tensor]!r} and {module!r} both adapt "
                    f"tensor {tensor!r}")
            claimed[tensor] = module
            _, _, a_shape, b_shape, _ = entry
            shard = checkpoint.where[tensor]
            info = next(s for s in checkpoint.shards if s.name == shard).tensor(tensor)
            where = f"{checkpoint.directory / shard}: tensor {tensor!r}"
            if info.dtype not in FLOAT_DTYPES:
                raise LoraFormatError(
                    f"{where} has dtype {info.dtype}; a merged weight must be "
                    f"{', '.join(FLOAT_DTYPES)}")
            expected = ((a_shape[1], b_shape[0]) if fan_in_fan_out
                        else (b_shape[0], a_shape[1]))
            if info.shape != expected:
                layout = ("(in_features, out_features), fan_in_fan_out" if fan_in_fan_out
                          else "(out_features, in_features)")
                raise LoraFormatError(
                    f"{where} has shape {info.shape}, but {entry[0]!r} {a_shape} and "
                    f"{entry[1]!r} {b_shape} of {adapter_file} need {expected} {layout}")
            found.setdefault(tensor, []).append((k, module, entry))

    if combination == "none":
        merges = []
        for tensor, [(_, module, (a_key, b_key, _, _, rank))] in found.items():
            scaling = _scaling(configs[0], module, rank, files[0])
            merges.append(TensorMerge(
                tensor, checkpoint.where[tensor], module,
                (FactorSource(files[0], a_key, b_key, rank, scaling),), rank, scaling,
                fan_in_fan_out))
        return MergePlan(checkpoint, tuple(files), tuple(merges), dtype)

    # PEFT's add_weighted_adapter: the combined adapter has, for every module,
    # rank new_rank and lora_alpha new_rank (patterns dropped), and the first
    # adapter's other settings, use_rslora included: its scaling is 1, or
    # sqrt(new_rank) when the first adapter uses rsLoRA.
    ranks = [max([config.r, *config.rank_pattern.values()]) for config in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise LoraConfigError(
                "combination 'linear' needs adapters of one rank (r, and the largest "
                f"rank_pattern entry), got {ranks}; use combination='cat'")
        new_rank = ranks[0]
    else:
        new_rank = sum(ranks)
    new_scaling = _finite_scaling(
        new_rank / (math.sqrt(new_rank) if configs[0].use_rslora else new_rank),
        "the combined adapter")
    merges = []
    for tensor, hits in found.items():
        sources = []
        for k, module, (a_key, b_key, _, _, rank) in hits:
            scaling = _scaling(configs[k], module, rank, files[k])
            # The factors are multiplied by weight * scaling ("cat") or by
            # its square root ("linear"), in float32: refuse an overflow.
            _finite_scaling(weights[k] * scaling, f"{files[k]}: module {module!r}",
                            f"weights[{k}] times its scaling,", "lower the weight")
            sources.append(FactorSource(files[k], a_key, b_key, rank, scaling, weights[k]))
        if combination == "linear" and len({src.rank for src in sources}) != 1:
            raise LoraConfigError(
                f"combination 'linear': tensor {tensor!r} has ranks "
                f"{[src.rank for src in sources]} in the adapters; linear needs one rank")
        rank = sources[0].rank if combination == "linear" else new_rank
        merges.append(TensorMerge(tensor, checkpoint.where[tensor], hits[0][1], tuple(sources),
                                  rank, new_scaling, fan_in_fan_out, combination))
    return MergePlan(checkpoint, tuple(files), tuple(merges), dtype, combination)
