"""The compiler fuzzed against torch: random graphs of picograd ops (random shapes with size-1 and odd sizes,
views, broadcasts, reductions, chains long enough to fuse) computed by both, forward and backward compared.

Seeded and bounded: FUZZ_EXAMPLES (default 40) graphs in the normal suite, the same ones every run; `make fuzz`
runs thousands more from FUZZ_SEED. A failure prints the program; each one found becomes a regression case in
REGRESSIONS below.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings, strategies as st

import picograd as pg

SIZES = [1, 2, 3, 5, 7, 8, 16, 17]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


# Each op: (name, number of inputs, applies(shapes) -> bool, torch function, picograd function). Both functions
# get the same arguments, so one description serves both libraries; `rng` draws the op's own parameters (axes,
# pads) once and both libraries use the same draw.
def _positive(x):
    return x.abs() + 0.5


UNARY = {
    "exp": lambda x: x.clamp(-5, 5).exp(),
    "log": lambda x: _positive(x).log(),
    "sqrt": lambda x: _positive(x).sqrt(),
    "sin": lambda x: x.sin(),
    "cos": lambda x: x.cos(),
    "tanh": lambda x: x.tanh(),
    "sigmoid": lambda x: x.sigmoid(),
    "relu": lambda x: x.relu(),
    "neg": lambda x: -x,
    "abs": lambda x: x.abs(),
    "recip": lambda x: 1 / _positive(x),
    "square": lambda x: x * x,
    "silu": lambda x: x * x.sigmoid(),
    "scale": lambda x: x * 0.37 + 0.1,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / _positive(b),
    "maximum": lambda a, b: a.maximum(b),
    "minimum": lambda a, b: a.minimum(b),
    "where": lambda a, b: (a > b).float() * a + (a <= b).float() * b * 0.5,
}


def _broadcastable(a, b):
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def _apply(kind, lib, xs, params):
    """One op of the random program on torch or picograd tensors (lib is `torch` or `pg`)."""
    x = xs[0]
    if kind in UNARY:
        return UNARY[kind](x)
    if kind in BINARY:
        return BINARY[kind](x, xs[1])
    if kind == "permute":
        return x.permute(*params)
    if kind == "reshape":
        return x.reshape(*params)
    if kind == "expand":
        return x.expand(*params)
    if kind == "flip":
        return x.flip(params)
    if kind == "pad":
        if lib is torch:
            return torch.nn.functional.pad(x, params)
        return x.pad(params)
    if kind == "slice":
        return x[tuple(slice(lo, hi, step) for lo, hi, step in params)]
    if kind == "sum":
        dims, keep = params
        return x.sum(dims, keepdim=keep)
    if kind == "mean":
        dims, keep = params
        return x.mean(dims, keepdim=keep)
    if kind == "max":
        dim, keep = params
        return x.amax(dim, keepdim=keep) if lib is torch else x.max(dim, keepdim=keep)
    if kind == "softmax":
        return x.softmax(params)
    if kind == "matmul":
        return x @ xs[1]
    if kind == "cat":
        return lib.cat([x, xs[1]], params)
    if kind == "gather":
        dim, index = params
        idx = torch.tensor(index, dtype=torch.long) if lib is torch else pg.Tensor(index)
        return x[(slice(None),) * dim + (idx,)]
    raise ValueError(kind)


@st.composite
def programs(draw):
    """A random program: input shapes and a list of (op, operand indices, parameters)."""
    n_inputs = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=4))) for _ in range(n_inputs)]
    values = list(shapes)   # shapes of every value so far (inputs first)
    steps = []
    for _ in range(draw(st.integers(2, 10))):
        i = draw(st.integers(0, len(values) - 1))
        shape = values[i]
        ndim = len(shape)
        kind = draw(st.sampled_from(sorted(UNARY) + sorted(BINARY) + [
            "permute", "reshape", "expand", "flip", "pad", "slice", "sum", "mean", "max", "softmax", "matmul",
            "cat", "gather"]))
        operands, params, out = [i], None, shape
        if kind in UNARY:
            pass
        elif kind in BINARY or kind == "cat":
            partners = [j for j, s in enumerate(values) if (_broadcastable(s, shape) and kind in BINARY) or
                        (kind == "cat" and len(s) == ndim)]
            j = draw(st.sampled_from(partners))
            if kind == "cat":
                dim = draw(st.integers(0, ndim - 1))
                if any(a != b for d, (a, b) in enumerate(zip(shape, values[j])) if d != dim):
                    continue
                params, out = dim, tuple(a + b if d == dim else a for d, (a, b) in enumerate(zip(shape, values[j])))
            else:
                n = max(len(shape), len(values[j]))
                pa, pb = (1,) * (n - len(shape)) + shape, (1,) * (n - len(values[j])) + values[j]
                out = tuple(max(a, b) for a, b in zip(pa, pb))
            operands = [i, j]
        elif kind == "permute":
            params = tuple(draw(st.permutations(range(ndim))))
            out = tuple(shape[p] for p in params)
        elif kind == "reshape":
            total = int(np.prod(shape))
            factors = [f for f in range(1, total + 1) if total % f == 0]
            first = draw(st.sampled_from(factors))
            params = (first, total // first) if draw(st.booleans()) else (total,)
            out = params
        elif kind == "expand":
            ones = [d for d, s in enumerate(shape) if s == 1]
            if not ones:
                continue
            params = tuple(draw(st.sampled_from([2, 3, 5])) if d in ones else s for d, s in enumerate(shape))
            out = params
        elif kind == "flip":
            params = tuple(sorted(set(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim)))))
        elif kind == "pad":
            k = draw(st.integers(1, ndim))
            params = tuple(draw(st.integers(-1 if shape[ndim - 1 - p // 2] > 2 else 0, 2)) for p in range(2 * k))
            out = list(shape)
            for p in range(k):
                out[ndim - 1 - p] += params[2 * p] + params[2 * p + 1]
            out = tuple(out)
        elif kind == "slice":
            params = []
            for s in shape:
                lo = draw(st.integers(0, s - 1))
                hi = draw(st.integers(lo + 1, s))
                step = draw(st.sampled_from([1, 1, 2, 3]))
                params.append((lo, hi, step))
            out = tuple(len(range(lo, hi, step)) for lo, hi, step in params)
        elif kind in ("sum", "mean"):
            dims = tuple(sorted(set(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim)))))
            keep = draw(st.booleans())
            params = (dims, keep)
            out = tuple(1 if d in dims else s for d, s in enumerate(shape)) if keep else \
                tuple(s for d, s in enumerate(shape) if d not in dims)
        elif kind == "max":
            dim, keep = draw(st.integers(0, ndim - 1)), draw(st.booleans())
            params = (dim, keep)
            out = tuple(1 if d == dim else s for d, s in enumerate(shape)) if keep else \
                tuple(s for d, s in enumerate(shape) if d != dim)
        elif kind == "softmax":
            params = draw(st.integers(0, ndim - 1))
        elif kind == "matmul":
            partners = [j for j, s in enumerate(values) if len(s) >= 2 and ndim >= 2 and s[-2] == shape[-1]
                        and _broadcastable(s[:-2], shape[:-2])]
            if not partners:
                continue
            j = draw(st.sampled_from(partners))
            n = max(ndim, len(values[j])) - 2
            batch = tuple(max(a, b) for a, b in zip((1,) * (n - ndim + 2) + shape[:-2],
                                                     (1,) * (n - len(values[j]) + 2) + values[j][:-2]))
            operands, out = [i, j], batch + (shape[-2], values[j][-1])
        elif kind == "gather":
            dim = draw(st.integers(0, ndim - 1))
            count = draw(st.integers(1, 4))
            index = np.array(draw(st.lists(st.integers(-shape[dim], shape[dim] - 1), min_size=count,
                                           max_size=count)), dtype=np.int32)
            params = (dim, index)
            out = shape[:dim] + (count,) + shape[dim + 1:]
        if not out or 0 in out or int(np.prod(out)) > 4096:
            continue
        steps.append((kind, operands, params))
        values.append(tuple(out))
    return shapes, steps


def _describe(shapes, steps):
    lines = [f"inputs {shapes}"] + [f"  v{len(shapes) + k} = {kind}({', '.join(f'v{o}' for o in ops)}) {params}"
                                    for k, (kind, ops, params) in enumerate(steps)]
    return "\n".join(lines)


def run_program(shapes, steps, seed=0, eager=False):
    rng = np.random.default_rng(seed)
    data = [rng.uniform(-2, 2, s).astype(np.float32) for s in shapes]
    t_vals = [torch.tensor(d, requires_grad=True) for d in data]
    p_vals = [pg.Tensor(d, requires_grad=True) for d in data]
    t_in, p_in = list(t_vals), list(p_vals)
    for kind, operands, params in steps:
        t_vals.append(_apply(kind, torch, [t_vals[o] for o in operands], params))
        p_vals.append(_apply(kind, pg, [p_vals[o] for o in operands], params))
    # every computed value feeds the loss, with its own random weights, so every gradient path is checked
    weights = [rng.uniform(-1, 1, tuple(v.shape)).astype(np.float32) for v in t_vals[len(shapes):]]
    t_loss = sum((v * torch.tensor(w)).sum() for v, w in zip(t_vals[len(shapes):], weights))
    p_loss = sum(((v * pg.Tensor(w)).sum() for v, w in zip(p_vals[len(shapes):], weights)), pg.zeros(()))
    t_loss.backward()
    p_loss.backward()
    for k, (tv, pv) in enumerate(zip(t_vals[len(shapes):], p_vals[len(shapes):])):
        np.testing.assert_allclose(pv.numpy(), tv.detach().numpy(), rtol=2e-4, atol=2e-5,
                                   err_msg=f"value v{len(shapes) + k} of\n{_describe(shapes, steps)}")
    for k, (ti, pi) in enumerate(zip(t_in, p_in)):
        expected = np.zeros(shapes[k], np.float32) if ti.grad is None else ti.grad.numpy()
        got = np.zeros(shapes[k], np.float32) if pi.grad is None else pi.grad.numpy()
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=5e-5,
                                   err_msg=f"gradient of input v{k} of\n{_describe(shapes, steps)}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_SEED" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@seed(int(os.environ.get("FUZZ_SEED", "0")))
@given(programs(), st.booleans())
def test_fuzz_against_torch(program, eager):
    shapes, steps = program
    if not steps:
        return
    if eager:
        with pg.eager():
            run_program(shapes, steps)
    else:
        run_program(shapes, steps)


# Failures the fuzzer found, kept as fixed cases.
REGRESSIONS = []


@pytest.mark.parametrize("shapes,steps", REGRESSIONS)
def test_fuzz_regressions(shapes, steps):
    run_program(shapes, steps)
