"""Linear units (tlc.mojo.twins.split_linear_units): an exact block splits into a
smaller block and a linear map of its input whose outputs add up to the block's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.mojo import runner, twins
from tlc.mojo.weights import FeedForward, SparseMatrix


def _sparse(dense: np.ndarray) -> SparseMatrix:
    rows, cols = np.nonzero(dense)
    return SparseMatrix(dense.shape, rows, cols, dense[rows, cols].astype(np.float64))


def _output(block: FeedForward, y: np.ndarray) -> np.ndarray:
    """Return W2 ReLU(W1 y + b1) + b2, in exact integers."""
    w1 = _dense(block.w1).astype(object)
    w2 = _dense(block.w2).astype(object)
    values = [int(v) for v in y]
    hidden = [max(0, int(b) + sum(int(w) * v for w, v in zip(row, values, strict=True)))
              for row, b in zip(w1, block.b1, strict=True)]  # fmt: skip
    return np.array([int(b) + sum(int(w) * h for w, h in zip(row, hidden, strict=True))
                     for row, b in zip(w2, block.b2, strict=True)], dtype=object)  # fmt: skip


def _dense(matrix: SparseMatrix) -> np.ndarray:
    dense = np.zeros(matrix.shape)
    np.add.at(dense, (matrix.rows, matrix.cols), matrix.values)
    return dense


def _apply(matrix: SparseMatrix, y: np.ndarray) -> np.ndarray:
    dense = _dense(matrix).astype(object)
    values = [int(v) for v in y]
    return np.array([sum(int(w) * v for w, v in zip(row, values, strict=True))
                     for row in dense], dtype=object)  # fmt: skip


@st.composite
def blocks_in_boxes(draw):
    """Draw an integer block, some of whose units copy one input, and a box of inputs."""
    width = draw(st.integers(2, 6))
    hidden = draw(st.integers(1, 8))
    entries = st.integers(-3, 3)
    w1 = np.array(draw(st.lists(st.lists(entries, min_size=width, max_size=width),
                                min_size=hidden, max_size=hidden)), dtype=np.float64)  # fmt: skip
    b1 = np.array(draw(st.lists(st.integers(-6, 6), min_size=hidden, max_size=hidden)),
                  dtype=np.float64)  # fmt: skip

    for unit in range(hidden):
        if draw(st.booleans()):
            # A copy: one input with a positive weight, read over a nonnegative range.
            w1[unit] = 0.0
            w1[unit, draw(st.integers(0, width - 1))] = draw(st.integers(1, 3))
            b1[unit] = draw(st.integers(0, 2))

    w2 = np.array(draw(st.lists(st.lists(entries, min_size=hidden, max_size=hidden),
                                min_size=width, max_size=width)), dtype=np.float64)  # fmt: skip
    b2 = np.array(draw(st.lists(st.integers(-4, 4), min_size=width, max_size=width)),
                  dtype=np.float64)  # fmt: skip

    low = np.array(draw(st.lists(st.integers(-3, 3), min_size=width, max_size=width)),
                   dtype=np.float64)  # fmt: skip
    # Most inputs are bits or small counts, which never go below zero.
    low = np.where(np.array(draw(st.lists(st.booleans(), min_size=width, max_size=width))),
                   0.0, low)  # fmt: skip
    high = low + np.array(draw(st.lists(st.integers(0, 4), min_size=width,
                                        max_size=width)), dtype=np.float64)  # fmt: skip

    written = np.array(draw(st.lists(st.booleans(), min_size=width, max_size=width)))
    written &= np.array(draw(st.lists(st.booleans(), min_size=width, max_size=width)))
    samples = [np.array([draw(st.integers(int(a), int(b))) for a, b in zip(low, high,
                                                                       strict=True)],
                        dtype=np.float64) for _ in range(4)]  # fmt: skip
    block = FeedForward(_sparse(w1), b1, _sparse(w2), b2)
    return block, (low, high), written, [low, high, *samples]


@settings(max_examples=200, deadline=None)
@given(case=blocks_in_boxes())
def test_split_keeps_the_block_output(case):
    block, interval, written, inputs = case
    remembered, linear = twins.split_linear_units(block, interval, written,
                                                  np.zeros(len(written)))  # fmt: skip
    for y in inputs:
        expected = _output(block, y)
        got = _output(remembered, y)
        if linear is not None:
            got = got + _apply(linear, y)
        assert list(got) == list(expected)
    assert len(remembered.b1) <= len(block.b1)
    if linear is not None:
        assert not written[linear.cols].any()
        assert len(remembered.b1) < len(block.b1)


def _copy_block() -> FeedForward:
    """Return a block whose unit 0 is a step of columns 0 and 1 and whose unit 1
    copies column 2 into row 3."""
    w1 = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    w2 = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    return FeedForward(_sparse(w1), np.zeros(2), _sparse(w2), np.array([0.0, 0.0, 0.0, 5.0]))


def test_split_folds_a_copy_unit():
    box = (np.array([0.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 9.0, 0.0]))
    remembered, linear = twins.split_linear_units(_copy_block(), box, np.zeros(4, bool),
                                                  np.zeros(4))  # fmt: skip
    assert linear is not None
    assert _dense(linear).tolist() == [[0.0] * 4, [0.0] * 4, [0.0] * 4, [0.0, 0.0, 2.0, 0.0]]
    assert len(remembered.b1) == 1
    assert sorted(remembered.w1.cols.tolist()) == [0, 1]
    assert remembered.b2.tolist() == [0.0, 0.0, 0.0, 5.0]


def test_split_keeps_whole_blocks():
    block = _copy_block()
    box = (np.zeros(4), np.array([1.0, 1.0, 9.0, 0.0]))
    written = np.zeros(4, bool)
    written[2] = True
    _, linear = twins.split_linear_units(block, box, written, np.zeros(4))
    assert linear is None
    # A copy of column 0, which the step reads too, leaves the memo key as it was.
    w1 = np.array([[1.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    same_column = FeedForward(_sparse(w1), np.zeros(2), block.w2, block.b2)
    _, linear = twins.split_linear_units(same_column, box, np.zeros(4, bool), np.zeros(4))
    assert linear is None
    # Column 2 may be negative, so unit 1 is not linear.
    negative = (np.array([0.0, 0.0, -1.0, 0.0]), box[1])
    _, linear = twins.split_linear_units(block, negative, np.zeros(4, bool), np.zeros(4))
    assert linear is None
    # The sums would pass 2^52.
    _, linear = twins.split_linear_units(block, box, np.zeros(4, bool), np.full(4, 2.0**52))
    assert linear is None


def test_split_drops_dead_units():
    w1 = np.array([[1.0, 0.0], [0.0, -1.0]])
    block = FeedForward(_sparse(w1), np.zeros(2), _sparse(np.ones((2, 2))), np.zeros(2))
    box = (np.array([-2.0, 0.0]), np.array([2.0, 3.0]))
    remembered, linear = twins.split_linear_units(block, box, np.zeros(2, bool), np.zeros(2))
    assert linear is None
    assert remembered.w1.rows.tolist() == [0]
    assert remembered.w1.cols.tolist() == [0]


def test_universal_model_splits_copy_units():
    """Every split of the interpreter model's exact blocks keeps the output on inputs
    drawn from the layer's interval, and the copy-heavy experts of layer 0 split."""
    weights, _ = runner.load_universal()
    intervals = twins.input_intervals(weights)
    assert intervals is not None
    rng = np.random.default_rng(5)
    split = 0
    for index, layer in enumerate(weights.layers):
        interval = intervals[index]
        bound = twins.magnitude(interval)
        written = np.zeros(weights.width, dtype=bool)
        for block in layer.blocks:
            written[block.w2.rows] = True
            written[np.flatnonzero(block.b2)] = True
        low, high = interval
        # Layer 0's first twelve experts include the copy-heavy ones and keep the test
        # short. Nothing else is added here, so only the fold's own sums are bounded.
        for block in layer.experts[:12] if index == 0 else layer.experts:
            if not twins.layer_sums_exact(layer.shared, [block], bound, interval):
                continue
            remembered, linear = twins.split_linear_units(block, interval, written,
                                                          np.zeros(weights.width))  # fmt: skip
            if linear is None:
                continue
            split += 1
            # Inputs in the box, with the columns the block reads inside small ranges.
            for _ in range(3):
                y = np.floor(low + rng.random(len(low)) * np.minimum(high - low, 7.0) + 0.5)
                y = np.clip(y, low, high)
                direct = block.w2.matvec(np.maximum(block.w1.matvec(y) + block.b1, 0.0))
                parts = remembered.w2.matvec(np.maximum(remembered.w1.matvec(y)
                                                        + remembered.b1, 0.0))  # fmt: skip
                assert np.array_equal(direct + block.b2, parts + remembered.b2
                                      + linear.matvec(y))  # fmt: skip
    assert split >= 8
