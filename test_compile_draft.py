"""Graph capture (@pg.compile): replay agrees with graph and eager execution, compiles nothing new after the
second call, re-traces on new signatures and rebound state, and refuses reads back to Python mid-step."""
import numpy as np
import pytest

import picograd as pg


def _mlp_step_factory(seed=0):
    pg.manual_seed(seed)
    l1, l2 = pg.Linear(12, 24), pg.Linear(24, 5)
    opt = pg.AdamW(l1.parameters() + l2.parameters(), lr=1e-2, weight_decay=0.1)

    def step(x, y):
        opt.zero_grad()
        loss = pg.cross_entropy(l2(l1(x).relu()), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step, opt


def _batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 12)).astype(np.float32), rng.integers(0, 5, 16).astype(np.int32))
            for _ in range(n)]


def _run(step, batches):
    return [step(pg.Tensor(x), pg.Tensor(y)).item() for x, y in batches]


def test_compiled_training_matches_graph_and_eager():
    batches = _batches(8)
    graph = _run(_mlp_step_factory()[0], batches)
    compiled = _run(pg.compile(_mlp_step_factory()[0]), batches)
    with pg.eager():
        eager = _run(_mlp_step_factory()[0], batches)
    np.testing.assert_allclose(compiled, graph, rtol=1e-6)
    np.testing.assert_allclose(eager, graph, rtol=1e-5)


def test_no_new_kernels_after_two_calls():
    step = pg.compile(_mlp_step_factory()[0])
    batches = _batches(50)
    _run(step, batches[:2])
    before = pg.stats()
    losses = _run(step, batches[2:])
    after = pg.stats()
    assert after["kernels_compiled"] == before["kernels_compiled"]
    assert after["traces"] == before["traces"]
    assert after["replays"] - before["replays"] == 48
    assert losses[-1] < losses[0]


def test_learning_rate_change_reaches_the_replay():
    batches = _batches(6)
    step_c, opt_c = _mlp_step_factory()
    step_g, opt_g = _mlp_step_factory()
    step_c = pg.compile(step_c)
    for i, (x, y) in enumerate(batches):
        opt_c.lr = opt_g.lr = 1e-2 / (i + 1)
        a = step_c(pg.Tensor(x), pg.Tensor(y)).item()
        b = step_g(pg.Tensor(x), pg.Tensor(y)).item()
        assert a == pytest.approx(b, rel=1e-6)


def test_float_argument_is_a_runtime_value():
    f = pg.compile(lambda x, scale: x * scale)
    x = pg.Tensor(np.arange(4, dtype=np.float32))
    for scale in (1.0, 2.0, 3.0, 0.5):
        np.testing.assert_allclose(f(x, scale).numpy(), np.arange(4) * scale)
    assert len(f.traces) == 1


def test_new_shape_retraces_and_outputs_are_fresh():
    f = pg.compile(lambda x: (x * 2).sum(0))
    a = f(pg.Tensor(np.ones((3, 4), np.float32)))
    b = f(pg.Tensor(np.ones((3, 4), np.float32) * 2))
    c = f(pg.Tensor(np.ones((3, 4), np.float32) * 3))
    d = f(pg.Tensor(np.ones((5, 2), np.float32)))   # a new signature: warm-up, then a second trace
    e = f(pg.Tensor(np.ones((5, 2), np.float32)))
    np.testing.assert_allclose(a.numpy(), [6] * 4)    # earlier outputs are not overwritten by later calls
    np.testing.assert_allclose(b.numpy(), [12] * 4)
    np.testing.assert_allclose(c.numpy(), [18] * 4)
    np.testing.assert_allclose(d.numpy(), [10] * 2)
    np.testing.assert_allclose(e.numpy(), [10] * 2)
    assert len(f.traces) == 2


def test_closure_tensor_rebound_is_seen():
    w = pg.Tensor(np.ones(3, np.float32))
    f = pg.compile(lambda x: x * w)
    x = pg.Tensor(np.arange(3, dtype=np.float32))
    for _ in range(3):
        np.testing.assert_allclose(f(x).numpy(), [0, 1, 2])
    w = pg.Tensor(np.full(3, 10.0, np.float32))   # noqa: F841 (read by the lambda through its closure)
    np.testing.assert_allclose(f(x).numpy(), [0, 10, 20])


def test_item_inside_compiled_function_raises():
    def bad(x):
        return x * float(x.sum().item())
    f = pg.compile(bad)
    x = pg.Tensor(np.ones(3, np.float32))
    f(x)   # the warm-up call runs in graph mode, where reading values is fine
    with pytest.raises(RuntimeError, match="item"):
        f(x)


def test_variable_position_does_not_recompile():
    """A toy KV cache written at a runtime position: one capture serves every position."""
    cache = pg.zeros(64, 4).contiguous().realize()

    @pg.compile
    def step(x, pos):
        cache[pos:pos + 1] = x
        visible = pg.arange(64).reshape(64, 1) <= pos
        return pg.where(visible, cache, 0.0).sum(0)

    expected = np.zeros((64, 4), np.float32)
    for p in range(50):
        row = np.full((1, 4), p + 1, np.float32)
        out = step(pg.Tensor(row), pg.Variable("pos", 0, 63).bind(p))
        expected[p] = row
        np.testing.assert_allclose(out.numpy(), expected[:p + 1].sum(0))
        if p == 2:
            compiled = pg.stats()["kernels_compiled"]
    assert pg.stats()["kernels_compiled"] == compiled
    assert len(step.traces) == 1


def test_compiled_step_memory_not_above_graph_mode():
    """Peak memory of a training step (model, optimizer state, intermediates), each mode measured alone."""
    import gc

    def peak_of(compiled):
        gc.collect()
        start = pg.stats()["bytes_in_use"]
        pg.manual_seed(0)
        l1, l2 = pg.Linear(64, 128), pg.Linear(128, 64)
        opt = pg.SGD(l1.parameters() + l2.parameters(), lr=1e-3, momentum=0.9)

        def step(x):
            opt.zero_grad()
            loss = ((l2(l1(x).relu()) - x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()
        step = pg.compile(step) if compiled else step
        x = pg.Tensor(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
        for _ in range(3):
            step(x).item()
        pg.reset_peak_memory()
        for _ in range(3):
            step(x).item()
        return pg.stats()["peak_bytes_in_use"] - start

    graph = peak_of(False)
    compiled = peak_of(True)
    # the planned intermediates must not cost more than graph mode's; a scalar result alive across two calls
    # (gc timing) is the only slack allowed
    assert compiled <= graph + 64, (compiled, graph)
