"""picograd front end: dtypes, the UOp IR, Tensor and autograd, nn layers, optimizers, safetensors, devices.

Read top to bottom: dtypes -> UOp (the one IR every layer shares) -> symbolic ints -> buffers and devices ->
execution context -> Tensor (creation, movement, elementwise, reductions, composite ops) -> autograd -> nn ->
optimizers -> safetensors -> compile.

A Tensor only builds UOps. When something asks for values (realize, numpy, item), compile.py schedules the
pending graph into fused kernels and a backend (ops_cpu.py, ops_cuda.py) renders, compiles and runs them.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import json
import math
import os
import struct
import weakref
from enum import Enum, auto

import numpy as np

# ----------------------------------------------------------------------------------------------------------------------
# dtypes


class DType:
    """A scalar type: its name, its size in bytes, numpy's equivalent and the C type the renderers use."""
    __slots__ = ("name", "itemsize", "np", "ctype", "is_float")

    def __init__(self, name, itemsize, np_dtype, ctype, is_float):
        self.name, self.itemsize, self.np = name, itemsize, np.dtype(np_dtype)
        self.ctype, self.is_float = ctype, is_float

    def __repr__(self):
        return f"pg.{self.name}"

    def __reduce__(self):
        return (_dtype_by_name, (self.name,))


float32 = DType("float32", 4, np.float32, "float", True)
int32 = DType("int32", 4, np.int32, "int", False)
bool_ = DType("bool", 1, np.bool_, "unsigned char", False)
DTYPES = {"float32": float32, "int32": int32, "bool": bool_}


def _dtype_by_name(name):
    return DTYPES[name]


def to_dtype(x) -> DType:
    """Accept a DType, a name ("float32"), a numpy dtype or a Python type; anything else is a clear TypeError."""
    if isinstance(x, DType):
        return x
    if x is float:
        return float32
    if x is int:
        return int32
    if x is builtins.bool:
        return bool_
    if isinstance(x, str) and x in DTYPES:
        return DTYPES[x]
    try:
        kind = np.dtype(x).kind
    except TypeError:
        raise TypeError(f"unknown dtype {x!r}: picograd has float32, int32 and bool") from None
    return {"f": float32, "i": int32, "u": int32, "b": bool_}.get(kind) or _bad_dtype(x)


def _bad_dtype(x):
    raise TypeError(f"unknown dtype {x!r}: picograd has float32, int32 and bool")


def __getattr__(name):
    # `pg.bool` without shadowing the builtin inside this module
    if name == "bool":
        return bool_
    raise AttributeError(f"module 'picograd' has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------------
# The IR. A UOp is immutable and hash-consed: building the same node twice returns the same object, so common
# subexpressions merge and a graph's identity is its cache key. Front-end graphs use the ops down to the effects;
# compile.py adds the kernel-level ops below them (loads, stores, loops).


class Ops(Enum):
    __hash__ = object.__hash__   # members are singletons; Enum's own hash is a Python call on every dict lookup
    # sources
    BUFFER = auto()        # arg = (Buffer, version): realized memory
    CONST = auto()         # arg = python value, shape ()
    IOTA = auto()          # arg = n: the values 0..n-1 (a virtual buffer, never stored)
    DEFINE_VAR = auto()    # arg = (name, min, max): an int known only when the kernel runs
    BIND = auto()          # src = (DEFINE_VAR, CONST): a variable with its value for this graph
    # unary
    EXP2 = auto()
    LOG2 = auto()
    SIN = auto()
    SQRT = auto()
    RECIP = auto()
    NEG = auto()
    CAST = auto()
    CHECK = auto()         # arg = n: an integer index that must lie in [0, n); the kernel reports it if not
    # binary
    ADD = auto()
    MUL = auto()
    MAX = auto()
    MIN = auto()           # only as a reduction (of integers; float min is -max(-x), which keeps NaN handling)
    CMPLT = auto()
    CMPEQ = auto()
    IDIV = auto()
    MOD = auto()
    # ternary
    WHERE = auto()
    # reduce: arg = (Ops.ADD or Ops.MAX, axes); reduced axes keep size 1
    REDUCE = auto()
    # movement: free views
    RESHAPE = auto()
    PERMUTE = auto()
    EXPAND = auto()
    PAD = auto()
    SHRINK = auto()
    FLIP = auto()
    # effects
    CONTIGUOUS = auto()
    COPY = auto()          # arg = destination device
    ASSIGN = auto()        # src = (target view of a buffer, value): an in-place write
    DETACH = auto()        # stops gradients; the scheduler sees through it
    CUSTOM = auto()        # arg = (CustomOp, shape): Python code over realized buffers (collectives, callbacks)
    # kernel level (compile.py)
    PARAM = auto()         # arg = (index, shape): a kernel's buffer argument
    LOAD = auto()          # src = (PARAM, index, valid)
    STORE = auto()         # src = (PARAM, index, value)
    RANGE = auto()         # arg = (name, size): a loop variable
    ACC = auto()           # src = (init,) arg = (reduce op, ranges): a reduction over its ranges
    SINK = auto()


UNARY = {Ops.EXP2, Ops.LOG2, Ops.SIN, Ops.SQRT, Ops.RECIP, Ops.NEG, Ops.CAST, Ops.CHECK}
BINARY = {Ops.ADD, Ops.MUL, Ops.MAX, Ops.CMPLT, Ops.CMPEQ, Ops.IDIV, Ops.MOD}
ALU = UNARY | BINARY | {Ops.WHERE}
MOVEMENT = {Ops.RESHAPE, Ops.PERMUTE, Ops.EXPAND, Ops.PAD, Ops.SHRINK, Ops.FLIP}


def prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def argsort(xs):
    return tuple(sorted(range(len(xs)), key=xs.__getitem__))


class UOp:
    """One node of the graph: an op, its dtype, its sources and an argument. Shape and device are derived."""
    __slots__ = ("op", "dtype", "src", "arg", "shape", "device", "realized", "assigned", "__weakref__")
    _interned = {}   # key -> weak reference to the node; the reference's callback removes the entry

    def __new__(cls, op: Ops, dtype: DType, src: tuple = (), arg=None):
        # floats are keyed by repr so that 0.0 and -0.0 stay apart and NaN finds itself
        key = (op, dtype, src, repr(arg) if type(arg) is float else arg)
        ref = _INTERNED.get(key)
        if ref is not None:
            node = ref()
            if node is not None:
                return node
        node = object.__new__(cls)
        node.op, node.dtype, node.src, node.arg = op, dtype, src, arg
        node.shape = _infer_shape(op, src, arg)
        node.device = _infer_device(op, src, arg)
        node.realized = None   # the Buffer holding this node's value once a kernel has computed it
        node.assigned = None   # for an ASSIGN that has run: its target as a view of the buffer's new version
        _INTERNED[key] = weakref.ref(node, lambda _, key=key: _forget(key))
        return node

    def __repr__(self):
        return f"UOp({self.op.name}, {self.dtype}, shape={self.shape}, arg={self.arg!r}, n_src={len(self.src)})"

    # -- constructors shared by Tensor and the gradient rules; each returns self when it would be a no-op
    @staticmethod
    def const(value, dtype: DType, shape=()):
        value = float(value) if dtype.is_float else (int(value) if dtype is int32 else (value is True or value == 1))
        node = UOp(Ops.CONST, dtype, (), value)
        return node.reshape((1,) * len(shape)).expand(shape) if shape else node

    def const_like(self, value):
        return UOp.const(value, self.dtype, self.shape)

    def alu(self, op: Ops, *srcs: UOp) -> UOp:
        # x * 1 and x + 0 are x: gradient rules produce them everywhere
        if op is Ops.MUL and srcs[0].shape == self.shape:
            if srcs[0].const_value() == 1 and srcs[0].dtype is self.dtype:
                return self
            if self.const_value() == 1 and srcs[0].dtype is self.dtype:
                return srcs[0]
        if op is Ops.ADD and srcs[0].shape == self.shape and srcs[0].dtype is self.dtype:
            if srcs[0].const_value() == 0 and srcs[0].base().op is Ops.CONST and srcs[0].const_value() is not False:
                return self
        if op in (Ops.CMPLT, Ops.CMPEQ):
            dtype = bool_
        elif op is Ops.WHERE:
            dtype = srcs[0].dtype
        else:
            dtype = self.dtype
        return UOp(op, dtype, (self,) + srcs)

    def cast(self, dtype: DType) -> UOp:
        return self if dtype is self.dtype else UOp(Ops.CAST, dtype, (self,))

    def reshape(self, shape) -> UOp:
        shape = tuple(shape)
        if shape == self.shape:
            return self
        return UOp(Ops.RESHAPE, self.dtype, (self,), shape)

    def permute(self, order) -> UOp:
        order = tuple(order)
        if order == tuple(range(len(order))):
            return self
        return UOp(Ops.PERMUTE, self.dtype, (self,), order)

    def expand(self, shape) -> UOp:
        shape = tuple(shape)
        return self if shape == self.shape else UOp(Ops.EXPAND, self.dtype, (self,), shape)

    def pad(self, padding) -> UOp:
        padding = tuple((lo, hi) for lo, hi in padding)
        if all(lo == 0 and hi == 0 for lo, hi in padding):
            return self
        return UOp(Ops.PAD, self.dtype, (self,), padding)

    def shrink(self, bounds) -> UOp:
        bounds = tuple((lo, hi) for lo, hi in bounds)
        if all(isinstance(lo, int) and lo == 0 and hi == s for (lo, hi), s in zip(bounds, self.shape)):
            return self
        return UOp(Ops.SHRINK, self.dtype, (self,), bounds)

    def flip(self, axes) -> UOp:
        axes = tuple(sorted(axes))
        return UOp(Ops.FLIP, self.dtype, (self,), axes) if axes else self

    def reduce(self, op: Ops, axes) -> UOp:
        axes = tuple(sorted(a for a in axes if self.shape[a] != 1 or True))
        return UOp(Ops.REDUCE, self.dtype, (self,), (op, axes)) if axes else self

    # -- graph walks
    def toposort(self, stop=None, seen=None):
        """Nodes reachable from self, sources before users; `stop` nodes are included but not entered. Nodes already
        in `seen` are skipped, and the ones returned are added to it (so several roots can share one walk)."""
        seen = set() if seen is None else seen
        if self in seen:
            return []
        # depth-first, each stack entry a node and the iterator over the sources still to visit
        order, stack = [], [(self, iter(() if stop is not None and stop(self) else self.src))]
        seen.add(self)
        while stack:
            node, sources = stack[-1]
            for s in sources:
                if s not in seen:
                    seen.add(s)
                    stack.append((s, iter(() if stop is not None and stop(s) else s.src)))
                    break
            else:
                stack.pop()
                order.append(node)
        return order

    def base(self) -> UOp:
        """The node under a chain of movement ops."""
        node = self
        while node.op in MOVEMENT:
            node = node.src[0]
        return node

    def const_value(self):
        """The value if this node is a (reshaped/expanded) constant, else None."""
        base = self.base()
        return base.arg if base.op is Ops.CONST else None


_INTERNED = UOp._interned


def _forget(key):
    # a dead node's entry goes, unless the key has meanwhile been reused by a live node (pop: compile threads
    # drop nodes too, and another may have removed the entry first)
    ref = _INTERNED.get(key)
    if ref is not None and ref() is None:
        _INTERNED.pop(key, None)


def _infer_shape(op, src, arg):
    if op is Ops.BUFFER:
        return (arg[0].size,)
    if op in (Ops.CONST, Ops.DEFINE_VAR, Ops.BIND, Ops.PARAM, Ops.LOAD, Ops.STORE, Ops.RANGE, Ops.ACC, Ops.SINK):
        return arg[1] if op is Ops.PARAM else ()
    if op is Ops.IOTA:
        return (arg,)
    if op in ALU:
        shape = src[-1].shape if op is Ops.WHERE else src[0].shape
        for s in src:
            if s.shape != shape and s.shape != ():
                raise ValueError(f"internal shape mismatch in {op.name}: {[x.shape for x in src]}")
        return shape
    if op is Ops.REDUCE:
        return tuple(1 if i in arg[1] else s for i, s in enumerate(src[0].shape))
    if op is Ops.RESHAPE:
        if prod(arg) != prod(src[0].shape):
            raise ValueError(f"cannot reshape {src[0].shape} to {arg}")
        return arg
    if op is Ops.PERMUTE:
        return tuple(src[0].shape[i] for i in arg)
    if op is Ops.EXPAND:
        return arg
    if op is Ops.PAD:
        return tuple(_as_int(s + lo + hi) for s, (lo, hi) in zip(src[0].shape, arg))
    if op is Ops.SHRINK:
        return tuple(_as_int(hi - lo) for lo, hi in arg)
    if op in (Ops.FLIP, Ops.CONTIGUOUS, Ops.COPY, Ops.DETACH):
        return src[0].shape
    if op is Ops.ASSIGN:
        return src[0].shape
    if op is Ops.CUSTOM:
        return arg[1]
    raise RuntimeError(f"no shape rule for {op}")


def _infer_device(op, src, arg):
    if op is Ops.BUFFER:
        return arg[0].device
    if op is Ops.COPY or (op is Ops.CONTIGUOUS and arg is not None):
        return arg
    for s in src:
        if s.device is not None:
            return s.device
    return None


def _as_int(x):
    if isinstance(x, Variable):
        if x.terms:
            raise ValueError(f"a shape must be a plain int, but it depends on a variable: {x}")
        return x.const
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Symbolic ints: a decode position or a cache offset known only when the kernel runs, so one compiled step serves
# every position. A Variable is sum(coefficient * variable) + constant; it may stand where a slice bound goes.


class Variable:
    """`Variable("pos", 0, 1023).bind(17)`: an int that kernels receive as an argument instead of a constant."""
    __slots__ = ("terms", "const")

    def __init__(self, name=None, lo=None, hi=None, *, terms=None, const=0):
        if name is not None:
            if not (isinstance(lo, int) and isinstance(hi, int) and lo <= hi):
                raise ValueError(f"Variable {name!r} needs integer bounds lo <= hi, got {lo}, {hi}")
            terms = ((UOp(Ops.DEFINE_VAR, int32, (), (name, lo, hi)), 1),)
        self.terms = tuple(sorted(terms or (),
                                  key=lambda t: t[0].arg if t[0].op is Ops.DEFINE_VAR else t[0].src[0].arg))
        self.const = const

    def bind(self, value: int) -> Variable:
        (var, coeff), = self.terms
        name, lo, hi = var.arg
        if not lo <= value <= hi:
            raise ValueError(f"Variable {name!r} bound to {value}, outside its range [{lo}, {hi}]")
        bound = UOp(Ops.BIND, int32, (var, UOp.const(value, int32)))
        return Variable(terms=((bound, coeff),), const=self.const)

    @property
    def val(self) -> int:
        """The value under the current bindings (unbound variables have none)."""
        total = self.const
        for node, coeff in self.terms:
            if node.op is not Ops.BIND:
                raise ValueError(f"Variable {node.arg[0]!r} is not bound")
            total += coeff * node.src[1].arg
        return total

    def bounds(self):
        lo = hi = self.const
        for node, coeff in self.terms:
            name, vlo, vhi = (node if node.op is Ops.DEFINE_VAR else node.src[0]).arg
            lo, hi = lo + min(coeff * vlo, coeff * vhi), hi + max(coeff * vlo, coeff * vhi)
        return lo, hi

    def _combine(self, other, sign):
        if isinstance(other, int):
            return Variable(terms=self.terms, const=self.const + sign * other)
        coeffs = dict(self.terms)
        for node, c in other.terms:
            coeffs[node] = coeffs.get(node, 0) + sign * c
        terms = tuple((n, c) for n, c in coeffs.items() if c != 0)
        const = self.const + sign * other.const
        return Variable(terms=terms, const=const) if terms else const

    def __add__(self, other):
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1)

    def __rsub__(self, other):
        return (self * -1) + other

    def __mul__(self, k):
        if not isinstance(k, int):
            return NotImplemented
        return Variable(terms=tuple((n, c * k) for n, c in self.terms), const=self.const * k) if k else 0

    __rmul__ = __mul__

    def __eq__(self, other):
        return isinstance(other, Variable) and self.terms == other.terms and self.const == other.const

    def __hash__(self):
        return hash((self.terms, self.const))

    def __repr__(self):
        parts = [f"{c}*{(n if n.op is Ops.DEFINE_VAR else n.src[0]).arg[0]}" for n, c in self.terms]
        return "Variable(" + " + ".join(parts + [str(self.const)]) + ")"

    def uop(self) -> UOp:
        """The value as a scalar int32 node, for use in tensor arithmetic."""
        out = UOp.const(self.const, int32)
        for node, coeff in self.terms:
            term = node if coeff == 1 else node.alu(Ops.MUL, UOp.const(coeff, int32))
            out = term if out.const_value() == 0 else out.alu(Ops.ADD, term)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Buffers and devices. A Buffer is flat memory on a device; backends are found by name and imported on first use,
# so importing picograd never needs CUDA.


class Buffer:
    """`size` elements of `dtype` on `device`, allocated on first use and handed back to the allocator when dropped."""
    __slots__ = ("device", "size", "dtype", "_mem", "version", "serial", "exclusive", "__weakref__")
    _next_serial = 0

    def __init__(self, device: str, size: int, dtype: DType, exclusive=False):
        self.device, self.size, self.dtype, self._mem, self.version = device, size, dtype, None, 0
        # exclusive: owned by the tensor that made it (not a kernel output that equal computations share), so it
        # may be written in place
        self.exclusive = exclusive
        # a unique number in creation order (graph capture tells buffers apart by it, ids get reused)
        self.serial = Buffer._next_serial
        Buffer._next_serial += 1

    @staticmethod
    def next_serial() -> int:
        return Buffer._next_serial

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def mem(self):
        if self._mem is None:
            self._mem = Device[self.device].alloc(self.nbytes)
            _STATS["bytes_in_use"] += self.nbytes
            _STATS["peak_bytes_in_use"] = max(_STATS["peak_bytes_in_use"], _STATS["bytes_in_use"])
        return self._mem

    def copyin(self, array: np.ndarray):
        array = np.asarray(array, dtype=self.dtype.np).reshape(-1)
        assert array.size == self.size, (array.shape, self.size)
        Device[self.device].copyin(self.mem, array)
        return self

    def copyout(self) -> np.ndarray:
        out = np.empty(self.size, dtype=self.dtype.np)
        Device[self.device].copyout(out, self.mem)
        return out

    def __del__(self):
        if self._mem is not None:
            try:
                _STATS["bytes_in_use"] -= self.nbytes
                Device[self.device].free(self._mem, self.nbytes)
            except Exception:   # interpreter shutdown: the backend may already be gone
                pass

    def __repr__(self):
        return f"<Buffer {self.device} {self.dtype.name}[{self.size}]>"


class _Devices:
    """The device registry: `Device["CPU"]`, `Device["CUDA:1"]`; backends load on first use."""

    def __init__(self):
        self._open = {}

    @staticmethod
    def canonicalize(name) -> str:
        if name is None:
            return Device.default
        text = str(name).upper()
        if text == "CPU":
            return "CPU"
        if text == "CUDA" or text == "GPU":
            return "CUDA:0"
        if text.startswith("CUDA:") and text[5:].isdigit():
            return f"CUDA:{int(text[5:])}"
        raise ValueError(f"unknown device {name!r}: expected 'CPU', 'CUDA' or 'CUDA:n'")

    @property
    def default(self) -> str:
        return self.canonicalize(os.environ.get("DEVICE", "CPU"))

    def __getitem__(self, name):
        dev = self._open.get(name)
        if dev is not None:
            return dev
        name = self.canonicalize(name)
        dev = self._open.get(name)
        if dev is None:
            if name == "CPU":
                import ops_cpu
                dev = ops_cpu.CPUDevice(name)
            else:
                import ops_cuda
                dev = ops_cuda.CUDADevice(name)
            self._open[name] = dev
        return dev


Device = _Devices()


# ----------------------------------------------------------------------------------------------------------------------
# Execution context and knobs. DEBUG, EAGER and TF32 come from the environment; TF32 may also be set as pg.TF32.

DEBUG = int(os.environ.get("DEBUG", "0"))
TF32 = os.environ.get("TF32", "0") not in ("", "0")


class _Context:
    eager = os.environ.get("EAGER", "0") not in ("", "0")
    grad_enabled = True
    op_depth = 0          # nesting of public Tensor ops; eager mode realizes when the outermost returns
    capturing = None      # the compile.Capture being traced, if any


CTX = _Context()
_STATS = {"kernels_compiled": 0, "kernels_launched": 0, "kernels_from_disk": 0, "schedules": 0, "traces": 0,
          "replays": 0, "copies": 0, "bytes_in_use": 0, "peak_bytes_in_use": 0}


def stats() -> dict:
    """Counters since the process started: kernels_compiled, kernels_launched, kernels_from_disk, traces, replays,
    copies, bytes_in_use (memory of live buffers, all devices) and its peak."""
    return dict(_STATS)


def reset_peak_memory():
    _STATS["peak_bytes_in_use"] = _STATS["bytes_in_use"]


@contextlib.contextmanager
def eager(enabled=True):
    """Run every Tensor op at once, one kernel per op, PyTorch-1 style."""
    old, CTX.eager = CTX.eager, enabled
    try:
        yield
    finally:
        CTX.eager = old


@contextlib.contextmanager
def no_grad():
    """Ops inside build no gradient graph."""
    old, CTX.grad_enabled = CTX.grad_enabled, False
    try:
        yield
    finally:
        CTX.grad_enabled = old


_rng = np.random.default_rng(0)


def manual_seed(seed: int):
    """Seed the generator behind rand, randn, randint and layer initialization."""
    global _rng
    _rng = np.random.default_rng(seed)


def _public(fn):
    """Mark a public Tensor op: in eager mode its result is realized when the outermost op returns."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        if not CTX.eager:
            return fn(*args, **kwargs)
        CTX.op_depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            CTX.op_depth -= 1
        if CTX.op_depth == 0:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            pending = [t for t in outs if isinstance(t, Tensor) and not t._is_view()]
            if pending:
                realize(*pending)
        return out
    return op


# ----------------------------------------------------------------------------------------------------------------------
# Tensor


# reductions of at least this many elements into at most 16 outputs run in two stages of SPLIT_GROUPS pieces
SPLIT_REDUCE_AT = 1 << 18
SPLIT_GROUPS = 256
# and so do long reductions over leading axes into few outputs (_reduce_columns)
SPLIT_COLUMNS_AT = 2048


def _reduce_columns(x: UOp, op: Ops, axes) -> UOp:
    """x.reduce(op, axes), in two stages when the axes lead and are long but the outputs few: partial results of
    consecutive rows ([groups, *rest]) and then their combination. A norm's or bias's weight gradient ([batch, seq,
    dim] summed to [dim]) gets SPLIT_GROUPS short pieces, so that every thread or core has work and reads along dim;
    a weight gradient (a sum of products: [batch, seq, out, in] to [out, in]) gets a few long ones, enough for a
    GPU's matmul tiles to fill it (split-K). In one stage a GPU would give each output, or each output tile, a
    whole column: a few blocks, each a long chain of reads."""
    lead = len(axes)
    rows, rest = prod(x.shape[:lead]), x.shape[lead:]
    if axes != tuple(range(lead)) or not rest:
        return x.reduce(op, axes)
    n_out = prod(rest)
    groups = min(SPLIT_GROUPS, rows // 32) if n_out <= 4096 else min(SPLIT_GROUPS, rows // 1024, (1 << 22) // n_out)
    groups = 1 << max(0, groups.bit_length() - 1) if groups >= 2 else 1
    if groups < 2 or rows < SPLIT_COLUMNS_AT or rows % groups:
        return x.reduce(op, axes)
    parts = x.reshape((groups, rows // groups) + rest).reduce(op, (1,))
    return parts.reduce(op, (0,)).reshape((1,) * lead + rest)


# split-K: a product with fewer output tiles than a GPU has multiprocessors splits its depth into pieces
SPLIT_K_TILE = 128        # the output tile edge a GPU's big matmul template uses
SPLIT_K_MIN_DEPTH = 256   # the least depth a piece keeps


def _split_depth(m, n, k, batch, multiprocessors) -> int:
    """How many pieces a [batch, m, k] @ [batch, k, n] product's depth is split into: 1 (no split) unless the
    device has many multiprocessors (a GPU; the CPU's few cores are filled by any real product) and the product's
    output tiles fill less than two waves of them, as a prefill's projections do (256 tokens x 2048 features: 32
    tiles on 132 multiprocessors, each a chain 2048 to 8192 deep). Thin products (decode's matrix-vector
    products) run as reductions, not tiles, and are never split."""
    if multiprocessors < 16 or min(m, n) < 64:
        return 1
    tiles = batch * -(-m // SPLIT_K_TILE) * -(-n // SPLIT_K_TILE)
    pieces = 1   # doubled while the doubled pieces' tiles stay within two waves and their depth long enough
    while tiles * pieces <= multiprocessors and k % (2 * pieces) == 0 and k // (2 * pieces) >= SPLIT_K_MIN_DEPTH:
        pieces *= 2
    return pieces


def _shape_arg(shape):
    """Accept f(2, 3), f((2, 3)) and f([2, 3])."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for s in shape:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise TypeError(f"shape entries must be ints, got {shape}")
    return tuple(int(s) for s in shape)


def _canon_dim(dim, ndim):
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"dimension {dim} out of range for a tensor of {ndim} dimensions")
    return dim % n


def _check_size(shape, dtype):
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    nbytes = prod(shape) * dtype.itemsize
    if nbytes >= 1 << 46:
        raise MemoryError(f"cannot allocate a tensor of shape {shape} ({nbytes} bytes of {dtype.name})")


class Tensor:
    """A lazy n-dimensional array with torch's names and semantics. Ops build UOps; values appear on demand."""
    __slots__ = ("uop", "requires_grad", "grad", "_device", "_is_leaf", "__weakref__")
    __hash__ = object.__hash__
    __array_priority__ = 1000   # numpy scalars on the left defer to our operators

    def __init__(self, data, device=None, dtype=None, requires_grad=False):
        device = Device.canonicalize(device)
        if isinstance(data, Tensor):
            data = data.numpy()
        if isinstance(data, UOp):
            self.uop = data
        else:
            array = _to_numpy(data, None if dtype is None else to_dtype(dtype))
            _no_host_data_in_capture("Tensor(data)")
            dt = to_dtype(array.dtype)
            buf = Buffer(device, array.size, dt, exclusive=True).copyin(array)
            self.uop = UOp(Ops.BUFFER, dt, (), (buf, 0)).reshape(array.shape)
        self._device, self.grad, self.requires_grad, self._is_leaf = device, None, False, True
        if requires_grad:
            self.requires_grad_(True)

    @staticmethod
    def _wrap(uop: UOp, device: str, requires_grad=False) -> Tensor:
        out = Tensor.__new__(Tensor)
        out.uop, out._device, out.grad, out._is_leaf = uop, device, None, not requires_grad
        out.requires_grad = requires_grad
        return out

    def _new(self, uop: UOp, *inputs: Tensor) -> Tensor:
        """The result of an op on self and inputs: gradients flow only if enabled and some input wants them."""
        wants_grad = self.requires_grad or any(t.requires_grad for t in inputs)
        if wants_grad and not CTX.grad_enabled:
            uop, wants_grad = UOp(Ops.DETACH, uop.dtype, (uop,)), False
        return Tensor._wrap(uop, self._device, wants_grad)

    # -- properties
    @property
    def shape(self):
        return self.uop.shape

    @property
    def dtype(self):
        return self.uop.dtype

    @property
    def device(self):
        return self._device

    @property
    def ndim(self):
        return len(self.uop.shape)

    def dim(self):
        return self.ndim

    def numel(self):
        return prod(self.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[_canon_dim(dim, self.ndim)]

    @property
    def is_leaf(self):
        return self._is_leaf

    def requires_grad_(self, flag=True) -> Tensor:
        if flag and not self.dtype.is_float:
            raise RuntimeError(f"only float tensors can require gradients, this one is {self.dtype.name}")
        if flag and self._is_leaf:
            # a leaf needs a node of its own: two lazy zeros() would otherwise be the same hash-consed node
            self.realize()
            _GRAD_LEAVES[self] = None
        self.requires_grad = flag
        return self

    def __repr__(self):
        if CTX.capturing is not None:
            return f"<Tensor {self.shape} {self.dtype.name} on {self.device} (traced)>"
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.numpy(), separator=', ')}, device={self.device!r}{grad})"

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self):
        if self.numel() != 1:
            raise RuntimeError(f"the truth value of a tensor with {self.numel()} elements is ambiguous")
        return bool(self.item())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if self.dtype is not int32 or self.numel() != 1:
            raise TypeError("only single-element int tensors can be used as an index")
        return int(self.item())

    # -- realization and data out
    def _is_view(self):
        """True if this tensor is a movement view of memory that already exists (no kernel needed)."""
        base = self.uop.base()
        return base.op is Ops.BUFFER or base.realized is not None or base.op in (Ops.CONST, Ops.IOTA)

    def _buffer(self):
        """The Buffer if this tensor is exactly a buffer (contiguous, whole), else None."""
        uop = self.uop
        if uop.op is Ops.ASSIGN:
            if uop.assigned is None:
                return None
            uop = uop.assigned
        if uop.realized is not None:
            return uop.realized
        if uop.op is Ops.RESHAPE:
            uop = uop.src[0]
        if uop.op is Ops.BUFFER and uop.arg[1] == uop.arg[0].version:
            return uop.arg[0]
        return None

    def realize(self) -> Tensor:
        """Compute this tensor now (with everything it depends on) into a buffer of its own."""
        realize(self)
        return self

    def _realized_buffer(self):
        """The Buffer holding this tensor, computed first if it is not one yet."""
        buf = self._buffer()
        if buf is None:
            realize(self)
            buf = self._buffer()
        return buf

    def numpy(self) -> np.ndarray:
        _no_readback_in_capture("Tensor.numpy()")
        buf = self._realized_buffer()
        Device[self.device].synchronize()
        return buf.copyout().reshape(self.shape)

    def numpy_later(self):
        """Start copying the tensor to the host behind the work queued so far, and return a function that waits
        for that copy alone and returns the array. Work queued after the call keeps the device busy meanwhile: a
        decoding loop reads step t's token while step t + 1, fed that token on the device, runs."""
        _no_readback_in_capture("Tensor.numpy_later()")
        buf = self._realized_buffer()
        out = np.empty(buf.size, dtype=buf.dtype.np)
        wait = Device[self.device].copyout_later(out, buf.mem)
        shape = self.shape

        def result() -> np.ndarray:
            wait()
            return out.reshape(shape)
        return result

    def item(self):
        _no_readback_in_capture("Tensor.item()")
        if self.numel() != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def to(self, device) -> Tensor:
        """A copy on `device` (the same tensor if it is already there)."""
        device = Device.canonicalize(device)
        if device == self.device:
            return self
        out = self._new(UOp(Ops.COPY, self.dtype, (self.uop,), device))
        out._device = device
        return out

    def cpu(self):
        return self.to("CPU")

    def cuda(self, index=0):
        return self.to(f"CUDA:{index}")

    @_public
    def contiguous(self) -> Tensor:
        return self if self._buffer() is not None else self._new(UOp(Ops.CONTIGUOUS, self.dtype, (self.uop,)))

    def detach(self) -> Tensor:
        return Tensor._wrap(UOp(Ops.DETACH, self.dtype, (self.uop,)) if self.requires_grad else self.uop, self.device)

    @_public
    def clone(self) -> Tensor:
        return self._new(UOp(Ops.CONTIGUOUS, self.dtype, (UOp(Ops.DETACH, self.dtype, (self.uop,)),)))

    def assign(self, value) -> Tensor:
        """Write value into this tensor's memory (lazily; the write happens with the next realize)."""
        if not isinstance(value, Tensor):
            value = Tensor.full(self.shape, value, dtype=self.dtype, device=self.device)
        if value.shape != self.shape:
            value = value.expand(self.shape) if _broadcastable(value.shape, self.shape) else _shape_error(
                "assign", self.shape, value.shape)
        if value.device != self.device:
            raise RuntimeError(f"assign from {value.device} into a tensor on {self.device}")
        if self.requires_grad and not self._is_leaf and CTX.grad_enabled:
            raise RuntimeError("assign() to a tensor that is part of a gradient graph")
        self._check_writes_through("assign()")
        self._make_buffer_view()
        self.uop = UOp(Ops.ASSIGN, self.dtype, (self.uop, value.uop.cast(self.dtype)))
        _note_written(self)
        if CTX.eager:
            realize(self)
        else:
            _PENDING_ASSIGNS[id(self)] = self
        return self

    def __setitem__(self, index, value):
        """`t[a:b, i] = value` writes the region now, in place (basic indexing: ints and unit-step slices)."""
        if self.requires_grad and CTX.grad_enabled:
            raise RuntimeError("in-place assignment to a tensor that requires grad; use pg.no_grad()")
        self._check_writes_through("setitem")
        self._make_buffer_view()
        region = self._view_for_setitem(index)
        value = value if isinstance(value, Tensor) else Tensor.full(region.shape, value, dtype=self.dtype,
                                                                    device=self.device)
        if value.device != self.device:
            raise RuntimeError(f"setitem from {value.device} into a tensor on {self.device}")
        if value.shape != region.shape:
            if not _broadcastable(value.shape, region.shape):
                _shape_error("setitem", region.shape, value.shape)
            value = value.expand(region.shape)
        write = UOp(Ops.ASSIGN, self.dtype, (region.uop, value.uop.cast(self.dtype)))
        _realize_uops([write], [self.device])
        self.uop = write.assigned.base().reshape(self.shape)
        _note_written(self)

    def _check_writes_through(self, what: str):
        """A write into a view of part of a buffer (or a permuted one) would land in a copy of the view, leaving the
        tensor it views unchanged, where torch writes through: refused, with what to do instead."""
        if self.uop.op in MOVEMENT and self.uop.base().op is Ops.BUFFER and self._buffer() is None:
            raise RuntimeError(f"{what} into a view ({self.uop.op.name.lower()}, shape {self.shape}) of another "
                               f"tensor would not write through to it: write the tensor it views, a region of it with "
                               f"t[a:b] = value, or assign the whole tensor")

    def _make_buffer_view(self):
        """Make self.uop a plain view of a buffer this tensor may write (the target an in-place write needs).
        A kernel output may be shared by every equal computation (nodes are hash-consed), so writing needs a copy
        of its own first."""
        buf = self._realized_buffer()
        if not buf.exclusive:
            own = Buffer(buf.device, buf.size, buf.dtype, exclusive=True)
            import compile as compiler
            compiler.copy_buffer(own, buf)
            buf = own
        self.uop = UOp(Ops.BUFFER, self.dtype, (), (buf, buf.version)).reshape(self.shape)

    # -- creation
    @staticmethod
    def full(shape, value, dtype=None, device=None, requires_grad=False) -> Tensor:
        shape = _shape_arg((shape,)) if not isinstance(shape, int) else (shape,)
        dtype = to_dtype(dtype) if dtype is not None else (
            bool_ if isinstance(value, bool) else int32 if isinstance(value, int) else float32)
        _check_size(shape, dtype)
        out = Tensor._wrap(UOp.const(value, dtype, shape), Device.canonicalize(device))
        return out.requires_grad_(True) if requires_grad else out

    @staticmethod
    def zeros(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
        return Tensor.full(_shape_arg(shape), 0.0, dtype or float32, device, requires_grad)

    @staticmethod
    def ones(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
        return Tensor.full(_shape_arg(shape), 1.0, dtype or float32, device, requires_grad)

    @staticmethod
    def empty(*shape, dtype=None, device=None) -> Tensor:
        shape, dtype, device = _shape_arg(shape), to_dtype(dtype or float32), Device.canonicalize(device)
        _check_size(shape, dtype)
        buf = Buffer(device, prod(shape), dtype, exclusive=True)
        return Tensor._wrap(UOp(Ops.BUFFER, dtype, (), (buf, 0)).reshape(shape), device)

    @staticmethod
    def arange(start, stop=None, step=1, dtype=None, device=None) -> Tensor:
        if stop is None:
            start, stop = 0, start
        is_int = all(isinstance(v, int) for v in (start, stop, step))
        dtype = to_dtype(dtype) if dtype is not None else (int32 if is_int else float32)
        if step == 0:
            raise ValueError("arange step must be nonzero")
        n = max(0, math.ceil((stop - start) / step))
        iota = Tensor._wrap(UOp(Ops.IOTA, int32, (), n), Device.canonicalize(device))
        if is_int:
            return (iota * step + start).cast(dtype)
        return (iota.cast(float32) * float(step) + float(start)).cast(dtype)

    @staticmethod
    def eye(n, m=None, dtype=None, device=None) -> Tensor:
        m = n if m is None else m
        rows = Tensor.arange(n, device=device).reshape(n, 1)
        cols = Tensor.arange(m, device=device).reshape(1, m)
        return (rows == cols).cast(to_dtype(dtype or float32))

    @staticmethod
    def rand(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
        _no_host_data_in_capture("pg.rand")
        data = _rng.random(_shape_arg(shape), dtype=np.float32)
        return Tensor(data, device=device, dtype=dtype, requires_grad=requires_grad)

    @staticmethod
    def randn(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
        _no_host_data_in_capture("pg.randn")
        data = _rng.standard_normal(_shape_arg(shape), dtype=np.float32)
        return Tensor(data, device=device, dtype=dtype, requires_grad=requires_grad)

    @staticmethod
    def randint(low, high=None, size=(), dtype=None, device=None) -> Tensor:
        _no_host_data_in_capture("pg.randint")
        if high is None:
            low, high = 0, low
        data = _rng.integers(low, high, size=_shape_arg((size,)) if not isinstance(size, int) else (size,))
        return Tensor(data.astype(np.int32), device=device, dtype=dtype or int32)

    @staticmethod
    def uniform(*shape, low=0.0, high=1.0, device=None, requires_grad=False) -> Tensor:
        _no_host_data_in_capture("pg.uniform")
        data = _rng.uniform(low, high, _shape_arg(shape)).astype(np.float32)
        return Tensor(data, device=device, requires_grad=requires_grad)

    def zeros_like(self, **kw):
        return Tensor.full(self.shape, 0, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device))

    def ones_like(self, **kw):
        return Tensor.full(self.shape, 1, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device))

    def full_like(self, value, **kw):
        return Tensor.full(self.shape, value, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device))

    # -- movement: views, no copies
    @_public
    def reshape(self, *shape) -> Tensor:
        shape = _shape_arg(shape)
        if shape.count(-1) > 1:
            raise ValueError(f"only one dimension can be -1 in reshape {shape}")
        if -1 in shape:
            known = prod(s for s in shape if s != -1)
            if known == 0 or self.numel() % known:
                raise ValueError(f"cannot reshape tensor of shape {self.shape} into {shape}")
            shape = tuple(self.numel() // known if s == -1 else s for s in shape)
        if prod(shape) != self.numel() or any(s < 0 for s in shape):
            raise ValueError(f"cannot reshape tensor of shape {self.shape} into {shape}")
        return self._new(self.uop.reshape(shape))

    def view(self, *shape) -> Tensor:
        return self.reshape(*shape)

    @_public
    def permute(self, *dims) -> Tensor:
        dims = tuple(_canon_dim(d, self.ndim) for d in _shape_arg(dims))
        dims = tuple(_canon_dim(d, self.ndim) for d in dims)
        if sorted(dims) != list(range(self.ndim)):
            raise ValueError(f"permute dims {dims} are not a permutation of {self.ndim} dimensions")
        return self._new(self.uop.permute(dims))

    def transpose(self, dim0=-2, dim1=-1) -> Tensor:
        order = list(range(self.ndim))
        a, b = _canon_dim(dim0, self.ndim), _canon_dim(dim1, self.ndim)
        order[a], order[b] = order[b], order[a]
        return self.permute(order)

    @property
    def T(self) -> Tensor:
        return self.permute(tuple(reversed(range(self.ndim))))

    @property
    def mT(self) -> Tensor:
        return self.transpose(-2, -1)

    @_public
    def expand(self, *shape) -> Tensor:
        shape = _shape_arg(shape)
        if len(shape) < self.ndim:
            raise ValueError(f"cannot expand shape {self.shape} to {shape}")
        padded = (1,) * (len(shape) - self.ndim) + self.shape
        new = tuple(p if s == -1 else s for s, p in zip(shape, padded))
        if any(p != s and p != 1 for p, s in zip(padded, new)):
            raise ValueError(f"cannot expand shape {self.shape} to {shape}")
        return self._new(self.uop.reshape(padded).expand(new))

    def expand_as(self, other):
        return self.expand(other.shape)

    def squeeze(self, dim=None) -> Tensor:
        if dim is None:
            return self.reshape(tuple(s for s in self.shape if s != 1))
        dims = {_canon_dim(d, self.ndim) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        return self.reshape(tuple(s for i, s in enumerate(self.shape) if not (i in dims and s == 1)))

    def unsqueeze(self, dim) -> Tensor:
        dim = _canon_dim(dim, self.ndim + 1)
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def flatten(self, start_dim=0, end_dim=-1) -> Tensor:
        if self.ndim == 0:
            return self.reshape(1)
        a, b = _canon_dim(start_dim, self.ndim), _canon_dim(end_dim, self.ndim)
        return self.reshape(self.shape[:a] + (prod(self.shape[a:b + 1]),) + self.shape[b + 1:])

    def unflatten(self, dim, sizes) -> Tensor:
        dim = _canon_dim(dim, self.ndim)
        return self.reshape(self.shape[:dim] + tuple(sizes) + self.shape[dim + 1:])

    @_public
    def shrink(self, bounds) -> Tensor:
        """Keep [lo, hi) of each dimension (None keeps all); bounds may be Variables."""
        bounds = tuple((0, s) if b is None else b for b, s in zip(bounds, self.shape))
        for (lo, hi), s in zip(bounds, self.shape):
            lo_min = lo.bounds()[0] if isinstance(lo, Variable) else lo
            hi_max = hi.bounds()[1] if isinstance(hi, Variable) else hi
            if lo_min < 0 or hi_max > s or _as_int(hi - lo) < 0:
                raise IndexError(f"slice [{lo}, {hi}) out of range for a dimension of size {s}")
        return self._new(self.uop.shrink(bounds))

    @_public
    def pad(self, pads, value=0.0) -> Tensor:
        """torch.nn.functional.pad: pads = (last_lo, last_hi, second_last_lo, ...); negative pads crop."""
        if len(pads) % 2 or len(pads) // 2 > self.ndim:
            raise ValueError(f"pad needs an even number of entries, at most 2 per dimension, got {pads}")
        pairs = [(0, 0)] * self.ndim
        for i in range(len(pads) // 2):
            pairs[self.ndim - 1 - i] = (pads[2 * i], pads[2 * i + 1])
        crop = [(-min(lo, 0), s + min(hi, 0)) for (lo, hi), s in zip(pairs, self.shape)]
        x = self.shrink(crop) if any(lo < 0 or hi < 0 for lo, hi in pairs) else self
        grow = tuple((max(lo, 0), max(hi, 0)) for lo, hi in pairs)
        out = x._new(x.uop.pad(grow))
        if value != 0:
            inside = Tensor._wrap(UOp.const(True, bool_, x.shape).pad(grow), self.device)
            out = where(inside, out, value)
        return out

    @_public
    def flip(self, dims) -> Tensor:
        dims = (dims,) if isinstance(dims, int) else dims
        return self._new(self.uop.flip({_canon_dim(d, self.ndim) for d in dims}))

    def split(self, split_size, dim=0):
        dim = _canon_dim(dim, self.ndim)
        n = self.shape[dim]
        if isinstance(split_size, int):
            sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
        else:
            sizes = list(split_size)
        if sum(sizes) != n:
            raise ValueError(f"split sizes {sizes} do not add up to {n} (dimension {dim} of {self.shape})")
        outs, start = [], 0
        for size in sizes:
            outs.append(self.shrink([(start, start + size) if i == dim else None for i in range(self.ndim)]))
            start += size
        return tuple(outs)

    def chunk(self, chunks, dim=0):
        n = self.shape[_canon_dim(dim, self.ndim)]
        return self.split(max(1, math.ceil(n / chunks)), dim)

    def repeat(self, *repeats) -> Tensor:
        repeats = _shape_arg(repeats)
        x = self.reshape((1,) * (len(repeats) - self.ndim) + self.shape)
        expanded = x.reshape(sum(((1, s) for s in x.shape), ())).expand(sum(zip(repeats, x.shape), ()))
        return expanded.reshape(tuple(r * s for r, s in zip(repeats, x.shape)))

    def tril(self, diagonal=0) -> Tensor:
        return where(_triangle_mask(self, diagonal, lower=True), self, 0)

    def triu(self, diagonal=0) -> Tensor:
        return where(_triangle_mask(self, diagonal, lower=False), self, 0)

    # -- indexing
    def _normalize_index(self, index):
        index = index if isinstance(index, tuple) else (index,)
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        if n_real > self.ndim:
            raise IndexError(f"too many indices ({n_real}) for a tensor of {self.ndim} dimensions")
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis")
        at = next((k for k, i in enumerate(index) if i is Ellipsis), None)
        if at is not None:
            index = index[:at] + (slice(None),) * (self.ndim - n_real) + index[at + 1:]
        return index + (slice(None),) * (self.ndim - sum(1 for i in index if i is not None))

    def _view_for_setitem(self, index):
        # an alias that builds no gradient graph: the target of the write must be a plain view of the buffer
        x = Tensor._wrap(self.uop, self.device)
        dim = 0
        for i in self._normalize_index(index):
            if isinstance(i, (int, np.integer, Variable)) and not isinstance(i, bool):
                n = x.shape[dim]
                if isinstance(i, (int, np.integer)) and not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {n}")
                i = i % n if isinstance(i, (int, np.integer)) else i
                x = x.shrink([(i, i + 1) if d == dim else None for d in range(x.ndim)])
                x = x.reshape(x.shape[:dim] + x.shape[dim + 1:])
            elif isinstance(i, slice):
                start, stop, step = _slice_bounds(i, x.shape[dim])
                if step != 1:
                    raise NotImplementedError("assignment to a strided slice is not supported")
                x = x.shrink([(start, stop) if d == dim else None for d in range(x.ndim)])
                dim += 1
            else:
                raise NotImplementedError(f"assignment through index {i!r}: use ints and unit-step slices")
        return x

    @_public
    def __getitem__(self, index) -> Tensor:
        index = self._normalize_index(index)
        has_tensor = any(isinstance(i, (Tensor, list, np.ndarray)) for i in index)
        x, dim, tensor_dims, tensor_idx = self, 0, [], []
        for i in index:
            if i is None:
                x = x.unsqueeze(dim)
                dim += 1
            elif isinstance(i, (list, np.ndarray, Tensor)) or (has_tensor and isinstance(i, (int, np.integer))):
                idx = i if isinstance(i, Tensor) else Tensor(np.asarray(i), device=self.device)
                if idx.dtype is bool_:
                    raise NotImplementedError("boolean mask indexing is not supported; use pg.where")
                if idx.dtype is not int32:
                    raise IndexError(f"tensors used as indices must be int32, got {idx.dtype.name}")
                tensor_dims.append(dim)
                tensor_idx.append(idx)
                dim += 1
            elif isinstance(i, (int, np.integer)) and not isinstance(i, bool):
                n = x.shape[dim]
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {n}")
                x = x.shrink([((i % n), (i % n) + 1) if d == dim else None for d in range(x.ndim)])
                x = x.reshape(x.shape[:dim] + x.shape[dim + 1:])
            elif isinstance(i, Variable):
                x = x.shrink([(i, i + 1) if d == dim else None for d in range(x.ndim)])
                x = x.reshape(x.shape[:dim] + x.shape[dim + 1:])
            elif isinstance(i, slice):
                x = _slice(x, dim, i)
                dim += 1
            else:
                raise IndexError(f"unsupported index {i!r}")
        return _advanced_index(x, tensor_dims, tensor_idx) if tensor_dims else x

    @_public
    def gather(self, dim, index) -> Tensor:
        """torch.gather: out[..., j, ...] = self[..., index[..., j, ...], ...] along dim; index has self's shape
        except (possibly) at dim. A bounds-checked one-hot over dim that the compiler turns into a direct load;
        its gradient is a reduction over index's extent at dim only (no scatter)."""
        if not isinstance(index, Tensor) or index.dtype is not int32:
            raise IndexError("gather needs an int32 index tensor")
        dim = _canon_dim(dim, self.ndim)
        if index.ndim != self.ndim or any(i != s for d, (i, s) in enumerate(zip(index.shape, self.shape)) if d != dim):
            raise ValueError(f"gather: index of shape {index.shape} does not match {self.shape} outside dim {dim}")
        n = self.shape[dim]
        x = self.transpose(dim, -1).unsqueeze(-2)                            # [..., 1, n]
        wrapped = where(index < 0, index + n, index)
        checked = Tensor._wrap(UOp(Ops.CHECK, int32, (wrapped.uop,), n), self.device)
        idx = checked.transpose(dim, -1).unsqueeze(-1)                      # [..., k, 1]
        iota = Tensor.arange(n, device=self.device)                          # [n]
        picked = where(idx == iota, x, 0).sum(-1)                            # [..., k]
        return picked.transpose(dim, -1)

    # -- elementwise
    def _binary_operands(self, other, reverse=False):
        if isinstance(other, Variable):
            other = Tensor._wrap(other.uop(), self.device)
        if not isinstance(other, Tensor):
            if isinstance(other, (np.ndarray, list)):
                other = Tensor(other, device=self.device)
            else:
                other = _scalar_like(self, other)
        elif other.device != self.device:
            raise RuntimeError(f"expected all tensors on the same device, found {self.device} and {other.device}")
        a, b = (other, self) if reverse else (self, other)
        dtype = _promote(a.dtype, b.dtype)
        a, b = a.cast(dtype), b.cast(dtype)
        shape = _broadcast_shape(a.shape, b.shape)
        return a._broadcast_to(shape), b._broadcast_to(shape)

    def _broadcast_to(self, shape):
        if self.shape == shape:
            return self
        padded = (1,) * (len(shape) - self.ndim) + self.shape
        return self._new(self.uop.reshape(padded).expand(shape))

    def _alu(self, op, *others):
        return self._new(self.uop.alu(op, *(o.uop for o in others)), *others)

    @_public
    def add(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        return a._alu(Ops.ADD, b)

    @_public
    def sub(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        if a.dtype is bool_:
            raise TypeError("subtraction of bool tensors is not supported")
        return a._alu(Ops.ADD, b._alu(Ops.NEG))

    @_public
    def mul(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        return a._alu(Ops.MUL, b)

    @_public
    def div(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        a, b = a.float(), b.float()
        return a._alu(Ops.MUL, b._alu(Ops.RECIP))

    @_public
    def floordiv(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        if a.dtype.is_float:
            return (a / b).floor()
        # C truncates toward zero; Python and torch round toward negative infinity
        q, r = a._alu(Ops.IDIV, b), a._alu(Ops.MOD, b)
        adjust = (r != 0) & ((r < 0) != (b < 0))
        return where(adjust, q - 1, q)

    @_public
    def mod(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        if a.dtype.is_float:
            return a - (a / b).floor() * b
        r = a._alu(Ops.MOD, b)
        return where((r != 0) & ((r < 0) != (b < 0)), r + b, r)

    @_public
    def pow(self, exponent, reverse=False):
        if not reverse and isinstance(exponent, (int, float)) and not isinstance(exponent, bool):
            return _pow_scalar(self, exponent)
        base, exp = self._binary_operands(exponent, reverse)
        base, exp = base.float(), exp.float()
        magnitude = (exp * base.abs().log2()).exp2()
        # a negative base is fine for integral exponents (sign from parity) and NaN otherwise, as in torch
        exp_is_int = exp == exp.floor()
        odd = exp_is_int & ((exp * 0.5) != (exp * 0.5).floor())
        signed = where(odd & (base < 0), -magnitude, magnitude)
        return where((base < 0) & ~exp_is_int, float("nan"), signed)

    def __add__(self, other):
        return self.add(other)

    def __radd__(self, other):
        return self.add(other, True)

    def __sub__(self, other):
        return self.sub(other)

    def __rsub__(self, other):
        return self.sub(other, True)

    def __mul__(self, other):
        return self.mul(other)

    def __rmul__(self, other):
        return self.mul(other, True)

    def __truediv__(self, other):
        return self.div(other)

    def __rtruediv__(self, other):
        return self.div(other, True)

    def __floordiv__(self, other):
        return self.floordiv(other)

    def __rfloordiv__(self, other):
        return self.floordiv(other, True)

    def __mod__(self, other):
        return self.mod(other)

    def __pow__(self, other):
        return self.pow(other)

    def __rpow__(self, other):
        return self.pow(other, True)

    def __matmul__(self, other):
        return self.matmul(other)

    def __rmatmul__(self, other):
        return Tensor(other, device=self.device).matmul(self) if not isinstance(other, Tensor) else other.matmul(self)

    def __neg__(self):
        return self.neg()

    def __abs__(self):
        return self.abs()

    def __lt__(self, other):
        return self.lt(other)

    def __gt__(self, other):
        return self.gt(other)

    def __le__(self, other):
        return self.le(other)

    def __ge__(self, other):
        return self.ge(other)

    def __eq__(self, other):
        return self.eq(other)

    def __ne__(self, other):
        return self.ne(other)

    def __and__(self, other):
        return self.logical_and(other)

    def __or__(self, other):
        return self.logical_or(other)

    def __invert__(self):
        return self.logical_not()

    @_public
    def lt(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        return a._alu(Ops.CMPLT, b)

    def gt(self, other):
        return self.lt(other, True)

    @_public
    def eq(self, other):
        a, b = self._binary_operands(other)
        return a._alu(Ops.CMPEQ, b)

    @_public
    def ne(self, other):
        return self.eq(other).logical_not()

    @_public
    def le(self, other, reverse=False):
        a, b = self._binary_operands(other, reverse)
        return a._alu(Ops.CMPLT, b)._alu(Ops.MAX, a._alu(Ops.CMPEQ, b))

    def ge(self, other):
        return self.le(other, True)

    @_public
    def logical_not(self):
        return self.bool()._alu(Ops.CMPEQ, _scalar_like(self.bool(), False))

    @_public
    def logical_and(self, other):
        a, b = self.bool()._binary_operands(other.bool() if isinstance(other, Tensor) else other)
        return where(a, b, False)

    @_public
    def logical_or(self, other):
        a, b = self.bool()._binary_operands(other.bool() if isinstance(other, Tensor) else other)
        return where(a, True, b)

    @_public
    def cast(self, dtype) -> Tensor:
        dtype = to_dtype(dtype)
        if dtype is self.dtype:
            return self
        if dtype is bool_:
            return self._alu(Ops.CMPEQ, _scalar_like(self, 0)).logical_not()
        return self._new(self.uop.cast(dtype))

    def float(self):
        return self.cast(float32)

    def int(self):
        return self.cast(int32)

    def bool(self):
        return self.cast(bool_)

    def type(self, dtype):
        return self.cast(dtype)

    @_public
    def neg(self):
        if self.dtype is bool_:
            raise TypeError("negation of a bool tensor: use ~ or logical_not()")
        return self._alu(Ops.NEG)

    @_public
    def reciprocal(self):
        return self.float()._alu(Ops.RECIP)

    @_public
    def exp(self):
        return (self.float() * (1 / math.log(2)))._alu(Ops.EXP2)

    @_public
    def exp2(self):
        return self.float()._alu(Ops.EXP2)

    @_public
    def log(self):
        return self.float()._alu(Ops.LOG2) * math.log(2)

    @_public
    def log2(self):
        return self.float()._alu(Ops.LOG2)

    @_public
    def sqrt(self):
        return self.float()._alu(Ops.SQRT)

    @_public
    def rsqrt(self):
        return self.float()._alu(Ops.SQRT)._alu(Ops.RECIP)

    @_public
    def sin(self):
        return self.float()._alu(Ops.SIN)

    @_public
    def cos(self):
        return (math.pi / 2 - self.float())._alu(Ops.SIN)

    @_public
    def tan(self):
        return self.sin() / self.cos()

    @_public
    def sigmoid(self):
        # from e = exp(-|x|), which never overflows: no inf anywhere, forward or backward
        x = self.float()
        positive = x >= 0
        e = where(positive, -x, x).exp()
        return where(positive, 1 / (1 + e), e / (1 + e))

    @_public
    def tanh(self):
        return 2 * (2 * self.float()).sigmoid() - 1

    @_public
    def relu(self):
        # relu(NaN) is NaN and its gradient at 0 is 0, as in torch
        return where(self > 0, self, where(self != self, self, 0))

    @_public
    def silu(self):
        return self * self.sigmoid()

    @_public
    def gelu(self, approximate="none"):
        x = self.float()
        if approximate == "tanh":
            return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())
        return 0.5 * x * (1 + (x * (1 / math.sqrt(2))).erf())

    @_public
    def erf(self):
        # Abramowitz and Stegun 7.1.26 refined (max abs error 1.2e-7): sign(x) * (1 - poly(t) * exp(-x^2))
        x = self.float()
        a = x.abs()
        t = 1 / (1 + 0.5 * a)
        poly = (-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
        ))))).exp()
        return x.sign() * (1 - t * poly)

    @_public
    def sign(self):
        one = _scalar_like(self, 1)
        return where(self > 0, one, where(self < 0, -one, self * 0))

    @_public
    def abs(self):
        return self * self.sign() if self.dtype.is_float else where(self < 0, -self, self)

    @_public
    def floor(self):
        if not self.dtype.is_float:
            return self
        # truncate through int32 (exact below 2**31), then step down for negative non-integers
        big = self.abs() >= 2.0 ** 31
        t = self.cast(int32).cast(float32)
        return where(big | (self != self), self, where(t > self, t - 1, t))

    @_public
    def ceil(self):
        return -(-self).floor()

    @_public
    def maximum(self, other):
        a, b = self._binary_operands(other)
        return a._alu(Ops.MAX, b)

    @_public
    def minimum(self, other):
        a, b = self._binary_operands(other)
        if a.dtype is bool_:
            return a & b
        return -((-a)._alu(Ops.MAX, -b))

    @_public
    def clamp(self, min=None, max=None):
        x = self
        if min is not None:
            x = x.maximum(min)
        if max is not None:
            x = x.minimum(max)
        return x

    clip = clamp

    @_public
    def where(self, x, y):
        return where(self, x, y)

    # -- reductions
    def _reduce_dims(self, dim):
        if dim is None:
            return tuple(range(self.ndim))
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return tuple(sorted({_canon_dim(d, self.ndim) for d in dims}))

    def _reduce(self, op, dim, keepdim):
        dims = self._reduce_dims(dim)
        if any(self.shape[d] == 0 for d in dims) and op is Ops.MAX:
            raise RuntimeError(f"max/min of an empty dimension (shape {self.shape})")
        n_reduced = prod(self.shape[d] for d in dims)
        if n_reduced >= SPLIT_REDUCE_AT and self.numel() // max(n_reduced, 1) <= 16:
            return self._reduce_in_two(op, dims, keepdim)
        out = self._new(_reduce_columns(self.uop, op, dims))
        if keepdim:
            return out
        return out.reshape(tuple(s for i, s in enumerate(self.shape) if i not in dims))

    def _reduce_in_two(self, op, dims, keepdim):
        """A huge reduction into a few outputs as two: SPLIT_GROUPS partial results (as many independent pieces of
        work, so every core or multiprocessor gets some) and then their combination."""
        keep = [d for d in range(self.ndim) if d not in dims]
        x = self.permute(keep + list(dims)).reshape(tuple(self.shape[d] for d in keep) + (-1,))
        n = x.shape[-1]
        per = -(-n // SPLIT_GROUPS)
        if per * SPLIT_GROUPS != n:   # pad with the reduction's identity
            identity = {Ops.ADD: 0, Ops.MAX: float("-inf") if self.dtype.is_float else -2**31, Ops.MIN: 2**31 - 1}
            x = x.pad((0, per * SPLIT_GROUPS - n), value=identity[op])
        parts = x.reshape(x.shape[:-1] + (SPLIT_GROUPS, per))._reduce(op, -1, False).contiguous()
        total = parts._reduce(op, -1, False)
        if keepdim:
            total = total.reshape(tuple(1 if d in dims else s for d, s in enumerate(self.shape)))
        return total

    @_public
    def sum(self, dim=None, keepdim=False, dtype=None):
        x = self.cast(dtype) if dtype is not None else (self.cast(int32) if self.dtype is bool_ else self)
        return x._reduce(Ops.ADD, dim, keepdim)

    @_public
    def mean(self, dim=None, keepdim=False):
        if not self.dtype.is_float:
            raise RuntimeError(f"mean of a {self.dtype.name} tensor: cast to float first")
        n = prod(self.shape[d] for d in self._reduce_dims(dim))
        return self.sum(dim, keepdim) * (1.0 / n if n else float("nan"))

    @_public
    def max(self, dim=None, keepdim=False):
        if self.dtype is bool_:
            return self.int().max(dim, keepdim).bool()
        return self._reduce(Ops.MAX, dim, keepdim)

    @_public
    def min(self, dim=None, keepdim=False):
        if self.dtype is bool_:
            return self.int().min(dim, keepdim).bool()
        if not self.dtype.is_float:
            # a reduction of its own: -max(-x) overflows at INT_MIN (and NVRTC 13.0 was seen miscompiling the
            # fused negate-then-max loop for ints)
            return self._reduce(Ops.MIN, dim, keepdim)
        return -((-self)._reduce(Ops.MAX, dim, keepdim))

    amax = max
    amin = min

    @_public
    def argmax(self, dim=None, keepdim=False):
        """Index of the first maximum, as in torch."""
        if dim is None:
            return self.reshape(-1).argmax(0, keepdim=False)
        dim = _canon_dim(dim, self.ndim)
        n = self.shape[dim]
        return self._first_index_of(self == self.max(dim, keepdim=True), dim, keepdim)

    @_public
    def argmin(self, dim=None, keepdim=False):
        """Index of the first minimum, as in torch."""
        if dim is None:
            return self.reshape(-1).argmin(0, keepdim=False)
        dim = _canon_dim(dim, self.ndim)
        return self._first_index_of(self == self.min(dim, keepdim=True), dim, keepdim)

    def _first_index_of(self, hit, dim, keepdim):
        """The first position along dim where hit is true: the largest of n, n-1, ... where it is."""
        n = self.shape[dim]
        reverse_index = Tensor.arange(n, 0, -1, device=self.device).reshape((n,) + (1,) * (self.ndim - dim - 1))
        return n - (where(hit, reverse_index, 0)).max(dim, keepdim)

    @_public
    def var(self, dim=None, keepdim=False, correction=1, unbiased=None):
        if unbiased is not None:
            correction = 1 if unbiased else 0
        n = prod(self.shape[d] for d in self._reduce_dims(dim))
        centered = self - self.mean(dim, keepdim=True)
        return (centered * centered).sum(dim, keepdim) * (1.0 / max(n - correction, 0) if n > correction else math.inf)

    @_public
    def std(self, dim=None, keepdim=False, correction=1, unbiased=None):
        return self.var(dim, keepdim, correction, unbiased).sqrt()

    @_public
    def logsumexp(self, dim=None, keepdim=False):
        m = self.max(dim, keepdim=True).detach()
        out = (self - m).exp().sum(dim, keepdim=True).log() + m
        return out if keepdim else out.squeeze(self._reduce_dims(dim))

    @_public
    def softmax(self, dim=-1):
        shifted = self - self.max(dim, keepdim=True).detach()
        e = shifted.exp()
        return e / e.sum(dim, keepdim=True)

    @_public
    def log_softmax(self, dim=-1):
        shifted = self - self.max(dim, keepdim=True).detach()
        return shifted - shifted.exp().sum(dim, keepdim=True).log()

    @_public
    def cumsum(self, dim=0):
        dim = _canon_dim(dim, self.ndim)
        n = self.shape[dim]
        x = self.transpose(dim, -1)
        mask = Tensor.arange(n, device=self.device).reshape(n, 1) <= Tensor.arange(n, device=self.device).reshape(1, n)
        out = (x.unsqueeze(-1) * mask.cast(x.dtype)).sum(-2)
        return out.transpose(dim, -1)

    # -- matrix products
    @_public
    def matmul(self, other) -> Tensor:
        if not isinstance(other, Tensor):
            other = Tensor(other, device=self.device)
        if self.ndim == 0 or other.ndim == 0:
            raise ValueError(f"matmul needs tensors of at least 1 dimension, got {self.shape} and {other.shape}")
        x = self.unsqueeze(0) if self.ndim == 1 else self
        w = other.unsqueeze(-1) if other.ndim == 1 else other
        if x.shape[-1] != w.shape[-2]:
            raise ValueError(f"matmul shape mismatch: {self.shape} @ {other.shape} "
                             f"({x.shape[-1]} != {w.shape[-2]})")
        batch = _broadcast_shape(x.shape[:-2], w.shape[:-2])
        m, k, n = x.shape[-2], x.shape[-1], w.shape[-1]
        pieces = _split_depth(m, n, k, prod(batch), getattr(Device[self.device], "sm_count", 0))
        if pieces > 1:
            # split-K: the pieces' products as one batched product [pieces, ..., m, n], then their sum (both
            # operands get every batch dim first, so that the pieces' dim lines up)
            x = x.reshape((1,) * (len(batch) + 2 - x.ndim) + x.shape)
            w = w.reshape((1,) * (len(batch) + 2 - w.ndim) + w.shape)
            x = x.reshape(x.shape[:-1] + (pieces, k // pieces))
            x = x.permute([x.ndim - 2] + list(range(x.ndim - 2)) + [x.ndim - 1])
            w = w.reshape(w.shape[:-2] + (pieces, k // pieces, n))
            w = w.permute([w.ndim - 3] + list(range(w.ndim - 3)) + [w.ndim - 2, w.ndim - 1])
        # [..., m, 1, k] * [..., 1, n, k] summed over k: the product broadcasts batch dims in one step, so the
        # gradient of each operand is a single reduction (over batch and the other side's rows at once)
        xb = x.unsqueeze(-2)
        wb = w.transpose(-1, -2).unsqueeze(-3)
        out = (xb * wb).sum(-1)
        if pieces > 1:
            out = out.contiguous().sum(0)
        if self.ndim == 1:
            out = out.squeeze(-2)
        if other.ndim == 1:
            out = out.squeeze(-1)
        return out

    dot = matmul

    def linear(self, weight, bias=None):
        out = self @ weight.T
        return out + bias if bias is not None else out

    # -- autograd
    def backward(self, gradient=None):
        """Accumulate d(self)/d(leaf) into .grad of every leaf that requires grad; realizes self and the grads."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no leaf with requires_grad "
                               "took part in computing it)")
        if gradient is None:
            if self.numel() != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, this tensor has shape {self.shape}")
            gradient = Tensor.full(self.shape, 1.0, device=self.device)
        elif gradient.shape != self.shape:
            _shape_error("backward gradient", self.shape, gradient.shape)
        leaves = [t for t in list(_GRAD_LEAVES) if t.requires_grad]
        grads = _gradients(self.uop, gradient.uop, [t.uop for t in leaves], self.device)
        touched = []
        for leaf, g in zip(leaves, grads):
            if g is None:
                continue
            g = Tensor._wrap(g, leaf.device)
            leaf.grad = g if leaf.grad is None else Tensor._wrap(leaf.grad.uop.alu(Ops.ADD, g.uop), leaf.device)
            touched.append(leaf.grad)
        realize(self, *touched)


def _to_numpy(data, dtype):
    if isinstance(data, np.ndarray):
        array = data
    elif isinstance(data, (bool, int, float, np.generic)):
        array = np.array(data)
    elif isinstance(data, (list, tuple)):
        array = np.array([x.numpy() if isinstance(x, Tensor) else x for x in data]) if data else np.zeros(0)
    else:
        raise TypeError(f"cannot make a tensor from {type(data).__name__}")
    if array.dtype == object:
        raise TypeError("cannot make a tensor from ragged or mixed data")
    if dtype is None:
        dtype = to_dtype(array.dtype)
    if dtype is int32 and array.dtype.kind in "iu" and array.size and (array.max() > 2**31 - 1 or array.min() < -2**31):
        raise OverflowError("integer data does not fit in int32")
    # np.ascontiguousarray would turn a 0-d array into a 1-d one
    array = np.asarray(array, dtype=dtype.np)
    return array if array.flags.c_contiguous else array.copy()


def _scalar_like(t: Tensor, value) -> Tensor:
    if isinstance(value, bool):
        dtype = t.dtype
    elif isinstance(value, (int, np.integer)):
        dtype = t.dtype if t.dtype is not bool_ else int32
    elif isinstance(value, (float, np.floating)):
        dtype = float32
    else:
        raise TypeError(f"unsupported operand type {type(value).__name__} for a tensor")
    return Tensor._wrap(UOp.const(value, dtype), t.device)


def _promote(a: DType, b: DType) -> DType:
    if a is b:
        return a
    if a.is_float or b.is_float:
        return float32
    return int32


def _broadcastable(src, dst):
    return len(src) <= len(dst) and all(s == 1 or s == d for s, d in zip(reversed(src), reversed(dst)))


def _broadcast_shape(a, b):
    n = max(len(a), len(b))
    pa, pb = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(pa, pb):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shapes {tuple(a)} and {tuple(b)} cannot be broadcast together")
        out.append(y if x == 1 else x)
    return tuple(out)


def _shape_error(what, expected, found):
    raise ValueError(f"{what}: shape mismatch, expected {expected}, found {found}")


def _pow_scalar(x: Tensor, exponent):
    if exponent == 0:
        return x.ones_like(dtype=float32 if isinstance(exponent, float) else x.dtype)
    if exponent == 0.5:
        return x.sqrt()
    if exponent == -0.5:
        return x.rsqrt()
    if float(exponent).is_integer() and abs(exponent) <= 8:
        n = int(abs(exponent))
        out, base = None, x.float() if isinstance(exponent, float) or exponent < 0 else x
        for _ in range(n):
            out = base if out is None else out * base
        return out.reciprocal() if exponent < 0 else out
    return x.float().pow(Tensor.full((), float(exponent), device=x.device))


def _slice_bounds(s: slice, n: int):
    step = 1 if s.step is None else s.step
    if step == 0:
        raise ValueError("slice step cannot be zero")
    start, stop, step = s.indices(n) if not isinstance(s.start, Variable) and not isinstance(s.stop, Variable) \
        else (s.start if s.start is not None else 0, s.stop if s.stop is not None else n, step)
    return start, stop, step


def _slice(x: Tensor, dim: int, s: slice) -> Tensor:
    n = x.shape[dim]
    start, stop, step = _slice_bounds(s, n)
    if step < 0:
        raise ValueError("negative slice steps are not supported (as in torch); use flip()")
    if not isinstance(start, Variable) and not isinstance(stop, Variable):
        stop = max(stop, start)
    x = x.shrink([(start, stop) if d == dim else None for d in range(x.ndim)])
    if step == 1:
        return x
    # every step-th element: pad to a multiple of step, split the axis in two and keep column 0
    length = x.shape[dim]
    count = -(-length // step)
    x = x.pad(_pad_arg(x.ndim, dim, 0, count * step - length))
    x = x.reshape(x.shape[:dim] + (count, step) + x.shape[dim + 1:])
    x = x.shrink([(0, 1) if d == dim + 1 else None for d in range(x.ndim)])
    return x.reshape(x.shape[:dim + 1] + x.shape[dim + 2:])


def _pad_arg(ndim, dim, lo, hi):
    """The torch-order pad tuple that pads only `dim`."""
    pads = [0, 0] * (ndim - dim)
    pads[-2], pads[-1] = lo, hi
    return tuple(pads)


def _advanced_index(x: Tensor, dims, indices):
    """Integer-tensor indexing (numpy/torch semantics) as a bounds-checked one-hot reduction: the compiler turns
    it into a direct load, and autograd gets the scatter-add gradient for free."""
    shape = functools.reduce(_broadcast_shape, [i.shape for i in indices], ())
    linear = None
    for dim, idx in zip(dims, indices):
        n = x.shape[dim]
        wrapped = where(idx < 0, idx + n, idx)
        checked = Tensor._wrap(UOp(Ops.CHECK, int32, (wrapped.uop,), n), x.device)._broadcast_to(shape)
        linear = checked if linear is None else linear * n + checked
    adjacent = dims == list(range(dims[0], dims[0] + len(dims)))
    # bring the indexed dims together at `first`, flatten them into one of size prod(n)
    first = dims[0] if adjacent else 0
    rest = [d for d in range(x.ndim) if d not in dims]
    order = rest[:first] + list(dims) + rest[first:]
    x = x.permute(order)
    n_total = prod(x.shape[first:first + len(dims)])
    x = x.reshape(x.shape[:first] + (n_total,) + x.shape[first + len(dims):])
    pre, post = x.shape[:first], x.shape[first + 1:]
    k = len(shape)
    # value[pre..., idx..., n, post...] and onehot[idx..., n] -> sum over n
    xv = x.reshape(pre + (1,) * k + (n_total,) + post).expand(pre + shape + (n_total,) + post)
    iota = Tensor.arange(n_total, device=x.device).reshape((1,) * len(pre) + (1,) * k + (n_total,) + (1,) * len(post))
    lin = linear.reshape((1,) * len(pre) + shape + (1,) + (1,) * len(post))
    onehot = lin == iota
    picked = where(onehot, xv, 0)
    return picked.sum(len(pre) + k)


def _triangle_mask(x: Tensor, diagonal, lower):
    rows, cols = x.shape[-2], x.shape[-1]
    r = Tensor.arange(rows, device=x.device).reshape(rows, 1)
    c = Tensor.arange(cols, device=x.device).reshape(1, cols)
    return (c <= r + diagonal) if lower else (c >= r + diagonal)


# ----------------------------------------------------------------------------------------------------------------------
# Functions over several tensors


def where(cond, x, y) -> Tensor:
    """Elementwise cond ? x : y with broadcasting; cond is cast to bool."""
    ref = next(t for t in (cond, x, y) if isinstance(t, Tensor))
    cond = cond if isinstance(cond, Tensor) else Tensor.full((), cond, dtype=bool_, device=ref.device)
    cond = cond.bool()
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
        x = Tensor.full((), x, device=cond.device)
    # promote the two branches together (a Python number takes the other branch's dtype)
    if isinstance(x, Tensor):
        x, y = x._binary_operands(y)
    else:
        y, x = y._binary_operands(x)
    shape = _broadcast_shape(cond.shape, x.shape)
    cond, x, y = cond._broadcast_to(shape), x._broadcast_to(shape), y._broadcast_to(shape)
    if cond.device != x.device:
        raise RuntimeError(f"expected all tensors on the same device, found {cond.device} and {x.device}")
    return x._new(cond.uop.alu(Ops.WHERE, x.uop, y.uop), y)


where = _public(where)


@_public
def cat(tensors, dim=0) -> Tensor:
    """Concatenate along dim: each piece is padded into place and the pieces are added."""
    tensors = [t for t in tensors]
    if not tensors:
        raise ValueError("cat of an empty list")
    ref = tensors[0]
    dim = _canon_dim(dim, ref.ndim)
    for t in tensors[1:]:
        if t.ndim != ref.ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, ref.shape)) if i != dim):
            raise ValueError(f"cat: shapes {ref.shape} and {t.shape} differ outside dimension {dim}")
    total = sum(t.shape[dim] for t in tensors)
    out, offset = None, 0
    for t in tensors:
        piece = t.pad(_pad_arg(t.ndim, dim, offset, total - offset - t.shape[dim]))
        out = piece if out is None else out + piece
        offset += t.shape[dim]
    return out


@_public
def stack(tensors, dim=0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack of an empty list")
    dim = _canon_dim(dim, tensors[0].ndim + 1)
    for t in tensors[1:]:
        if t.shape != tensors[0].shape:
            raise ValueError(f"stack: all tensors need the same shape, got {tensors[0].shape} and {t.shape}")
    return cat([t.unsqueeze(dim) for t in tensors], dim)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index=-100, reduction="mean") -> Tensor:
    """Mean negative log-likelihood of integer class targets; logits [..., C], targets [...] (int32)."""
    if targets.dtype is not int32:
        raise TypeError(f"cross_entropy targets must be int32 class indices, got {targets.dtype.name}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                         f"found {targets.shape}")
    logp = logits.log_softmax(-1)
    keep = targets != ignore_index
    safe = where(keep, targets, 0)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    losses = where(keep, -picked, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum().float()


def scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> Tensor:
    """softmax(q k^T * scale + mask) v over the last two dims; is_causal masks as torch does (top-left aligned)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.unsqueeze(-3).expand(k.shape[:-2] + (rep,) + k.shape[-2:]).flatten(-4, -3)
        v = v.unsqueeze(-3).expand(v.shape[:-2] + (rep,) + v.shape[-2:]).flatten(-4, -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        mask = Tensor.arange(S, device=q.device).reshape(1, S) <= Tensor.arange(L, device=q.device).reshape(L, 1)
        scores = where(mask, scores, float("-inf"))
    if attn_mask is not None:
        scores = where(attn_mask, scores, float("-inf")) if attn_mask.dtype is bool_ else scores + attn_mask
    return scores.softmax(-1) @ v


# Tensors with an assign that has not run yet. A compiled step runs them before it traces or replays, so that a
# write the caller made before the call lands before the step reads (in order, as eager mode would), however the
# step reaches the tensor: by name, or through an attribute or a list. Keyed by id (a tensor's == is elementwise).
_PENDING_ASSIGNS = weakref.WeakValueDictionary()


def pending_assigns() -> list[Tensor]:
    """The tensors whose assign has not run yet (one that ran as part of another realize is dropped here)."""
    if not _PENDING_ASSIGNS:   # the common case, checked on every compiled call
        return []
    pending = []
    for key, t in list(_PENDING_ASSIGNS.items()):
        if t.uop.op is Ops.ASSIGN and t.uop.assigned is None:
            pending.append(t)
        else:
            del _PENDING_ASSIGNS[key]
    return pending


def realize(*tensors: Tensor):
    """Compute several tensors in one schedule, so shared work is done once and fused where it can be.
    A tensor that is only a view of existing memory gets a contiguous buffer of its own."""
    pending = [t for t in dict.fromkeys(tensors) if t._buffer() is None]   # a tensor named twice is done once
    if not pending:
        return
    for t in pending:
        if t.uop.device is None:
            # a graph of constants belongs to no device; give it this tensor's, so that what is computed (and
            # memoized on the node) is tied to the memory it lives in
            t.uop = UOp(Ops.CONTIGUOUS, t.dtype, (t.uop,), t.device)
    _realize_uops([t.uop for t in pending], [t.device for t in pending])
    for t in pending:
        node = t.uop
        if node.op is Ops.ASSIGN:
            t.uop = node.assigned
        elif not t.requires_grad or t._is_leaf:
            # drop the graph behind a realized tensor; one that feeds a gradient keeps it (its nodes are memoized)
            t.uop = UOp(Ops.BUFFER, t.dtype, (), (node.realized, node.realized.version)).reshape(t.shape)


def _note_written(t: Tensor):
    """t writes its buffer in place (assign, setitem). Inside a @pg.compile trace the capture keeps it, so that each
    replay, which writes the buffer again, moves t on to the new version."""
    if CTX.capturing is not None:
        CTX.capturing.written_tensors.append(weakref.ref(t))


def _realize_uops(uops, devices):
    import compile as compiler
    compiler.realize_uops(uops, devices)


def _no_readback_in_capture(what):
    if CTX.capturing is not None:
        raise RuntimeError(f"{what} inside a @pg.compile function reads a value back to Python in the middle of the "
                           f"traced step, so the step cannot be replayed; return the tensor instead")


def _no_host_data_in_capture(what):
    if CTX.capturing is not None:
        raise RuntimeError(f"{what} inside a @pg.compile function would freeze host data into the replay; "
                           f"create it outside and pass it in as an argument")


# ----------------------------------------------------------------------------------------------------------------------
# Autograd: one table of gradient rules over the primitive ops. Composite ops (softmax, matmul, attention...) are
# built from primitives, so they get gradients for free. A rule maps (output gradient, node) to one gradient per
# source (None where none flows).

_GRAD_LEAVES = weakref.WeakKeyDictionary()   # a set kept in creation order, so every run schedules alike
_LN2 = math.log(2)


def _c(node, value):
    return node.const_like(value)


def _grad_max(g, node):
    a, b = node.src
    a_wins = b.alu(Ops.CMPLT, a)
    tie = a.alu(Ops.CMPEQ, b)
    half = g.alu(Ops.MUL, _c(g, 0.5))
    zero = _c(g, 0.0)
    ga = a_wins.alu(Ops.WHERE, g, tie.alu(Ops.WHERE, half, zero))
    gb = a_wins.alu(Ops.WHERE, zero, tie.alu(Ops.WHERE, half, g))
    return ga, gb


def _grad_reduce(g, node):
    op, axes = node.arg
    src = node.src[0]
    if op is Ops.ADD:
        return (g.expand(src.shape),)
    # max (and min): the gradient is shared evenly among the elements equal to the extreme
    hit = src.alu(Ops.CMPEQ, node.expand(src.shape)).cast(src.dtype)
    count = hit.reduce(Ops.ADD, axes)
    return (hit.alu(Ops.MUL, g.alu(Ops.MUL, count.alu(Ops.RECIP)).expand(src.shape)),)


def _grad_expand(g, node):
    src = node.src[0]
    axes = tuple(i for i, (s, n) in enumerate(zip(src.shape, node.shape)) if s != n)
    # a broadcast operand used by several products (x in x @ wq and x @ wk) collects a sum of products here;
    # summing each product on its own keeps every one a contraction the matmul templates can run
    terms, stack = [], [g]
    while stack:
        t = stack.pop()
        if t.op is Ops.ADD:
            stack.extend(t.src)
        else:
            terms.append(t)
    out = None
    for t in reversed(terms):
        r = _reduce_columns(t, Ops.ADD, axes)
        out = r if out is None else out.alu(Ops.ADD, r)
    return (out,)


GRAD_RULES = {
    Ops.ADD: lambda g, n: (g, g),
    Ops.MUL: lambda g, n: (g.alu(Ops.MUL, n.src[1]), g.alu(Ops.MUL, n.src[0])),
    Ops.NEG: lambda g, n: (g.alu(Ops.NEG),),
    Ops.EXP2: lambda g, n: (g.alu(Ops.MUL, n.alu(Ops.MUL, _c(n, _LN2))),),
    Ops.LOG2: lambda g, n: (g.alu(Ops.MUL, n.src[0].alu(Ops.MUL, _c(n, _LN2)).alu(Ops.RECIP)),),
    Ops.SIN: lambda g, n: (g.alu(Ops.MUL, n.src[0].alu(Ops.ADD, _c(n, math.pi / 2)).alu(Ops.SIN)),),
    Ops.SQRT: lambda g, n: (g.alu(Ops.MUL, n.alu(Ops.MUL, _c(n, 2.0)).alu(Ops.RECIP)),),
    Ops.RECIP: lambda g, n: (g.alu(Ops.MUL, n.alu(Ops.MUL, n)).alu(Ops.NEG),),
    Ops.MAX: _grad_max,
    Ops.WHERE: lambda g, n: (None, n.src[0].alu(Ops.WHERE, g, _c(g, 0.0)), n.src[0].alu(Ops.WHERE, _c(g, 0.0), g)),
    Ops.CAST: lambda g, n: (g.cast(n.src[0].dtype) if n.src[0].dtype.is_float else None,),
    Ops.REDUCE: _grad_reduce,
    Ops.RESHAPE: lambda g, n: (g.reshape(n.src[0].shape),),
    Ops.PERMUTE: lambda g, n: (g.permute(argsort(n.arg)),),
    Ops.EXPAND: _grad_expand,
    Ops.PAD: lambda g, n: (g.shrink(tuple((lo, s + lo) for (lo, _), s in zip(n.arg, n.src[0].shape))),),
    Ops.SHRINK: lambda g, n: (g.pad(tuple((lo, s - hi) for (lo, hi), s in zip(n.arg, n.src[0].shape))),),
    Ops.FLIP: lambda g, n: (g.flip(n.arg),),
    Ops.CONTIGUOUS: lambda g, n: (g,),
    Ops.COPY: lambda g, n: (UOp(Ops.COPY, g.dtype, (g,), n.src[0].device),),
    Ops.DETACH: lambda g, n: (None,),
    Ops.ASSIGN: lambda g, n: (None, None),
}


def _grad_custom(g, node):
    custom = node.arg[0]
    if custom.backward is None:
        raise RuntimeError(f"{custom.name} has no gradient")
    return custom.backward(g, node)


GRAD_RULES[Ops.CUSTOM] = _grad_custom


def _broadcast(node: UOp) -> bool:
    """A broadcast, or arithmetic directly on one (a matmul's product before its sum): its gradient has the
    broadcast's size ([m, n, k] for a matmul), so eager mode leaves it lazy for the reduction that follows."""
    grows = lambda u: u.op is Ops.EXPAND and prod(u.shape) > prod(u.src[0].shape)   # noqa: E731
    return grows(node) or (node.op in ALU and any(grows(s) for s in node.src))


def _gradients(root: UOp, root_grad: UOp, targets: list, device=None) -> list:
    """Reverse-mode differentiation over the UOp graph: gradients of root w.r.t. each target node. In eager mode
    each rule's result is computed at once, on the device of the node it belongs to (except inside broadcasts)."""
    order = root.toposort(stop=lambda n: n.op is Ops.DETACH)
    target_set = set(targets)
    # only nodes from which some target can be reached carry gradients
    leads_to_target = set()
    for node in order:
        if node in target_set or any(s in leads_to_target for s in node.src):
            leads_to_target.add(node)
    grads = {root: root_grad}
    for node in reversed(order):
        g = grads.get(node)
        if g is None or node.op is Ops.DETACH or not any(s in leads_to_target for s in node.src):
            continue
        rule = GRAD_RULES.get(node.op)
        if rule is None:
            raise RuntimeError(f"no gradient rule for {node.op.name}")
        for src, sg in zip(node.src, rule(g, node)):
            if sg is None or src not in leads_to_target:
                continue
            grads[src] = sg if src not in grads else grads[src].alu(Ops.ADD, sg)
            if CTX.eager and not _broadcast(src):
                _realize_uops([grads[src]], [src.device or device])
    return [grads.get(t) for t in targets]


class CustomOp:
    """An op whose body is Python over realized buffers: collectives (dist.py), host callbacks.

    `forward(out: Buffer, inputs: list[Buffer])` fills out; `backward(grad: UOp, node: UOp)` returns one gradient
    UOp (or None) per input, built from ordinary ops or other custom ops. The scheduler runs the forward as a step
    of its own (inputs computed first, contiguous), and a compiled function records and replays it like a kernel."""

    def __init__(self, name, forward, backward=None):
        self.name, self.forward, self.backward = name, forward, backward

    def __repr__(self):
        return f"CustomOp({self.name})"

    def __call__(self, *inputs: Tensor, shape=None, dtype=None) -> Tensor:
        ref = inputs[0]
        for t in inputs[1:]:
            if t.device != ref.device:
                raise RuntimeError(f"{self.name}: inputs on {ref.device} and {t.device}")
        shape = ref.shape if shape is None else tuple(shape)
        node = UOp(Ops.CUSTOM, dtype or ref.dtype, tuple(t.uop for t in inputs), (self, shape))
        out = ref._new(node, *inputs[1:])
        if CTX.eager:
            realize(out)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# nn: layers are plain objects holding tensors; parameters and state_dict walk their attributes.


class Module:
    """Base class for layers: parameters(), named_parameters(), state_dict(), load_state_dict(), __call__."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self, prefix=""):
        seen = set()
        for name, value in vars(self).items():
            yield from _named_tensors(value, prefix + name, seen)

    def parameters(self):
        return [t for _, t in self.named_parameters()]

    def state_dict(self):
        return dict(self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy tensors into the existing parameters (shapes must match); strict names missing and extra keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own]
        if strict and (missing or extra):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        with no_grad():
            for name, param in own.items():
                if name not in state:
                    continue
                value = state[name]
                value = value if isinstance(value, Tensor) else Tensor(value, device=param.device)
                if value.shape != param.shape:
                    raise ValueError(f"load_state_dict: {name} has shape {param.shape}, the state has {value.shape}")
                param.assign(value.to(param.device).cast(param.dtype))
            realize(*own.values())
        return self


def _named_tensors(value, name, seen):
    if isinstance(value, Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            yield name, value
    elif isinstance(value, Module):
        for sub, v in vars(value).items():
            yield from _named_tensors(v, f"{name}.{sub}", seen)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _named_tensors(v, f"{name}.{i}", seen)


class Linear(Module):
    """y = x W^T + b, initialized as torch.nn.Linear (uniform in +-1/sqrt(in_features))."""

    def __init__(self, in_features, out_features, bias=True, device=None):
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        self.weight = Tensor.uniform(out_features, in_features, low=-bound, high=bound, device=device,
                                     requires_grad=True)
        self.bias = Tensor.uniform(out_features, low=-bound, high=bound, device=device,
                                   requires_grad=True) if bias else None

    def forward(self, x):
        return x.linear(self.weight, self.bias)


class Embedding(Module):
    """A lookup table: integer ids -> rows of weight (normal init, as torch)."""

    def __init__(self, num_embeddings, embedding_dim, device=None):
        self.weight = Tensor.randn(num_embeddings, embedding_dim, device=device, requires_grad=True)

    def forward(self, ids):
        if ids.dtype is not int32:
            raise TypeError(f"Embedding expects int32 ids, got {ids.dtype.name}")
        return self.weight[ids]


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, dim, eps=None, device=None):
        self.eps = float(np.finfo(np.float32).eps) if eps is None else eps
        self.weight = Tensor.ones(dim, device=device, requires_grad=True)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * (x * x).mean(-1, keepdim=True).add(eps).rsqrt() * weight


def clip_grad_norm_(parameters, max_norm: float) -> Tensor:
    """Scale gradients in place so their global L2 norm is at most max_norm; returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return Tensor.full((), 0.0)
    with no_grad():
        total = None
        for g in grads:
            sq = (g * g).sum()
            total = sq if total is None else total + sq
        norm = total.sqrt()
        scale = (max_norm / (norm + 1e-6)).minimum(1.0)
        for p in parameters:
            if p.grad is not None:
                p.grad = p.grad * scale
        realize(norm, *[p.grad for p in parameters if p.grad is not None])
    return norm


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers. Hyperparameters that change during training (the learning rate) live in device tensors, so a
# compiled step reads the current value when it replays.


def _state_tensor(shape, value, device) -> Tensor:
    """A tensor with memory of its own, filled with value: state that is updated in place."""
    t = Tensor.empty(*shape, device=device) if shape else Tensor.empty(1, device=device).reshape(())
    t._buffer().copyin(np.full(prod(shape), value, dtype=np.float32))
    return t


class Optimizer:
    def __init__(self, params, lr):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for p in self.params:
            if not p.requires_grad:
                raise ValueError(f"optimizer parameter of shape {p.shape} does not require grad")
        self._lr = _state_tensor((), float(lr), self.params[0].device)
        self._lr_value = float(lr)

    @property
    def lr(self) -> float:
        return self._lr_value

    @lr.setter
    def lr(self, value):
        # written straight into the device buffer: no kernel, and a compiled step sees it on its next replay
        self._lr_value = float(value)
        self._lr._buffer().copyin(np.array([value], dtype=np.float32))

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _state(self):
        """Every tensor the update writes (parameters first), realized together in one schedule."""
        return self.params

    def step(self):
        with no_grad():
            self._update()
            realize(*self._state())


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening 0, optional weight decay and Nesterov."""

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers = [_state_tensor(p.shape, 0.0, p.device) for p in self.params] if momentum else []

    def _state(self):
        return self.params + self.buffers

    def _update(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad + p.detach() * self.weight_decay if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers[i].assign(self.buffers[i] * self.momentum + g)
                g = g + buf * self.momentum if self.nesterov else buf
            p.assign(p.detach() - g * self._lr)


class AdamW(Optimizer):
    """torch.optim.AdamW with decoupled weight decay and the same order of operations."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr)
        self.b1, self.b2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
        self.m = [_state_tensor(p.shape, 0.0, p.device) for p in self.params]
        self.v = [_state_tensor(p.shape, 0.0, p.device) for p in self.params]
        device = self.params[0].device
        # b1**t and b2**t as device tensors so a replayed step sees the current step count
        self.b1_t = _state_tensor((), 1.0, device)
        self.b2_t = _state_tensor((), 1.0, device)

    def _state(self):
        return self.params + self.m + self.v + [self.b1_t, self.b2_t]

    def _update(self):
        b1_t = self.b1_t.assign(self.b1_t * self.b1)
        b2_t = self.b2_t.assign(self.b2_t * self.b2)
        step_size = self._lr / (1 - b1_t)
        bias2_sqrt = (1 - b2_t).sqrt()
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            decayed = p.detach() * (1 - self._lr * self.weight_decay) if self.weight_decay else p.detach()
            m.assign(m * self.b1 + g * (1 - self.b1))
            v.assign(v * self.b2 + g * g * (1 - self.b2))
            denom = v.sqrt() / bias2_sqrt + self.eps
            p.assign(decayed - step_size * m / denom)

    def state_dict(self):
        out = {"lr": Tensor.full((), self.lr), "b1_t": self.b1_t, "b2_t": self.b2_t}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            out[f"m.{i}"], out[f"v.{i}"] = m, v
        return out

    def load_state_dict(self, state):
        with no_grad():
            for i, (m, v) in enumerate(zip(self.m, self.v)):
                for name, dst in ((f"m.{i}", m), (f"v.{i}", v)):
                    if name not in state or state[name].shape != dst.shape:
                        raise ValueError(f"optimizer state {name}: expected shape {dst.shape}, "
                                         f"found {None if name not in state else state[name].shape}")
                    dst.assign(state[name].to(dst.device))
            self.b1_t.assign(state["b1_t"].to(self.b1_t.device))
            self.b2_t.assign(state["b2_t"].to(self.b2_t.device))
            realize(*self._state())
        self.lr = float(state["lr"].item())


# ----------------------------------------------------------------------------------------------------------------------
# safetensors, written from the format: an 8-byte little-endian header length, a JSON header mapping names to
# {dtype, shape, data_offsets}, then the raw little-endian bytes. No pickle anywhere.

_ST_DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4"), "BOOL": np.dtype("bool"), "F16": np.dtype("<f2"),
              "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I16": np.dtype("<i2"),
              "I8": np.dtype("i1"), "U8": np.dtype("u1")}
_ST_NAMES = {"float32": "F32", "int32": "I32", "bool": "BOOL"}
_ST_MAX_HEADER = 100 << 20


def read_safetensors(path) -> dict:
    """The tensors of a safetensors file as numpy arrays (float32, int32 or bool), validated against the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes, the header length needs 8)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_ST_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {header_len} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    header.pop("__metadata__", None)
    spans, out = [], {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else None
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise ValueError(f"{path}: tensor {name!r} data [{begin}, {end}) lies outside the {data_len} data bytes")
        if end - begin != prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} ({info['dtype']}) needs "
                             f"{prod(shape) * dtype.itemsize} bytes, the header gives {end - begin}")
        spans.append((begin, end, name))
        array = data[begin:end].view(dtype).reshape(shape) if end > begin else np.zeros(shape, dtype)
        out[name] = _st_to_compute_dtype(array, info["dtype"])
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return out


def _st_to_compute_dtype(array, st_dtype):
    if st_dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if st_dtype in ("F16", "F64"):
        return array.astype(np.float32)
    if st_dtype in ("I64", "I16", "I8", "U8"):
        return array.astype(np.int32)
    return array


def load_safetensors(path, device=None) -> dict:
    """{name: Tensor} from a safetensors file; any inconsistency with the file is a ValueError naming it."""
    return {name: Tensor(np.array(a), device=device) for name, a in read_safetensors(path).items()}


def save_safetensors(tensors: dict, path, metadata=None):
    """Write {name: Tensor or ndarray} to path atomically (a temporary file renamed over it when complete)."""
    path = os.fspath(path)
    header, arrays, offset = {}, [], 0
    for name, t in tensors.items():
        array = t.numpy() if isinstance(t, Tensor) else np.asarray(t)
        dtype = to_dtype(array.dtype)
        array = np.array(array, dtype=dtype.np.newbyteorder("<"), order="C")   # keeps 0-d arrays 0-d
        header[name] = {"dtype": _ST_NAMES[dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for array in arrays:
                f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------------------------
# Graph capture: @pg.compile traces a step once and replays its kernels (compile.py does the work).


def compile(fn=None, *, max_traces=16):
    """Capture fn's kernels on the first call per input signature and replay them on later calls."""
    import compile as compiler
    if fn is None:
        return lambda f: compiler.CompiledFunction(f, max_traces)
    return compiler.CompiledFunction(fn, max_traces)


# Module-level aliases with torch's names
zeros, ones, full, empty, arange, eye = Tensor.zeros, Tensor.ones, Tensor.full, Tensor.empty, Tensor.arange, Tensor.eye
rand, randn, randint, uniform = Tensor.rand, Tensor.randn, Tensor.randint, Tensor.uniform
maximum, minimum = Tensor.maximum, Tensor.minimum


def tensor(data, device=None, dtype=None, requires_grad=False):
    return Tensor(data, device=device, dtype=dtype, requires_grad=requires_grad)


def zeros_like(t, **kw):
    return t.zeros_like(**kw)


def ones_like(t, **kw):
    return t.ones_like(**kw)
