"""Numba settings shared by every kernel, in one place.

``FASTMATH`` is the flag set for arithmetic kernels: ``reassoc`` lets LLVM
vectorise reductions, ``contract`` lets it fuse multiply-adds.  It leaves
``nnan`` and ``ninf`` off: the full set (Numba's fastmath switched on as a
whole) lets LLVM assume no NaN or infinity ever occurs (numba issues #2919
and #9383).

That is not enough for finiteness tests: Numba's ``np.isfinite`` on a float
is ``x - x == 0``, and ``nsz`` plus ``reassoc`` fold ``x - x`` to ``0``, so the
test becomes ``True`` for NaN and infinity too (seen with Numba 0.68).  Code
that tests values for finiteness is therefore compiled with
``STRICT_OPTIONS`` (no fastmath at all).
"""

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

#: Options for the kernels that do arithmetic.  ``cache=True`` writes
#: compiled code to ``__pycache__`` beside the module (or to
#: ``NUMBA_CACHE_DIR``); :func:`numba_lora.clear_cache` deletes it.
JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=set(FASTMATH))

#: Options for code that tests values with ``np.isfinite``.
STRICT_OPTIONS = dict(cache=True, nogil=True)
