"""The ctypes adapters over numpy.matmul, used where NumPy's OpenBLAS is not found.

Run in a fresh interpreter with NUMBA_LORA_BLAS=numpy-matmul, since the BLAS
behind the kernels is chosen once, at import.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import reference as ref
    import numba_lora
    from numba_lora import kernels
    from numba_lora.kernels import _blas

    assert "ctypes adapters" in _blas.PROVIDER, _blas.PROVIDER
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        W, A, B = ref.random_lora(rng, 13, 11, 3, dtype)
        x = rng.standard_normal(11).astype(dtype)
        X = rng.standard_normal((5, 11)).astype(dtype)
        y = kernels.forward(W, A, B, 0.5, x, np.empty(13, dtype))
        ref.assert_close(y, *ref.forward(W, A, B, 0.5, x), dtype)
        Y = kernels.forward_batch(W, A, B, 0.5, X, np.empty((5, 13), dtype))
        ref.assert_close(Y, *ref.forward(W, A, B, 0.5, X), dtype)
        merged = ref.merged(W, A, B, 0.5)
        kernels.merge(W, A, B, 0.5)
        ref.assert_close(W, *merged, dtype)
        multi = numba_lora.MultiLoraLinear(rng.standard_normal((13, 11)).astype(dtype))
        multi.add_adapter("a", A, B, 1.5)
        Z = multi.forward_batch(X, [0, -1, 0, 0, 0], path="segmented")
        ref.assert_close(Z[1], *ref.forward(multi.weight, A, B, 0.0, X[1]), dtype)
    print("ok")
""")


def test_kernels_on_the_ctypes_adapters(tmp_path):
    tests = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_LORA_BLAS="numpy-matmul",
               PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tests)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
