"""Numba kernels for LoRA: the arithmetic behind :class:`numba_lora.LoraLinear`.

Every function here is an ``@njit`` function that takes plain arrays and
scalars, so it can be called from Python and from a user's own ``@njit``
code alike::

    from numba import njit
    from numba_lora import kernels

    @njit
    def my_layer(W, A, B, scaling, x):
        out = np.empty(W.shape[0], dtype=W.dtype)
        return kernels.forward(W, A, B, scaling, x, out)

Contract shared by all kernels
------------------------------
- ``W`` is ``(out_features, in_features)``, ``A`` is ``(rank, in_features)``,
  ``B`` is ``(out_features, rank)``; inputs and outputs follow from those.
- All float arrays of one call share one dtype, ``float32`` or ``float64``,
  and are C-contiguous; ``scaling`` is a Python or NumPy real number.
- Every argument is checked before any array is touched, so no call can
  read or write outside its arrays:

  - types (an array where one is needed, its number of dimensions, one
    float dtype for all float arrays, integer arrays of int64, a writable
    output) when Numba compiles the call: a mismatch compiles to a function
    that raises :class:`~numba_lora.LoraTypeError`,
    :class:`~numba_lora.LoraShapeError` or :class:`~numba_lora.LoraDtypeError`
    naming the kernel and the argument (from Python and from your own
    ``@njit`` code alike);
  - shapes, contiguity and index ranges when it runs:
    :class:`~numba_lora.LoraShapeError` / :class:`~numba_lora.LoraKeyError`;
  - that no array a kernel writes overlaps another of its array arguments
    (the byte ranges they span), when it runs: :class:`~numba_lora.LoraShapeError`.

  Values are not checked (NaN in, NaN out).
- The low-rank term is skipped when ``scaling == 0``, so ``scaling=0`` gives
  the plain dense product ``W @ x``.

Threads
-------
``forward``, ``forward_batch`` and the dense part of ``forward_batch_multi``
are BLAS calls on the BLAS NumPy itself uses (see
``numba_lora.kernels._blas``), so they share one thread pool with the user's
own NumPy products; ``threadpoolctl`` limits them, as it limits NumPy.
``merge``, ``unmerge`` and the ``count_nonfinite_*`` kernels run on Numba's
threads (``numba.set_num_threads``).  ``merge_serial`` and
``unmerge_serial`` use no threads and are meant for a caller's own
``prange`` loop; never call the BLAS-backed kernels inside a ``prange``
body (BLAS threads times Numba threads oversubscribe the cores).

Numerical behaviour of merge
----------------------------
``merge`` computes every element of W in W's dtype in one fixed order (a
fused multiply-add chain over the rank from ``+0``, one product with the
scaling rounded to W's dtype, one addition; see :func:`merge`), and spreads
rows, never an element's sum, over Numba's threads.  So:

- the merged W is the same bits for any thread count (Numba's or BLAS's),
  on every CPU with IEEE arithmetic;
- it equals PEFT's ``merge_and_unload()`` bit for bit in float32 (checked
  against PEFT 0.21 / torch 2.13 fixtures at ranks 1 to 256);
- ``unmerge`` subtracts the same delta, so a merge/unmerge cycle ends within
  one rounding of where it started, later cycles reproduce the first
  cycle's result bit for bit, even when the thread count changed between
  the two calls;
- ``merge_serial``/``unmerge_serial`` are bit-identical to them;
- ``count_nonfinite_merged`` computes the very same values without writing,
  so it predicts exactly which elements a merge would make NaN or infinite.
"""
import numba as _numba

# Start Numba's threading layer now.  The merge kernels hold parallel loops;
# when a process loads them from the cache and a user's own (uncached)
# @njit function links them in, nothing else has started the layer, and
# LLVM aborts the process ("Symbol not found: allocate_sched").
# get_num_threads() starts it as a side effect, through public API.
_numba.get_num_threads()

from .lora import (  # noqa: E402
    count_nonfinite_merged,
    count_nonfinite_remerged,
    forward,
    forward_batch,
    forward_batch_stacked,
    forward_stacked,
    merge,
    merge_serial,
    unmerge,
    unmerge_serial,
)
from .multi import (  # noqa: E402
    SEGMENTED_MIN_ROWS,
    forward_batch_multi,
    forward_batch_multi_rows,
    forward_batch_multi_segmented,
    group_rows,
)

__all__ = [
    "forward",
    "forward_batch",
    "forward_stacked",
    "forward_batch_stacked",
    "merge",
    "unmerge",
    "merge_serial",
    "unmerge_serial",
    "count_nonfinite_merged",
    "count_nonfinite_remerged",
    "forward_batch_multi",
    "forward_batch_multi_segmented",
    "forward_batch_multi_rows",
    "group_rows",
    "SEGMENTED_MIN_ROWS",
]
from .convert import (  # noqa: E402
    merge_bf16,
    merge_bf16_serial,
    merge_f16,
    merge_f16_serial,
    round_bf16,
    round_f16,
    widen_bf16,
    widen_f16,
)

__all__ += [
    "merge_bf16",
    "merge_bf16_serial",
    "merge_f16",
    "merge_f16_serial",
    "widen_bf16",
    "round_bf16",
    "widen_f16",
    "round_f16",
]
from .train import (  # noqa: E402
    adamw_step,
    adamw_step_serial,
    apply_dropout,
    backward,
    backward_dropout,
    backward_factors,
    forward_train,
    sgd_step,
    sgd_step_serial,
)

__all__ += [
    "forward_train",
    "apply_dropout",
    "backward",
    "backward_dropout",
    "backward_factors",
    "adamw_step",
    "adamw_step_serial",
    "sgd_step",
    "sgd_step_serial",
]
from .quantize import (  # noqa: E402
    dequantize_absmax,
    dequantize_nf4,
    dequantize_nf4_serial,
    quantize_absmax,
    quantize_nf4,
)
from .qlora import (  # noqa: E402
    forward_batch_nf4,
    forward_batch_nf4_dq,
    forward_nf4,
    forward_nf4_dq,
)

__all__ += [
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_serial",
    "quantize_absmax",
    "dequantize_absmax",
    "forward_nf4",
    "forward_batch_nf4",
    "forward_nf4_dq",
    "forward_batch_nf4_dq",
]

# Calls from Python with arguments Numba cannot type or lower (a dict, float16,
# a big-endian array) raise a LoraError too, not a Numba error.
from numba.core.dispatcher import Dispatcher as _Dispatcher  # noqa: E402

from ._guard import python_errors as _python_errors  # noqa: E402

for _name in __all__:
    if isinstance(globals()[_name], _Dispatcher):
        _python_errors(globals()[_name])
del _name
