"""Matmul tile variants of the CUDA templates against cuBLAS, on a GPU machine (PERF.md has the results).

    python tune_matmul.py w64 f1buf ...   # variants by name (default: all); each runs in a process of its own

A variant replaces ops_cuda's tf32 tiles (WGMMA_TILES and TF32_TILES: on Hopper the template follows the big
tile, wgmma for warpgroup tiles, mma.sync for the others) or FP32_TILES (programs are cached per process, so
one process per variant). Shapes: square 4096 and 8192 in two layouts, and the 124M Llama's training products
(a weight gradient among them). Every product is also checked against float64 (relative error printed); nothing
is asserted.
"""
import subprocess
import sys

import numpy as np

import ops_cuda
from bench import median_time
from ops_cuda import MatmulTile as T

SMALL_TF32 = T(64, 64, 16, warps_m=2, warps_n=2)
SMALL_FP32 = T(64, 64, 16, TM=4, TN=4, buffers=1)
def both(*tiles):   # tf32 tiles as every GPU gets them (on Hopper, wgmma for warpgroup tiles)
    return {"TF32_TILES": tiles, "WGMMA_TILES": tiles}


VARIANTS = {   # name: the tile tuples of ops_cuda it replaces; only the precisions it changes are timed
    "f8x1": {"FP32_TILES": (T(128, 128, 8, TM=8, TN=8, buffers=1), SMALL_FP32)},
    "f8x2": {"FP32_TILES": (T(128, 128, 8, TM=8, TN=8, buffers=2), SMALL_FP32)},
    "f8x2_mb2": {"FP32_TILES": (T(128, 128, 8, TM=8, TN=8, buffers=2, min_blocks=2), SMALL_FP32)},
    "f16x1": {"FP32_TILES": (T(128, 128, 16, TM=8, TN=8, buffers=1), SMALL_FP32)},
    "f16x2": {"FP32_TILES": (T(128, 128, 16, TM=8, TN=8, buffers=2), SMALL_FP32)},
    "f128x64": {"FP32_TILES": (T(128, 64, 16, TM=8, TN=4, buffers=2), SMALL_FP32)},
    "w32x64": both(T(128, 128, 16, warps_m=2, warps_n=4), SMALL_TF32),
    "w32x64_mb2": both(T(128, 128, 16, warps_m=2, warps_n=4, min_blocks=2), SMALL_TF32),
    "w64": both(T(128, 128, 16, warps_m=2, warps_n=2), SMALL_TF32),
    "w64_1buf": both(T(128, 128, 16, warps_m=2, warps_n=2, buffers=1), T(64, 64, 16, warps_m=2, warps_n=2, buffers=1)),
    "w64_mb2": both(T(128, 128, 16, warps_m=2, warps_n=2, min_blocks=2), SMALL_TF32),
    "t128x256": both(T(128, 256, 16, warps_m=2, warps_n=4), SMALL_TF32),
    "t256x128": both(T(256, 128, 16, warps_m=4, warps_n=2), SMALL_TF32),
    "wg128x256_k32_s3": both(T(128, 256, 32, warpgroups=2, buffers=3), SMALL_TF32),
    "wg128x256_k32_s4": both(T(128, 256, 32, warpgroups=2, buffers=4), SMALL_TF32),
    "wg_tiers": both(T(128, 256, 32, warpgroups=2, buffers=4), T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2),
                     SMALL_TF32),
    "wg_tiers_o0": both(T(128, 256, 32, warpgroups=2, buffers=4),
                        T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0), SMALL_TF32),
    "wg_default": {"WGMMA_TILES": ops_cuda.WGMMA_TILES},
    # bulk copies: each block on its own (cluster 1) or in pairs sharing B's slices (cluster 2, the default)
    "wg_c1": both(T(128, 256, 32, warpgroups=2, buffers=4),
                  T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0, efficiency=0.95), SMALL_TF32),
    "wg_c2_o0": both(T(128, 256, 32, warpgroups=2, buffers=4, overlap=0, cluster=2),
                     T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0, cluster=2, efficiency=0.95),
                     SMALL_TF32),
    "wg128_c2_o1": both(T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, cluster=2), SMALL_TF32),
    "wg128_c2_o0": both(T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0, cluster=2), SMALL_TF32),
    "wg256": both(T(128, 256, 32, warpgroups=2, buffers=4), SMALL_TF32),
    "wg192": both(T(128, 192, 32, warpgroups=2, buffers=4), SMALL_TF32),
    "wg128": both(T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2), SMALL_TF32),
    "wg128_o0": both(T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0), SMALL_TF32),
    "wg128x128_k32_s3_mb2": both(T(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2), SMALL_TF32),
    "wg128x128_k32_s4": both(T(128, 128, 32, warpgroups=2, buffers=4), SMALL_TF32),
    # mma.sync below wgmma's sides (attention's 64-wide products on Hopper): a 128 x 64 tier
    "mma_default": {"TF32_TILES": ops_cuda.TF32_TILES},
    "mma128x64_w4x1": {"TF32_TILES": (ops_cuda.TF32_TILES[0], T(128, 64, 16, warps_m=4, warps_n=1, efficiency=0.9),
                                      SMALL_TF32)},
    "mma128x64_w2x2": {"TF32_TILES": (ops_cuda.TF32_TILES[0], T(128, 64, 16, warps_m=2, warps_n=2, efficiency=0.9),
                                      SMALL_TF32)},
}
# (m, k, n, layout): "nn" is A[m, k] @ B[k, n]; "nt" A @ B[n, k].T, a projection X W^T (both k-contiguous); "tn"
# A[k, m].T @ B, a weight gradient X^T dY; "bnt" and "bnn": 96 at once (attention's scores and its probabilities
# times the values, 8 sequences x 12 heads)
SHAPES = [(4096, 4096, 4096, "nn"), (8192, 8192, 8192, "nn"), (8192, 8192, 8192, "nt"), (8192, 768, 2304, "nt"),
          (8192, 768, 768, "nt"), (8192, 768, 768, "nn"), (768, 8192, 768, "tn"), (8192, 2048, 768, "nn"),
          (8192, 768, 2048, "nt"), (1024, 64, 1024, "bnt"), (1024, 1024, 64, "bnn")]
BATCH = 96


def run_variant(name):
    import torch
    import picograd as pg
    for attribute, tiles in VARIANTS[name].items():
        setattr(ops_cuda, attribute, tiles)

    def sync():
        pg.Device["CUDA"].synchronize()
        torch.cuda.synchronize()
    for tf32, attributes in ((True, ("TF32_TILES", "WGMMA_TILES")), (False, ("FP32_TILES",))):
        if not any(a in VARIANTS[name] for a in attributes):
            continue
        pg.TF32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        products = {"nn": pg.compile(lambda x, y: x @ y), "nt": pg.compile(lambda x, y: x @ y.T),
                    "tn": pg.compile(lambda x, y: x.T @ y), "bnt": pg.compile(lambda x, y: x @ y.transpose(1, 2)),
                    "bnn": pg.compile(lambda x, y: x @ y)}
        torch_products = {"nn": lambda x, y: x @ y, "nt": lambda x, y: x @ y.T, "tn": lambda x, y: x.T @ y,
                          "bnt": lambda x, y: x @ y.transpose(1, 2), "bnn": lambda x, y: x @ y}
        for m, k, n, layout in SHAPES:
            batch = (BATCH,) if layout in ("bnt", "bnn") else ()
            a_np = np.random.rand(*batch, *((k, m) if layout == "tn" else (m, k))).astype(np.float32)
            b_np = np.random.rand(*batch, *((n, k) if layout in ("nt", "bnt") else (k, n))).astype(np.float32)
            a, b = pg.Tensor(a_np, device="CUDA"), pg.Tensor(b_np, device="CUDA")
            ta, tb = torch.tensor(a_np, device="cuda"), torch.tensor(b_np, device="cuda")
            mm, tmm = products[layout], torch_products[layout]

            def ours():
                return mm(a, b)

            def theirs():
                return tmm(ta, tb)
            want = tmm(ta.double(), tb.double())
            got = torch.tensor(ours().numpy(), device="cuda").double()
            err = float((got - want).norm() / want.norm())
            flop = 2 * m * n * k * (BATCH if batch else 1)
            t_ours, t_theirs = (median_time(fn, reps=10, sync=sync) for fn in (ours, theirs))
            print(f"{name:12s} {'tf32' if tf32 else 'fp32'} {layout} {m}x{k}x{n}: {flop / t_ours / 1e12:7.1f} "
                  f"TFLOP/s  cuBLAS {flop / t_theirs / 1e12:7.1f}  ratio {t_theirs / t_ours:5.2f}  err {err:.1e}",
                  flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        run_variant(sys.argv[2])
    else:
        for name in sys.argv[1:] or list(VARIANTS):
            subprocess.run([sys.executable, __file__, "--one", name], check=False)
