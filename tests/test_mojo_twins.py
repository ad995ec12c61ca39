"""Twin rows (tlc.mojo.twins): hidden units whose W1 row equals an earlier unit's take
that unit's pre-activation plus their bias difference, only where that is exact."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlc.mojo import reference, runner, synthetic, twins
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import FeedForward, SparseMatrix, load_weights


def _sparse(dense: np.ndarray) -> SparseMatrix:
    rows, cols = np.nonzero(dense)
    return SparseMatrix(dense.shape, rows, cols, dense[rows, cols].astype(np.float64))


def _block(w1: np.ndarray, b1: np.ndarray) -> FeedForward:
    width = w1.shape[1]
    w2 = np.ones((width, len(b1)))
    return FeedForward(_sparse(w1), b1.astype(np.float64), _sparse(w2), np.zeros(width))


def _hidden_with_twins(block: FeedForward, pairs, deltas, y: np.ndarray) -> np.ndarray:
    """Return the engine's pre-activations: the reduced W1 product, then each twin set
    from its representative in pair order."""
    hidden = block.w1.matvec(y) + block.b1
    for (twin, representative), delta in zip(pairs, deltas, strict=True):
        hidden[twin] = hidden[representative] + delta
    return hidden


@st.composite
def blocks_with_copies(draw):
    """Draw an integer block in which some units copy an earlier unit's row, and an
    input."""
    hidden = draw(st.integers(2, 12))
    width = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([1, 1000, 2**20]))
    entries = st.integers(-3, 3).map(lambda value: value * scale)
    w1 = np.array(draw(st.lists(st.lists(entries, min_size=width, max_size=width),
                                min_size=hidden, max_size=hidden)), dtype=np.float64)  # fmt: skip
    for unit in range(1, hidden):
        source = draw(st.integers(-1, unit - 1))
        if source >= 0:
            w1[unit] = w1[source]
    b1 = np.array(draw(st.lists(st.integers(-2**40, 2**40), min_size=hidden,
                                max_size=hidden)), dtype=np.float64)  # fmt: skip
    y = np.array(draw(st.lists(st.integers(-2**20, 2**20), min_size=width,
                               max_size=width)), dtype=np.float64)  # fmt: skip
    return w1, b1, y


@settings(max_examples=150, deadline=None)
@given(case=blocks_with_copies())
def test_twins_match_direct_pre_activations(case):
    w1, b1, y = case
    block = _block(w1, b1)
    reduced, (pairs, deltas) = twins.find_twins(block, np.abs(y))
    expected = [int(b) + sum(int(w) * int(v) for w, v in zip(row, y, strict=True))
                for row, b in zip(w1, b1, strict=True)]  # fmt: skip
    hidden = _hidden_with_twins(reduced, pairs, deltas, y)
    assert [int(value) for value in hidden] == expected
    for twin, representative in pairs:
        assert representative < twin
        assert np.array_equal(w1[twin], w1[representative])
        assert not np.any(reduced.w1.rows == twin)
    # Every unit whose nonzero row equals an earlier one's is a twin.
    copies = {unit for unit in range(len(b1)) if w1[unit].any()
              and any(np.array_equal(w1[unit], w1[earlier]) for earlier in range(unit))}
    assert {int(twin) for twin in pairs[:, 0]} == copies


@settings(max_examples=150, deadline=None)
@given(case=blocks_with_copies())
def test_twins_last_keeps_the_block_output(case):
    w1, b1, y = case
    block = _block(w1, b1)
    renumbered, representatives, deltas = twins.twins_last(block, np.abs(y))
    count = len(representatives)
    first_twin = len(b1) - count
    assert np.all(representatives < first_twin)
    assert not np.any(renumbered.w1.rows >= first_twin)
    # The engine's pre-activations: the product, then the twins from their
    # representatives.
    hidden = renumbered.w1.matvec(y) + renumbered.b1
    hidden[first_twin:] = hidden[representatives] + deltas
    direct = block.w1.matvec(y) + block.b1
    assert sorted(hidden.tolist()) == sorted(direct.tolist())
    relu = np.maximum(hidden, 0.0)
    assert np.array_equal(renumbered.w2.matvec(relu), block.w2.matvec(np.maximum(direct, 0.0)))
    _, (pairs, _) = twins.find_twins(block, np.abs(y))
    assert count in (0, len(pairs))


def test_twins_last_needs_a_bounded_output():
    w1 = np.array([[1.0, 2.0], [1.0, 2.0]])
    block = _block(w1, np.array([0.0, -1.0]))
    renumbered, representatives, _ = twins.twins_last(block, np.ones(2))
    assert representatives.tolist() == [0]
    assert len(renumbered.w1.values) == 2
    _, representatives, _ = twins.twins_last(block, None)
    assert len(representatives) == 0
    # The units are bounded by 3 and 4 (the twin by its representative's row), so W2
    # with weights 3 * 2^48 adds up to 21 * 2^48 > 2^52 into x, where the new order
    # could round. Without the twin's row its bound would be 1, and 12 * 2^48 passes.
    huge = FeedForward(block.w1, block.b1, _sparse(np.full((2, 2), 3 * 2.0**48)),
                       np.zeros(2))  # fmt: skip
    unchanged, representatives, _ = twins.twins_last(huge, np.ones(2))
    assert len(representatives) == 0
    assert unchanged is huge
    below = FeedForward(block.w1, block.b1, _sparse(np.full((2, 2), 2.0**49)), np.zeros(2))
    assert len(twins.twins_last(below, np.ones(2))[1]) == 1


def test_twins_need_a_bound():
    w1 = np.array([[1.0, 2.0], [1.0, 2.0]])
    block = _block(w1, np.array([0.0, -1.0]))
    _, (pairs, _) = twins.find_twins(block, np.ones(2))
    assert pairs.tolist() == [[1, 0]]
    unchanged, (pairs, _) = twins.find_twins(block, None)
    assert len(pairs) == 0
    assert unchanged is block


@pytest.mark.parametrize("bound", [2.0**51, np.inf, np.nan])
def test_no_twins_past_the_limit(bound):
    # |w| bound + |b| = 2 * 2^51 = 2^52 reaches the limit.
    w1 = np.array([[2.0, 0.0], [2.0, 0.0]])
    block = _block(w1, np.array([0.0, 1.0]))
    _, (pairs, _) = twins.find_twins(block, np.array([bound, 1.0]))
    assert len(pairs) == 0


def test_cancelling_entries_count_in_the_bound():
    # Row 0 stores +2^51 and -2^51 in column 0: its partial sums reach 2^51 y_0 although
    # the row equals row 1 (zero in column 0).
    w1 = SparseMatrix((2, 2), np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]),
                      np.array([2.0**51, -(2.0**51), 1.0, 1.0]))  # fmt: skip
    block = FeedForward(w1, np.zeros(2), _sparse(np.ones((2, 2))), np.zeros(2))
    _, (pairs, _) = twins.find_twins(block, np.array([4.0, 1.0]))
    assert len(pairs) == 0
    _, (pairs, _) = twins.find_twins(block, np.array([0.25, 1.0]))
    assert pairs.tolist() == [[1, 0]]


def _synthetic(spec: SyntheticSpec, seed: int, folder: str):
    path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 8)
    return load_weights(path)


def test_no_bounds_for_fractional_weights():
    spec = SyntheticSpec(run_bias=30, layers=2, twin_rows=True)
    with tempfile.TemporaryDirectory() as folder:
        weights = _synthetic(spec, 3, folder)
    bounds = twins.input_bounds(weights)
    assert bounds is not None
    assert len(bounds) == 2
    weights.layers[1].experts[0].w2.values[0] += 0.5
    assert twins.input_bounds(weights) is None


def test_bounds_cover_the_oracle(tmp_path):
    spec = SyntheticSpec(run_bias=30, layers=3, twin_rows=True, experts=3)
    weights = _synthetic(spec, 5, str(tmp_path))
    bounds = twins.input_bounds(weights)
    model = reference.ReferenceModel(weights)
    seen = [np.zeros(weights.width) for _ in weights.layers]
    original = model._feed_forward

    def recording(layer, y):
        index = next(i for i, each in enumerate(weights.layers) if each is layer)
        seen[index] = np.maximum(seen[index], np.abs(y))
        return original(layer, y)

    model._feed_forward = recording
    token = tuple(int(v) for v in weights.prompt[0])
    for _ in range(60):
        token = model.step(token)
    for bound, largest in zip(bounds, seen, strict=True):
        assert np.all(largest <= bound)
    assert any(largest.any() for largest in seen)


def test_universal_model_has_twins():
    weights, _ = runner.load_universal()
    bounds = twins.input_bounds(weights)
    assert bounds is not None
    layer = weights.layers[0]
    found = sum(len(twins.find_twins(expert, bounds[0])[1][0]) for expert in layer.experts)
    assert found > 0


def test_engine_uses_twins(mojo_extension, tmp_path):
    spec = SyntheticSpec(run_bias=30, layers=2, shared_hidden=8, expert_hidden=8,
                         twin_rows=True, density=0.5)  # fmt: skip
    weights = _synthetic(spec, 11, str(tmp_path))
    bounds = twins.input_bounds(weights)
    found = [len(twins.find_twins(expert, bounds[0])[1][0])
             for expert in weights.layers[0].experts]  # fmt: skip
    assert min(found) > 0
    expected = reference.run_reference(weights, weights.prompt, 200)
    tokens, output = runner.run_tokens(weights, weights.prompt, 200)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3),
       shared_hidden=st.integers(0, 8), expert_hidden=st.integers(2, 8))  # fmt: skip
def test_engine_twins_match_reference(mojo_extension, seed, layers, shared_hidden,
                                      expert_hidden):  # fmt: skip
    spec = SyntheticSpec(run_bias=30, layers=layers, shared_hidden=shared_hidden,
                         expert_hidden=expert_hidden, twin_rows=True, density=0.5)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        weights = _synthetic(spec, seed, folder)
    bounds = twins.input_bounds(weights)
    assert bounds is not None
    expected = reference.run_reference(weights, weights.prompt, 120)
    tokens, output = runner.run_tokens(weights, weights.prompt, 120)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


def test_twin_step_interval():
    # ReLU(s + 1) - ReLU(s) is 0 below s = -1, 1 above s = 0 and linear between, for s
    # = y0 + y1 in [-6, 6]. Bounding each unit apart would give [-6, 7].
    w1 = np.array([[1.0, 1.0], [1.0, 1.0]])
    w2 = _sparse(np.array([[1.0, -1.0], [0.0, 0.0]]))
    block = FeedForward(_sparse(w1), np.array([1.0, 0.0]), w2, np.zeros(2))
    low, high = twins._block_interval(block, np.array([-3.0, -3.0]), np.array([3.0, 3.0]))
    assert low[0] == 0.0
    assert high[0] == 1.0
    assert low[1] == high[1] == 0.0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3))
def test_intervals_cover_the_oracle(seed, layers):
    # Every feed-forward input the oracle computes lies in the interval of its layer.
    spec = SyntheticSpec(run_bias=30, layers=layers, twin_rows=True, experts=3)
    with tempfile.TemporaryDirectory() as folder:
        weights = _synthetic(spec, seed, folder)
    intervals = twins.input_intervals(weights)
    model = reference.ReferenceModel(weights)
    original = model._feed_forward
    inputs = []

    def recording(layer, y):
        index = next(i for i, each in enumerate(weights.layers) if each is layer)
        inputs.append((index, y.copy()))
        return original(layer, y)

    model._feed_forward = recording
    token = tuple(int(v) for v in weights.prompt[0])
    for _ in range(40):
        token = model.step(token)
    assert inputs
    for index, y in inputs:
        low, high = intervals[index]
        assert np.all(low <= y)
        assert np.all(y <= high)


def test_universal_model_blocks_are_exact():
    # The interval pass that groups twin units proves every block of the interpreter
    # model exact, the division experts of layers 2 to 10 included, so each uses the
    # block memo.
    weights, _ = runner.load_universal()
    intervals = twins.input_intervals(weights)
    assert intervals is not None
    for layer, interval in zip(weights.layers, intervals, strict=True):
        bound = np.maximum(-interval[0], interval[1])
        for expert in layer.experts:
            assert twins.layer_sums_exact(layer.shared, [expert], bound, interval)
