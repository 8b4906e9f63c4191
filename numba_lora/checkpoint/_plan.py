"""Matching a PEFT adapter to a checkpoint's tensors: everything checked, nothing written.

A :class:`MergePlan` is the whole merge as data: for every shard, which
tensors change and with which factors (by key in the adapter file) and
scaling.  It is built from headers alone, pickles small, and is what a
worker needs to write one shard (see :meth:`MergePlan.write_shard`).
"""

import math
from dataclasses import dataclass

import numpy as np

from ..errors import LoraConfigError, LoraFormatError, LoraKeyError
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

__all__ = ["MergePlan", "TensorMerge", "plan_merge", "DTYPES"]

#: Accepted values of ``dtype``.
DTYPES = ("keep",)


@dataclass(frozen=True)
class TensorMerge:
    """One base tensor to update: ``W += scaling * B @ A`` (transposed for fan_in_fan_out)."""

    tensor: str
    shard: str
    module: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class MergePlan:
    """A checked merge: the base checkpoint's layout, the adapter file, the tensors to update.

    Built by :func:`plan_merge` from headers alone; small, and it pickles
    (a Dask task gets it whole).

    Attributes
    ----------
    checkpoint : Checkpoint
        The base: directory, index name, shards with their tensors' byte
        ranges, the other files to copy.
    adapter_file : pathlib.Path
        ``adapter_model.safetensors``; factors are read from it per tensor.
    merges : tuple of TensorMerge
        One per adapted tensor, in the adapter file's order.
    dtype : str
        ``"keep"``.
    """

    checkpoint: object
    adapter_file: object
    merges: tuple
    dtype: str

    @property
    def shards(self):
        """tuple of str: The shard file names, in the index's order."""
        return tuple(shard.name for shard in self.checkpoint.shards)

    def merges_in(self, shard):
        """``{tensor name: TensorMerge}`` for the tensors of ``shard`` that change."""
        return {m.tensor: m for m in self.merges if m.shard == shard}


def _normalise(key):
    # As io.peft looks base weights up: without '.weight', without PEFT's prefix.
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _candidates(module):
    other = module[len("model."):] if module.startswith("model.") else "model." + module
    return [module, other]


def _scaling(config, module, rank, adapter_file):
    alpha = config.alpha_for(module)
    value = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(value)):
            raise LoraConfigError(
                f"{adapter_file}: module {module!r}: scaling {value!r} is not finite in "
                "float32; lower lora_alpha")
    return value


def plan_merge(base, adapter, *, dtype="keep"):
    """Check an adapter against a checkpoint and return the :class:`MergePlan`.

    Reads the checkpoint's index and shard headers and the adapter's config
    and header; no tensor data.  Parameters as for
    :func:`numba_lora.checkpoint.merge`.
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LoraConfigError(
            f"dtype must be 'keep' (each tensor keeps its stored dtype), got {dtype!r}")
    checkpoint = read_checkpoint(base)
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

    lookup = {}
    for name in checkpoint.where:
        lookup.setdefault(_normalise(name), []).append(name)
    claimed = {}
    merges = []
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
        shard = checkpoint.where[tensor]
        info = next(s for s in checkpoint.shards if s.name == shard).tensor(tensor)
        where = f"{checkpoint.directory / shard}: tensor {tensor!r}"
        if info.dtype not in FLOAT_DTYPES:
            raise LoraFormatError(
                f"{where} has dtype {info.dtype}; a merged weight must be "
                f"{', '.join(FLOAT_DTYPES)}")
        expected = ((a_shape[1], b_shape[0]) if config.fan_in_fan_out
                    else (b_shape[0], a_shape[1]))
        if info.shape != expected:
            layout = ("(in_features, out_features), fan_in_fan_out" if config.fan_in_fan_out
                      else "(out_features, in_features)")
            raise LoraFormatError(
                f"{where} has shape {info.shape}, but {a_key!r} {a_shape} and {b_key!r} "
                f"{b_shape} need {expected} {layout}")
        merges.append(TensorMerge(tensor, shard, module, a_key, b_key, rank,
                                  _scaling(config, module, rank, adapter_file),
                                  config.fan_in_fan_out))
    return MergePlan(checkpoint, adapter_file, tuple(merges), dtype)
