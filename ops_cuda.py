"""picograd CUDA backend: the CUDA renderer (the C renderer with loops mapped to threads), NVRTC -> cubin -> the
driver API, device memory (a caching allocator), one stream per device, and the error flag of checked kernels.

Read top to bottom:
  1. launch plans: how a lowered compile.Kernel maps onto the GPU. Every output element is owned by a thread
     (elementwise; 4 consecutive elements with 16-byte loads where the layout allows), or by a group of threads
     that split its reductions (a warp or a block tree with shuffles when the reduced axis is contiguous in
     memory; a slice of a block along the reduced axis when it is strided); a Contraction gets a shared-memory
     tiled matmul (register-blocked fp32, or tensor cores with pg.TF32: warpgroup wgmma on Hopper, reading tf32
     copies of its operands that a prologue kernel writes, mma.sync on Ampere and for small tiles);
  2. the renderer that prints each plan, reusing the C renderer's expressions, loads and stores;
  3. NVRTC compilation to a cubin for the device's architecture (sm_90a on Hopper), through compile.py's disk cache;
  4. programs (module, function, argument slots, launch) and the device (context, stream, allocator, copies).

cuda-python (`cuda.bindings`) is imported only when a CUDA device opens or a kernel is compiled, so picograd and
the CPU backend work without it; asking for CUDA without it, without a driver or without a GPU is a RuntimeError
that names what is missing.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import threading

import numpy as np

import picograd as pg
from picograd import Ops, UOp, prod
import compile as compiler
from ops_cpu import CRenderer, _cdiv, _round_up

# ----------------------------------------------------------------------------------------------------------------------
# 1. Launch plans


class LaunchPlan:
    """How one kernel runs: `kind` names the template (empty, elementwise, wide, serial, warp, block, split, row_warp,
    row_block, sgemm, mma, wgmma), `threads` per block, `grid` blocks (1-D). The group kinds give each output `group`
    threads that split its reductions (warp: 32 lanes; block: the whole block; split: `group` warps, one slice each,
    32 outputs per block); the row kinds give each row of a kernel with fused row reductions a warp or a block.
    `contraction` and `tile` describe a matmul; `shared` is the dynamic shared memory a block needs, in bytes.
    `programmatic` (Hopper on): the kernel may launch while the one before it in the stream still runs, and waits
    for that one's results in its first instruction (programmatic dependent launch, see CUDARenderer.render)."""
    __slots__ = ("kind", "threads", "grid", "group", "contraction", "tile", "shared", "programmatic", "scratch",
                 "prologue_grid", "copies")

    def __init__(self, kind, threads, grid, group=1, contraction=None, tile=None):
        self.kind, self.threads, self.grid, self.group = kind, threads, grid, group
        self.contraction, self.tile = contraction, tile
        self.shared = tile.shared_bytes() if tile is not None else 0
        # wgmma: the bytes of device scratch its prologue writes the tf32 copies of the operands to, and that
        # prologue's blocks (of COPY_THREADS, a panel of the copy each); see CUDARenderer.render_tf32_copies
        self.scratch = self.prologue_grid = 0
        self.copies = None   # wgmma: the copies' layout (_TF32Copies)
        if kind == "wgmma":
            self.copies = _TF32Copies(contraction, tile)
            self.scratch, self.prologue_grid = 4 * self.copies.size, sum(self.copies.blocks)
        self.programmatic = False   # launched as a programmatic dependent of the kernel before it (set by render)

    def __repr__(self):
        return f"LaunchPlan({self.kind}, threads={self.threads}, grid={self.grid}, group={self.group})"


# the tile of an operand's tf32 copy that one prologue block (of COPY_THREADS) writes, a panel: COPY_ROWS rows (x) by
# COPY_K values of k
COPY_ROWS, COPY_K, COPY_THREADS = 64, 32, 256


class MatmulTile:
    """Block tile BM x BN stepping BK along K. tf32 `mma`: a grid of WARPS_M x WARPS_N warps, each owning a (BM /
    WARPS_M) x (BN / WARPS_N) tile of m16n8k8 mma fragments. tf32 `wgmma`: WARPGROUPS groups of 4 warps, each owning
    64 rows x BN, and a warp that fetches their slices. fp32: (BM / TM) x (BN / TN) threads, each owning TM adjacent
    rows x TN columns in groups of 4 (see fp32_layout). `min_blocks` asks the compiler to fit that many blocks on a
    multiprocessor (capping registers per thread). `buffers`: how many BK-deep slices shared memory holds (1 refills
    the one buffer between two barriers; 2 stages the next slice while this one is used; wgmma keeps 3 so that an
    asynchronous multiply can still read one slice while later ones are copied in). wgmma's `overlap`: 1 leaves one
    slice's multiply running while the next one's is issued, and frees its buffer one slice later; 0 waits for each
    multiply in full, which frees its buffer at once (worth it when another block on the multiprocessor keeps the
    tensor cores busy meanwhile). wgmma's `cluster`: 2 runs the blocks in pairs (a thread block cluster) over the
    same columns and adjacent rows, each fetching half of their common B slice for both. `efficiency`: the tile's
    speed on a big product relative to the biggest tile's, for the choice between tiles (CUDARenderer.plan_matmul)."""
    __slots__ = ("BM", "BN", "BK", "warps_m", "warps_n", "TM", "TN", "warpgroups", "threads", "min_blocks",
                 "buffers", "overlap", "cluster", "efficiency")

    def __init__(self, BM, BN, BK, warps_m=0, warps_n=0, TM=0, TN=0, warpgroups=0, min_blocks=1, buffers=2,
                 overlap=1, cluster=1, efficiency=1.0):
        self.BM, self.BN, self.BK = BM, BN, BK
        self.warps_m, self.warps_n, self.TM, self.TN, self.warpgroups = warps_m, warps_n, TM, TN, warpgroups
        self.min_blocks, self.buffers, self.overlap, self.efficiency = min_blocks, buffers, overlap, efficiency
        self.cluster = cluster
        if warpgroups:
            # rows of 128 bytes; the copies are in panels of COPY_ROWS, and a cluster's blocks split B in halves
            assert BM == 64 * warpgroups and BK == COPY_K == 32 and buffers >= 3 and cluster in (1, 2) and \
                BN % (COPY_ROWS * cluster) == 0, (BM, BN, BK, warpgroups, buffers, cluster)
            self.threads = 128 * warpgroups + 32
        else:
            self.threads = 32 * warps_m * warps_n if warps_m else (BM // TM) * (BN // TN)

    def shared_bytes(self) -> int:
        """Dynamic shared memory of the wgmma template (the others declare theirs statically): the buffers, a
        kilobyte to spare (they start on the first 1024-byte boundary, see body_wgmma), then two barriers of 8
        bytes a buffer."""
        return 4 * self.buffers * (self.BM + self.BN) * self.BK + 1024 + 16 * self.buffers if self.warpgroups else 0


TF32_TILES = (MatmulTile(128, 128, 16, warps_m=2, warps_n=2), MatmulTile(64, 64, 16, warps_m=2, warps_n=2))
# Hopper (sm_90a): warpgroup mma from shared memory for the big tiles (128 x 128 where 128 x 256 tiles would leave
# much of the last wave idle, such as 768-wide products and weight gradients: two blocks a multiprocessor, three
# slices deep, 0.95 of the big tile's speed on 8192^2 in tune_matmul.py); the small one stays on mma.sync
WGMMA_TILES = (MatmulTile(128, 256, 32, warpgroups=2, buffers=4, cluster=2),
               MatmulTile(128, 128, 32, warpgroups=2, buffers=3, min_blocks=2, overlap=0, cluster=2, efficiency=0.95),
               TF32_TILES[1])
# fp32: 128 x 128 x 8, two slices deep, registers capped for two blocks a multiprocessor (tune_matmul.py f8x2_mb2)
FP32_TILES = (MatmulTile(128, 128, 8, TM=8, TN=8, min_blocks=2), MatmulTile(64, 64, 16, TM=4, TN=4, buffers=1))


class _TF32Copies:
    """The layout of a wgmma product's operand copies in scratch, as the bulk copies fetch them: each operand in
    panels of COPY_ROWS rows x COPY_K values of k (8 KB, laid out as the slice's rows are in shared memory: 128
    bytes a row, its 16-byte groups swizzled, see CUDARenderer.body_wgmma), ordered [batch element][k slice]
    [panel], so a block's slice of an operand is a run of whole panels. Rows are padded with zeros to whole block
    tiles (A's to whole clusters of them), k to whole slices. A's panels first, B's from b_offset; `size` floats
    in all. The prologue writes a panel a block: `blocks` = (A's panels, B's), `panels` and `slices` per operand
    and batch element."""

    def __init__(self, c, tile):
        n_batch = prod(r.arg[1] for r in c.batch)
        self.k4 = _round_up(c.K, 4)
        self.slices = _cdiv(c.K, COPY_K)
        self.panels = (_round_up(c.M, tile.BM * tile.cluster) // COPY_ROWS, _round_up(c.N, tile.BN) // COPY_ROWS)
        panel = COPY_ROWS * COPY_K
        self.b_offset = n_batch * self.slices * self.panels[0] * panel
        self.size = self.b_offset + n_batch * self.slices * self.panels[1] * panel
        self.blocks = tuple(n_batch * self.slices * panels for panels in self.panels)
        if sum(self.blocks) >= 2**31:
            raise ValueError(f"a tf32 product with {self.size} operand elements: its operand copies need more than "
                             f"2^31 blocks")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _floor_pow2(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


# ----------------------------------------------------------------------------------------------------------------------
# 2. The renderer

CUDA_PREAMBLE = """\
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
__device__ __forceinline__ int pg_check(int i, int n, int* err) {
  if ((unsigned)i >= (unsigned)n) {
    if (atomicCAS(err, 0, 1) == 0) { err[1] = i; err[2] = n; }
    return 0;
  }
  return i;
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define pg_wait_for_previous_kernel() asm volatile("griddepcontrol.wait;" ::: "memory")
#define pg_release_next_kernel() asm volatile("griddepcontrol.launch_dependents;")
#else
#define pg_wait_for_previous_kernel()
#define pg_release_next_kernel()
#endif
"""

# cvt.rna rounds fp32 to tf32 (10-bit mantissa, nearest, ties away) as cuBLAS does; the mma accumulates in fp32.
# Fragment layout of m16n8k8 (lane = 4 * g + t): a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4) of A[m][k];
# b0 (k=t, n=g) b1 (k=t+4, n=g); c0..c3 at (g + 8 * (i >> 1), 2 * t + (i & 1)) of C[m][n].
MMA_HELPERS = """\
__device__ __forceinline__ unsigned pg_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void pg_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""


# Waiting for a barrier's phase to be over: pg_barrier_wait for `full` barriers, pg_barrier_wait_cluster for `empty`
# ones (see CUDARenderer.body_wgmma). A `full` barrier's one arrival is its own block's fetching thread, and its bytes
# count down as the copies land (complete_tx), which makes the copies' writes, the partner block's multicast ones
# included, visible to the threads that see the phase complete: the warpgroups acquire at the CTA's scope (as
# CUTLASS's ClusterBarrier::wait). An `empty` barrier publishes no data: a warpgroup arrives (pg_barrier_arrive_at)
# once wgmma.wait_group has returned, that is once its multiplies have finished reading the buffer, and the fetching
# thread issues the copies that overwrite it only after it sees the phase complete. Completion orders those reads
# before those writes (both by the async proxy, which a release and an acquire of ordinary memory would not order
# anyway), so the arrivals and this wait are relaxed, at cluster scope since the partner block's warpgroups arrive
# too. (A release at cluster scope made each arriving warp wait on a GPU-wide memory barrier, MEMBAR.ALL.GPU in the
# SASS, every slice; an acquire there invalidates the L1 cache, CCTL.IVALL.) The suspend-time hint (10 ms, in
# nanoseconds, CUTLASS's) lets a waiting thread sleep until the phase completes instead of polling after the
# system's default limit.
BARRIER_WAIT = """\
__device__ __forceinline__ void {name}(unsigned long long* bar, unsigned parity) {{
  unsigned done;
  do {{
    asm volatile("{{ .reg .pred p; mbarrier.try_wait.parity.{sem}.shared::cta.b64 p, [%1], %2, %3; "
                 "selp.u32 %0, 1, 0, p; }}" : "=r"(done) : "r"(pg_shared(bar)), "r"(parity), "r"(10000000) : "memory");
  }} while (!done);
}}
"""
BARRIER_WAITS = "".join(BARRIER_WAIT.format(name=name, sem=sem) for name, sem in (
    ("pg_barrier_wait", "acquire.cta"), ("pg_barrier_wait_cluster", "relaxed.cluster")))


def wgmma_helpers(n: int) -> str:
    """Hopper's warpgroup mma (sm_90a) for a 64 x n x 8 step with both operands in shared memory, as the wgmma
    template uses it: a descriptor of an operand in the 128-byte swizzled layout (_TF32Copies),
    the fences, and the multiply itself, whose n / 2 accumulators per thread lie as mma's C fragments of 16-row
    pieces: warp w of the group holds rows 16w .. 16w + 15, d[4j + i] at (g + 8 * (i >> 1), 8j + 2t + (i & 1)).
    And what feeds it: the bulk copy engine (global -> shared memory, one instruction a piece, optionally into the
    same place of every block of the cluster), the shared-memory barriers that count a slice's bytes landing and
    its readers leaving, and the cluster's own barrier."""
    regs = n // 2
    outputs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f"""\
typedef unsigned long long pg_desc;
#define PG_DYNAMIC_SHARED(name, words) extern __shared__ __align__(128) unsigned name[]
__device__ __forceinline__ unsigned pg_shared(const void* p) {{ return (unsigned)__cvta_generic_to_shared(p); }}
__device__ __forceinline__ pg_desc pg_wgmma_desc(const unsigned* tile) {{   /* 128-byte swizzle, 1024-byte atoms */
  return (pg_desc)((pg_shared(tile) & 0x3ffff) >> 4) | ((pg_desc)1 << 16) | ((pg_desc)(1024 >> 4) << 32) |
         ((pg_desc)1 << 62);
}}
__device__ __forceinline__ void pg_wgmma_fence() {{ asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void pg_wgmma_commit() {{ asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void pg_wgmma_wait_1() {{ asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }}
__device__ __forceinline__ void pg_wgmma_wait_0() {{ asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }}
__device__ __forceinline__ void pg_wgmma_tf32(float* d, pg_desc a, pg_desc b) {{
  asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{regs + 2}, 0; "
               "wgmma.mma_async.sync.aligned.m64n{n}k8.f32.tf32.tf32 "
               "{{{", ".join(f"%{i}" for i in range(regs))}}}, %{regs}, %{regs + 1}, p, 1, 1; }}"
               : {outputs}
               : "l"(a), "l"(b), "r"(1) : "memory");
}}
__device__ __forceinline__ void pg_cluster_sync() {{   /* every thread of every block of the cluster */
  asm volatile("barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;" ::: "memory");
}}
__device__ __forceinline__ void pg_barrier_init(unsigned long long* bar, unsigned count) {{
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(pg_shared(bar)), "r"(count) : "memory");
}}
__device__ __forceinline__ void pg_barriers_visible() {{   /* the inits, to the cluster and the copy engine */
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}}
/* arrive, and make the phase wait for bytes more */
__device__ __forceinline__ void pg_barrier_expect(unsigned long long* bar, unsigned bytes) {{
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(pg_shared(bar)), "r"(bytes) : "memory");
}}
/* arrive on rank's barrier, relaxed: see BARRIER_WAIT */
__device__ __forceinline__ void pg_barrier_arrive_at(unsigned long long* bar, unsigned rank) {{
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(pg_shared(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [%0];" :: "r"(remote) : "memory");
}}
{BARRIER_WAITS}
__device__ __forceinline__ void pg_bulk_copy(unsigned* shared, const float* global, unsigned bytes,
                                             unsigned long long* bar) {{
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(pg_shared(shared)), "l"(global), "r"(bytes), "r"(pg_shared(bar)) : "memory");
}}
__device__ __forceinline__ void pg_bulk_copy_to_cluster(unsigned* shared, const float* global, unsigned bytes,
                                                        unsigned long long* bar, unsigned short blocks) {{
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
               "[%0], [%1], %2, [%3], %4;"
               :: "r"(pg_shared(shared)), "l"(global), "r"(bytes), "r"(pg_shared(bar)), "h"(blocks) : "memory");
}}
"""

VECTOR_TYPES = {"float": "float4", "int": "int4", "unsigned char": "uchar4"}

# Every variable name gets a slot in each device's variable table (a small int array in device memory).
# the most elements of a row a thread of a row kernel keeps in registers (see CUDARenderer.open_stride)
ROW_REGISTERS = 32
VAR_TABLE_SLOTS = 64
_var_slots = {}


def var_slot(name: str) -> int:
    if name not in _var_slots:
        if len(_var_slots) == VAR_TABLE_SLOTS:
            raise RuntimeError(f"more than {VAR_TABLE_SLOTS} distinct pg.Variable names")
        _var_slots[name] = len(_var_slots)
    return _var_slots[name]


class _NoVars:
    """A kernel seen without its variables (for the C signature, which would declare them as int parameters)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):
        return [] if name == "var_names" else getattr(self.kernel, name)


def replace_vars(kernel):
    return _NoVars(kernel) if kernel.var_names else kernel
SHARED_NAMES = {"float": "f", "int": "i", "unsigned char": "b"}


class CUDARenderer(CRenderer):
    """Prints a lowered Kernel as one CUDA __global__ function. Expressions, loads and stores are the C renderer's;
    what changes is the frame around them: a launch plan instead of loops, reductions split across threads, and
    the matmul templates. After render(), `launch` holds the plan the program launches with."""
    restrict = "__restrict__"
    # CUDA's own: exp2f and sinf within 2 ulp, log2f 1 ulp, sqrtf correctly rounded (no fast-math, no flushing)
    math_fns = {Ops.EXP2: "exp2f", Ops.LOG2: "log2f", Ops.SIN: "sinf", Ops.SQRT: "sqrtf"}
    THREADS = 256
    FULL_THREADS = 2048   # resident threads per multiprocessor (Hopper, Ampere): what a memory-bound launch should fill
    SMALL_PRODUCT = 1 << 20   # operand elements, all batches together, below which a thin product is a reduction
    # wgmma's prologue writes both operands' tf32 copies: a pass over memory that costs about 400 / M + 400 / N of
    # the product's time at the tensor cores' speed. Products with a side under this keep the mma.sync template
    # (a 256-token prefill's vocabulary head: 23 TFLOP/s with the copies, 37 on mma.sync, H200)
    WGMMA_MIN_SIDE = 512
    cuda_preamble = CUDA_PREAMBLE
    mma_helpers = MMA_HELPERS
    wgmma_helpers = staticmethod(wgmma_helpers)

    def __init__(self, arch="sm_90", tf32=False, sm_count=132):
        self.arch = arch
        self.sm = int(arch.split("_")[1].rstrip("a"))
        self.tf32 = bool(tf32) and self.sm >= 80   # mma.sync with tf32 operands needs Ampere or newer
        self.wgmma = self.tf32 and arch == "sm_90a"   # warpgroup mma: Hopper's arch-specific target
        self.sm_count = sm_count
        self.launch = None
        self.rows = None   # (row loops, row element loops) of a kernel with fused row reductions, set by plan
        # in a pass over a row kept in registers: (step variable, steps a thread, the loops it walks, whether a later
        # pass may read the row again); the loads kept so far and where their arrays are declared (see kept_load)
        self.row_pass = None
        self.kept, self.kept_at = {}, 0

    # -- planning
    def render(self, kernel) -> str:
        self.ranges_of = compiler.range_sets(kernel.store)
        self.rows = self.row_pass = None
        self.launch = self.plan(kernel)
        # Hopper's programmatic dependent launch: a kernel's blocks are dispatched while the kernel before it still
        # runs its last blocks, and wait (griddepcontrol.wait, every thread, before anything else) until that
        # kernel has finished and its writes are visible. Decode runs hundreds of kernels of a few microseconds,
        # whose launch and ramp-up this overlaps with the previous kernel's tail.
        self.launch.programmatic = self.sm >= 90
        kind = self.launch.kind
        self.preamble = self.cuda_preamble + (self.mma_helpers if kind in ("mma", "wgmma") else "") + (
            self.wgmma_helpers(self.launch.tile.BN) if kind == "wgmma" else "")
        return super().render(kernel)

    def plan(self, kernel) -> LaunchPlan:
        n_out = kernel.out_size
        if n_out >= 2**31:
            raise ValueError(f"kernel {kernel.name}: {n_out} output elements do not fit 32-bit indexing")
        if n_out == 0:
            return LaunchPlan("empty", 32, 0)   # never launched
        if kernel.scatter is not None:
            # zeroed first (the program sets the output to 0), then a thread per (reduction step, element)
            # adds its value where the index says, atomically: an embedding's gradient without the one-hot sum
            work = prod(r.arg[1] for r in kernel.scatter.ranges) * (n_out // kernel.scatter.o.arg[1])
            return LaunchPlan("scatter", self.THREADS, max(1, _cdiv(work, self.THREADS)))
        accs = [n for n in kernel.store.toposort() if n.op is Ops.ACC]
        if not accs:
            if self.wide_ok(kernel):
                return LaunchPlan("wide", self.THREADS, _cdiv(n_out // 4, self.THREADS))
            return LaunchPlan("elementwise", self.THREADS, _cdiv(n_out, self.THREADS))
        c = compiler.match_contraction(kernel)
        if c is not None and c.m_ranges and c.n_ranges and not self.latency_bound(c):
            return self.plan_matmul(c)
        outputs = set(kernel.ranges)
        top = [a for a in accs if self.ranges_of[a] <= outputs]
        size = max((_acc_size(a) for a in top), default=1)
        self.rows = self.row_split(kernel)
        if self.rows is not None:   # reductions of each row fused into the kernel that writes the row's elements
            n_rows = prod(r.arg[1] for r in self.rows[0])
            if size <= 1024:
                return LaunchPlan("row_warp", self.THREADS, _cdiv(n_rows, self.THREADS // 32), group=32)
            group = self.group_size(size, n_rows)
            return LaunchPlan("row_block", group, n_rows, group=group)
        if size >= 32 and all(self.contiguous_range(a) is not None for a in top):
            if size <= 1024:
                return LaunchPlan("warp", self.THREADS, _cdiv(n_out, self.THREADS // 32), group=32)
            group = self.group_size(size, n_out)
            return LaunchPlan("block", group, n_out, group=group)
        if size >= 32:
            # strided: 32 adjacent outputs per block along the lanes, their reductions cut into `by` slices
            by = min(32, _next_pow2(_cdiv(65536, n_out)), _floor_pow2(max(1, size // 16)))
            if by > 1:
                return LaunchPlan("split", 32 * by, _cdiv(n_out, 32), group=by)
        return LaunchPlan("serial", self.THREADS, _cdiv(n_out, self.THREADS))

    def group_size(self, size, n_groups) -> int:
        """Threads per block for n_groups reductions of size elements each, a block apiece: about 16 elements per
        thread; but when the blocks are few (a matrix-vector product with 512 outputs, one norm's row) the group
        grows, down to 4 elements a thread (one 16-byte load), so the GPU has enough loads in flight to reach its
        bandwidth."""
        group = max(64, min(1024, _next_pow2(_cdiv(size, 16))))
        if n_groups >= 2 * self.sm_count:
            group = min(group, 256)
        while group < 1024 and group * 8 <= size and n_groups * group < self.FULL_THREADS * self.sm_count:
            group *= 2
        return group

    def latency_bound(self, c) -> bool:
        """A product with a side thinner than a tile's fragment (decode's attention: 4 query heads of a group
        against 128 keys) and operands small enough to stay in cache runs as a reduction per output: a tile would
        be mostly padding, few blocks, and each k-step a barrier. Thin products over big operands (a batched
        matrix-vector product through a weight) keep the tile, which reads each weight once for the batch."""
        n_batch = prod(r.arg[1] for r in c.batch)
        return min(c.M, c.N) < 16 and (c.M + c.N) * c.K * n_batch <= self.SMALL_PRODUCT

    def plan_matmul(self, c) -> LaunchPlan:
        wgmma = self.wgmma and min(c.M, c.N) >= self.WGMMA_MIN_SIDE
        tiles = (WGMMA_TILES if wgmma else TF32_TILES) if self.tf32 else FP32_TILES
        n_batch = prod(r.arg[1] for r in c.batch)

        def blocks(t):   # a cluster's blocks take adjacent rows of tiles: the last cluster may have one past M
            return _round_up(_cdiv(c.M, t.BM), t.cluster) * _cdiv(c.N, t.BN) * n_batch

        def busiest(t):   # the work of the multiprocessor dealt the most blocks, at the tile's speed
            return _cdiv(blocks(t), self.sm_count) * t.BM * t.BN / t.efficiency
        # of the tiles that are not mostly padding (attention's 64-wide heads) and whose blocks fill the GPU, the
        # one that finishes first (8192 x 768 takes 1.45 waves of 128 x 256 tiles: 128 x 128 ones are 12% faster);
        # else the last, smallest one
        fitting = [t for t in tiles[:-1] if c.M >= t.BM // 2 + 1 and c.N >= t.BN // 2 + 1 and
                   blocks(t) >= self.sm_count]
        tile = min(fitting, key=busiest) if fitting else tiles[-1]
        grid = blocks(tile)
        kind = ("wgmma" if tile.warpgroups else "mma") if self.tf32 else "sgemm"
        return LaunchPlan(kind, tile.threads, grid, contraction=c, tile=tile)

    def contiguous_range(self, acc):
        """The reduce range of acc along which most of the loads that move with it walk memory with stride 1, if
        any (a row's sum; not a column's sum that also reads a per-row scale, which lanes should split by output)."""
        for r in reversed(acc.arg[1]):
            if r.arg[1] == 1:
                continue
            moving = [n.src[1] for n in acc.src[0].toposort()
                      if n.op is Ops.LOAD and r in self.ranges_of.get(n.src[1], ())]
            walking = sum(compiler._coeff(index, r) in (1, -1) for index in moving)
            if walking and 2 * walking >= len(moving):
                return r
        return None

    def wide_ok(self, kernel) -> bool:
        """16-byte loads and stores: the innermost output range has a multiple of 4 elements, the store and every
        load that moves with it walk it contiguously from a multiple of 4 (so addresses are 16-byte aligned), and
        no load's validity changes along it. Loads that do not move with it are read once for the 4 lanes."""
        if not kernel.ranges or kernel.ranges[-1].arg[1] % 4:
            return False
        last = kernel.ranges[-1]
        if not self.aligned_walk(kernel.store.src[1], last):
            return False
        for node in kernel.store.toposort():
            if node.op is Ops.LOAD and last in self.ranges_of[node]:
                if last in self.ranges_of[node.src[2]] or not self.aligned_walk(node.src[1], last):
                    return False
        return True

    def aligned_walk(self, index, r, width=4) -> bool:
        """index walks r with stride 1 from a multiple of width (where r is a multiple of width)."""
        terms, const = compiler._linear(index)
        if terms.get(r) != 1 or const % width:
            return False
        for term, coeff in terms.items():
            if term is r:
                continue
            if r in self.ranges_of.get(term, frozenset([r])) or coeff % width:
                return False
        return True

    # -- the frame
    def signature(self, kernel, prologue=False) -> str:
        """The kernel's declaration, or that of its tf32 copies' prologue (`<name>_tf32`, the same parameters)."""
        # variables (decode positions) are read from the device's variable table rather than passed by value, so
        # a captured CUDA graph serves every value: the table is refreshed before each replay
        c_signature = super().signature(replace_vars(kernel))
        if kernel.var_names:
            c_signature = c_signature[:-1] + ", const int* __restrict__ pg_vars)"
        if self.launch.scratch:
            c_signature = c_signature[:-1] + ", float* __restrict__ pg_scratch)"
        tile = self.launch.tile
        if prologue:
            return f'extern "C" __global__ void __launch_bounds__({COPY_THREADS}) ' + \
                c_signature[len("void "):].replace(f"{kernel.name}(", f"{kernel.name}_tf32(", 1)
        bounds = str(self.launch.threads)
        if tile is not None and tile.min_blocks > 1:
            bounds += f", {tile.min_blocks}"
        attributes = f"__launch_bounds__({bounds})"
        if tile is not None and tile.cluster > 1:
            attributes += f" __cluster_dims__({tile.cluster}, 1, 1)"
        return f'extern "C" __global__ void {attributes} ' + c_signature[len("void "):]

    def render_body(self, kernel):
        self.emit_prelude(kernel)
        self.loop_stack, self.reduce_depth, self.store_guard, self.group = [], 0, None, None
        self.outputs = frozenset(kernel.ranges)
        getattr(self, "body_" + self.launch.kind)(kernel)

    def emit_prelude(self, kernel):
        if self.launch.programmatic:
            # the wait comes first so that every thread, early returns included, sees the previous kernel done
            # (then the next kernel's completion implies this one's predecessors'); the dependents are released
            # only after it, so at most one kernel waits ahead of the running one
            self.emit("pg_wait_for_previous_kernel();", 1)
            self.emit("pg_release_next_kernel();", 1)
        for name, _, _ in kernel.var_names:
            self.emit(f"const int {name} = pg_vars[{var_slot(name)}];", 1)

    def body_elementwise(self, kernel):
        self.emit(f"int pg_gid = blockIdx.x * {self.launch.threads} + threadIdx.x;", 1)
        self.emit(f"if (pg_gid >= {kernel.out_size}) return;", 1)
        self.decompose("pg_gid", self.dims(kernel.ranges), 1)
        self.store(kernel.store, 1)

    body_serial = body_elementwise   # a thread per output; its reductions are loops (accumulate below)

    def body_scatter(self, kernel):
        sc = kernel.scatter
        loops = list(sc.ranges) + [r for r in kernel.ranges if r is not sc.o]
        work = prod(r.arg[1] for r in loops)
        self.emit(f"int pg_gid = blockIdx.x * {self.launch.threads} + threadIdx.x;", 1)
        self.emit(f"if (pg_gid >= {work}) return;", 1)
        self.decompose("pg_gid", self.dims(loops), 1)
        param, index, value = sc.store.src
        v = self.expr(value, 1)
        self.emit(f"atomicAdd(&d{param.arg[0]}[{self.expr(index, 1)}], {v});", 1)

    def body_empty(self, kernel):
        pass

    def body_wide(self, kernel):
        last = kernel.ranges[-1]
        name, size = last.arg
        base = f"{name}_4"
        self.emit(f"int pg_gid = blockIdx.x * {self.launch.threads} + threadIdx.x;", 1)
        self.emit(f"if (pg_gid >= {kernel.out_size // 4}) return;", 1)
        self.decompose("pg_gid", self.dims(kernel.ranges[:-1]) + [(base + "q", size // 4)], 1)
        self.emit(f"int {base} = {base}q * 4;", 1)
        loads = [n for n in kernel.store.toposort() if n.op is Ops.LOAD]
        for load in loads:
            if last not in self.ranges_of[load]:
                self.expr(load, 1)   # the same element for all 4 lanes
        lanes = {load: self.vector_load(load, name, base, 1) for load in loads if last in self.ranges_of[load]}
        param, index, value = kernel.store.src
        out_type = self.ctype(param.dtype)
        outs = [f"o{self.counter}_{j}" for j in range(4)]
        self.counter += 1
        self.emit(f"{out_type} {', '.join(outs)};", 1)
        for j, lane in enumerate("xyzw"):
            self.open_block(f"int {name} = {base} + {j};", 1)
            self.scopes[-1].update({load: f"{vec}.{lane}" for load, vec in lanes.items()})
            self.emit(f"{outs[j]} = {self.expr(value, 2)};", 2)
            self.close_block(1)
        self.open_block(f"int {name} = {base};", 1)
        vtype = VECTOR_TYPES[out_type]
        self.emit(f"*({vtype}*)(d{param.arg[0]} + {self.expr(index, 2)}) = make_{vtype}({', '.join(outs)});", 2)
        self.close_block(1)

    def vector_load(self, load, name, base, depth) -> str:
        """The 16-byte vector of load's 4 elements at loop variable `name` = base .. base + 3 (the caller checked
        the alignment: wide_ok, vector_loads); returns its name, whose .x .y .z .w are the lanes."""
        vtype = VECTOR_TYPES[self.ctype(load.dtype)]
        vec = f"w{self.counter}"
        self.counter += 1
        self.emit(f"{vtype} {vec};", depth)
        self.open_block(f"int {name} = {base};", depth)
        param, index, valid = load.src
        code = f"*(const {vtype}*)(d{param.arg[0]} + {self.expr(index, depth + 1)})"
        if valid.op is not Ops.CONST:
            zero = self.literal(0, load.dtype)
            code = f"({self.expr(valid, depth + 1)} ? {code} : make_{vtype}({', '.join([zero] * 4)}))"
        self.emit(f"{vec} = {code};", depth + 1)
        self.close_block(depth)
        return vec

    def body_warp(self, kernel):
        per_block = self.launch.threads // 32
        self.emit(f"int pg_gid = blockIdx.x * {per_block} + (threadIdx.x >> 5);", 1)
        self.emit("int pg_lane = threadIdx.x & 31;", 1)
        self.emit(f"if (pg_gid >= {kernel.out_size}) return;", 1)   # whole warps leave together
        self.decompose("pg_gid", self.dims(kernel.ranges), 1)
        self.group, self.store_guard = ("pg_lane", 32), "pg_lane == 0"
        self.store(kernel.store, 1)

    def body_block(self, kernel):
        for ctype, tag in SHARED_NAMES.items():
            self.emit(f"__shared__ {ctype} pg_red_{tag}[32];", 1)
        self.emit("int pg_gid = blockIdx.x;", 1)
        self.emit("int pg_lane = threadIdx.x;", 1)
        self.decompose("pg_gid", self.dims(kernel.ranges), 1)
        self.group, self.store_guard = ("pg_lane", self.launch.group), "pg_lane == 0"
        self.store(kernel.store, 1)

    def row_split(self, kernel):
        """(rows, tail) when the kernel's reductions depend on a leading part of its loops only (a softmax's max and
        sum, fused into the kernel that writes it): each row's group of threads computes them together, then
        writes the row's elements. None for any other kernel."""
        ranges = kernel.ranges
        deps = set().union(*(self.ranges_of[n] for n in kernel.store.toposort() if n.op is Ops.ACC))
        if not any(n.op is Ops.ACC for n in kernel.store.toposort()) or set(ranges) <= deps:
            return None
        cut = len([r for r in ranges if r in deps])
        if set(ranges[:cut]) != deps & set(ranges):
            return None   # not a leading part: left to the plain plans, which compute per element
        return ranges[:cut], ranges[cut:]

    def body_row_warp(self, kernel):
        per_block = self.launch.threads // 32
        rows, _ = self.rows
        self.emit(f"int pg_gid = blockIdx.x * {per_block} + (threadIdx.x >> 5);", 1)
        self.emit("int pg_lane = threadIdx.x & 31;", 1)
        self.emit(f"if (pg_gid >= {prod(r.arg[1] for r in rows)}) return;", 1)   # whole warps leave together
        self.row_body(kernel, 32)

    def body_row_block(self, kernel):
        for ctype, tag in SHARED_NAMES.items():
            self.emit(f"__shared__ {ctype} pg_red_{tag}[32];", 1)
        self.emit("int pg_gid = blockIdx.x;", 1)
        self.emit("int pg_lane = threadIdx.x;", 1)
        self.row_body(kernel, self.launch.group)

    def row_body(self, kernel, size):
        rows, tail = self.rows
        self.decompose("pg_gid", self.dims(rows), 1)
        self.kept, self.kept_at = {}, len(self.lines)   # the row's loaded values, declared here (see kept_load)
        self.outputs, self.group = frozenset(rows), ("pg_lane", size)
        for node in kernel.store.toposort():   # each reduction once, by the whole group; nested ones first
            if node.op is Ops.ACC and self.ranges_of[node] <= self.outputs:
                self.expr(node, 1)
        self.outputs, self.group = frozenset(kernel.ranges), None
        steps = prod(r.arg[1] for r in tail)
        param, index, value = kernel.store.src
        if self.keeps_row(steps, size):
            # the row's values first, then its stores: NVRTC does not reuse a load (the row in registers) past a store
            self.emit(f"{self.ctype(value.dtype)} pg_row[{steps // size}];", 1)
            passes = [lambda: f"pg_row[pg_c_j] = {self.expr(value, 2)};",
                      lambda: f"d{param.arg[0]}[{self.expr(index, 2)}] = pg_row[pg_c_j];"]
        else:
            passes = [None]
        for line in passes:
            self.open_stride("pg_c", "pg_lane", steps, size, 1)
            self.scopes.append({})
            self.decompose("pg_c", self.dims(tail), 2)
            if line is None:
                self.store(kernel.store, 2)
            else:
                self.row_pass = ("pg_c_j", steps // size, tail, False)   # the stores' pass reads only pg_row
                self.emit(line(), 2)
                self.row_pass = None
            self.scopes.pop()
            self.emit("}", 1)

    def keeps_row(self, steps, size) -> bool:
        return self.launch.kind in ("row_warp", "row_block") and steps % size == 0 and steps // size <= ROW_REGISTERS

    def expr(self, u, depth) -> str:
        if u.op is Ops.LOAD and self.row_pass is not None and self.lookup(u) is None:
            return self.kept_load(u, depth)
        return super().expr(u, depth)

    def kept_load(self, load, depth) -> str:
        """A load in a pass over a row kept in registers (see open_stride). The passes (a reduction's, the row's
        values') step through the row alike, thread `lane` at element lane + j * size in step j, each over loops of
        its own; a load that is the same in two passes once their loops are matched in order (a norm's input, read
        for the sum of squares and again for the output) is read in the first and kept in an array of registers,
        indexed by the step, for the next. NVRTC reuses such loads itself only sometimes: an RMSNorm whose second
        pass also reads the weight re-read all but one of its row's values from memory (47 loads for 32)."""
        step, count, walked, later = self.row_pass
        ranges = self.ranges_of[load]
        if not ranges & set(walked) or not ranges <= set(self.rows[0]) | set(walked):
            return super().expr(load, depth)   # the same for every step, or inside a loop of its own within one
        # the same element in step j of both passes: the loops' sizes agree in order (the last walks fastest)
        steps = {r: UOp(Ops.RANGE, r.dtype, (), (f"pg_step{i}", r.arg[1])) for i, r in enumerate(walked)}
        key = (tuple(r.arg[1] for r in walked), compiler.substitute(load, steps))
        kept = self.kept.get(key)
        if kept is not None:
            return self.temp(load, f"{kept}[{step}]", depth, "v")
        value = super().expr(load, depth)
        if not later:
            return value
        kept = self.kept[key] = f"pg_keep{len(self.kept)}"
        self.lines.insert(self.kept_at, f"  {self.ctype(load.dtype)} {kept}[{count}];")
        self.kept_at += 1
        self.emit(f"{kept}[{step}] = {value};", depth)
        return value

    def open_stride(self, var, lane, steps, size, depth):
        """Open `for (var = lane; var < steps; var += size)`. In a row kernel whose rows split evenly into at most
        ROW_REGISTERS steps a thread, the loop counts steps instead, from 0 to a constant: the compiler unrolls it,
        and as each pass over the row (max, sum, the written elements) then loads the same addresses, it keeps
        the row in registers and reads memory once (the causal softmax's backward rows read their two inputs
        once instead of three times); where NVRTC does not, kept_load does it."""
        if self.keeps_row(steps, size):
            self.emit("#pragma unroll", depth)
            self.emit(f"for (int {var}_j = 0; {var}_j < {steps // size}; {var}_j++) {{", depth)
            self.emit(f"int {var} = {lane} + {var}_j * {size};", depth + 1)
        else:
            self.emit(f"for (int {var} = {lane}; {var} < {steps}; {var} += {size}) {{", depth)

    def body_split(self, kernel):
        by, n_out = self.launch.group, kernel.out_size
        for ctype, tag in SHARED_NAMES.items():
            self.emit(f"__shared__ {ctype} pg_split_{tag}[{by}][32];", 1)
        self.emit("int pg_tx = threadIdx.x & 31;", 1)
        self.emit("int pg_ty = threadIdx.x >> 5;", 1)
        self.emit("int pg_gid = blockIdx.x * 32 + pg_tx;", 1)
        # every thread takes part in the block's barriers, so past-the-end lanes compute a copy of the last output
        self.emit(f"int pg_out = pg_gid < {n_out} ? pg_gid : {n_out - 1};", 1)
        self.decompose("pg_out", self.dims(kernel.ranges), 1)
        self.group, self.store_guard = ("pg_ty", by), f"pg_ty == 0 && pg_gid < {n_out}"
        self.store(kernel.store, 1)

    def open_block(self, first_line, depth):
        self.emit("{", depth)
        self.scopes.append({})
        if first_line:
            self.emit(first_line, depth + 1)

    def close_block(self, depth):
        self.scopes.pop()
        self.emit("}", depth)

    def store(self, store, depth):
        if self.store_guard is None:
            return super().store(store, depth)
        param, index, value = store.src
        v = self.expr(value, depth)
        self.emit(f"if ({self.store_guard}) d{param.arg[0]}[{self.expr(index, depth)}] = {v};", depth)

    # -- reductions
    def available(self):
        return self.outputs | frozenset(self.loop_stack)

    def hoist(self, body, depth):
        """Emit, before a reduction's loop, the loads and inner reductions of its body that do not move with it."""
        avail = self.available()
        for node in body.toposort():
            if node.op in (Ops.LOAD, Ops.ACC) and self.lookup(node) is None and self.ranges_of[node] <= avail:
                self.expr(node, depth)

    def accumulate(self, u, depth):
        self.hoist(u.src[0], depth)
        if self.group is not None and self.reduce_depth == 0:
            return self.accumulate_group(u, depth)
        reduce_op, ranges = u.arg
        acc = f"acc{self.counter}"
        self.counter += 1
        self.emit(f"{self.ctype(u.dtype)} {acc} = {self.acc_init(reduce_op, u.dtype)};", depth)
        self.reduce_depth += 1
        for r in ranges:
            self.open_loop(r, depth)
            self.loop_stack.append(r)
            depth += 1
        value = self.expr(u.src[0], depth)
        self.emit(f"{acc} = {self.acc_update(reduce_op, acc, value, u.dtype)};", depth)
        for _ in ranges:
            depth -= 1
            self.loop_stack.pop()
            self.close_loop(depth)
        self.reduce_depth -= 1
        self.scopes[-1][u] = acc
        return acc

    def accumulate_group(self, u, depth):
        """The group's threads stride over the reduction (its contiguous range fastest), then combine: butterfly
        shuffles inside each warp, shared memory across warps. Every thread of the group ends with the result."""
        reduce_op, ranges = u.arg
        lane, size = self.group
        kind = self.launch.kind
        ctype = self.ctype(u.dtype)
        order = list(ranges)
        fast = self.contiguous_range(u) if kind != "split" else None
        if fast is not None:
            order.remove(fast)
            order.append(fast)
        n = self.counter
        self.counter += 1
        acc, rr = f"acc{n}", f"rr{n}"
        self.emit(f"{ctype} {acc} = {self.acc_init(reduce_op, u.dtype)};", depth)
        # rows (a softmax, a norm) keep scalar loads: with vectors they measured 3-4% slower on an H200 (softmax
        # 0.83 against 0.87 of copy bandwidth, one run of each on one machine, about twice its noise); not understood
        moving = self.vector_loads(u, fast) if fast is not None and kind in ("warp", "block") else None
        steps = _acc_size(u) // (4 if moving else 1)
        if moving:   # several 16-byte loads in flight per thread: decode's matrix-vector products gained 3%
            self.emit("#pragma unroll 4", depth)
        self.open_stride(rr, lane, steps, size, depth)
        self.scopes.append({})
        self.reduce_depth += 1
        self.loop_stack.extend(ranges)
        if moving:
            self.accumulate_vectors(u, acc, rr, order, moving, depth + 1)
        else:
            self.decompose(rr, self.dims(order), depth + 1)
            if self.keeps_row(steps, size):
                self.row_pass = (f"{rr}_j", steps // size, order, True)
            value = self.expr(u.src[0], depth + 1)
            self.row_pass = None
            self.emit(f"{acc} = {self.acc_update(reduce_op, acc, value, u.dtype)};", depth + 1)
        del self.loop_stack[-len(ranges):]
        self.reduce_depth -= 1
        self.scopes.pop()
        self.emit("}", depth)
        other = f"o{n}"
        combine = self.acc_update(reduce_op, acc, other, u.dtype)
        tag = SHARED_NAMES[ctype]
        if kind == "split":
            self.emit(f"pg_split_{tag}[pg_ty][pg_tx] = {acc};", depth)
            self.combine_shared(acc, other, combine, ctype, lambda w: f"pg_split_{tag}[{w}][pg_tx]", size, depth)
        else:
            if ctype == "unsigned char":
                shuffle = f"(unsigned char)__shfl_xor_sync(0xffffffffu, (int){acc}, pg_off)"
            else:
                shuffle = f"__shfl_xor_sync(0xffffffffu, {acc}, pg_off)"
            self.emit("for (int pg_off = 16; pg_off > 0; pg_off >>= 1) {", depth)
            self.emit(f"{ctype} {other} = {shuffle};", depth + 1)
            self.emit(f"{acc} = {combine};", depth + 1)
            self.emit("}", depth)
            if kind in ("block", "row_block"):
                self.emit(f"if ((threadIdx.x & 31) == 0) pg_red_{tag}[threadIdx.x >> 5] = {acc};", depth)
                self.combine_shared(acc, other, combine, ctype, lambda w: f"pg_red_{tag}[{w}]", size // 32, depth)
        self.scopes[-1][u] = acc
        return acc

    def vector_loads(self, u, fast):
        """The loads of u's body that walk its contiguous range `fast`, when each thread can take 4 consecutive steps
        of it with one 16-byte load per such load: fast has a multiple of 4 steps and every moving load is 16-byte
        aligned along it with a validity that does not change along it (as wide_ok asks of an elementwise kernel),
        and no reduction inside moves with it. None otherwise (one step per thread, scalar loads)."""
        if fast.arg[1] % 4:
            return None
        moving = []
        for node in u.src[0].toposort():
            if fast not in self.ranges_of.get(node, ()) or self.lookup(node) is not None:
                continue
            if node.op is Ops.ACC:
                return None
            if node.op is Ops.LOAD:
                if (self.ctype(node.dtype) not in VECTOR_TYPES or fast in self.ranges_of[node.src[2]] or
                        not self.aligned_walk(node.src[1], fast)):
                    return None
                moving.append(node)
        return moving or None

    def accumulate_vectors(self, u, acc, quad, order, moving, depth):
        """One loop step of a group reduction over 4 consecutive steps of its contiguous range: the moving loads as
        16-byte vectors, then the body once per lane, each lane's loads read from its vector component."""
        reduce_op = u.arg[0]
        fast = order[-1]
        name, size = fast.arg
        self.decompose(quad, self.dims(order[:-1]) + [(name + "_q", size // 4)], depth)
        self.emit(f"int {name}_4 = {name}_q * 4;", depth)
        for node in u.src[0].toposort():   # loads that stay put along the range: read once for the 4 lanes
            if node.op is Ops.LOAD and fast not in self.ranges_of[node] and self.ranges_of[node] <= self.available():
                self.expr(node, depth)
        lanes = {load: self.vector_load(load, name, f"{name}_4", depth) for load in moving}
        for j, component in enumerate("xyzw"):
            self.open_block(f"int {name} = {name}_4 + {j};", depth)
            self.scopes[-1].update({load: f"{vec}.{component}" for load, vec in lanes.items()})
            value = self.expr(u.src[0], depth + 1)
            self.emit(f"{acc} = {self.acc_update(reduce_op, acc, value, u.dtype)};", depth + 1)
            self.close_block(depth)

    def combine_shared(self, acc, other, combine, ctype, slot, count, depth):
        """After each part's result is stored in shared memory: every thread combines slot(0) .. slot(count - 1)."""
        self.emit("__syncthreads();", depth)
        self.emit(f"{acc} = {slot(0)};", depth)
        self.emit(f"for (int pg_w = 1; pg_w < {count}; pg_w++) {{", depth)
        self.emit(f"{ctype} {other} = {slot('pg_w')};", depth + 1)
        self.emit(f"{acc} = {combine};", depth + 1)
        self.emit("}", depth)
        self.emit("__syncthreads();", depth)   # all read before the buffer is reused

    # -- matmul
    def body_sgemm(self, kernel):
        self.matmul_frame(kernel, tensor_cores=False)

    def body_mma(self, kernel):
        self.matmul_frame(kernel, tensor_cores=True)

    def body_wgmma(self, kernel):
        """The Hopper tf32 template: C = epilogue(A B) over BM x BN block tiles, each of BM / 64 warpgroups owning 64
        rows x BN and multiplying with wgmma straight from shared memory, S slices deep. Both operands are read from
        the copies the kernel's prologue function has just written (k-major, rounded to tf32, in panels laid out as
        shared memory holds them: render_tf32_copies), so a slice arrives by bulk copies, whole panels at a time,
        without registers or a pass that rounds or swizzles it there.

        The block's last warp fetches, the warpgroups multiply. Each buffer has two barriers: `full` completes when
        its slice's bytes have landed, `empty` when every warpgroup that reads it (of every block of the cluster)
        is done with it. The fetching thread starts slice s's copies as soon as its buffer is empty, so up to S
        slices are on their way ahead of the multiplies. A warpgroup, at slice s: waits until it is full, starts
        its multiply, waits for that of slice s - 1 (overlap 1) or s (overlap 0), and marks that slice's buffer
        empty. In a cluster of two, the blocks take adjacent rows of tiles over the same columns: each fetches its
        own A and one half of the B slice they share, into the same place in both blocks' shared memory (a
        multicast bulk copy), so B crosses from L2 once for the pair. A block's `empty` barriers therefore count
        both blocks' warpgroups, and a block waits for its partner before it exits (nothing may arrive in the
        shared memory of a block that has gone)."""
        c, t = self.launch.contraction, self.launch.tile
        emit = self.emit
        BM, BN, S, CL = t.BM, t.BN, t.buffers, t.cluster
        copies = self.launch.copies
        self.render_tf32_copies(kernel, c, copies)
        panel = COPY_ROWS * COPY_K
        slices, (panels_a, panels_b) = copies.slices, copies.panels
        emit(f"PG_DYNAMIC_SHARED(pg_smem, {t.shared_bytes() // 4});", 1)
        # the swizzle's atoms start on 1024 bytes (the XOR takes address bits 7-9): the buffers start at the first
        # such address of the allocation, which has a kilobyte to spare (MatmulTile.shared_bytes)
        emit("unsigned* pg_As = (unsigned*)(((unsigned long long)pg_smem + 1023) & ~1023ull);", 1)
        emit(f"unsigned* pg_Bs = pg_As + {S * BM * COPY_K};", 1)
        emit(f"unsigned long long* pg_full = (unsigned long long*)(pg_Bs + {S * BN * COPY_K});", 1)
        emit(f"unsigned long long* pg_empty = pg_full + {S};", 1)
        self.tile_origin(c, t, ())
        # this block's panels of slice 0; slice s is s * (the operand's panels) further
        emit(f"const float* pg_Ag = pg_scratch + ((long long)pg_z * {slices * panels_a * panel} + "
             f"(long long)pg_m0 * {COPY_K});", 1)
        emit(f"const float* pg_Bg = pg_scratch + ({copies.b_offset} + (long long)pg_z * {slices * panels_b * panel} + "
             f"(long long)pg_n0 * {COPY_K});", 1)
        emit("if (pg_tid == 0) {", 1)
        emit(f"for (int pg_b = 0; pg_b < {S}; pg_b++) {{", 2)
        emit("pg_barrier_init(&pg_full[pg_b], 1);", 3)   # the expecting thread's arrival, then the bytes
        emit(f"pg_barrier_init(&pg_empty[pg_b], {CL * t.warpgroups});", 3)
        emit("}", 2)
        emit("pg_barriers_visible();", 2)
        emit("}", 1)
        emit("pg_cluster_sync();" if CL > 1 else "__syncthreads();", 1)
        emit("int pg_g = (pg_tid & 31) >> 2;", 1)
        emit("int pg_t = pg_tid & 3;", 1)
        emit("int pg_wm = (pg_tid >> 7) * 64 + ((pg_tid >> 5) & 3) * 16;", 1)   # warpgroup's rows, then the warp's
        emit("int pg_wn = 0;", 1)
        emit(f"float pg_acc[1][{BN // 8}][4];", 1)
        loops = [("pg_i", 1), ("pg_j", BN // 8), ("pg_q", 4)]
        target = "pg_acc[pg_i][pg_j][pg_q]"
        depth = self.open_unrolled(loops, 1)
        emit(f"{target} = 0.0f;", depth)
        self.close_unrolled(loops, depth)
        consumers = 128 * t.warpgroups
        emit(f"if (pg_tid == {consumers}) {{", 1)   # the fetching thread
        emit(f"for (int pg_s = 0; pg_s < {slices}; pg_s++) {{", 2)
        emit(f"int pg_b = pg_s % {S};", 3)
        emit(f"if (pg_s >= {S}) pg_barrier_wait_cluster(&pg_empty[pg_b], (pg_s / {S} + 1) & 1);", 3)
        emit(f"pg_barrier_expect(&pg_full[pg_b], {4 * (BM + BN) * COPY_K});", 3)
        emit(f"pg_bulk_copy(pg_As + pg_b * {BM * COPY_K}, pg_Ag + (long long)pg_s * {panels_a * panel}, "
             f"{4 * BM * COPY_K}, &pg_full[pg_b]);", 3)
        half = BN // CL * COPY_K   # the words of B this block fetches
        if CL == 1:
            emit(f"pg_bulk_copy(pg_Bs + pg_b * {BN * COPY_K}, pg_Bg + (long long)pg_s * {panels_b * panel}, "
                 f"{4 * half}, &pg_full[pg_b]);", 3)
        else:
            emit(f"pg_bulk_copy_to_cluster(pg_Bs + pg_b * {BN * COPY_K} + pg_rank * {half}, pg_Bg + "
                 f"(long long)pg_s * {panels_b * panel} + pg_rank * {half}, {4 * half}, &pg_full[pg_b], "
                 f"{(1 << CL) - 1});", 3)
        emit("}", 2)
        emit(f"}} else if (pg_tid < {consumers}) {{", 1)   # the warpgroups
        emit(f"for (int pg_s = 0; pg_s < {slices}; pg_s++) {{", 2)
        emit(f"int pg_buf = pg_s % {S};", 3)
        emit(f"pg_barrier_wait(&pg_full[pg_buf], (pg_s / {S}) & 1);", 3)
        emit("pg_wgmma_fence();", 3)
        for step in range(COPY_K // 8):   # k-steps of 8 start 32 bytes further into the rows
            a = f"pg_As + pg_buf * {BM * COPY_K} + (pg_tid >> 7) * {64 * COPY_K} + {8 * step}"
            b = f"pg_Bs + pg_buf * {BN * COPY_K} + {8 * step}"
            emit(f"pg_wgmma_tf32(&pg_acc[0][0][0], pg_wgmma_desc({a}), pg_wgmma_desc({b}));", 3)
        emit("pg_wgmma_commit();", 3)
        emit(f"pg_wgmma_wait_{t.overlap}();", 3)
        # a thread of each warpgroup tells each block of the cluster that the warpgroup is done with the buffer
        done = f"pg_s - {t.overlap}" if t.overlap else "pg_s"
        emit(f"if ({done} >= 0 && (pg_tid & 127) < {CL}) pg_barrier_arrive_at(&pg_empty[({done}) % {S}], "
             f"pg_tid & 127);", 3)
        emit("}", 2)
        emit("pg_wgmma_wait_0();", 2)
        emit("}", 1)
        if CL > 1:
            emit("pg_cluster_sync();", 1)
        emit(f"if (pg_tid >= {consumers}) return;", 1)
        self.matmul_epilogue(kernel, c, loops, target, True)

    def render_tf32_copies(self, kernel, c, copies):
        """The wgmma kernel's prologue, a function of its own (`<name>_tf32`, same parameters) that the program
        launches just before it: each block writes one panel of A's or B's copy (A's first), rounded to tf32, into
        pg_scratch (see _TF32Copies for the layout). Rounding there costs a pass over the operands in memory, a few
        percent of a big product; rounding inside the product, where the multiplies wait for it, made x @ W.T 0.44
        of cuBLAS against 0.69 for the same kernel reading rounded copies (PERF.md). An operand whose k is not
        contiguous (B of x @ W) is transposed on the way, through shared memory (see _Operand.emit_tf32_copy)."""
        main_lines, self.lines = self.lines, [self.signature(kernel, prologue=True) + " {"]
        emit = self.emit
        self.emit_prelude(kernel)
        a = _Operand(self, "A", c, c.a, c.m_ranges, 0, 4, c.M)
        b = _Operand(self, "B", c, c.b, c.n_ranges, 0, 4, c.N)
        if not (a.k_fast and b.k_fast):   # +1: a column of the tile, read down its k, touches every bank once
            emit(f"__shared__ float pg_tile[{COPY_K}][{COPY_ROWS + 1}];", 1)
        emit("int pg_t = blockIdx.x;", 1)
        emit(f"if (pg_t < {copies.blocks[0]}) {{", 1)
        self.scopes.append({})
        a.emit_tf32_copy(emit, 2, c.batch, 0, copies, 0)
        self.scopes.pop()
        emit("} else {", 1)
        emit(f"pg_t -= {copies.blocks[0]};", 2)
        self.scopes.append({})
        b.emit_tf32_copy(emit, 2, c.batch, copies.b_offset, copies, 1)
        self.scopes.pop()
        emit("}", 1)
        self.lines.append("}")
        self.functions.append("\n".join(self.lines) + "\n")
        self.lines = main_lines

    def matmul_frame(self, kernel, tensor_cores):
        """C[batch, m, n] = epilogue(sum_k A[batch, m, k] * B[batch, k, n]) over BM x BN block tiles: the block stages
        BK-deep slices of A and B in shared memory, two buffers deep (the next slice is fetched into registers
        while this one is multiplied, then stored into the other buffer: one barrier per slice), every thread
        accumulates its part of the tile in registers, and each finished sum goes through the kernel's own
        epilogue and store. Edges are predicated, so any M, N, K works."""
        c, t = self.launch.contraction, self.launch.tile
        emit = self.emit
        M, N, K = c.M, c.N, c.K
        BM, BN, BK, T = t.BM, t.BN, t.BK, t.threads
        tiles_m, tiles_n = _cdiv(M, BM), _cdiv(N, BN)
        kind = _FragmentOperand if tensor_cores else _PanelOperand
        a_op = kind(self, "A", c, c.a, c.m_ranges, BM, BK, M)
        b_op = kind(self, "B", c, c.b, c.n_ranges, BN, BK, N)
        stype = "unsigned" if tensor_cores else "float"
        for op in (a_op, b_op):
            emit(f"__shared__ __align__(16) {stype} pg_{op.name}s[{t.buffers}][{op.smem_size}];", 1)
        self.tile_origin(c, t, (a_op, b_op))
        for op in (a_op, b_op):
            emit(f"float {op.staging}[{op.registers(T)}];", 1)
        if tensor_cores:
            wm_tile, wn_tile = BM // t.warps_m, BN // t.warps_n
            mi_n, ni_n = wm_tile // 16, wn_tile // 8
            emit("int pg_warp = pg_tid >> 5;", 1)
            emit("int pg_g = (pg_tid & 31) >> 2;", 1)
            emit("int pg_t = pg_tid & 3;", 1)
            emit("int pg_swz = 4 * (pg_t ^ ((pg_g >> 1) & 3));", 1)   # this lane's 16-byte group in every row it reads
            emit(f"int pg_wm = (pg_warp / {t.warps_n}) * {wm_tile};", 1)
            emit(f"int pg_wn = (pg_warp % {t.warps_n}) * {wn_tile};", 1)
            emit(f"float pg_acc[{mi_n}][{ni_n}][4];", 1)
            loops = [("pg_i", mi_n), ("pg_j", ni_n), ("pg_q", 4)]
            target = "pg_acc[pg_i][pg_j][pg_q]"
        else:
            lanes_n, warps_n = self.fp32_layout(t)
            emit("int pg_warp = pg_tid >> 5;", 1)
            emit(f"int pg_ty = (pg_tid & 31) / {lanes_n};", 1)
            emit(f"int pg_tx = (pg_tid & 31) % {lanes_n};", 1)
            emit(f"int pg_wm = (pg_warp / {warps_n}) * {32 // lanes_n * t.TM};", 1)
            emit(f"int pg_wn = (pg_warp % {warps_n}) * {lanes_n * t.TN};", 1)
            emit(f"float pg_acc[{t.TM}][{t.TN}];", 1)
            loops = [("pg_i", t.TM), ("pg_j", t.TN)]
            target = "pg_acc[pg_i][pg_j]"
        depth = self.open_unrolled(loops, 1)
        emit(f"{target} = 0.0f;", depth)
        self.close_unrolled(loops, depth)
        for op, x0 in ((a_op, "pg_m0"), (b_op, "pg_n0")):
            op.emit_fetch(emit, 1, T, x0, "0")
        if t.buffers == 2:
            for op in (a_op, b_op):
                op.emit_stage(emit, 1, T, "0")
            emit("__syncthreads();", 1)
        emit(f"for (int pg_k0 = 0, pg_buf = 0; pg_k0 < {K}; pg_k0 += {BK}, pg_buf ^= {t.buffers - 1}) {{", 1)
        emit(f"bool pg_more = pg_k0 + {BK} < {K};", 2)
        if t.buffers == 1:   # one buffer: wait until everyone is done reading it, refill, wait again
            emit("__syncthreads();", 2)
            for op in (a_op, b_op):
                op.emit_stage(emit, 2, T, "0")
            emit("__syncthreads();", 2)
        emit("if (pg_more) {", 2)
        for op, x0 in ((a_op, "pg_m0"), (b_op, "pg_n0")):
            op.emit_fetch(emit, 3, T, x0, f"pg_k0 + {BK}")
        emit("}", 2)
        if tensor_cores:
            self.mma_steps(mi_n, ni_n)
        else:
            self.fma_steps(t, a_op, b_op)
        if t.buffers == 2:
            emit("if (pg_more) {", 2)   # the other buffer was last read before the previous barrier: free to fill
            for op in (a_op, b_op):
                op.emit_stage(emit, 3, T, "pg_buf ^ 1")
            emit("}", 2)
            emit("__syncthreads();", 2)
        emit("}", 1)
        self.matmul_epilogue(kernel, c, loops, target, tensor_cores)

    def tile_origin(self, c, t, operands):
        """This block's tile: its batch coordinates, the operands' bases, (pg_m0, pg_n0) and the thread's id.
        Blocks take tiles along n first; in clusters (wgmma), a cluster's blocks (pg_rank, consecutive in x) take
        adjacent rows of tiles over the same columns, and the last cluster may have a tile past M."""
        emit, CL = self.emit, t.cluster
        clusters_m, tiles_n = _cdiv(_cdiv(c.M, t.BM), CL), _cdiv(c.N, t.BN)
        emit("int pg_bid = blockIdx.x;", 1)
        if CL > 1:
            emit(f"int pg_rank = pg_bid % {CL};", 1)
            emit(f"pg_bid /= {CL};", 1)
        emit(f"int pg_tn = pg_bid % {tiles_n};", 1)
        emit(f"pg_bid /= {tiles_n};", 1)
        emit(f"int pg_tm = pg_bid % {clusters_m}{f' * {CL} + pg_rank' if CL > 1 else ''};", 1)
        emit(f"int pg_z = pg_bid / {clusters_m};", 1)
        self.decompose("pg_z", self.dims(c.batch), 1)
        for op in operands:
            op.emit_base(emit, 1)
        emit(f"int pg_m0 = pg_tm * {t.BM};", 1)
        emit(f"int pg_n0 = pg_tn * {t.BN};", 1)
        emit("int pg_tid = threadIdx.x;", 1)

    def matmul_epilogue(self, kernel, c, loops, target, fragments):
        """Each finished sum, at its own (m, n), through the kernel's elementwise tail and store. `fragments`: the
        sums are laid out as mma's C fragments of this warp's tile at (pg_wm, pg_wn), each thread holding pairs of
        adjacent columns (pg_q and pg_q + 1, pg_q even), which are stored together as 8 bytes where the output
        allows (see paired_columns); else the fma template's layout."""
        emit, t = self.emit, self.launch.tile
        paired = fragments and self.paired_columns(kernel, c)
        if paired:
            loops = loops[:-1] + [("pg_h", 2)]   # pg_q = 2 pg_h and 2 pg_h + 1
        depth = self.open_unrolled(loops, 1)
        if paired:
            emit("int pg_row = pg_m0 + pg_wm + pg_i * 16 + pg_g + (pg_h << 3);", depth)
            emit("int pg_col = pg_n0 + pg_wn + pg_j * 8 + pg_t * 2;", depth)
        elif fragments:
            emit("int pg_row = pg_m0 + pg_wm + pg_i * 16 + pg_g + ((pg_q >> 1) << 3);", depth)
            emit("int pg_col = pg_n0 + pg_wn + pg_j * 8 + pg_t * 2 + (pg_q & 1);", depth)
        else:
            lanes_n, _ = self.fp32_layout(t)
            emit(f"int pg_row = pg_m0 + pg_wm + pg_ty * {t.TM} + pg_i;", depth)
            emit(f"int pg_col = pg_n0 + pg_wn + (pg_j >> 2) * {4 * lanes_n} + pg_tx * 4 + (pg_j & 3);", depth)
        emit(f"if (pg_row < {c.M} && pg_col < {c.N}) {{", depth)
        if not paired:
            self.open_block("", depth + 1)
            self.decompose("pg_row", self.dims(c.m_ranges), depth + 2)
            self.decompose("pg_col", self.dims(c.n_ranges), depth + 2)
            self.bind_sum(c, target, depth + 2)
            self.store(kernel.store, depth + 2)
            self.close_block(depth + 1)
        else:
            param, index, value = kernel.store.src
            emit("float pg_pair[2];", depth + 1)
            for column in range(2):
                self.open_block(f"int pg_q = 2 * pg_h + {column};", depth + 1)
                self.decompose("pg_row", self.dims(c.m_ranges), depth + 2)
                self.decompose(f"(pg_col + {column})", self.dims(c.n_ranges), depth + 2)
                self.bind_sum(c, target, depth + 2)
                emit(f"pg_pair[{column}] = {self.expr(value, depth + 2)};", depth + 2)
                self.close_block(depth + 1)
            self.open_block("", depth + 1)   # the pair's address: the first column's
            self.decompose("pg_row", self.dims(c.m_ranges), depth + 2)
            self.decompose("pg_col", self.dims(c.n_ranges), depth + 2)
            emit(f"*(float2*)(d{param.arg[0]} + {self.expr(index, depth + 2)}) = make_float2(pg_pair[0], "
                 f"pg_pair[1]);", depth + 2)
            self.close_block(depth + 1)
        emit("}", depth)
        self.close_unrolled(loops, depth)

    def bind_sum(self, c, target, depth):
        """The finished sum (target) stands for the contraction in the epilogue's expressions."""
        self.emit(f"float pg_sum = {target};", depth)
        self.scopes[-1][c.acc] = "pg_sum"

    def paired_columns(self, kernel, c) -> bool:
        """A fragment's two adjacent columns are stored with one 8-byte store: the output is float and walks the
        innermost n range (of even size) contiguously from an even element."""
        last = c.n_ranges[-1] if c.n_ranges else None
        return (last is not None and last.arg[1] % 2 == 0 and kernel.store.src[2].dtype == pg.float32 and
                self.aligned_walk(kernel.store.src[1], last, 2))

    def open_unrolled(self, loops, depth):
        for var, n in loops:
            self.emit("#pragma unroll", depth)
            self.emit(f"for (int {var} = 0; {var} < {n}; {var}++) {{", depth)
            depth += 1
        return depth

    def close_unrolled(self, loops, depth):
        for _ in loops:
            depth -= 1
            self.emit("}", depth)

    def mma_steps(self, mi_n, ni_n):
        """One 16-deep slice as two m16n8k8 steps: each lane loads 16 bytes per fragment row (rows g and g + 8 of A's
        16-row pieces, column g of B's 8-column pieces), which hold its values for both steps (_FragmentOperand)."""
        emit = self.emit
        emit(f"uint4 pg_fa[{mi_n}][2];", 2)
        emit(f"uint4 pg_fb[{ni_n}];", 2)
        emit("#pragma unroll", 2)
        emit(f"for (int pg_i = 0; pg_i < {mi_n}; pg_i++) {{", 2)
        emit("int pg_r = pg_wm + pg_i * 16 + pg_g;", 3)
        emit("pg_fa[pg_i][0] = *(const uint4*)&pg_As[pg_buf][pg_r * 16 + pg_swz];", 3)
        emit("pg_fa[pg_i][1] = *(const uint4*)&pg_As[pg_buf][(pg_r + 8) * 16 + pg_swz];", 3)
        emit("}", 2)
        emit("#pragma unroll", 2)
        emit(f"for (int pg_j = 0; pg_j < {ni_n}; pg_j++) "
             "pg_fb[pg_j] = *(const uint4*)&pg_Bs[pg_buf][(pg_wn + pg_j * 8 + pg_g) * 16 + pg_swz];", 2)
        for lo, hi in (("x", "y"), ("z", "w")):   # step 0 reads k 4t and 4t + 1 of each row, step 1 4t + 2 and 4t + 3
            emit("#pragma unroll", 2)
            emit(f"for (int pg_i = 0; pg_i < {mi_n}; pg_i++) {{", 2)
            emit(f"unsigned pg_a[4] = {{pg_fa[pg_i][0].{lo}, pg_fa[pg_i][1].{lo}, pg_fa[pg_i][0].{hi}, "
                 f"pg_fa[pg_i][1].{hi}}};", 3)
            emit("#pragma unroll", 3)
            emit(f"for (int pg_j = 0; pg_j < {ni_n}; pg_j++) {{", 3)
            emit(f"unsigned pg_b[2] = {{pg_fb[pg_j].{lo}, pg_fb[pg_j].{hi}}};", 4)
            emit("pg_mma_tf32(pg_acc[pg_i][pg_j], pg_a, pg_b);", 4)
            emit("}", 3)
            emit("}", 2)

    @staticmethod
    def fp32_layout(t):
        """The fp32 template's threads: each warp owns a (32 / lanes_n * TM) x (lanes_n * TN) piece of the block tile,
        its lanes a grid of (32 / lanes_n) x lanes_n threads. A thread owns TM adjacent rows and TN columns in groups
        of 4, the groups 4 * lanes_n apart: its values of one k are TM / 4 + TN / 4 16-byte loads from the panels
        (_PanelOperand), and a warp's loads of B cover 8 distinct groups, 128 bytes. Returns (lanes_n, warps_n)."""
        assert t.TM % 4 == 0 and t.TN % 4 == 0, (t.TM, t.TN)
        lanes_n = min(8, t.BN // t.TN)
        assert t.BN % (lanes_n * t.TN) == 0 and t.BM % (32 // lanes_n * t.TM) == 0, (t.BM, t.BN, t.TM, t.TN)
        return lanes_n, t.BN // (lanes_n * t.TN)

    def fma_steps(self, t, a_op, b_op):
        """One BK-deep slice: at each k a thread loads its TM values of A and TN of B (16 bytes at a time) and
        makes TM x TN fmas."""
        emit = self.emit
        lanes_n, _ = self.fp32_layout(t)
        emit("#pragma unroll", 2)
        emit(f"for (int pg_kk = 0; pg_kk < {t.BK}; pg_kk++) {{", 2)
        for name, op, count, origin, step in (("a", a_op, t.TM, "pg_wm + pg_ty * {n}", 4),
                                               ("b", b_op, t.TN, "pg_wn + pg_tx * 4", 4 * lanes_n)):
            groups = [op.panel("pg_kk", f"{origin.format(n=t.TM)} + {g * step}") for g in range(count // 4)]
            emit(f"float4 pg_{name}4[{count // 4}] = {{{', '.join(groups)}}};", 3)
            values = ", ".join(f"pg_{name}4[{i // 4}].{'xyzw'[i % 4]}" for i in range(count))
            emit(f"float pg_{name}[{count}] = {{{values}}};", 3)
        emit("#pragma unroll", 3)
        emit(f"for (int pg_i = 0; pg_i < {t.TM}; pg_i++) {{", 3)
        emit("#pragma unroll", 4)
        emit(f"for (int pg_j = 0; pg_j < {t.TN}; pg_j++) "
             "pg_acc[pg_i][pg_j] = fmaf(pg_a[pg_i], pg_b[pg_j], pg_acc[pg_i][pg_j]);", 4)
        emit("}", 3)
        emit("}", 2)


class _Operand:
    """One matmul input as the templates see it, element (x, k) of the current tile (x being m for A and n for B),
    fetched as groups of 4 consecutive k (group q of row x: k 4q .. 4q + 3 of the slice). A linear operand lives at
    x * sx + k * sk past the batch's base and is fetched by address: a 16-byte load per group when k is contiguous
    and aligned (`vector`), else four loads, coalesced along x when x is the contiguous axis. Any other operand (a
    view that spans several loops, a flip, an elementwise prologue) is evaluated element by element with its loops
    bound from (x, k). Subclasses say where a group lives in shared memory (`emit_stage`); the wgmma template reads
    none directly: its prologue writes the operand's tf32 copy (`emit_tf32_copy`)."""

    def __init__(self, renderer, name, c, value, side, bx, bk, extent):
        self.renderer, self.name, self.value, self.side, self.k_ranges = renderer, name, value, side, c.k_ranges
        self.staging = f"pg_r{name}"   # the registers a slice passes through on its way to shared memory
        self.bx, self.bk, self.extent, self.k_size = bx, bk, extent, c.K
        self.linear = c.linear
        if self.linear:
            strides = c.a_strides if name == "A" else c.b_strides
            self.param = value.src[0].arg[0]
            self.sx, self.sk = strides.get(side[0], 0) if side else 0, strides[c.k_ranges[0]]
            self.offset, self.strides, self.batch = (c.a_offset if name == "A" else c.b_offset), strides, c.batch
            self.k_fast = self.sk == 1 and self.sx != 1
        else:
            loads = [n.src[1] for n in value.toposort() if n.op is Ops.LOAD]
            self.k_fast = any(compiler._coeff(index, c.k_ranges[-1]) == 1 for index in loads)
        self.smem_size = bx * bk
        self.vector = self.linear and self.k_fast and self.k_size % 4 == 0 and self.offset % 4 == 0 and \
            self.sx % 4 == 0 and all(self.strides.get(r, 0) % 4 == 0 for r in self.batch)

    def emit_base(self, emit, depth):
        if self.linear:
            parts = [f"(long long){self.offset}"] + [f"(long long){r.arg[0]} * {self.strides[r]}"
                                                     for r in self.batch if self.strides.get(r, 0)]
            emit(f"const float* __restrict__ pg_{self.name}g = d{self.param} + ({' + '.join(parts)});", depth)

    def registers(self, threads) -> int:
        return 4 * self.groups_per_thread(threads)

    def groups_per_thread(self, threads) -> int:
        assert self.bx * self.bk // 4 % threads == 0, (self.bx, self.bk, threads)
        return self.bx * self.bk // 4 // threads

    def coords(self, emit, depth, threads):
        """(pg_x, pg_q) of this thread's group pg_l: where k is contiguous, consecutive threads take a row's groups,
        then the next row's; else consecutive threads take consecutive rows of one group (coalesced along x)."""
        emit(f"int pg_e = pg_tid + pg_l * {threads};", depth)
        groups = self.bk // 4
        x, q = (f"pg_e / {groups}", f"pg_e % {groups}") if self.k_fast else (f"pg_e % {self.bx}", f"pg_e / {self.bx}")
        emit(f"int pg_x = {x};", depth)
        emit(f"int pg_q = {q};", depth)

    def emit_fetch(self, emit, depth, threads, x0, k0):
        """Global -> registers: this thread's groups of the BX x BK slice starting at (x0, k0), zero past the edges."""
        name = self.name
        emit("#pragma unroll", depth)
        emit(f"for (int pg_l = 0; pg_l < {self.groups_per_thread(threads)}; pg_l++) {{", depth)
        self.coords(emit, depth + 1, threads)
        emit(f"int pg_gx = {x0} + pg_x;", depth + 1)
        emit(f"int pg_gk = {k0} + 4 * pg_q;", depth + 1)
        self.emit_group(emit, [f"{self.staging}[4 * pg_l + {j}]" for j in range(4)], depth + 1)
        emit("}", depth)

    def emit_group(self, emit, targets, depth):
        """targets[j] = element (pg_gx, pg_gk + j) for j < 4, zero past the edges."""
        if self.vector:
            emit(f"float4 pg_v = pg_gx < {self.extent} && pg_gk < {self.k_size} ? *(const float4*)(pg_{self.name}g "
                 f"+ (long long)pg_gx * {self.sx} + pg_gk) : make_float4(0, 0, 0, 0);", depth)
            for target, lane in zip(targets, "xyzw"):
                emit(f"{target} = pg_v.{lane};", depth)
            return
        for j, target in enumerate(targets):
            self.emit_element(emit, target, f"(pg_gk + {j})", depth)

    def emit_tf32_copy(self, emit, depth, batch, offset, copies, which):
        """Panel pg_t of the operand's tf32 copy (CUDARenderer.render_tf32_copies, _TF32Copies): rows x0 .. x0 +
        COPY_ROWS - 1 by groups of 4 k from q0, of batch element pg_z, each thread fetching, rounding and storing
        whole 16-byte groups (8 consecutive threads write one row's 128 bytes, its groups in swizzled order), zeros
        past the operand's edges. Where k is not contiguous the block first reads the tile into shared memory along
        the operand's contiguous axis (consecutive threads, consecutive x), then writes it out by rows: the reads
        and the writes are both whole lines."""
        threads, groups, rows = COPY_THREADS, copies.k4 // 4, self.extent
        panels, row_groups = copies.panels[which], COPY_K // 4
        emit(f"int pg_z = pg_t / {panels * copies.slices};", depth)
        emit(f"int pg_x0 = pg_t % {panels} * {COPY_ROWS};", depth)
        emit(f"int pg_q0 = pg_t / {panels} % {copies.slices} * {row_groups};", depth)
        self.renderer.decompose("pg_z", self.renderer.dims(batch), depth)
        self.emit_base(emit, depth)
        if not self.k_fast:
            emit("#pragma unroll", depth)
            emit(f"for (int pg_l = 0; pg_l < {COPY_ROWS * COPY_K // threads}; pg_l++) {{", depth)
            emit(f"int pg_e = threadIdx.x + pg_l * {threads};", depth + 1)
            emit(f"int pg_gx = pg_x0 + pg_e % {COPY_ROWS};", depth + 1)
            self.emit_element(emit, f"pg_tile[pg_e / {COPY_ROWS}][pg_e % {COPY_ROWS}]",
                              f"(4 * pg_q0 + pg_e / {COPY_ROWS})", depth + 1)
            emit("}", depth)
            emit("__syncthreads();", depth)
        assert COPY_ROWS * row_groups % threads == 0, threads
        emit("#pragma unroll", depth)
        emit(f"for (int pg_l = 0; pg_l < {COPY_ROWS * row_groups // threads}; pg_l++) {{", depth)
        emit(f"int pg_e = threadIdx.x + pg_l * {threads};", depth + 1)
        emit(f"int pg_q = pg_e % {row_groups};", depth + 1)
        emit(f"int pg_x = pg_e / {row_groups};", depth + 1)
        emit(f"int pg_gx = pg_x0 + pg_x;", depth + 1)
        emit("float pg_w[4] = {0.0f, 0.0f, 0.0f, 0.0f};", depth + 1)
        emit(f"if (pg_gx < {rows} && pg_q0 + pg_q < {groups}) {{", depth + 1)
        if self.k_fast:
            emit("int pg_gk = 4 * (pg_q0 + pg_q);", depth + 2)
            self.emit_group(emit, [f"pg_w[{j}]" for j in range(4)], depth + 2)
        else:
            for j in range(4):
                emit(f"pg_w[{j}] = pg_tile[4 * pg_q + {j}][pg_x];", depth + 2)
        emit("}", depth + 1)
        values = ", ".join(f"pg_tf32(pg_w[{j}])" for j in range(4))
        emit(f"*(uint4*)(pg_scratch + {offset} + (long long)pg_t * {COPY_ROWS * COPY_K} + pg_x * {COPY_K} + "
             f"((pg_q ^ (pg_x & 7)) << 2)) = make_uint4({values});", depth + 1)
        emit("}", depth)

    def emit_element(self, emit, target, k, depth):
        """target = element (pg_gx, k) of the operand, zero past the edges: a load at its address for a linear
        operand; else its own loops bound from (pg_gx, k) and the expression evaluated (only inside the edges:
        its loads are not guarded)."""
        inside = f"pg_gx < {self.extent} && {k} < {self.k_size}"
        if self.linear:
            emit(f"{target} = ({inside}) ? pg_{self.name}g[(long long)pg_gx * {self.sx} + (long long){k} * "
                 f"{self.sk}] : 0.0f;", depth)
            return
        r = self.renderer
        emit(f"{target} = 0.0f;", depth)
        emit(f"if ({inside}) {{", depth)
        r.scopes.append({})
        r.decompose("pg_gx", r.dims(self.side), depth + 1)
        r.decompose(k, r.dims(self.k_ranges), depth + 1)
        emit(f"{target} = {r.expr(self.value, depth + 1)};", depth + 1)
        r.scopes.pop()
        emit("}", depth)


class _PanelOperand(_Operand):
    """An operand of the fp32 template. Shared memory holds its slice x-fastest, as BK rows of BX + 4 floats,
    whatever its layout in global memory: a thread reads its 4 consecutive x of one k with one 16-byte load (a
    warp's 8 distinct groups of B, or 4 of A, fill the banks once). The 4 values of a fetched group go to 4 rows.
    The padding keeps rows 16-byte aligned and spreads the stores of a k-contiguous fetch over all the banks:
    with BK = 8, lane (x, q) stores value j to bank (x + 16 q + 4 j) % 32."""

    def __init__(self, renderer, name, c, value, side, bx, bk, extent):
        super().__init__(renderer, name, c, value, side, bx, bk, extent)
        self.row = bx + 4
        self.smem_size = bk * self.row

    def emit_stage(self, emit, depth, threads, buf):
        emit("#pragma unroll", depth)
        emit(f"for (int pg_l = 0; pg_l < {self.groups_per_thread(threads)}; pg_l++) {{", depth)
        self.coords(emit, depth + 1, threads)
        for j in range(4):
            emit(f"pg_{self.name}s[{buf}][(4 * pg_q + {j}) * {self.row} + pg_x] = {self.staging}[4 * pg_l + {j}];",
                 depth + 1)
        emit("}", depth)

    def panel(self, k, x) -> str:
        """The 16-byte group of x .. x + 3 at depth k of the current buffer."""
        return f"*(const float4*)&pg_{self.name}s[pg_buf][({k}) * {self.row} + {x}]"


class _FragmentOperand(_Operand):
    """An operand of the mma.sync template. Shared memory holds it as [BX][16] tf32 words (BK is 16), each row
    four 16-byte groups, group q of row x stored at slot q ^ ((x >> 1) & 3): a swizzle that keeps both the staging
    stores (a row's groups side by side, or one group of 8 consecutive rows) and the fragment loads free of bank
    conflicts. The mma's k order is permuted, the same for A and B: in step s of a slice, fragment column c (0..7)
    is k = 4 * (c % 4) + 2 * s + c / 4, so lane t finds its values for both steps in group t of each row it reads,
    one 16-byte load."""

    def __init__(self, renderer, name, c, value, side, bx, bk, extent):
        super().__init__(renderer, name, c, value, side, bx, bk, extent)
        assert bk == 16, "the fragment layout is built for 16-deep slices"

    def group_slot(self, buf) -> str:
        return f"pg_{self.name}s[{buf}][pg_x * 16 + 4 * (pg_q ^ ((pg_x >> 1) & 3))]"

    def emit_stage(self, emit, depth, threads, buf):
        """Registers -> shared memory buffer `buf`, rounded to tf32 once here, one 16-byte store per group."""
        emit("#pragma unroll", depth)
        emit(f"for (int pg_l = 0; pg_l < {self.groups_per_thread(threads)}; pg_l++) {{", depth)
        self.coords(emit, depth + 1, threads)
        values = ", ".join(f"pg_tf32({self.staging}[4 * pg_l + {j}])" for j in range(4))
        emit(f"*(uint4*)&{self.group_slot(buf)} = make_uint4({values});", depth + 1)
        emit("}", depth)


def _acc_size(acc) -> int:
    return prod(r.arg[1] for r in acc.arg[1])


def render_cuda(kernel, arch="sm_90", tf32=None, sm_count=132):
    """(source, launch plan) for a lowered kernel; tf32 defaults to pg.TF32."""
    renderer = CUDARenderer(arch, pg.TF32 if tf32 is None else tf32, sm_count)
    source = renderer.render(kernel)
    return source, renderer.launch


# ----------------------------------------------------------------------------------------------------------------------
# 3. NVRTC


def _bindings():
    """cuda.bindings' driver and nvrtc modules, or a RuntimeError that says what to install."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:
        raise RuntimeError(f"picograd's CUDA backend needs NVIDIA's cuda-python, which is not installed ({e}); "
                           f"pip install 'cuda-bindings>=12.8' nvidia-cuda-nvrtc") from None
    return driver, nvrtc


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    _, nvrtc = _bindings()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:   # libnvrtc itself is missing
        raise RuntimeError(f"picograd's CUDA backend cannot load NVRTC ({e}); pip install nvidia-cuda-nvrtc or "
                           f"install the CUDA toolkit") from None
    return f"{major}.{minor}"


@functools.lru_cache(maxsize=None)
def nvrtc_archs() -> tuple:
    """The real architectures this NVRTC compiles cubins for (as ints: 90 for sm_90)."""
    _, nvrtc = _bindings()
    nvrtc_version()
    try:
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        return tuple(int(a) for a in archs)
    except Exception:
        return ()


def nvrtc_options(arch: str) -> list:
    return [f"--gpu-architecture={arch}", "--fmad=true"]


def _nvrtc_text(nvrtc, prog, size_fn, get_fn) -> str:
    _, size = size_fn(prog)
    if size <= 1:
        return ""
    try:
        buf = bytearray(size)
        get_fn(prog, buf)
    except TypeError:   # older bindings fill a bytes object
        buf = b" " * size
        get_fn(prog, buf)
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def compile_cuda(source: str, arch: str = "sm_90", name: str = "kernel") -> str:
    """NVRTC source into a cubin for arch, through the disk cache (keyed by source, NVRTC version, options and
    arch); returns the cache file's path (compile.cached_payload reads the cubin back). A failed compilation
    raises RuntimeError with NVRTC's log and the source."""
    _, nvrtc = _bindings()
    version = nvrtc_version()
    options = nvrtc_options(arch)
    success = nvrtc.nvrtcResult.NVRTC_SUCCESS

    def build() -> bytes:
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
        if err != success:
            raise RuntimeError(f"nvrtcCreateProgram failed for kernel {name}: {err}")
        try:
            (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
            if err != success:
                log = _nvrtc_text(nvrtc, prog, nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog)
                raise RuntimeError(f"NVRTC {version} failed to compile kernel {name} for {arch} ({err.name}):\n"
                                   f"{log}\n--- source ---\n{source}")
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            if err != success or size == 0:
                raise RuntimeError(f"NVRTC produced no cubin for kernel {name} ({arch}); is {arch} a real "
                                   f"architecture this NVRTC {version} supports?")
            buf = bytearray(size)
            try:
                nvrtc.nvrtcGetCUBIN(prog, buf)
            except TypeError:
                buf = b" " * size
                nvrtc.nvrtcGetCUBIN(prog, buf)
            return bytes(buf)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
    return compiler.disk_cached((source, f"nvrtc {version}", " ".join(options), arch), ".cubin", build)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Programs and the device


class CUDAProgram:
    """A compiled kernel: call with buffers and variable values to launch it on the buffers' device's stream.

    The cubin is loaded into a device's context at its first launch there (on the launching thread: programs are
    built on compile.py's worker threads, which have no context). Arguments go through fixed ctypes slots that
    kernelParams points at (the driver copies them at launch, so the slots are free again when it returns). A
    wgmma product launches two functions with the same arguments: its prologue, which writes the operands' tf32
    copies into the device's scratch, then the product."""

    def __init__(self, device, kernel, source, cubin_path, launch):
        self.kernel, self.source, self.launch = kernel, source, launch
        self.image = compiler.cached_payload(cubin_path)
        self.name = kernel.name
        self.home = device
        self.functions = {}   # device name -> (device, module, [(function, grid, shared bytes, launch configuration)])
        self.param_index = [p.index for p in kernel.params]
        self.var_order = [name for name, _, _ in kernel.var_names]
        self.ptr_slots = [ctypes.c_uint64(0) for _ in self.param_index]
        self.err_slot = ctypes.c_uint64(0)
        self.vars_slot = ctypes.c_uint64(0)
        self.scratch_slot = ctypes.c_uint64(0)
        slots = self.ptr_slots + ([self.err_slot] if kernel.uses_check else []) + (
            [self.vars_slot] if self.var_order else []) + ([self.scratch_slot] if launch.scratch else [])
        self.arg_array = (ctypes.c_void_p * max(1, len(slots)))(*[ctypes.addressof(s) for s in slots])
        self.arg_address = ctypes.addressof(self.arg_array)
        self.lock = threading.Lock()

    def function_on(self, device):
        with self.lock:
            entry = self.functions.get(device.name)
            if entry is None:
                driver = device.driver
                device.activate()
                module = device.check(driver.cuModuleLoadData(self.image), f"loading kernel {self.name}")
                fn = device.check(driver.cuModuleGetFunction(module, self.name.encode()), f"finding {self.name}")
                if self.launch.shared > 48 << 10:   # beyond the default limit a kernel must opt in
                    limit = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                    device.check(driver.cuFuncSetAttribute(fn, limit, self.launch.shared),
                                 f"allowing {self.name} {self.launch.shared} bytes of shared memory")
                launches = [(fn, self.launch.grid, self.launch.threads, self.launch.shared)]
                if self.launch.scratch:   # the prologue writing the operands' tf32 copies goes first
                    prologue = device.check(driver.cuModuleGetFunction(module, f"{self.name}_tf32".encode()),
                                            f"finding {self.name}_tf32")
                    launches.insert(0, (prologue, self.launch.prologue_grid, COPY_THREADS, 0))
                entry = self.functions[device.name] = (device, module, [
                    (fn, grid, threads, shared, self.launch_config(device, grid, threads, shared))
                    for fn, grid, threads, shared in launches])
            return entry

    def launch_config(self, device, grid, threads, shared):
        """cuLaunchKernelEx's configuration for a programmatic dependent launch on device's stream (None: a plain
        cuLaunchKernel)."""
        launch, driver = self.launch, device.driver
        if not launch.programmatic:
            return None
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes, config.hStream = shared, device.stream
        config.attrs, config.numAttrs = [attribute], 1
        return config

    def __call__(self, bufs, var_vals):
        where = bufs[self.param_index[0]].device if self.param_index else self.home.name
        entry = self.functions.get(where)
        if entry is None:
            entry = self.function_on(pg.Device[where])
        device, _, launches = entry
        try:
            for slot, i in zip(self.ptr_slots, self.param_index):
                slot.value = bufs[i].mem.ptr
        except AttributeError:
            foreign = [f"{bufs[i]!r}" for i in self.param_index if bufs[i].device != device.name]
            raise RuntimeError(f"kernel {self.name} on {device.name} was given buffers on another device: "
                               f"{', '.join(foreign)} (the schedule mixed devices)") from None
        if self.var_order:
            device.set_vars({name: var_vals[name] for name in self.var_order})
            self.vars_slot.value = device.var_table.ptr
        if self.kernel.uses_check:
            self.err_slot.value = device.error_mem.ptr
            device.checked = True
        launch = self.launch
        if launch.grid == 0:
            return
        if launch.scratch:
            self.scratch_slot.value = device.scratch(launch.scratch).ptr
        device.activate()
        if launch.kind == "scatter":   # the atomic adds start from zero
            out = bufs[self.kernel.store.src[0].arg[0]]
            device.check(device.driver.cuMemsetD32Async(out.mem.ptr, 0, out.size, device.stream), "zeroing")
        for fn, grid, threads, shared, config in launches:
            if config is not None:
                err = device.driver.cuLaunchKernelEx(config, fn, self.arg_address, 0)[0]
            else:
                err = device.driver.cuLaunchKernel(fn, grid, 1, 1, threads, 1, 1, shared, device.stream,
                                                   self.arg_address, 0)[0]
            if err != device.success:
                device.check((err,), f"launching {self.name} (grid {grid}, {threads} threads)")


class CUDAGraph:
    """A step's kernel launches and copies, replayed with one cuGraphLaunch. A graph's memory is fixed: the
    call's inputs are copied into staging buffers before it and its outputs out of staging buffers after; the
    variable table is uploaded just before it, from a pinned slot of the device's staging ring, so the host can
    queue the next replay (new variable values) while this one runs."""
    MAX_IO_BYTES = 16 << 20   # beyond this the copies cost more than the launches they save

    def __init__(self, device, steps, inputs, outputs):
        driver = device.driver
        self.device = device
        self.inputs = {k: pg.Buffer(*spec) for k, spec in inputs.items()}
        self.outputs = {k: pg.Buffer(*spec) for k, spec in outputs.items()}
        launches = []
        for prog, bound, recorded_vars in steps:
            bufs = [self.inputs[ref] if kind == "input" else self.outputs[ref] if kind == "output" else ref
                    for kind, ref in bound]
            for b in bufs:
                b.mem
            launches.append((prog, bufs, recorded_vars))
        device.activate()
        device.synchronize()
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        device.check(driver.cuStreamBeginCapture(device.stream, mode), "cuStreamBeginCapture")
        device.capturing = True
        try:
            for prog, bufs, recorded_vars in launches:
                if prog is None:
                    device.copy_within(bufs[0].mem, bufs[1].mem, bufs[0].nbytes)
                else:
                    prog(bufs, recorded_vars)
        finally:
            device.capturing = False
            graph = device.check(driver.cuStreamEndCapture(device.stream), "cuStreamEndCapture")
        self.graph = graph
        self.exec = device.check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, inputs, outputs, var_values: dict):
        device, driver = self.device, self.device.driver
        for k, buf in inputs.items():
            device.copy_within(self.inputs[k].mem, buf.mem, buf.nbytes)
        for name, value in var_values.items():
            device.var_values[var_slot(name)] = value
        device.activate()
        device.staging.upload(device.var_table, device.var_values)   # the whole table, ahead of the graph
        device.check(driver.cuGraphLaunch(self.exec, device.stream), "cuGraphLaunch")
        for k, buf in outputs.items():
            device.copy_within(buf.mem, self.outputs[k].mem, buf.nbytes)

    def __del__(self):
        try:
            driver = self.device.driver
            driver.cuGraphExecDestroy(self.exec)
            driver.cuGraphDestroy(self.graph)
        except Exception:   # interpreter shutdown
            pass


class StagingRing:
    """Small pinned host buffers used in turn for the host copies that must not wait for the whole stream: a
    graph's variable upload, and reads of a result while later work runs (CUDADevice.copyout_later). Each slot's
    event marks the end of the copy that last used it; taking a slot waits for that event (and lands a read still
    parked there in its array). Pageable host memory would not do: a copy from the device into it returns only
    once the stream has run everything queued before it."""
    SLOTS, SLOT_BYTES = 8, 4096

    def __init__(self, device):
        driver = device.driver
        self.device = device
        self.base = int(device.check(driver.cuMemHostAlloc(self.SLOTS * self.SLOT_BYTES, 0), "cuMemHostAlloc"))
        flags = int(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        self.events = [device.check(driver.cuEventCreate(flags), "cuEventCreate") for _ in range(self.SLOTS)]
        self.pending = [None] * self.SLOTS   # per slot: None (free), True (an upload), or a read's landing function
        self.next = 0

    def take(self) -> int:
        slot, self.next = self.next, (self.next + 1) % self.SLOTS
        self.finish(slot)
        return slot

    def finish(self, slot):
        """Wait for the slot's last copy; a read lands in its array."""
        done, self.pending[slot] = self.pending[slot], None
        if done is not None:
            self.device.check(self.device.driver.cuEventSynchronize(self.events[slot]), "cuEventSynchronize")
            if callable(done):
                done()

    def address(self, slot) -> int:
        return self.base + slot * self.SLOT_BYTES

    def queued(self, slot, done):
        self.device.check(self.device.driver.cuEventRecord(self.events[slot], self.device.stream), "cuEventRecord")
        self.pending[slot] = done

    def upload(self, mem, values: np.ndarray):
        slot = self.take()
        ctypes.memmove(self.address(slot), values.ctypes.data, values.nbytes)
        self.device.check(self.device.driver.cuMemcpyHtoDAsync(mem.ptr, self.address(slot), values.nbytes,
                                                               self.device.stream), "uploading the variables")
        self.queued(slot, True)

    def __del__(self):
        try:
            driver = self.device.driver
            for event in self.events:
                driver.cuEventDestroy(event)
            driver.cuMemFreeHost(self.base)
        except Exception:   # interpreter shutdown
            pass


class CUDAMemory:
    """A block of device memory: its address and its real (rounded) size."""
    __slots__ = ("ptr", "nbytes")

    def __init__(self, ptr, nbytes):
        self.ptr, self.nbytes = ptr, nbytes

    def __repr__(self):
        return f"<CUDAMemory 0x{self.ptr:x} {self.nbytes} bytes>"


def _round_size(nbytes: int) -> int:
    """Sizes are rounded up so that nearby requests share cached blocks: 512 B steps below 1 MiB, 64 KiB steps
    below 32 MiB, 2 MiB steps above."""
    if nbytes <= 0:
        return 512
    step = 512 if nbytes < 1 << 20 else (64 << 10 if nbytes < 32 << 20 else 2 << 20)
    return _cdiv(nbytes, step) * step


_tls = threading.local()   # per host thread: the context picograd last made current on it


class CUDADevice:
    """One GPU: its primary context, one stream that every kernel and copy of this device goes through (so work
    runs in issue order, and memory freed on the host may be reused by the next operation at once), a caching
    allocator, and the error flag that checked kernels set."""
    kind = "CUDA"

    def __init__(self, name="CUDA:0"):
        self.name = name
        self.index = int(name.split(":")[1]) if ":" in name else 0
        driver, _ = _bindings()
        self.driver = driver
        self.success = driver.CUresult.CUDA_SUCCESS
        try:
            (err,) = driver.cuInit(0)
        except Exception as e:   # libcuda.so.1 could not be loaded
            raise RuntimeError(f"{name}: no NVIDIA driver found (libcuda could not be loaded: {e}); CUDA needs an "
                               f"NVIDIA GPU with its driver installed, the CPU device still works") from None
        if err == driver.CUresult.CUDA_ERROR_NO_DEVICE:
            raise RuntimeError(f"{name}: the NVIDIA driver found no GPU (cuInit: CUDA_ERROR_NO_DEVICE)")
        self.check((err,), "cuInit")
        count = self.check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if self.index >= count:
            raise RuntimeError(f"{name} requested, but this machine has {count} CUDA device{'s' * (count != 1)}")
        self.device = self.check(driver.cuDeviceGet(self.index), "cuDeviceGet")
        self.context = self.check(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self.activate()
        attr = driver.CUdevice_attribute
        major = self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        minor = self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        self.sm_count = self.attribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.arch = f"sm_{major}{minor}"
        self.compile_arch = self.pick_arch(major, minor)
        self.stream = self.check(driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)),
                                 "cuStreamCreate")
        # allocator: free blocks by size (`cache`), their sizes sorted for best-fit search
        self.cache, self.cache_sizes = {}, []
        self.in_use = self.cached = self.reserved = self.device_allocs = 0
        self.lock = threading.RLock()   # a Buffer may be garbage-collected on one of compile.py's worker threads
        self.error_mem = self.raw_alloc(512)
        self.check(driver.cuMemsetD32Async(self.error_mem.ptr, 0, 3, self.stream), "clearing the error flag")
        self.checked = False   # a kernel with bounds checks ran since the last check_errors()
        self.var_table = self.raw_alloc(4 * VAR_TABLE_SLOTS)
        self.var_values = np.zeros(VAR_TABLE_SLOTS, dtype=np.int32)   # what the table holds (or will, in order)
        self.capturing = False
        self.scratches = []   # see scratch
        self.staging = StagingRing(self)

    # -- driver plumbing
    def check(self, result, what):
        """The values of a driver call's result tuple, or a RuntimeError naming the call and the error."""
        err = result[0]
        if err != self.success:
            try:
                detail = self.driver.cuGetErrorString(err)[1].decode()
            except Exception:
                detail = ""
            raise RuntimeError(f"{self.name}: {what} failed: {getattr(err, 'name', err)} {detail}".rstrip())
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    def activate(self):
        """Make this device's context current on the calling thread (contexts are per thread)."""
        if getattr(_tls, "context", None) is not self.context:
            self.check(self.driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
            _tls.context = self.context

    def attribute(self, attr) -> int:
        return int(self.check(self.driver.cuDeviceGetAttribute(attr, self.device), f"reading {attr.name}"))

    def pick_arch(self, major, minor) -> str:
        """The device's own sm_XY if NVRTC can target it (sm_90a on Hopper: the arch-specific target that has wgmma,
        whose cubins run on sm_90 only), else the newest of the same major version it can (cubins run on later
        minor versions of their major)."""
        archs = nvrtc_archs()
        own = major * 10 + minor
        if not archs or own in archs:
            return "sm_90a" if own == 90 else f"sm_{own}"
        same_major = [a for a in archs if a // 10 == major and a <= own]
        if not same_major:
            raise RuntimeError(f"{self.name} is sm_{own}, which NVRTC {nvrtc_version()} cannot compile for "
                               f"(it supports {', '.join(f'sm_{a}' for a in archs)}); install a matching "
                               f"nvidia-cuda-nvrtc")
        return f"sm_{max(same_major)}"

    def mem_info(self):
        self.activate()
        free, total = self.check(self.driver.cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    # -- memory
    def raw_alloc(self, size, requested=None) -> CUDAMemory:
        """cuMemAlloc; when the GPU is full, the cache goes back to the driver and the call is retried once."""
        self.activate()
        oom = self.driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        err, ptr = self.driver.cuMemAlloc(size)
        if err == oom:
            self.empty_cache()
            err, ptr = self.driver.cuMemAlloc(size)
        if err == oom:
            free, total = self.mem_info()
            want = size if requested is None else requested
            raise MemoryError(f"{self.name} is out of memory: tried to allocate {want} bytes "
                              f"({want / 2**30:.2f} GiB) with {free} bytes ({free / 2**30:.2f} GiB) free of "
                              f"{total / 2**30:.2f} GiB; picograd holds {self.in_use} bytes in live tensors")
        self.check((err,), f"cuMemAlloc({size})")
        self.reserved += size
        self.device_allocs += 1
        return CUDAMemory(int(ptr), size)

    def alloc(self, nbytes) -> CUDAMemory:
        """A block of at least nbytes: the smallest cached one that fits with little slack, else a new one."""
        size = _round_size(nbytes)
        with self.lock:
            k = bisect.bisect_left(self.cache_sizes, size)
            if k < len(self.cache_sizes) and self.cache_sizes[k] <= size + size // 8:
                have = self.cache_sizes[k]
                blocks = self.cache[have]
                mem = blocks.pop()
                if not blocks:
                    del self.cache[have]
                    del self.cache_sizes[k]
                self.cached -= have
            else:
                mem = self.raw_alloc(size, nbytes)
            self.in_use += mem.nbytes
        return mem

    def free(self, mem, nbytes):
        """Back to the cache: the stream runs in order, so the next operation may reuse the block at once."""
        with self.lock:
            self.in_use -= mem.nbytes
            blocks = self.cache.get(mem.nbytes)
            if blocks is None:
                blocks = self.cache[mem.nbytes] = []
                bisect.insort(self.cache_sizes, mem.nbytes)
            blocks.append(mem)
            self.cached += mem.nbytes

    def scratch(self, nbytes) -> CUDAMemory:
        """Device memory of at least nbytes for one kernel's intermediate data (the tf32 copies of a product's
        operands), reused by every such kernel: they run one after another on the stream. A larger need takes a
        new block of the next power of two; the old ones stay allocated, since captured graphs hold their
        addresses (so all of them together are under twice the largest)."""
        with self.lock:
            if not self.scratches or self.scratches[-1].nbytes < nbytes:
                self.scratches.append(self.raw_alloc(_next_pow2(nbytes)))
            return self.scratches[-1]

    def empty_cache(self):
        """Give every cached block back to the driver (after the stream has finished with them)."""
        self.synchronize()
        with self.lock:
            for blocks in self.cache.values():
                for mem in blocks:
                    self.check(self.driver.cuMemFree(mem.ptr), "cuMemFree")
                    self.reserved -= mem.nbytes
            self.cache, self.cache_sizes, self.cached = {}, [], 0

    def memory_stats(self) -> dict:
        """Bytes in live buffers (in_use), in the cache (cached), taken from the driver (reserved), and how many
        cuMemAlloc calls were made (device_allocs)."""
        return {"in_use": self.in_use, "cached": self.cached, "reserved": self.reserved,
                "device_allocs": self.device_allocs}

    # -- copies
    def copyin(self, mem, array: np.ndarray):
        """Host -> device, ordered on the stream. The driver stages pageable memory before returning, so the
        array may be dropped at once."""
        if array.nbytes:
            self.activate()
            self.check(self.driver.cuMemcpyHtoDAsync(mem.ptr, array.ctypes.data, array.nbytes, self.stream),
                       "copy to the device")

    def copyout(self, out: np.ndarray, mem):
        """Device -> host after everything queued before it; returns when the data is in out."""
        if out.nbytes:
            self.activate()
            self.check(self.driver.cuMemcpyDtoHAsync(out.ctypes.data, mem.ptr, out.nbytes, self.stream),
                       "copy from the device")
        self.synchronize()

    def copyout_later(self, out: np.ndarray, mem):
        """Device -> host behind everything queued so far, without waiting: returns a function that waits for this
        copy alone (work queued after it keeps running) and leaves the data in out. Reads too big for a staging
        slot are done at once."""
        if out.nbytes == 0 or out.nbytes > StagingRing.SLOT_BYTES:
            self.copyout(out, mem)
            return lambda: None
        self.activate()
        ring = self.staging
        slot = ring.take()
        self.check(self.driver.cuMemcpyDtoHAsync(ring.address(slot), mem.ptr, out.nbytes, self.stream),
                   "copy from the device")

        def land():
            ctypes.memmove(out.ctypes.data, ring.address(slot), out.nbytes)
        ring.queued(slot, land)

        def wait():
            if ring.pending[slot] is land:   # else the slot was taken again, which landed it
                ring.finish(slot)
        return wait

    def copy_within(self, dst, src, nbytes):
        if nbytes:
            self.activate()
            self.check(self.driver.cuMemcpyDtoDAsync(dst.ptr, src.ptr, nbytes, self.stream), "device copy")

    def copy_from_peer(self, dst, src):
        """Buffer src on another GPU -> buffer dst here, without a trip through the host."""
        src_dev = pg.Device[src.device]
        src_dev.synchronize()   # its kernels have written src
        self.activate()
        self.check(self.driver.cuMemcpyPeerAsync(dst.mem.ptr, self.context, src.mem.ptr, src_dev.context,
                                                 dst.nbytes, self.stream), "peer copy")
        self.synchronize()      # src may be freed and reused on its own stream right after this returns

    def synchronize(self):
        self.activate()
        self.check(self.driver.cuStreamSynchronize(self.stream), "running kernels (cuStreamSynchronize)")

    # -- variables and CUDA graphs
    def set_vars(self, values: dict):
        """Make the variable table hold these values for the kernels queued next (an upload only when they
        change; inside a graph capture the graph's own upload from pinned memory provides them)."""
        changed = False
        for name, value in values.items():
            slot = var_slot(name)
            if self.var_values[slot] != value:
                self.var_values[slot] = value
                changed = True
        if changed and not self.capturing:
            self.copyin(self.var_table, self.var_values)

    def capture_graph(self, steps, inputs, outputs):
        """A CUDA graph of a captured step (see compile.Trace), or None when its inputs and outputs are too big for
        the staging copies to pay off."""
        io_bytes = sum(size * dtype.itemsize for _, size, dtype in list(inputs.values()) + list(outputs.values()))
        return CUDAGraph(self, steps, inputs, outputs) if io_bytes <= CUDAGraph.MAX_IO_BYTES else None

    # -- kernels
    def build(self, kernel) -> CUDAProgram:
        renderer = CUDARenderer(self.compile_arch, tf32=pg.TF32, sm_count=self.sm_count)
        source = renderer.render(kernel)
        return CUDAProgram(self, kernel, source, compile_cuda(source, self.compile_arch, kernel.name),
                           renderer.launch)

    def check_errors(self):
        """IndexError if a bounds-checked kernel saw an index out of range since the last check (the flag is
        read only when such a kernel ran, so unchecked work never waits for the GPU here)."""
        if not self.checked:
            return
        self.checked = False
        flags = np.zeros(3, dtype=np.int32)
        self.copyout(flags, self.error_mem)
        if flags[0]:
            self.check(self.driver.cuMemsetD32Async(self.error_mem.ptr, 0, 3, self.stream), "clearing the error flag")
            raise IndexError(f"index {int(flags[1])} is out of bounds for a dimension of size {int(flags[2])}")
