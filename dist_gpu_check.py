"""Parallel training on GPUs: every mesh of 4 GPUs against one GPU, for losses and speed (issue 9).

    PICOGRAD_CACHE=/tmp/pgcache-gpu python dist_gpu_check.py            # needs 4 GPUs, mpi4py, mpich, NCCL

A Llama of dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000 (tied embeddings: 110M parameters) trains for a
few steps on one GPU, then on meshes (pp, dp, tp) = (4,1,1), (1,4,1), (1,1,4), (2,2,1), (1,2,2), (2,1,2), each
under `mpiexec -n 4`, in fp32 with tf32 off. Every run sees the same 32 sequences a step, cut the same way (each
rank's micro-batch has --rows rows, so data parallelism changes no kernel shape); the losses must equal the single
GPU's within fp32 rounding (--rtol). The table gives tokens/s (median of the replayed steps), the speed-up over one
GPU and its efficiency (speed-up / 4), the pipeline bubble a 1F1B schedule has in theory ((pp-1)/(m+pp-1) for m
micro-batches), and the all-reduce time measured alone for the sizes tensor and data parallelism move per step.
Exit status 1 if a mesh fails or its losses differ. About 4-6 minutes on H100s, most of it compiling kernels for
the first run (the kernel cache makes a second run much faster).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MESHES = [(4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 2, 1), (1, 2, 2), (2, 1, 2)]
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="sequence length (1024 doubles the time)")
    parser.add_argument("--rows", type=int, default=4, help="rows of each rank's micro-batch")
    parser.add_argument("--micro", type=int, default=8, help="micro-batches a step on one GPU (32 sequences)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run: warm-up, trace, then replays timed")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rtol", type=float, default=1e-4, help="loss tolerance against one GPU")
    parser.add_argument("--timeout", type=float, default=240, help="seconds one run may take")
    parser.add_argument("--meshes", default=None, help="e.g. 4,1,1;1,4,1 (default: the six of 4 GPUs)")
    parser.add_argument("--device", default="CUDA", help="CUDA, or CPU for a dry run of this script (with --small)")
    parser.add_argument("--small", action="store_true", help="a tiny model instead of the 110M one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="1,1,1", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# one run (every rank of a mesh, or the single GPU)


def worker(args):
    import dist
    import llama
    import picograd as pg

    pg.TF32 = False
    pp, dp, tp = (int(v) for v in args.mesh.split(","))
    mesh = None
    device = "CPU" if args.device.upper() == "CPU" else "CUDA:0"
    if pp * dp * tp > 1:
        mesh = dist.init(pp=pp, dp=dp, tp=tp)
        device = mesh.local_device(args.device)
        mesh.connect(device)
    shape = {"dim": 768, "hidden_dim": 2048, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "vocab_size": 32000}
    if args.small:
        shape = {"dim": 64, "hidden_dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 512}
    config = llama.LlamaConfig(**shape, max_seq_len=args.seq, tie_word_embeddings=True, bos_token_id=1,
                               eos_token_id=2)
    # the same 32 sequences a step on every mesh: accum x batch = micro x rows, each rank's slice `rows` rows
    accum, batch = args.micro // dp, args.rows * dp
    cfg = llama.TrainConfig(steps=args.steps, batch_size=batch, seq_len=args.seq, accum=accum, lr=args.lr,
                            min_lr=args.lr / 10, warmup=2, eval_batches=1, data=args.data)
    corpus = llama.load_corpus(args.data, args.seq)
    weights = llama.Llama.init_weights(config, cfg.seed)
    out = tempfile.mkdtemp(prefix="pg-dist-check-")
    if mesh is None:
        model = llama.Llama(config, weights, device=device, requires_grad=True)
        trainer = llama.Trainer(model, cfg, corpus, out, log=lambda *_: None)
    else:
        model = llama.Llama(config, llama.shard_weights(config, weights, mesh), device=device, requires_grad=True,
                            mesh=mesh)
        trainer = llama.ParallelTrainer(model, cfg, corpus, out, mesh, log=lambda *_: None)
    del weights
    losses, times = [], []
    for step in range(args.steps):
        trainer.opt.lr = llama.lr_at(step, cfg)
        x, y = llama.sample_windows(corpus.train, trainer.rng, (accum, batch), args.seq)
        start = time.perf_counter()
        losses.append(trainer.train_batch(x, y))   # .item() waits for the GPU
        times.append(time.perf_counter() - start)
    comm = measure_collectives(mesh, model, args, device) if mesh is not None else {}
    if mesh is None or mesh.rank == 0:
        stats = getattr(pg.Device[device], "memory_stats", None)
        memory = stats()["reserved"] if stats else 0
        result = {"mesh": [pp, dp, tp], "losses": losses, "times": times, "accum": accum,
                  "tokens_per_step": args.micro * args.rows * args.seq, "memory_gib": memory / 2**30, **comm}
        with open(args.result, "w") as f:
            json.dump(result, f)
    shutil.rmtree(out, ignore_errors=True)


def measure_collectives(mesh, model, args, device):
    """Seconds per step that the collectives of tensor and data parallelism take when run alone: tp moves 4
    activation-sized all-reduces per layer and micro-batch (2 forward, 2 backward), dp one all-reduce of every
    gradient of the stage."""
    import numpy as np

    import picograd as pg

    def timed(group, n_floats, repeats=5):
        t = pg.Tensor(np.ones(n_floats, np.float32), device=device)
        group.all_reduce(t).numpy()   # warm-up (and NCCL's first-use set-up)
        start = time.perf_counter()
        for _ in range(repeats):
            out = group.all_reduce(t)
            out.realize()
        out.numpy()
        return (time.perf_counter() - start) / repeats

    result = {}
    if mesh.tp > 1:
        per_call = timed(mesh.tp_group, args.rows * args.seq * model.config.dim)
        calls = 4 * len(model.layers) * (args.micro // mesh.dp)
        result["tp_comm_s"] = mesh.world.allreduce_number(per_call * calls, "max")
    if mesh.dp > 1:
        grads = sum(p.numel() for p in model.parameters())
        result["dp_comm_s"] = mesh.world.allreduce_number(timed(mesh.dp_group, grads, repeats=3), "max")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# the driver: one GPU, then each mesh, then the table


def corpus_file():
    """A few hundred KB of text: this repository's Python sources."""
    parts = []
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py"):
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                parts.append(f.read())
    text = "".join(parts)
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="pg-dist-check-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def launch(args, mesh, data, env):
    n = mesh[0] * mesh[1] * mesh[2]
    fd, result = tempfile.mkstemp(suffix=".json", prefix="pg-dist-check-")
    os.close(fd)
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--mesh", ",".join(map(str, mesh)),
               "--data", data, "--result", result, "--seq", str(args.seq), "--rows", str(args.rows),
               "--micro", str(args.micro), "--steps", str(args.steps), "--lr", str(args.lr), "--device", args.device]
    if args.small:
        command.append("--small")
    if n > 1:
        command = [mpiexec(), "-n", str(n)] + command
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=args.timeout)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        # the output of a timed-out run comes back as bytes even in text mode
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        code = "timeout"
    took = time.perf_counter() - start
    data_out = None
    if code == 0 and os.path.getsize(result):
        with open(result) as f:
            data_out = json.load(f)
    os.unlink(result)
    return data_out, output, code, took


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    meshes = MESHES if args.meshes is None else [tuple(int(v) for v in m.split(",")) for m in args.meshes.split(";")]
    env = dict(os.environ, TF32="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.setdefault("PICOGRAD_CACHE", os.path.join(tempfile.gettempdir(), "pgcache-gpu"))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    data = corpus_file()
    began = time.perf_counter()
    rows, failed = [], False
    base, output, code, took = launch(args, (1, 1, 1), data, env)
    print(f"one GPU: {took:.0f} s" + ("" if base else f", FAILED ({code}):\n{output[-3000:]}"), flush=True)
    if base is None:
        return 1
    for mesh in meshes:
        result, output, code, took = launch(args, mesh, data, env)
        print(f"mesh {mesh}: {took:.0f} s" + ("" if result else f", FAILED ({code}):\n{output[-3000:]}"), flush=True)
        rows.append((mesh, result))
        failed |= result is None
    os.unlink(data)

    def rate(r):
        replays = r["times"][2:] or r["times"][-1:]
        return r["tokens_per_step"] / statistics.median(replays)

    single = rate(base)
    model = "a tiny Llama" if args.small else "Llama 110M (dim 768, 12 layers, vocab 32000)"
    print(f"\n{model} on {args.device}, fp32, tf32 off; {base['tokens_per_step']} tokens a step "
          f"({args.micro} x {args.rows} x {args.seq}); {args.steps} steps; {time.perf_counter() - began:.0f} s "
          f"in all")
    header = (f"{'pp,dp,tp':>9} {'micro':>5} {'tok/s':>9} {'speed-up':>8} {'eff.':>5} {'bubble':>6} "
              f"{'tp comm':>8} {'dp comm':>8} {'GiB':>5} {'max dloss':>9}  losses")
    print(header)
    print(f"{'1,1,1':>9} {args.micro:>5} {single:>9,.0f} {1:>8.2f} {'':>5} {'':>6} {'':>8} {'':>8} "
          f"{base['memory_gib']:>5.1f} {'':>9}  " + " ".join(f"{v:.5f}" for v in base["losses"]))
    for mesh, r in rows:
        name = ",".join(map(str, mesh))
        if r is None:
            print(f"{name:>9}  FAILED")
            continue
        pp = mesh[0]
        speed = rate(r)
        bubble = (pp - 1) / (r["accum"] + pp - 1)
        error = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        ok = error <= args.rtol
        failed |= not ok
        tp_comm = f"{r['tp_comm_s']:.3f}s" if "tp_comm_s" in r else ""
        dp_comm = f"{r['dp_comm_s']:.3f}s" if "dp_comm_s" in r else ""
        print(f"{name:>9} {r['accum']:>5} {speed:>9,.0f} {speed / single:>8.2f} {speed / single / 4:>5.2f} "
              f"{bubble:>6.0%} {tp_comm:>8} {dp_comm:>8} {r['memory_gib']:>5.1f} {error:>9.1e}  "
              + " ".join(f"{v:.5f}" for v in r["losses"]) + ("" if ok else "  LOSSES DIFFER"))
    print(f"(one-GPU step: {base['tokens_per_step'] / single:.3f} s; 'tp comm' and 'dp comm': seconds a step the "
          f"all-reduces take when timed alone; eff. = speed-up / {args.gpus})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
