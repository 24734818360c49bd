"""picograd measurement: each figure beside the baseline a user would otherwise pick, measured in the same run.

    python bench.py                      # CPU: everything
    python bench.py --only matmul,eager  # some sections
    python bench.py --device CUDA        # the GPU sections (torch/cuBLAS baselines)

Every timing is the median of several runs after a warm-up; nothing here is asserted (tests check behaviour,
this file measures). The table at the end is what goes into issue notes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import struct
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


def card(device: str) -> str:
    """The GPU's name as torch reports it, in parentheses, for a CUDA device ("" for the CPU)."""
    if device == "CPU":
        return ""
    import torch
    index = int(device.split(":")[1]) if ":" in device else 0
    return f" ({torch.cuda.get_device_name(index)})"


# ----------------------------------------------------------------------------------------------------------------------
# Memory bandwidth: the ceiling for every bandwidth-bound kernel, measured with torch's multi-threaded kernels


def bandwidth_probes(device="CPU"):
    """torch's sum and copy of a large tensor, the memory's read and copy speed: {name: (call, bytes moved)}."""
    import torch
    n = 64 << 20 if device == "CPU" else 512 << 20   # floats: 256 MB on the CPU, 2 GB on a GPU
    dev = "cpu" if device == "CPU" else "cuda"
    x = torch.rand(n, device=dev)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return {"read": (lambda: (x.sum(), sync()), n * 4), "copy": (lambda: (y.copy_(x), sync()), 2 * n * 4)}


def probe_rate(probe, reps=7) -> float:
    """GB/s of one probe, the median of `reps` calls."""
    call, nbytes = probe
    return nbytes / median_time(call, reps=reps) / 1e9


def paired_bandwidth(ours, ours_bytes, probe, rounds=9):
    """GB/s of `ours` (a call that synchronizes) and of a bandwidth probe, timed alternately call by call: this
    machine's memory speed swings by a third from minute to minute, so a probe read once, minutes before, would
    compare two different machines. Medians of each side."""
    (base, base_bytes), ours_times, base_times = probe, [], []
    for _ in range(2):   # a compiled step's first call builds its kernels, its second traces
        ours(), base()
    for _ in range(rounds):
        for call, times in ((ours, ours_times), (base, base_times)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return ours_bytes / np.median(ours_times) / 1e9, base_bytes / np.median(base_times) / 1e9


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


# the seconds of each call of a compiled training step, in a fresh process: the first call schedules, builds (or
# loads from the disk cache) and runs every kernel, the second traces, the third builds the replay, later ones replay
_TRAINING_STEPS = r'''
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
import bench, llama, picograd as pg
config = llama.LlamaConfig(**bench.SHAPES[{shape!r}])
model = llama.Llama(config, llama.Llama.init_weights(config, seed=0), device={device!r}, max_seq_len={seq},
                    requires_grad=True)
step = pg.compile(bench._training_step(model, pg.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)))
rng = np.random.default_rng(0)
times = []
for _ in range({steps}):
    tokens, targets = rng.integers(0, config.vocab_size, (2, {batch}, {seq})).astype(np.int32)
    tokens, targets = pg.Tensor(tokens, device={device!r}), pg.Tensor(targets, device={device!r})
    start = time.perf_counter()
    step(tokens, targets).item()
    times.append(time.perf_counter() - start)
print(*times)
'''


def bench_compile_time(device, shape="stories15M", batch=8, seq=256, steps=6):
    """Cold (empty kernel cache) against warm (disk cache) start, each in a fresh process: a 20-op graph, and the
    first call of a compiled training step, whose overhead is its time beyond a steady (replayed) step."""
    root = os.path.dirname(os.path.abspath(__file__))

    def fresh_process(code, env):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return [float(x) for x in out.stdout.split()]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PICOGRAD_CACHE=cache)
        code = _TWENTY_OPS.format(root=root)
        cold, warm = fresh_process(code, env)[0], fresh_process(code, env)[0]
    record("compile", "20-op graph, cold cache vs warm (s)", cold, warm, "s", "warm")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PICOGRAD_CACHE=cache)
        code = _TRAINING_STEPS.format(root=root, shape=shape, device=device, batch=batch, seq=seq, steps=steps)
        for start in ("cold", "warm"):
            times = fresh_process(code, env)
            steady = float(np.median(times[3:]))
            print(f"  {shape} training step, {start} start: " + " ".join(f"{t:.2f}" for t in times) + " s", flush=True)
            record("compile", f"{shape} train step, {start} cache: first call (s)", times[0], steady, "s", "steady")
            record("compile", f"{shape} train step, {start} cache: overhead (s)", times[0] - steady,
                   20.0 if start == "cold" else 2.0, "s", "target")


_NUMPY_MATMUL = r"""
import sys, time, numpy as np
for spec in sys.argv[1:]:
    batch, m, k, n, transposed = map(int, spec.split(","))
    a = np.random.rand(batch, m, k).astype(np.float32)
    b = np.random.rand(batch, n, k).astype(np.float32)
    b = b.transpose(0, 2, 1) if transposed else np.ascontiguousarray(b.transpose(0, 2, 1))
    if batch == 1:
        a, b = a[0], b[0]
    t = time.perf_counter(); a @ b; first = time.perf_counter() - t
    ts = []
    for _ in range(max(5, min(200, int(0.1 / first)))):   # a tenth of a second of products, as bench_matmul times
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    print(spec, 2 * batch * m * k * n / np.median(ts) / 1e9)
"""


def numpy_matmul_gflops(cases, coretype_env: bool):
    """numpy's OpenBLAS in a subprocess, with the environment as set, or with OPENBLAS_CORETYPE/L2_SIZE unset
    (OpenBLAS reads them when it loads): GFLOP/s by case spec."""
    env = dict(os.environ)
    if not coretype_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    specs = [",".join(map(str, case[1:])) for case in cases]
    out = subprocess.run([sys.executable, "-c", _NUMPY_MATMUL, *specs], env=env, capture_output=True,
                         text=True, check=True).stdout
    return {spec: float(g) for spec, g in (line.split() for line in out.splitlines())}


def matmul_cases(sizes, shapes):
    """(label, batch, m, k, n, transposed): square products, then each Llama shape's products in the prefill of a
    256-token prompt, weights stored [out, in] as the model keeps them (x @ W.T, transposed = 1)."""
    cases = [(f"{n}x{n}", 1, n, n, n, 0) for n in sizes]
    for shape in shapes:
        s = SHAPES[shape]
        dim, hidden, heads, vocab = s["dim"], s["hidden_dim"], s["n_heads"], s["vocab_size"]
        head_dim = dim // heads
        cases += [(f"{shape} q/o projection 256x{dim}x{dim}", 1, 256, dim, dim, 1),
                  (f"{shape} MLP up 256x{dim}x{hidden}", 1, 256, dim, hidden, 1),
                  (f"{shape} MLP down 256x{hidden}x{dim}", 1, 256, hidden, dim, 1),
                  (f"{shape} attention scores {heads}x256x{head_dim}x256", heads, 256, head_dim, 256, 1),
                  (f"{shape} output head 256x{dim}x{vocab}", 1, 256, dim, vocab, 1)]
    return cases


def product_time(mm, a, device) -> float:
    """The median time of mm(a) over about a tenth of a second of calls (5 at least): a 256x288x288 product takes
    0.25 ms, and five of them read one moment of a machine that swings."""
    sync = pg.Device[device].synchronize
    start = time.perf_counter()
    mm(a)
    sync()
    first = time.perf_counter() - start
    return median_time(lambda: mm(a), reps=max(5, min(200, int(0.1 / first))), sync=sync)


def bench_matmul(device, sizes, shapes, cpu_rounds=3):
    """Each product beside its baseline. On the CPU, numpy's two OpenBLAS runs and ours take turns for cpu_rounds
    rounds and each figure is the median of its rounds: a single pass of each, minutes apart on a machine whose
    memory and clock swing, read the 256x288x288 product at 0.75 of numpy in one run and 1.04 in the next."""
    cases = matmul_cases(sizes, shapes)
    rng = np.random.default_rng(0)
    for tf32 in ([False] if device == "CPU" else [False, True]):
        pg.TF32 = tf32
        products = []
        for label, batch, m, k, n, transposed in cases:
            a_np = rng.random((batch, m, k), dtype=np.float32)
            b_np = rng.random((batch, n, k), dtype=np.float32)
            if batch == 1:
                a_np, b_np = a_np[0], b_np[0]
            a = pg.Tensor(a_np, device=device)
            b = pg.Tensor(b_np, device=device).transpose(-1, -2)   # a view: what x @ W.T gives the kernel
            if not transposed:
                b = b.contiguous().realize()
            # b is read from the closure, as a model reads its weights: a compiled function's tensor arguments are
            # copied contiguous on every call, which for the view W.T timed a strided transpose with the product
            products.append((pg.compile(lambda x, b=b: x @ b), a, a_np, b_np))
        rounds = {"ours": [], "as set": [], "unset": []}
        for _ in range(cpu_rounds if device == "CPU" else 1):
            if device == "CPU":
                rounds["as set"].append(numpy_matmul_gflops(cases, True))
                rounds["unset"].append(numpy_matmul_gflops(cases, False))
            rounds["ours"].append([product_time(mm, a, device) for mm, a, _, _ in products])
        for i, ((label, batch, m, k, n, transposed), (_, _, a_np, b_np)) in enumerate(zip(cases, products)):
            flop = 2 * batch * m * k * n
            ours = flop / float(np.median([times[i] for times in rounds["ours"]])) / 1e9
            spec = ",".join(map(str, (batch, m, k, n, transposed)))
            if device == "CPU":
                for env in ("as set", "unset"):
                    theirs = float(np.median([gflops[spec] for gflops in rounds[env]]))
                    what = "OpenBLAS env as set" if env == "as set" else "OPENBLAS_CORETYPE unset"
                    record("matmul", f"fp32 matmul {label} ({what})", ours, theirs, "GFLOP/s", "numpy")
            else:
                import torch
                torch.backends.cuda.matmul.allow_tf32 = tf32
                ta = torch.tensor(a_np, device="cuda")
                tb = torch.tensor(b_np, device="cuda").transpose(-1, -2)
                if not transposed:
                    tb = tb.contiguous()
                t = median_time(lambda: ta @ tb, reps=10, sync=torch.cuda.synchronize)
                theirs = flop / t / 1e9
                name = "tf32" if tf32 else "fp32"
                record("matmul", f"{name} matmul {label}", ours / 1e3, theirs / 1e3, "TFLOP/s", "cuBLAS")
    pg.TF32 = False


def bench_bandwidth_kernels(device, probes):
    """Large elementwise and reduce kernels as a fraction of the memory bandwidth, each beside its probe."""
    n = (32 << 20) if device == "CPU" else (256 << 20)   # 128 MB on the CPU, 1 GB on a GPU
    x = pg.Tensor(np.random.rand(n).astype(np.float32), device=device)
    y = pg.Tensor(np.random.rand(n).astype(np.float32), device=device)
    sync = pg.Device[device].synchronize
    rows = n // 4096
    m = x.reshape(rows, 4096)
    w = pg.Tensor(np.random.rand(4096).astype(np.float32), device=device)
    megabytes = n * 4 >> 20
    # (what, step, its arguments, bytes it moves, probe): the matrix-vector product is decode's shape of work, a
    # weight matrix streamed once per token against one activation vector
    cases = [(f"elementwise add of {megabytes} MB tensors", lambda a, b: a + b, (x, y), 3 * n * 4, "copy"),
             (f"sum of {megabytes} MB", lambda a: a.sum(), (x,), n * 4, "read"),
             (f"softmax rows of 4096, {megabytes} MB", lambda a: a.softmax(-1), (m,), 2 * n * 4, "copy"),
             (f"RMSNorm rows of 4096, {megabytes} MB", lambda a, g: pg.rms_norm(a, g, 1e-5), (m, w), 2 * n * 4, "copy"),
             (f"matrix-vector product, [{rows} x 4096] weights, {megabytes} MB", lambda v: m @ v, (w,), n * 4, "read")]
    for what, fn, args, nbytes, probe in cases:
        step = pg.compile(fn)
        ours, base = paired_bandwidth(lambda: (step(*args), sync()), nbytes, probes[probe])
        record("bandwidth", f"{what} (GB/s)", ours, base, "GB/s", probe)


# ----------------------------------------------------------------------------------------------------------------------
# Llama: decode and prefill tokens/s, training tokens/s, against torch (transformers' LlamaForCausalLM, eager)

SHAPES = {
    "stories15M": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                       max_seq_len=256),
    "stories110M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        max_seq_len=1024),
    "llama3.2-1B": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        max_seq_len=2048, rope_theta=500000.0),
    "llama-124M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                       max_seq_len=1024),
}
LLAMA2C_DECODE = {"stories15M": "615-840", "stories110M": "82-120"}   # tokens/s on this 2-core machine (issue 7)


def _configs(shape):
    import llama
    from transformers import LlamaConfig as HFConfig
    config = llama.LlamaConfig(**SHAPES[shape])
    hf = HFConfig(**config.to_hf())
    return config, hf


def _sync(device):
    pg.Device[device].synchronize()


def bench_modes(device, shape="stories15M", batch=2, seq=64):
    """Eager, graph and compiled execution of the same work: a decode step and a training step (a small batch, so
    eager finishes), per-step wall time and kernels launched per step; and the Python cost of one replay, from a
    compiled step whose 20 kernels each touch one element."""
    import llama
    config, _ = _configs(shape)
    weights = llama.Llama.init_weights(config, seed=0)
    rng = np.random.default_rng(0)
    sync = pg.Device[device].synchronize

    def per_step(fn, steps):
        for _ in range(3):   # warm-up, then (compiled) the trace, and the first replay, which captures the graph
            fn()
        sync()
        launched = pg.stats()["kernels_launched"]
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - start) / steps, (pg.stats()["kernels_launched"] - launched) / steps

    model = llama.Llama(config, weights, device=device, max_seq_len=128)
    model.prefill(rng.integers(0, config.vocab_size, 16).astype(np.int32))
    token = pg.Tensor(np.array([[1]], np.int32), device=device)
    decode = {"eager": lambda: _eager(lambda: model(token, 20).realize()),
              "graph": lambda: model(token, 20).realize(),
              "compiled": lambda: model.decode(token, 20).realize()}
    trainer = llama.Llama(config, weights, device=device, max_seq_len=seq, requires_grad=True)
    opt = pg.AdamW(trainer.parameters(), lr=1e-4)
    tokens = pg.Tensor(rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32), device=device)

    train_step = _training_step(trainer, opt)
    compiled_train = pg.compile(train_step)
    train = {"eager": lambda: _eager(lambda: train_step(tokens, tokens).realize()),
             "graph": lambda: train_step(tokens, tokens).realize(),
             "compiled": lambda: compiled_train(tokens, tokens).realize()}
    for what, fns, steps in (("decode step", decode, 5), (f"training step b{batch} s{seq}", train, 3)):
        timed = {mode: per_step(fn, steps) for mode, fn in fns.items()}
        for mode in ("eager", "graph"):
            record("modes", f"{shape} {what}, {mode} ({timed[mode][1]:.0f} kernels)", timed[mode][0] * 1e3,
                   timed["compiled"][0] * 1e3, "ms", f"compiled ({timed['compiled'][1]:.0f} kernels)")
    x = pg.Tensor(np.ones(1, np.float32), device=device)

    def twenty(t):
        for _ in range(20):
            t = (t * 1.0001).contiguous()
        return t
    replay = pg.compile(twenty)
    seconds, kernels = per_step(lambda: replay(x).realize(), 200)
    record("modes", f"Python cost of a replay ({kernels:.0f} tiny kernels, {device})", seconds * 1e6,
           seconds * 1e6 / max(kernels, 1), "us", "per kernel")


def _training_step(model, opt):
    """One optimizer step of model's loss on (tokens, targets), returning the loss."""
    def step(tokens, targets):
        loss = model.loss(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return step


def _eager(fn):
    with pg.eager():
        return fn()


@contextlib.contextmanager
def llama2c_files(config):
    """Random weights of config's shape in llama2.c's checkpoint format, and a placeholder tokenizer (its `run` only
    prints the tokens), in a temporary folder: yields (checkpoint, tokenizer)."""
    rng = np.random.default_rng(0)
    dim, hidden, layers, vocab = config.dim, config.hidden_dim, config.n_layers, config.vocab_size
    kv_dim, head = config.kv_dim, config.head_dim
    # token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two legacy RoPE tables; the
    # classifier is the embedding (a positive vocab_size in the header says so)
    sizes = [vocab * dim, layers * dim, layers * dim * dim, 2 * layers * kv_dim * dim, layers * dim * dim,
             layers * dim, 3 * layers * hidden * dim, dim, config.max_seq_len * head]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, tokenizer = os.path.join(folder, "model.bin"), os.path.join(folder, "tokenizer.bin")
        with open(checkpoint, "wb") as f:
            np.array([dim, hidden, layers, config.n_heads, config.n_kv_heads, vocab, config.max_seq_len],
                     np.int32).tofile(f)
            for size in sizes:
                (rng.standard_normal(size, dtype=np.float32) * 0.02).tofile(f)
        with open(tokenizer, "wb") as f:
            pieces = [f"<{i}>".encode() for i in range(vocab)]
            f.write(struct.pack("<i", max(map(len, pieces))))
            for piece in pieces:
                f.write(struct.pack("<fi", 0.0, len(piece)) + piece)
        yield checkpoint, tokenizer


def llama2c_decode(run_binary: str, files, steps: int) -> float:
    """Tokens/s of llama2.c's `run` (a binary the user built from its run.c, e.g. with gcc -Ofast -fopenmp
    -march=native) decoding greedily from BOS, as its own "achieved tok/s" line reports it: its timer starts after
    the first token, so it runs steps + 1 positions. files: llama2c_files' checkpoint and tokenizer."""
    checkpoint, tokenizer = files
    proc = subprocess.run([run_binary, checkpoint, "-z", tokenizer, "-n", str(steps + 1), "-t", "0"],
                          capture_output=True, text=True, timeout=600)
    found = re.search(r"achieved tok/s: ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{run_binary} did not report its speed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def decode_weight_bytes(config) -> int:
    """Bytes of weights one decoded token reads: every layer's matrices and norms, the final norm and the output
    head (of the embedding table, only a row)."""
    dim, hidden, kv_dim = config.dim, config.hidden_dim, config.kv_dim
    layer = dim * (dim + 2 * kv_dim) + dim * dim + 3 * dim * hidden + 2 * dim
    return 4 * (config.n_layers * layer + dim + config.vocab_size * dim)


def bench_llama_inference(device, shape, decode_tokens=48, prompt_len=256, llama2c_run="", probes=None):
    import llama
    import torch
    from transformers import LlamaForCausalLM
    config, hf = _configs(shape)
    weights = llama.Llama.init_weights(config, seed=0)
    model = llama.Llama(config, weights, device=device, max_seq_len=max(prompt_len + 8, 64))
    rng = np.random.default_rng(0)
    sync = pg.Device[device].synchronize

    def decode_rate(tokens=decode_tokens):
        # greedy generation from one token through Llama.generate, as a user streams it: every token comes back to
        # the host as it is chosen (the torch loops below read theirs too); generate queues each step before it
        # waits for the previous step's token. Its timings leave out the prefill and any step that traced.
        model.generate([1], tokens, stop_ids=())
        return model.timings["decode_tokens"] / model.timings["decode_s"]
    decode_rate()   # traces each context length's step

    def prefill():
        model.prefill(rng.integers(0, config.vocab_size, (1, prompt_len)).astype(np.int32)).realize()
        sync()
    prefill()   # traces
    dev = "cpu" if device == "CPU" else "cuda"
    torch.manual_seed(0)
    ref = LlamaForCausalLM(hf).to(dev).eval()

    @torch.no_grad()
    def torch_decode_rate():
        start = time.perf_counter()
        past, token = None, torch.tensor([[1]], device=dev)
        for _ in range(decode_tokens):
            out = ref(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        token.item()
        return decode_tokens / (time.perf_counter() - start)
    torch_decode_rate()
    # Rounds of ours, torch and the memory's read speed, one after another: decode reads weights at the memory's
    # speed, which on a shared machine swings by a third from minute to minute, so each comparison is made within a
    # round (prefill, which computes, beside decode for their ratio) and the medians are reported.
    rounds = []
    for _ in range(3):
        rounds.append((decode_rate(), torch_decode_rate(), prompt_len / median_time(prefill, reps=3, warmup=0),
                       probe_rate(probes["read"], reps=3) if probes else 0.0))
    ours_decode, theirs_decode, ours_prefill, read_bw = np.median(rounds, axis=0)
    prefill_speedup = float(np.median([p / d for d, _, p, _ in rounds]))
    with torch.no_grad():
        prompt = torch.tensor(rng.integers(0, config.vocab_size, (1, prompt_len)), device=dev)
        theirs_prefill = prompt_len / median_time(lambda: ref(prompt).logits[:, -1].sum().item(), reps=3)
        # on the GPU also torch.compile with CUDA graphs (not on this CPU: inductor's C++ build takes minutes)
        compiled = _torch_compiled_decode(ref, hf, decode_tokens) if dev == "cuda" else None
    label = f"{shape} ({device})"
    record("llama", f"{label} decode tokens/s", ours_decode, theirs_decode, "tok/s", "torch")
    if read_bw:   # the roofline: weights read per token at the memory's read bandwidth
        weights_per_s = decode_weight_bytes(config) * ours_decode / 1e9
        record("llama", f"{label} decode weight bytes per second (GB/s)", weights_per_s, read_bw, "GB/s", "read")
    if compiled is not None:
        record("llama", f"{label} decode vs torch.compile + CUDA graphs", ours_decode, compiled, "tok/s",
               "torch.compile")
    if llama2c_run and device == "CPU":
        # alternated: this machine's memory bandwidth swings between about 35 and 60 GB/s, in phases of a fraction
        # of a second to minutes (a C loop reading 512 MB sees them too), so one run of each side compares two
        # machines, and a few pairs can still catch one side's runs in the slow phases more often; 9 pairs of 48
        # tokens (half a second each at stories110M) and 5 over a whole window of 256 positions, as llama2.c's own
        # figures are made (its default -n 256), where attention reads more of the cache
        window = min(256, model.max_seq_len) - 1
        decode_rate(window)   # traces the steps of the longer contexts
        with llama2c_files(config) as files:
            for tokens, runs, what in ((decode_tokens, 9, "decode"), (window, 5, f"decode of {window} tokens")):
                pairs = [(decode_rate(tokens), llama2c_decode(llama2c_run, files, tokens)) for _ in range(runs)]
                ours_paired, theirs = np.median(pairs, axis=0)
                record("llama", f"{label} {what} vs llama2.c ({runs} alternated runs)", ours_paired, theirs,
                       "tok/s", "llama2.c")
    elif shape in LLAMA2C_DECODE and device == "CPU":
        lo, hi = map(float, LLAMA2C_DECODE[shape].split("-"))
        record("llama", f"{label} decode vs llama2.c (its low figure)", ours_decode, lo, "tok/s", "llama2.c")
    record("llama", f"{label} prefill {prompt_len} tokens/s", ours_prefill, theirs_prefill, "tok/s", "torch")
    record("llama", f"{label} prefill/decode per-token speedup", prefill_speedup, 10.0, "x", "target")


def _torch_compiled_decode(ref, hf, decode_tokens) -> float:
    """Tokens/s of transformers' model decoding through a static KV cache with torch.compile's "reduce-overhead"
    mode (CUDA graphs), the token read back to the host each step as ours is; the median of 5 runs."""
    import torch
    from transformers import StaticCache
    cache = StaticCache(config=hf, max_cache_len=decode_tokens)
    one = torch.tensor([0], device="cuda")
    ref(one.view(1, 1), past_key_values=cache, cache_position=one, use_cache=True)   # the cache allocates, eagerly
    step = torch.compile(ref.forward, mode="reduce-overhead", fullgraph=True)

    def decode_run():
        cache.reset()
        token = torch.tensor([[1]], device="cuda")
        for pos in range(decode_tokens):
            position = torch.tensor([pos], device="cuda")
            torch.compiler.cudagraph_mark_step_begin()
            out = step(token, past_key_values=cache, cache_position=position, position_ids=position.view(1, 1),
                       use_cache=True)
            token = out.logits[:, -1:].argmax(-1).clone()
            token.item()
    for _ in range(3):   # compiles, records the graphs, then warm
        decode_run()
    return decode_tokens / median_time(decode_run, reps=5, warmup=0)


def print_kernel_profile(fn, what, top=20):
    """Run fn once with DEBUG=2 (each kernel synchronized and timed) and print where the time goes, by kernel name:
    total time, calls, achieved GFLOP/s and GB/s. Synchronizing after every kernel adds launch gaps, so the total
    is more than a graph replay takes; the ranking is what matters."""
    import contextlib
    import io
    import re
    log = io.StringIO()
    old, pg.DEBUG = pg.DEBUG, 2
    try:
        with contextlib.redirect_stderr(log):
            fn()
    finally:
        pg.DEBUG = old
    by_name = {}
    for line in log.getvalue().splitlines():
        m = re.match(r"\s+(\S+)\s+([\d.]+) us\s+([\d.]+) GFLOP/s\s+([\d.]+) GB/s", line)
        if m:
            us, gflops, gbs = float(m.group(2)), float(m.group(3)), float(m.group(4))
            total, calls, flop, nbytes = by_name.get(m.group(1), (0.0, 0, 0.0, 0.0))
            by_name[m.group(1)] = (total + us, calls + 1, flop + gflops * us * 1e3, nbytes + gbs * us * 1e3)
    total_us = sum(v[0] for v in by_name.values())
    print(f"  profile of {what}: {sum(v[1] for v in by_name.values())} kernels, {total_us / 1e3:.1f} ms", flush=True)
    for name, (us, calls, flop, nbytes) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {name:<34} {us / 1e3:9.2f} ms {100 * us / total_us:5.1f}% x{calls:<4} "
              f"{flop / us / 1e3:9.1f} GFLOP/s {nbytes / us / 1e3:8.1f} GB/s", flush=True)


def bench_llama_training(device, shape, batch=8, seq=256, steps=5, tf32=False, profile=False):
    """Training tokens/s against transformers' Llama under torch, one step of each in turn: the memory's speed
    swings from minute to minute on a shared machine, and all of one side's steps and then the other's would
    compare two different machines. Medians of `steps` steps each, after each side's first two."""
    import llama
    import torch
    from transformers import LlamaForCausalLM
    config, hf = _configs(shape)
    pg.TF32 = tf32
    model = llama.Llama(config, llama.Llama.init_weights(config, seed=0), device=device, max_seq_len=seq,
                        requires_grad=True)
    opt = pg.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    step = pg.compile(_training_step(model, opt))
    dev = "cpu" if device == "CPU" else "cuda"
    torch.manual_seed(0)
    ref = LlamaForCausalLM(hf).to(dev)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (2, batch, seq)).astype(np.int32) for _ in range(steps + 2)]

    def ours_step(k):
        step(pg.Tensor(batches[k][0], device=device), pg.Tensor(batches[k][1], device=device)).item()

    def torch_step(k):
        x = torch.tensor(batches[k][0], dtype=torch.long, device=dev)
        y = torch.tensor(batches[k][1], dtype=torch.long, device=dev)
        loss = torch.nn.functional.cross_entropy(ref(x).logits.reshape(-1, config.vocab_size), y.reshape(-1))
        loss.backward()
        topt.step()
        topt.zero_grad()
        loss.item()
    times = {ours_step: [], torch_step: []}
    for k in range(steps + 2):   # the first two: our compile and trace, torch's warm-up
        for fn in times:
            start = time.perf_counter()
            fn(k)
            times[fn].append(time.perf_counter() - start)
    ours, theirs = (batch * seq / float(np.median(times[fn][2:])) for fn in (ours_step, torch_step))
    if profile:
        print_kernel_profile(lambda: step.__wrapped__(pg.Tensor(batches[0][0], device=device),
                                                      pg.Tensor(batches[0][1], device=device)).item(),
                             f"one {shape} training step, uncompiled, {'tf32' if tf32 else 'fp32'}")
    pg.TF32 = False
    precision = "tf32" if tf32 else "fp32"
    record("train", f"{shape} batch {batch} seq {seq} {precision} ({device}), {steps} alternated steps", ours, theirs,
           "tok/s", "torch")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--only", default="", help="comma-separated sections: eager,compile,modes,matmul,"
                        "bandwidth,llama,train")
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--llama", default="stories15M,stories110M",
                        help="shapes for decode/prefill and the matmul section's products")
    parser.add_argument("--train", default="stories15M", help="shapes for training throughput")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="also print where one training step's time goes")
    parser.add_argument("--llama2c", default="", help="a llama2.c `run` binary: CPU decode is compared with it, run "
                        "in the same session on the same shapes, instead of with its quoted figures")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    device = pg.Device.canonicalize(args.device)
    want = lambda name: not only or name in only   # noqa: E731
    print(f"picograd bench on {machine()}; device {device}{card(device)}", flush=True)
    probes = bandwidth_probes("CPU" if device == "CPU" else "CUDA")
    read_bw, copy_bw = probe_rate(probes["read"]), probe_rate(probes["copy"])
    print(f"  memory bandwidth (torch): read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s", flush=True)
    if want("eager"):
        bench_eager(device)
    if want("compile"):
        bench_compile_time(device)
    if want("modes"):
        bench_modes(device)
    if want("matmul"):
        bench_matmul(device, [int(s) for s in args.sizes.split(",") if s], [s for s in args.llama.split(",") if s])
    if want("bandwidth"):
        bench_bandwidth_kernels(device, probes)
    for shape in args.llama.split(","):
        if shape and want("llama"):
            bench_llama_inference(device, shape, llama2c_run=args.llama2c, probes=probes)
    for shape in args.train.split(","):
        if shape and want("train"):
            bench_llama_training(device, shape, batch=args.batch, seq=args.seq, profile=args.profile)
            if device != "CPU":
                bench_llama_training(device, shape, batch=args.batch, seq=args.seq, tf32=True, profile=args.profile)
    print("\n| section | what | picograd | baseline | ratio |\n|---|---|---|---|---|")
    for section, what, ours, base, unit, base_name in ROWS:
        print(f"| {section} | {what} | {ours:.2f} {unit} | {base_name} {base:.2f} | {ours / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
