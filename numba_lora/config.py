"""``LoraConfig``: the settings an adapter's layers share, as PEFT names them."""

import math
import numbers
import re
from dataclasses import dataclass, field

from ._validate import check_alpha, check_rank
from .errors import LoraConfigError

__all__ = ["LoraConfig", "pattern_key"]


def pattern_key(patterns, module_name):
    """The first key of ``patterns`` that matches the end of ``module_name``, or None.

    PEFT's rule for ``rank_pattern`` and ``alpha_pattern``: a key is a regular
    expression that must match a whole trailing run of dotted components,
    ``re.match(rf"(.*\\.)?({key})$", module_name)``; keys are tried in order.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


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
        self.rank = check_rank(self.rank)
        self.alpha = check_alpha(self.alpha)
        dropout = self.dropout
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
                or not math.isfinite(dropout) or not 0.0 <= dropout <= 1.0):
            raise LoraConfigError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules or ())
        for name in self.target_modules:
            if not isinstance(name, str):
                raise LoraConfigError(f"target_modules must hold strings, got {name!r}")
        self.rank_pattern = {self._pattern(k, "rank_pattern"): self._checked(check_rank, v, k, "rank_pattern")
                             for k, v in dict(self.rank_pattern or {}).items()}
        self.alpha_pattern = {self._pattern(k, "alpha_pattern"): self._checked(check_alpha, v, k, "alpha_pattern")
                              for k, v in dict(self.alpha_pattern or {}).items()}
        self.fan_in_fan_out = bool(self.fan_in_fan_out)
        self.use_rslora = bool(self.use_rslora)
        return self

    @staticmethod
    def _pattern(key, what):
        if not isinstance(key, str):
            raise LoraConfigError(f"{what} keys must be strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise LoraConfigError(f"{what} key {key!r} is not a valid regular expression: {exc}") from None
        return key

    @staticmethod
    def _checked(check, value, key, what):
        try:
            return check(value)
        except LoraConfigError as exc:
            raise LoraConfigError(f"{what}[{key!r}]: {exc}") from None

    def rank_for(self, module_name):
        """The rank of ``module_name``: its ``rank_pattern`` entry, else ``rank``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name):
        """The alpha of ``module_name``: its ``alpha_pattern`` entry, else ``alpha``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]
