"""picograd parallelism: process groups over MPI (CPU tensors) and NCCL (CUDA tensors), the (pipeline, data,
tensor) mesh, and collectives as custom ops, so they take part in autograd, scheduling and graph capture.

One process per device, started by `mpiexec -n N python script.py`; `dist.init(pp=, dp=, tp=)` builds the mesh.
Ranks are laid out tensor-fastest: rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so a tensor-parallel group
(the chattiest) sits on neighbouring ranks, which mpiexec places on the same machine.

Every collective waits with a deadline (PICOGRAD_DIST_TIMEOUT seconds, default 300): a rank that died or never
arrives turns into a DistError naming the collective and the group on the ranks that wait, never a hang.
"""
from __future__ import annotations

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
    """A collective failed or timed out."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("picograd's multi-process mode needs mpi4py and an MPI library: pip install mpi4py "
                           "mpich (or pip install .[dist])") from e
    return MPI


# ----------------------------------------------------------------------------------------------------------------------
# NCCL through ctypes (CUDA tensors). The library comes from the nvidia-nccl-cu12/cu13 wheels or the system.

_NCCL_TYPES = {"float32": 7, "int32": 2, "bool": 0}   # ncclFloat32, ncclInt32, ncclInt8
_NCCL_SUM = 0


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


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
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise RuntimeError("CUDA tensors communicate through NCCL, and no libnccl could be loaded (install the "
                       "nvidia-nccl-cu12 or -cu13 wheel, or the system NCCL); tried:\n  " + "\n  ".join(errors))


class _Nccl:
    """One NCCL communicator over an MPI group, created on first use (rank 0's unique id goes out over MPI)."""

    def __init__(self, group: Group, device):
        self.lib = _load_nccl()
        uid = _NcclUniqueId()
        if group.rank == 0:
            self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        raw = np.frombuffer(bytes(uid.internal), dtype=np.uint8).copy()
        group._wait(group.comm.Ibcast(raw, root=0), "NCCL id broadcast")
        ctypes.memmove(ctypes.byref(uid), raw.ctypes.data, 128)
        self.device = device
        self.comm = ctypes.c_void_p()
        pg.Device[device].make_current()
        self._check(self.lib.ncclCommInitRank(ctypes.byref(self.comm), group.size, uid, group.rank),
                    "ncclCommInitRank")

    def _check(self, status, what):
        if status != 0:
            message = self.lib.ncclGetErrorString(status)
            raise DistError(f"{what} failed: NCCL error {status} ({ctypes.cast(message, ctypes.c_char_p).value})")

    def all_reduce(self, out, inp):
        dev = pg.Device[self.device]
        self._check(self.lib.ncclAllReduce(ctypes.c_void_p(inp.mem.address), ctypes.c_void_p(out.mem.address),
                                           ctypes.c_size_t(inp.size), _NCCL_TYPES[inp.dtype.name], _NCCL_SUM,
                                           self.comm, ctypes.c_void_p(dev.stream_handle)), "ncclAllReduce")

    def all_gather(self, out, inp):
        dev = pg.Device[self.device]
        self._check(self.lib.ncclAllGather(ctypes.c_void_p(inp.mem.address), ctypes.c_void_p(out.mem.address),
                                           ctypes.c_size_t(inp.size), _NCCL_TYPES[inp.dtype.name], self.comm,
                                           ctypes.c_void_p(dev.stream_handle)), "ncclAllGather")

    def send(self, buf, peer):
        dev = pg.Device[self.device]
        self._check(self.lib.ncclSend(ctypes.c_void_p(buf.mem.address), ctypes.c_size_t(buf.size),
                                      _NCCL_TYPES[buf.dtype.name], peer, self.comm,
                                      ctypes.c_void_p(dev.stream_handle)), "ncclSend")

    def recv(self, buf, peer):
        dev = pg.Device[self.device]
        self._check(self.lib.ncclRecv(ctypes.c_void_p(buf.mem.address), ctypes.c_size_t(buf.size),
                                      _NCCL_TYPES[buf.dtype.name], peer, self.comm,
                                      ctypes.c_void_p(dev.stream_handle)), "ncclRecv")


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

    def __repr__(self):
        return f"<{self.name} group, ranks {self.world_ranks}>"

    def _wait(self, request, what):
        """Complete a non-blocking MPI request, or raise once the deadline passes."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                raise DistError(f"{what} on the {self.name} group (world ranks {self.world_ranks}) timed out "
                                f"after {self.timeout:.0f} s: a rank died or never reached it")
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

    def send_buffer(self, buf, dst, tag=0):
        if buf.device != "CPU":
            return self.nccl(buf.device).send(buf, dst)
        self._wait(self.comm.Isend(self._host_view(buf), dest=dst, tag=tag), f"send to rank {dst}")

    def recv_buffer(self, buf, src, tag=0):
        if buf.device != "CPU":
            return self.nccl(buf.device).recv(buf, src)
        self._wait(self.comm.Irecv(self._host_view(buf), source=src, tag=tag), f"recv from rank {src}")

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "barrier")

    def allreduce_number(self, value: float, op="sum") -> float:
        """A Python number combined over the group (losses, norms for logging)."""
        MPI = _mpi()
        array = np.array([value], dtype=np.float64)
        out = np.empty_like(array)
        self._wait(self.comm.Iallreduce(array, out, op={"sum": MPI.SUM, "max": MPI.MAX}[op]), f"allreduce({op})")
        return float(out[0])

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


# ----------------------------------------------------------------------------------------------------------------------
# The mesh


class Mesh:
    """This rank's place in the (pipeline, data, tensor) grid and the groups along each axis."""

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

    def __repr__(self):
        return (f"<Mesh rank {self.rank}/{self.size}: pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}, "
                f"tp {self.tp_rank}/{self.tp}>")

    def local_device(self, kind="CPU") -> str:
        """CPU, or the GPU this rank drives: ranks on one machine take GPUs 0, 1, ... in order."""
        if kind.upper().startswith("CPU"):
            return "CPU"
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", self.rank)))
        return f"CUDA:{local}"


def init(pp=1, dp=1, tp=1, timeout=DEFAULT_TIMEOUT) -> Mesh:
    """Build the mesh for the processes mpiexec started (a single process makes a 1x1x1 mesh) and make an error on
    any rank end the whole job instead of leaving the others waiting."""
    mesh = Mesh(pp, dp, tp, timeout)
    if mesh.size > 1:
        _abort_on_error()
    return mesh


def _abort_on_error():
    previous = sys.excepthook

    def hook(kind, value, tb):
        rank = _mpi().COMM_WORLD.Get_rank()
        sys.stderr.write(f"[rank {rank}] ")
        previous(kind, value, tb)
        sys.stderr.flush()
        _mpi().COMM_WORLD.Abort(1)
    sys.excepthook = hook
