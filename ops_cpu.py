"""picograd CPU backend: the C renderer (which the CUDA renderer extends), gcc -> shared object -> ctypes, CPU
memory, OpenMP threads.

Read top to bottom: the renderer turns a lowered compile.Kernel into C (one function, loops around one store,
reductions as accumulator loops emitted where their value is first needed); the compiler runs gcc with the disk
cache from compile.py; the device owns memory (a caching allocator over aligned numpy arrays) and the error
flags that bounds-checked kernels set.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

import picograd as pg
from picograd import UOp, Ops, float32, int32, bool_
import compile as compiler

# ----------------------------------------------------------------------------------------------------------------------
# The C renderer


def _float_literal(v: float) -> str:
    if v != v:
        return "NAN"
    if v in (float("inf"), float("-inf")):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    text = repr(float(v))
    return f"{text}f" if ("." in text or "e" in text) else f"{text}.0f"


# exp2, log2 and sin written out so that gcc can vectorize loops that call them (libm's scalar calls stop it).
# Each is within 2 ulp of the correctly rounded float result over its whole range, NaN, infinities and
# denormals included (test_picograd.py checks them against float64).
VECTOR_MATH = r"""
typedef union { float f; int i; unsigned u; } pg_bits;
static inline float pg_exp2(float x) {
  /* Integer work and FMAs only: float compares and blends (a clamp on x, a NaN check) made it a quarter slower,
     and in a softmax it is most of the compute that memory has to hide. Beyond |x| = 151 the result is 0 or inf
     whatever x is, and within it 2^n splits into two normal floats. At most 0.95 ulp off over every float. */
  pg_bits in, xc, scaled, half, r;
  in.f = x;
  int ax = in.i & 0x7fffffff;                                        /* |x|'s bits, ordered like |x| */
  xc.i = (ax < 0x43170000 ? ax : 0x43170000) | (in.i ^ ax);         /* |x| clamped to 151.0f, sign kept */
  float n = rintf(xc.f), f = xc.f - n;                              /* 2^x = 2^n 2^f, |f| <= 1/2 */
  float p = 1.0f + f * (0.69314718f + f * (0.24022648f + f * (0.055503324f + f * (0.0096184369f
          + f * (0.0013398875f + f * 1.5353362e-4f)))));            /* minimax, relative error 2e-9 */
  int ni = (int)n, a = ni >> 1, b = ni - a;                         /* 2^n = 2^a 2^b, both normal floats */
  scaled.f = p;
  scaled.u += (unsigned)a << 23;                                    /* p 2^a, exact: added to p's exponent */
  half.i = (b + 127) << 23;
  r.f = scaled.f * half.f;                      /* one rounding: denormal results are right, overflow is inf */
  r.i |= -(ax > 0x7f800000);                                        /* NaN in, NaN out */
  return r.f;
}
static inline float pg_log2(float x) {
  float scaled = x < 1.17549435e-38f ? x * 8388608.0f : x;        /* denormals: scale by 2^23 first */
  pg_bits b;
  b.f = scaled;
  int e = ((b.i >> 23) & 0xff) - 127 - (x < 1.17549435e-38f ? 23 : 0);
  b.i = (b.i & 0x7fffff) | 0x3f800000;                               /* mantissa in [1, 2) */
  float m = b.f > 1.41421356f ? b.f * 0.5f : b.f;
  e += b.f > 1.41421356f ? 1 : 0;
  double s = ((double)m - 1.0) / ((double)m + 1.0), s2 = s * s;     /* log(m) = 2 atanh(s), in double */
  float r = (float)((double)e + s * (2.8853900817779268 + s2 * (0.96179669392597560 + s2 * (0.57707801635558536
          + s2 * (0.41219858311113240 + s2 * (0.32059889797532520 + s2 * 0.26230818925253880))))));
  r = x == 0.0f ? -INFINITY : r;
  r = x == INFINITY ? INFINITY : r;
  return (x < 0.0f || x != x) ? NAN : r;
}
static inline float pg_sin(float x) {
  double k = floor((double)x * 0.63661977236758134 + 0.5);            /* nearest multiple of pi/2 */
  float r = (float)(((double)x - k * 1.5707963267341256) - k * 6.0771005065061922e-11);
  int q = (int)(k - 4.0 * floor(k * 0.25));                          /* quadrant 0..3 */
  float r2 = r * r;
  float sn = r + r * r2 * (-0.16666667f + r2 * (0.0083333333f + r2 * (-1.9841270e-4f + r2 * 2.7557319e-6f)));
  float cs = 1.0f + r2 * (-0.5f + r2 * (0.041666667f + r2 * (-0.0013888889f + r2 * (2.4801587e-5f
           - r2 * 2.7557319e-7f))));
  float v = (q & 1) ? cs : sn;
  return (q & 2) ? -v : v;
}
"""

# Streaming stores write memory without first reading in each cache line they fill (a normal store does, so a copy
# moves three bytes for every two it is asked to) and without keeping the lines in cache. `aligned` says that the
# output starts on 32 bytes (the kernel checks once; its vectors are then aligned too, see CRenderer.streams).
# gcc's builtins, not <immintrin.h>: parsing that header added 0.4 s to every kernel's compile. AddressSanitizer
# builds take the plain loop, which it checks.
STREAM_STORES = r"""
#if defined(__AVX__) && !defined(__SANITIZE_ADDRESS__)
#define PG_STREAM 1
typedef float pg_v8f __attribute__((vector_size(32), aligned(4)));
#endif
static inline void pg_stream(float* dst, const float* v, int aligned) {   /* 8 floats */
#ifdef PG_STREAM
  if (aligned) {
    __builtin_ia32_movntps256(dst, *(const pg_v8f*)v);
    return;
  }
#endif
  for (int i = 0; i < 8; i++)
    dst[i] = v[i];
}
static inline void pg_stream_fence(void) {   /* streaming stores are weakly ordered: other threads read these */
#ifdef PG_STREAM
  __builtin_ia32_sfence();
#endif
}
"""

# Where thread t of `threads` starts its slice of n iterations (t = threads: the end), on a multiple of `step`.
SLICE = r"""
static inline int pg_slice(int t, int threads, int n, int step) {
  return t == threads ? n : (int)((long)t * n / threads / step * step);
}
"""


# Below this many operations a kernel runs on one thread: waking the others costs more than it saves. Counted in
# operations, a decode step's attention is small, but it reads a KV cache that the step's weight stream has just
# evicted, one miss at a time: at 2^18 a stories15M token at positions 200-248 spent 470-490 us in its small
# kernels, at 2^16 (the attention of 128 positions and more on two threads) 260-290.
PARALLEL_WORK = 1 << 16


def last_level_cache_bytes() -> int:
    """The largest cache of the first core (the shared L3 on a server), from sysfs; 32 MB where it cannot be read."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 << 20)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where it cannot be read). gcc builds every
    kernel for this CPU (-march=native); the renderers read the flags to shape code for it."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split(":")[-1].split())
    except OSError:
        return frozenset()


def gemm_vector() -> int:
    """Floats per vector register for the matmul micro-kernel: 16 where the CPU has AVX-512, else 8 (AVX2)."""
    return 16 if "avx512f" in cpu_flags() else 8


def cpu_threads() -> int:
    """The cores this process may run on (a taskset or container limit), not the machine's count."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)) or 1)


class CRenderer:
    """Prints a lowered Kernel as a C function. Subclasses (CUDA) override the pieces that differ: the function
    header, how output loops map to hardware, intrinsics and type names."""
    restrict = "restrict"
    threads = cpu_threads()
    math_fns = {Ops.EXP2: "pg_exp2", Ops.LOG2: "pg_log2", Ops.SIN: "pg_sin", Ops.SQRT: "sqrtf"}
    preamble = ("#include <math.h>\n#include <limits.h>\n" + VECTOR_MATH + STREAM_STORES + SLICE +
                "static inline int pg_check(int i, int n, int* err) {\n"
                "  if ((unsigned)i >= (unsigned)n) { err[0] = 1; err[1] = i; err[2] = n; return 0; }\n"
                "  return i;\n}\n")
    # A float output at least this big is written with streaming stores (see streams): the next kernel would not
    # find it in cache anyway. A parked row (see park_shared_value) then waits in a stack array of at most
    # PARK_ROW floats.
    STREAM_BYTES = last_level_cache_bytes()
    PARK_ROW = 1 << 15   # 128 KB of stack: a row of a 32000-word vocabulary fits
    VECTOR = 8   # floats per pg_stream

    def ctype(self, dtype) -> str:
        return dtype.ctype

    def literal(self, value, dtype) -> str:
        if dtype is float32:
            return _float_literal(value)
        if dtype is bool_:
            return "1" if value else "0"
        return "(-2147483647-1)" if value == -2**31 else str(int(value))

    def alu(self, op, args, dtype, src_dtypes, arg) -> str:
        a = args[0]
        if op in self.math_fns:
            return f"{self.math_fns[op]}({a})"
        if op is Ops.NEG:
            return f"(-({a}))"
        if op is Ops.RECIP:
            return f"(1.0f/{a})"
        if op is Ops.CAST:
            return f"(({self.ctype(dtype)})({a}))"
        if op is Ops.CHECK:
            return f"pg_check({a}, {arg}, err)"
        if op is Ops.WHERE:
            return f"({a}?{args[1]}:{args[2]})"
        b = args[1]
        if op is Ops.MAX:
            # NaN wins, as in torch.maximum
            if src_dtypes[0] is float32:
                return f"((({a})>({b})||({a})!=({a}))?({a}):({b}))"
            return f"(({a})>({b})?({a}):({b}))"
        symbol = {Ops.ADD: "+", Ops.MUL: "*", Ops.CMPLT: "<", Ops.CMPEQ: "==", Ops.IDIV: "/", Ops.MOD: "%"}[op]
        return f"({a}{symbol}{b})"

    # -- kernel structure
    def render(self, kernel: compiler.Kernel) -> str:
        self.lines, self.scopes, self.counter, self.kernel = [], [{}], 0, kernel
        self.parked, self.next_row = {}, None   # see park_shared_value and hoist_rows
        self.stream, self.readback = False, None   # see streams and park_shared_value
        self.columns = None   # see column_reduction
        self.functions = []   # printed before the kernel: the loops of a threaded kernel (render_threaded)
        self.lines.append(self.signature(kernel) + " {")
        self.render_body(kernel)
        self.lines.append("}")
        return self.preamble + "".join(self.functions) + "\n".join(self.lines) + "\n"

    def params(self, kernel) -> list:
        params = []
        for p in kernel.params:
            const = "" if p.written else "const "
            params.append(f"{const}{self.ctype(p.dtype)}* {self.restrict} d{p.index}")
        params += [f"int {name}" for name, _, _ in kernel.var_names]
        if kernel.uses_check:
            params.append("int* err")
        return params

    def signature(self, kernel) -> str:
        return f"void {kernel.name}({', '.join(self.params(kernel))})"

    def render_body(self, kernel):
        if kernel.scatter is not None:
            return self.render_scatter(kernel)
        deps = self.deps = compiler.range_sets(kernel.store)   # which loops each node depends on
        self.columns = self.column_reduction(kernel)
        self.stream = self.columns is None and self.streams(kernel)   # a column reduction stores plainly
        work = kernel.out_size * max(1, kernel.flops // max(kernel.out_size, 1))
        threaded = bool(kernel.ranges) and kernel.ranges[0].arg[1] > 1 and work >= PARALLEL_WORK and self.threads > 1
        # A reduction over everything (x / x.sum()) is computed once, before the threads share the outermost loop:
        # in each thread's slice function it would be computed twice, its parked values written over the other
        # thread's results. Such a loop stores plainly (its threads' streaming stores would need a fence each).
        whole = any(n.op is Ops.ACC and not deps[n] for n in kernel.store.toposort())
        if threaded and not whole:
            return self.render_threaded(kernel)
        self.stream = self.stream and not threaded
        self.render_loops(kernel, parallel=threaded)

    def render_threaded(self, kernel):
        """The threads split the outermost loop into equal slices, as OpenMP's static schedule would, and each runs
        its slice through a function of its own: it ends with the fence its streaming stores need (see streams),
        and where the split loop is the one that streams, slices start on whole vectors. The function takes the
        pointers as restrict parameters, which the struct gcc's OpenMP outlining passes them in loses (in cache, on
        the 2-core VM, softmax rows ran within noise of the parallel loop either way)."""
        size = kernel.ranges[0].arg[1]
        step = self.VECTOR if self.stream and len(kernel.ranges) == 1 else 1
        part = f"{kernel.name}_part"
        kernel_lines, self.lines = self.lines, [f"static void {part}({', '.join(self.params(kernel))}, "
                                                f"int pg_lo, int pg_hi) {{"]
        self.render_loops(kernel, ("pg_lo", "pg_hi"))
        self.lines.append("}")
        self.functions.append("\n".join(self.lines) + "\n")
        self.lines = kernel_lines
        args = [f"d{p.index}" for p in kernel.params] + [name for name, _, _ in kernel.var_names]
        args += ["err"] if kernel.uses_check else []
        threads = self.threads
        self.emit(f"#pragma omp parallel for num_threads({threads})", 1)
        self.emit(f"for (int pg_t = 0; pg_t < {threads}; pg_t++) {{", 1)
        self.emit(f"{part}({', '.join(args)}, pg_slice(pg_t, {threads}, {size}, {step}), "
                  f"pg_slice(pg_t + 1, {threads}, {size}, {step}));", 2)
        self.emit("}", 1)

    def render_loops(self, kernel, bounds=None, parallel=False):
        """The loops around the store; `bounds` (names of the first and past-the-end values) limits the outermost
        one to a thread's slice, `parallel` shares it out between the threads."""
        if self.columns is not None:
            return self.render_columns(kernel, self.columns, bounds)
        depth = 1
        # reductions that depend on the outer loops only (a softmax's max and sum, fused into the kernel that
        # writes it) are computed as soon as those loops are open: once per row, not once per element
        deps = self.deps
        accs = [n for n in kernel.store.toposort() if n.op is Ops.ACC and not set(kernel.ranges) <= deps[n]]
        shared = self.park_shared_value(kernel, accs, deps)
        invariants = self.loop_invariants(kernel, shared)
        opened = set()
        if self.stream:
            self.emit(f"const int pg_aligned = ((unsigned long)d{kernel.store.src[0].arg[0]} & 31) == 0;", depth)

        def body(depth, target=None):
            """The innermost loop's statements: the store, or with `target` (a C variable) the value only."""
            self.hoist_invariants(invariants, deps, opened, depth)
            if shared is not None:   # read back what the reduction's pass parked
                buffer, index = self.readback
                self.temp(shared, f"{buffer}[{self.expr(index, depth)}]", depth, "v")
            if target is None:
                self.store(kernel.store, depth)
            else:
                self.emit(f"{target} = {self.expr(kernel.store.src[2], depth)};", depth)

        for i, r in enumerate(kernel.ranges):
            self.hoist_invariants(invariants, deps, opened, depth)
            self.hoist_rows(accs, deps, opened, depth, kernel.ranges[i - 1] if i else None)
            opened.add(r)
            if i == 0 and parallel:
                self.emit(f"#pragma omp parallel for num_threads({self.threads})", depth)
            if r is kernel.ranges[-1]:
                self.store_loop(kernel, r, depth, bounds if i == 0 else None, body)
                break
            self.open_loop(r, depth, bounds if i == 0 else None)
            depth += 1
        else:
            body(depth)
        while depth > 1:
            depth -= 1
            self.close_loop(depth)
        if self.stream:
            self.emit("pg_stream_fence();", 1)

    COLUMNS = 128   # outputs whose sums a column reduction keeps side by side (8 AVX-512 registers)

    def column_reduction(self, kernel):
        """The reduction to render with the reduced loops outside the output's innermost loop (render_columns), or
        None. That order suits one float sum or max per output whose loads step through the reduced loop with a
        stride and through the innermost output loop contiguously: a column sum (x.sum(0)), or a decode step's
        attention-weighted sum of the cached values (each output reads one float per cached position, 3 KB apart).
        Reduced innermost, every load there is a different cache line and no vector covers two of them."""
        ranges = kernel.ranges
        if kernel.scatter is not None or not ranges or ranges[-1].arg[1] < 8:
            return None
        accs = [n for n in kernel.store.toposort() if n.op is Ops.ACC]
        if len(accs) != 1 or accs[0].dtype is not float32 or accs[0].arg[0] not in (Ops.ADD, Ops.MAX):
            return None
        acc, inner, innermost_reduced = accs[0], ranges[-1], accs[0].arg[1][-1]
        if not set(ranges) <= self.deps[acc]:
            return None   # a row's reduction broadcast over the row: render_loops computes it once per row
        strided = False
        for load in acc.src[0].toposort():
            if load.op is not Ops.LOAD:
                continue
            along, across = compiler._coeff(load.src[1], inner), compiler._coeff(load.src[1], innermost_reduced)
            if along not in (0, 1) or across is None or (along == 1 and 0 < abs(across) < 16):
                return None
            strided = strided or (along == 1 and abs(across) >= 16)
        return acc if strided else None

    def render_columns(self, kernel, acc, bounds=None):
        """A column reduction (see column_reduction): for each block of up to COLUMNS outputs along the innermost
        loop, their sums in a stack array (registers), the reduced loops around a loop over the block that the
        compiler vectorizes, then the stores. `bounds` limits the outermost loop to a thread's slice."""
        depth = 1
        *outer, inner = kernel.ranges
        for i, r in enumerate(outer):
            self.open_loop(r, depth, bounds if i == 0 else None)
            depth += 1
        name, n = inner.arg
        block = min(self.COLUMNS, n)
        first, end = bounds if bounds is not None and not outer else (0, n)
        count = block if (first, end) == (0, n) and n % block == 0 else \
            f"({end} - {name}_o < {block} ? {end} - {name}_o : {block})"
        reduce_op, reduced = acc.arg
        init = self.acc_init(reduce_op, float32)
        self.emit(f"for (int {name}_o = {first}; {name}_o < {end}; {name}_o += {block}) {{", depth)
        self.scopes.append({})
        self.emit(f"float pg_col[{block}];", depth + 1)
        self.emit(f"for (int {name}_l = 0; {name}_l < {block}; {name}_l++) pg_col[{name}_l] = {init};", depth + 1)
        inside = depth + 1
        for r in reduced:
            self.open_loop(r, inside)
            inside += 1
        # what the block's loop does not change (a weight per position, an index check) is read once per position
        opened = set(outer) | set(reduced)
        self.hoist_invariants([node for node in acc.src[0].toposort() if node.op in (Ops.LOAD, Ops.CHECK)],
                              self.deps, opened, inside)
        self.emit(f"for (int {name}_l = 0; {name}_l < {count}; {name}_l++) {{", inside)
        self.scopes.append({})
        self.emit(f"int {name} = {name}_o + {name}_l;", inside + 1)
        value = self.expr(acc.src[0], inside + 1)
        self.emit(f"pg_col[{name}_l] = {self.acc_update(reduce_op, f'pg_col[{name}_l]', value, float32)};", inside + 1)
        self.close_loop(inside)
        for _ in reduced:
            inside -= 1
            self.close_loop(inside)
        self.emit(f"for (int {name}_l = 0; {name}_l < {count}; {name}_l++) {{", depth + 1)
        self.scopes.append({acc: f"pg_col[{name}_l]"})
        self.emit(f"int {name} = {name}_o + {name}_l;", depth + 2)
        self.store(kernel.store, depth + 2)
        self.close_loop(depth + 1)
        self.close_loop(depth)
        while depth > 1:
            depth -= 1
            self.close_loop(depth)

    def streams(self, kernel) -> bool:
        """Whether the store goes through pg_stream, VECTOR floats at a time: for a float output of at least
        STREAM_BYTES that the kernel does not also read (its lines would be in cache already), whose innermost loop
        walks it contiguously from element offsets that are multiples of VECTOR (so the vectors are aligned when the
        output is). On the 2-core VM (128 MB, 2 threads, medians of 5 alternated runs, GB/s moved) RMSNorm rows went
        from 11.5 to 19.2, an add from 16.0 to 20.4, log-softmax rows from 10.6 to 13.5, softmax rows (parked in a
        stack row) from 11.8 to 13.0; without streaming, 13.6, 15.2, 10.7 and 11.9."""
        param, index, value = kernel.store.src
        if value.dtype is not float32 or not kernel.ranges or kernel.out_size * 4 < self.STREAM_BYTES:
            return False
        inner = kernel.ranges[-1]
        terms, const = compiler._linear(index)
        if inner.arg[1] < self.VECTOR or compiler._coeff(index, inner) != 1 or const % self.VECTOR or any(
                c % self.VECTOR for t, c in terms.items() if t is not inner):
            return False
        return not any(n.op is Ops.LOAD and n.src[0].arg[0] == param.arg[0] for n in kernel.store.toposort())

    def store_loop(self, kernel, r, depth, bounds, body):
        """The store's loop, the innermost. A streaming kernel (see streams) runs it in vectors of VECTOR values,
        gathered in pg_v (gcc keeps it in a register) and written by pg_stream, and what is left of it plainly."""
        if not self.stream:
            self.open_loop(r, depth, bounds)
            body(depth + 1)
            self.close_loop(depth)
            return
        name, n = r.arg
        first, end = bounds or (0, n)
        step = self.VECTOR
        main = n // step * step if bounds is None else f"{first} + ({end} - {first}) / {step} * {step}"
        self.emit(f"for (int {name}_v = {first}; {name}_v < {main}; {name}_v += {step}) {{", depth)
        self.scopes.append({})
        self.emit(f"float pg_v[{step}];", depth + 1)
        self.emit(f"for (int {name}_l = 0; {name}_l < {step}; {name}_l++) {{", depth + 1)
        self.scopes.append({})
        if r in self.deps[kernel.store.src[2]]:   # (a value the same for every element, zeros, does not use it)
            self.emit(f"int {name} = {name}_v + {name}_l;", depth + 2)
        body(depth + 2, f"pg_v[{name}_l]")
        self.close_loop(depth + 1)
        param, index, _ = kernel.store.src
        at = compiler.substitute(index, {r: UOp(Ops.RANGE, r.dtype, (), (f"{name}_v", n))})
        self.emit(f"pg_stream(&d{param.arg[0]}[{self.expr(at, depth + 1)}], pg_v, pg_aligned);", depth + 1)
        self.close_loop(depth)
        if bounds is not None or main < n:
            self.emit(f"for (int {name} = {main}; {name} < {end}; {name}++) {{", depth)
            self.scopes.append({})
            body(depth + 1)
            self.close_loop(depth)

    @staticmethod
    def loop_invariants(kernel, shared):
        """Loads and index checks, to be emitted as soon as the loops they depend on are open (hoist_invariants).
        gcc moves plain arithmetic out of loops itself, but not always a load from a loop that stores, and never a
        check, which may write the error flags; a check left in a loop also stops gcc vectorizing it (a gather's
        gradient compares every class with each row's checked target: 10x slower per element). The output's own
        loads stay where they are: the loop's stores may change what they read. Nothing only a parked value
        (`shared`, read back from the output) needs is hoisted: it would be loaded and never used."""
        out = kernel.store.src[0].arg[0]
        return [n for n in kernel.store.toposort(stop=lambda n: n is shared)
                if n.op is Ops.CHECK or (n.op is Ops.LOAD and n.src[0].arg[0] != out)]

    def hoist_invariants(self, invariants, deps, opened, depth):
        for node in invariants:
            if deps[node] <= opened and self.lookup(node) is None:
                self.expr(node, depth)

    def hoist_rows(self, accs, deps, opened, depth, row):
        """Emit the reductions that the open loops determine (once per row of `row`, the innermost of them). The
        first pass brings the row from memory; the passes after it read it from cache and meanwhile fetch the next
        row (see prefetch_next_row)."""
        self.next_row = None
        for acc in accs:
            if deps[acc] <= opened and self.lookup(acc) is None:
                if acc in self.parked and self.parked[acc][1] == "pg_park":
                    self.emit(f"float pg_park[{compiler.prod(r.arg[1] for r in acc.arg[1])}];", depth)
                self.expr(acc, depth)
                self.next_row = row
        self.next_row = None

    def park_shared_value(self, kernel, accs, deps):
        """A row reduction and the store may compute the same costly value for each element of the row (a softmax's
        exponentials: summed in one pass, scaled and stored in the next). The reduction's pass then also writes the
        value to the output element it belongs to, and the store pass reads it back from there, still in cache,
        instead of computing it again. A streaming kernel parks the row in a stack array, pg_park, instead: its
        output's lines are written once, by the store. Fills self.parked (reduction -> the value, the array and the
        index it goes to) and self.readback (where the store pass reads it), and returns the value as the store
        pass names it, or None."""
        param, index, _ = kernel.store.src
        in_store = set(kernel.store.toposort())
        if any(n.op is Ops.LOAD and n.src[0].arg[0] == param.arg[0] for n in in_store):
            return None   # the output is also an input: a parked value would overwrite it before it is read
        for acc in accs:
            # the store's loops still to open where the reduction is hoisted must walk the reduced elements
            level = next(i for i in range(len(kernel.ranges) + 1) if deps[acc] <= set(kernel.ranges[:i]))
            rows, reduced = kernel.ranges[level:], acc.arg[1]
            if [r.arg[1] for r in rows] != [r.arg[1] for r in reduced]:
                continue
            for node in reversed(acc.src[0].toposort()):   # the outermost shared value first
                if node.dtype is not param.dtype or not self.costly(node, set(reduced), deps):
                    continue
                in_row = compiler.substitute(node, dict(zip(reduced, rows)))
                if in_row not in in_store:
                    continue
                if self.stream and compiler.prod(r.arg[1] for r in rows) <= self.PARK_ROW:
                    self.parked[acc] = (node, "pg_park", self.row_position(reduced))
                    self.readback = ("pg_park", self.row_position(rows))
                else:   # the output holds one value per element
                    self.stream = False   # its lines are then in cache when the store writes them
                    self.parked[acc] = (node, f"d{param.arg[0]}", compiler.substitute(index, dict(zip(rows, reduced))))
                    self.readback = (f"d{param.arg[0]}", index)
                return in_row
        return None

    @staticmethod
    def row_position(ranges):
        """The row-major position of the loops' current element among all the elements they walk."""
        position, stride = compiler.iconst(0), 1
        for r in reversed(ranges):
            position = compiler.i_add(position, compiler.i_mul(r, stride))
            stride *= r.arg[1]
        return position

    def costly(self, node, reduced, deps) -> bool:
        """Whether node calls a math function for every reduced element (worth a store and a load to keep)."""
        return any(n.op in self.math_fns and deps[n] & reduced for n in node.toposort())

    def park(self, acc, depth):
        """Inside a reduction's loop: write the value the store will read back (see park_shared_value)."""
        if acc in self.parked:
            node, buffer, index = self.parked[acc]
            self.emit(f"{buffer}[{self.expr(index, depth)}] = {self.expr(node, depth)};", depth)

    def render_scatter(self, kernel):
        """Zero the output (in parallel), then for each reduction step add its values at the index it names."""
        sc = kernel.scatter
        param, index, _ = kernel.store.src
        for i, r in enumerate(kernel.ranges):
            if i == 0 and r.arg[1] > 1 and kernel.out_size >= PARALLEL_WORK and self.threads > 1:
                self.emit(f"#pragma omp parallel for num_threads({self.threads})", 1 + i)
            self.open_loop(r, 1 + i)
        depth = 1 + len(kernel.ranges)
        self.emit(f"d{param.arg[0]}[{self.expr(index, depth)}] = {self.literal(0, kernel.store.dtype)};", depth)
        for _ in kernel.ranges:
            depth -= 1
            self.close_loop(depth)
        depth = 1
        for r in list(sc.ranges) + [r for r in kernel.ranges if r is not sc.o]:
            self.open_loop(r, depth)
            depth += 1
        _, added_index, added_value = sc.store.src
        value = self.expr(added_value, depth)
        self.emit(f"d{param.arg[0]}[{self.expr(added_index, depth)}] += {value};", depth)
        for _ in range(depth - 1):
            depth -= 1
            self.close_loop(depth)

    def decompose(self, var, dims, depth):
        """`int name = ...;` for each (name, size) in dims (outermost first) from the linear index var."""
        stride = 1
        for i in reversed(range(len(dims))):
            name, size = dims[i]
            value = var if stride == 1 else f"({var} / {stride})"
            if i > 0:
                value = f"({value} % {size})"
            self.emit(f"int {name} = {value};", depth)
            stride *= size

    @staticmethod
    def dims(ranges):
        return [(r.arg[0], r.arg[1]) for r in ranges]

    def open_loop(self, r, depth, bounds=None):
        name, size = r.arg
        first, end = bounds or (0, size)
        self.emit(f"for (int {name} = {first}; {name} < {end}; {name}++) {{", depth)
        self.scopes.append({})

    def close_loop(self, depth):
        self.scopes.pop()
        self.emit("}", depth)

    def store(self, store, depth):
        param, index, value = store.src
        v = self.expr(value, depth)
        self.emit(f"d{param.arg[0]}[{self.expr(index, depth)}] = {v};", depth)

    def emit(self, line, depth):
        self.lines.append("  " * depth + line)

    def lookup(self, u):
        for scope in reversed(self.scopes):
            if u in scope:
                return scope[u]
        return None

    def temp(self, u, code, depth, prefix="t"):
        name = f"{prefix}{self.counter}"
        self.counter += 1
        self.emit(f"{self.ctype(u.dtype)} {name} = {code};", depth)
        self.scopes[-1][u] = name
        return name

    def expr(self, u, depth) -> str:
        """A C expression for u, emitting temporaries (and accumulator loops) into the current scope."""
        found = self.lookup(u)
        if found is not None:
            return found
        op = u.op
        if op is Ops.CONST:
            return self.literal(u.arg, u.dtype)
        if op is Ops.RANGE:
            return u.arg[0]
        if op is Ops.DEFINE_VAR:
            return u.arg[0]
        if op is Ops.LOAD:
            param, index, valid = u.src
            idx = self.expr(index, depth)
            load = f"d{param.arg[0]}[{idx}]"
            if valid.op is not Ops.CONST:
                load = f"({self.expr(valid, depth)}?{load}:{self.literal(0, u.dtype)})"
            return self.temp(u, load, depth, "v")
        if op is Ops.ACC:
            return self.accumulate(u, depth)
        args = [self.expr(s, depth) for s in u.src]
        return self.temp(u, self.alu(op, args, u.dtype, [s.dtype for s in u.src], u.arg), depth)

    def accumulate(self, u, depth):
        reduce_op, ranges = u.arg
        acc = f"acc{self.counter}"
        self.counter += 1
        n = ranges[-1].arg[1]
        if n >= 32 and reduce_op in (Ops.ADD, Ops.MAX) and u.dtype is float32:
            return self.accumulate_partials(u, acc, depth, self.partial_sum_lanes(u, n))
        self.emit(f"{self.ctype(u.dtype)} {acc} = {self.acc_init(reduce_op, u.dtype)};", depth)
        for r in ranges:
            self.open_loop(r, depth)
            depth += 1
        value = self.expr(u.src[0], depth)
        self.emit(f"{acc} = {self.acc_update(reduce_op, acc, value, u.dtype)};", depth)
        self.park(u, depth)
        for _ in ranges:
            depth -= 1
            self.close_loop(depth)
        self.scopes[-1][u] = acc
        return acc

    def partial_sum_lanes(self, u, n) -> int:
        """How many partial results a float sum or max of n >= 32 terms keeps side by side (vector lanes, independent
        FMA chains): up to 32, at least 4 per lane. A long sum of loads, products and adds (a matrix-vector row, a
        sum of squares) waits on memory, and keeps one AVX-512 vector, as llama2.c's loop does. That is measured,
        not understood: with two, matrix-vector rows of 2048 read 14-30% slower (stories110M decode's down
        projection trailed llama2.c's by that); rows of 4096 were within 4% either way in decode-like kernels, but
        a lone [8192 x 4096] product lost 7-22% with one; rows of 288 and 768 were level or a few percent faster
        with two, so shorter sums keep 32. Sums of exponentials keep 32 to hide their arithmetic. In a C harness with
        the length a constant, only rows of exactly 2048 differed (16 read 1.16-1.36x faster; 1536, 2560, 3072 and
        4096 0.93-1.02x), so the rule costs longer rows a few percent; without a mechanism it stays a length."""
        if n >= 2048 and u.arg[0] is Ops.ADD and not any(
                node.op in self.math_fns or node.op is Ops.RECIP for node in u.src[0].toposort()):
            return 16
        return next(k for k in (32, 16, 8) if n >= 4 * k)

    def accumulate_partials(self, u, acc, depth, lanes):
        """A float sum or max whose innermost loop is long: `lanes` partial results updated side by side (the
        compiler turns them into vector registers, several independent chains), a scalar tail, then the partials
        combined. A max keeps its NaNs in flags of their own, {acc}_n: the NaN-keeping max (two compares and a
        blend, one after another) made each chain several cycles long, and a softmax's max pass took 0.10 ns an
        element where a plain max (vmaxps) and a flag beside it take 0.05."""
        reduce_op, ranges = u.arg
        inner = ranges[-1]
        name, n = inner.arg
        main = n // lanes * lanes
        init = self.acc_init(reduce_op, float32)
        flag_nans = reduce_op is Ops.MAX

        def update(target, value):
            return f"{target} = {self.acc_update(reduce_op, target, value, float32)};"

        def update_lane(lane, depth):
            value = self.expr(u.src[0], depth)
            if not flag_nans:
                self.emit(update(f"{acc}_p[{lane}]", value), depth)
                return
            self.emit(f"{acc}_p[{lane}] = {value} > {acc}_p[{lane}] ? {value} : {acc}_p[{lane}];", depth)
            self.emit(f"{acc}_n[{lane}] |= {value} != {value};", depth)
        self.emit(f"float {acc}_p[{lanes}];", depth)
        self.emit(f"for (int {acc}_l = 0; {acc}_l < {lanes}; {acc}_l++) {acc}_p[{acc}_l] = {init};", depth)
        if flag_nans:
            self.emit(f"int {acc}_n[{lanes}] = {{0}};", depth)
        for r in ranges[:-1]:
            self.open_loop(r, depth)
            depth += 1
        self.emit(f"for (int {name}_o = 0; {name}_o < {main}; {name}_o += {lanes}) {{", depth)
        self.scopes.append({})
        self.prefetch_next_row(u, UOp(Ops.RANGE, inner.dtype, (), (f"{name}_o", n)), lanes, depth + 1)
        self.emit(f"for (int {name}_l = 0; {name}_l < {lanes}; {name}_l++) {{", depth + 1)
        self.scopes.append({})
        self.emit(f"int {name} = {name}_o + {name}_l;", depth + 2)
        update_lane(f"{name}_l", depth + 2)
        self.park(u, depth + 2)
        self.scopes.pop()
        self.emit("}", depth + 1)
        self.scopes.pop()
        self.emit("}", depth)
        if main < n:
            self.emit(f"for (int {name} = {main}; {name} < {n}; {name}++) {{", depth)
            self.scopes.append({})
            update_lane(f"{name} - {main}", depth + 1)
            self.park(u, depth + 1)
            self.scopes.pop()
            self.emit("}", depth)
        for _ in ranges[:-1]:
            depth -= 1
            self.close_loop(depth)
        # the partials combined as a tree, halves at a time: the compiler turns each halving into one vector op.
        # Combined one after another (32 dependent scalar adds, nearly 100 cycles) they held each row of a
        # matrix-vector product long enough to slow its stream from memory: the vocabulary head of a stories15M
        # decode step took 1.2 ms with the chain, 0.95 with the tree, and llama2.c's loop 1.0 (same run, same memory)
        if flag_nans:
            self.emit(f"for (int {acc}_l = 0; {acc}_l < {lanes}; {acc}_l++) "
                      f"{acc}_p[{acc}_l] = {acc}_n[{acc}_l] ? NAN : {acc}_p[{acc}_l];", depth)
        half = lanes // 2
        while half:
            self.emit(f"for (int {acc}_l = 0; {acc}_l < {half}; {acc}_l++) "
                      f"{update(f'{acc}_p[{acc}_l]', f'{acc}_p[{acc}_l + {half}]')}", depth)
            half //= 2
        self.emit(f"float {acc} = {acc}_p[0];", depth)
        self.scopes[-1][u] = acc
        return acc

    def prefetch_next_row(self, u, start, lanes, depth):
        """In a pass over a row that is already in cache (hoist_rows sets next_row): request the cache lines that the
        next row's pass will read from memory, for the `lanes` elements from `start` of every load that walks the
        row contiguously, so that memory works while this pass computes."""
        if self.next_row is None:
            return
        inner = u.arg[1][-1]
        for load in u.src[0].toposort(stop=lambda n: n.op is Ops.ACC):
            if load.op is not Ops.LOAD:
                continue
            index = load.src[1]
            if compiler._coeff(index, inner) != 1 or compiler._coeff(index, self.next_row) in (0, None) or any(
                    n.op is Ops.CHECK for n in index.toposort()):
                continue
            line = max(1, 64 // load.dtype.itemsize)
            for k in range(0, lanes, line):
                at = compiler.substitute(index, {self.next_row: compiler.i_add(self.next_row, compiler.iconst(1)),
                                                 inner: compiler.i_add(start, compiler.iconst(k))})
                self.emit(f"__builtin_prefetch(&d{load.src[0].arg[0]}[{self.expr(at, depth)}]);", depth)

    def acc_init(self, reduce_op, dtype):
        if reduce_op is Ops.ADD:
            return self.literal(0, dtype)
        if reduce_op is Ops.MIN:
            return {float32: "INFINITY", int32: "2147483647", bool_: "1"}[dtype]
        return {float32: "(-INFINITY)", int32: "(-2147483647-1)", bool_: "0"}[dtype]

    def acc_update(self, reduce_op, acc, value, dtype):
        if reduce_op is Ops.ADD:
            return f"{acc} + {value}"
        if reduce_op is Ops.MIN:
            return f"(({value})<({acc})?({value}):({acc}))"
        return self.alu(Ops.MAX, [value, acc], dtype, [dtype, dtype], None)


# dst[q * ldd + r] = src[r * lds + q] for an 8 x 8 block, through 24 shuffles of 8-float vectors (AVX's unpack,
# shuffle and lane permute): a packing loop that moved one float at a time spent about as long as the products on
# the Llama prefill shapes. Needs pg_v8f (unaligned 8-float vectors).
TRANSPOSE8 = r"""
static inline void pg_transpose8(float* restrict dst, long ldd, const float* restrict src, long lds) {
  pg_v8f r[8], t[8], u[8];
  for (int i = 0; i < 8; i++) r[i] = *(const pg_v8f*)(src + i * lds);
  for (int i = 0; i < 8; i += 2) {   /* pairs of rows interleaved: (r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] ...) */
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {   /* four rows' elements q and q + 4 in u[i + q] */
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int q = 0; q < 4; q++) {      /* halves of rows 0-3 and 4-7 joined */
    *(pg_v8f*)(dst + q * ldd) = __builtin_shufflevector(u[q], u[q + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *(pg_v8f*)(dst + (q + 4) * ldd) = __builtin_shufflevector(u[q], u[q + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
"""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _interval(u: UOp, box: dict):
    """(lowest, highest) of an integer expression over a box of loop values, as C expressions; box maps a RANGE to
    its (low, high). None where the expression is not a linear form (compiler._linear) of those loops, variables and
    a constant."""
    terms, const = compiler._linear(u)
    low, high = [str(const)] if const else [], [str(const)] if const else []
    for term, k in terms.items():
        if term.op is Ops.DEFINE_VAR:
            ends = (term.arg[0], term.arg[0])
        elif term.op is Ops.RANGE and term in box:
            ends = box[term]
        else:
            return None
        lo, hi = ends if k >= 0 else ends[::-1]
        low.append(lo if k == 1 else f"{lo} * {k}")
        high.append(hi if k == 1 else f"{hi} * {k}")
    if not low:
        return "0", "0"
    return tuple(parts[0] if len(parts) == 1 else f"({' + '.join(parts)})" for parts in (low, high))


def _may_be(u: UOp, want: bool, box: dict):
    """A C condition that holds if the bool expression u is `want` anywhere in the box (it may hold where u is not:
    it is used to skip work, never to do it wrongly), or None where u is not comparisons of integer expressions
    (see _interval) joined by or, not and where."""
    def both(x, y, join):
        return None if x is None or y is None else f"({x} {join} {y})"
    if u.op is Ops.CONST:
        return "1" if bool(u.arg) == want else "0"
    if u.op in (Ops.CMPLT, Ops.CMPEQ) and u.src[0].dtype is int32:
        a, b = _interval(u.src[0], box), _interval(u.src[1], box)
        if a is None or b is None:
            return None
        if u.op is Ops.CMPLT:
            return f"({a[0]} < {b[1]})" if want else f"({a[1]} >= {b[0]})"
        if want:   # the two ranges meet
            return f"({a[0]} <= {b[1]} && {b[0]} <= {a[1]})"
        return f"!({a[0]} == {a[1]} && {b[0]} == {b[1]} && {a[0]} == {b[0]})"
    if u.dtype is not bool_:
        return None
    if u.op is Ops.CMPEQ:   # x == y of bools (not x is x == False): both true or both false, or one of each
        (x_true, x_false), (y_true, y_false) = ((_may_be(s, True, box), _may_be(s, False, box)) for s in u.src)
        if want:
            return both(both(x_true, y_true, "&&"), both(x_false, y_false, "&&"), "||")
        return both(both(x_true, y_false, "&&"), both(x_false, y_true, "&&"), "||")
    if u.op is Ops.MAX:   # or
        x, y = (_may_be(s, want, box) for s in u.src)
        return both(x, y, "||" if want else "&&")
    if u.op is Ops.WHERE:
        c, x, y = u.src
        return both(both(_may_be(c, True, box), _may_be(x, want, box), "&&"),
                    both(_may_be(c, False, box), _may_be(y, want, box), "&&"), "||")
    return None


class GemmRenderer(CRenderer):
    """A Contraction as a packed, register-blocked matrix product (the BLIS loop nest). Work items are
    (batch, NB output columns, a chunk of rows) spread over OpenMP threads. Each item packs its B columns once, for
    the whole depth, into NR-wide panels; then for every MC-row block it packs A into MR-row panels one KC-deep
    slice at a time (rows of A that are contiguous in k are read in place) and runs an MR x NR micro-kernel (gcc
    vector types, accumulators in registers) over each slice; when the sums are complete the fused epilogue runs and
    stores at the output's own index. Packing evaluates the operands' strided views once, so transposed and
    broadcast operands cost nothing extra. Per-thread panels live in a workspace the device passes in.

    The register block follows the CPU's vector width, read from its flags when the renderer is made: AVX2 has 16
    vector registers of 8 floats (6 x 16: 12 accumulators, two B vectors, a broadcast), AVX-512 has 32 of 16
    floats: 8 x 32 there (16 accumulators), not 12 x 32, because rows of A read in place at a power-of-two stride
    (x @ W with K = 1024) all fall in one set of the 8-way L1, and twelve such rows evicted each other (10% slower
    than AVX2's kernel on one core; 8 x 32 is level with it on Zen 4, whose 512-bit units are two 256-bit halves,
    and on a CPU with full-width units it does twice the work an instruction)."""
    BLOCKS = {8: (6, 16), 16: (8, 32)}   # floats per vector: MR x NR
    KC, MC = 256, 120   # MC: a multiple of every MR
    B_FLOATS, NB_MAX = 1 << 22, 512

    def __init__(self, vector: int | None = None):
        self.vector = vector or gemm_vector()
        self.MR, self.NR = self.BLOCKS[self.vector]

    def block_cols(self, K):
        """Columns per item: at most NB_MAX, with all of B's packed depth for them within B_FLOATS (16 MB a thread).
        Every column block packs all of A again: a deep K with a small budget made many narrow blocks (the vocabulary
        head's input gradient, K = 32000, N = 288, took 9 blocks of 32 columns at 4 MB and read its 262 MB A 9
        times; now 3 blocks). NB_MAX lets N = 288 (the weight gradient, K = 2048) be one block."""
        return max(self.NR, min(self.NB_MAX, self.B_FLOATS // max(K, 1) // self.NR * self.NR))

    def workspace(self, K):
        """Floats per thread: packed B (whole depth), one packed A block, one block of sums."""
        nb = self.block_cols(K)
        return _round_up(K, self.KC) * nb + self.MC * self.KC + self.MC * nb

    @staticmethod
    def even_split(panels: int, want: int, threads: int) -> int:
        """Column blocks for `panels` NR-wide panels: at least `want` of them, and up to twice that a count that
        divides the panels and the threads evenly (N = 288 is 18 panels: 6 blocks of 3, not 5, 5, 5 and 3); failing
        that, a count the threads share evenly, the last block short."""
        for n in range(want, min(2 * want, panels) + 1):
            if panels % n == 0 and n % threads == 0:
                return n
        return min(_round_up(want, threads), panels)

    def render_gemm(self, c: compiler.Contraction, threads: int) -> str:
        self.lines, self.scopes, self.counter, self.kernel = [], [{}], 0, c.kernel
        self.parked, self.next_row = {}, None
        MR, NR, KC, MC = self.MR, self.NR, self.KC, self.MC
        M, N, K = c.M, c.N, c.K
        batch_sizes = [r.arg[1] for r in c.batch]
        n_batch = compiler.prod(batch_sizes)
        # Items of equal size: a last column block or row chunk of leftovers left a thread idle (N = 768 was blocks
        # of 512 and 256, M = 256 chunks of 240 and 16 rows). Two items a thread at least: where batch and the
        # column blocks do not provide them, the longer side is split, as every item packs its B columns (and,
        # unless it reads them in place, its A rows) again; within a chunk, row blocks of equal size up to MC. A
        # count of column blocks that the threads do not share evenly is raised to one they do (q/k/v at N = 2304,
        # K = 768 made 5 blocks of 480 columns, 3 on one thread and 2 on the other: 170 GFLOP/s, against 197 for
        # its neighbours). A batch that the threads share evenly needs no split: the two halves of a split-K weight
        # gradient (288 x 288 over 2048 tokens) are one item a thread, which packs its A once, not once a column
        # block (2.6 -> 1.9 ms).
        nblocks = _cdiv(N, self.block_cols(K))
        want = 1 if n_batch % threads == 0 else _cdiv(2 * threads, n_batch)
        if N >= M and (nblocks < want or n_batch * nblocks % threads):
            nblocks = self.even_split(_cdiv(N, NR), max(want, nblocks), threads)
        NB = _round_up(_cdiv(N, nblocks), NR)
        nblocks = _cdiv(N, NB)
        mchunks = min(_cdiv(M, MR), _cdiv(want, nblocks))
        rows = _round_up(_cdiv(M, mchunks), MR)
        mchunks = _cdiv(M, rows)
        mb = _round_up(_cdiv(rows, _cdiv(rows, MC)), MR)   # at most MC: MC is a multiple of MR
        emit = self.emit
        self.lines.append(self.signature(c.kernel)[:-1] + ", float* restrict ws) {")
        emit(f"#pragma omp parallel for schedule(dynamic, 1) num_threads({threads})", 1)
        emit(f"for (int item = 0; item < {n_batch * nblocks * mchunks}; item++) {{", 1)
        self.scopes.append({})
        emit(f"float* restrict Bp = ws + (long)omp_get_thread_num() * {self.workspace(K)};", 2)
        emit(f"float* restrict Ap = Bp + {_round_up(K, KC) * NB};", 2)
        emit(f"float* restrict Cs = Ap + {MC * KC};", 2)
        emit(f"int rest = item % {nblocks * mchunks};", 2)
        if c.batch:
            emit(f"int bi = item / {nblocks * mchunks};", 2)
        emit(f"int jc = (rest / {mchunks}) * {NB}, chunk = rest % {mchunks};", 2)
        emit(f"int nc = {N} - jc < {NB} ? {N} - jc : {NB}, ncr = (nc + {NR - 1}) / {NR} * {NR};", 2)
        stride = 1
        for r, size in reversed(list(zip(c.batch, batch_sizes))):
            emit(f"int {r.arg[0]} = (bi / {stride}) % {size};", 2)
            stride *= size
        # Each operand is read from memory where it is plain (a load at a linear index) and evaluated element by
        # element where it is not, independently: an attention output read through its heads' transpose (A of
        # the output projection) does not make the weights (B) an expression too
        direct_a = False
        for name, operand, strides, offset in ("A", c.a, c.a_strides, c.a_offset), ("B", c.b, c.b_strides, c.b_offset):
            if strides is not None:
                base = " + ".join([str(offset)] + [f"(long){r.arg[0]}*{strides.get(r, 0)}" for r in c.batch])
                emit(f"const float* restrict {name} = d{operand.src[0].arg[0]} + {base};", 2)
        if c.a_strides is not None:
            am, ak = c.a_strides.get(c.m, 0), c.a_strides[c.k]
            direct_a = ak == 1 and am > 0
        if c.b_strides is not None:
            bn, bk = c.b_strides.get(c.n, 0), c.b_strides[c.k]
        # pack B once for the whole depth: slice pc starts at Bp + pc * ncr, panel jr at + jr * kc
        emit(f"for (int pc = 0; pc < {K}; pc += {KC}) {{", 2)
        emit(f"int kc = {K} - pc < {KC} ? {K} - pc : {KC};", 3)
        emit("float* restrict Bs = Bp + (long)pc * ncr;", 3)
        if c.b_strides is None:   # B is an expression (a view with flips, a prologue): evaluate it for each element
            self.pack_general(c.b, c.n_ranges, c.k_ranges, "j", "nc", "ncr", NR, "Bs", "jc", 3)
        elif bn == 1:   # rows of B are contiguous: copy NR-wide row pieces, panel by panel (one vector copy each)
            emit(f"for (int j0 = 0; j0 < ncr; j0 += {NR})", 3)
            emit("for (int p = 0; p < kc; p++) {", 4)
            emit(f"const float* src = B + (long)(pc + p) * {bk} + jc + j0;", 5)
            emit(f"float* dst = Bs + j0 * kc + p * {NR};", 5)
            emit(f"if (j0 + {NR} <= nc) for (int j = 0; j < {NR}; j++) dst[j] = src[j];", 5)
            emit(f"else for (int j = 0; j < {NR}; j++) dst[j] = j0 + j < nc ? src[j] : 0.0f;", 5)
            emit("}", 4)
        elif bk == 1:
            # columns of B are contiguous (B = W^T, the weights of x @ W.T): 8 x 8 blocks transposed in registers;
            # a partial panel and a depth left over from the blocks go one element at a time
            emit(f"for (int j0 = 0; j0 < ncr; j0 += {NR}) {{", 3)
            emit("float* dst = Bs + j0 * kc;", 4)
            emit(f"const float* src = B + (long)(jc + j0) * {bn} + pc;", 4)
            emit(f"int blocks = j0 + {NR} <= nc ? kc / 8 * 8 : 0;", 4)
            emit("for (int p = 0; p < blocks; p += 8)", 4)
            emit(f"for (int j8 = 0; j8 < {NR}; j8 += 8) pg_transpose8(dst + p * {NR} + j8, {NR}, "
                 f"src + (long)j8 * {bn} + p, {bn});", 5)
            # p is long: as an int, gcc 12 saw an overflow in this loop (-Waggressive-loop-optimizations) where a
            # constant depth left it no iterations
            emit("for (long p = blocks; p < kc; p++)", 4)
            emit(f"for (int j = 0; j < {NR}; j++) dst[p * {NR} + j] = j0 + j < nc ? src[(long)j * {bn} + p] : 0.0f;", 5)
            emit("}", 3)
        else:         # columns of B are strided: walk each column down the depth
            emit("for (int j = 0; j < ncr; j++) {", 3)
            emit(f"float* dst = Bs + (j / {NR}) * {NR} * kc + j % {NR};", 4)
            emit(f"if (j < nc) {{ const float* src = B + (long)(jc + j) * {bn} + (long)pc * {bk}; "
                 f"for (int p = 0; p < kc; p++) dst[p * {NR}] = src[(long)p * {bk}]; }}", 4)
            emit(f"else {{ for (int p = 0; p < kc; p++) dst[p * {NR}] = 0.0f; }}", 4)
            emit("}", 3)
        emit("}", 2)
        emit(f"int ic_end = (chunk + 1) * {rows} < {M} ? (chunk + 1) * {rows} : {M};", 2)
        emit(f"for (int ic = chunk * {rows}; ic < ic_end; ic += {mb}) {{", 2)
        emit(f"int mc = ic_end - ic < {mb} ? ic_end - ic : {mb};", 3)
        emit(f"for (int pc = 0; pc < {K}; pc += {KC}) {{", 3)
        emit(f"int kc = {K} - pc < {KC} ? {K} - pc : {KC};", 4)
        # pack A: MR-row panels, rows past the block zero; rows that are contiguous in k (x in x @ W.T) are read in
        # place instead (see micro_kernel)
        if c.a_strides is None:
            self.pack_general(c.a, c.m_ranges, c.k_ranges, "i", "mc", f"(mc + {MR - 1}) / {MR} * {MR}", MR, "Ap",
                              "ic", 4)
        elif not direct_a:
            emit(f"for (int panel = 0; panel < mc; panel += {MR}) {{", 4)
            emit(f"float* dst = Ap + panel * kc;", 5)
            emit(f"for (int p = 0; p < kc; p++) {{", 5)
            emit(f"for (int i = 0; i < {MR}; i++) dst[p * {MR} + i] = panel + i < mc ? "
                 f"A[(long)(ic + panel + i) * {am} + (long)(pc + p) * {ak}] : 0.0f;", 6)
            emit("}", 5)
            emit("}", 4)
        emit(f"for (int jr = 0; jr < nc; jr += {NR})", 4)
        emit(f"for (int ir = 0; ir < mc; ir += {MR})", 5)
        live = self.tile_may_be_used(c)
        if live is not None:   # a tile that the epilogue's mask drops whole (keys after a causal block) is skipped
            emit(f"if ({live})", 6)
        if direct_a:
            args = f"kc, A + (long)(ic + ir) * {am} + pc, {am}, 1, mc - ir, Bp + (long)pc * ncr + jr * kc, " \
                   f"Cs + ir * {NB} + jr, pc > 0"
        else:
            args = f"kc, Ap + ir * kc, 1, {MR}, {MR}, Bp + (long)pc * ncr + jr * kc, Cs + ir * {NB} + jr, pc > 0"
        # only the last column block's last panel can be partial (blocks are whole panels): when it is at most half
        # full, a kernel of half the width skips the padding's FMAs (an attention head of 48 is 1.5 panels of 32)
        half_panel = 0 < N % NR <= NR // 2
        call = 6 if live is None else 7
        if half_panel:
            emit(f"{{ if (nc - jr > {NR // 2}) pg_ukernel({args}); else pg_ukernel_half({args}); }}", call)
        else:
            emit(f"pg_ukernel({args});", call)
        emit("}", 3)
        # epilogue: the finished sums through the fused elementwise tail, stored at the output's own index
        emit("for (int i = 0; i < mc; i++) {", 3)
        self.scopes.append({})
        self.decompose("(ic + i)", self.dims(c.m_ranges), 4)
        emit("for (int j = 0; j < nc; j++) {", 4)
        self.scopes.append({})
        self.decompose("(jc + j)", self.dims(c.n_ranges), 5)
        emit(f"float gemm_acc = Cs[i * {NB} + j];", 5)
        self.scopes[-1][c.acc] = "gemm_acc"
        self.store(c.kernel.store, 5)
        self.scopes.pop()
        emit("}", 4)
        self.scopes.pop()
        emit("}", 3)
        emit("}", 2)
        self.scopes.pop()
        emit("}", 1)
        emit("}", 0)
        self.ldc = NB
        return self.preamble + "#include <omp.h>\n" + self.micro_kernel(half_panel) + "\n".join(self.lines) + "\n"

    def tile_may_be_used(self, c: compiler.Contraction):
        """A C condition, false for an MR x NR output tile (rows from ic + ir, columns from jc + jr) whose sums the
        epilogue never uses (Contraction.gate), or None when there is no gate or it is not comparisons of linear
        expressions in one row and one column loop."""
        gate = c.gate
        if gate is None or c.m is None or c.n is None:
            return None
        box = {c.m: ("(ic + ir)", f"(ic + ir + {self.MR - 1})"), c.n: ("(jc + jr)", f"(jc + jr + {self.NR - 1})")}
        box.update({r: (r.arg[0], r.arg[0]) for r in c.batch})
        return _may_be(gate, True, box)

    def pack_general(self, operand, side, k, var, count, rounded, R, panels, start, depth):
        """Pack an operand given as an expression into R-wide panels (panel q at panels + q * R * kc): for each
        depth p the k loops are bound once, then the panel's R rows (or columns) `var` are evaluated, so that a k
        index with divisions (an attention output read through its heads' transpose) is worked out once per R
        elements, not for each; rows past the block get zeros."""
        emit = self.emit
        first = f"{var}p"   # the panel's first row
        emit(f"for (int {first} = 0; {first} < {rounded}; {first} += {R}) {{", depth)
        emit(f"float* dst = {panels} + {first} * kc;", depth + 1)
        emit("for (int p = 0; p < kc; p++) {", depth + 1)
        self.scopes.append({})
        self.decompose("(pc + p)", self.dims(k), depth + 2)
        emit(f"for (int {var} = {first}; {var} < {first} + {R}; {var}++) {{", depth + 2)
        self.scopes.append({})
        emit(f"if ({var} >= {count}) {{ dst[p * {R} + {var} - {first}] = 0.0f; continue; }}", depth + 3)
        self.decompose(f"({start} + {var})", self.dims(side), depth + 3)
        emit(f"dst[p * {R} + {var} - {first}] = {self.expr(operand, depth + 3)};", depth + 3)
        self.scopes.pop()
        emit("}", depth + 2)
        self.scopes.pop()
        emit("}", depth + 1)
        emit("}", depth)

    def micro_kernel(self, half_panel: bool) -> str:
        """C[MR x NR] (+)= A[MR x kc] * B_panel[kc x NR], the accumulators held in vector registers. A's element
        (i, p) is a[i * si + p * sp]: a packed panel (si = 1, sp = MR) or rows of A read in place (sp = 1), of which
        the first `rows` are real; the others repeat the last real row (in bounds), and their sums are not used.
        Each call site passes constant strides, so gcc inlines a kernel for its layout. With half_panel (the product
        has a last panel at most half full) also pg_ukernel_half, which computes a panel's first NR / 2 columns."""
        lines = ["typedef float pg_v8f __attribute__((vector_size(32), aligned(4)));", TRANSPOSE8,
                 f"typedef float pg_vec __attribute__((vector_size({4 * self.vector}), aligned(4)));"]
        lines += self.micro_kernel_lines("pg_ukernel", self.NR // self.vector)
        if half_panel:
            lines += self.micro_kernel_lines("pg_ukernel_half", self.NR // self.vector // 2)
        return "\n".join(lines) + "\n"

    def micro_kernel_lines(self, name, vecs) -> list:
        MR, NR, NB, width = self.MR, self.NR, self.ldc, self.vector
        accs = [f"c{i}_{j}" for i in range(MR) for j in range(vecs)]
        lines = [f"static inline void {name}(int kc, const float* restrict a, long si, long sp, int rows, "
                 "const float* restrict b, float* restrict c, int add) {"]
        lines += [f"  const float* restrict a{i} = a + (long)({i} < rows ? {i} : rows - 1) * si;" for i in range(MR)]
        lines += ["  pg_vec " + ", ".join(f"{n} = {{0}}" for n in accs) + ";",
                  "  for (int p = 0; p < kc; p++) {"]
        lines += [f"    pg_vec b{j} = *(const pg_vec*)(b + {NR} * p + {width * j});" for j in range(vecs)]
        for i in range(MR):
            lines.append(f"    float x{i} = a{i}[p * sp];")
            lines += [f"    c{i}_{j} += x{i} * b{j};" for j in range(vecs)]
        lines.append("  }")
        for i in range(MR):
            for j in range(vecs):
                ptr = f"(pg_vec*)(c + {i * NB + width * j})"
                lines.append(f"  if (add) *{ptr} += c{i}_{j}; else *{ptr} = c{i}_{j};")
        lines.append("}")
        return lines


# ----------------------------------------------------------------------------------------------------------------------
# gcc


CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
          "-ffp-contract=fast", "-fno-semantic-interposition"]


@functools.lru_cache(maxsize=None)
def compiler_identity(cc: str) -> str:
    """What the cache key needs to know about the compiler and the CPU it targets."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"picograd needs a C compiler for the CPU backend: tried {cc!r} ({e}); install gcc or "
                           f"point the CC environment variable at one") from None
    return version + "|" + hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def find_cc() -> str:
    return _checked_cc(os.environ.get("CC", "gcc"))


@functools.lru_cache(maxsize=None)
def _checked_cc(cc: str) -> str:
    """cc, once it is known to be on PATH: searched once per process (every kernel build asks)."""
    if shutil.which(cc) is None:
        raise RuntimeError(f"picograd needs a C compiler for the CPU backend and could not find {cc!r} on PATH; "
                           f"install gcc or set CC to the compiler's path")
    return cc


def compile_c(source: str, extra_flags=()) -> str:
    """gcc source into a shared object, through the disk cache; returns the path to load."""
    cc = find_cc()
    flags = CFLAGS + list(extra_flags) + os.environ.get("PICOGRAD_CFLAGS", "").split()
    if ASAN:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]

    def build():
        with tempfile.TemporaryDirectory(prefix="picograd-cc-") as tmp:
            src_path, out_path = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
            with open(src_path, "w") as f:
                f.write(source)
            proc = subprocess.run([cc, *flags, src_path, "-o", out_path, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"gcc failed to compile a kernel:\n{proc.stderr}\n--- source ---\n{source}")
            with open(out_path, "rb") as f:
                return f.read()
    return compiler.disk_cached((source, compiler_identity(cc), " ".join(flags)), ".so", build)


class CPUProgram:
    """A compiled kernel: call with buffers and variable values."""

    def __init__(self, kernel, source, path, error_flags, workspace=None):
        self.kernel, self.source = kernel, source
        self.lib = ctypes.CDLL(path)
        self.fn = getattr(self.lib, kernel.name)
        n_ptrs = len(kernel.params)
        self.fn.argtypes = [ctypes.c_void_p] * n_ptrs + [ctypes.c_int] * len(kernel.var_names) + (
            [ctypes.c_void_p] if kernel.uses_check else [])
        self.fn.restype = None
        self.var_order = [name for name, _, _ in kernel.var_names]
        self.param_index = [p.index for p in kernel.params]
        self.extra = [error_flags.ctypes.data] if kernel.uses_check else []
        if workspace is not None:
            self.workspace = workspace   # held: the device may replace its array with a larger one later
            self.fn.argtypes = self.fn.argtypes + [ctypes.c_void_p]
            self.extra.append(workspace.ctypes.data)

    def __call__(self, bufs, var_vals):
        args = [bufs[i].mem.address for i in self.param_index]
        args += [var_vals[name] for name in self.var_order]
        self.fn(*args, *self.extra)


# n replays, each reading its input `in_slot` where the last one wrote its output, the output moving on by its size
# and the variable in `var_slot` counting up, and the last output copied to `last`: CompiledFunction.chain without
# the Python between the calls.
CHAIN = r"""
void pg_chain(long long* s, int n, int in_slot, int out_slot, int var_slot, long long out_bytes, void* last) {
  for (int i = 0; i < n; i++) {
    pg_replay(s);
    s[in_slot] = s[out_slot];
    s[out_slot] += out_bytes;
    s[var_slot] += 1;
  }
  memcpy(last, (const void*)s[in_slot], out_bytes);
}
"""


class CPUGraph:
    """A captured step (see compile.Trace) as one generated C function that calls its kernels in order: a replay
    is one call instead of a Python call per kernel. Every address and variable the kernels take sits in a slot
    table; a replay writes the call's inputs, outputs and variables into their slots and runs the function."""

    def __init__(self, steps, inputs, outputs):
        self.slots, self.input_slot, self.output_slot, self.var_slot = [], {}, {}, {}
        self.keep = []   # the programs whose functions the table points into
        sizes = {("input", k): spec[1] * spec[2].itemsize for k, spec in inputs.items()}
        sizes.update({("output", k): spec[1] * spec[2].itemsize for k, spec in outputs.items()})
        lines = []
        for prog, bound, recorded_vars in steps:
            where = [self.bind(kind, ref) for kind, ref in bound]
            if prog is None:   # a copy: bufs = [dst, src]
                nbytes = sizes[bound[0]] if bound[0][0] != "buffer" else bound[0][1].nbytes
                lines.append(f"  memcpy((void*)s[{where[0]}], (const void*)s[{where[1]}], {nbytes});")
                continue
            self.keep.append(prog)
            args = [f"(void*)s[{where[i]}]" for i in prog.param_index]
            types = ["void*"] * len(args)
            for name in prog.var_order:
                args.append(f"(int)s[{self.named(self.var_slot, name)}]")
                types.append("int")
            for address in prog.extra:   # the error flags, the matmul workspace
                args.append(f"(void*)s[{self.add(address)}]")
                types.append("void*")
            function = self.add(ctypes.cast(prog.fn, ctypes.c_void_p).value)
            lines.append(f"  ((void (*)({', '.join(types) or 'void'}))s[{function}])({', '.join(args)});")
        source = "#include <string.h>\nvoid pg_replay(const long long* s) {\n" + "\n".join(lines) + "\n}\n" + CHAIN
        self.lib = ctypes.CDLL(compile_c(source))
        self.fn = self.lib.pg_replay
        self.fn.argtypes, self.fn.restype = [ctypes.c_void_p], None
        self.chain = self.lib.pg_chain
        self.chain.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_longlong, ctypes.c_void_p]
        self.chain.restype = None
        self.table = np.array(self.slots, dtype=np.int64)

    def add(self, value) -> int:
        self.slots.append(int(value))
        return len(self.slots) - 1

    def named(self, table, key) -> int:
        if key not in table:
            table[key] = self.add(0)
        return table[key]

    def bind(self, kind, ref) -> int:
        if kind == "input":
            return self.named(self.input_slot, ref)
        if kind == "output":
            return self.named(self.output_slot, ref)
        return self.add(ref.mem.address)

    def replay(self, inputs, outputs, var_values):
        self.fill(inputs, outputs, var_values)
        self.fn(self.table.ctypes.data)

    def replay_chain(self, inputs, out, last, var_values, n, feed, var):
        """n replays in one call (see compile.CompiledFunction.chain): out holds their n results, one after the
        other, and last a copy of the last; replay i + 1 reads input `feed` where replay i wrote, with the variable
        `var` one higher. False (and nothing run) where the step cannot be chained so."""
        if var not in self.var_slot or feed not in self.input_slot or 0 not in self.output_slot:
            return False   # the step does not read that variable or input, or write its output, in a kernel
        self.fill(inputs, {0: out}, var_values)
        self.chain(self.table.ctypes.data, n, self.input_slot[feed], self.output_slot[0], self.var_slot[var],
                   last.nbytes, last.mem.address)
        return True

    def fill(self, inputs, outputs, var_values):
        for k, buf in inputs.items():
            self.table[self.input_slot[k]] = buf.mem.address
        for k, buf in outputs.items():
            self.table[self.output_slot[k]] = buf.mem.address
        for name, value in var_values.items():
            if name in self.var_slot:
                self.table[self.var_slot[name]] = value


# ----------------------------------------------------------------------------------------------------------------------
# Memory and the device


ASAN = os.environ.get("PICOGRAD_ASAN", "") not in ("", "0")   # kernels built with AddressSanitizer (make test-asan)


class CPUMemory:
    """`nbytes` at `offset` in a numpy array of bytes (the array keeps them alive)."""
    __slots__ = ("array", "address", "nbytes")

    def __init__(self, raw: np.ndarray, offset: int, nbytes: int):
        self.array = raw[offset:offset + nbytes]
        self.address, self.nbytes = raw.ctypes.data + offset, nbytes


def _out_of_memory(nbytes) -> MemoryError:
    return MemoryError(f"CPU: cannot allocate {nbytes} bytes ({nbytes / 2**30:.2f} GiB)")


def host_bytes(nbytes) -> np.ndarray:
    try:
        return np.empty(nbytes, dtype=np.uint8)
    except (MemoryError, ValueError):
        raise _out_of_memory(nbytes) from None


def huge_page_bytes(nbytes, huge_page: int) -> tuple[np.ndarray, int]:
    """Fresh pages straight from the kernel, asked to be transparent huge pages: (the bytes, the offset of the first
    huge-page boundary in them), with whole huge pages from there to past nbytes. Not malloc's: once a program has
    freed big arrays, malloc serves blocks of up to 32 MB from its heap, whose pages were touched before as small
    ones and stay small (stories110M's stacked q/k/v weights sat there, 30% of their bytes on small pages)."""
    size = _round_up(nbytes, huge_page) + huge_page
    try:
        pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        raise _out_of_memory(nbytes) from None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        pages.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(pages, dtype=np.uint8)   # keeps the mapping alive; unmapped when the last view goes
    return raw, (-raw.ctypes.data) % huge_page


class CPUDevice:
    """The host: memory from a size-keyed cache (so a steady loop does not fault in fresh pages), kernels via gcc."""
    kind = "CPU"
    CACHE_LIMIT = 2 << 30
    # Memory that a kernel streams wants transparent huge pages: the hardware prefetchers stop at the edge of a 4 KB
    # page, and every page costs a TLB miss (they are slow to fault in the first time: a training step's first call
    # spends about 1 s of system time on its 1.5 GB). Blocks of ARENA_BLOCKS[1] and more get mappings of their own,
    # whole huge pages (huge_page_bytes). Blocks from ARENA_BLOCKS[0] up to that are carved, 64-byte aligned, from
    # shared arenas of ARENA_BYTES mapped the same way: on malloc's small pages, a stories15M decode's per-layer
    # weights (0.3-1.8 MB) ran at 11 GB/s where the vocabulary head, on huge pages, ran at 15. An arena lives as
    # long as any of its blocks (freed blocks are reused through the cache, by size); smaller blocks stay on
    # malloc's pages, so that scalars and masks do not pin arenas. Under AddressSanitizer every block is exactly its
    # own array, so that a read one element past the end is reported.
    ARENA_BYTES, HUGE_PAGE = 32 << 20, 2 << 20
    ARENA_BLOCKS = (64 << 10, 4 << 20)

    def __init__(self, name="CPU"):
        self.name = name
        self.free_blocks, self.cached_bytes, self.lock = {}, 0, threading.Lock()
        self.arena, self.arena_used, self.arena_end = None, 0, 0
        self.error_flags = np.zeros(3, dtype=np.int32)
        self.threads = cpu_threads()
        self.workspace = np.zeros(0, dtype=np.float32)   # matmul panels; grown (never shrunk) as kernels need

    def alloc(self, nbytes):
        with self.lock:
            blocks = self.free_blocks.get(nbytes)
            if blocks:
                self.cached_bytes -= nbytes
                return blocks.pop()
        try:
            return self.new_block(nbytes)
        except MemoryError:
            with self.lock:
                self.free_blocks.clear()
                self.cached_bytes = 0
            return self.new_block(nbytes)

    def new_block(self, nbytes) -> CPUMemory:
        if ASAN:
            return CPUMemory(host_bytes(nbytes), 0, nbytes)
        if nbytes < self.ARENA_BLOCKS[0]:
            raw = host_bytes(nbytes + 64)
            return CPUMemory(raw, (-raw.ctypes.data) % 64, nbytes)
        if nbytes >= self.ARENA_BLOCKS[1]:
            # its own huge pages, first to last: a block that starts or ends inside a 2 MB frame has that frame on
            # small pages (a stories110M down projection, 6 MB at malloc's alignment, had a third of its bytes
            # there)
            return CPUMemory(*huge_page_bytes(nbytes, self.HUGE_PAGE), nbytes)
        with self.lock:
            if self.arena is None or self.arena_used + nbytes > self.arena_end:
                raw, start = huge_page_bytes(self.ARENA_BYTES, self.HUGE_PAGE)
                self.arena, self.arena_used, self.arena_end = raw, start, start + self.ARENA_BYTES
            mem = CPUMemory(self.arena, self.arena_used, nbytes)
            self.arena_used += _round_up(nbytes, 64)
            return mem

    def free(self, mem, nbytes):
        with self.lock:   # buffers may be dropped on the compile threads
            if self.cached_bytes + nbytes <= self.CACHE_LIMIT and not ASAN:   # ASAN: freed memory must be poisoned
                self.free_blocks.setdefault(nbytes, []).append(mem)
                self.cached_bytes += nbytes

    def copyin(self, mem, array: np.ndarray):
        mem.array[:] = array.reshape(-1).view(np.uint8)

    def copyout(self, out: np.ndarray, mem):
        out.reshape(-1).view(np.uint8)[:] = mem.array

    def copyout_later(self, out: np.ndarray, mem):
        """The host has nothing to overlap: the copy now, and a wait that has nothing left to do."""
        self.copyout(out, mem)
        return lambda: None

    def copy_within(self, dst, src, nbytes):
        dst.array[:nbytes] = src.array[:nbytes]

    def synchronize(self):
        pass

    def build(self, kernel):
        contraction = compiler.match_contraction(kernel)
        if contraction is not None and self.worth_gemm(contraction):
            gemm = GemmRenderer()
            source = gemm.render_gemm(contraction, self.threads)
            need = gemm.workspace(contraction.K) * self.threads
            with self.lock:   # programs are built on several threads: check and grow together
                if self.workspace.size < need:
                    self.workspace = np.zeros(need, dtype=np.float32)
                workspace = self.workspace
            return CPUProgram(kernel, source, compile_c(source), self.error_flags, workspace)
        source = CRenderer().render(kernel)
        return CPUProgram(kernel, source, compile_c(source), self.error_flags)

    @staticmethod
    def worth_gemm(c) -> bool:
        """Packing pays off once both output sides and the depth are a few panels big."""
        return c.m_ranges and c.n_ranges and c.M >= 8 and c.N >= 16 and c.K >= 8 and c.M * c.N * c.K >= 32768

    def capture_graph(self, steps, inputs, outputs):
        return CPUGraph(steps, inputs, outputs)

    def check_errors(self):
        if self.error_flags[0]:
            index, size = int(self.error_flags[1]), int(self.error_flags[2])
            self.error_flags[:] = 0
            raise IndexError(f"index {index} is out of bounds for a dimension of size {size}")
