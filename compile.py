"""picograd compiler: pending UOps -> a schedule of fused kernels -> loops and index expressions -> programs.

Read top to bottom:
  1. scheduling: which nodes become kernel outputs (fusion), one AST per kernel, the order kernels run in;
  2. index arithmetic: simplifying constructors for the integer expressions views turn into;
  3. lowering: an AST becomes loops (RANGE), loads, reductions (ACC) and one store, the form renderers print;
  4. programs: the compiled-kernel cache (in memory and on disk, checksummed, written atomically) and running;
  5. graph capture: @pg.compile records the kernels of a step once and replays them, with memory planning.

The backends (ops_cpu.py, ops_cuda.py) only render a lowered Kernel and run programs; everything about what a
kernel computes is decided here.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import operator
import os
import sys
import tempfile
import time
import types
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

try:
    import fcntl   # Unix only: locks kernel cache entries between processes
except ImportError:
    fcntl = None

import numpy as np

import picograd as pg
from picograd import UOp, Ops, Buffer, Device, Variable, ALU, MOVEMENT, prod, float32, int32, bool_

# ----------------------------------------------------------------------------------------------------------------------
# 1. Scheduling


def _is_source(node: UOp) -> bool:
    """Nodes a kernel reads rather than computes."""
    return (node.op in (Ops.BUFFER, Ops.CONST, Ops.IOTA, Ops.DEFINE_VAR, Ops.BIND) or node.realized is not None
            or (node.op is Ops.ASSIGN and node.assigned is not None))


class ScheduleItem:
    """One kernel (ast over PARAMs, bufs[i] bound to PARAM i, var values) or one device-to-device copy (ast None,
    bufs = [dst, src]). `reads` are the scheduled nodes whose kernels must run first; `reads_old` the buffers read
    at their current version, which an ASSIGN in the same schedule may only overwrite afterwards."""
    __slots__ = ("ast", "bufs", "var_vals", "root", "device", "assign_target", "reads", "reads_old", "program")

    def __init__(self, ast, bufs, var_vals, root, device, assign_target=None, reads=(), reads_old=()):
        self.ast, self.bufs, self.var_vals, self.root, self.device = ast, bufs, var_vals, root, device
        self.assign_target, self.reads, self.reads_old = assign_target, set(reads), set(reads_old)
        self.program = None   # a CustomProgram for CUSTOM steps


def _expands(node: UOp) -> bool:
    return node.op is Ops.EXPAND and prod(node.shape) > prod(node.src[0].shape)


# a reduction over at most this many trailing elements may be fused into the kernel that broadcasts it back (the
# row is read again from cache, not memory, by the passes after the first)
ROW_FUSE_MAX = 1 << 17


def _row_reductions(roots, order, consumers, reads):
    """Reductions that the kernel consuming them can compute itself, once per row: the reduced axes trail, the rows
    are short enough to stay in cache, and every use is a broadcast back over those axes (through per-row
    arithmetic: a mean, an rsqrt) to exactly the reduction's input shape. That is a softmax's max and sum, a norm's
    mean square, a log-sum-exp: fused, the row is read from memory once instead of once per reduction. Their input
    may broadcast nothing that reads memory but other such reductions: constants and index arithmetic (a causal or
    a decode mask, from aranges and a position) are fine, a matmul's operands are not.
    Returns (reductions, row_values): row_values are the nodes between a reduction and its broadcasts."""
    rows, row_values = set(), set()
    for node in order:
        if node.op is not Ops.REDUCE or (_is_source(node) and node not in roots):
            continue
        src, (_, axes) = node.src[0], node.arg
        n = len(src.shape)
        if axes != tuple(range(n - len(axes), n)) or not 1 < prod(src.shape[a] for a in axes) <= ROW_FUSE_MAX:
            continue
        inner, stack, seen, ok = [], [src], {src}, True
        while stack and ok:
            u = stack.pop()
            if _is_source(u) and u not in roots:
                continue
            if _expands(u):
                base = u.src[0].base()
                ok = base in row_values or not reads.get(base, True)
                continue
            if u.op is Ops.REDUCE:
                continue   # a reduction inside this one's loop gets a kernel of its own (see below): a boundary
            if u.op in (Ops.CONTIGUOUS, Ops.COPY, Ops.ASSIGN, Ops.CUSTOM) or u in roots:
                ok = False
                continue
            for s in u.src:
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
        if not ok:
            continue
        # the uses: per-row arithmetic, reshapes and detaches (as many elements as rows), ending in broadcasts
        # back to the input's shape
        n_rows = prod(node.shape)
        path, stack, seen = [node], [node], {node}
        while stack and ok:
            u = stack.pop()
            for user in consumers.get(u, ()):
                if user in seen:
                    continue
                seen.add(user)
                if user.op is Ops.EXPAND and user.shape == src.shape:
                    continue
                if user in roots or prod(user.shape) != n_rows or user.op not in {Ops.RESHAPE, Ops.DETACH} | ALU:
                    ok = False
                    break
                path.append(user)
                stack.append(user)
        if ok:
            rows.add(node)
            row_values.update(path)
    return rows, row_values


def _find_realize_points(roots, order, consumers):
    """The fusion policy. A node becomes a kernel output if it is a target, an effect (CONTIGUOUS, COPY, ASSIGN),
    the source of a COPY, costly work (a reduction, or arithmetic on loaded memory) that a broadcast would
    recompute for every copy, or a reduction whose users end up in more than one kernel. A reduction used along
    several paths that meet again in one kernel (x @ w + b feeding relu's three uses of it) stays fused."""
    points = set(roots)
    reads, reduces = {}, {}   # does the node's subgraph read memory / contain a reduction
    for node in order:
        if _is_source(node) and node not in roots:
            reads[node], reduces[node] = node.op not in (Ops.CONST, Ops.IOTA, Ops.DEFINE_VAR, Ops.BIND), False
            continue
        if node.op in (Ops.CONTIGUOUS, Ops.COPY, Ops.ASSIGN, Ops.CUSTOM):
            points.add(node)
        if node.op is Ops.COPY and not _is_source(node.src[0]):
            points.add(node.src[0])
        if node.op is Ops.CUSTOM:   # Python code reads whole contiguous buffers
            points.update(s for s in node.src if not _is_whole_buffer(s))
        reads[node] = any(reads.get(s, False) for s in node.src)
        reduces[node] = node.op is Ops.REDUCE or any(reduces.get(s, False) for s in node.src)
    row_reductions, row_values = _row_reductions(roots, order, consumers, reads)
    for node in order:
        if _expands(node) and not (_is_source(node) and node not in roots):
            # a broadcast recomputes its source once per copy: worth a buffer when that is a reduction, or float
            # arithmetic on memory (a matmul operand must be a plain load for the matmul templates); integer and
            # bool index arithmetic (masks, one-hot compares) is cheaper to recompute than to store
            base = node.src[0].base()
            if _is_source(base) or base.op in MOVEMENT or base in row_values:
                continue
            if reduces.get(base) or (base.dtype.is_float and base.op in ALU and reads.get(base)):
                points.add(base)
    # a product whose result flows, through elementwise ops alone, into one value that several kernels read (a
    # residual stream: x + attention's output projection) gets its buffer there instead: the product's kernel adds
    # the rest as its epilogue, and the readers load one buffer rather than recomputing the whole sum each (the sum
    # would grow by a term per layer). No kernel is added: the product needed its own kernel anyway.
    for node in order:
        if node.op is not Ops.REDUCE or node in points or node in row_reductions or _is_source(node):
            continue
        value = node
        while len(consumers.get(value, ())) == 1:
            user = consumers[value][0]
            if user in points or user.op not in ALU | {Ops.RESHAPE} or prod(user.shape) != prod(node.shape):
                break
            value = user
        if (value is not node and value.op in ALU and value.dtype.is_float and value not in row_values and
                _kernels_reached(value, points, consumers) >= 2):
            points.add(value)
    # top-down, so a reduction above is settled before the ones it contains. A reduction fused into a kernel is
    # computed once per element the kernel reads it at: paths that fork and then read it through different views
    # (q[:, :32] * q[:, 32:], a rotation) would compute it twice, so those get a buffer too.
    for node in reversed(order):
        if node.op is not Ops.REDUCE or node in points or (_is_source(node) and node not in roots):
            continue
        if node in row_reductions:
            continue
        reached, stack, seen = set(), [node], {node}
        forks = views = nested = False
        while stack and len(reached) < 2:
            users = consumers.get(stack.pop(), ())
            forks = forks or len(users) > 1
            for user in users:
                if user in points:
                    reached.add(user)
                elif user not in seen:
                    seen.add(user)
                    stack.append(user)
                    views = views or (user.op in MOVEMENT and user.op is not Ops.RESHAPE)
                    nested = nested or user.op is Ops.REDUCE
        # a reduction inside another one's loop would run without its own kernel's blocking (a matmul summed)
        if len(reached) != 1 or (forks and views) or nested:
            points.add(node)
    # one reduction per kernel: several summed in one kernel (a weight used by q, k and v gets three matmul
    # gradients added together) would run on the generic loop instead of the matmul templates, each of which
    # handles one contraction with an elementwise epilogue. Row reductions do not count; but one stays fused only
    # into an elementwise kernel over its own input's shape (the kernel's loops are then the rows and the row
    # elements), not read through a view of the broadcast (its rows would no longer be the kernel's rows), and
    # anywhere else (inside another reduction's loop) it is realized. A kernel that loses reductions is looked at
    # again, and so is each new one.
    queue = list(points)
    while queue:
        point = queue.pop()
        found = _kernel_reductions(point, points, row_values)
        plain = [r for r, _ in found if r not in row_reductions]
        if len(plain) > 1:
            new = [r for r in plain if r is not point]
        else:
            blocked = point.op is Ops.REDUCE or any(r is not point for r in plain)
            new = [r for r, viewed in found if r in row_reductions and r is not point and
                   (blocked or viewed or point.shape != r.src[0].shape)]
        if new:
            points.update(new)
            queue.extend(new + [point])
    # bound each kernel's expression depth (long chains: a cat of hundreds of pieces, a sum over hundreds of
    # gradients): a deep kernel compiles slowly and would exhaust the recursion of the lowering
    depth = {}
    for node in order:
        if _is_source(node) and node not in roots:
            continue
        depth[node] = 1 + max((depth.get(s, 0) for s in node.src if s not in points), default=0)
        if depth[node] >= MAX_FUSED_DEPTH and node not in points:
            points.add(node)
    return points


def _kernels_reached(node, points, consumers, enough=2) -> int:
    """How many kernels (up to enough) node's value flows into, following its users until each reaches a realize
    point or a reduction (whose loop runs in a kernel of its own or fused as a row reduction: a boundary either
    way for a product in node, which cannot run inside another reduction's loop)."""
    reached, stack, seen = set(), [node], {node}
    while stack and len(reached) < enough:
        for user in consumers.get(stack.pop(), ()):
            if user in points or user.op is Ops.REDUCE:
                reached.add(user)
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    return len(reached)


def _kernel_reductions(point, points, row_values):
    """The reductions in point's kernel (point itself included), each with whether the kernel reads it through a
    view other than a row reduction's own broadcast."""
    found, stack, seen = [], [(point, False)], {(point, False)}
    while stack:
        node, viewed = stack.pop()
        if node.op is Ops.REDUCE:
            found.append((node, viewed))
        if node.op in MOVEMENT and node not in row_values and not (node.op is Ops.EXPAND and
                                                                   node.src[0].base() in row_values):
            viewed = True
        for s in node.src:
            if (s, viewed) not in seen and s not in points and not _is_source(s):
                seen.add((s, viewed))
                stack.append((s, viewed))
    return found


MAX_FUSED_DEPTH = 48


def create_schedule(targets: list, devices: list) -> list:
    """Kernels (and copies) that compute every target, ordered so that producers run before consumers and every
    read of a buffer's old contents runs before an ASSIGN overwrites it."""
    roots = [t for t in dict.fromkeys(targets) if t.realized is None and t.assigned is None and t.op is not Ops.BUFFER]
    if len(roots) == 1 and _is_single_kernel(roots[0]):
        # the eager fast path: one op over memory that already exists
        device = next((d for d in devices if d is not None), None) or roots[0].device or Device.default
        return [_build_item(roots[0], {roots[0]}, {}, device)]
    root_set, order, seen = set(roots), [], set()
    for t in roots:   # one walk shared by all roots: the graph behind many gradients is mostly common
        order += t.toposort(stop=lambda n: _is_source(n) and n not in root_set, seen=seen)
    consumers = {}
    for node in order:
        if _is_source(node) and node not in root_set:
            continue
        for s in dict.fromkeys(node.src):
            consumers.setdefault(s, []).append(node)
    points = _find_realize_points(root_set, order, consumers)
    device_of = {t: d for t, d in zip(targets, devices) if d is not None}
    # a kernel over constants only (no buffers, so no device of its own) runs where the realize was asked for
    fallback = next((d for d in devices if d is not None), Device.default)
    items, produced = [], {}   # produced: scheduled node -> the Buffer its kernel writes
    for node in order:
        if node not in points:
            continue
        device = device_of.get(node) or node.device or fallback
        while True:
            try:
                items.append(_build_item(node, points, produced, device))
                break
            except _RealizeFirst as redo:
                # the ASSIGN reads its own target through another view: compute the value into a buffer first
                points.add(redo.node)
                items.append(_build_item(redo.node, points, produced, device))
    return _order_items(items)


def _is_single_kernel(root: UOp) -> bool:
    """True if root is an elementwise op or a reduction (not an effect) whose inputs are views of sources."""
    if root.op not in ALU and root.op is not Ops.REDUCE and root.op not in MOVEMENT:
        return False
    for s in root.src:
        while s.op in MOVEMENT:
            s = s.src[0]
        if not _is_source(s):
            return False
    return True


def _is_whole_buffer(node: UOp) -> bool:
    """A node whose value is exactly the contents of one buffer, in order."""
    if node.realized is not None:
        return True
    base = node
    while base.op is Ops.RESHAPE:
        base = base.src[0]
    return base.op is Ops.BUFFER and prod(node.shape) == base.arg[0].size


class _RealizeFirst(Exception):
    def __init__(self, node):
        self.node = node


class CustomProgram:
    """A CustomOp's forward in the shape of a compiled program: program(bufs, var_vals) with bufs = [out, *ins]."""

    def __init__(self, custom):
        self.custom, self.source = custom, f"<python: {custom.name}>"

    def __call__(self, bufs, var_vals):
        self.custom.forward(bufs[0], bufs[1:])


def _build_item(root: UOp, points, produced, device) -> ScheduleItem:
    if root.op is Ops.CUSTOM:
        ins = []
        for s in root.src:
            base = s
            while base.op is Ops.RESHAPE:
                base = base.src[0]
            ins.append(_input_buffer(s if s in produced or s.realized is not None else base, produced))
        out = Buffer(device, prod(root.shape), root.dtype)
        produced[root] = out
        old = {b for s, b in zip(root.src, ins) if s not in produced and s.realized is None}
        item = ScheduleItem(None, [out, *ins], {}, root, device, reads=set(root.src), reads_old=old)
        item.program = CustomProgram(root.arg[0])
        return item
    if root.op is Ops.COPY:
        src_buf = _input_buffer(root.src[0], produced)
        out = Buffer(root.arg, prod(root.shape), root.dtype)
        produced[root] = out
        return ScheduleItem(None, [out, src_buf], {}, root, root.arg, reads={root.src[0]})
    return _KernelBuilder(root, points, produced, device).build(device)


class _KernelBuilder:
    """The AST of the kernel computing `root`: its subgraph down to other kernels' outputs and realized buffers,
    which become PARAMs; bound variables become DEFINE_VARs with their values in var_vals. (A class rather than
    nested closures: recursive closures form reference cycles that would keep buffers alive until a gc pass.)"""

    def __init__(self, root, points, produced, device):
        self.root, self.points, self.produced, self.device = root, points, produced, device
        self.params, self.bufs, self.var_vals, self.memo = {}, [], {}, {}
        self.reads, self.reads_old = set(), set()

    def param_for(self, buf: Buffer, shape) -> UOp:
        if buf.device != self.device:
            raise RuntimeError(f"one kernel would read memory on {buf.device} and {self.device}; move tensors with "
                               f".to() first")
        if buf not in self.params:
            self.params[buf] = len(self.bufs)
            self.bufs.append(buf)
        return UOp(Ops.PARAM, buf.dtype, (), (self.params[buf], tuple(shape)))

    def unbind(self, arg):
        if isinstance(arg, tuple):
            return tuple(self.unbind(a) for a in arg)
        if isinstance(arg, Variable):
            terms = []
            for node, coeff in arg.terms:
                if node.op is Ops.BIND:
                    self.var_vals[node.src[0].arg[0]] = node.src[1].arg
                    node = node.src[0]
                terms.append((node, coeff))
            return Variable(terms=tuple(terms), const=arg.const)
        return arg

    def view_over(self, view: UOp, param: UOp) -> UOp:
        if view.op is Ops.BUFFER:
            return param
        return UOp(view.op, view.dtype, (self.view_over(view.src[0], param),), self.unbind(view.arg))

    def visit(self, node: UOp) -> UOp:
        out = self.memo.get(node)
        if out is None:
            if node is not self.root and (node in self.points or _is_source(node)):
                out = self.source(node)
            elif node.op in (Ops.DETACH, Ops.CONTIGUOUS):
                out = self.visit(node.src[0])
            else:
                out = UOp(node.op, node.dtype, tuple(self.visit(s) for s in node.src), self.unbind(node.arg))
            self.memo[node] = out
        return out

    def source(self, node: UOp) -> UOp:
        if node.op in (Ops.CONST, Ops.IOTA, Ops.DEFINE_VAR):
            return node
        if node.op is Ops.BIND:
            self.var_vals[node.src[0].arg[0]] = node.src[1].arg
            return node.src[0]
        if node.op is Ops.ASSIGN:
            # the written buffer, read through the assign's view, after the write
            target = node.assigned if node.assigned is not None else node.src[0]
            if node.assigned is None:
                self.reads.add(node)
            base = target.base()
            buf = _check_current(base) if node.assigned is not None else base.arg[0]
            return self.view_over(target, self.param_for(buf, (buf.size,)))
        if node.op is Ops.BUFFER:
            buf = _check_current(node)
            self.reads_old.add(buf)
            return self.param_for(buf, node.shape)
        if node.realized is None:
            self.reads.add(node)
        return self.param_for(_input_buffer(node, self.produced), node.shape)

    def build(self, device) -> ScheduleItem:
        root = self.root
        if root.op is Ops.ASSIGN:
            target, value = root.src
            base = target.base()
            if base.op is not Ops.BUFFER or base.arg[1] != base.arg[0].version:
                raise RuntimeError("assign target must be a current view of a buffer")
            out_buf = base.arg[0]
            store_view = self.view_over(target, self.param_for(out_buf, (out_buf.size,)))
            value_ast = self.visit(value)
            _check_self_reads(value_ast, store_view, value)
            self.reads_old.discard(out_buf)
        else:
            out_buf = Buffer(device, prod(root.shape), root.dtype)
            self.produced[root] = out_buf
            store_view = self.param_for(out_buf, root.shape)
            value_ast = self.visit(root)
        ast = UOp(Ops.SINK, root.dtype, (UOp(Ops.STORE, root.dtype, (store_view, value_ast)),))
        target = out_buf if root.op is Ops.ASSIGN else None
        return ScheduleItem(ast, self.bufs, self.var_vals, root, device, target, self.reads, self.reads_old)


def _check_self_reads(value_ast: UOp, store_view: UOp, value: UOp):
    """An assign's value may read its target only at the element being written: any other view of the target,
    or a reduction over it, would read elements that the same kernel is overwriting."""
    chain = set(store_view.toposort())
    tainted = set()
    for node in value_ast.toposort():
        if node in chain:
            continue
        hits = [s for s in node.src if s in chain or s in tainted]
        if not hits:
            continue
        if node.op in MOVEMENT or node.op is Ops.REDUCE or any(s in chain and s is not store_view for s in hits):
            raise _RealizeFirst(value)
        tainted.add(node)


def _input_buffer(node: UOp, produced) -> Buffer:
    if node in produced:
        return produced[node]
    if node.realized is not None:
        return node.realized
    if node.op is Ops.BUFFER:
        return node.arg[0]
    raise RuntimeError(f"scheduler: {node.op.name} is read before any kernel computes it")


def _order_items(items):
    """Producers before consumers; an ASSIGN after every other reader of its target's old contents. Otherwise the
    schedule's order is kept, so one graph gives one order in every process (and a captured step the same replay
    program, which the disk cache then finds)."""
    position = {item.root: k for k, item in enumerate(items)}
    readers_of = {}   # buffer -> the items reading its old contents
    for k, item in enumerate(items):
        for buf in item.reads_old:
            readers_of.setdefault(buf, []).append(k)
    deps = []
    for k, item in enumerate(items):
        before = {position[n] for n in item.reads if n in position}
        if item.assign_target is not None:
            before.update(r for r in readers_of.get(item.assign_target, ()) if r != k)
        deps.append(sorted(before, reverse=True))   # popped from a stack: the earliest runs first
    ordered, done, active = [], set(), set()
    for k in range(len(items)):   # depth-first, iterative (a recursive closure would be a reference cycle)
        stack = [(k, False)]
        while stack:
            key, expanded = stack.pop()
            if expanded:
                active.discard(key)
                if key not in done:
                    done.add(key)
                    ordered.append(items[key])
                continue
            if key in done:
                continue
            if key in active:
                raise RuntimeError("scheduler: one realize reads a buffer both before and after an assign to it; "
                                   "realize the assign first")
            active.add(key)
            stack.append((key, True))
            stack.extend((dep, False) for dep in deps[key] if dep not in done)
    return ordered


def realize_uops(targets: list, devices: list):
    """Schedule and run everything the targets need; afterwards each target node is realized (or assigned)."""
    items = create_schedule(targets, devices)
    pg._STATS["schedules"] += 1
    start = time.perf_counter()
    run_schedule(items)
    if pg.DEBUG >= 1 and items:
        took = (time.perf_counter() - start) * 1e3
        print(f"realize: {len(items)} kernel{'s' * (len(items) != 1)} in {took:.3f} ms", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Index arithmetic. Views become integer expressions over loop variables; these constructors keep them simple
# (linear forms, div/mod folding by value ranges) so that a contiguous access renders as `base + i`. They are pure
# functions of hash-consed nodes, so the costly ones are memoized (in bounded caches): the same views of the same
# shapes are lowered again and again, in every kernel that reads a weight and in both attempts of lower_kernel.

_bounds_cache = weakref.WeakKeyDictionary()
INT_MIN, INT_MAX = -2**31, 2**31 - 1


def bounds(u: UOp):
    """[min, max] of an integer or bool expression."""
    b = _bounds_cache.get(u)
    if b is None:
        b = _compute_bounds(u)
        _bounds_cache[u] = b
    return b


def _compute_bounds(u: UOp):
    op = u.op
    if op is Ops.CONST:
        return (u.arg, u.arg) if not isinstance(u.arg, float) else (-math.inf, math.inf)
    if op is Ops.RANGE:
        return 0, u.arg[1] - 1
    if op is Ops.DEFINE_VAR:
        return u.arg[1], u.arg[2]
    if op is Ops.CHECK:
        return 0, u.arg - 1
    if op in (Ops.CMPLT, Ops.CMPEQ) or u.dtype is bool_:
        return 0, 1
    if u.dtype is not int32:
        return -math.inf, math.inf
    if op is Ops.ADD:
        (a0, a1), (b0, b1) = bounds(u.src[0]), bounds(u.src[1])
        return a0 + b0, a1 + b1
    if op is Ops.MUL:
        (a0, a1), (b0, b1) = bounds(u.src[0]), bounds(u.src[1])
        products = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
        return min(products), max(products)
    if op is Ops.NEG:
        a0, a1 = bounds(u.src[0])
        return -a1, -a0
    if op is Ops.IDIV and u.src[1].op is Ops.CONST and u.src[1].arg > 0:
        a0, a1 = bounds(u.src[0])
        d = u.src[1].arg
        return (a0 // d, a1 // d) if a0 >= 0 else (-(abs(a0) // d), a1 // d)
    if op is Ops.MOD and u.src[1].op is Ops.CONST and u.src[1].arg > 0:
        a0, _ = bounds(u.src[0])
        d = u.src[1].arg
        return (0, d - 1) if a0 >= 0 else (-(d - 1), d - 1)
    if op is Ops.MAX:
        (a0, a1), (b0, b1) = bounds(u.src[0]), bounds(u.src[1])
        return max(a0, b0), max(a1, b1)
    if op is Ops.WHERE:
        (a0, a1), (b0, b1) = bounds(u.src[1]), bounds(u.src[2])
        return min(a0, b0), max(a1, b1)
    return INT_MIN, INT_MAX


def iconst(v: int) -> UOp:
    return UOp(Ops.CONST, int32, (), int(v))


def _linear(u: UOp):
    """u as ({term: coefficient}, constant) where terms are non-sum, non-constant-multiple expressions."""
    if u.op is Ops.CONST:
        return {}, u.arg
    if u.op is Ops.ADD:
        t0, c0 = _linear(u.src[0])
        t1, c1 = _linear(u.src[1])
        terms = dict(t0)
        for k, v in t1.items():
            terms[k] = terms.get(k, 0) + v
        return terms, c0 + c1
    if u.op is Ops.MUL and u.src[1].op is Ops.CONST:
        t, c = _linear(u.src[0])
        k = u.src[1].arg
        return {n: v * k for n, v in t.items()}, c * k
    return {u: 1}, 0


@functools.lru_cache(maxsize=None)
def _sort_key_cached(u: UOp):
    return (u.op.value, repr(u.arg), tuple(_sort_key_cached(s) for s in u.src))


def _build_linear(terms: dict, const: int) -> UOp:
    # Fold what merging a reshape's split dimensions produces: x//n*n + x%n is x, and (x//a%b)*a + x%a is x%(a*b)
    changed = True
    while changed:
        changed = False
        for t, c in list(terms.items()):
            if not c or t.op is not Ops.MOD or t.src[1].op is not Ops.CONST or bounds(t.src[0])[0] < 0:
                continue
            x, n = t.src[0], t.src[1].arg
            div = UOp(Ops.IDIV, int32, (x, t.src[1]))
            if terms.get(div, 0) == c * n:
                del terms[t], terms[div]
                inner, inner_const = _linear(x)
                for k, v in inner.items():
                    terms[k] = terms.get(k, 0) + v * c
                const += inner_const * c
                changed = True
                break
            if x.op is Ops.IDIV and x.src[1].op is Ops.CONST:
                base, a = x.src[0], x.src[1].arg
                low = UOp(Ops.MOD, int32, (base, iconst(a)))
                if c % a == 0 and terms.get(low, 0) == c // a:
                    del terms[t], terms[low]
                    merged = i_mod(base, a * n)
                    terms[merged] = terms.get(merged, 0) + c // a
                    changed = True
                    break
    out = None
    for t in sorted((t for t, c in terms.items() if c != 0), key=_sort_key_cached):
        c = terms[t]
        term = t if c == 1 else UOp(Ops.MUL, int32, (t, iconst(c)))
        out = term if out is None else UOp(Ops.ADD, int32, (out, term))
    if out is None:
        return iconst(const)
    return out if const == 0 else UOp(Ops.ADD, int32, (out, iconst(const)))


@functools.lru_cache(maxsize=1 << 16)
def i_add(a: UOp, b: UOp) -> UOp:
    ta, ca = _linear(a)
    tb, cb = _linear(b)
    terms = dict(ta)
    for k, v in tb.items():
        terms[k] = terms.get(k, 0) + v
    return _build_linear(terms, ca + cb)


@functools.lru_cache(maxsize=1 << 16)
def i_mul(a: UOp, k: int) -> UOp:
    t, c = _linear(a)
    return _build_linear({n: v * k for n, v in t.items()}, c * k)


def _split_by_factor(terms: dict, const: int, d: int):
    """x = f * big + rest with f dividing d and 0 <= rest < f (every term non-negative): then x // d is
    big // (d / f) and x % d is f * (big % (d / f)) + rest. The largest such f, or None."""
    for f in sorted({math.gcd(d, c) for c in terms.values()} | {math.gcd(d, const)}, reverse=True):
        if f <= 1:
            break
        big = {t: c // f for t, c in terms.items() if c % f == 0}
        rest = _build_linear({t: c for t, c in terms.items() if c % f != 0}, const % f)
        lo, hi = bounds(rest)
        if lo >= 0 and hi < f:
            return f, _build_linear(big, const // f), rest
    return None


@functools.lru_cache(maxsize=1 << 16)
def i_div(a: UOp, d: int) -> UOp:
    if d == 1:
        return a
    lo, hi = bounds(a)
    if lo >= 0 and hi < d:
        return iconst(0)
    terms, const = _linear(a)
    if lo < 0 or any(bounds(t)[0] < 0 for t in terms):
        return UOp(Ops.IDIV, int32, (a, iconst(d)))
    split = _split_by_factor(terms, const, d)
    if split is not None:
        f, big, _ = split
        return big if f == d else i_div(big, d // f)
    quotient = {t: c // d for t, c in terms.items() if c // d}
    rest = {t: c % d for t, c in terms.items() if c % d}
    q_const, r_const = const // d, const % d
    rest_expr = _build_linear(dict(rest), r_const)
    if bounds(rest_expr)[1] < d:
        return _build_linear(quotient, q_const)
    g = math.gcd(d, r_const, *rest.values())
    if g > 1:
        inner = UOp(Ops.IDIV, int32, (_build_linear({t: c // g for t, c in rest.items()}, r_const // g),
                                      iconst(d // g)))
    elif rest_expr.op is Ops.IDIV and rest_expr.src[1].op is Ops.CONST:
        inner = UOp(Ops.IDIV, int32, (rest_expr.src[0], iconst(rest_expr.src[1].arg * d)))
    else:
        inner = UOp(Ops.IDIV, int32, (rest_expr, iconst(d)))
    return i_add(_build_linear(quotient, q_const), inner)


@functools.lru_cache(maxsize=1 << 16)
def i_mod(a: UOp, d: int) -> UOp:
    if d == 1:
        return iconst(0)
    lo, hi = bounds(a)
    if lo >= 0 and hi < d:
        return a
    terms, const = _linear(a)
    if lo < 0 or any(bounds(t)[0] < 0 for t in terms):
        return UOp(Ops.MOD, int32, (a, iconst(d)))
    split = _split_by_factor(terms, const, d)
    if split is not None and split[0] > 1:
        f, big, rest_expr = split
        return rest_expr if f == d else i_add(i_mul(i_mod(big, d // f), f), rest_expr)
    rest = {t: c % d for t, c in terms.items() if c % d}
    rest_expr = _build_linear(rest, const % d)
    if bounds(rest_expr)[1] < d:
        return rest_expr
    return UOp(Ops.MOD, int32, (rest_expr, iconst(d)))


TRUE = UOp(Ops.CONST, bool_, (), True)


def b_and(a: UOp, b: UOp) -> UOp:
    if a is TRUE:
        return b
    if b is TRUE:
        return a
    return UOp(Ops.WHERE, bool_, (a, b, UOp(Ops.CONST, bool_, (), False)))


def i_lt(a: UOp, c) -> UOp:
    """a < c as a bool expression, folded when the ranges decide it."""
    c = iconst(c) if isinstance(c, int) else c
    (a0, a1), (c0, c1) = bounds(a), bounds(c)
    if a1 < c0:
        return TRUE
    if a0 >= c1:
        return UOp(Ops.CONST, bool_, (), False)
    return UOp(Ops.CMPLT, bool_, (a, c))


def sym_to_index(v) -> UOp:
    """An int or a (unbound) Variable as an index expression."""
    if isinstance(v, int):
        return iconst(v)
    out = iconst(v.const)
    for node, coeff in v.terms:
        out = i_add(out, i_mul(node, coeff))
    return out


def substitute(u: UOp, mapping: dict) -> UOp:
    """u with nodes replaced (bottom-up rebuild, index expressions re-simplified)."""
    memo = dict(mapping)

    def go(n):
        if n in memo:
            return memo[n]
        if not n.src:
            memo[n] = n
            return n
        src = tuple(go(s) for s in n.src)
        if src == n.src:
            out = n
        elif n.dtype is int32 and n.op is Ops.ADD:
            out = i_add(*src)
        elif n.dtype is int32 and n.op is Ops.MUL and src[1].op is Ops.CONST:
            out = i_mul(src[0], src[1].arg)
        elif n.dtype is int32 and n.op is Ops.IDIV and src[1].op is Ops.CONST:
            out = i_div(src[0], src[1].arg)
        elif n.dtype is int32 and n.op is Ops.MOD and src[1].op is Ops.CONST:
            out = i_mod(src[0], src[1].arg)
        else:
            out = UOp(n.op, n.dtype, src, n.arg)
        memo[n] = out
        return out
    return go(u)


@functools.lru_cache(maxsize=1 << 16)
def _ranges_of(u: UOp) -> frozenset:
    """The loop variables u depends on (asked again and again of the same index terms while lowering)."""
    return frozenset(n for n in u.toposort() if n.op is Ops.RANGE)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Lowering: a kernel AST (movement ops over PARAMs) becomes index expressions over loop variables. Views are
# pushed top-down from the output index to each load, so every load reads exactly the element it needs.


class Kernel:
    """A lowered kernel: loops over `ranges` (outermost first) around one store, plus what renderers need to
    declare parameters. `reduce_ranges` belong to the ACC nodes inside the value."""

    def __init__(self, name, ast, params, var_names, ranges, store, uses_check, flops, mem_bytes, scatter=None):
        self.name, self.ast, self.params, self.var_names = name, ast, params, var_names
        self.ranges, self.store, self.uses_check = ranges, store, uses_check
        self.flops, self.mem_bytes = flops, mem_bytes
        self.scatter = scatter

    @property
    def out_size(self):
        return prod(r.arg[1] for r in self.ranges)


class KernelParam:
    __slots__ = ("index", "dtype", "size", "written", "read")

    def __init__(self, index, dtype, size, written, read):
        self.index, self.dtype, self.size, self.written, self.read = index, dtype, size, written, read


def _strides(shape):
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc if s != 1 else 0)
        acc *= s
    return tuple(reversed(out))


class Lowerer:
    """Top-down lowering with memoization on (node, index, valid)."""

    def __init__(self):
        self.memo = {}
        self.n_ranges = 0
        self.reduce_ranges = []

    def new_range(self, size, prefix):
        r = UOp(Ops.RANGE, int32, (), (f"{prefix}{self.n_ranges}", size))
        self.n_ranges += 1
        return r

    def view_index(self, node: UOp, idx: tuple, valid: UOp):
        """Push idx through a chain of movement ops down to its base; returns (base, index tuple, valid)."""
        while node.op in MOVEMENT:
            idx, valid = self.through_movement(node, idx, valid)
            node = node.src[0]
        return node, idx, valid

    def through_movement(self, node, idx, valid):
        op, arg, src = node.op, node.arg, node.src[0]
        if op is Ops.RESHAPE:
            linear = iconst(0)
            for i, st in zip(idx, _strides(node.shape)):
                if st:
                    linear = i_add(linear, i_mul(i, st))
            new = []
            for size, st in zip(src.shape, _strides(src.shape)):
                # size 0: nothing is ever read through this view, any index will do
                new.append(iconst(0) if size <= 1 or st == 0 else i_mod(i_div(linear, st), size))
            return tuple(new), valid
        if op is Ops.PERMUTE:
            new = [None] * len(idx)
            for i, o in enumerate(arg):
                new[o] = idx[i]
            return tuple(new), valid
        if op is Ops.EXPAND:
            return tuple(iconst(0) if s == 1 and n != 1 else i for i, s, n in zip(idx, src.shape, node.shape)), valid
        if op is Ops.SHRINK:
            return tuple(i if lo == 0 else i_add(i, sym_to_index(lo)) for i, (lo, _) in zip(idx, arg)), valid
        if op is Ops.FLIP:
            return tuple(i_add(iconst(s - 1), i_mul(i, -1)) if d in arg else i
                         for d, (i, s) in enumerate(zip(idx, src.shape))), valid
        if op is Ops.PAD:
            new = []
            for i, (lo, _), s in zip(idx, arg, src.shape):
                lo_idx = sym_to_index(lo)
                shifted = i_add(i, i_mul(lo_idx, -1))
                valid = b_and(valid, b_and(_not(i_lt(shifted, 0)), i_lt(shifted, s)))
                new.append(shifted)
            return tuple(new), valid
        raise RuntimeError(f"not a movement op: {op}")

    def lower(self, node: UOp, idx: tuple, valid: UOp) -> UOp:
        key = (node, idx, valid)
        out = self.memo.get(key)
        if out is None:
            out = self._lower(node, idx, valid)
            self.memo[key] = out
        return out

    def _lower(self, node, idx, valid):
        if node.op in MOVEMENT:
            base, base_idx, base_valid = self.view_index(node, idx, valid)
            value = self.lower(base, base_idx, base_valid)
            if base_valid is not valid and base.op is not Ops.PARAM:
                # padding wraps a computed value: outside the valid region the view reads as zero
                value = _where(base_valid, value, _zero(value.dtype))
            return value
        if node.op is Ops.PARAM:
            linear = iconst(0)
            for i, st in zip(idx, _strides(node.arg[1])):
                if st:
                    linear = i_add(linear, i_mul(i, st))
            if valid.op is Ops.CONST and not valid.arg:
                return _zero(node.dtype)
            return UOp(Ops.LOAD, node.dtype, (node, linear, valid))
        if node.op is Ops.CONST:
            return node
        if node.op is Ops.IOTA:
            return idx[0]
        if node.op is Ops.DEFINE_VAR:
            return node
        if node.op is Ops.REDUCE:
            op, axes = node.arg
            src = node.src[0]
            ranges, body = self.reduce_body(src, axes, idx, valid, [[a] for a in axes])
            if len(axes) > 1:
                # adjacent reduced axes that every load walks as one (a weight gradient's batch and sequence)
                # become one loop, which is what the matmul templates need
                groups = _merge_dims([src.shape[a] for a in axes], _accesses(body), ranges)
                if len(groups) < len(axes):
                    ranges, body = self.reduce_body(src, axes, idx, valid, [[axes[i] for i in g] for g in groups])
            gathered = _gather_rewrite(op, body, ranges)
            if gathered is not None:
                return gathered
            self.reduce_ranges.extend(ranges)
            return UOp(Ops.ACC, node.dtype, (body,), (op, tuple(ranges)))
        if node.op in ALU:
            src = tuple(self.lower(s, idx, valid) for s in node.src)
            return _fold_alu(node.op, node.dtype, src, node.arg)
        raise RuntimeError(f"cannot lower {node.op.name}")


    def reduce_body(self, src, axes, idx, valid, groups):
        """Lower a reduction's source with one loop per group of (adjacent) reduced axes."""
        ranges, new_idx = [], list(idx)
        for group in groups:
            r = self.new_range(prod(src.shape[a] for a in group), "r")
            ranges.append(r)
            stride = 1
            for a in reversed(group):
                new_idx[a] = r if len(group) == 1 else i_mod(i_div(r, stride), src.shape[a])
                stride *= src.shape[a]
        return ranges, self.lower(src, tuple(new_idx), valid)


def _zero(dtype):
    return UOp(Ops.CONST, dtype, (), 0.0 if dtype.is_float else (False if dtype is bool_ else 0))


def _not(b: UOp) -> UOp:
    if b.op is Ops.CONST:
        return UOp(Ops.CONST, bool_, (), not b.arg)
    return UOp(Ops.CMPEQ, bool_, (b, UOp(Ops.CONST, bool_, (), False)))


def _where(cond, a, b):
    if cond is TRUE:
        return a
    if cond.op is Ops.CONST:
        return a if cond.arg else b
    return UOp(Ops.WHERE, a.dtype, (cond, a, b))


def _fold_alu(op, dtype, src, arg):
    """Build an ALU node, folding what is known: integer index arithmetic, comparisons decided by ranges,
    constant conditions."""
    if dtype is int32 and all(s.dtype is int32 for s in src):
        if op is Ops.ADD:
            return i_add(*src)
        if op is Ops.MUL and src[1].op is Ops.CONST:
            return i_mul(src[0], src[1].arg)
        if op is Ops.MUL and src[0].op is Ops.CONST:
            return i_mul(src[1], src[0].arg)
        if op is Ops.NEG and src[0].op in (Ops.RANGE, Ops.CONST, Ops.DEFINE_VAR):   # index arithmetic
            return i_mul(src[0], -1)
    if op is Ops.NEG and src[0].op is Ops.CONST:
        return UOp(Ops.CONST, dtype, (), -src[0].arg)
    if op is Ops.CHECK:
        lo, hi = bounds(src[0])
        if lo >= 0 and hi < arg:
            return src[0]
    if op is Ops.CMPLT and all(s.dtype is int32 for s in src):
        return i_lt(src[0], src[1])
    if op is Ops.WHERE and src[0].op is Ops.CONST:
        return src[1] if src[0].arg else src[2]
    return UOp(op, dtype, src, arg)


def _gather_rewrite(op, body: UOp, ranges):
    """sum over r of (r == i ? v(r) : 0), with i independent of r, is v(i): integer indexing lowered to a direct
    load instead of a one-hot reduction."""
    if op is not Ops.ADD or len(ranges) != 1 or body.op is not Ops.WHERE:
        return None
    cond, value, other = body.src
    if other.op is not Ops.CONST or other.arg != 0 or cond.op is not Ops.CMPEQ:
        return None
    r = ranges[0]
    a, b = cond.src
    if a is not r:
        a, b = b, a
    if a is not r or r in _ranges_of(b):
        return None
    lo, hi = bounds(b)
    if lo < 0 or hi >= r.arg[1]:
        return None   # only indices proven in range (CHECK) may replace the loop
    return substitute(value, {r: b})


def _merge_dims(shape, accesses, ranges):
    """Group adjacent dims (loops) that every access (load and store index, validity) walks as one: dims i, i+1
    merge when each index is linear in both with coeff_i == coeff_{i+1} * size_{i+1}. Returns lists of positions."""
    groups = [[0]] if len(shape) else []
    for i in range(1, len(shape)):
        a, b = ranges[i - 1], ranges[i]
        ok = True
        for acc in accesses:
            ca, cb = _coeff(acc, a), _coeff(acc, b)
            if ca is None or cb is None or ca != cb * shape[i]:
                ok = False
                break
        if ok:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _coeff(expr: UOp, r: UOp):
    """The coefficient of r if expr is linear in r (0 if absent), else None."""
    terms, _ = _linear(expr)
    coeff = terms.get(r, 0)
    for t in terms:
        if t is not r and r in _ranges_of(t):
            return None
    return coeff


def _accesses(expr: UOp):
    """Every index and validity expression a kernel (or an expression) evaluates (for dimension merging)."""
    out = [expr.src[1]] if expr.op is Ops.STORE else []
    for node in expr.toposort():
        if node.op is Ops.LOAD:
            out.append(node.src[1])
            if node.src[2] is not TRUE:
                out.append(node.src[2])
        elif node.dtype is int32 and node.op in (Ops.IDIV, Ops.MOD, Ops.CHECK) or node.op is Ops.CMPLT:
            out.append(node)
    return out


def range_sets(store):
    """For every node under the store: the loop variables its value depends on (a reduction's own ranges are
    bound inside it, so an ACC depends only on the ranges its body uses besides them)."""
    out, no_ranges = {}, frozenset()
    for node in store.toposort():
        if node.op is Ops.RANGE:
            deps = frozenset((node,))
        else:
            deps = out[node.src[0]] if node.src else no_ranges
            for s in node.src[1:]:   # most nodes depend on what their first source does: share its set
                if not out[s] <= deps:
                    deps = deps | out[s]
        if node.op is Ops.ACC:
            deps = deps - frozenset(node.arg[1])
        out[node] = deps
    return out


def lower_kernel(ast: UOp, buf_sizes: list) -> Kernel:
    """Lower a SINK(STORE(view of PARAM, value)) AST into a Kernel over the store's shape."""
    store = ast.src[0]
    target, value = store.src
    shape = target.shape
    for attempt in range(2):
        lowerer = Lowerer()
        ranges = [lowerer.new_range(s, "i") for s in shape]
        if attempt == 1:
            # re-lower with merged dims: one range per group, original indices recovered by div/mod
            merged_ranges, idx = [], [None] * len(shape)
            lowerer = Lowerer()
            for group in groups:
                size = prod(shape[i] for i in group)
                r = lowerer.new_range(size, "i")
                merged_ranges.append(r)
                stride = 1
                for i in reversed(group):
                    idx[i] = i_mod(i_div(r, stride), shape[i]) if len(group) > 1 else r
                    stride *= shape[i]
            ranges, idx = merged_ranges, tuple(idx)
        else:
            idx = tuple(ranges)
        out_param, out_idx, out_valid = lowerer.view_index(target, idx, TRUE)
        linear = iconst(0)
        for i, st in zip(out_idx, _strides(out_param.arg[1])):
            if st:
                linear = i_add(linear, i_mul(i, st))
        lowered_value = lowerer.lower(value, idx, TRUE)
        store_op = UOp(Ops.STORE, value.dtype, (out_param, linear, lowered_value))
        if attempt == 0:
            # dims merge unless a reduction depends on only some of them (a row reduction fused into the kernel
            # that broadcasts it: merged with the row's elements, it would be recomputed for every element)
            deps, loops = range_sets(store_op), {r for r in ranges if r.arg[1] > 1}
            partial = any(n.op is Ops.ACC and deps[n] & loops and not loops <= deps[n] for n in deps)
            groups = _merge_dims(shape, _accesses(store_op), ranges)
            if len(groups) == len(shape) or partial:
                break
    # a size-1 range is just the constant 0
    ranges = [r for r in ranges if r.arg[1] != 1]
    nodes = store_op.toposort()   # walked once for everything below
    zero_map = {r: iconst(0) for r in nodes if r.op is Ops.RANGE and r.arg[1] == 1}
    if zero_map:
        store_op = substitute(store_op, zero_map)
        nodes = store_op.toposort()
    params = {n.arg[0]: n for n in nodes if n.op is Ops.PARAM}
    loads = {n.src[0].arg[0] for n in nodes if n.op is Ops.LOAD}
    kparams = [KernelParam(i, params[i].dtype, buf_sizes[i], i == out_param.arg[0], i in loads)
               for i in sorted(params)]
    var_names = sorted({n.arg for n in nodes if n.op is Ops.DEFINE_VAR})
    uses_check = any(n.op is Ops.CHECK for n in nodes)
    flops, mem = _estimate_cost(store_op, nodes, kparams)
    scatter = _match_scatter(store_op, ranges)
    kind = "s" if scatter else "r" if any(n.op is Ops.ACC for n in nodes) else "e"
    name = f"{kind}_" + "_".join(str(r.arg[1]) for r in ranges) if ranges else f"{kind}_scalar"
    return Kernel(name, ast, kparams, var_names, ranges, store_op, uses_check, flops, mem, scatter)


class Scatter:
    """out[.., o, ..] = sum over r of (e(r) == o ? value : 0), the gradient of integer indexing (an embedding's
    backward): instead of testing every o against every r, zero the output and add each r's value at o = e(r).
    `store` is the kernel's store with o replaced by e; `ranges` the reduction's loops."""

    def __init__(self, o, e, ranges, store):
        self.o, self.e, self.ranges, self.store = o, e, ranges, store


def _match_scatter(store: UOp, out_ranges):
    param, index, value = store.src
    if value.op is not Ops.ACC or value.arg[0] is not Ops.ADD or value.src[0].op is not Ops.WHERE:
        return None
    cond, val, other = value.src[0].src
    if cond.op is not Ops.CMPEQ or other.op is not Ops.CONST or other.arg != 0:
        return None
    for o, e in (cond.src, reversed(cond.src)):
        if o.op is Ops.RANGE and o in out_ranges and _ranges_of(e).isdisjoint(out_ranges):
            lo, hi = bounds(e)
            if lo < 0 or hi >= o.arg[1]:
                return None   # only indices proven in range (CHECK) may be scattered
            added = UOp(Ops.STORE, store.dtype, (param, substitute(index, {o: e}), substitute(val, {o: e})))
            return Scatter(o, e, value.arg[1], added)
    return None


def _estimate_cost(store, nodes, params):
    """Flops: each ALU op, and each step of a reduction, once per iteration of the loops its value depends on (a
    row's reduction fused into the kernel that broadcasts it runs once per row, not once per element); bytes: each
    parameter buffer once. `nodes`: the store in toposort order."""
    deps = range_sets(store)
    flops = 0
    for node in nodes:
        if node.op in ALU and node.dtype is not int32 and node.dtype is not bool_:
            flops += prod(r.arg[1] for r in deps[node])
        elif node.op is Ops.ACC:
            flops += prod(r.arg[1] for r in deps[node] | set(node.arg[1]))
    mem = sum(p.size * p.dtype.itemsize for p in params)
    return flops, mem


class Contraction:
    """A kernel of the form out[batch.., m.., n..] = epilogue(sum over k.. of A[batch.., m.., k..] * B[batch.., k..,
    n..]): what the matmul templates (CPU packing + micro-kernel, CUDA tensor cores) accept. Each side may span
    several loops (dimensions that could not be merged); M, N and K are their products, 1 for an empty side (a
    matrix-vector product). An operand is plain when k and its own side are at most one loop each and it is a load
    at an index linear in the loops: then `a_strides` (`b_strides`) maps each loop to its coefficient and `a_offset`
    (`b_offset`) is the constant part, what templates that read memory directly need; otherwise they are None and
    the operand is an expression to evaluate. `linear` holds when both operands are plain and the output index is
    linear too; then `m`, `n`, `k` are the loops."""

    def __init__(self, kernel, acc, a, b, m_ranges, n_ranges, k_ranges, batch, a_form, b_form, out_linear):
        self.kernel, self.acc, self.a, self.b = kernel, acc, a, b
        self.m_ranges, self.n_ranges, self.k_ranges, self.batch = m_ranges, n_ranges, k_ranges, batch
        self.a_strides, self.a_offset = a_form or (None, None)
        self.b_strides, self.b_offset = b_form or (None, None)
        self.linear = a_form is not None and b_form is not None and out_linear
        self.M, self.N, self.K = (prod(r.arg[1] for r in side) for side in (m_ranges, n_ranges, k_ranges))

    @property
    def m(self):
        return self.m_ranges[0] if len(self.m_ranges) == 1 else None

    @property
    def n(self):
        return self.n_ranges[0] if len(self.n_ranges) == 1 else None

    @property
    def k(self):
        return self.k_ranges[0] if len(self.k_ranges) == 1 else None

    @property
    def gate(self):
        """The condition outside which the epilogue does not use the sums, or None: the value stored is
        where(gate, f(sums), other) with the gate over the output's loops and variables alone (a causal mask keeps
        the scores of keys at or before each query). A renderer may skip the products of output tiles where the
        gate holds nowhere."""
        value = self.kernel.store.src[2]
        if value.op is not Ops.WHERE:
            return None
        gate, used, other = value.src
        used_nodes = used.toposort()
        if self.acc not in used_nodes or self.acc in other.toposort():
            return None
        if any(n.op is Ops.CAST for n in used_nodes):
            return None   # a skipped tile's sums are left over from another: float garbage cast to int is undefined
        if any(n.op in (Ops.LOAD, Ops.ACC) or n in self.k_ranges for n in gate.toposort()):
            return None
        return gate


def _linear_in_ranges(expr: UOp):
    """(coefficients by RANGE, constant) if expr is a linear form over loop variables only, else None."""
    terms, const = _linear(expr)
    if any(t.op is not Ops.RANGE for t in terms):
        return None
    return terms, const


def match_contraction(kernel: Kernel):
    """The Contraction this kernel is, or None. The value stored may be any elementwise function of the one
    accumulator (the epilogue: bias, activation, scaling) as long as nothing else in it reduces. Each operand may
    be any expression of its own loops (a view with flips and reshapes, an elementwise prologue): the CPU template
    packs panels by evaluating the operands, so it takes either form; `linear` marks the plain ones."""
    store = kernel.store
    param, index, value = store.src
    accs = [n for n in value.toposort() if n.op is Ops.ACC]
    if len(accs) != 1:
        return None
    acc = accs[0]
    reduce_op, k_ranges = acc.arg
    body = acc.src[0]
    if reduce_op is not Ops.ADD or body.op is not Ops.MUL or acc.dtype is not float32:
        return None
    if any(n.op is Ops.ACC for n in body.toposort()):
        return None
    a, b = body.src
    ra, rb = _ranges_of(a), _ranges_of(b)
    m_ranges, n_ranges, batch = [], [], []
    for r in kernel.ranges:
        in_a, in_b = r in ra, r in rb
        (m_ranges if in_a and not in_b else n_ranges if in_b and not in_a else batch).append(r)
    if not any(r in ra for r in k_ranges) or not any(r in rb for r in k_ranges):
        return None
    if (ra | rb) - set(kernel.ranges) - set(k_ranges):
        return None   # an operand loops over something else
    # the accumulator must not be read by anything but the epilogue at its own (m, n), nor the output read back
    if any(n_.op is Ops.LOAD and n_.src[0].arg[0] == param.arg[0] for n_ in value.toposort()):
        return None

    def plain(operand, side):   # (coefficients by loop, constant) of a load at a linear index, else None
        if len(k_ranges) == 1 and len(side) <= 1 and operand.op is Ops.LOAD and operand.src[2] is TRUE:
            return _linear_in_ranges(operand.src[1])
        return None
    return Contraction(kernel, acc, a, b, m_ranges, n_ranges, list(k_ranges), batch, plain(a, m_ranges),
                       plain(b, n_ranges), _linear_in_ranges(index) is not None)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Programs: the compiled-kernel cache and running a schedule.

_programs = {}   # (device type, ast, tf32) -> program


def cache_dir():
    return os.environ.get("PICOGRAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "picograd")


_MAGIC = b"PGCACHE1"
_fallback_dir = None


def disk_cached(key_parts: tuple, suffix: str, build) -> str:
    """The path of a file holding build()'s bytes, cached on disk under a hash of key_parts.

    The file is the payload followed by its sha256 and a magic tag, written to a temporary name and renamed into
    place, so readers see a whole file or none; a truncated or corrupted entry fails its checksum and is rebuilt.
    Loaders (dlopen, cuModuleLoadData) ignore the trailer. An unwritable cache directory falls back to a private
    temporary one, with a warning. Processes that want a missing entry at once (MPI ranks, test workers started
    together) take turns on a lock file beside it: the first builds, the others then read what it wrote."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()
    name = os.path.join(key[:2], key + suffix)
    path = _find_entry(name)
    if path is None:
        # the lock file stays: were it removed, a third process could lock a new file while a second holds this one
        with _lock_between_processes(os.path.join(cache_dir(), key[:2], ".lock-" + key + suffix)):
            path = _find_entry(name)   # built by another process while this one waited
            if path is None:
                return _write_entry(name, build())
    pg._STATS["kernels_from_disk"] += 1
    return path


def _find_entry(name):
    for directory in (cache_dir(), _fallback_dir):
        if directory is not None and _read_checked(os.path.join(directory, name)) is not None:
            return os.path.join(directory, name)
    return None


def _write_entry(name, payload):
    global _fallback_dir
    blob = payload + hashlib.sha256(payload).digest() + _MAGIC
    for directory in (cache_dir(), _fallback_dir):
        if directory is None:
            continue
        path = os.path.join(directory, name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            return path
        except OSError as e:
            if directory == _fallback_dir:
                raise
            warnings.warn(f"picograd: cannot write the kernel cache at {directory} ({e}); using a temporary "
                          f"directory for this process (set PICOGRAD_CACHE to a writable folder)")
    _fallback_dir = tempfile.mkdtemp(prefix="picograd-cache-")
    return _write_entry(name, payload)


@contextlib.contextmanager
def _lock_between_processes(path):
    """An exclusive flock on the file at path for the duration. The kernel drops it when its holder dies, so a
    process killed while it builds holds nobody up. Where there is nothing to lock with (no fcntl, a directory that
    cannot be written, a file system without locks), the block runs unlocked: each process builds, as before."""
    fd = None
    if fcntl is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _read_checked(path):
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    if len(blob) < 40 or blob[-8:] != _MAGIC:
        return None
    payload, digest = blob[:-40], blob[-40:-8]
    return payload if hashlib.sha256(payload).digest() == digest else None


def cached_payload(path) -> bytes:
    """The payload of a cache file written by disk_cached (without the checksum trailer)."""
    with open(path, "rb") as f:
        return f.read()[:-40]


def _program_target(dev) -> str:
    """What a compiled program is specific to: the backend, and for GPUs the architecture."""
    arch = getattr(dev, "arch", None)
    return f"{dev.kind}:{arch}" if arch else dev.kind


def get_program(device: str, ast: UOp, bufs):
    dev = Device[device]
    key = (_program_target(dev), ast, pg.TF32)
    prog = _programs.get(key)
    if prog is None:
        prog = _programs[key] = _build_program(device, ast, bufs)
    return prog


class ExecItem:
    """A ready-to-run kernel launch or copy: what a schedule item becomes, and what a capture records."""
    __slots__ = ("prog", "bufs", "var_vals", "device")

    def __init__(self, prog, bufs, var_vals, device):
        self.prog, self.bufs, self.var_vals, self.device = prog, bufs, var_vals, device

    def run(self, bufs=None, var_vals=None):
        bufs = self.bufs if bufs is None else bufs
        if self.prog is None:   # a copy: bufs = [dst, src]
            _copy(bufs[0], bufs[1])
            return
        self.prog(bufs, self.var_vals if var_vals is None else var_vals)
        pg._STATS["kernels_launched"] += 1


def copy_buffer(dst: Buffer, src: Buffer):
    """Copy src's contents into dst (any devices), as a recorded step when a trace is being captured."""
    ei = ExecItem(None, [dst, src], {}, dst.device)
    ei.run()
    if pg.CTX.capturing is not None:
        pg.CTX.capturing.record(ei)


def _copy(dst: Buffer, src: Buffer):
    pg._STATS["copies"] += 1
    if dst.device == src.device:
        Device[dst.device].copy_within(dst.mem, src.mem, dst.nbytes)
        return
    src_dev, dst_dev = Device[src.device], Device[dst.device]
    if hasattr(dst_dev, "copy_from_peer") and dst_dev.kind == src_dev.kind:
        dst_dev.copy_from_peer(dst, src)
        return
    src_dev.synchronize()
    dst.copyin(src.copyout())


def _compile_ahead(items):
    """Build the programs a schedule is missing, in parallel (the compilers run as separate processes)."""
    missing = {}
    for item in items:
        if item.ast is not None and item.bufs[0].size:
            key = (_program_target(Device[item.device]), item.ast, pg.TF32)
            if key not in _programs and key not in missing:
                missing[key] = item
    if len(missing) < 2:
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for key, prog in zip(missing, pool.map(lambda it: _build_program(it.device, it.ast, it.bufs),
                                               missing.values())):
            _programs[key] = prog


def _build_program(device, ast, bufs):
    kernel = lower_kernel(ast, [b.size for b in bufs])
    prog = Device[device].build(kernel)
    pg._STATS["kernels_compiled"] += 1
    return prog


def run_schedule(items):
    """Run the steps in order. Results are published (nodes marked realized, assigned buffers' versions bumped)
    only after the bounds checks of every kernel have passed, so a failed step leaves nothing half-computed behind
    to be reused; on the CPU a failing check stops the schedule at that kernel."""
    devices = set()
    _compile_ahead(items)
    for item in items:
        if item.bufs[0].size == 0:   # nothing to write (a tensor with a zero-size dimension)
            continue
        prog = item.program or (None if item.ast is None else get_program(item.device, item.ast, item.bufs))
        ei = ExecItem(prog, item.bufs, item.var_vals, item.device)
        start = time.perf_counter() if pg.DEBUG >= 2 else 0.0
        ei.run()
        if pg.CTX.capturing is not None:
            pg.CTX.capturing.record(ei)
        if pg.DEBUG >= 2:
            _debug_print(ei, item, start)
        devices.add(item.device)
        if item.device == "CPU" and getattr(getattr(prog, "kernel", None), "uses_check", False):
            Device["CPU"].check_errors()
    for device in devices:
        Device[device].check_errors()
    for item in items:
        _mark_done(item)


def _mark_done(item):
    if item.assign_target is not None:
        item.assign_target.version += 1
        if pg.CTX.capturing is not None:
            pg.CTX.capturing.wrote(item.assign_target)
        item.root.assigned = _rebase_view(item.root.src[0], item.assign_target)
    elif item.root.device is not None:
        # a node of constants only (no device) is shared by every device's graphs: it is not memoized, since
        # the buffer belongs to one device
        item.root.realized = item.bufs[0]


def _rebase_view(view: UOp, buf: Buffer) -> UOp:
    """The same chain of movement ops over the buffer's current version."""
    if view.op is Ops.BUFFER:
        return UOp(Ops.BUFFER, view.dtype, (), (buf, buf.version))
    return UOp(view.op, view.dtype, (_rebase_view(view.src[0], buf),), view.arg)


def _debug_print(ei, item, start):
    Device[item.device].synchronize()
    took = time.perf_counter() - start
    if ei.prog is None or isinstance(ei.prog, CustomProgram):
        what = "copy" if ei.prog is None else ei.prog.custom.name
        print(f"  {what} {item.bufs[1].device} -> {item.bufs[0].device} {item.bufs[0].nbytes} bytes "
              f"{took * 1e6:9.1f} us", file=sys.stderr)
        return
    k = ei.prog.kernel
    print(f"  {k.name:<32} {took * 1e6:9.1f} us  {k.flops / took / 1e9:8.2f} GFLOP/s  "
          f"{k.mem_bytes / took / 1e9:8.2f} GB/s", file=sys.stderr)
    if pg.DEBUG >= 3:
        print(ei.prog.source, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Graph capture: @pg.compile


class Capture:
    """What a trace records: each launch with its buffers held weakly (by serial number), so that after the trace
    the buffers nobody kept are known to be the step's own intermediates."""

    def __init__(self):
        self.launches = []   # (prog, [(serial, weakref, size, dtype, device)], var_vals, device)
        self.writes = {}     # serial -> [weakref, count]: the buffers that assigns and setitems wrote, and how often
        self.written_tensors = []   # weakrefs of the tensors that made those writes

    def wrote(self, buf: Buffer):
        self.writes.setdefault(buf.serial, [weakref.ref(buf), 0])[1] += 1

    def record(self, ei: ExecItem):
        refs = [(b.serial, weakref.ref(b), b.size, b.dtype, b.device) for b in ei.bufs]
        self.launches.append((ei.prog, refs, dict(ei.var_vals), ei.device))


class CompiledFunction:
    """fn traced once per input signature; later calls replay the recorded kernels on the new inputs.

    The first call with a new signature runs fn in graph mode (a warm-up: lazy initialization such as optimizer
    state or caches happens there, not in the capture, since the capture must describe every later call); the
    second call traces; later calls replay."""

    def __init__(self, fn, max_traces=16):
        self.fn, self.max_traces = fn, max_traces
        self.traces, self.warmed = {}, set()
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if pg.CTX.capturing is not None:
            return self.fn(*args, **kwargs)   # called inside another trace: part of it
        pg.realize(*pg.pending_assigns())   # the caller's writes come first, and are not part of the step
        flat = list(args) + [kwargs[k] for k in sorted(kwargs)]
        signature = tuple(_signature_of(a) for a in flat)
        trace = self.traces.get(signature)
        if trace is not None and trace.is_stale():
            del self.traces[signature]
            trace = None
        if trace is None and signature not in self.warmed:
            self.warmed.add(signature)
            out = self.fn(*args, **kwargs)
            pg.realize(*_flatten_outputs(out))
            return out
        if trace is None:
            if len(self.traces) >= self.max_traces:
                raise RuntimeError(f"{self.fn.__name__} was traced {len(self.traces)} times for different input "
                                   f"signatures (shapes, dtypes, static ints); pass changing ints as pg.Variable")
            trace = Trace(self.fn, args, kwargs)
            self.traces[signature] = trace
            result, trace.first_result = trace.first_result, None
            return result
        return trace.replay(flat)

    def chain(self, n: int, *args, feed: int, var: str) -> tuple[pg.Tensor, pg.Tensor]:
        """n calls in a row, as a loop over them would make them: call i + 1 takes call i's result as its argument
        number `feed` (reshaped to that argument's shape) and its Variable argument named `var` one higher. fn
        returns one tensor. Returns the n results stacked, [n, *shape], and the last one on its own (whole, so it
        can feed the next chain without a copy). A device whose captured graphs chain (the CPU's) runs the n
        replays in one native call, so the Python between calls is paid once, not n times; elsewhere, and before
        the trace exists, this is the loop itself."""
        if n < 1:
            raise ValueError(f"chain needs n >= 1 calls, got {n}")
        args = list(args)
        where = [k for k, a in enumerate(args) if isinstance(a, Variable) and len(a.terms) == 1 and
                 a.terms[0][0].op is Ops.BIND and a.terms[0][0].src[0].arg[0] == var and a.terms[0][1] == 1]
        if len(where) != 1 or not isinstance(args[feed], pg.Tensor):
            raise ValueError(f"chain needs a tensor argument {feed} to feed and one bound Variable named {var!r}")
        step = args[where[0]]
        name, lo, hi = step.terms[0][0].src[0].arg
        if step.val + n - 1 > hi:
            raise ValueError(f"chain of {n} calls takes Variable {name!r} from {step.val} to {step.val + n - 1}, past "
                             f"its range [{lo}, {hi}]")
        if pg.CTX.capturing is None:   # (inside another trace, the loop below records the calls)
            pg.realize(*pg.pending_assigns())   # as a call does: the caller's writes first
            trace = self.traces.get(tuple(_signature_of(a) for a in args))
            if trace is not None and not trace.is_stale():
                chained = trace.replay_chain(args, n, feed, var)
                if chained is not None:
                    return chained
        results, shape = [], args[feed].shape
        for i in range(n):
            if i:
                args[feed] = results[-1].reshape(shape)
                args[where[0]] = Variable(name, lo, hi).bind(step.val + i)
            results.append(self(*args))
            if not isinstance(results[-1], pg.Tensor) or results[-1].numel() != args[feed].numel():
                raise ValueError(f"chain needs {self.fn.__name__} to return one tensor of argument {feed}'s size")
        return pg.stack(results), results[-1]


def _signature_of(a):
    if isinstance(a, pg.Tensor):
        return ("tensor", a.shape, a.dtype.name, a.device, a.requires_grad)
    if isinstance(a, Variable):
        return ("var",) + tuple((n if n.op is Ops.DEFINE_VAR else n.src[0]).arg for n, _ in a.terms) + (a.const,)
    if isinstance(a, float):
        return ("float",)
    try:
        hash(a)
    except TypeError:
        raise TypeError(f"compiled function argument of type {type(a).__name__}: pass tensors, numbers, "
                        f"pg.Variable or hashable static values") from None
    return ("static", type(a).__name__, a)


class Trace:
    """One captured call of fn: the launches in order, each buffer bound to a slot (an input, an output, memory
    planned for the step's intermediates, or long-lived state such as parameters), and the guards that tell when
    the capture no longer describes what fn would do."""

    def __init__(self, fn, args, kwargs):
        pg._STATS["traces"] += 1
        flat_in = list(args) + [kwargs[k] for k in sorted(kwargs)]
        # runtime inputs: tensors (their buffers are rebound per call) and Python floats (0-d device tensors)
        self.float_args = {}
        call = []
        for k, a in enumerate(flat_in):
            if isinstance(a, pg.Tensor):
                # a fresh copy: nothing computed from it can already be memoized, so every kernel that depends on
                # the inputs runs (and is recorded) during the trace
                src = a.contiguous().realize()
                fresh = pg.Tensor.empty(*a.shape, dtype=a.dtype, device=a.device)
                copy_buffer(fresh._buffer(), src._buffer())
                call.append(fresh.requires_grad_(True) if a.requires_grad else fresh)
            elif isinstance(a, float):
                t = pg.Tensor.full((), a).realize()
                self.float_args[k] = t
                call.append(t)
            else:
                call.append(a)
        input_serials = {t._buffer().serial: k for k, t in enumerate(call) if isinstance(t, pg.Tensor)}
        # the caller's pending assigns have run (CompiledFunction.__call__): any assign now pending is the step's
        closure_reads = _closure_reads(fn)
        first_serial = Buffer.next_serial()
        capture = Capture()
        # the step's intermediates are told by their buffers being freed: those kept only by reference cycles must
        # be gone before _bind looks
        with _cycles_made_inside_collected():
            pg.CTX.capturing = capture
            try:
                result = fn(*call[:len(args)], **dict(zip(sorted(kwargs), call[len(args):])))
                outs = _flatten_outputs(result)
                # the step's assigns are its effects, recorded even if no output needs them
                pg.realize(*outs, *pg.pending_assigns())
            finally:
                pg.CTX.capturing = None
            for t in outs:   # outputs are plain buffers: their graphs (and the intermediates they pin) are dropped
                buf = t._buffer()
                if buf.serial < first_serial:
                    continue   # long-lived state returned as it is (a parameter): the caller's tensor, left alone
                t.uop, t.requires_grad = UOp(Ops.BUFFER, t.dtype, (), (buf, buf.version)).reshape(t.shape), False
        self.guards = _closure_guards(closure_reads)
        self.first_result, self.structure = result, _skeleton(result)
        self.out_shapes = [t.shape for t in outs]
        self._bind(capture.launches, input_serials, [t._buffer() for t in outs], first_serial)
        self._keep_writes(capture)
        self.state_paths = _state_paths([getattr(fn, "__self__", None)] + [value for _, value in closure_reads],
                                        self.state_serials)

    def _keep_writes(self, capture):
        """The long-lived buffers that the step writes in place (parameters, optimizer state, a KV cache): each with
        how many writes a call makes, and the tensors that made them, which view its new version."""
        writers = {}
        for ref in capture.written_tensors:
            t = ref()
            view = None if t is None else _current_view(t)
            if view is not None:
                writers.setdefault(view.base().arg[0].serial, {})[id(t)] = ref
        self.state_writes = [(ref, count, list(writers.get(serial, {}).values()))
                             for serial, (ref, count) in capture.writes.items() if serial in self.state_serials]

    def _publish_writes(self, calls: int = 1):
        """After `calls` replays, which wrote the state again. A written buffer's version moves on, as the traced
        call's writes moved it, wherever something besides its writers may hold the old version: a lazy tensor built
        over the old contents then fails to realize, as it would outside a trace, instead of reading the new ones.
        The writers move on with it. Where nothing else can hold it (the usual case: nothing was built over the state
        between calls) it stays: new views cost 5-10 us a tensor, 0.13 ms of a 1.5 ms stories15M token."""
        for buf_ref, count, writer_refs in self.state_writes:
            buf = buf_ref()
            if buf is None or (writer_refs and all(_viewed_only_by(ref(), buf) for ref in writer_refs)):
                continue
            writers = [ref() for ref in writer_refs]
            views = [None if t is None else _current_view(t) for t in writers]
            buf.version += count * calls
            for t, view in zip(writers, views):
                if view is not None:
                    t.uop = _rebase_view(view, buf)

    def _bind(self, launches, input_serials, out_bufs, first_serial):
        output_serials = {}   # each output buffer's first place among the results
        for k, b in enumerate(out_bufs):
            output_serials.setdefault(b.serial, k)
        lifetime, meta = {}, {}
        for step, (_, refs, _, _) in enumerate(launches):
            for serial, ref, size, dtype, device in refs:
                lifetime.setdefault(serial, [step, step])[1] = step
                meta[serial] = (ref, size, dtype, device)
        # a buffer created during the trace that nothing outside holds any more is the step's own intermediate:
        # those share planned memory. An output created in the step gets a fresh buffer on every call, so results
        # of earlier calls stay valid; an output that is long-lived state (a returned parameter) is copied out.
        created = {s for s in meta if s >= first_serial and s not in input_serials}
        planned = {s for s in created if s not in output_serials and meta[s][0]() is None}
        pool, assigned, free = [], {}, []
        for step, (_, refs, _, _) in enumerate(launches):
            for serial, _, size, dtype, device in refs:
                if serial in planned and serial not in assigned:
                    match = next((b for b in free if (b.size, b.dtype, b.device) == (size, dtype, device)), None)
                    if match is None:
                        match = Buffer(device, size, dtype)
                        pool.append(match)
                    else:
                        free.remove(match)
                    assigned[serial] = match
            for serial, *_ in refs:
                if serial in assigned and lifetime[serial][1] == step:
                    free.append(assigned[serial])
        self.pool = pool
        # a buffer returned twice is one buffer on every call: its later places alias the first
        self.outputs = [("alias", output_serials[b.serial]) if output_serials[b.serial] != k else
                        ("fresh", (b.device, b.size, b.dtype)) if b.serial in created else ("copy", b)
                        for k, b in enumerate(out_bufs)]
        self.launches = []
        state = {}   # serial -> weak reference, for each long-lived buffer the launches touch
        for prog, refs, var_vals, device in launches:
            slots = []
            for serial, ref, *_ in refs:
                if serial in input_serials:
                    slots.append(("input", input_serials[serial]))
                elif serial in output_serials and serial in created:
                    slots.append(("output", output_serials[serial]))
                elif serial in assigned:
                    slots.append(("fixed", assigned[serial]))
                else:
                    # long-lived state (parameters, optimizer state, constants): held weakly; if it is freed, the
                    # tensor that owned it is gone and the capture is stale
                    slots.append(("state", ref))
                    state[serial] = ref
            self.launches.append((prog, slots, var_vals, device))
        # the state's liveness is watched by weak references whose callbacks mark the capture stale, rather than
        # checked on every call: a Llama step holds a few hundred parameters (the checks were 60 us of a 2 ms
        # token). The flag is a list so that the callbacks do not keep the trace alive.
        self.state_freed = freed = [False]
        self.state_watches = []
        self.state_serials = set(state)
        for ref in state.values():
            owner = ref()
            if owner is None:
                freed[0] = True   # already gone
            else:
                self.state_watches.append(weakref.ref(owner, lambda _, f=freed: f.__setitem__(0, True)))
        self.recorded_vars = {}   # each variable's value at trace time, for calls that leave it out
        for _, _, var_vals, _ in self.launches:
            self.recorded_vars.update(var_vals)
        self.input_meta = {k: (meta[s][3], meta[s][1], meta[s][2]) for s, k in input_serials.items() if s in meta}
        self.kernel_count = sum(1 for prog, *_ in self.launches if prog is not None)
        self.graph, self.graph_device = None, self._graph_device()

    def is_stale(self):
        return self.state_freed[0] or not all(guard() for guard in self.guards) or _paths_moved(self.state_paths)

    def _graph_device(self):
        """The device whose graph can replay the whole step: every launch a kernel or copy on one device that
        captures graphs (Python steps, such as MPI collectives, cannot be captured)."""
        devices = {device for _, _, _, device in self.launches}
        if len(devices) != 1 or any(isinstance(prog, CustomProgram) for prog, *_ in self.launches):
            return None
        device = Device[devices.pop()]
        return device if hasattr(device, "capture_graph") else None

    def _capture_graph(self, device):
        """Hand the launches to the device, every buffer bound except the inputs and outputs of the call; the
        device may decline (returns None) and the launches are then replayed one by one."""
        steps = []
        for prog, slots, recorded_vars, dev in self.launches:
            bound = []
            for kind, ref in slots:
                if kind in ("input", "output"):
                    bound.append((kind, ref))
                else:
                    buf = ref if kind == "fixed" else ref()
                    buf.mem   # allocated now: a graph is built over fixed memory
                    bound.append(("buffer", buf))
            steps.append((prog, bound, recorded_vars))
        outputs = {k: spec for k, (kind, spec) in enumerate(self.outputs) if kind == "fresh"}
        return device.capture_graph(steps, self.input_meta, outputs)

    def replay(self, flat):
        pg._STATS["replays"] += 1
        inputs, var_vals = self._inputs(flat)
        outs = [Buffer(*spec) if kind == "fresh" else None for kind, spec in self.outputs]
        if self._graph() is not None:
            return self._replay_graph(inputs, outs, var_vals)
        devices = set()
        for prog, slots, recorded_vars, device in self.launches:
            bufs = [inputs[ref] if kind == "input" else outs[ref] if kind == "output" else ref if kind == "fixed"
                    else ref() for kind, ref in slots]
            vv = {name: var_vals.get(name, value) for name, value in recorded_vars.items()}
            ExecItem(prog, bufs, vv, device).run()
            devices.add(device)
        for device in devices:
            Device[device].check_errors()
        self._publish_writes()
        return self._results(outs)

    def replay_chain(self, flat, n: int, feed: int, var: str):
        """CompiledFunction.chain on a graph that chains: one output buffer holds the n results (and another a copy
        of the last), and the graph points each replay's input `feed` at the last replay's result. None where the
        graph cannot (no graph, or a step that is not one fresh output the size of that input)."""
        chains = getattr(self._graph(), "replay_chain", None)
        if chains is None or len(self.outputs) != 1 or self.outputs[0][0] != "fresh" or feed not in self.input_meta:
            return None
        device, size, dtype = self.outputs[0][1]
        if self.input_meta[feed] != (device, size, dtype):
            return None
        inputs, var_vals = self._inputs(flat)
        out, last = Buffer(device, n * size, dtype), Buffer(device, size, dtype)
        if not chains({k: inputs[k] for k in self.input_meta}, out, last, self._var_values(var_vals), n, feed, var):
            return None
        pg._STATS["replays"] += n
        pg._STATS["kernels_launched"] += n * self.kernel_count
        self.graph_device.check_errors()
        self._publish_writes(n)
        shape = self.out_shapes[0]
        return _buffer_tensor(out, (n, *shape)), _buffer_tensor(last, shape)

    def _graph(self):
        """The device's graph of the launches, made on the first replay; None where the device has none."""
        if self.graph is None and self.graph_device is not None:
            self.graph = self._capture_graph(self.graph_device)
            if self.graph is None:
                self.graph_device = None
        return self.graph

    def _inputs(self, flat):
        """A call's arguments as the replay takes them: the tensors' buffers (contiguous), float arguments written
        to their one-element buffers, and the values of the Variables."""
        inputs, var_vals = [], {}
        for k, a in enumerate(flat):
            if isinstance(a, pg.Tensor):
                inputs.append(a.contiguous().realize()._buffer())
            elif k in self.float_args:
                buf = self.float_args[k]._buffer()
                buf.copyin(np.array([a], dtype=np.float32))
                inputs.append(buf)
            else:
                inputs.append(None)
                if isinstance(a, Variable):
                    for node, _ in a.terms:
                        var_vals[node.src[0].arg[0]] = node.src[1].arg
        return inputs, var_vals

    def _var_values(self, var_vals):
        """Every variable the launches take: the call's value, or the one recorded where the call left it out."""
        return {name: var_vals.get(name, value) for name, value in self.recorded_vars.items()}

    def _results(self, outs):
        """The call's result: fresh output buffers as tensors (outputs that are long-lived state copied first, repeated
        outputs the same tensor's buffer again)."""
        for k, (kind, src) in enumerate(self.outputs):
            if kind == "copy":
                outs[k] = Buffer(src.device, src.size, src.dtype)
                _copy(outs[k], src)
            elif kind == "alias":
                outs[k] = outs[src]
        fresh = [_buffer_tensor(b, shape) for b, shape in zip(outs, self.out_shapes)]
        return _unflatten_outputs(self.structure, iter(fresh))

    def _replay_graph(self, inputs, outs, var_vals):
        self.graph.replay({k: inputs[k] for k in self.input_meta}, {k: b for k, b in enumerate(outs) if b},
                          self._var_values(var_vals))
        pg._STATS["kernels_launched"] += self.kernel_count
        self.graph_device.check_errors()
        self._publish_writes()
        return self._results(outs)


def _check_current(node: UOp) -> Buffer:
    """node's buffer, which must still hold the version node was made over."""
    buf, version = node.arg
    if version != buf.version:
        raise RuntimeError("a tensor used in this computation was modified in place (assign or setitem) after the "
                           "computation was built; realize() it before writing to its memory")
    return buf


def _current_view(t: pg.Tensor) -> UOp | None:
    """t as a view of its buffer's current version (for an assign that has run, the view it left), or None."""
    view = t.uop.assigned if t.uop.op is Ops.ASSIGN else t.uop
    if view is None:
        return None
    base = view.base()
    return view if base.op is Ops.BUFFER and base.arg[1] == base.arg[0].version else None


def _refcount_of_one_holder():
    holder = [object()]
    node = holder[0]
    return sys.getrefcount(node)


_ONE_HOLDER = _refcount_of_one_holder()   # what sys.getrefcount(node) reads for a local held by one other place


def _viewed_only_by(t: pg.Tensor | None, buf: Buffer) -> bool:
    """Whether nothing but t can have been built over t's view of buf: t views buf's current version, and no node of
    its chain (its uop, down through an assign and the movement ops to the buffer) is referenced from anywhere but
    the node above it, as one would be from a graph built over t. CPython's reference counts tell, as numpy's resize
    check does; a reference the count cannot place only ever answers no."""
    node = None if t is None else t.uop
    while node is not None and sys.getrefcount(node) <= _ONE_HOLDER:
        if node.op is Ops.BUFFER:
            return node.arg[0] is buf and node.arg[1] == buf.version
        node = node.assigned if node.op is Ops.ASSIGN else node.src[0] if node.op in MOVEMENT else None
    return False


def _buffer_tensor(buf, shape) -> pg.Tensor:
    """A tensor that is the whole of buf, in shape."""
    return pg.Tensor._wrap(UOp(Ops.BUFFER, buf.dtype, (), (buf, 0)).reshape(shape), buf.device)


@contextlib.contextmanager
def _cycles_made_inside_collected():
    """On leaving, the garbage cycles among the objects made inside are collected. A full collection would do it too,
    but it walks every object of the process (with torch loaded some 200,000, 0.2-0.5 s). Automatic collections are
    held off meanwhile, so that nothing made inside moves on from the youngest generation, and a collection of that
    generation alone reaches all of it. (A cycle through an older object stays: what it holds counts as state.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.collect(0)
    finally:
        if enabled:
            gc.enable()


def _flatten_outputs(out):
    if isinstance(out, pg.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten_outputs(out[k])]
    if out is None:
        return []
    raise TypeError(f"a compiled function must return tensors (or tuples, lists, dicts of them, or None), got "
                    f"{type(out).__name__}")


_OUT = object()   # where a tensor stood in a compiled function's result


def _skeleton(out):
    """The result's structure with each tensor replaced by a marker (the capture must not keep results alive)."""
    if isinstance(out, pg.Tensor):
        return _OUT
    if isinstance(out, (tuple, list)):
        return type(out)(_skeleton(o) for o in out)
    if isinstance(out, dict):
        return {k: _skeleton(v) for k, v in out.items()}
    return None


def _unflatten_outputs(structure, fresh):
    if structure is _OUT:
        return next(fresh)
    if isinstance(structure, (tuple, list)):
        return type(structure)(_unflatten_outputs(s, fresh) for s in structure)
    if isinstance(structure, dict):
        return {k: _unflatten_outputs(structure[k], fresh) for k in sorted(structure)}
    return None


# What the walk for state paths does not enter: picograd's own machinery, and code
_NOT_STATE_HOLDERS = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                      CompiledFunction, Trace, Buffer)


def _state_paths(roots, state: set, max_depth: int = 4, max_items: int = 4096) -> list:
    """Where the step's long-lived state is held among what fn holds (its object, the values in its closure and the
    globals it names), through object attributes, dicts, lists and tuples, up to max_depth steps: (container, keys,
    values) for each container with an entry on a path to a tensor over a state buffer, the container a dict (an
    object's attributes are its __dict__) or a list. A call checks that each still holds its values: a model whose
    weight was rebound (model.weights[name] = new) while an optimizer still holds the old tensor would otherwise
    go on replaying over the old one. A tuple cannot change, so the steps inside one are not kept; containers of
    more than max_items entries (a tokenizer's vocabulary) are not entered."""
    held = {}    # id of a container -> (container, {key: value}) for the entries on a path to state
    leads = {}   # id of a container already walked -> whether it leads to state

    def walk(value, depth) -> bool:
        if isinstance(value, pg.Tensor):
            view = _current_view(value)
            return view is not None and view.base().arg[0].serial in state
        if depth == max_depth or isinstance(value, _NOT_STATE_HOLDERS) or id(value) in leads:
            return leads.get(id(value), False)
        if isinstance(value, dict):
            container, items = value, list(value.items())
        elif isinstance(value, (list, tuple)):
            container, items = (value if isinstance(value, list) else None), list(enumerate(value))
        else:
            try:
                container = vars(value)
            except Exception:   # no attributes of its own (a number, a string), or a __getattr__ that raises
                return False
            items = list(container.items())
        leads[id(value)] = False
        if len(items) > max_items:
            return False
        for key, child in items:
            if walk(child, depth + 1):
                leads[id(value)] = True
                if container is not None:
                    held.setdefault(id(container), (container, {}))[1][key] = child
        return leads[id(value)]

    for root in roots:
        walk(root, 0)
    return [(container, tuple(entries), tuple(entries.values())) for container, entries in held.values()]


def _paths_moved(paths) -> bool:
    """Whether any container of _state_paths no longer holds its values under their keys, compared by identity in
    C: a stories110M decode step's 150 paths take 3-6 us warm."""
    for container, keys, values in paths:
        try:
            if not all(map(operator.is_, map(container.__getitem__, keys), values)):
                return True
        except (KeyError, IndexError):
            return True
    return False


def _closure_reads(fn):
    """What fn reads by name from its closure and module globals: (read, value), read() giving the name's value now."""
    reads = []
    code = getattr(fn, "__code__", None)
    if code is None:
        return reads
    for cell in fn.__closure__ or ():
        try:
            reads.append((lambda c=cell: c.cell_contents, cell.cell_contents))
        except ValueError:   # a free variable not bound yet
            continue
    for name in code.co_names:
        if name in fn.__globals__:
            reads.append((lambda g=fn.__globals__, n=name: g.get(n), fn.__globals__[name]))
    return reads


def _closure_guards(reads):
    """Guards over what fn read by name, made after the capture from the values before it: a rebound tensor or a
    changed Python number means the capture is stale and fn is traced again."""
    guards = [_guard_for(read, value) for read, value in reads]
    return [g for g in guards if g is not None]


def _guard_for(read, value):
    """The name still holds the same tensor, as the capture left it or written in place since (a replay writes the
    tensor's buffer and leaves the tensor alone; the caller's own assign leaves it a new version of the same buffer),
    or an equal number or string. A name the step rebinds itself fails at once: no replay does that."""
    if isinstance(value, pg.Tensor):
        uop, buf = value.uop, value._buffer()

        def guard():
            return read() is value and (value.uop is uop or (buf is not None and value._buffer() is buf))
    elif isinstance(value, (int, float, str)):
        def guard():
            return type(read()) is type(value) and read() == value
    else:
        return None
    return guard if guard() else lambda: False
