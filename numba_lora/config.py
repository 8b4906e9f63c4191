"""``LoraConfig``: the settings an adapter's layers share, as PEFT names them."""

import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from ._validate import check_alpha, check_rank
from .errors import LoraConfigError

__all__ = ["LoraConfig", "pattern_key", "check_field"]


def _pattern_regex(key):
    return rf"(.*\.)?({key})$"


def pattern_key(patterns, module_name):
    """The first key of ``patterns`` that matches the end of ``module_name``, or None.

    PEFT's rule for ``rank_pattern`` and ``alpha_pattern``: a key is a regular
    expression that must match a whole trailing run of dotted components,
    ``re.match(rf"(.*\\.)?({key})$", module_name)``; keys are tried in order.
    """
    for key in patterns:
        if re.match(_pattern_regex(key), module_name):
            return key
    return None


# ------------------------------------------------------------ field checks
# One function per field: each returns the converted value or raises
# LoraConfigError whose message starts with the field's name.  LoraConfig
# uses them, and the PEFT reader uses them to name the JSON key at fault.
def _check_dropout(dropout):
    if (isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real)
            or not 0.0 <= dropout <= 1.0):  # NaN fails the range test too
        raise LoraConfigError(f"dropout must be a number in [0, 1], got {dropout!r}")
    return float(dropout)


def _check_targets(targets):
    if targets is None:
        return ()
    if isinstance(targets, str):
        return (targets,)
    if isinstance(targets, (bytes, Mapping)) or not isinstance(targets, Iterable):
        raise LoraConfigError(
            "target_modules must be a string or a sequence of strings, got "
            f"{type(targets).__name__} {targets!r}"
        )
    targets = tuple(targets)
    for name in targets:
        if not isinstance(name, str):
            raise LoraConfigError(f"target_modules must hold strings, got {name!r}")
    return targets


def _check_bool(what):
    def check(value):
        if not isinstance(value, (bool, np.bool_)):
            raise LoraConfigError(f"{what} must be True or False, got {type(value).__name__} {value!r}")
        return bool(value)
    return check


def _check_patterns(what, check_value):
    def check(patterns):
        if patterns is None:
            return {}
        if not isinstance(patterns, Mapping):
            raise LoraConfigError(
                f"{what} must be a dict {{regex: value}}, got {type(patterns).__name__} {patterns!r}"
            )
        checked = {}
        for key, value in patterns.items():
            if not isinstance(key, str):
                raise LoraConfigError(f"{what} keys must be strings, got {key!r}")
            try:
                # Compiled as pattern_key uses it: "(?i)x" compiles alone but
                # not inside the suffix pattern.
                re.compile(_pattern_regex(key))
            except re.error as exc:
                raise LoraConfigError(
                    f"{what} key {key!r} is not a valid regular expression: {exc}"
                ) from None
            try:
                checked[key] = check_value(value)
            except LoraConfigError as exc:
                raise LoraConfigError(f"{what}[{key!r}]: {exc}") from None
        return checked
    return check


_FIELD_CHECKS = {
    "rank": check_rank,
    "alpha": check_alpha,
    "dropout": _check_dropout,
    "target_modules": _check_targets,
    "fan_in_fan_out": _check_bool("fan_in_fan_out"),
    "use_rslora": _check_bool("use_rslora"),
    "rank_pattern": _check_patterns("rank_pattern", check_rank),
    "alpha_pattern": _check_patterns("alpha_pattern", check_alpha),
}


def check_field(name, value):
    """``value`` checked and converted for :class:`LoraConfig` field ``name``.

    Raises
    ------
    LoraConfigError
        If ``value`` does not fit the field; the message names the field.
    """
    return _FIELD_CHECKS[name](value)


@dataclass
class LoraConfig:
    """Shared settings of an adapter's layers (PEFT's ``LoraConfig`` fields, our names).

    Parameters
    ----------
    rank : int
        Default rank (PEFT's ``r``), >= 1.
    alpha : float
        Default alpha (PEFT's ``lora_alpha``), finite and > 0.
    dropout : float, optional
        Training-time dropout in [0, 1]; kept for round trips, never applied
        (numba_lora does inference).
    target_modules : tuple of str, optional
        Module names the adapter targets, as PEFT records them.
    fan_in_fan_out : bool, optional
        Base weights are stored (in_features, out_features), as in GPT-2's
        ``Conv1D``; they are transposed on the way in.
    use_rslora : bool, optional
        ``scaling = alpha / sqrt(rank)`` instead of ``alpha / rank``.
    rank_pattern, alpha_pattern : dict, optional
        Per-module overrides; keys are regular expressions matched against
        the end of the module name (see :func:`pattern_key`).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple = ()
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Check every field; raise :class:`~numba_lora.LoraConfigError` naming the bad one."""
        # All checked before any is written back: a refusal changes nothing.
        checked = {f.name: check_field(f.name, getattr(self, f.name)) for f in fields(self)}
        for name, value in checked.items():
            setattr(self, name, value)
        return self

    def rank_for(self, module_name):
        """The rank of ``module_name``: its ``rank_pattern`` entry, else ``rank``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name):
        """The alpha of ``module_name``: its ``alpha_pattern`` entry, else ``alpha``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]
