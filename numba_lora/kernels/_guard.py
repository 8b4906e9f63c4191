"""Type checks that run when Numba compiles a kernel, and the LLVM intrinsics the kernels use.

Intrinsics: :func:`fma` (a fused multiply-add, rounded once),
:func:`fma_block4` (the merge's register-blocked inner loop of such fused
multiply-adds), :func:`prefetch` and :func:`prefetch_read` (cache hints).
They are exact IEEE operations or hints, so they change no result from one
CPU to another.

Every public kernel (and every BLAS wrapper) is guarded: when Numba types a
call, :func:`guarded` looks at the argument types and, if one is not what
the kernel needs (not an array, the wrong number of dimensions, a dtype
other than the one float dtype all float arrays share, a read-only output),
compiles a function that only raises a :class:`~numba_lora.LoraError` whose
message names the kernel, the argument, what was expected and what came.
The kernel's body is then never compiled for those types, so it can never
run on them: a float32 array among float64 ones, an int16 ``out`` or a 2-D
``x`` is an error, never a read or write past an array's end.
"""

import inspect

import numpy as np
from llvmlite import ir
from numba import njit, typeof, types
from numba.extending import intrinsic, overload, register_jitable

from .._config import JIT_OPTIONS
from ..errors import LoraDtypeError, LoraError, LoraShapeError, LoraTypeError

__all__ = ["guarded", "quiet", "python_errors", "fma", "fma_block4", "prefetch", "prefetch_read"]

#: Argument kinds: (what it must be, ndim, dtype rule, writable).
#: dtype rule "float" means float32 or float64, one dtype shared by every
#: "float" argument of the call.
KINDS = {
    "f1": ("array", 1, "float", False),
    "f2": ("array", 2, "float", False),
    "f1w": ("array", 1, "float", True),
    "f2w": ("array", 2, "float", True),
    "i64": ("array", 1, types.int64, False),
    "f64": ("array", 1, types.float64, False),
    "real": ("scalar", 0, None, False),
    "int": ("scalar", 0, "int", False),
    # kernels.convert: half-precision bits in uint16 arrays, and float32 only
    # (the delta of a half-precision weight is computed in float32).
    "u16_1": ("array", 1, types.uint16, False),
    "u16_1w": ("array", 1, types.uint16, True),
    "u16_2w": ("array", 2, types.uint16, True),
    "f32_1": ("array", 1, types.float32, False),
    "f32_1w": ("array", 1, types.float32, True),
    "f32_2": ("array", 2, types.float32, False),
    "f32_2w": ("array", 2, types.float32, True),
    # NF4 storage: packed 4-bit codes and 8-bit (double-quant) absmax codes.
    "u8_1": ("array", 1, types.uint8, False),
    "u8_1w": ("array", 1, types.uint8, True),
    # Training: dropout masks (True keeps the element).
    "b2": ("array", 2, types.boolean, False),
}

_FLOATS = (types.float32, types.float64)


def _problem(kernel, names, kinds, argtypes):
    """(exception class, message) for the first wrong argument type, or None."""
    floats = []
    for name, kind, ty in zip(names, kinds, argtypes):
        what, ndim, dtype, writable = KINDS[kind]
        if what == "scalar":
            if dtype == "int":
                if not isinstance(ty, types.Integer) or isinstance(ty, types.Boolean):
                    return LoraTypeError, (f"kernels.{kernel}: {name} must be an integer, "
                                           f"got {ty}")
                continue
            if not isinstance(ty, (types.Float, types.Integer)) or isinstance(ty, types.Boolean):
                return LoraTypeError, (f"kernels.{kernel}: {name} must be a real number "
                                       f"(int or float), got {ty}")
            continue
        if not isinstance(ty, types.Array):
            return LoraTypeError, (f"kernels.{kernel}: {name} must be a NumPy array "
                                   f"({ndim}-D), got {ty}")
        if ty.ndim != ndim:
            return LoraShapeError, (f"kernels.{kernel}: {name} must be {ndim}-D, "
                                    f"got a {ty.ndim}-D array")
        if dtype == "float":
            floats.append((name, ty.dtype))
        elif ty.dtype != dtype:
            return LoraDtypeError, (f"kernels.{kernel}: {name} must have dtype {dtype}, "
                                    f"got {ty.dtype}")
        if writable and not ty.mutable:
            return LoraTypeError, (f"kernels.{kernel}: {name} is written to and must be "
                                   "writable, got a read-only array")
    if floats:
        first = floats[0][1]
        if first not in _FLOATS or any(dt != first for _, dt in floats):
            listing = ", ".join(f"{name} {dt}" for name, dt in floats)
            names_ = ", ".join(name for name, _ in floats)
            return LoraDtypeError, (f"kernels.{kernel}: {names_} must share one dtype, "
                                    f"float32 or float64; got {listing}")
    return None


def _named(function, name):
    """``function`` under a name of its own, for Numba's symbol names.

    Numba names compiled code after the function's qualified name plus a
    per-process counter.  Every kernel's closures here share one qualified
    name, so the same symbol could stand for two kernels compiled by two
    processes, and a third process that loads both from the disk cache
    would run one in place of the other (seen: ``unmerge_serial`` adding).
    A qualified name per kernel makes the symbols differ whatever the
    counter says.
    """
    function.__name__ = function.__qualname__ = name
    return function


@register_jitable
def _extent(a):
    """(first byte, one past the last byte) of array ``a``; (0, 0) when empty."""
    if a.size == 0:
        return 0, 0
    lo = hi = a.ctypes.data
    for d in range(a.ndim):
        step = (a.shape[d] - 1) * a.strides[d]
        if step < 0:
            lo += step
        else:
            hi += step
    return lo, hi + a.itemsize


@register_jitable
def _same(a, b):
    """Whether ``a`` and ``b`` view the very same elements (pointer, shape, strides)."""
    return a.ctypes.data == b.ctypes.data and a.shape == b.shape and a.strides == b.strides


@register_jitable
def _overlap(a, b):
    a0, a1 = _extent(a)
    b0, b1 = _extent(b)
    return a0 < b1 and b0 < a1


def _overlap_checked_call(kernel, names, kinds, impl, in_place=()):
    """``impl`` behind a run-time check that no written array overlaps another array.

    A kernel reads its inputs while it writes its outputs, so an output
    sharing memory with any other array argument would give a wrong result
    (never an access out of bounds).  The check compares the byte ranges the
    arrays span, so two strided views that interleave in one buffer without
    sharing an element count as overlapping too.
    """
    arrays = [i for i, k in enumerate(kinds) if KINDS[k][0] == "array"]
    written = [i for i in arrays if KINDS[kinds[i]][3]]
    pairs = [(w, i) for w in written for i in arrays if i != w and not (i in written and i < w)]
    args = ", ".join(f"a{i}" for i in range(len(names)))
    lines = ["def call(*args):", f"    {args}, = args"]
    for w, i in pairs:
        message = f"kernels.{kernel}: {names[w]} must not overlap {names[i]}"
        if (names[w], names[i]) in in_place:
            message += f" (it may be {names[i]} itself)"
            lines.append(f"    if _overlap(a{w}, a{i}) and not _same(a{w}, a{i}):")
        else:
            lines.append(f"    if _overlap(a{w}, a{i}):")
        lines.append(f"        raise LoraShapeError({message!r})")
    lines.append(f"    return impl({args})")
    namespace = {"impl": impl, "_overlap": _overlap, "_same": _same,
                 "LoraShapeError": LoraShapeError}
    exec("\n".join(lines), namespace)  # noqa: S102 - source built from the kernel's own names
    return namespace["call"]


def guarded(kernel, params, impl, in_place=()):
    """A function that calls ``impl`` when the argument types fit ``params``, else raises.

    Parameters
    ----------
    kernel : str
        The public name, for messages (``"forward"``).
    params : sequence of (str, str)
        (argument name, kind from :data:`KINDS`) for each argument, in order.
    impl : numba dispatcher
        The kernel's body, only ever compiled for fitting types.
    in_place : sequence of (str, str), optional
        (output, input) pairs that may be the very same array (an
        elementwise kernel run in place); any other overlap between an
        array the kernel writes and another array argument is refused when
        it runs.

    Returns
    -------
    callable
        A function to call from ``@njit`` code only.
    """
    names = tuple(name for name, _ in params)
    kinds = tuple(kind for _, kind in params)
    call = _named(_overlap_checked_call(kernel, names, kinds, impl, tuple(in_place)),
                  f"_guarded_{kernel}_call")

    def checked(*args):  # only reachable when compiled
        raise LoraTypeError(f"kernels.{kernel}'s guard is for @njit code")

    @overload(checked)
    def _typed(*args):
        if len(args) != len(names):
            return None
        found = _problem(kernel, names, kinds, args)
        if found is None:
            return call
        exc, message = found

        def refuse(*args):
            raise exc(message)
        return _named(refuse, f"_guarded_{kernel}_refuse")

    checked.__name__ = checked.__qualname__ = f"_checked_{kernel}"
    return checked


def quiet(checked):
    """An ``@njit`` entry that runs the guarded kernel ``checked`` and returns nothing.

    For the layers, whose Python code already holds ``out``: a kernel that
    returns ``out`` to Python boxes a new array object for it, which is
    half of a call's dispatch when the caches are cold, as they are in
    decoding right after the previous layer's product (measured: 11.8 us
    against 5.8 us for five array arguments after a 64 MiB gemv; the 6 us
    are 0.5% of a 1.3 ms layer call).  The guard, and so every check, is
    the kernel's.
    """
    kernel = checked.__name__[len("_checked_"):]

    def run(*args):
        checked(*args)

    return njit(**JIT_OPTIONS)(_named(run, f"_quiet_{kernel}"))


def _untypeable(kernel, names, args):
    """The LoraError for arguments Numba could not compile a kernel for (from Python)."""
    for name, value in zip(names, args):
        if isinstance(value, np.ndarray):
            if value.dtype == np.float16:
                return LoraDtypeError(f"kernels.{kernel}: {name} must be float32 or float64, got "
                                      "float16 (Numba has no float16 arithmetic; convert with "
                                      ".astype(np.float32), or use merge_f16 for float16 bits)")
            if not value.dtype.isnative:
                return LoraDtypeError(f"kernels.{kernel}: {name} must be in this machine's byte "
                                      f"order, got {value.dtype.str} (convert with "
                                      ".astype(dtype.newbyteorder('=')))")
            if value.dtype.kind not in "biuf":
                return LoraDtypeError(f"kernels.{kernel}: {name} must have a numeric dtype, got "
                                      f"{value.dtype}")
            continue
        if isinstance(value, np.generic) and value.dtype.kind == "f" and \
                value.dtype not in (np.float32, np.float64):
            return LoraTypeError(f"kernels.{kernel}: {name} must be a float32 or float64 "
                                 f"number, got {value.dtype}")
        if isinstance(value, int) and not isinstance(value, bool) and \
                not -2 ** 63 <= value < 2 ** 63:
            return LoraTypeError(f"kernels.{kernel}: {name} must fit in int64, got {value}")
        try:
            typeof(value)
        except (ValueError, TypeError):
            return LoraTypeError(f"kernels.{kernel}: {name} must be a NumPy array or a real "
                                 f"number, got {type(value).__name__}")
        if not isinstance(value, (bool, int, float, np.generic)):
            return LoraTypeError(f"kernels.{kernel}: {name} must be a NumPy array or a real "
                                 f"number, got {type(value).__name__}")
    return None


def python_errors(dispatcher):
    """Make calls from Python that Numba cannot compile raise a LoraError.

    The guards (:func:`guarded`) see every argument type Numba can type.
    What it cannot type (a dict, a Fraction, an object or big-endian array, an
    int beyond int64) or cannot lower (float16) fails before any guard runs,
    with a Numba error.  A Python call of a kernel compiles through the
    dispatcher's ``_compile_for_args``; this wraps it (on this one dispatcher
    object) so that such a failure becomes a :class:`~numba_lora.LoraError`
    naming the kernel and the argument.  Nothing has run at that point, so no
    array was touched.  Calls from ``@njit`` code are typed by Numba itself
    and keep Numba's errors for such types.
    """
    if getattr(dispatcher, "_lora_python_errors", False):
        return dispatcher
    kernel = dispatcher.__name__
    names = tuple(inspect.signature(dispatcher.py_func).parameters)
    compile_for_args = dispatcher._compile_for_args

    def _compile_for_args(*args, **kws):
        try:
            return compile_for_args(*args, **kws)
        except LoraError:
            raise
        except Exception as exc:  # Numba's TypingError, NotImplementedError, ...
            found = _untypeable(kernel, names, args)
            if found is None:
                kinds = ", ".join(type(a).__name__ for a in args)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                found = LoraTypeError(f"kernels.{kernel}: cannot compile for arguments of types "
                                      f"({kinds}): {first}")
            raise found from exc

    dispatcher._compile_for_args = _compile_for_args
    dispatcher._lora_python_errors = True
    return dispatcher


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``llvm.fma``), for float32 or float64."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _prefetch(rw, what):
    """A prefetch intrinsic: ``rw`` 1 asks for the line for writing, 0 for reading."""
    def hint(typingctx, address):
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = builder.module.declare_intrinsic(
                "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
            # locality = 3 (keep in all levels), data cache.
            builder.call(fn, [builder.inttoptr(args[0], i8p), i32(rw), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(address), codegen

    hint.__doc__ = (f"Hint the CPU to bring the cache line at ``address`` (an integer) in "
                    f"for {what}; it never faults, whatever the address.")
    return hint


prefetch = intrinsic(_named(_prefetch(1, "writing"), "prefetch"))
prefetch_read = intrinsic(_named(_prefetch(0, "reading"), "prefetch_read"))


#: Rows of the register block of :func:`fma_block4`.
BLOCK_ROWS = 4
#: Bytes of columns one :func:`fma_block4` call covers: two 64-byte vectors
#: per row, eight independent chains in flight (an FMA's latency is about
#: four of its issue slots).
BLOCK_BYTES = 128
_VECTOR_BYTES = 64


def block_lanes(dtype):
    """Elements of ``dtype`` in one 64-byte vector."""
    return _VECTOR_BYTES // (dtype.bitwidth // 8)


@intrinsic
def fma_block4(typingctx, A, B, i0, j0, k0, k1, start, acc, col):
    """A 4-row register block of fused multiply-add chains (the merge's inner kernel).

    For r in 0..3 and c in 0..L-1 (L = BLOCK_BYTES of the dtype: 32 float32
    or 16 float64)::

        p = start
        for k in range(k0, k1):
            p = fma(B[i0 + r, k], A[k, j0 + c], p)
        acc[r, col + c] = p

    which is exactly the scalar chain, each step rounded once, with the four
    rows' partial sums held in vector registers for the whole loop over k
    (each load of A serves four fused multiply-adds).  The caller guarantees
    ``i0 + 4 <= B.shape[0]``, ``j0 + L <= A.shape[1]``, ``0 <= k0 <= k1 <=
    A.shape[0] == B.shape[1]``, ``col + L <= acc.shape[1]`` and
    ``acc.shape[0] >= 4``, all arrays C-contiguous of one dtype: nothing here
    checks bounds.
    """
    arrays = (A, B, acc)
    if not all(isinstance(a, types.Array) and a.ndim == 2 for a in arrays):
        return None
    dtype = A.dtype
    if dtype not in (types.float32, types.float64) or B.dtype != dtype or acc.dtype != dtype:
        return None
    lanes = block_lanes(dtype)

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        A_, B_, i0_, j0_, k0_, k1_, start_, acc_, col_ = args
        a = context.make_array(A)(context, builder, A_)
        b = context.make_array(B)(context, builder, B_)
        c = context.make_array(acc)(context, builder, acc_)
        i64 = ir.IntType(64)
        lda = builder.extract_value(a.shape, 1)
        ldb = builder.extract_value(b.shape, 1)
        ldc = builder.extract_value(c.shape, 1)
        scalar = context.get_value_type(dtype)
        vec = ir.VectorType(scalar, lanes)
        vecp = vec.as_pointer()
        suffix = "f32" if dtype == types.float32 else "f64"
        fma_fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{lanes}{suffix}")
        undef = ir.Constant(vec, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)

        def splat(value):
            return builder.shuffle_vector(builder.insert_element(undef, value, ir.IntType(32)(0)),
                                         undef, zeros)

        nvec = BLOCK_BYTES // _VECTOR_BYTES
        accs = [[cgutils.alloca_once(builder, vec) for _ in range(nvec)]
                for _ in range(BLOCK_ROWS)]
        first = splat(builder.fpext(start_, scalar) if start_.type != scalar else start_)
        for row_slots in accs:
            for slot in row_slots:
                builder.store(first, slot)
        i0v = builder.sext(i0_, i64) if i0_.type != i64 else i0_
        j0v = builder.sext(j0_, i64) if j0_.type != i64 else j0_
        k0v = builder.sext(k0_, i64) if k0_.type != i64 else k0_
        k1v = builder.sext(k1_, i64) if k1_.type != i64 else k1_
        count = builder.sub(k1v, k0v)
        with cgutils.for_range(builder, count) as loop:
            k = builder.add(loop.index, k0v)
            a_row = builder.add(builder.mul(k, lda), j0v)
            a_vecs = [builder.load(builder.bitcast(
                builder.gep(a.data, [builder.add(a_row, ir.Constant(i64, v * lanes))]), vecp),
                align=1) for v in range(nvec)]
            for r, row_slots in enumerate(accs):
                row = builder.add(i0v, ir.Constant(i64, r))
                b_val = splat(builder.load(
                    builder.gep(b.data, [builder.add(builder.mul(row, ldb), k)])))
                for a_vec, slot in zip(a_vecs, row_slots):
                    builder.store(builder.call(fma_fn, [b_val, a_vec, builder.load(slot)]), slot)
        colv = builder.sext(col_, i64) if col_.type != i64 else col_
        for r, row_slots in enumerate(accs):
            for v, slot in enumerate(row_slots):
                offset = builder.add(builder.mul(ir.Constant(i64, r), ldc),
                                     builder.add(colv, ir.Constant(i64, v * lanes)))
                out_ptr = builder.bitcast(builder.gep(c.data, [offset]), vecp)
                builder.store(builder.load(slot), out_ptr, align=1)
        return context.get_dummy_value()

    sig = types.void(A, B, i0, j0, k0, k1, start, acc, col)
    return sig, codegen
