"""PEFT's LoRA adapter files, read and written without torch.

PEFT's ``save_pretrained`` writes a directory with ``adapter_config.json``
and ``adapter_model.safetensors``; the tensors are named
``base_model.model.<module>.lora_A.weight`` (rank, in_features) and
``base_model.model.<module>.lora_B.weight`` (out_features, rank).  This module
maps that format onto :class:`~numba_lora.LoraAdapter` and back.  Anything
that would change the numbers and that numba_lora does not implement is
refused by name, never skipped.
"""

import json
import os
from pathlib import Path

import numpy as np

from ..config import LoraConfig
from .safetensors import read_safetensors
from ..errors import LoraFormatError, LoraKeyError, LoraUnsupportedError

__all__ = ["load_peft", "save_peft", "CONFIG_NAME", "WEIGHTS_NAME"]

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


# --------------------------------------------------------------------- reading
def _read_config(path):
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise LoraFormatError(f"{path} has no {CONFIG_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
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
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise LoraFormatError(f"{CONFIG_NAME} has no {key!r}")
    target = raw.get("target_modules") or ()
    return LoraConfig(
        rank=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout", 0.0) or 0.0,
        target_modules=(target,) if isinstance(target, str) else tuple(target),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
    )


def _module_pairs(tensors):
    """{module: {"A": array, "B": array}} from adapter tensor names."""
    modules = {}
    for key, value in tensors.items():
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
            raise LoraFormatError(f"tensor {key!r} is not a lora_A or lora_B weight")
        if rest == "bias":
            raise LoraUnsupportedError(f"tensor {key!r}: lora_bias is not supported by numba_lora")
        if rest != "weight":
            raise LoraFormatError(f"tensor {key!r}: expected a name ending in .lora_{part}.weight")
        value = np.asarray(value)
        if value.ndim != 2:
            raise LoraUnsupportedError(
                f"tensor {key!r} has shape {value.shape}: only linear (2-D) adapters are "
                "supported, not convolution adapters"
            )
        entry = modules.setdefault(module, {})
        entry[part] = (key, value)
    for module, entry in modules.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in entry:
                raise LoraFormatError(
                    f"tensor {entry[other][0]!r} has no matching lora_{part} weight "
                    f"({PREFIX}{module}.lora_{part}.weight)"
                )
    return modules


def _base_lookup(base_weights):
    """{normalised module name: (original key, array)} for the base weights."""
    if isinstance(base_weights, (str, os.PathLike)):
        base_weights = read_safetensors(base_weights)
    lookup = {}
    for key, value in base_weights.items():
        name = str(key)
        if name.endswith(".weight"):
            name = name[: -len(".weight")]
        if name.startswith(PREFIX):
            name = name[len(PREFIX):]
        lookup.setdefault(name, (key, value))
    return lookup


def _find_base(lookup, module):
    candidates = [module]
    if module.startswith("model."):
        candidates.append(module[len("model."):])
    else:
        candidates.append("model." + module)
    for candidate in candidates:
        if candidate in lookup:
            return lookup[candidate]
    raise LoraKeyError(
        f"no base weight for adapter module {module!r} (looked for "
        + ", ".join(repr(c) for c in candidates)
        + ", with or without a '.weight' suffix)"
    )


def load_peft(cls, path, base_weights):
    """Build ``cls`` (a LoraAdapter) from a PEFT adapter directory; see ``LoraAdapter.from_peft``."""
    path = Path(path)
    config = _read_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise LoraFormatError(f"{path} has no {WEIGHTS_NAME}")
    modules = _module_pairs(read_safetensors(weights_path))
    if not modules:
        raise LoraFormatError(f"{weights_path} holds no LoRA tensors")
    lookup = _base_lookup(base_weights)
    adapter = cls(config)
    for module, entry in modules.items():
        (a_key, A), (b_key, B) = entry["A"], entry["B"]
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise LoraFormatError(
                f"tensor {b_key!r} has shape {B.shape}, expected (out_features, {rank}) "
                f"to match {a_key!r} of shape {A.shape}"
            )
        expected_rank = config.rank_for(module)
        if rank != expected_rank:
            raise LoraFormatError(
                f"tensor {a_key!r} has rank {rank}, but {CONFIG_NAME} gives module {module!r} "
                f"rank {expected_rank} (r or rank_pattern)"
            )
        base_key, W = _find_base(lookup, module)
        W = np.asarray(W)
        expected = (A.shape[1], B.shape[0]) if config.fan_in_fan_out else (B.shape[0], A.shape[1])
        if W.shape != expected:
            layout = "(in_features, out_features), fan_in_fan_out" if config.fan_in_fan_out \
                else "(out_features, in_features)"
            raise LoraFormatError(
                f"base weight {base_key!r} has shape {W.shape}, but {a_key!r} {A.shape} and "
                f"{b_key!r} {B.shape} need {expected} {layout}"
            )
        layer = adapter.add_layer(module, W)
        layer.lora_a = A
        layer.lora_b = B
    return adapter


# --------------------------------------------------------------------- writing
def save_peft(adapter, path):
    """Write ``adapter`` as a PEFT adapter directory; see ``LoraAdapter.save_peft``."""
    from safetensors.numpy import save_file

    if len(adapter) == 0:
        raise LoraFormatError("cannot save an adapter with no layers")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter.config
    tensors = {}
    for name, layer in adapter.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(layer.lora_a)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(layer.lora_b)
    # PEFT re-creates the adapter on the modules that target_modules names
    # (a list matches name suffixes, a string is a regex): the full module
    # names match exactly the modules saved here.
    targets = adapter.layer_names
    payload = {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "fan_in_fan_out": config.fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": None,
    }
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
