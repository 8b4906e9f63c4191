"""Every compiled function of numba_lora takes its options from numba_lora._config."""

import importlib
import pkgutil

import pytest
from numba.core.dispatcher import Dispatcher

import numba_lora
from numba_lora import _config


def _modules():
    yield numba_lora
    for info in pkgutil.walk_packages(numba_lora.__path__, "numba_lora."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def _dispatchers():
    seen = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                seen[f"{module.__name__}.{name}"] = obj
    return seen


DISPATCHERS = _dispatchers()


def test_there_are_dispatchers_to_check():
    assert len(DISPATCHERS) >= 20
    # Compiled code lives in the kernels package only: one place to look,
    # and the cache digest covers exactly it.
    assert all(name.startswith("numba_lora.kernels.") for name in DISPATCHERS)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_options_come_from_config(name):
    dispatcher = DISPATCHERS[name]
    options = dict(dispatcher.targetoptions)
    options.pop("nopython", None)
    options.pop("boundscheck", None)  # NUMBA_BOUNDSCHECK decides
    options.pop("parallel", None)     # a per-kernel choice
    fastmath = options.pop("fastmath", None)
    assert options == {"nogil": True}, options
    if fastmath is False:
        expected = _config.EXACT_OPTIONS
    else:
        assert set(fastmath) == set(_config.FASTMATH), fastmath
        assert "nnan" not in fastmath and "ninf" not in fastmath
        expected = _config.JIT_OPTIONS
    assert expected["cache"] is True
    assert type(dispatcher._cache).__name__ != "NullCache", "cache=True missing"
    assert expected["nogil"] is True
