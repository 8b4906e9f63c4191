"""``LoraConfig``: the settings an adapter's layers share, as PEFT names them."""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ._validate import check_alpha, check_rank
from .errors import LoraConfigError, LoraTypeError

__all__ = ["LoraConfig", "pattern_key", "check_field", "ALIASES", "TASK_TYPES"]


def _pattern_regex(key):
    return rf"(.*\.)?({key})$"


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    r"""The first key of ``patterns`` that matches the end of ``module_name``, or None.

    PEFT's rule for ``rank_pattern`` and ``alpha_pattern``: a key is a regular
    expression that must match a whole trailing run of dotted components,
    ``re.match(rf"(.*\.)?({key})$", module_name)``; keys are tried in order.

    Parameters
    ----------
    patterns : mapping of str
        ``rank_pattern`` or ``alpha_pattern``: regular expressions as keys.
    module_name : str
        A module's dotted name, such as ``"model.layers.0.self_attn.q_proj"``.

    Returns
    -------
    str or None
        The matching key, or None when no key matches.

    Raises
    ------
    LoraTypeError
        If ``module_name`` is not a str.

    See Also
    --------
    LoraConfig.rank_for : The rank this rule gives a module.
    LoraConfig.alpha_for : The alpha this rule gives a module.

    Examples
    --------
    >>> from numba_lora.config import pattern_key
    >>> patterns = {"q_proj": 16, r"layers\.1\..*": 4}
    >>> pattern_key(patterns, "model.layers.0.self_attn.q_proj")
    'q_proj'
    >>> pattern_key(patterns, "model.layers.1.mlp.up_proj")
    'layers\\.1\\..*'
    >>> pattern_key(patterns, "model.layers.0.self_attn.xq_proj") is None
    True
    """
    if not isinstance(module_name, str):
        raise LoraTypeError(
            f"module_name must be a str, got {type(module_name).__name__} {module_name!r}")
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


def _check_optional_str(what):
    def check(value):
        if value is None:
            return None
        if isinstance(value, os.PathLike):  # a local base-model directory
            value = os.fspath(value)
        if not isinstance(value, str):
            raise LoraConfigError(f"{what} must be a string or None, got {type(value).__name__} {value!r}")
        return value
    return check


#: PEFT's ``TaskType`` names; PEFT refuses a config with any other ``task_type``.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def _check_task_type(value):
    if value is None:
        return None
    if not isinstance(value, str) or value not in TASK_TYPES:
        raise LoraConfigError(f"task_type must be None or one of PEFT's task types "
                              f"{', '.join(TASK_TYPES)}; got {value!r}")
    return value


#: ``adapter_config.json`` keys that :meth:`LoraAdapter.save_peft` writes from
#: the config's fields and the adapter's layers (never from ``extra``).
OWNED_KEYS = frozenset({
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
    "use_rslora", "rank_pattern", "alpha_pattern", "base_model_name_or_path", "revision",
    "task_type", "inference_mode",
})


def _check_extra(extra):
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise LoraConfigError(f"extra must be a dict of adapter_config.json entries, got "
                              f"{type(extra).__name__} {extra!r}")
    extra = dict(extra)
    for key in extra:
        if not isinstance(key, str):
            raise LoraConfigError(f"extra keys must be strings, got {key!r}")
        if key in OWNED_KEYS:
            raise LoraConfigError(
                f"extra must not hold {key!r}: save_peft writes it from the config's fields "
                "and the adapter's layers")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise LoraConfigError(f"extra must hold JSON values (it is written to "
                              f"adapter_config.json): {exc}") from None
    return extra


_FIELD_CHECKS = {
    "r": check_rank,
    "lora_alpha": check_alpha,
    "lora_dropout": _check_dropout,
    "target_modules": _check_targets,
    "fan_in_fan_out": _check_bool("fan_in_fan_out"),
    "use_rslora": _check_bool("use_rslora"),
    "rank_pattern": _check_patterns("rank_pattern", check_rank),
    "alpha_pattern": _check_patterns("alpha_pattern", check_alpha),
    "base_model_name_or_path": _check_optional_str("base_model_name_or_path"),
    "revision": _check_optional_str("revision"),
    "task_type": _check_task_type,
    "extra": _check_extra,
}

#: numba_lora's earlier names for PEFT's: ``{alias: PEFT name}``.
ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


def check_field(name: str, value: Any) -> Any:
    """``value`` checked and converted for :class:`LoraConfig` field ``name``.

    One checker per field, shared by :class:`LoraConfig` and the PEFT
    reader, which uses it to name the JSON key at fault.

    Parameters
    ----------
    name : str
        A field (PEFT's name) or one of its aliases (``rank``, ``alpha``,
        ``dropout``).
    value : object
        The value to check.

    Returns
    -------
    object
        The value converted (a list of target modules becomes a tuple,
        NumPy scalars Python numbers, ...).

    Raises
    ------
    LoraConfigError
        If ``value`` does not fit the field; the message names the field.

    See Also
    --------
    LoraConfig.validate : Checks every field of a config.

    Examples
    --------
    >>> from numba_lora.config import check_field
    >>> check_field("target_modules", ["q_proj", "v_proj"])
    ('q_proj', 'v_proj')
    >>> check_field("alpha", 16)
    16.0
    """
    return _FIELD_CHECKS[ALIASES.get(name, name)](value)


class _Default:
    """Default of a setting that has two names (PEFT's and an alias), so that "not given"
    can be told apart from "given"; shows as PEFT's default value in signatures."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self):
        return "unset" if self.value is None else repr(self.value)


_R, _ALPHA, _DROPOUT, _UNSET = _Default(8), _Default(8.0), _Default(0.0), _Default()


@dataclass(init=False)
class LoraConfig:
    """Shared settings of an adapter's layers, with PEFT's ``LoraConfig`` names and defaults.

    What ``adapter_config.json`` holds: the default rank and alpha, their
    per-module overrides, and the entries PEFT needs to find the base model.
    Every field is checked on construction (:meth:`validate`).

    Parameters
    ----------
    r : int, default 8
        Default rank, >= 1.  Alias: ``rank``.
    lora_alpha : float, default 8.0
        Default alpha, finite and > 0.  Alias: ``alpha``.
    lora_dropout : float, default 0.0
        Training-time dropout in [0, 1]; kept for round trips, never applied
        (numba_lora does inference).  Alias: ``dropout``.
    target_modules : str or sequence of str, optional
        Module names the adapter targets, as PEFT records them; kept as a
        tuple.
    fan_in_fan_out : bool, default False
        Base weights are stored (in_features, out_features), as in GPT-2's
        ``Conv1D``; they are transposed on the way in.
    use_rslora : bool, default False
        ``scaling = alpha / sqrt(rank)`` instead of ``alpha / rank``.
    rank_pattern, alpha_pattern : dict, optional
        Per-module overrides; keys are regular expressions matched against
        the end of the module name (see :func:`pattern_key`).
    base_model_name_or_path : str or os.PathLike, optional
        The base model, as PEFT records it: its Hugging Face name or local
        directory.  ``AutoPeftModelForCausalLM.from_pretrained`` loads the
        base from it.
    revision : str, optional
        The base model's revision (branch, tag or commit), as PEFT records it.
    task_type : str, optional
        PEFT's task type, one of :data:`TASK_TYPES` (``"CAUSAL_LM"``, ...).
        ``AutoPeftModelFor<Task>`` loaders check it.
    extra : dict, optional
        The other entries of the ``adapter_config.json`` the config was read
        from (``peft_version``, ``layers_to_transform``, ...), which
        :meth:`LoraAdapter.save_peft` writes back unchanged.  Not compared by
        ``==`` and not shown by ``repr``.
    rank : int, optional
        numba_lora's earlier name for ``r`` (keyword only).  Giving both
        names of one setting with different values raises
        :class:`~numba_lora.LoraConfigError`.  The alias is also a property:
        ``config.rank is config.r``.
    alpha : float, optional
        numba_lora's earlier name for ``lora_alpha`` (keyword only), as
        ``rank``.
    dropout : float, optional
        numba_lora's earlier name for ``lora_dropout`` (keyword only), as
        ``rank``.

    Raises
    ------
    LoraConfigError
        If a value does not fit its field (the message names the field), or
        a setting is given twice with different values.

    See Also
    --------
    LoraAdapter.from_peft : Reads a config and its tensors from PEFT's files.
    LoraAdapter.save_peft : Writes them back.

    Examples
    --------
    >>> from numba_lora import LoraConfig
    >>> config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    >>> config.r, config.rank, config.lora_alpha
    (16, 16, 32.0)
    >>> LoraConfig(rank=16, alpha=32) == LoraConfig(r=16, lora_alpha=32)
    True
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    fan_in_fan_out: bool
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    revision: str | None
    task_type: str | None
    extra: dict[str, Any] = field(compare=False, repr=False)

    def __init__(
        self,
        r: int = _R,
        lora_alpha: float = _ALPHA,
        lora_dropout: float = _DROPOUT,
        target_modules: str | Iterable[str] | None = (),
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        *,
        base_model_name_or_path: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        task_type: str | None = None,
        extra: Mapping[str, Any] | None = None,
        rank: int = _UNSET,
        alpha: float = _UNSET,
        dropout: float = _UNSET,
    ) -> None:
        given = {"r": (r, rank), "lora_alpha": (lora_alpha, alpha),
                 "lora_dropout": (lora_dropout, dropout)}
        for (name, (peft_value, alias_value)), alias in zip(given.items(), ALIASES):
            peft_given = not isinstance(peft_value, _Default)
            alias_given = not isinstance(alias_value, _Default)
            if not peft_given and not alias_given:
                value = peft_value.value
            elif not alias_given:
                value = peft_value
            elif not peft_given:
                value = alias_value
            else:
                # Both given: fine when they agree once checked (r=4, rank=np.int64(4)).
                a, b = check_field(name, peft_value), check_field(name, alias_value)
                if a != b:
                    raise LoraConfigError(
                        f"{name}={peft_value!r} and {alias}={alias_value!r} disagree: {alias} "
                        f"is numba_lora's name for PEFT's {name}; give one of them")
                value = a
            setattr(self, name, value)
        self.target_modules = target_modules
        self.fan_in_fan_out = fan_in_fan_out
        self.use_rslora = use_rslora
        self.rank_pattern = rank_pattern
        self.alpha_pattern = alpha_pattern
        self.base_model_name_or_path = base_model_name_or_path
        self.revision = revision
        self.task_type = task_type
        self.extra = extra
        self.validate()

    # numba_lora's earlier names, kept as aliases of PEFT's.
    @property
    def rank(self) -> int:
        """int: Alias of :attr:`r`.

        numba_lora's earlier name, kept beside PEFT's; setting one sets the other.

        See Also
        --------
        LoraConfig : The ``r`` parameter.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> LoraConfig(r=16).rank
        16
        """
        return self.r

    @rank.setter
    def rank(self, value: int) -> None:
        self.r = value

    @property
    def alpha(self) -> float:
        """float: Alias of :attr:`lora_alpha`.

        numba_lora's earlier name, kept beside PEFT's; setting one sets the other.

        See Also
        --------
        LoraConfig : The ``lora_alpha`` parameter.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> LoraConfig(lora_alpha=32.0).alpha
        32.0
        """
        return self.lora_alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.lora_alpha = value

    @property
    def dropout(self) -> float:
        """float: Alias of :attr:`lora_dropout`.

        numba_lora's earlier name, kept beside PEFT's; setting one sets the other.

        See Also
        --------
        LoraConfig : The ``lora_dropout`` parameter.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> LoraConfig(lora_dropout=0.1).dropout
        0.1
        """
        return self.lora_dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        self.lora_dropout = value

    def __setstate__(self, state):
        # Configs pickled before the PEFT names: rank/alpha/dropout fields,
        # and none of the newer fields.
        state = dict(state)
        for alias, name in ALIASES.items():
            if alias in state:
                state[name] = state.pop(alias)
        for name in ("base_model_name_or_path", "revision", "task_type"):
            state.setdefault(name, None)
        state.setdefault("extra", {})
        self.__dict__.update(state)

    def validate(self) -> LoraConfig:
        """Check every field; raise :class:`~numba_lora.LoraConfigError` naming the bad one.

        Every field is checked before any is written back, so a refusal
        changes nothing.  Call it after changing a field by assignment.

        Returns
        -------
        LoraConfig
            The config itself, its fields converted (a list of target modules
            becomes a tuple, NumPy scalars Python numbers, ...).

        Raises
        ------
        LoraConfigError
            If a field does not fit; the message names it.

        See Also
        --------
        check_field : The check of one field.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> config = LoraConfig(r=8)
        >>> config.target_modules = ["q_proj"]
        >>> config.validate().target_modules
        ('q_proj',)
        """
        # All checked before any is written back: a refusal changes nothing.
        checked = {f.name: check_field(f.name, getattr(self, f.name)) for f in fields(self)}
        for name, value in checked.items():
            setattr(self, name, value)
        return self

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name``: its ``rank_pattern`` entry, else ``r``.

        The first key of ``rank_pattern`` that matches the end of the name wins
        (see :func:`pattern_key`), as in PEFT.

        Parameters
        ----------
        module_name : str
            A module's dotted name.

        Returns
        -------
        int
            The rank of that module's adapter.

        Raises
        ------
        LoraTypeError
            If ``module_name`` is not a str.

        See Also
        --------
        alpha_for : The same for alpha.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> config = LoraConfig(r=8, rank_pattern={"v_proj": 16})
        >>> config.rank_for("model.layers.0.self_attn.v_proj"), config.rank_for("model.lm_head")
        (16, 8)
        """
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of ``module_name``: its ``alpha_pattern`` entry, else ``lora_alpha``.

        The first key of ``alpha_pattern`` that matches the end of the name
        wins (see :func:`pattern_key`), as in PEFT.

        Parameters
        ----------
        module_name : str
            A module's dotted name.

        Returns
        -------
        float
            The alpha of that module's adapter.

        Raises
        ------
        LoraTypeError
            If ``module_name`` is not a str.

        See Also
        --------
        rank_for : The same for the rank.

        Examples
        --------
        >>> from numba_lora import LoraConfig
        >>> config = LoraConfig(lora_alpha=16, alpha_pattern={"q_proj": 32})
        >>> config.alpha_for("model.layers.0.self_attn.q_proj")
        32.0
        """
        key = pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]
