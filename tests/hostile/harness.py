"""One hostile case, how it is run, and how its outcome is classified.

A :class:`Case` is a call plus what to expect of it.  :func:`execute` runs it
and classifies the outcome as exactly one of

- ``"error"``: a :class:`numba_lora.LoraError` whose message is not empty and
  names the argument at fault (:attr:`Case.names`, any one of them), with
  every watched array and piece of state bit-identical to before the call;
- ``"correct"``: no exception, and :attr:`Case.check` accepts the result
  (it compares with a float64 NumPy reference), watched inputs unchanged;
- ``"fail"``: anything else: another exception, a wrong result, a changed
  input, a refused valid call (``expect="correct"``), an accepted invalid one
  (``expect="error"``), a clobbered canary byte.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from numba_lora import LoraError

__all__ = ["Case", "Watch", "execute", "mentions", "state_of"]


def state_of(value):
    """A comparable, bit-exact snapshot of ``value`` (arrays by dtype, shape, flags and bytes)."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return ("ndarray", value.dtype.str, value.shape, tuple(map(id, value.ravel())),
                    value.flags.writeable)
        return ("ndarray", value.dtype.str, value.shape, value.strides, value.flags.writeable,
                np.ascontiguousarray(value).tobytes())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(state_of(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), state_of(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", value.hex() if value == value else "nan")
    return (type(value).__name__, repr(value))


class Watch:
    """What a call may and may not change.

    - inputs: never (refused or accepted);
    - state: only when the call is accepted (the check verifies the new value);
      with ``always``, never (a forward must not change its layer);
    - regions (guarded memory, see ``memory.Region``): canary bytes never; an
      input region's array never; an output region's array only when accepted.
    """

    def __init__(self):
        self._inputs = []
        self._state = []
        self._regions = []

    def input(self, name, value):
        """``value`` (an array, list, scalar, ...) must never change."""
        self._inputs.append((name, lambda: state_of(value)))
        return value

    def state(self, name, getter, always=False):
        """``getter()`` must be unchanged after a refused call (with ``always``: after any)."""
        self._state.append((name, lambda: state_of(getter()), always))

    def region(self, name, region, is_input):
        self._regions.append((name, region, is_input))

    def snapshot(self):
        return ({name: get() for name, get in self._inputs},
                {name: get() for name, get, _ in self._state},
                {name: region.snapshot() for name, region, _ in self._regions})

    def changes(self, before, after, refused):
        """Descriptions of what changed that must not have."""
        problems = []
        for name in before[0]:
            if before[0][name] != after[0][name]:
                problems.append(f"input {name} changed")
        for name, _, always in self._state:
            if (refused or always) and before[1][name] != after[1][name]:
                problems.append(f"{name} changed although the call was "
                                + ("refused" if refused else "not one that changes it"))
        for name, region, is_input in self._regions:
            old, new = before[2][name], after[2][name]
            if not region.canaries_intact(old, new):
                problems.append(f"bytes next to {name} were overwritten (out-of-bounds write)")
            elif (refused or is_input) and old != new:
                problems.append(f"{name} changed although "
                                + ("the call was refused" if refused else "it is an input"))
        return problems


@dataclass
class Case:
    """A call and what to expect of it (see the module docstring)."""

    area: str
    what: str
    call: Callable[[], Any]
    #: "error", "correct", or "either" (both are fine; the check runs if accepted).
    expect: str = "either"
    #: Called with the result of an accepted call; raises AssertionError if wrong.
    check: Callable[[Any], None] = None
    #: An error message must name one of these (empty: any non-empty message).
    names: tuple = ()
    watch: Watch = field(default_factory=Watch)
    #: The argument types, for counting distinct compilations (kernels only).
    sig: str = None


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mentions(message, name):
    """Whether ``message`` names ``name`` (as a whole word when ``name`` is an identifier)."""
    if _IDENT.match(name):
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"
        return re.search(pattern, message) is not None
    return name in message


def _describe(exc):
    text = str(exc).replace("\x1b", "")
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {text[:400]}"


def execute(case):
    """Run ``case``; return (outcome, error class name or None, problems)."""
    before = case.watch.snapshot()
    error = None
    try:
        result = case.call()
    except LoraError as exc:
        error = type(exc).__name__
        message = str(exc)
        outcome = "error"
        problems = []
        if case.expect == "correct":
            problems.append(f"refused a valid call: {_describe(exc)}")
        if not message.strip():
            problems.append(f"{error} with an empty message")
        elif case.names and not any(mentions(message, n) for n in case.names):
            problems.append(f"message does not name {' or '.join(case.names)}: {message[:300]!r}")
        del exc
        problems += case.watch.changes(before, case.watch.snapshot(), refused=True)
    except Exception as exc:  # noqa: BLE001 - every other exception is the finding
        outcome = "fail"
        problems = [f"raised {_describe(exc)}"]
        del exc
    else:
        outcome = "correct"
        problems = case.watch.changes(before, case.watch.snapshot(), refused=False)
        if case.expect == "error":
            problems.insert(0, f"accepted an invalid call (returned {type(result).__name__})")
        elif case.check is not None:
            try:
                case.check(result)
            except AssertionError as exc:
                problems.append(f"wrong result: {exc}")
            except Exception as exc:  # noqa: BLE001 - a broken reference is a failure too
                problems.append(f"the check raised {_describe(exc)}")
        del result
    if problems:
        outcome = "fail"
    return outcome, error, problems


def emit(stream, record):
    stream.write(json.dumps(record, default=str) + "\n")
    stream.flush()
