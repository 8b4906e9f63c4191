"""Hostile-input cases for the whole public API of numba_lora (see tests/test_hostile.py).

Modules:

- ``memory``: arrays against guard pages, with canaries;
- ``exact``: references (exact merge arithmetic, float64 products) and comparisons;
- ``harness``: a case, its classification (clear error / correct result / fail);
- ``values``, ``inputs``: seeded value generators, array-likes valid and hostile;
- ``kernel_cases``, ``convert_cases``, ``layer_cases``, ``multi_cases``,
  ``adapter_cases``, ``peft_cases``: the case generators, by API area;
- ``run_cases``: the script that runs groups in a subprocess.

Generators take a seeded ``numpy.random.Generator`` and yield
``harness.Case`` objects lazily.  They are run in groups, one subprocess
each, with its own Numba cache (see ``tests/test_hostile.py``): a group holds
every case that needs a given set of compiled kernels (all float32 work, all
float64 work, ...), so that each process compiles or loads everything it
uses itself and no process mixes compiled code from two others.
"""

__all__ = ["all_groups"]


def all_groups():
    """{group name: generator function}, in the order they are best started."""
    from . import adapter_cases, convert_cases, kernel_cases, layer_cases, multi_cases, peft_cases
    from .values import F32, F64

    def by_dtype(dtype):
        def group(rng):
            yield from kernel_cases.forward_cases(rng, dtype)
            yield from kernel_cases.merge_cases(rng, dtype)
            yield from layer_cases.session_cases(rng, dtype)
            yield from adapter_cases.session_cases(rng, dtype)
        group.__doc__ = f"Everything that compiles {dtype} kernels: the kernels, LoraLinear, " \
                        "LoraAdapter."
        return group

    def multi(rng):
        """The multi-adapter kernels, group_rows and MultiLoraLinear."""
        yield from kernel_cases.multi_cases(rng)
        yield from multi_cases.layer_cases(rng)

    def api(rng):
        """What runs no kernel: constructors, LoraConfig, set_num_threads, PEFT files."""
        yield from layer_cases.constructor_cases(rng)
        yield from adapter_cases.api_cases(rng)
        yield from peft_cases.peft_cases(rng)

    return {"float64": by_dtype(F64), "float32": by_dtype(F32),
            "convert": convert_cases.convert_cases, "multi": multi, "api": api}
