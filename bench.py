"""picograd measurement: each figure beside the baseline a user would otherwise pick, measured in the same run.

    python bench.py                      # CPU: everything
    python bench.py --only matmul,eager  # some sections
    python bench.py --device CUDA        # the GPU sections (torch/cuBLAS baselines)

Every timing is the median of several runs after a warm-up; nothing here is asserted (tests check behaviour,
this file measures). The table at the end is what goes into issue notes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

import picograd as pg

ROWS = []   # (section, what, picograd figure, baseline figure, unit, baseline name)


def record(section, what, ours, base, unit, base_name):
    ROWS.append((section, what, ours, base, unit, base_name))
    ratio = ours / base if base else float("nan")
    print(f"  {what:<44} {ours:12.2f} {unit:<10} {base_name} {base:10.2f}  ratio {ratio:6.2f}", flush=True)


def median_time(fn, reps=7, warmup=2, sync=None):
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------------------------------
# Memory bandwidth: the ceiling for every bandwidth-bound kernel, measured with torch's multi-threaded kernels


def measure_bandwidth(device="CPU"):
    import torch
    n = 64 << 20 if device == "CPU" else 512 << 20   # floats: 256 MB on the CPU, 2 GB on a GPU
    dev = "cpu" if device == "CPU" else "cuda"
    x = torch.rand(n, device=dev)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    t_read = median_time(lambda: x.sum(), sync=sync)
    t_copy = median_time(lambda: y.copy_(x), sync=sync)
    return n * 4 / t_read / 1e9, 2 * n * 4 / t_copy / 1e9


# ----------------------------------------------------------------------------------------------------------------------
# Sections


def bench_eager(device):
    """Per-op dispatch overhead: a small eager add, picograd against torch."""
    import torch
    a = pg.Tensor(np.ones(16, np.float32), device=device)
    b = pg.Tensor(np.ones(16, np.float32), device=device)
    n = 2000
    with pg.eager():
        c = a + b
        for _ in range(100):
            c = c + b
        start = time.perf_counter()
        for _ in range(n):
            c = c + b
        pg.Device[device].synchronize()
        ours = (time.perf_counter() - start) / n * 1e6
    dev = "cpu" if device == "CPU" else "cuda"
    ta, tb = torch.ones(16, device=dev), torch.ones(16, device=dev)
    tc = ta + tb
    start = time.perf_counter()
    for _ in range(n * 5):
        tc = tc + tb
    if dev == "cuda":
        torch.cuda.synchronize()
    theirs = (time.perf_counter() - start) / (n * 5) * 1e6
    record("eager", f"eager add dispatch ({device})", ours, theirs, "us/op", "torch")


_TWENTY_OPS = r'''
import os, sys, time
sys.path.insert(0, {root!r})
start = time.perf_counter()
import picograd as pg
x = pg.Tensor([[float(i + j) for j in range(64)] for i in range(64)])
y = x
for i in range(5):
    y = (y * 0.5 + 1.0).relu()
    y = y - y.mean(-1, keepdim=True)
    y = y.exp() / (y.exp().sum(-1, keepdim=True) + 1.0)
    y = y @ x.T
y.numpy()
print(time.perf_counter() - start)
'''


def bench_compile_time():
    """Cold (empty kernel cache) against warm (disk cache) time of a 20-op graph, each in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PICOGRAD_CACHE=cache)
        code = _TWENTY_OPS.format(root=os.path.dirname(os.path.abspath(__file__)))
        cold = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
        warm = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    record("compile", "20-op graph, cold cache vs warm (s)", cold, warm, "s", "warm")


_NUMPY_MATMUL = r'''
import sys, time, numpy as np
for n in map(int, sys.argv[1:]):
    a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
    a @ b
    ts = []
    for _ in range(5):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    print(n, 2 * n**3 / np.median(ts) / 1e9)
'''


def numpy_matmul_gflops(sizes, coretype_env: bool):
    """numpy's OpenBLAS in a subprocess, with the environment as set, or with OPENBLAS_CORETYPE/L2_SIZE unset
    (OpenBLAS reads them when it loads)."""
    env = dict(os.environ)
    if not coretype_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    out = subprocess.run([sys.executable, "-c", _NUMPY_MATMUL, *map(str, sizes)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return {int(n): float(g) for n, g in (line.split() for line in out.splitlines())}


def bench_matmul(device, sizes):
    mm = pg.compile(lambda x, y: x @ y)
    if device == "CPU":
        as_set = numpy_matmul_gflops(sizes, True)
        unset = numpy_matmul_gflops(sizes, False)
    for n in sizes:
        a = pg.Tensor(np.random.rand(n, n).astype(np.float32), device=device)
        b = pg.Tensor(np.random.rand(n, n).astype(np.float32), device=device)
        t = median_time(lambda: mm(a, b), reps=5, sync=pg.Device[device].synchronize)
        ours = 2 * n ** 3 / t / 1e9
        if device == "CPU":
            record("matmul", f"fp32 matmul {n}x{n} (OpenBLAS env as set)", ours, as_set[n], "GFLOP/s", "numpy")
            record("matmul", f"fp32 matmul {n}x{n} (OPENBLAS_CORETYPE unset)", ours, unset[n], "GFLOP/s", "numpy")


def bench_bandwidth_kernels(device, read_bw, copy_bw):
    """Large elementwise and reduce kernels as a fraction of the measured memory bandwidth."""
    n = 32 << 20
    x = pg.Tensor(np.random.rand(n).astype(np.float32), device=device)
    y = pg.Tensor(np.random.rand(n).astype(np.float32), device=device)
    sync = pg.Device[device].synchronize
    add = pg.compile(lambda a, b: a + b)
    total = pg.compile(lambda a: a.sum())
    t = median_time(lambda: add(x, y), sync=sync)
    record("bandwidth", "elementwise add, 128 MB inputs (GB/s)", 3 * n * 4 / t / 1e9, copy_bw, "GB/s", "copy")
    t = median_time(lambda: total(x), sync=sync)
    record("bandwidth", "sum of 128 MB (GB/s)", n * 4 / t / 1e9, read_bw, "GB/s", "read")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--only", default="", help="comma-separated sections: eager,compile,matmul,bandwidth")
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    device = pg.Device.canonicalize(args.device)
    want = lambda name: not only or name in only   # noqa: E731
    print(f"picograd bench on {machine()}; device {device}", flush=True)
    read_bw, copy_bw = measure_bandwidth("CPU" if device == "CPU" else "CUDA")
    print(f"  memory bandwidth (torch): read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s", flush=True)
    if want("eager"):
        bench_eager(device)
    if want("compile"):
        bench_compile_time()
    if want("matmul"):
        bench_matmul(device, [int(s) for s in args.sizes.split(",")])
    if want("bandwidth"):
        bench_bandwidth_kernels(device, read_bw, copy_bw)
    print("\n| section | what | picograd | baseline | ratio |\n|---|---|---|---|---|")
    for section, what, ours, base, unit, base_name in ROWS:
        print(f"| {section} | {what} | {ours:.2f} {unit} | {base_name} {base:.2f} | {ours / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
