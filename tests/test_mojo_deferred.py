"""Deferred heads (tlc.mojo.deferred): the engine computes a head's output only when a
product of the step reads it, which must not change a single token."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlc.mojo import reference, runner, synthetic
from tlc.mojo.deferred import Deferral
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import FeedForward, Head, SparseMatrix, WeightFileError, load_weights


def _weights(spec: SyntheticSpec, seed: int, folder: str):
    path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 10)
    return load_weights(path)


def _private_spec(**changes) -> SyntheticSpec:
    values = dict(run_bias=30, layers=2, dense_heads=1, exact_heads=2, private_head_rows=True)
    values.update(changes)
    return SyntheticSpec(**values)


def _set_row(matrix: SparseMatrix, row: int, column: int) -> SparseMatrix:
    """Return the matrix with one more entry, 1 at (row, column)."""
    return SparseMatrix(matrix.shape, np.append(matrix.rows, row),
                        np.append(matrix.cols, column), np.append(matrix.values, 1.0))  # fmt: skip


def test_private_exact_heads_are_deferrable(tmp_path):
    weights = _weights(_private_spec(), 4, str(tmp_path))
    deferral = Deferral(weights)
    heads = [h for layer in weights.layers for h in layer.heads]
    exact = [head.lookup == "exact" for head in heads]
    # Exact-match queries read only token dimensions, and every head here writes a
    # row of its own.
    for g, is_exact in enumerate(exact):
        if is_exact:
            assert deferral.deferrable[g]
    assert sum(deferral.deferrable) >= 4


def _write_row(weights, layer: int, row: int) -> None:
    """Make expert 0 of `layer` write `row` too."""
    expert = weights.layers[layer].experts[0]
    w2 = _set_row(expert.w2, row, 0)
    weights.layers[layer].experts[0] = FeedForward(expert.w1, expert.b1, w2, expert.b2)


def test_shared_output_row_is_not_deferrable(tmp_path):
    weights = _weights(_private_spec(dense_heads=0), 4, str(tmp_path))
    assert Deferral(weights).deferrable[0]
    _write_row(weights, 1, int(weights.layers[0].heads[0].wo.rows[0]))
    assert not Deferral(weights).deferrable[0]


def test_query_written_later_is_not_deferrable(tmp_path):
    spec = _private_spec(dense_heads=0)
    weights = _weights(spec, 4, str(tmp_path))
    _write_row(weights, 0, spec.scratch_start)
    assert Deferral(weights).deferrable[0]
    # The query now also reads a row that a block of its own layer writes.
    layer = weights.layers[0]
    head = layer.heads[0]
    layer.heads[0] = Head(head.lookup, _set_row(head.wq, 0, spec.scratch_start), head.bq,
                          head.wk, head.bk, head.wv, head.bv, head.wo)  # fmt: skip
    assert not Deferral(weights).deferrable[0]


def test_reads_mask_names_read_heads(tmp_path):
    weights = _weights(_private_spec(), 4, str(tmp_path))
    deferral = Deferral(weights)
    checked = 0
    for g, rows in enumerate(deferral.rows):
        if len(rows) == 0:
            continue
        checked += 1
        reader = SparseMatrix((1, weights.width), np.zeros(1, np.int64),
                              np.array([rows[0]]), np.ones(1))  # fmt: skip
        expected = (1 << g) if deferral.deferrable[g] else 0
        assert deferral.reads(reader) & (2**64 - 1) == expected
    assert checked > 0
    nothing = SparseMatrix((1, weights.width), np.zeros(1, np.int64), np.zeros(1, np.int64),
                           np.ones(1))  # fmt: skip
    assert deferral.reads(nothing) == 0


def test_universal_model_defers_its_heads():
    weights, _ = runner.load_universal()
    deferral = Deferral(weights)
    heads = [head for layer in weights.layers for head in layer.heads]
    assert len(heads) == len(deferral.deferrable)
    # Each head of the interpreter writes dimensions of its own (docs/model.md
    # section 5) and queries what earlier layers wrote.
    assert all(deferral.deferrable)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3),
       exact_heads=st.integers(1, 3), dense_heads=st.integers(0, 2),
       experts=st.integers(0, 3), density=st.sampled_from([0.1, 0.3, 0.6]))  # fmt: skip
def test_deferred_heads_match_reference(mojo_extension, seed, layers, exact_heads,
                                        dense_heads, experts, density):  # fmt: skip
    spec = _private_spec(layers=layers, exact_heads=exact_heads, dense_heads=dense_heads,
                         experts=experts, density=density)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    assert any(Deferral(weights).deferrable)
    expected = reference.run_reference(weights, weights.prompt, 150)
    tokens, output = runner.run_tokens(weights, weights.prompt, 150)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


def _widened(matrix: SparseMatrix, axis: int, extra: int) -> SparseMatrix:
    """Return the matrix with `extra` more rows (axis 0) or columns (axis 1) and one
    entry in the last of them."""
    shape = list(matrix.shape)
    shape[axis] += extra
    row, column = (shape[0] - 1, 0) if axis == 0 else (0, shape[1] - 1)
    return SparseMatrix(tuple(shape), np.append(matrix.rows, row),
                        np.append(matrix.cols, column), np.append(matrix.values, 1.0))  # fmt: skip


@pytest.mark.parametrize("part", ["wq", "wo"])
def test_head_wider_than_residual_is_named(tmp_path, part):
    weights = _weights(_private_spec(), 4, str(tmp_path))
    head = weights.layers[1].heads[0]
    parts = dict(vars(head))
    parts[part] = _widened(parts[part], 0 if part == "wo" else 1, 2)
    weights.layers[1].heads[0] = Head(**parts)
    with pytest.raises(WeightFileError, match=rf"layers\.1\.heads\.0\.{part} has shape"):
        runner.pack_model(weights)


def test_second_layer_wider_than_residual_is_named(tmp_path):
    weights = _weights(_private_spec(), 4, str(tmp_path))
    expert = weights.layers[1].experts[0]
    w2 = _widened(expert.w2, 0, 1)
    weights.layers[1].experts[0] = FeedForward(expert.w1, expert.b1, w2, expert.b2)
    with pytest.raises(WeightFileError, match=r"layers\.1\.experts\.0\.w2 has shape"):
        runner.pack_model(weights)
