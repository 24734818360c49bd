"""picograd parallelism: process groups over MPI (CPU tensors) and NCCL (CUDA tensors), the (pipeline, data,
tensor) mesh, and collectives as custom ops, so they take part in autograd, scheduling and graph capture.

One process per device, started by `mpiexec -n N python script.py`; `dist.init(pp=, dp=, tp=)` builds the mesh.
Ranks are laid out tensor-fastest: rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so a tensor-parallel group
(the chattiest) sits on neighbouring ranks, which mpiexec places on the same machine.

Failures end the whole job, never hang it. Every MPI wait has a deadline (PICOGRAD_DIST_TIMEOUT seconds, default
300): a rank that never arrives turns into a DistError naming the collective and the group on the ranks that wait.
After dist.init, an uncaught exception on any rank is reported to the others (those waiting in a collective print
why they stop) before MPI_Abort ends the job; a rank that exits or is killed makes mpiexec end it. NCCL work runs
on the GPU's stream and cannot be given a deadline from here: there the abort is what ends the waiting ranks.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import glob
import os
import sys
import time

import numpy as np

import picograd as pg
from picograd import Ops, Tensor

DEFAULT_TIMEOUT = float(os.environ.get("PICOGRAD_DIST_TIMEOUT", "300"))


class DistError(RuntimeError):
    """A collective failed or timed out. remote: it failed because another rank reported an error."""

    def __init__(self, message, remote=False):
        super().__init__(message)
        self.remote = remote


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("picograd's multi-process mode needs mpi4py and an MPI library: pip install mpi4py "
                           "mpich (or pip install .[dist])") from e
    return MPI


def launched_size() -> int:
    """How many processes the launcher started (1 outside mpiexec), read from its environment, so a plain
    `python script.py` never initializes MPI."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def launched_rank() -> int:
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# NCCL through ctypes (CUDA tensors). The library comes from the nvidia-nccl-cu12/cu13 wheels or the system.

_NCCL_TYPES = {"float32": 7, "int32": 2, "bool": 0}   # ncclFloat32, ncclInt32, ncclInt8
_NCCL_SUM = 0
_P, _I, _N = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


_NCCL_SIGNATURES = {
    "ncclGetUniqueId": [ctypes.POINTER(_NcclUniqueId)],
    "ncclCommInitRank": [ctypes.POINTER(_P), _I, _NcclUniqueId, _I],
    "ncclAllReduce": [_P, _P, _N, _I, _I, _P, _P],
    "ncclAllGather": [_P, _P, _N, _I, _P, _P],
    "ncclReduceScatter": [_P, _P, _N, _I, _I, _P, _P],
    "ncclBroadcast": [_P, _P, _N, _I, _I, _P, _P],
    "ncclSend": [_P, _N, _I, _I, _P, _P],
    "ncclRecv": [_P, _N, _I, _I, _P, _P],
    "ncclGroupStart": [],
    "ncclGroupEnd": [],
}


def _load_nccl():
    candidates = []
    for path in sys.path:
        candidates += glob.glob(os.path.join(path, "nvidia", "nccl", "lib", "libnccl.so*"))
    found = ctypes.util.find_library("nccl")
    candidates += [found] if found else []
    candidates += ["libnccl.so.2", "libnccl.so"]
    errors = []
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
            continue
        for fn, argtypes in _NCCL_SIGNATURES.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = ctypes.c_int
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        return lib
    raise RuntimeError("CUDA tensors communicate through NCCL, and no libnccl could be loaded (install the "
                       "nvidia-nccl-cu12 or -cu13 wheel, or the system NCCL); tried:\n  " + "\n  ".join(errors))


def _ptr(buf) -> int:
    return buf.mem.ptr


def _address(buf) -> tuple:
    """Where a buffer's memory is, as a key for operations in flight on it."""
    return (buf.device, buf.mem.ptr if buf.device != "CPU" else buf.mem.address)


class _Nccl:
    """One NCCL communicator over an MPI group (rank 0's unique id goes out over MPI), and a side stream for
    collectives that overlap with computation (all_reduce_start)."""

    def __init__(self, group: Group, device):
        self.lib = _load_nccl()
        self.group, self.device = group, device
        uid = _NcclUniqueId()
        if group.rank == 0:
            self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        raw = np.frombuffer(bytes(uid.internal), dtype=np.uint8).copy()
        group._wait(group.comm.Ibcast(raw, root=0), "NCCL id broadcast")
        ctypes.memmove(ctypes.byref(uid), raw.ctypes.data, 128)
        dev = pg.Device[device]
        dev.activate()
        self.comm = ctypes.c_void_p()
        self._check(self.lib.ncclCommInitRank(ctypes.byref(self.comm), group.size, uid, group.rank),
                    f"ncclCommInitRank on the {group.name} group")
        self.side = dev.check(dev.driver.cuStreamCreate(int(dev.driver.CUstream_flags.CU_STREAM_NON_BLOCKING)),
                              "cuStreamCreate")
        self.free_events = []

    def _check(self, status, what):
        if status != 0:
            raise DistError(f"{what} failed: NCCL error {status} ({self.lib.ncclGetErrorString(status).decode()})")

    def _stream(self, side=False):
        dev = pg.Device[self.device]
        dev.activate()
        return ctypes.c_void_p(int(self.side if side else dev.stream))

    def all_reduce(self, out, inp, side=False):
        self._check(self.lib.ncclAllReduce(_ptr(inp), _ptr(out), inp.size, _NCCL_TYPES[inp.dtype.name], _NCCL_SUM,
                                           self.comm, self._stream(side)), "ncclAllReduce")

    def all_gather(self, out, inp):
        self._check(self.lib.ncclAllGather(_ptr(inp), _ptr(out), inp.size, _NCCL_TYPES[inp.dtype.name], self.comm,
                                           self._stream()), "ncclAllGather")

    def reduce_scatter(self, out, inp):
        self._check(self.lib.ncclReduceScatter(_ptr(inp), _ptr(out), out.size, _NCCL_TYPES[inp.dtype.name],
                                               _NCCL_SUM, self.comm, self._stream()), "ncclReduceScatter")

    def broadcast(self, out, inp, root):
        self._check(self.lib.ncclBroadcast(_ptr(inp), _ptr(out), inp.size, _NCCL_TYPES[inp.dtype.name], root,
                                           self.comm, self._stream()), "ncclBroadcast")

    def exchange(self, send, dst, recv, src):
        """ncclSend and ncclRecv fused into one group, so two ranks that send to each other cannot deadlock."""
        stream = self._stream()
        self._check(self.lib.ncclGroupStart(), "ncclGroupStart")
        if send is not None:
            self._check(self.lib.ncclSend(_ptr(send), send.size, _NCCL_TYPES[send.dtype.name], dst, self.comm,
                                          stream), "ncclSend")
        if recv is not None:
            self._check(self.lib.ncclRecv(_ptr(recv), recv.size, _NCCL_TYPES[recv.dtype.name], src, self.comm,
                                          stream), "ncclRecv")
        self._check(self.lib.ncclGroupEnd(), "ncclGroupEnd")

    # -- overlap: the side stream waits for the main stream's work so far, reduces, and leaves an event behind
    def _event(self, stream):
        dev = pg.Device[self.device]
        if self.free_events:
            event = self.free_events.pop()
        else:
            event = dev.check(dev.driver.cuEventCreate(int(dev.driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)),
                              "cuEventCreate")
        dev.check(dev.driver.cuEventRecord(event, stream), "cuEventRecord")
        return event

    def all_reduce_start(self, out, inp):
        dev = pg.Device[self.device]
        dev.activate()
        ready = self._event(dev.stream)
        dev.check(dev.driver.cuStreamWaitEvent(self.side, ready, 0), "cuStreamWaitEvent")
        self.free_events.append(ready)   # reusable at once: the wait captured the event's current state
        self.all_reduce(out, inp, side=True)
        return self._event(self.side)

    def all_reduce_finish(self, event):
        dev = pg.Device[self.device]
        dev.activate()
        dev.check(dev.driver.cuStreamWaitEvent(dev.stream, event, 0), "cuStreamWaitEvent")
        self.free_events.append(event)


# ----------------------------------------------------------------------------------------------------------------------
# Groups


class Group:
    """Ranks that run collectives together. Buffer-level operations (all_reduce_buffer, ...) work on realized
    memory; the tensor-level ones (all_reduce, all_gather, ...) are custom ops with gradients."""

    def __init__(self, comm, name, timeout=DEFAULT_TIMEOUT):
        self.comm, self.name, self.timeout = comm, name, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.world_ranks = comm.allgather(_mpi().COMM_WORLD.Get_rank())
        self._nccl = {}
        self._pending = {}   # started all-reduces by output address: MPI request (CPU) or CUDA event

    def __repr__(self):
        return f"<{self.name} group, ranks {self.world_ranks}>"

    def _wait(self, request, what):
        """Complete a non-blocking MPI request, or raise once the deadline passes."""
        self._wait_all([request], what)

    def _wait_all(self, requests, what):
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        MPI = _mpi()
        while not MPI.Request.Testall(requests):
            if _NOTICE is not None and _NOTICE.arrived():
                raise DistError(f"{what} on the {self.name} group abandoned: {_NOTICE.text()}", remote=True)
            if time.monotonic() > deadline:
                raise DistError(f"{what} on the {self.name} group (world ranks {self.world_ranks}) timed out "
                                f"after {self.timeout:g} s: a rank died or never reached it")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def nccl(self, device):
        if device not in self._nccl:
            self._nccl[device] = _Nccl(self, device)
        return self._nccl[device]

    # -- buffers (realized memory); CPU memory goes through MPI, CUDA memory through NCCL
    @staticmethod
    def _host_view(buf):
        return buf.mem.array.view(buf.dtype.np)

    def all_reduce_buffer(self, out, inp):
        if out.device != "CPU":
            return self.nccl(out.device).all_reduce(out, inp)
        src, dst = self._host_view(inp), self._host_view(out)
        self._wait(self.comm.Iallreduce(src, dst, op=_mpi().SUM), "all_reduce")

    def all_gather_buffer(self, out, inp):
        if out.device != "CPU":
            return self.nccl(out.device).all_gather(out, inp)
        self._wait(self.comm.Iallgather(self._host_view(inp), self._host_view(out)), "all_gather")

    def reduce_scatter_buffer(self, out, inp):
        """out (size n) = this rank's n-element block of the sum of every rank's inp (size n * group size)."""
        if out.device != "CPU":
            return self.nccl(out.device).reduce_scatter(out, inp)
        self._wait(self.comm.Ireduce_scatter_block(self._host_view(inp), self._host_view(out), op=_mpi().SUM),
                   "reduce_scatter")

    def broadcast_buffer(self, out, inp, root=0):
        """out = root's inp on every rank."""
        if out.device != "CPU":
            return self.nccl(out.device).broadcast(out, inp, root)
        dst = self._host_view(out)
        if self.rank == root:
            dst[:] = self._host_view(inp)
        self._wait(self.comm.Ibcast(dst, root=root), f"broadcast from rank {root}")

    def send_buffer(self, buf, dst, tag=0):
        self.exchange_buffers(buf, dst, None, None, tag)

    def recv_buffer(self, buf, src, tag=0):
        self.exchange_buffers(None, None, buf, src, tag)

    def exchange_buffers(self, send, dst, recv, src, tag=0):
        """Send `send` to group rank dst and receive `recv` from src, both posted before either is waited for."""
        device = (send or recv).device
        if device != "CPU":
            return self.nccl(device).exchange(send, dst, recv, src)
        requests, parts = [], []
        if send is not None:
            requests.append(self.comm.Isend(self._host_view(send), dest=dst, tag=tag))
            parts.append(f"send to rank {dst}")
        if recv is not None:
            requests.append(self.comm.Irecv(self._host_view(recv), source=src, tag=tag))
            parts.append(f"recv from rank {src}")
        self._wait_all(requests, " and ".join(parts))

    def all_reduce_start_buffer(self, out, inp):
        """Begin summing inp into out without waiting; all_reduce_finish_buffer(out) completes it. On a GPU the
        reduction runs on a stream of its own, overlapping whatever the device's stream runs meanwhile."""
        key = _address(out)
        if out.device != "CPU":
            self._pending[key] = self.nccl(out.device).all_reduce_start(out, inp)
            return
        src, dst = self._host_view(inp), self._host_view(out)
        self._pending[key] = (self.comm.Iallreduce(src, dst, op=_mpi().SUM), src, dst)

    def all_reduce_finish_buffer(self, out):
        pending = self._pending.pop(_address(out))
        if out.device != "CPU":
            return self.nccl(out.device).all_reduce_finish(pending)
        self._wait(pending[0], "all_reduce (bucketed)")

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "barrier")

    def allreduce_number(self, value: float, op="sum") -> float:
        """A Python number combined over the group (losses, norms for logging)."""
        MPI = _mpi()
        array = np.array([value], dtype=np.float64)
        out = np.empty_like(array)
        reduce_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        self._wait(self.comm.Iallreduce(array, out, op=reduce_op), f"allreduce({op})")
        return float(out[0])

    # -- numpy arrays on the host (checkpoints): point to point, with deadlines
    def send_array(self, array: np.ndarray, dst: int, tag=0):
        array = np.ascontiguousarray(array)
        self._wait(self.comm.Isend(array, dest=dst, tag=tag), f"send to rank {dst}")

    def recv_array(self, shape, dtype, src: int, tag=0) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._wait(self.comm.Irecv(out, source=src, tag=tag), f"recv from rank {src}")
        return out

    # -- tensors: collectives inside the graph, with the gradients Megatron-style parallelism needs
    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over the group (forward); the gradient passes through unchanged, since every rank continues with
        the same sum (Megatron's `g`)."""
        if self.size == 1:
            return t
        return self._op("all_reduce", lambda out, ins: self.all_reduce_buffer(out, ins[0]),
                        lambda g, node: (g,))(t)

    def copy_to_parallel(self, t: Tensor) -> Tensor:
        """Identity forward; the gradient is summed over the group (Megatron's `f`: the input of a
        column-parallel layer, used by every rank)."""
        if self.size == 1:
            return t
        group = self

        def backward(g, node):
            return (UOpCustom.make(group._reduce_op(), g),)
        return self._op("copy_to_parallel", lambda out, ins: _copy_within(out, ins[0]), backward)(t)

    def all_gather(self, t: Tensor, dim=-1) -> Tensor:
        """Concatenate every rank's t along dim; the gradient keeps this rank's slice."""
        if self.size == 1:
            return t
        dim = dim % t.ndim
        moved = t.transpose(0, dim) if dim else t
        shape = (moved.shape[0] * self.size,) + moved.shape[1:]
        rank, n = self.rank, moved.shape[0]

        def backward(g, node):
            return (g.shrink(tuple((rank * n, (rank + 1) * n) if i == 0 else (0, s)
                                   for i, s in enumerate(g.shape))),)
        gathered = self._op("all_gather", lambda out, ins: self.all_gather_buffer(out, ins[0]), backward)(
            moved.contiguous(), shape=shape)
        return gathered.transpose(0, dim) if dim else gathered

    def reduce_scatter(self, t: Tensor) -> Tensor:
        """This rank's block (along dim 0) of the sum over the group; the gradient is gathered back."""
        if self.size == 1:
            return t
        if t.shape[0] % self.size:
            raise ValueError(f"reduce_scatter over {self.size} ranks: dim 0 of shape {t.shape} does not divide")
        shape = (t.shape[0] // self.size,) + t.shape[1:]
        group = self

        def backward(g, node):
            gather = pg.CustomOp(f"all_gather[{group.name}]", lambda out, ins: group.all_gather_buffer(out, ins[0]))
            return (pg.UOp(Ops.CUSTOM, g.dtype, (g,), (gather, t.shape)),)
        return self._op("reduce_scatter", lambda out, ins: self.reduce_scatter_buffer(out, ins[0]), backward)(
            t.contiguous(), shape=shape)

    def broadcast(self, t: Tensor, root=0) -> Tensor:
        """root's t on every rank (no gradient: used for values every rank must agree on)."""
        if self.size == 1:
            return t
        return self._op("broadcast", lambda out, ins: self.broadcast_buffer(out, ins[0], root), None)(t.detach())

    def exchange(self, send: Tensor | None, dst: int | None, recv_shape=None, src: int | None = None, *,
                 token: Tensor, tag=0) -> Tensor:
        """Point to point: send `send` to group rank dst and/or receive a float32 tensor of recv_shape from src, in
        one step (a pipeline stage sends its output and receives a gradient at the same time, so neither side
        can block the other). Returns the received tensor, or a 1-element tensor when nothing is received, which
        must still be realized for the send to happen. `token`, a realized tensor on this rank's device, stands in
        as the input when nothing is sent. No gradient: pipeline schedules move gradients explicitly."""
        def forward(out, ins):
            self.exchange_buffers(ins[0] if send is not None else None, dst,
                                  out if recv_shape is not None else None, src, tag)
        what = f"exchange(send to {dst}, recv from {src})"
        source = token if send is None else send.detach()
        return self._op(what, forward, None)(source, shape=recv_shape or (1,), dtype=pg.float32)

    def all_reduce_start(self, t: Tensor) -> Tensor:
        """Begin an all-reduce (sum) of t and return at once: the result is a tensor that must be passed, with t,
        to all_reduce_finish before anything reads it. Used for gradient buckets, whose reduction may then
        overlap with the rest of the backward pass."""
        if self.size == 1:
            return t
        return self._op("all_reduce_start", lambda out, ins: self.all_reduce_start_buffer(out, ins[0]), None)(t)

    def all_reduce_finish(self, started: Tensor, t: Tensor) -> Tensor:
        """Wait for the all-reduce that all_reduce_start(t) began; returns the sum. t is an input only so that
        its memory stays allocated until the reduction has read it."""
        if self.size == 1:
            return t

        def forward(out, ins):
            self.all_reduce_finish_buffer(ins[0])
            _copy_within(out, ins[0])
        return self._op("all_reduce_finish", forward, None)(started, t)

    def _reduce_op(self):
        return pg.CustomOp(f"all_reduce[{self.name}]", lambda out, ins: self.all_reduce_buffer(out, ins[0]),
                           lambda g, node: (g,))

    def _op(self, what, forward, backward):
        return pg.CustomOp(f"{what}[{self.name}]", forward, backward)


class UOpCustom:
    """Apply a CustomOp to a UOp (inside gradient rules, which work on UOps rather than Tensors)."""

    @staticmethod
    def make(custom, g):
        return pg.UOp(Ops.CUSTOM, g.dtype, (g,), (custom, g.shape))


def _copy_within(out, inp):
    pg.Device[out.device].copy_within(out.mem, inp.mem, out.nbytes)


class LocalGroup:
    """The group of one process, for code that runs both with and without a mesh: every collective is the
    identity."""
    rank, size, name = 0, 1, "local"

    def all_reduce(self, t):
        return t

    copy_to_parallel = reduce_scatter = all_reduce_start = all_reduce

    def all_gather(self, t, dim=-1):
        return t

    def broadcast(self, t, root=0):
        return t

    def all_reduce_finish(self, started, t):
        return started


LOCAL = LocalGroup()


# ----------------------------------------------------------------------------------------------------------------------
# The mesh


class Mesh:
    """This rank's place in the (pipeline, data, tensor) grid and the groups along each axis, plus two derived
    groups: `model_group` (every rank holding a piece of one model replica: tensor x pipeline, for the gradient
    norm) and `ends_group` (the first and last pipeline stages, which share tied embeddings), None elsewhere."""

    def __init__(self, pp=1, dp=1, tp=1, timeout=DEFAULT_TIMEOUT):
        MPI = _mpi()
        world = MPI.COMM_WORLD
        self.world = Group(world, "world", timeout)
        self.rank, self.size = self.world.rank, self.world.size
        if pp < 1 or dp < 1 or tp < 1 or pp * dp * tp != self.size:
            # every rank evaluates the same check, so every rank raises
            raise ValueError(f"mesh pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} does not match the {self.size} "
                             f"processes mpiexec started")
        self.pp, self.dp, self.tp = pp, dp, tp
        self.tp_rank = self.rank % tp
        self.dp_rank = (self.rank // tp) % dp
        self.pp_rank = self.rank // (tp * dp)
        self.tp_group = Group(world.Split(self.pp_rank * dp + self.dp_rank, self.tp_rank), "tensor", timeout)
        self.dp_group = Group(world.Split(self.pp_rank * tp + self.tp_rank, self.dp_rank), "data", timeout)
        self.pp_group = Group(world.Split(self.dp_rank * tp + self.tp_rank, self.pp_rank), "pipeline", timeout)
        self.model_group = Group(world.Split(self.dp_rank, self.rank), "model", timeout)
        is_end = pp > 1 and self.pp_rank in (0, pp - 1)
        ends = world.Split(self.dp_rank * tp + self.tp_rank if is_end else MPI.UNDEFINED, self.pp_rank)
        self.ends_group = Group(ends, "embedding", timeout) if is_end else None
        self.timeout = timeout

    def __repr__(self):
        return (f"<Mesh rank {self.rank}/{self.size}: pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}, "
                f"tp {self.tp_rank}/{self.tp}>")

    def rank_of(self, pp_rank, dp_rank, tp_rank) -> int:
        """The world rank at a position of the mesh."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def groups(self) -> list:
        return [g for g in (self.tp_group, self.dp_group, self.pp_group, self.model_group, self.ends_group)
                if g is not None]

    def local_device(self, kind="CPU") -> str:
        """CPU, or the GPU this rank drives: ranks on one machine take GPUs 0, 1, ... in order."""
        if kind.upper().startswith("CPU"):
            return "CPU"
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", self.rank)))
        return f"CUDA:{local}"

    def connect(self, device: str):
        """Create the NCCL communicators of every group of more than one rank now, in the same order on every rank
        (lazily, at first use, ranks could meet them in different orders). Nothing to do on the CPU."""
        if device == "CPU":
            return
        for group in self.groups():
            if group.size > 1:
                group.nccl(device)


def init(pp=1, dp=1, tp=1, timeout=DEFAULT_TIMEOUT) -> Mesh:
    """Build the mesh for the processes mpiexec started (a single process makes a 1x1x1 mesh) and make an error on
    any rank end the whole job, with a message on every rank, instead of leaving the others waiting."""
    mesh = Mesh(pp, dp, tp, timeout)
    if mesh.size > 1:
        _abort_on_error()
    return mesh


def settle(timeout=10.0) -> bool:
    """Wait a little for every rank to arrive here: ranks that all hit the same error call this after printing
    it, so each one's message is out before mpiexec tears the job down. False if some rank did not come."""
    if launched_size() == 1:
        return True
    MPI = _mpi()
    request = MPI.COMM_WORLD.Ibarrier()
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-3)
    return True


class _Notice:
    """Error reports between ranks: every rank keeps a receive posted on a communicator of its own, which waits
    in collectives check; a failing rank sends its error to all before it aborts the job, so each rank can say
    why it stops (a rank busy computing, or waiting on a GPU, is simply ended by the abort)."""
    SIZE = 1024

    def __init__(self):
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD.Dup()
        self.buf = np.zeros(self.SIZE, dtype=np.uint8)
        self.status = MPI.Status()
        self.request = self.comm.Irecv(self.buf, source=MPI.ANY_SOURCE, tag=0)

    def arrived(self) -> bool:
        return self.request.Test(self.status)

    def close(self):
        """At exit: withdraw the posted receive, which MPI would otherwise find still pending at finalize."""
        if not self.request.Test():
            self.request.Cancel()
            self.request.Wait()

    def text(self) -> str:
        message = bytes(self.buf).rstrip(b"\0").decode("utf-8", "replace")
        return f"rank {self.status.Get_source()} failed: {message}"

    def tell_all(self, message: str):
        raw = np.frombuffer(message.encode("utf-8")[:self.SIZE].ljust(self.SIZE, b"\0"), dtype=np.uint8).copy()
        me = self.comm.Get_rank()
        requests = [self.comm.Isend(raw, dest=r, tag=0) for r in range(self.comm.Get_size()) if r != me]
        # small messages go out eagerly; give the others a moment to print before the abort ends them
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not _mpi().Request.Testall(requests):
            time.sleep(1e-3)
        time.sleep(0.5)


_NOTICE = None


def abort(code=1):
    """End every rank of the job now."""
    sys.stderr.flush()
    sys.stdout.flush()
    _mpi().COMM_WORLD.Abort(code)


def _abort_on_error():
    global _NOTICE
    if _NOTICE is None:
        _NOTICE = _Notice()
        atexit.register(_NOTICE.close)
    previous = sys.excepthook

    def hook(kind, value, tb):
        rank = _mpi().COMM_WORLD.Get_rank()
        if isinstance(value, DistError) and value.remote:
            # another rank failed first and is ending the job: one line here, its traceback is over there
            sys.stderr.write(f"[rank {rank}] stopping: {value}\n")
            sys.stderr.flush()
            time.sleep(5.0)
        else:
            if isinstance(value, DistError):
                # a timeout: the message names the collective and the group, the traceback adds nothing
                sys.stderr.write(f"[rank {rank}] DistError: {value}\n")
            else:
                sys.stderr.write(f"[rank {rank}] ")
                previous(kind, value, tb)
            sys.stderr.flush()
            _NOTICE.tell_all(f"{kind.__name__}: {value}")
        abort(1)
    sys.excepthook = hook
