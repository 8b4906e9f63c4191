"""Numba settings shared by every kernel, in one place.

Two option sets, and every ``@njit`` in numba_lora takes one of them (a test
walks every dispatcher in the package and checks it):

``JIT_OPTIONS``, for arithmetic whose rounding numba_lora does not promise
(forward products, gathers, sorts): ``fastmath`` with ``reassoc`` (LLVM may
vectorise reductions) and ``contract`` (it may fuse multiply-adds), but with
``nnan`` and ``ninf`` off: the full set (Numba's fastmath switched on as a whole) lets LLVM
assume no NaN or infinity ever occurs (numba issues #2919 and #9383).

``EXACT_OPTIONS``, no fastmath at all, for code whose every rounding is part
of its contract.  ``fastmath=False`` is spelled out: a function compiled
without the option takes its caller's flags, so a user's function compiled
with Numba's fastmath switched on, calling ``kernels.merge``, would compile a
contracted, reassociated merge (and write it to the disk cache):

- merge and unmerge, whose per-element order (a fused multiply-add chain
  over the rank, then one product with the scaling, then one addition) is
  what makes them independent of the thread count and bit-identical to
  PEFT's merge; ``nsz`` alone would already change the sign of some zeros;
- finiteness tests: Numba's ``np.isfinite`` on a float is ``x - x == 0``,
  and ``nsz`` plus ``reassoc`` fold ``x - x`` to ``0``, so the test becomes
  ``True`` for NaN and infinity too (seen with Numba 0.68).

Both set ``cache=True`` (compiled code is kept on disk; see
:mod:`numba_lora._cache`) and ``nogil=True`` (Python threads run kernels side
by side).
"""

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

#: Options for the kernels whose rounding is not part of their contract.
JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=set(FASTMATH))

#: Options for code that must round exactly as written (merge, finiteness).
EXACT_OPTIONS = dict(cache=True, nogil=True, fastmath=False)
