"""Tests of the tensor core (picograd.py, compile.py and the backends) against PyTorch as the reference.

What is checked:
  - every public op, forward and backward, through one helper (`check`) that feeds the same random data to torch
    and picograd, in graph and eager mode, on every device present (CPU, and CUDA where it opens); plus random
    chains of views, where index arithmetic bugs would hide;
  - fusion, through kernel counts from pg.stats();
  - eager and graph mode agreeing on a multi-op computation with backward;
  - training: an MLP and a causal attention block under pg.AdamW, pg.SGD with momentum, a @pg.compile'd step,
    resuming from optimizer state, clip_grad_norm_, all step by step against torch;
  - state_dict and safetensors I/O, including files written by the safetensors package and malformed files;
  - clear errors for bad shapes, indices, devices, dtypes and a missing C compiler; size-0 dimensions and long
    graphs (which once crashed the core);
  - the on-disk kernel cache: reuse by a second process, rebuilding corrupt entries, an unwritable directory.

Inputs are drawn fresh for each call from a generator seeded by PICOGRAD_TEST_SEED (default 0), so a failure
reproduces with the same seed and the same selection of tests.
"""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as st_load_file
from safetensors.numpy import save_file as st_save_file

import picograd as pg

HERE = os.path.dirname(os.path.abspath(__file__))
RNG = np.random.default_rng(int(os.environ.get("PICOGRAD_TEST_SEED", "0")))

# CUDA joins the list only where its backend opens; on a CPU-only machine the import or the driver fails
DEVICES = ["CPU"]
try:
    pg.Device["CUDA"]
    DEVICES.append("CUDA")
except Exception:
    pass


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["graph", "eager"])
def mode(request):
    """Runs the test body in graph mode (lazy, fused) or eager mode (one kernel per op)."""
    with pg.eager(request.param == "eager"):
        yield request.param


def kernels_launched():
    return pg.stats()["kernels_launched"]


# ----------------------------------------------------------------------------------------------------------------------
# The one helper: same data into torch and picograd, compare outputs and the gradients of a random weighted sum.


def _per_input(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _draw(shape, dtype, low, high):
    if dtype == "float32":
        return RNG.uniform(low, high, size=shape).astype(np.float32)
    if dtype == "int32":
        return RNG.integers(low, high, size=shape).astype(np.int32)
    if dtype == "bool":
        return RNG.random(size=shape) < 0.5
    raise ValueError(f"unknown test dtype {dtype}")


def _to_torch(array, dtype, requires_grad):
    if dtype == "float32":
        return torch.tensor(array, requires_grad=requires_grad)
    # torch indexes with int64; the values are the same
    return torch.from_numpy(array.astype(np.int64) if dtype == "int32" else array)


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(shapes, torch_fn, pg_fn, device, atol=1e-5, rtol=1e-4, grad=True, low=-2.0, high=2.0, dtypes=None):
    """Run torch_fn and pg_fn on the same random inputs of `shapes` and compare the outputs and, for float inputs,
    the gradients of sum(out * random weight) (summed over outputs when fn returns several).

    dtypes, low and high are one value for all inputs or one per input; int inputs draw from [low, high)."""
    n = len(shapes)
    dtypes, lows, highs = _per_input(dtypes or "float32", n), _per_input(low, n), _per_input(high, n)
    arrays = [_draw(s, d, lo, hi) for s, d, lo, hi in zip(shapes, dtypes, lows, highs)]
    wants_grad = [grad and d == "float32" for d in dtypes]
    t_in = [_to_torch(a, d, g) for a, d, g in zip(arrays, dtypes, wants_grad)]
    p_in = [pg.Tensor(a, device=device, requires_grad=g) for a, g in zip(arrays, wants_grad)]

    t_out, p_out = _as_list(torch_fn(*t_in)), _as_list(pg_fn(*p_in))
    assert len(t_out) == len(p_out), f"torch gives {len(t_out)} outputs, picograd {len(p_out)}"
    for i, (t, p) in enumerate(zip(t_out, p_out)):
        assert tuple(p.shape) == tuple(t.shape), f"output {i}: shape {p.shape}, torch has {tuple(t.shape)}"
        expected, got = t.detach().numpy(), p.numpy()
        assert got.shape == expected.shape, f"output {i}: numpy() gives shape {got.shape}, not {expected.shape}"
        if expected.dtype == np.bool_:
            assert p.dtype is pg.bool, f"output {i}: dtype {p.dtype}, torch gives bool"
            np.testing.assert_array_equal(got, expected, err_msg=f"output {i}")
        elif expected.dtype.kind in "iu":
            assert p.dtype is pg.int32, f"output {i}: dtype {p.dtype}, torch gives {expected.dtype}"
            np.testing.assert_array_equal(got, expected, err_msg=f"output {i}")
        else:
            assert p.dtype is pg.float32, f"output {i}: dtype {p.dtype}, torch gives float"
            np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, err_msg=f"output {i}")

    if not any(wants_grad):
        return
    float_outs = [(t, p) for t, p in zip(t_out, p_out) if t.dtype == torch.float32 and t.requires_grad]
    if not float_outs:
        return
    t_loss, p_loss = 0.0, None
    for t, p in float_outs:
        w = RNG.uniform(-1, 1, size=tuple(t.shape)).astype(np.float32)
        t_loss = t_loss + (t * torch.from_numpy(w)).sum()
        term = (p * pg.Tensor(w, device=device)).sum()
        p_loss = term if p_loss is None else p_loss + term
    t_loss.backward()
    p_loss.backward()
    for i, (t, p, a) in enumerate(zip(t_in, p_in, arrays)):
        if not wants_grad[i]:
            continue
        expected = np.zeros_like(a) if t.grad is None else t.grad.numpy()
        got = np.zeros_like(a) if p.grad is None else p.grad.numpy()
        assert got.shape == expected.shape, f"gradient of input {i}: shape {got.shape}, torch has {expected.shape}"
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, err_msg=f"gradient of input {i}")


# ----------------------------------------------------------------------------------------------------------------------
# The op table: (name, shapes, torch_fn, pg_fn, options). pg_fn None means the same function works for both.
# Shapes are few and shared (3x7, 7, 2x3x7, 3x1, ...) so that compiled kernels are reused across cases.

POS = {"low": 0.5, "high": 2.0}   # strictly positive inputs: log, sqrt, rsqrt, division, float powers
A, V, B3, COL, ROW = (3, 7), (7,), (2, 3, 7), (3, 1), (1, 7)


def pg_embedding(ids, w):
    emb = pg.Embedding(w.shape[0], w.shape[1], device=w.device)
    emb.weight = w
    return emb(ids)


def pg_linear(x, w, b=None):
    layer = pg.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device)
    layer.weight, layer.bias = w, b
    return layer(x)


def pg_rmsnorm(x, w):
    norm = pg.RMSNorm(w.shape[0], eps=1e-5, device=w.device)
    norm.weight = w
    return norm(x)


def attend_mask(m):
    # a random boolean mask, with the diagonal always allowed so that no row is fully masked (torch gives NaN there)
    return m | pg.eye(m.shape[0], dtype=pg.bool, device=m.device) if isinstance(m, pg.Tensor) else \
        m | torch.eye(m.shape[0], dtype=torch.bool)


CASES = [
    # -- binary arithmetic, each with broadcasting
    ("add", [A, A], lambda a, b: a + b, None, {}),
    ("add_bcast_row", [A, V], lambda a, b: a + b, None, {}),
    ("add_bcast_both", [COL, ROW], lambda a, b: a + b, None, {}),
    ("add_bcast_0d", [B3, ()], lambda a, b: a + b, None, {}),
    # regression: a 0-d input used to come out of pg.Tensor with shape (1,)
    ("scalar_0d_input", [()], lambda a: a.exp() * 2, None, {}),
    ("add_scalar", [A], lambda a: 1.5 + a + 2, None, {}),
    ("sub_bcast", [B3, COL], lambda a, b: a - b, None, {}),
    ("rsub_scalar", [A], lambda a: 1 - a, None, {}),
    # regression: NEG of a negative literal was rendered as `--0.5f`, which gcc rejects
    ("sub_negative_scalar", [A], lambda a: a - (-0.5), None, {}),
    ("mul_bcast", [A, V], lambda a, b: a * b, None, {}),
    ("mul_bcast_3d", [(2, 1, 7), (3, 1)], lambda a, b: a * b, None, {}),
    ("div_bcast", [A, V], lambda a, b: a / b, None, {"low": [-2, 0.5], "high": [2, 2]}),
    ("rdiv_scalar", [A], lambda a: 3 / a, None, POS),
    ("pow_2", [A], lambda a: a ** 2, None, {}),
    ("pow_3", [B3], lambda a: a ** 3, None, {}),
    ("pow_neg1", [A], lambda a: a ** -1, None, POS),
    ("pow_half", [A], lambda a: a ** 0.5, None, POS),
    ("pow_float", [A], lambda a: a ** 1.7, None, POS),
    ("pow_tensor_bcast", [A, V], lambda a, b: a ** b, None, {"low": [0.5, -2], "high": [2, 2]}),
    ("rpow", [A], lambda a: 2 ** a, None, {}),
    # integer exponents above the repeated-multiply range go through exp2/log2 and take the sign from parity
    ("pow_10_neg_base", [A], lambda a: a ** 10, None, {"low": -1.5, "high": 1.5, "rtol": 1e-3}),
    ("pow_11_neg_base", [A], lambda a: a ** 11, None, {"low": -1.5, "high": 1.5, "rtol": 1e-3}),
    ("neg", [B3], lambda a: -a, None, {}),
    ("int_arith", [A, V], lambda a, b: a * b + a - b, None, {"dtypes": "int32", "low": -5, "high": 5}),
    # 2b+1 is odd, so never zero; negative operands check floor (not C's truncating) division
    ("int_floordiv_mod", [A, V], lambda a, b: (a // (2 * b + 1), a % (2 * b + 1), a / (2 * b + 1)), None,
     {"dtypes": "int32", "low": [-9, -3], "high": [9, 3]}),
    ("int_with_float_scalar", [A], lambda a: (a + 0.5, a > 0.5, a * 2), None,
     {"dtypes": "int32", "low": -9, "high": 9}),
    ("bool_logic", [A, V], lambda a, b: ((a > 0) & (b < 0), (a > 0) | (b < 0), ~(a > 0)), None, {}),
    # -- comparisons (ints make == and <= see ties)
    ("eq_int_bcast", [A, V], lambda a, b: a == b, None, {"dtypes": "int32", "low": 0, "high": 3}),
    ("ne_int_bcast", [A, COL], lambda a, b: a != b, None, {"dtypes": "int32", "low": 0, "high": 3}),
    ("lt_bcast", [A, V], lambda a, b: a < b, None, {}),
    ("le_int_bcast", [A, ROW], lambda a, b: a <= b, None, {"dtypes": "int32", "low": 0, "high": 3}),
    ("gt_bcast", [B3, COL], lambda a, b: a > b, None, {}),
    ("ge_int_bcast", [A, V], lambda a, b: a >= b, None, {"dtypes": "int32", "low": 0, "high": 3}),
    ("cmp_scalar", [A], lambda a: (a > 0.5, a <= -0.5, a == a, a != a), None, {}),
    ("eq_float", [A], lambda a: a == a.clamp(-1, 1), None, {}),
    # -- unary
    ("exp", [A], lambda a: a.exp(), None, {"low": -4, "high": 4}),
    ("log", [A], lambda a: a.log(), None, {"low": 0.1, "high": 5}),
    ("sqrt", [A], lambda a: a.sqrt(), None, {"low": 0.1, "high": 5}),
    ("rsqrt", [A], lambda a: a.rsqrt(), None, {"low": 0.2, "high": 5}),
    ("sin", [B3], lambda a: a.sin(), None, {"low": -6, "high": 6}),
    ("cos", [B3], lambda a: a.cos(), None, {"low": -6, "high": 6}),
    ("tanh", [A], lambda a: a.tanh(), None, {"low": -4, "high": 4}),
    ("sigmoid", [A], lambda a: a.sigmoid(), None, {"low": -6, "high": 6}),
    ("relu", [B3], lambda a: a.relu(), None, {}),
    ("silu", [A], F.silu, lambda a: a.silu(), {"low": -4, "high": 4}),
    ("gelu", [A], F.gelu, lambda a: a.gelu(), {"low": -4, "high": 4}),
    ("abs", [A], lambda a: a.abs(), None, {}),
    # saturated inputs: exp overflows to inf inside sigmoid, and the gradient must still be 0, not NaN
    ("saturated_activations", [A], lambda a: (a.sigmoid(), a.tanh(), F.silu(a)),
     lambda a: (a.sigmoid(), a.tanh(), a.silu()), {"low": -100, "high": 100}),
    ("unary_chain_17", [(17,)], lambda a: (a.sin() * a.exp()).tanh() - a.abs().sqrt(), None, {}),
    # -- maximum, minimum, clamp
    ("maximum_bcast", [A, V], torch.maximum, pg.maximum, {}),
    ("minimum_bcast", [A, COL], torch.minimum, lambda a, b: a.minimum(b), {}),
    # ties: torch.maximum/minimum split the gradient evenly between equal inputs
    ("maximum_ties", [A], lambda a: torch.maximum(a, a.clamp(-1, 1)), lambda a: pg.maximum(a, a.clamp(-1, 1)), {}),
    ("clamp", [A], lambda a: a.clamp(-0.5, 1.0), None, {}),
    ("clamp_min", [A], lambda a: a.clamp(min=0.3), None, {}),
    ("clamp_max", [B3], lambda a: a.clamp(max=-0.2), None, {}),
    # -- where
    ("where_bcast", [A, A, V], lambda c, x, y: torch.where(c > 0, x, y), lambda c, x, y: pg.where(c > 0, x, y), {}),
    ("where_bool_input", [A, COL, A], torch.where, pg.where, {"dtypes": ["bool", "float32", "float32"]}),
    ("where_scalar", [A], lambda a: torch.where(a > 0, a, 0.5), lambda a: pg.where(a > 0, a, 0.5), {}),
    ("where_two_scalars", [A], lambda a: torch.where(a > 0, 1.0, -2.0), lambda a: pg.where(a > 0, 1.0, -2.0), {}),
    # -- reductions
    ("sum_all", [B3], lambda a: a.sum(), None, {}),
    ("sum_dim", [A], lambda a: a.sum(dim=1), None, {}),
    ("sum_neg_keepdim", [B3], lambda a: a.sum(-1, keepdim=True), None, {}),
    ("sum_axes", [B3], lambda a: a.sum((0, 2)), None, {}),
    ("sum_axes_neg_keepdim", [B3], lambda a: a.sum((-1, -3), keepdim=True), None, {}),
    ("mean_all", [A], lambda a: a.mean(), None, {}),
    ("mean_dim", [B3], lambda a: a.mean(dim=0), None, {}),
    ("mean_axes_keepdim", [B3], lambda a: a.mean((-1, -2), keepdim=True), None, {}),
    ("max_all", [B3], lambda a: a.max(), None, {}),
    ("max_dim", [A], lambda a: a.amax(1), lambda a: a.max(1), {}),
    ("max_neg_keepdim", [B3], lambda a: a.amax(-2, keepdim=True), lambda a: a.max(-2, keepdim=True), {}),
    ("max_axes", [B3], lambda a: a.amax((0, 2)), lambda a: a.max((0, 2)), {}),
    ("min_all", [A], lambda a: a.min(), None, {}),
    ("min_dim", [B3], lambda a: a.amin(0), lambda a: a.min(0), {}),
    ("min_keepdim", [A], lambda a: a.amin(-1, keepdim=True), lambda a: a.min(-1, keepdim=True), {}),
    ("argmax_all", [B3], lambda a: a.argmax(), None, {}),
    ("argmax_dim", [A], lambda a: a.argmax(dim=1), None, {}),
    ("argmax_neg_keepdim", [B3], lambda a: a.argmax(dim=-2, keepdim=True), None, {}),
    ("argmax_dim0", [B3], lambda a: a.argmax(0), None, {}),
    ("var_all", [A], lambda a: a.var(), None, {}),
    ("var_dim", [B3], lambda a: a.var(dim=-1), None, {}),
    ("var_axes_keepdim", [B3], lambda a: a.var((0, 2), keepdim=True), None, {}),
    ("var_correction0", [A], lambda a: a.var(0, correction=0), None, {}),
    ("reduce_size1_axis", [(3, 1, 7)], lambda a: a.sum(1) + a.amax(1), lambda a: a.sum(1) + a.max(1), {}),
    ("sum_17", [(17, 3)], lambda a: a.sum(0), None, {}),
    # amax/amin spread the gradient evenly over tied maxima (clamp makes ties)
    ("max_min_ties", [A], lambda a: (a.clamp(-0.5, 0.5).amax(1), a.clamp(-0.5, 0.5).amin(1)),
     lambda a: (a.clamp(-0.5, 0.5).max(1), a.clamp(-0.5, 0.5).min(1)), {}),
    ("int_reductions", [A], lambda a: (a.sum(1), a.amax(0), a.amin(1), a.argmax(1)),
     lambda a: (a.sum(1), a.max(0), a.min(1), a.argmax(1)), {"dtypes": "int32", "low": -50, "high": 50}),
    # big enough for the threaded (OpenMP) paths
    ("large_reductions", [(300, 129)], lambda a: (a.sum(-1), a.amax(0), a.softmax(-1), a.var(0)),
     lambda a: (a.sum(-1), a.max(0), a.softmax(-1), a.var(0)), {"atol": 1e-4}),
    # -- movement
    ("reshape", [A], lambda a: a.reshape(7, 3), None, {}),
    ("reshape_infer", [B3], lambda a: a.reshape(-1, 7).exp(), None, {}),
    ("view", [B3], lambda a: a.view(6, 7), None, {}),
    ("permute", [B3], lambda a: a.permute(2, 0, 1), None, {}),
    ("permute_neg", [B3], lambda a: a.permute(-1, 0, -2), None, {}),
    ("transpose", [B3], lambda a: a.transpose(0, 2), None, {}),
    ("transpose_neg", [B3], lambda a: a.transpose(-1, -2), None, {}),
    ("T", [A], lambda a: a.T, None, {}),
    ("expand", [COL], lambda a: a.expand(3, 7), None, {}),
    ("expand_new_dims", [V], lambda a: a.expand(2, 3, -1), None, {}),
    ("squeeze_all", [(3, 1, 7)], lambda a: a.squeeze(), None, {}),
    ("squeeze_dim", [(1, 3, 1)], lambda a: a.squeeze(-1), None, {}),
    ("squeeze_dims", [(1, 3, 1)], lambda a: a.squeeze((0, 2)), None, {}),
    ("unsqueeze", [A], lambda a: a.unsqueeze(0) + a.unsqueeze(-1).sum(-1), None, {}),
    ("flatten", [B3], lambda a: a.flatten(), None, {}),
    ("flatten_range", [B3], lambda a: a.flatten(0, 1), None, {}),
    ("split_size", [A], lambda a: a.split(2, dim=1), None, {}),
    ("split_sizes", [B3], lambda a: a.split([3, 4], dim=-1), None, {}),
    ("chunk", [A], lambda a: a.chunk(3, dim=1), None, {}),
    ("chunk_dim0", [(7, 3)], lambda a: a.chunk(2), None, {}),
    ("chunk_uneven", [A], lambda a: a.chunk(4, 1), None, {}),
    ("split_then_cat", [A], lambda a: torch.cat(a.split(3, 1)[::-1], 1), lambda a: pg.cat(a.split(3, 1)[::-1], 1), {}),
    ("tril", [A], lambda a: a.tril(), None, {}),
    ("tril_neg", [B3], lambda a: a.tril(-1), None, {}),
    ("triu", [A], lambda a: a.triu(), None, {}),
    ("triu_pos", [B3], lambda a: a.triu(2), None, {}),
    ("pad_last", [A], lambda a: F.pad(a, (1, 2)), lambda a: a.pad((1, 2)), {}),
    ("pad_two_dims", [A], lambda a: F.pad(a, (1, 2, 0, 3)), lambda a: a.pad((1, 2, 0, 3)), {}),
    ("pad_negative", [A], lambda a: F.pad(a, (-1, 2, 1, -1)), lambda a: a.pad((-1, 2, 1, -1)), {}),
    ("pad_value", [B3], lambda a: F.pad(a, (0, 0, 1, 1, 2, 0), value=1.5),
     lambda a: a.pad((0, 0, 1, 1, 2, 0), value=1.5), {}),
    ("flip", [A], lambda a: a.flip((0,)), lambda a: a.flip(0), {}),
    ("flip_many", [B3], lambda a: a.flip((0, -1)), None, {}),
    # -- indexing with ints, slices, None, ...
    ("index_int", [A], lambda a: (a[1], a[-1], a[2, 3], a[:, -2]), None, {}),
    ("index_slices", [A], lambda a: (a[1:3], a[-2:], a[:, 2:5]), None, {}),
    ("index_steps", [(7, 17)], lambda a: (a[::2], a[1::3, 2:15:4], a[:, ::5]), None, {}),
    # regression: `...` followed by more indices used to raise IndexError
    ("index_none_ellipsis", [B3], lambda a: (a[None], a[:, None], a[..., 1], a[None, ..., None], a[1, ..., 2:5]),
     None, {}),
    # -- indexing with integer tensors
    ("index_tensor", [A, (4,)], lambda a, i: a[i], None, {"dtypes": ["float32", "int32"], "low": [-2, -3],
                                                            "high": [2, 3]}),
    ("index_tensor_2d", [(7, 3), (2, 5)], lambda a, i: a[i], None, {"dtypes": ["float32", "int32"], "low": [-2, -7],
                                                                     "high": [2, 7]}),
    ("index_tensor_dim1", [B3, (4,)], lambda a, i: a[:, i], None, {"dtypes": ["float32", "int32"], "low": [-2, 0],
                                                                    "high": [2, 3]}),
    ("index_two_tensors", [A, (5,), (5,)], lambda a, i, j: a[i, j], None,
     {"dtypes": ["float32", "int32", "int32"], "low": [-2, -3, -7], "high": [2, 3, 7]}),
    ("index_tensors_bcast", [A, (4, 1), (5,)], lambda a, i, j: a[i, j], None,
     {"dtypes": ["float32", "int32", "int32"], "low": [-2, 0, 0], "high": [2, 3, 7]}),
    ("index_tensors_apart", [B3, (4,), (4,)], lambda a, i, j: a[i, :, j], None,
     {"dtypes": ["float32", "int32", "int32"], "low": [-2, -2, -7], "high": [2, 2, 7]}),
    # gather along dim 1 (torch.gather / take_along_dim) written as indexing with a row arange and a column index
    ("gather_rows", [A, (3,)], lambda a, i: a.gather(1, i[:, None]).squeeze(1),
     lambda a, i: a[pg.arange(3, device=a.device), i],
     {"dtypes": ["float32", "int32"], "low": [-2, 0], "high": [2, 7]}),
    ("index_int_and_tensor", [B3, (5,)], lambda a, i: a[1, i], None, {"dtypes": ["float32", "int32"], "low": [-2, -3],
                                                                       "high": [2, 3]}),
    # -- cat, stack
    ("cat", [(2, 7), A], lambda a, b: torch.cat([a, b]), lambda a, b: pg.cat([a, b]), {}),
    ("cat_last_three", [COL, (3, 5), COL], lambda a, b, c: torch.cat([a, b, c], dim=-1),
     lambda a, b, c: pg.cat([a, b, c], dim=-1), {}),
    ("stack", [A, A], lambda a, b: torch.stack([a, b]), lambda a, b: pg.stack([a, b]), {}),
    ("stack_mid", [A, A], lambda a, b: torch.stack([a, b], 1), lambda a, b: pg.stack([a, b], 1), {}),
    ("stack_last", [A, A, A], lambda a, b, c: torch.stack([a, b, c], dim=-1), lambda a, b, c: pg.stack([a, b, c], -1),
     {}),
    # -- matmul
    ("matmul_1d_1d", [(17,), (17,)], lambda a, b: a @ b, None, {}),
    ("matmul_1d_2d", [(17,), (17, 7)], lambda a, b: a @ b, None, {}),
    ("matmul_2d_1d", [(3, 17), (17,)], lambda a, b: a @ b, None, {}),
    ("matmul_2d", [(3, 17), (17, 7)], lambda a, b: a @ b, None, {}),
    ("matmul_batched", [(2, 3, 17), (2, 17, 7)], lambda a, b: a @ b, None, {}),
    ("matmul_batched_bcast", [(2, 3, 17), (17, 7)], lambda a, b: a @ b, None, {}),
    ("matmul_bcast_both", [(2, 1, 3, 5), (3, 5, 7)], lambda a, b: a.matmul(b), None, {}),
    ("matmul_1x1", [(1, 1), (1, 1)], lambda a, b: a @ b, None, {}),
    # sizes past the tile and vector widths, with ragged edges, for the tiled matmul kernel
    ("matmul_tiled", [(65, 127), (127, 33)], lambda a, b: a @ b, None, {"atol": 1e-4}),
    ("matmul_tiled_transposed", [(129, 37), (50, 129)], lambda a, b: a.T @ b.T, None, {"atol": 1e-4}),
    ("matmul_tiled_batched", [(3, 33, 65), (65, 17)], lambda a, b: a @ b, None, {"atol": 1e-4}),
    ("linear_relu_epilogue", [(40, 96), (70, 96), (70,)], lambda x, w, b: F.linear(x, w, b).relu() * 2,
     lambda x, w, b: pg_linear(x, w, b).relu() * 2, {"atol": 1e-4}),
    # -- softmax family and losses
    ("softmax_last", [A], lambda a: a.softmax(-1), None, {"low": -5, "high": 5}),
    ("softmax_dim0", [A], lambda a: a.softmax(0), None, {"low": -5, "high": 5}),
    ("softmax_3d_mid", [B3], lambda a: a.softmax(dim=1), None, {"low": -5, "high": 5}),
    ("log_softmax_last", [B3], lambda a: a.log_softmax(-1), None, {"low": -5, "high": 5}),
    ("log_softmax_dim0", [A], lambda a: a.log_softmax(0), None, {"low": -5, "high": 5}),
    # large logits: only correct if the max is subtracted first
    ("softmax_large_logits", [A], lambda a: (a.softmax(-1), a.log_softmax(-1)), None, {"low": -100, "high": 100,
                                                                                       "atol": 1e-4}),
    ("softmax_with_neg_inf", [A], lambda a: torch.where(a > 0, a, float("-inf")).softmax(-1),
     lambda a: pg.where(a > 0, a, float("-inf")).softmax(-1), {"low": -1, "high": 3}),
    ("cross_entropy", [(5, 7), (5,)], lambda x, t: F.cross_entropy(x, t), pg.cross_entropy,
     {"dtypes": ["float32", "int32"], "low": [-3, 0], "high": [3, 7]}),
    ("cross_entropy_large_logits", [(5, 7), (5,)], lambda x, t: F.cross_entropy(x, t), pg.cross_entropy,
     {"dtypes": ["float32", "int32"], "low": [-100, 0], "high": [100, 7], "atol": 1e-4}),
    ("cross_entropy_3d", [B3, (2, 3)], lambda x, t: F.cross_entropy(x.reshape(-1, 7), t.reshape(-1)),
     pg.cross_entropy, {"dtypes": ["float32", "int32"], "low": [-3, 0], "high": [3, 7]}),
    ("sdpa_causal", [(2, 5, 8)] * 3, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda q, k, v: pg.scaled_dot_product_attention(q, k, v, is_causal=True), {}),
    ("sdpa_causal_short_q", [(2, 3, 8), (2, 5, 8), (2, 5, 8)],
     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda q, k, v: pg.scaled_dot_product_attention(q, k, v, is_causal=True), {}),
    ("sdpa_4d_scale", [(2, 3, 5, 8)] * 3, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3),
     lambda q, k, v: pg.scaled_dot_product_attention(q, k, v, scale=0.3), {}),
    ("sdpa_bool_mask", [(2, 5, 8)] * 3 + [(5, 5)],
     lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=attend_mask(m)),
     lambda q, k, v, m: pg.scaled_dot_product_attention(q, k, v, attn_mask=attend_mask(m)),
     {"dtypes": ["float32"] * 3 + ["bool"]}),
    ("sdpa_float_mask", [(2, 5, 8)] * 3 + [(5, 5)],
     lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
     lambda q, k, v, m: pg.scaled_dot_product_attention(q, k, v, attn_mask=m), {}),
    # -- nn layers (the weights are inputs, so their gradients are checked too)
    ("embedding", [(2, 3), (7, 5)], lambda i, w: F.embedding(i, w), pg_embedding,
     {"dtypes": ["int32", "float32"], "low": [0, -1], "high": [7, 1]}),
    ("embedding_repeated_ids", [(9,), (3, 5)], lambda i, w: F.embedding(i, w), pg_embedding,
     {"dtypes": ["int32", "float32"], "low": [0, -1], "high": [3, 1]}),
    ("linear", [(3, 5), (7, 5), (7,)], F.linear, pg_linear, {}),
    ("linear_no_bias_3d", [(2, 3, 5), (7, 5)], F.linear, pg_linear, {}),
    ("rmsnorm", [B3, V], lambda x, w: F.rms_norm(x, (7,), w, eps=1e-5), pg_rmsnorm, {}),
    # -- non-contiguous inputs: views fed into ops
    ("permuted_into_mul", [(7, 3), (3,)], lambda a, b: a.permute(1, 0) * b.unsqueeze(-1), None, {}),
    ("permuted_into_sum", [B3], lambda a: a.permute(2, 0, 1).sum(-1).exp(), None, {}),
    ("expanded_into_add_sum", [ROW, A], lambda a, b: (a.expand(3, 7) + b).sum(0), None, {}),
    ("sliced_into_matmul", [(7, 17), (8, 3)], lambda a, b: a[::2, 1:9] @ b, None, {}),
    ("flipped_into_softmax", [A], lambda a: a.flip((1,)).softmax(-1) * a, None, {}),
    ("padded_into_exp", [A], lambda a: F.pad(a, (1, 1, 2, 0)).exp() * 2, lambda a: a.pad((1, 1, 2, 0)).exp() * 2, {}),
    ("padded_into_matmul", [(3, 5), (7, 7)], lambda a, b: F.pad(a, (1, 1)) @ b, lambda a, b: a.pad((1, 1)) @ b, {}),
    ("reshape_of_views", [A], lambda a: (a.T.reshape(7, 3), a[:, 1:6:2].reshape(-1), a.flip((0,)).reshape(21),
                                          a.expand(2, 3, 7).reshape(6, 7)), None, {}),
    ("slice_of_padded", [A], lambda a: F.pad(a, (2, 2))[:, 1:-1:2], lambda a: a.pad((2, 2))[:, 1:-1:2], {}),
    ("transposed_matmul", [(17, 3), (17, 7)], lambda a, b: a.T @ b, None, {}),
    ("transposed_both_matmul", [(17, 3), (7, 17)], lambda a, b: a.T @ b.T, None, {}),
    ("sliced_into_max", [(7, 17)], lambda a: a[1::2, ::3].amax(-1), lambda a: a[1::2, ::3].max(-1), {}),
    ("expanded_into_var", [COL], lambda a: a.expand(3, 7).var(0), None, {}),
    # -- small multi-op graphs: fusion across ops with shared inputs
    ("shared_input_graph", [A, V], lambda a, b: ((a * b).relu() + (a - b).sigmoid()).sum(1) / a.abs().mean(), None,
     {}),
    ("size1_everything", [(1,), (1, 1)], lambda a, b: (a * b).exp().sum() + (a @ b).sum(), None, {}),
]

# Cases that fail because of known core bugs (name -> reason, see the QA report); empty when none are open.
# Mark them xfail(strict=True) only until the fix lands, so that a fix shows up as XPASS and the mark goes.
XFAIL = {}
OP_CASES = [pytest.param(shapes, tfn, pfn, opts, id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else [])
            for name, shapes, tfn, pfn, opts in CASES]


@pytest.mark.parametrize("shapes,torch_fn,pg_fn,opts", OP_CASES)
def test_op(shapes, torch_fn, pg_fn, opts, device, mode):
    check(shapes, torch_fn, pg_fn or torch_fn, device, **opts)


# Random chains of views and ops: the index arithmetic of composed views (permute, reshape, expand, pad with
# negative pads and a value, strided slices, flips) is where a lowering bug would hide. Seeds are fixed, so a
# failure names a reproducible chain; a longer run of this generator (1000 chains) passed when it was written.


def _random_chain(seed):
    rng = np.random.default_rng(seed)
    shape = [int(s) for s in rng.integers(1, 6, size=rng.integers(1, 5))]
    ops, cur = [], list(shape)
    for _ in range(int(rng.integers(2, 7))):
        kind = rng.choice(["permute", "reshape", "expand", "pad", "slice", "flip", "unary", "reduce"])
        nd = len(cur)
        if kind == "permute":
            order = [int(i) for i in rng.permutation(nd)]
            ops.append(("permute", order))
            cur = [cur[i] for i in order]
        elif kind == "reshape":
            total, factors = int(np.prod(cur)), []
            while total > 1 and len(factors) < 3:
                d = int(rng.choice([x for x in range(1, total + 1) if total % x == 0]))
                factors.append(d)
                total //= d
            factors.append(total)
            ops.append(("reshape", factors))
            cur = list(factors)
        elif kind == "expand":
            cur = [3 if s == 1 and rng.random() < 0.7 else s for s in cur]
            ops.append(("expand", list(cur)))
        elif kind == "pad":
            pads = []
            for d in reversed(range(nd)):
                lo, hi = int(rng.integers(-1, 3)), int(rng.integers(-1, 3))
                if cur[d] + min(lo, 0) + min(hi, 0) < 1:
                    lo, hi = max(lo, 0), max(hi, 0)
                pads += [lo, hi]
                cur[d] += lo + hi
            ops.append(("pad", pads, float(rng.choice([0.0, 1.5]))))
        elif kind == "slice":
            d = int(rng.integers(nd))
            start, step = int(rng.integers(cur[d])), int(rng.integers(1, 4))
            ops.append(("slice", d, start, step))
            cur[d] = len(range(start, cur[d], step))
        elif kind == "flip":
            ops.append(("flip", int(rng.integers(nd))))
        elif kind == "unary":
            ops.append(("unary", str(rng.choice(["tanh", "sin", "square"]))))
        elif kind == "reduce" and nd > 1:
            d = int(rng.integers(nd))
            ops.append(("reduce", d, str(rng.choice(["sum", "max"]))))
            cur.pop(d)
    return tuple(shape), ops


def _apply_chain(x, ops):
    is_torch = isinstance(x, torch.Tensor)
    for op in ops:
        if op[0] == "permute":
            x = x.permute(*op[1])
        elif op[0] == "reshape":
            x = x.reshape(*op[1])
        elif op[0] == "expand":
            x = x.expand(*op[1])
        elif op[0] == "pad":
            x = F.pad(x, tuple(op[1]), value=op[2]) if is_torch else x.pad(tuple(op[1]), value=op[2])
        elif op[0] == "slice":
            index = [slice(None)] * x.ndim
            index[op[1]] = slice(op[2], None, op[3])
            x = x[tuple(index)]
        elif op[0] == "flip":
            x = x.flip((op[1],))
        elif op[0] == "unary":
            x = x * x if op[1] == "square" else getattr(x, op[1])()
        elif op[0] == "reduce":
            x = x.sum(op[1]) if op[2] == "sum" else (x.amax(op[1]) if is_torch else x.max(op[1]))
    return x


@pytest.mark.parametrize("seed", range(10))
def test_random_view_chain(seed, device, mode):
    shape, ops = _random_chain(seed)
    check([shape], lambda x: _apply_chain(x, ops), lambda x: _apply_chain(x, ops), device, atol=1e-4)


def test_op_table_covers_public_api():
    # the table above must keep at least 80 cases; this guards against accidentally dropping a block of them
    assert len(CASES) >= 80
    assert len({name for name, *_ in CASES}) == len(CASES), "duplicate case names"


# ----------------------------------------------------------------------------------------------------------------------
# Fusion: kernel counts


def _launches(fn, eager=False):
    """Kernels launched by fn, in the given mode (explicit, so EAGER=1 in the environment cannot skew a count)."""
    with pg.eager(eager):
        before = kernels_launched()
        fn()
        return kernels_launched() - before


def _realized(*shapes, device="CPU"):
    return [pg.Tensor(RNG.standard_normal(s).astype(np.float32), device=device) for s in shapes]


def test_kernels_elementwise_chain_fuses(device):
    a, b, c = _realized((16, 32), (16, 32), (32,), device=device)
    assert _launches(lambda: (a * b + c).relu().realize()) == 1


def test_kernels_softmax(device):
    (x,) = _realized((16, 33), device=device)
    assert _launches(lambda: x.softmax(-1).realize()) <= 3


def test_kernels_mse(device):
    a, b = _realized((16, 32), (16, 32), device=device)
    assert _launches(lambda: ((a - b) ** 2).mean().realize()) in (1, 2)


def test_kernels_eager_one_per_op(device):
    a, b, c = _realized((16, 32), (16, 32), (32,), device=device)
    assert _launches(lambda: (a * b + c).relu(), eager=True) == 3


# ----------------------------------------------------------------------------------------------------------------------
# Eager and graph mode give the same numbers


def _small_step(device, data):
    x, w, b = (pg.Tensor(a, device=device, requires_grad=i > 0) for i, a in enumerate(data))
    h = (x @ w + b).tanh()
    loss = (h.softmax(-1) * h.exp()).sum(-1).log().mean() + (w * w).sum() * 0.01
    loss.backward()
    return loss.item(), w.grad.numpy(), b.grad.numpy()


def test_eager_matches_graph(device):
    data = [RNG.standard_normal(s).astype(np.float32) for s in ((4, 5), (5, 3), (3,))]
    with pg.eager(False):
        graph = _small_step(device, data)
    with pg.eager(True):
        eager = _small_step(device, data)
    for g, e in zip(graph, eager):
        np.testing.assert_allclose(e, g, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Training against torch, step by step


def _to_torch_param(t):
    return torch.nn.Parameter(torch.from_numpy(t.numpy().copy()))


def _train_and_compare(pg_params, t_params, pg_loss_fn, t_loss_fn, batches, make_opt, make_torch_opt):
    opt, t_opt = make_opt(pg_params), make_torch_opt(t_params)
    for step, batch in enumerate(batches):
        opt.zero_grad()
        loss = pg_loss_fn(*batch)
        loss.backward()
        opt.step()
        t_opt.zero_grad()
        t_loss = t_loss_fn(*batch)
        t_loss.backward()
        t_opt.step()
        got, expected = loss.item(), t_loss.item()
        assert abs(got - expected) <= 1e-4 * abs(expected), f"step {step}: loss {got}, torch {expected}"
    for p, t in zip(pg_params, t_params):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-3, atol=1e-5)


def _adamw(params):
    return pg.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _torch_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def test_mlp_adamw_matches_torch(device, mode):
    pg.manual_seed(1)
    l1, l2 = pg.Linear(8, 16, device=device), pg.Linear(16, 4, device=device)
    params = [l1.weight, l1.bias, l2.weight, l2.bias]
    t_params = [_to_torch_param(p) for p in params]
    batches = [(RNG.standard_normal((6, 8)).astype(np.float32), RNG.integers(0, 4, 6).astype(np.int32))
               for _ in range(20)]

    def pg_loss(x, y):
        logits = l2(l1(pg.Tensor(x, device=device)).relu())
        return pg.cross_entropy(logits, pg.Tensor(y, device=device))

    def t_loss(x, y):
        w1, b1, w2, b2 = t_params
        logits = F.linear(F.linear(torch.from_numpy(x), w1, b1).relu(), w2, b2)
        return F.cross_entropy(logits, torch.from_numpy(y).long())

    _train_and_compare(params, t_params, pg_loss, t_loss, batches, _adamw, _torch_adamw)


def test_attention_adamw_matches_torch(device):
    # graph mode only: eager AdamW is covered by the MLP, and eager attention costs ~100 more cold kernel builds
    pg.manual_seed(2)
    dim, seq = 8, 5
    # the key projection has no bias: q . b_k is the same for every key, so softmax ignores it, its gradient is
    # rounding noise, and Adam's normalisation would blow that noise up into steps torch does not take
    layers = [pg.Linear(dim, dim, bias=i != 1, device=device) for i in range(4)]   # q, k, v, o
    params = [t for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    t_params = [_to_torch_param(p) for p in params]
    mask = np.tril(np.ones((seq, seq), dtype=bool))
    batches = [(RNG.standard_normal((2, seq, dim)).astype(np.float32),
                RNG.standard_normal((2, seq, dim)).astype(np.float32)) for _ in range(20)]

    def pg_loss(x, y):
        x = pg.Tensor(x, device=device)
        q, k, v = (layer(x) for layer in layers[:3])
        scores = pg.where(pg.Tensor(mask, device=device), q @ k.transpose(-2, -1) / math.sqrt(dim), float("-inf"))
        out = layers[3](scores.softmax(-1) @ v)
        return ((out - pg.Tensor(y, device=device)) ** 2).mean()

    def t_loss(x, y):
        wq, bq, wk, wv, bv, wo, bo = t_params
        x = torch.from_numpy(x)
        q, k, v = F.linear(x, wq, bq), F.linear(x, wk), F.linear(x, wv, bv)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(dim)).masked_fill(~torch.from_numpy(mask), float("-inf"))
        out = F.linear(scores.softmax(-1) @ v, wo, bo)
        return ((out - torch.from_numpy(y)) ** 2).mean()

    _train_and_compare(params, t_params, pg_loss, t_loss, batches, _adamw, _torch_adamw)


def _sgd_against_torch(device, nesterov):
    pg.manual_seed(3)
    layer = pg.Linear(5, 3, device=device)
    params = [layer.weight, layer.bias]
    t_params = [_to_torch_param(p) for p in params]
    batches = [(RNG.standard_normal((4, 5)).astype(np.float32), RNG.standard_normal((4, 3)).astype(np.float32))
               for _ in range(5)]

    def pg_loss(x, y):
        return ((layer(pg.Tensor(x, device=device)) - pg.Tensor(y, device=device)) ** 2).mean()

    def t_loss(x, y):
        return ((F.linear(torch.from_numpy(x), *t_params) - torch.from_numpy(y)) ** 2).mean()

    _train_and_compare(params, t_params, pg_loss, t_loss, batches,
                       lambda ps: pg.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov),
                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov))


def test_sgd_momentum_matches_torch(device, mode):
    _sgd_against_torch(device, nesterov=False)


def test_sgd_nesterov_matches_torch(device):
    _sgd_against_torch(device, nesterov=True)


def _regression_setup(seed, device):
    pg.manual_seed(seed)
    layer = pg.Linear(5, 3, device=device)
    batches = [(RNG.standard_normal((4, 5)).astype(np.float32), RNG.standard_normal((4, 3)).astype(np.float32))
               for _ in range(8)]
    return layer, batches


def _mse(layer, x, y):
    return ((layer(x) - y) ** 2).mean()


def test_compiled_step_and_lr_change_match_torch(device):
    """@pg.compile replays a whole AdamW step; a learning-rate change between replays must take effect."""
    layer, batches = _regression_setup(7, device)
    t_params = [_to_torch_param(layer.weight), _to_torch_param(layer.bias)]
    opt, t_opt = _adamw([layer.weight, layer.bias]), _torch_adamw(t_params)

    @pg.compile
    def step(x, y):
        opt.zero_grad()
        loss = _mse(layer, x, y)
        loss.backward()
        opt.step()
        return loss

    for i, (x, y) in enumerate(batches):
        if i == 4:
            opt.lr = 3e-3
            t_opt.param_groups[0]["lr"] = 3e-3
        got = step(pg.Tensor(x, device=device), pg.Tensor(y, device=device)).item()
        t_opt.zero_grad()
        t_loss = ((F.linear(torch.from_numpy(x), *t_params) - torch.from_numpy(y)) ** 2).mean()
        t_loss.backward()
        t_opt.step()
        assert abs(got - t_loss.item()) <= 1e-4 * abs(t_loss.item()), f"step {i}: {got} vs torch {t_loss.item()}"
    assert pg.stats()["replays"] > 0


def test_adamw_state_dict_resume(device, mode):
    """Stopping after 4 steps and resuming from (weights, optimizer state) continues exactly as an unbroken run."""
    layer, batches = _regression_setup(8, device)
    start = [layer.weight.numpy().copy(), layer.bias.numpy().copy()]
    opt = _adamw([layer.weight, layer.bias])
    unbroken = []
    for x, y in batches:
        opt.zero_grad()
        loss = _mse(layer, pg.Tensor(x, device=device), pg.Tensor(y, device=device))
        loss.backward()
        opt.step()
        unbroken.append(loss.item())

    pg.manual_seed(9)
    layer = pg.Linear(5, 3, device=device)
    layer.load_state_dict({"weight": start[0], "bias": start[1]})
    opt = _adamw([layer.weight, layer.bias])
    resumed = []
    for i, (x, y) in enumerate(batches):
        if i == 4:
            weights, state = layer.state_dict(), opt.state_dict()
            pg.manual_seed(10)
            layer = pg.Linear(5, 3, device=device)
            layer.load_state_dict(weights)
            opt = pg.AdamW([layer.weight, layer.bias], lr=0.5, betas=(0.9, 0.99), weight_decay=0.1)   # lr: from state
            opt.load_state_dict(state)
        opt.zero_grad()
        loss = _mse(layer, pg.Tensor(x, device=device), pg.Tensor(y, device=device))
        loss.backward()
        opt.step()
        resumed.append(loss.item())
    np.testing.assert_allclose(resumed, unbroken, rtol=1e-6)


def test_clip_grad_norm_matches_torch(device, mode):
    layer, batches = _regression_setup(11, device)
    t_params = [_to_torch_param(layer.weight), _to_torch_param(layer.bias)]
    x, y = batches[0]
    _mse(layer, pg.Tensor(x, device=device), pg.Tensor(y, device=device)).backward()
    ((F.linear(torch.from_numpy(x), *t_params) - torch.from_numpy(y)) ** 2).mean().backward()
    norm = pg.clip_grad_norm_([layer.weight, layer.bias], 0.1)
    t_norm = torch.nn.utils.clip_grad_norm_(t_params, 0.1)
    np.testing.assert_allclose(norm.item(), t_norm.item(), rtol=1e-5)
    for p, t in zip([layer.weight, layer.bias], t_params):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# state_dict and safetensors


class TinyNet(pg.Module):
    def __init__(self, device):
        self.embed = pg.Embedding(11, 6, device=device)
        self.norm = pg.RMSNorm(6, device=device)
        self.layers = [pg.Linear(6, 6, device=device), pg.Linear(6, 3, bias=False, device=device)]

    def forward(self, ids):
        x = self.norm(self.embed(ids))
        return self.layers[1](self.layers[0](x).relu())


def test_state_dict_round_trip(device, tmp_path):
    pg.manual_seed(4)
    net = TinyNet(device)
    state = net.state_dict()
    assert sorted(state) == ["embed.weight", "layers.0.bias", "layers.0.weight", "layers.1.weight", "norm.weight"]
    path = tmp_path / "net.safetensors"
    pg.save_safetensors(state, path)

    # the safetensors package reads back exactly what we wrote
    read = st_load_file(str(path))
    assert sorted(read) == sorted(state)
    for name, t in state.items():
        assert read[name].dtype == np.float32
        np.testing.assert_array_equal(read[name], t.numpy())

    pg.manual_seed(5)
    other = TinyNet(device)
    ids = pg.Tensor(RNG.integers(0, 11, (2, 4)).astype(np.int32), device=device)
    assert not np.array_equal(other(ids).numpy(), net(ids).numpy())
    other.load_state_dict(pg.load_safetensors(path, device=device))
    np.testing.assert_array_equal(other(ids).numpy(), net(ids).numpy())

    # load_state_dict names what is wrong
    with pytest.raises(KeyError, match="norm.weight"):
        other.load_state_dict({k: v for k, v in state.items() if k != "norm.weight"})
    bad = dict(state, **{"norm.weight": pg.zeros(7, device=device)})
    with pytest.raises(ValueError, match="norm.weight"):
        other.load_state_dict(bad)


def test_safetensors_mixed_dtypes_both_ways(device, tmp_path):
    arrays = {"f": RNG.standard_normal((3, 4)).astype(np.float32), "i": RNG.integers(-9, 9, (5,)).astype(np.int32),
              "b": RNG.random((2, 2)) < 0.5, "empty": np.zeros((0, 3), dtype=np.float32)}
    ours = tmp_path / "ours.safetensors"
    pg.save_safetensors({k: pg.Tensor(v, device=device) for k, v in arrays.items()}, ours)
    read = st_load_file(str(ours))
    for k, v in arrays.items():
        assert read[k].dtype == v.dtype and read[k].shape == v.shape, k
        np.testing.assert_array_equal(read[k], v)

    theirs = tmp_path / "theirs.safetensors"
    st_save_file(dict(arrays, half=arrays["f"].astype(np.float16)), str(theirs))
    loaded = pg.load_safetensors(theirs, device=device)
    for k, v in arrays.items():
        assert loaded[k].shape == v.shape, k
        np.testing.assert_array_equal(loaded[k].numpy(), v)
    np.testing.assert_array_equal(loaded["half"].numpy(), arrays["f"].astype(np.float16).astype(np.float32))


def test_safetensors_0d_round_trip(tmp_path):
    # regression: np.ascontiguousarray in the save and load paths turned 0-d arrays into shape (1,)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    pg.save_safetensors({"s": pg.Tensor(np.array(2.5, dtype=np.float32))}, ours)
    assert st_load_file(str(ours))["s"].shape == ()
    st_save_file({"s": np.array(2.5, dtype=np.float32)}, str(theirs))
    assert pg.load_safetensors(theirs)["s"].shape == ()


def test_tensor_from_scalar_is_0d(device):
    assert pg.Tensor(2.5, device=device).shape == ()
    assert pg.Tensor(np.float32(2.5), device=device).shape == ()
    assert pg.Tensor(np.array(3, dtype=np.int32), device=device).shape == ()


def _st_bytes(header, data=b"", header_len=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


GOOD_HEADER = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
BAD_SAFETENSORS = {
    "truncated_data": _st_bytes(GOOD_HEADER, b"\0" * 10),
    "header_past_end": _st_bytes(GOOD_HEADER, b"\0" * 16, header_len=4000),
    "huge_header_length": _st_bytes(GOOD_HEADER, b"\0" * 16, header_len=2 ** 63 + 5),
    "shorter_than_length_field": b"\x10\0\0",
    "overlapping": _st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "negative_offsets": _st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, b"\0" * 16),
    "offsets_beyond_data": _st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16),
    "size_disagrees_with_shape": _st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
    "garbage_json": _st_bytes(b"{not json at all", b"\0" * 16),
    "header_not_object": _st_bytes(b"[1, 2, 3]", b""),
    "unknown_dtype": _st_bytes({"a": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "negative_shape": _st_bytes({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
}


@pytest.mark.parametrize("name", sorted(BAD_SAFETENSORS))
def test_bad_safetensors_raise_value_error(name, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(BAD_SAFETENSORS[name])
    with pytest.raises(ValueError):
        pg.load_safetensors(path)


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors for bad input


def _shapes_in(message, *shapes):
    return all(str(tuple(s)) in message for s in shapes)


# different ranks: the message must show the (5, 4) the user passed, not the (1, 5, 4) broadcasting pads it to
@pytest.mark.parametrize("sa,sb", [((3, 4), (5, 4)), ((2, 3, 4), (5, 4))])
def test_broadcast_mismatch_names_shapes(device, mode, sa, sb):
    a, b = pg.zeros(sa, device=device), pg.zeros(sb, device=device)
    for op in (lambda: a + b, lambda: a * b, lambda: pg.where(a > 0, a, b), lambda: a.maximum(b)):
        with pytest.raises(ValueError) as err:
            op()
        assert _shapes_in(str(err.value), sa, sb), str(err.value)


def test_matmul_mismatch_names_shapes(device, mode):
    with pytest.raises(ValueError) as err:
        pg.zeros(3, 4, device=device) @ pg.zeros(5, 6, device=device)
    assert _shapes_in(str(err.value), (3, 4), (5, 6)), str(err.value)


def test_cat_mismatch_names_shapes(device, mode):
    with pytest.raises(ValueError) as err:
        pg.cat([pg.zeros(2, 3, device=device), pg.zeros(2, 4, device=device)])
    assert _shapes_in(str(err.value), (2, 3), (2, 4)), str(err.value)


def test_reshape_mismatch_names_shapes(device, mode):
    with pytest.raises(ValueError) as err:
        pg.zeros(3, 4, device=device).reshape(5, 2)
    assert _shapes_in(str(err.value), (3, 4), (5, 2)), str(err.value)


def test_int_index_out_of_range(device, mode):
    a = pg.zeros(3, 4, device=device)
    for index in (3, -4, (0, 4), (slice(None), -5)):
        with pytest.raises(IndexError):
            a[index]


@pytest.mark.parametrize("bad", [3, -4, 100])
def test_tensor_index_out_of_range(device, mode, bad):
    a = pg.Tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device=device)
    with pytest.raises(IndexError):
        a[pg.Tensor(np.array([0, bad], dtype=np.int32), device=device)].numpy()
    # the device is usable again afterwards: a stale error flag must not leak into the next computation
    np.testing.assert_array_equal(a[pg.Tensor(np.array([2, -1], dtype=np.int32), device=device)].numpy(),
                                  np.arange(12).reshape(3, 4)[[2, -1]])


def test_embedding_id_out_of_range(device, mode):
    pg.manual_seed(6)
    emb = pg.Embedding(5, 3, device=device)
    with pytest.raises(IndexError):
        emb(pg.Tensor(np.array([[1, 5]], dtype=np.int32), device=device)).numpy()
    # backward through the out-of-range lookup must fail too, not scatter into a wrong row silently (fresh ids:
    # reusing the tensor above would meet the stale-result bug that test_index_error_not_cached checks)
    with pytest.raises(IndexError):
        emb(pg.Tensor(np.array([[7, 2]], dtype=np.int32), device=device)).sum().backward()
        emb.weight.grad.numpy()
    emb.weight.grad = None
    ok = emb(pg.Tensor(np.array([[1, 4]], dtype=np.int32), device=device))
    np.testing.assert_array_equal(ok.numpy()[0], emb.weight.numpy()[[1, 4]])


def test_index_error_not_cached(device, mode):
    # a kernel whose bounds check failed must not leave its output marked realized: the same (hash-consed)
    # expression would then return clamped, wrong values without an error
    a = pg.Tensor(np.arange(4, dtype=np.float32), device=device, requires_grad=True)
    bad = pg.Tensor(np.array([5], dtype=np.int32), device=device)
    with pytest.raises(IndexError):
        a[bad].numpy()
    with pytest.raises(IndexError):
        a[bad].numpy()
    with pytest.raises(IndexError):
        a[bad].sum().backward()
        a.grad.numpy()


# size-0 dimensions: run in a subprocess, because a kernel with `x % 0` in its index math can kill the process
EMPTY_DIMS_SCRIPT = """
import json, numpy as np, picograd as pg
out = {}
piece = np.arange(21, dtype=np.float32).reshape(3, 7)
out["cat"] = pg.cat([pg.Tensor(np.zeros((0, 7), np.float32)), pg.Tensor(piece)]).numpy().tolist()
out["sum"] = pg.Tensor(np.ones((0, 3), np.float32)).sum(0).numpy().tolist()
a = pg.Tensor(np.ones((7, 17), np.float32), requires_grad=True)
(a[-5:-1, 3:3] * pg.Tensor(np.ones((4, 0), np.float32))).sum().backward()
out["grad"] = a.grad.numpy().tolist()
print(json.dumps(out))
"""


def test_size0_dimensions(tmp_path):
    # regression: index lowering once divided by a size-0 dimension (cat with an empty piece raised
    # ZeroDivisionError; the backward of an empty slice rendered `t % 0`, which gcc turns into a trap)
    out = _run_script(EMPTY_DIMS_SCRIPT, {"PICOGRAD_CACHE": os.environ.get("PICOGRAD_CACHE", str(tmp_path))})
    assert out["cat"] == np.arange(21).reshape(3, 7).tolist()
    assert out["sum"] == [0.0, 0.0, 0.0]
    assert out["grad"] == np.zeros((7, 17)).tolist()


def test_long_graphs(device):
    # regression: the scheduler and lowering once recursed per node, so ~200 chained ops (or pg.cat of 400
    # pieces, or clip_grad_norm_ over 400 parameters) raised RecursionError
    pieces = [pg.Tensor(np.full((2,), i, np.float32), device=device) for i in range(400)]
    np.testing.assert_array_equal(pg.cat(pieces).numpy(), np.repeat(np.arange(400, dtype=np.float32), 2))
    x = pg.Tensor(np.ones(3, np.float32), device=device)
    y = x
    for _ in range(500):
        y = y * 1.001 + 0.001
    expected = np.ones(3, np.float32)
    for _ in range(500):
        expected = expected * np.float32(1.001) + np.float32(0.001)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5)


def test_unknown_device():
    with pytest.raises(ValueError, match="TPU"):
        pg.Tensor([1.0, 2.0], device="TPU")
    with pytest.raises(ValueError, match="TPU"):
        pg.zeros(3, device="TPU")


@pytest.mark.parametrize("dtype", ["float128x", "complex64", np.complex64, object])
def test_unknown_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        pg.Tensor([1.0, 2.0], dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        pg.zeros(3, dtype=dtype)


def _run_script(script, env_extra):
    env = dict(os.environ, **env_extra)
    env.pop("DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


NO_CC_SCRIPT = """
import json, numpy as np, picograd as pg
try:
    value = (pg.Tensor(np.ones(3, dtype=np.float32)) * 3 + 1).numpy().tolist()
    print(json.dumps({"error": None, "value": value}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def test_missing_c_compiler(tmp_path):
    out = _run_script(NO_CC_SCRIPT, {"CC": "/nonexistent/gcc", "PICOGRAD_CACHE": str(tmp_path / "cache")})
    assert out["error"] == "RuntimeError", out
    assert "CC" in out["message"], out


# ----------------------------------------------------------------------------------------------------------------------
# The on-disk kernel cache

CACHE_SCRIPT = """
import json, numpy as np, picograd as pg
x = pg.Tensor(np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6))
y = ((x * 1.25 + 0.5).exp() - x.sin()).softmax(-1).sum(0).numpy()
print(json.dumps({"stats": pg.stats(), "value": y.tolist()}))
"""


def _cache_expected():
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    return torch.from_numpy(np.exp(x * 1.25 + 0.5) - np.sin(x)).softmax(-1).sum(0).numpy()


def _cache_files(cache):
    return [os.path.join(root, f) for root, _, files in os.walk(cache) for f in files if not f.startswith(".tmp")]


UNWRITABLE_CACHE_SCRIPT = """
import json, warnings, numpy as np, picograd as pg
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    value = (pg.Tensor(np.ones(3, dtype=np.float32)) * 3 + 1).numpy().tolist()
print(json.dumps({"value": value, "warnings": [str(w.message) for w in caught]}))
"""


def test_kernel_cache_unwritable_falls_back(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    out = _run_script(UNWRITABLE_CACHE_SCRIPT, {"PICOGRAD_CACHE": str(blocker / "cache")})
    assert out["value"] == [4.0, 4.0, 4.0]
    assert any("cache" in w for w in out["warnings"]), out


def test_kernel_cache_reused_by_second_process(tmp_path):
    env = {"PICOGRAD_CACHE": str(tmp_path / "cache")}
    first = _run_script(CACHE_SCRIPT, env)
    assert first["stats"]["kernels_compiled"] > 0
    assert first["stats"]["kernels_from_disk"] == 0
    assert _cache_files(tmp_path / "cache"), "nothing was written to the cache"
    second = _run_script(CACHE_SCRIPT, env)
    # every kernel the second process needs comes from disk, none from gcc
    assert second["stats"]["kernels_from_disk"] == second["stats"]["kernels_compiled"] > 0
    np.testing.assert_allclose(first["value"], _cache_expected(), rtol=1e-5)
    np.testing.assert_allclose(second["value"], first["value"], rtol=0, atol=0)


def test_kernel_cache_corrupt_entry_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    env = {"PICOGRAD_CACHE": str(cache)}
    first = _run_script(CACHE_SCRIPT, env)
    files = _cache_files(cache)
    assert files
    # each kind of damage on some entry (at least three entries: the script needs several kernels)
    assert len(files) >= 3
    for k, path in enumerate(sorted(files)):
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            if k % 3 == 0:
                f.write(os.urandom(len(blob)))      # garbage of the right length
            elif k % 3 == 1:
                f.write(blob[:len(blob) // 2])      # truncated
            # k % 3 == 2: left empty
    rebuilt = _run_script(CACHE_SCRIPT, env)
    assert rebuilt["stats"]["kernels_from_disk"] == 0, "a damaged cache entry was loaded"
    np.testing.assert_allclose(rebuilt["value"], first["value"], rtol=0, atol=0)
    # the rebuilt entries are good again
    third = _run_script(CACHE_SCRIPT, env)
    assert third["stats"]["kernels_from_disk"] == third["stats"]["kernels_compiled"] > 0
    np.testing.assert_allclose(third["value"], first["value"], rtol=0, atol=0)
