"""PEFT's LoRA adapter files, read and written without torch.

PEFT's ``save_pretrained`` writes a directory with ``adapter_config.json``
and ``adapter_model.safetensors``; the tensors are named
``base_model.model.<module>.lora_A.weight`` (rank, in_features) and
``base_model.model.<module>.lora_B.weight`` (out_features, rank).  This module
maps that format onto :class:`~numba_lora.LoraAdapter` and back.  Anything
that would change the numbers and that numba_lora does not implement is
refused by name, never skipped.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from .._validate import as_array
from ..config import OWNED_KEYS, LoraConfig, check_field
from ..errors import (
    LoraConfigError,
    LoraDtypeError,
    LoraFormatError,
    LoraKeyError,
    LoraTypeError,
    LoraUnsupportedError,
)
from .safetensors import SafetensorsFile, ShardedSafetensors, as_path, open_weights
from ._fs import quietly as _quietly

if TYPE_CHECKING:  # adapter.py imports this module
    from ..adapter import LoraAdapter

__all__ = ["load_peft", "save_peft", "check_module_name", "module_aliases",
           "read_adapter_config", "adapter_modules", "check_float_tensor",
           "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "FLOAT_DTYPES"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Config entries that change a LoRA model's outputs in ways numba_lora does
# not implement: (key, test that the entry is in use, what to call it).
_UNSUPPORTED_CONFIG = (
    ("use_dora", bool, "use_dora (DoRA, weight-decomposed LoRA)"),
    ("lora_bias", bool, "lora_bias (a trainable bias on lora_B)"),
    ("bias", lambda v: v not in (None, "none"), "bias (trained base-layer biases)"),
    ("modules_to_save", bool, "modules_to_save (fully trained extra modules)"),
    ("layer_replication", bool, "layer_replication"),
    ("trainable_token_indices", bool, "trainable_token_indices (trainable tokens)"),
    ("target_parameters", bool, "target_parameters (LoRA on bare parameters)"),
    ("use_qalora", bool, "use_qalora (QA-LoRA)"),
    ("alora_invocation_tokens", bool, "alora_invocation_tokens (activated LoRA)"),
    # Newer variants whose forward pass differs from plain LoRA.  Settings
    # that only shape initialisation (loftq_config, eva_config, corda_config,
    # lora_ga_config, init_lora_weights) are harmless here: the file already
    # holds the trained factors.
    ("arrow_config", bool, "arrow_config (Arrow routing)"),
    ("kasa_config", bool, "kasa_config (KaSA)"),
    ("use_bdlora", bool, "use_bdlora"),
    ("monteclora_config", bool, "monteclora_config (MonteCLoRA)"),
)

# Tensor-name fragments of features numba_lora refuses.
_UNSUPPORTED_TENSORS = (
    ("lora_embedding_A", "embedding adapters"),
    ("lora_embedding_B", "embedding adapters"),
    ("lora_magnitude_vector", "DoRA magnitude vectors (use_dora)"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_tokens", "trainable tokens"),
)

#: safetensors dtypes a LoRA factor or a base weight may have.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# adapter_config.json keys read into LoraConfig fields of the same name:
# (key, required).  A JSON null counts as absent: PEFT writes null for unset
# optional entries.  Every other key goes, as it is, into LoraConfig.extra,
# and save_peft writes it back.
_CONFIG_FIELDS = (
    ("r", True),
    ("lora_alpha", True),
    ("lora_dropout", False),
    ("target_modules", False),
    ("fan_in_fan_out", False),
    ("use_rslora", False),
    ("rank_pattern", False),
    ("alpha_pattern", False),
    ("base_model_name_or_path", False),
    ("revision", False),
    ("task_type", False),
)

# What save_peft writes for PEFT's keys that neither the config's fields nor
# its extra entries give: the values that mean plain LoRA.
_SAVE_DEFAULTS = {
    "bias": "none",
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
}


# ------------------------------------------------------------------- names
def check_module_name(name: str) -> str:
    """Return ``name`` if :func:`save_peft` writes it so that :func:`load_peft` reads it back.

    The rule, derived from how tensor keys are parsed on the way in:

    - a non-empty ``str`` of printable characters, with no whitespace;
    - dotted components, none empty (no leading, trailing or double dots);
    - no component ``lora_A`` or ``lora_B`` (the key's own markers);
    - none of the fragments that mark features refused on reading
      (``lora_embedding_A``, ``lora_magnitude_vector``, ``modules_to_save``, ...);
    - not starting with ``base_model.model.`` (the prefix every key gets,
      stripped once on reading and from base-weight names).

    Parameters
    ----------
    name : str
        A layer (module) name, such as ``"model.layers.0.self_attn.q_proj"``.

    Returns
    -------
    str
        ``name`` itself.

    Raises
    ------
    LoraTypeError
        If ``name`` is not a str.
    LoraConfigError
        If it breaks the rule; the message says which part.
    """
    if not isinstance(name, str):
        raise LoraTypeError(f"layer name must be a str, got {type(name).__name__} {name!r}")

    if not name:
        raise LoraConfigError("layer name must be a non-empty string, got ''")

    def refuse(why):
        raise LoraConfigError(f"layer name {name!r} cannot be saved in PEFT's format: {why}")

    if not name.isprintable() or any(ch.isspace() for ch in name):
        refuse("it contains whitespace or non-printable characters")
    if any(not part for part in name.split(".")):
        refuse("it has an empty component (a leading, trailing or double dot)")
    for part in name.split("."):
        if part in ("lora_A", "lora_B"):
            refuse(f"the component {part!r} marks the LoRA factors in tensor names")
    for fragment, what in _UNSUPPORTED_TENSORS:
        if fragment in name:
            refuse(f"{fragment!r} marks {what}, which are refused on reading")
    if name.startswith(PREFIX):
        refuse(f"it starts with {PREFIX!r}, the prefix of every saved tensor name")
    return name


def module_aliases(name: str) -> set[str]:
    """Other module names whose base weight a lookup for ``name`` would also find.

    Base weights are found with or without a leading ``model.``, so layers
    ``x`` and ``model.x`` cannot both be loaded from one set of base weights.

    Parameters
    ----------
    name : str
        A layer (module) name.

    Returns
    -------
    set of str
        The other names (``model.`` added, or removed where it leads).
    """
    aliases = {"model." + name}
    if name.startswith("model."):
        aliases.add(name[len("model."):])
    return aliases


# --------------------------------------------------------------------- reading
def read_adapter_config(path: Path) -> LoraConfig:
    """The :class:`~numba_lora.LoraConfig` of the PEFT adapter directory ``path``, checked.

    Reads ``path / "adapter_config.json"``.  Keys numba_lora models become
    the config's fields; every other key is kept, as it is, in
    ``LoraConfig.extra``.

    Parameters
    ----------
    path : pathlib.Path
        The adapter directory.

    Returns
    -------
    LoraConfig
        The adapter's configuration; unmodelled keys in ``extra``.

    Raises
    ------
    LoraFormatError
        The file is missing, not UTF-8 JSON, not an object, lacks ``r`` or
        ``lora_alpha``, or holds a value of the wrong type (the message
        names the file and the key).
    LoraUnsupportedError
        A PEFT type other than LORA, or a setting that changes the outputs
        in a way numba_lora does not implement (DoRA, ``lora_bias``,
        ``modules_to_save``, ...), named.
    """
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise LoraFormatError(f"{path} has no {CONFIG_NAME}")
    try:
        text = config_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{config_path} is not UTF-8 text: {exc}") from None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise LoraFormatError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LoraFormatError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoraUnsupportedError(f"peft_type {peft_type!r}: only LORA adapters are supported")
    for key, in_use, what in _UNSUPPORTED_CONFIG:
        if key in raw and in_use(raw[key]):
            raise LoraUnsupportedError(
                f"{CONFIG_NAME} sets {key}={raw[key]!r}: {what} is not supported by numba_lora"
            )
    kwargs = {}
    for key, required in _CONFIG_FIELDS:
        value = raw.get(key)
        if value is None:
            if required:
                raise LoraFormatError(f"{config_path} has no {key!r}" if key not in raw
                                      else f"{config_path}: {key!r} is null")
            continue
        try:
            kwargs[key] = check_field(key, value)
        except LoraConfigError as exc:
            raise LoraFormatError(f"{config_path}: {key!r}: {exc}") from None
    kwargs["extra"] = {key: value for key, value in raw.items() if key not in OWNED_KEYS}
    return LoraConfig(**kwargs)


def adapter_modules(weights: SafetensorsFile) -> dict[str, dict[str, str]]:
    """``{module: {"A": key, "B": key}}`` from an adapter file's tensor names, in file order.

    Parameters
    ----------
    weights : SafetensorsFile
        ``adapter_model.safetensors``, its header read.

    Returns
    -------
    dict
        Module name (PEFT's ``base_model.model.`` prefix removed) to the
        keys of its ``lora_A`` and ``lora_B`` weights.

    Raises
    ------
    LoraFormatError
        A tensor that is not a ``lora_A`` / ``lora_B`` weight, a module
        name that would not load back, two tensors for one factor, a factor
        without its partner.
    LoraUnsupportedError
        Tensors of features numba_lora refuses (embedding adapters, DoRA
        magnitudes, ``lora_bias``, ``modules_to_save``, convolution
        adapters), named.
    """
    modules = {}
    for key in weights.keys():
        for fragment, what in _UNSUPPORTED_TENSORS:
            if fragment in key:
                raise LoraUnsupportedError(f"tensor {key!r}: {what} are not supported by numba_lora")
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in name:
                module, _, rest = name.partition(marker)
                break
        else:
            raise LoraFormatError(f"{weights.path}: tensor {key!r} is not a lora_A or lora_B weight")
        if rest == "bias":
            raise LoraUnsupportedError(f"tensor {key!r}: lora_bias is not supported by numba_lora")
        if rest != "weight":
            raise LoraFormatError(
                f"{weights.path}: tensor {key!r}: expected a name ending in .lora_{part}.weight")
        try:
            check_module_name(module)
        except (LoraConfigError, LoraTypeError) as exc:
            raise LoraFormatError(f"{weights.path}: tensor {key!r}: {exc}") from None
        shape = weights.shape(key)
        if len(shape) != 2:
            raise LoraUnsupportedError(
                f"tensor {key!r} has shape {shape}: only linear (2-D) adapters are "
                "supported, not convolution adapters"
            )
        entry = modules.setdefault(module, {})
        if part in entry:
            raise LoraFormatError(
                f"{weights.path}: tensors {entry[part]!r} and {key!r} are both the lora_{part} "
                f"weight of module {module!r}; keep one"
            )
        entry[part] = key
    for module, entry in modules.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in entry:
                raise LoraFormatError(
                    f"{weights.path}: tensor {entry[other]!r} has no matching lora_{part} weight "
                    f"({PREFIX}{module}.lora_{part}.weight)"
                )
    return modules


def check_float_tensor(file: SafetensorsFile | ShardedSafetensors, key: str,
                       what: str) -> None:
    """Raise LoraFormatError unless tensor ``key`` of ``file`` has a float dtype.

    The float dtypes are :data:`FLOAT_DTYPES` (F16, BF16, F32, F64).

    ``file`` is a :class:`~numba_lora.io.safetensors.SafetensorsFile` or a
    :class:`~numba_lora.io.safetensors.ShardedSafetensors`; ``what`` names the
    tensor's role in the message ("LoRA factors", "base weights").

    Parameters
    ----------
    file : SafetensorsFile or ShardedSafetensors
        Where the tensor is.
    key : str
        The tensor's name.
    what : str
        The tensor's role, for the message.
    """
    dtype = file.dtype(key)
    if dtype not in FLOAT_DTYPES:
        raise LoraFormatError(
            f"{file.file_of(key)}: tensor {key!r} has dtype {dtype}; {what} must be floating point "
            f"({', '.join(FLOAT_DTYPES)})"
        )


def _normalise(key):
    name = str(key)
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    return name


class _BaseWeights:
    """Base weights by module name, from a mapping or (read lazily) a safetensors file."""

    def __init__(self, base_weights):
        if isinstance(base_weights, (str, os.PathLike)):
            self._file = open_weights(base_weights)
            keys = self._file.keys()
        elif isinstance(base_weights, Mapping):
            self._file = None
            self._mapping = base_weights
            keys = list(base_weights)
        else:
            raise LoraTypeError(
                "base_weights must be a mapping {name: array}, or the path of a .safetensors "
                "file, a safetensors index or a model directory, got "
                f"{type(base_weights).__name__}"
            )
        self._lookup = {}
        for key in keys:
            self._lookup.setdefault(_normalise(key), []).append(key)

    def find(self, module):
        """(key, array) of the base weight of ``module``."""
        candidates = [module]
        if module.startswith("model."):
            candidates.append(module[len("model."):])
        else:
            candidates.append("model." + module)
        hits = [key for candidate in candidates for key in self._lookup.get(candidate, ())]
        if not hits:
            raise LoraKeyError(
                f"no base weight for adapter module {module!r} (looked for "
                + ", ".join(repr(c) for c in candidates)
                + ", with or without a '.weight' suffix)"
            )
        if len(hits) > 1:
            where = f"{self._file.path} holds" if self._file else "base_weights hold"
            raise LoraFormatError(
                f"{where} {len(hits)} weights for adapter module {module!r}: "
                + " and ".join(repr(k) for k in hits) + "; keep one"
            )
        key = hits[0]
        if self._file is not None:
            check_float_tensor(self._file, key, "base weights")
            return key, self._file.read(key)
        W = as_array(self._mapping[key], f"base weight {key!r}")
        if W.dtype.kind != "f":
            raise LoraDtypeError(
                f"base weight {key!r} has dtype {W.dtype}; base weights must be float16, "
                "float32 or float64"
            )
        return key, W


def load_peft(cls: type[LoraAdapter], path: str | os.PathLike[str],
              base_weights: Mapping[str, ArrayLike] | str | os.PathLike[str], *,
              quantize: str | None = None) -> LoraAdapter:
    """Build ``cls`` (a LoraAdapter) from a PEFT adapter directory; see ``LoraAdapter.from_peft``.

    Parameters
    ----------
    path : str or os.PathLike
        The adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
    base_weights : mapping or str or os.PathLike
        ``{module name: weight}``, or safetensors weights as :func:`open_weights` reads them.
    quantize : {None, "nf4"}, optional
        Passed to ``add_layer`` for every layer.

    Returns
    -------
    LoraAdapter
        A new adapter of class ``cls`` (the first argument), one layer per module.

    Notes
    -----
    Base weights read from files come from :meth:`SafetensorsFile.read
    <numba_lora.io.safetensors.SafetensorsFile.read>`, which widens bfloat16
    to float32 exactly; a float16 base is widened by the layer.  Each layer
    then holds its base in float32, twice the bytes of the bfloat16 tensor:
    its forward is a float32 BLAS product and Numba has no bfloat16 type (see
    ``LoraAdapter.from_peft`` and ``docs/design.rst``).
    """
    if quantize not in (None, "nf4"):
        raise LoraConfigError(f"quantize must be None or 'nf4', got {quantize!r}")
    path = as_path(path)
    config = read_adapter_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise LoraFormatError(f"{path} has no {WEIGHTS_NAME}")
    weights = SafetensorsFile(weights_path)
    modules = adapter_modules(weights)
    if not modules:
        raise LoraFormatError(f"{weights_path} holds no LoRA tensors")
    for entry in modules.values():
        for key in entry.values():
            check_float_tensor(weights, key, "LoRA factors")
    base = _BaseWeights(base_weights)
    factors = weights.read_many([key for entry in modules.values() for key in entry.values()])
    # Files numba_lora saved list every layer in target_modules, in order:
    # keep that order; others keep the file's.
    position = {name: i for i, name in enumerate(config.target_modules)}
    order = sorted(modules, key=lambda m: position.get(m, len(position)))
    adapter = cls(config)
    for module in order:
        a_key, b_key = modules[module]["A"], modules[module]["B"]
        A, B = factors[a_key], factors[b_key]
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise LoraFormatError(
                f"{weights_path}: tensor {b_key!r} has shape {B.shape}, expected "
                f"(out_features, {rank}) to match {a_key!r} of shape {A.shape}"
            )
        expected_rank = config.rank_for(module)
        if rank != expected_rank:
            raise LoraFormatError(
                f"{weights_path}: tensor {a_key!r} has rank {rank}, but {CONFIG_NAME} gives "
                f"module {module!r} rank {expected_rank} (r or rank_pattern)"
            )
        base_key, W = base.find(module)
        expected = (A.shape[1], B.shape[0]) if config.fan_in_fan_out else (B.shape[0], A.shape[1])
        if W.shape != expected:
            layout = "(in_features, out_features), fan_in_fan_out" if config.fan_in_fan_out \
                else "(out_features, in_features)"
            raise LoraFormatError(
                f"base weight {base_key!r} has shape {W.shape}, but {a_key!r} {A.shape} and "
                f"{b_key!r} {B.shape} need {expected} {layout}"
            )
        try:
            layer = adapter.add_layer(module, W, quantize=quantize)
        except LoraConfigError as exc:
            raise LoraFormatError(f"{weights_path}: tensor {a_key!r}: {exc}") from None
        layer.lora_a = A
        layer.lora_b = B
    return adapter


# --------------------------------------------------------------------- writing
def _check_savable(adapter):
    """Refuse, before anything is written, what would not load back as it is."""
    if len(adapter) == 0:
        raise LoraFormatError("cannot save an adapter with no layers")
    config = adapter.config.validate()
    for key, in_use, what in _UNSUPPORTED_CONFIG:
        if key in config.extra and in_use(config.extra[key]):
            raise LoraUnsupportedError(
                f"config.extra sets {key}={config.extra[key]!r}: {what} is not supported by "
                "numba_lora, and the saved adapter would not load back")
    for name, layer in adapter.items():
        check_module_name(name)
        # The file records the config, not each layer: a config changed after
        # the layers were added would load with other ranks or scalings.
        want = (config.rank_for(name), config.alpha_for(name), config.use_rslora)
        have = (layer.rank, layer.alpha, layer.use_rslora)
        if have != want:
            raise LoraConfigError(
                f"layer {name!r} has (rank, alpha, use_rslora) = {have}, but the adapter's "
                f"config gives it {want}; the saved file would load with the config's values"
            )
    return config


def save_peft(adapter: LoraAdapter, path: str | os.PathLike[str]) -> None:
    """Write ``adapter`` as a PEFT adapter directory; see ``LoraAdapter.save_peft``.

    Both files are written to temporary names in the target directory and
    then renamed over the final ones (the files of an earlier save are moved
    aside first), so a failed write leaves the directory as it was: no
    partial or temporary file, the earlier adapter intact, and no directory
    this call created.

    Parameters
    ----------
    adapter : LoraAdapter
        The adapter to write: at least one layer, each as its config says.
    path : str or os.PathLike
        The directory; created if missing.
    """
    from safetensors.numpy import save_file

    path = as_path(path)
    config = _check_savable(adapter)
    tensors = {}
    for name, layer in adapter.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(layer.lora_a)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(layer.lora_b)
    # PEFT re-creates the adapter on the modules that target_modules names
    # (a list matches name suffixes, a string is a regex): the full module
    # names match exactly the modules saved here.
    targets = adapter.layer_names
    # The entries of the file the config was read from (config.extra) are
    # written back as they were; numba_lora's own overwrite them.  Sorted
    # keys, as PEFT writes them.
    payload = {**_SAVE_DEFAULTS, **config.extra}
    payload.update({
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets,
        "fan_in_fan_out": config.fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "inference_mode": True,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
    })
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    if path.exists() and not path.is_dir():
        raise LoraConfigError(f"cannot save the adapter to {path}: it exists and is not a directory")
    created = []  # directories this call makes, deepest first
    parent = path
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        # mkdir would raise NotADirectoryError (or FileExistsError): say why.
        raise LoraConfigError(
            f"cannot save the adapter to {path}: {parent} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    tmp_weights = path / f".{WEIGHTS_NAME}.{token}.tmp"
    tmp_config = path / f".{CONFIG_NAME}.{token}.tmp"
    moves = ((tmp_weights, path / WEIGHTS_NAME), (tmp_config, path / CONFIG_NAME))
    aside = []   # (backup, final): files of an earlier save, moved out of the way
    placed = []  # finals this call has put in place
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        with open(tmp_config, "x", encoding="utf-8") as fh:
            fh.write(text)
        for tmp, final in moves:
            if final.exists():
                backup = path / f".{final.name}.{token}.bak"
                os.replace(final, backup)
                aside.append((backup, final))
            os.replace(tmp, final)
            placed.append(final)
    except BaseException:
        # Put the directory back as it was: no temporary file, no new file
        # beside an old one, the earlier save (if any) restored.
        for final in placed:
            _quietly(final.unlink, missing_ok=True)
        for backup, final in aside:
            _quietly(os.replace, backup, final)
        for tmp, _ in moves:
            _quietly(tmp.unlink, missing_ok=True)
        for directory in created:
            if not _quietly(directory.rmdir):
                break
        raise
    for backup, _ in aside:
        _quietly(backup.unlink, missing_ok=True)

