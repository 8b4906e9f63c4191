"""Hostile-input cases for the whole public API of numba_lora (see tests/test_hostile.py).

Modules:

- ``memory``: arrays against guard pages, with canaries;
- ``exact``: references (exact merge arithmetic, float64 products) and comparisons;
- ``harness``: a case, its classification (clear error / correct result / fail);
- ``values``: seeded value generators;
- ``kernel_cases``, ``convert_cases``, ``layer_cases``, ``multi_cases``,
  ``adapter_cases``, ``peft_cases``: the case generators, by API area, in groups;
- ``run_cases``: the script that runs groups in a subprocess.

Group generators take a seeded ``numpy.random.Generator`` and yield
``harness.Case`` objects lazily.
"""

__all__ = ["all_groups"]


def all_groups():
    """{group name: generator function}, in the order they are best started."""
    from . import adapter_cases, convert_cases, kernel_cases, layer_cases, multi_cases, peft_cases

    groups = dict(kernel_cases.GROUPS)
    groups.update(convert_cases.GROUPS)
    groups.update(layer_cases.GROUPS)
    groups.update(multi_cases.GROUPS)
    groups.update(adapter_cases.GROUPS)
    groups.update(peft_cases.GROUPS)
    return groups
