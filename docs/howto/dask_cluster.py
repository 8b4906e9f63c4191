"""How-to: batch inference and the checkpoint merge on a Dask cluster."""
import os
import tempfile

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

from _files import make_adapter, make_base_model  # tiny stand-ins for real files
from numba_lora import LoraLinear, checkpoint, distributed

tmp = tempfile.mkdtemp()
base_dir = make_base_model(os.path.join(tmp, "base-model"))
adapter_dir = make_adapter(os.path.join(tmp, "my-adapter"), base_dir)

rng = np.random.default_rng(0)
W = rng.standard_normal((64, 32), dtype=np.float32)
layer = LoraLinear(W, rank=4, alpha=8.0, seed=0)
layer.lora_b = 0.1 * rng.standard_normal((64, 4))

# Worker processes import this file: start the cluster only once.
if __name__ == "__main__":
    # A real cluster: Client("tcp://scheduler:8786") instead of the LocalCluster.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        print(distributed.thread_counts(client))          # Numba/BLAS threads per task

        # Rows in chunks; the layer travels to each worker once, never per chunk.
        rows = rng.standard_normal((1000, 32), dtype=np.float32)
        X = da.from_array(rows, chunks=(250, 32))
        Y = distributed.forward_batch(client, layer, X)   # lazy (1000, 64)
        expected = layer.forward_batch(rows)
        assert np.allclose(Y.compute(), expected, rtol=1e-5, atol=1e-5)

        # One task per shard; the workers need the paths (a shared file system).
        out_dir = os.path.join(tmp, "merged")
        result = distributed.merge(client, base_dir, adapter_dir, out_dir)
        print(f"{len(result.merged)} tensors merged on the cluster")

    single = checkpoint.merge(base_dir, adapter_dir, os.path.join(tmp, "merged-here"))
    with open(os.path.join(tmp, "merged", "model.safetensors"), "rb") as a, \
            open(os.path.join(tmp, "merged-here", "model.safetensors"), "rb") as b:
        assert a.read() == b.read()          # the same bytes as one process
