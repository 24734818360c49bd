"""Self-check of the CUDA backend on a GPU machine: every template and device path, against numpy in float64,
with a PASS/FAIL table (exit status 1 if anything fails) and a few timings for information.

    PICOGRAD_CACHE=/tmp/pgcache-cuda python cuda_selfcheck.py [--device CUDA:0] [--no-perf] [--steps 1000]

Runs in well under two minutes on an H100 (most of it compiling kernels the first time).
"""
import argparse
import sys
import time
import traceback

import numpy as np

import picograd as pg
from picograd import Tensor, Variable
import compile as compiler

RNG = np.random.default_rng(0)
DEV = "CUDA:0"


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def rel_err(got, want):
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def expect(cond, detail):
    if not cond:
        raise AssertionError(detail)


def cuda(array):
    return Tensor(array, device=DEV)


def kinds_used():
    """Template kinds of every CUDA program built so far (compile.py's in-memory program cache)."""
    return {getattr(p, "launch", None).kind for p in compiler._programs.values() if hasattr(p, "launch")}


# ----------------------------------------------------------------------------------------------------------------------
# checks: each returns a short detail string or raises


def check_device():
    dev = pg.Device[DEV]
    free, total = dev.mem_info()
    return f"{dev.arch} (compiling for {dev.compile_arch}), {dev.sm_count} SMs, {total / 2**30:.0f} GiB"


def check_copies():
    for array in (randn(1000, 37), RNG.integers(-9, 9, size=(77,)).astype(np.int32), RNG.random(50) < 0.5,
                  randn(16 << 20)):
        t = Tensor(array).to(DEV)
        expect(t.device == DEV, t.device)
        np.testing.assert_array_equal(t.numpy(), array)
        np.testing.assert_array_equal(t.to("CPU").numpy(), array)
    x = randn(300, 41)
    np.testing.assert_array_equal((cuda(x) + 0.0).to("CPU").numpy(), x)    # a kernel's output back to the host
    np.testing.assert_array_equal(cuda(x).clone().numpy(), x)               # device to device
    np.testing.assert_array_equal(cuda(x).T.contiguous().numpy(), x.T)
    return "CPU->CUDA->CPU exact (f32, i32, bool, 64 MiB), clone, transpose"


def check_elementwise():
    a, b = randn(1024, 512), randn(512)
    got = (cuda(a) * cuda(b) + 1.0).exp().numpy()
    err = rel_err(got, np.exp(a.astype(np.float64) * b + 1))
    expect(err < 1e-6, f"wide: rel err {err:.2e}")
    odd = randn(1001, 333)
    err = rel_err((cuda(odd).relu() * 3 - cuda(odd).sigmoid()).numpy(),
                  np.maximum(odd, 0) * 3.0 - 1 / (1 + np.exp(-odd.astype(np.float64))))
    expect(err < 1e-6, f"odd sizes: rel err {err:.2e}")
    np.testing.assert_array_equal((cuda(a) > 0.5).numpy(), a > 0.5)
    ints = RNG.integers(-1000, 1000, size=(64, 64)).astype(np.int32)
    np.testing.assert_array_equal((cuda(ints) * 3 + 7).numpy(), ints * 3 + 7)
    shifted = cuda(a)[:, 4:260] - cuda(a)[:, 1:257]
    np.testing.assert_allclose(shifted.numpy(), a[:, 4:260] - a[:, 1:257], rtol=1e-6, atol=1e-6)
    padded = cuda(a[:64, :64]).pad((0, 0, 2, 2))
    np.testing.assert_array_equal(padded.numpy(), np.pad(a[:64, :64], ((2, 2), (0, 0))))
    x = randn(8, 1 << 16) * 30
    unary = (("log", lambda t: t.abs().log(), lambda v: np.log(np.abs(v))), ("sin", lambda t: t.sin(), np.sin),
             ("sqrt", lambda t: t.abs().sqrt(), lambda v: np.sqrt(np.abs(v))))
    for name, fn, ref in unary:
        err = np.abs(fn(cuda(x)).numpy() - ref(x.astype(np.float64))).max()
        expect(err < 1e-5 * max(1.0, np.abs(ref(x.astype(np.float64))).max()), f"{name}: max err {err:.2e}")
    expect("wide" in kinds_used() and "elementwise" in kinds_used(), kinds_used())
    return "wide (16-byte) and plain, bool, int, 4-aligned/misaligned views, pad, log/sin/sqrt"


def check_reductions():
    cases = [((4096, 4096), 1), ((4096, 4096), 0), ((1, 1 << 20), None), ((1 << 20, 3), 1), ((64, 1000), 1),
             ((32, 64, 128), (0, 2)), ((3, 1 << 18), 0), ((100, 37), None)]
    worst = 0.0
    for shape, axis in cases:
        x = randn(*shape)
        want = x.astype(np.float64).sum(axis)
        err = np.abs(cuda(x).sum(axis).numpy() - want).max() / (np.sqrt(np.prod(shape) / np.size(want)) + 1)
        worst = max(worst, err)
        expect(err < 1e-5, f"sum{shape} axis {axis}: err {err:.2e}")
        np.testing.assert_array_equal(cuda(x).max(axis).numpy(), x.max(axis))
    x = randn(512, 300)
    np.testing.assert_allclose(cuda(x).T.sum(1).numpy(), x.sum(0), rtol=1e-5, atol=1e-4)   # non-contiguous view
    np.testing.assert_allclose(cuda(x).var(1).numpy(), x.astype(np.float64).var(1, ddof=1), rtol=1e-4)
    np.testing.assert_array_equal(cuda(x).argmax(1).numpy(), x.argmax(1))
    y = x.copy()
    y[7, 100] = np.nan
    expect(np.isnan(cuda(y).max(1).numpy()[7]), "max must propagate NaN")
    used = kinds_used()
    expect({"warp", "block", "split", "serial"} <= used, f"templates used: {sorted(used)}")
    return f"{len(cases)} shapes incl. strided/multi-axis/full, warp+block+split+serial, worst err {worst:.1e}"


def _matmul_errors(tf32):
    old = pg.TF32
    pg.TF32 = tf32
    try:
        out = []
        for (m, k, n) in ((512, 1024, 256), (1000, 777, 333), (33, 17, 65)):
            a, b, bias = randn(m, k), randn(k, n), randn(n)
            got = (cuda(a) @ cuda(b) + cuda(bias)).numpy()
            out.append(((m, k, n), rel_err(got, a.astype(np.float64) @ b + bias)))
        a, b = randn(6, 100, 64), randn(6, 80, 64)
        got = (cuda(a) @ cuda(b).transpose(1, 2)).numpy()
        out.append(("bmm 6x100x64x80 B^T", rel_err(got, a.astype(np.float64) @ b.transpose(0, 2, 1))))
        return out
    finally:
        pg.TF32 = old


def check_matmul_fp32():
    errs = _matmul_errors(False)
    worst = max(e for _, e in errs)
    expect(worst < 1e-5, f"fp32 rel errors {errs}")
    expect("sgemm" in kinds_used(), kinds_used())
    return f"rel err vs float64 <= {worst:.1e} (threshold 1e-5), incl. odd sizes, batched, transposed, epilogue"


def check_matmul_tf32():
    errs = _matmul_errors(True)
    worst, best = max(e for _, e in errs), min(e for _, e in errs)
    expect(worst < 1e-3, f"tf32 rel errors {errs}")
    expect(best > 1e-5, f"tf32 errors look like fp32 ({errs}): did the tensor-core path run?")
    progs = [p for p in compiler._programs.values() if getattr(getattr(p, "launch", None), "kind", "") == "mma"]
    expect(progs and "pg_mma_tf32(pg_acc" in progs[0].source, "no tensor-core program was built")
    return f"rel err vs float64 {best:.1e}..{worst:.1e} (threshold 1e-3) on mma.sync m16n8k8 tf32"


def check_gather_embedding():
    table = randn(1000, 64)
    ids = RNG.integers(0, 1000, size=(32, 16)).astype(np.int32)
    emb = pg.Embedding(1000, 64)
    emb.weight = Tensor(table, device=DEV, requires_grad=True)
    out = emb(cuda(ids))
    np.testing.assert_array_equal(out.numpy(), table[ids])
    upstream = randn(32, 16, 64)
    (out * cuda(upstream)).sum().backward()
    want = np.zeros((1000, 64))
    np.add.at(want, ids.reshape(-1), upstream.reshape(-1, 64).astype(np.float64))
    err = rel_err(emb.weight.grad.numpy(), want)
    expect(err < 1e-5, f"embedding grad rel err {err:.2e}")
    return f"forward exact, backward rel err {err:.1e}"


def check_softmax_and_loss():
    x = randn(512, 1000) * 3
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    err = rel_err(cuda(x).softmax(-1).numpy(), p)
    expect(err < 1e-5, f"softmax rel err {err:.2e}")
    err2 = rel_err(cuda(x).log_softmax(-1).numpy(), np.log(p))
    expect(err2 < 1e-5, f"log_softmax rel err {err2:.2e}")
    logits = Tensor(x, device=DEV, requires_grad=True)
    targets = RNG.integers(0, 1000, size=512).astype(np.int32)
    loss = pg.cross_entropy(logits, cuda(targets))
    want = -np.log(p[np.arange(512), targets]).mean()
    expect(abs(loss.item() - want) < 1e-4 * abs(want), f"cross entropy {loss.item()} vs {want}")
    loss.backward()
    grad = p.copy()
    grad[np.arange(512), targets] -= 1
    err3 = rel_err(logits.grad.numpy(), grad / 512)
    expect(err3 < 1e-5, f"cross entropy grad rel err {err3:.2e}")
    return f"softmax {err:.1e}, log_softmax {err2:.1e}, CE grad {err3:.1e}"


def check_index_errors():
    dev = pg.Device[DEV]
    table = cuda(randn(10, 4))
    try:
        table[cuda(np.array([3, 10], dtype=np.int32))].numpy()
    except IndexError as e:
        expect("10" in str(e), str(e))
    else:
        raise AssertionError("an out-of-range index did not raise IndexError")
    np.testing.assert_array_equal(table[cuda(np.array([-1, 9], dtype=np.int32))].numpy().shape, (2, 4))
    expect(not dev.checked, "flag still pending after a check")
    return "IndexError from the device flag, cleared afterwards"


def check_variables_and_replay():
    x = randn(4, 64)
    v = Variable("pos", 0, 60)
    for p in (0, 17, 60):
        np.testing.assert_array_equal(cuda(x)[:, v.bind(p):v.bind(p) + 4].numpy(), x[:, p:p + 4])
    before = pg.stats()["kernels_compiled"]
    for p in (1, 2, 3):
        cuda(x)[:, v.bind(p):v.bind(p) + 4].numpy()
    expect(pg.stats()["kernels_compiled"] == before, "a new position compiled a new kernel")

    @pg.compile
    def step(a, b):
        return (a @ b).relu().sum(1)
    b = randn(64, 32)
    for i in range(3):
        a = randn(16, 64)
        np.testing.assert_allclose(step(cuda(a), cuda(b)).numpy(), np.maximum(a @ b, 0).sum(1), rtol=1e-4, atol=1e-3)
    return "symbolic slice bound passed as an int argument; pg.compile replay"


def check_allocator_steady_state(steps=1000):
    dev = pg.Device[DEV]
    pg.manual_seed(0)
    l1, l2 = pg.Linear(64, 128), pg.Linear(128, 10)
    params = [Tensor(p.numpy(), device=DEV, requires_grad=True) for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
    opt = pg.AdamW(params, lr=1e-3)
    x = cuda(randn(32, 64))
    y = cuda(RNG.integers(0, 10, size=32).astype(np.int32))

    def step():
        h = (x @ params[0].T + params[1]).relu()
        loss = pg.cross_entropy(h @ params[2].T + params[3], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    first = step()
    for _ in range(9):
        step()
    at10 = dev.memory_stats()
    start = time.perf_counter()
    for _ in range(steps - 10):
        last = step()
    took = time.perf_counter() - start
    at_end = dev.memory_stats()
    expect(at_end["in_use"] == at10["in_use"], f"in use grew: {at10['in_use']} -> {at_end['in_use']}")
    expect(at_end["device_allocs"] == at10["device_allocs"],
           f"cuMemAlloc called in steady state: {at10['device_allocs']} -> {at_end['device_allocs']}")
    expect(last < first, f"loss did not go down: {first} -> {last}")
    return (f"{steps} steps: in use {at_end['in_use']} B == after 10, no cuMemAlloc after warm-up, "
            f"{took / (steps - 10) * 1e3:.2f} ms/step, loss {first:.3f} -> {last:.3f}")


def check_out_of_memory():
    dev = pg.Device[DEV]
    free, total = dev.mem_info()
    try:
        dev.alloc(2 * total)
    except MemoryError as e:
        text = str(e)
        expect(str(2 * total) in text and "free" in text, text)
    else:
        raise AssertionError("allocating twice the GPU did not raise MemoryError")
    np.testing.assert_array_equal((cuda(np.ones(4, np.float32)) + 1).numpy(), np.full(4, 2, np.float32))
    return "MemoryError names the bytes requested and free; device still usable"


def check_mixing_devices():
    try:
        cuda(randn(3)) + Tensor(randn(3))
    except RuntimeError as e:
        expect("device" in str(e), str(e))
        return "RuntimeError: " + str(e)[:60]
    raise AssertionError("adding a CUDA and a CPU tensor did not raise")


CHECKS = [("device", check_device), ("copies", check_copies), ("elementwise", check_elementwise),
          ("reductions", check_reductions), ("matmul fp32", check_matmul_fp32), ("matmul tf32", check_matmul_tf32),
          ("gather/embedding", check_gather_embedding), ("softmax/CE", check_softmax_and_loss),
          ("index errors", check_index_errors), ("variables/replay", check_variables_and_replay),
          ("allocator", check_allocator_steady_state), ("out of memory", check_out_of_memory),
          ("mixing devices", check_mixing_devices)]


# ----------------------------------------------------------------------------------------------------------------------
# timings (information only)


def timed(fn, reps):
    dev = pg.Device[DEV]
    fn()
    dev.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    dev.synchronize()
    return (time.perf_counter() - start) / reps


def perf():
    lines = []
    a, b, c = (cuda(randn(1 << 24)) for _ in range(3))
    t = timed(lambda: (a * b + c).realize(), 20)
    lines.append(f"elementwise a*b+c, 16M floats: {4 * 4 * (1 << 24) / t / 1e9:7.0f} GB/s")
    x = cuda(randn(8192, 8192))
    t = timed(lambda: x.sum(1).realize(), 10)
    lines.append(f"row sum 8192x8192:             {4 * 8192 * 8192 / t / 1e9:7.0f} GB/s")
    t = timed(lambda: x.sum(0).realize(), 10)
    lines.append(f"column sum 8192x8192:          {4 * 8192 * 8192 / t / 1e9:7.0f} GB/s")
    m = cuda(randn(4096, 4096))
    old = pg.TF32
    try:
        for flag in (False, True):
            pg.TF32 = flag
            t = timed(lambda: (m @ m).realize(), 5)
            name = "tf32" if flag else "fp32"
            lines.append(f"matmul 4096^3 {name}:            {2 * 4096**3 / t / 1e12:7.1f} TFLOP/s")
    finally:
        pg.TF32 = old
    return lines


def main():
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="CUDA:0")
    parser.add_argument("--no-perf", action="store_true")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of the allocator check")
    args = parser.parse_args()
    DEV = pg.Device.canonicalize(args.device)
    checks = [(n, (lambda: check_allocator_steady_state(args.steps)) if f is check_allocator_steady_state else f)
              for n, f in CHECKS]
    rows, failed = [], 0
    start_all = time.perf_counter()
    for name, fn in checks:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:
            ok = False
            detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            traceback.print_exc(file=sys.stderr)
        failed += not ok
        rows.append((name, "PASS" if ok else "FAIL", time.perf_counter() - start, detail))
        if name == "device" and not ok:
            break
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  result   time  detail")
    for name, result, took, detail in rows:
        print(f"{name:<{width}}  {result:<6} {took:5.1f}s  {detail}")
    print(f"\n{len(rows) - failed}/{len(rows)} passed in {time.perf_counter() - start_all:.1f}s; "
          f"templates used: {', '.join(sorted(kinds_used()))}")
    if not args.no_perf and failed == 0:
        print("\ntimings (information, not checked):")
        for line in perf():
            print("  " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
