"""The engine's unembedding keeps its logits at the bias between steps. It takes a new
argmax only for the fields whose logits the product writes, and every other field gets
the argmax of its bias. Tokens must match those of the numpy oracle, which computes
every logit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlc.mojo import reference, runner, synthetic, twins
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import SparseMatrix, load_weights


def _weights(spec: SyntheticSpec, seed: int, folder: str):
    path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 10)
    return load_weights(path)


def _keep_rows(matrix: SparseMatrix, rows: set[int]) -> SparseMatrix:
    """Return the matrix with the entries of the other rows removed."""
    keep = np.isin(matrix.rows, sorted(rows))
    return SparseMatrix(matrix.shape, matrix.rows[keep], matrix.cols[keep],
                        matrix.values[keep])  # fmt: skip


def _sparse(dense: np.ndarray) -> SparseMatrix:
    """Return the entries of a dense matrix as a SparseMatrix."""
    rows, cols = np.nonzero(dense)
    return SparseMatrix(dense.shape, rows, cols, dense[rows, cols])


def _assert_matches_reference(weights, steps: int) -> None:
    """Assert that the engine and the oracle give the same tokens and output over
    `steps` tokens after the weights' prompt."""
    expected = reference.run_reference(weights, weights.prompt, steps)
    tokens, output = runner.run_tokens(weights, weights.prompt, steps)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@st.composite
def thinned_unembeddings(draw):
    """Draw a synthetic model and, per field, which rows of its unembedding keep their
    entries: all, none (its logits are always the bias) or a random subset."""
    seed = draw(st.integers(0, 2**32 - 1))
    byte_bits = draw(st.booleans())
    data_vocab = draw(st.sampled_from([2, 3, 5, 9, 17]))
    spec = SyntheticSpec(run_bias=30, layers=draw(st.integers(1, 2)), byte_bits=byte_bits,
                         data_vocab=data_vocab, density=0.5)  # fmt: skip
    choices = draw(st.lists(st.sampled_from(["all", "none", "some"]), min_size=20,
                            max_size=20))  # fmt: skip
    return spec, seed, choices, draw(st.randoms(use_true_random=False))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=thinned_unembeddings())
def test_thinned_unembeddings_match_reference(mojo_extension, case):
    spec, seed, choices, rng = case
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    kind = weights.kind_field
    for f, matrix in enumerate(weights.unembed):
        choice = choices[f % len(choices)]
        if f == kind or choice == "all":
            continue
        vocab = matrix.shape[0]
        rows = set() if choice == "none" else {r for r in range(vocab) if rng.random() < 0.3}
        weights.unembed[f] = _keep_rows(matrix, rows)
    expected = reference.run_reference(weights, weights.prompt, 80)
    tokens, output = runner.run_tokens(weights, weights.prompt, 80)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@st.composite
def private_columns(draw):
    """Draw a synthetic model and fields of more than three values that get columns of
    their own in the unembedding, so that the engine looks their argmax up in its
    argmax cache."""
    seed = draw(st.integers(0, 2**32 - 1))
    spec = SyntheticSpec(run_bias=30, layers=draw(st.integers(1, 2)),
                         data_vocab=draw(st.sampled_from([4, 5, 9])), density=0.5)  # fmt: skip
    names = draw(st.lists(st.sampled_from(["data", "key", "query", "out_byte"]),
                          min_size=1, max_size=3, unique=True))  # fmt: skip
    counts = draw(st.lists(st.integers(1, 3), min_size=3, max_size=3))
    special = draw(st.sampled_from([None, np.nan, np.inf]))
    return spec, seed, names, counts, special


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=private_columns())
def test_private_columns_match_reference(mojo_extension, case):
    # A field whose columns write no other field takes its argmax from the argmax
    # cache, keyed by its one nonzero column and that column's value. With two or more
    # nonzero columns, or a value not seen last in the column, the engine computes the
    # field's logits.
    spec, seed, names, counts, special = case
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)

    rng = np.random.default_rng(seed)
    field_names = [entry.name for entry in weights.fields]
    # Key and query bits (+-1) and scratch columns (any integer) alike.
    columns = rng.permutation(spec.width).tolist()
    owned = {}
    for name, count in zip(names, counts):
        owned[field_names.index(name)] = columns[:count]
        del columns[:count]

    private = sorted(c for columns in owned.values() for c in columns)
    for f, matrix in enumerate(weights.unembed):
        dense = matrix.to_dense()
        dense[:, private] = 0.0
        if f in owned:
            dense[:, :] = 0.0
            vocab = dense.shape[0]
            for column in owned[f]:
                dense[:, column] = rng.integers(-2, 3, size=vocab)
            if special is not None:
                bias = weights.unembed_bias[f].copy()
                bias[vocab - 1] = special
                weights.unembed_bias[f] = bias
        weights.unembed[f] = _sparse(dense)

    _assert_matches_reference(weights, 100)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.1, 1.0), layers=st.integers(1, 2))
def test_single_entry_columns_match_reference(mojo_extension, seed, share, layers):
    # A column of x with one entry in one field's logits takes the engine's shortcut for
    # single entries, which must add the same weight to the same logit. A share of the
    # columns gets one entry each, in a random field and row; the others keep theirs.
    spec = SyntheticSpec(run_bias=30, layers=layers, density=0.5)
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    rng = np.random.default_rng(seed)
    dense = [matrix.to_dense() for matrix in weights.unembed]
    chosen = rng.permutation(spec.width)[: max(1, int(share * spec.width))]
    for column in chosen:
        for matrix in dense:
            matrix[:, column] = 0.0
        f = int(rng.integers(len(dense)))
        row = int(rng.integers(dense[f].shape[0]))
        dense[f][row, column] = rng.choice([-2.0, -1.0, 1.0, 2.0])
    weights.unembed[:] = [_sparse(matrix) for matrix in dense]
    _assert_matches_reference(weights, 80)


@st.composite
def consecutive_runs(draw):
    """Draw a synthetic model and columns of x for runs in the unembedding. Each
    column's entries end in at least eight consecutive logits, which may cross field
    boundaries, and the engine adds those eight logits at a time."""
    seed = draw(st.integers(0, 2**32 - 1))
    spec = SyntheticSpec(run_bias=30, layers=draw(st.integers(1, 2)),
                         data_vocab=draw(st.sampled_from([3, 5, 9])), density=0.5)  # fmt: skip
    runs = draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(8, 40),
                                   st.integers(0, 3)), min_size=1, max_size=3))  # fmt: skip
    return spec, seed, runs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=consecutive_runs())
def test_consecutive_runs_match_reference(mojo_extension, case):
    # Each run is (where, length, entries before the run). The weights are small
    # integers, so every logit is exact in any order of its terms.
    spec, seed, runs = case
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    rng = np.random.default_rng(seed)
    vocab = [entry.vocab for entry in weights.fields]
    starts = np.concatenate([[0], np.cumsum(vocab)])
    total = int(starts[-1])
    # Columns that the embedding writes, so that x is nonzero there at some steps.
    written = sorted({int(c) for matrix in weights.embed for c in matrix.cols})
    dense = [matrix.to_dense() for matrix in weights.unembed]
    for where, length, prefix in runs:
        column = written[where % len(written)]
        length = min(length, total)
        first = where % (total - length + 1)
        rows = list(range(first, first + length))
        # Entries before the run leave a gap of at least one row, so they stay apart.
        below = max(first - 1, 0)
        before = rng.choice(below, size=min(prefix, below), replace=False)
        rows += [int(row) for row in before]
        for f in range(len(dense)):
            dense[f][:, column] = 0.0
        for row in rows:
            f = int(np.searchsorted(starts, row, side="right") - 1)
            dense[f][row - starts[f], column] = rng.choice([-2.0, -1.0, 1.0, 2.0])
    weights.unembed[:] = [_sparse(matrix) for matrix in dense]
    _assert_matches_reference(weights, 80)


def test_silent_field_uses_bias_argmax(mojo_extension, tmp_path):
    # out_byte has 256 values, so its logits span several mask words. Without entries
    # its logits are its bias, and the tie goes to the lower value. Then one entry in
    # row 200 lets the product write one logit of the field.
    spec = SyntheticSpec(run_bias=30, layers=1, density=0.5)
    weights = _weights(spec, 7, str(tmp_path))
    byte_field = next(i for i, entry in enumerate(weights.fields) if entry.name == "out_byte")
    bias = weights.unembed_bias[byte_field]
    bias[:] = 0.0
    bias[130] = 1.0
    bias[200] = 1.0
    weights.unembed[byte_field] = _keep_rows(weights.unembed[byte_field], set())
    tokens, _ = runner.run_tokens(weights, weights.prompt, 40)
    assert set(tokens[:, byte_field].tolist()) == {130}
    matrix = weights.unembed[byte_field]
    column = int(np.flatnonzero(weights.embed[0].to_dense().any(axis=0))[0])
    weights.unembed[byte_field] = SparseMatrix(matrix.shape, np.array([200]),
                                               np.array([column]), np.array([1.0]))  # fmt: skip
    expected = reference.run_reference(weights, weights.prompt, 40)
    tokens, _ = runner.run_tokens(weights, weights.prompt, 40)
    assert np.array_equal(tokens, expected.tokens)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1),
       specials=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 300),
                                   st.sampled_from([np.nan, np.inf, -np.inf])),
                         min_size=1, max_size=12))  # fmt: skip
def test_nan_logits_pick_the_first_nan(mojo_extension, seed, specials):
    # numpy and torch count a NaN as the largest value, so the first NaN of a field
    # wins. A weight file cannot store a NaN, so the loaded biases get them here. The
    # fields drawn with an odd number also lose their unembedding entries.
    spec = SyntheticSpec(run_bias=30, layers=1, data_vocab=9, density=0.5)
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    kind = weights.kind_field
    for field, value, special in specials:
        f = field % len(weights.fields)
        if f == kind:
            continue
        bias = weights.unembed_bias[f].copy()
        bias[value % len(bias)] = special
        weights.unembed_bias[f] = bias
        if field % 2:
            weights.unembed[f] = _keep_rows(weights.unembed[f], set())
    expected = reference.run_reference(weights, weights.prompt, 60)
    tokens, output = runner.run_tokens(weights, weights.prompt, 60)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), experts=st.integers(0, 2),
       specials=st.lists(st.tuples(st.integers(0, 200),
                                   st.sampled_from([np.nan, np.inf, -np.inf])),
                         min_size=1, max_size=6))  # fmt: skip
def test_nan_hidden_units_pass_the_relu(mojo_extension, seed, experts, specials):
    # np.maximum(NaN, 0) and torch.relu(NaN) are NaN, so a hidden unit whose bias is a
    # NaN adds NaN to every row its W2 column writes. An infinite bias gives inf or 0.
    spec = SyntheticSpec(run_bias=30, layers=1, shared_hidden=12, experts=experts,
                         expert_hidden=9, density=0.5)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        weights = _weights(spec, seed, folder)
    blocks = weights.layers[0].blocks
    for unit, special in specials:
        block = blocks[unit % len(blocks)]
        bias = np.asarray(block.b1, dtype=np.float64).copy()
        bias[unit % len(bias)] = special
        object.__setattr__(block, "b1", bias)
    assert not twins.cannot_produce_nan(weights)
    expected = reference.run_reference(weights, weights.prompt, 30)
    tokens, output = runner.run_tokens(weights, weights.prompt, 30)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


def test_nan_search_only_where_possible(tmp_path):
    weights, _ = runner.load_universal()
    assert twins.cannot_produce_nan(weights)
    spec = SyntheticSpec(run_bias=30, layers=1, density=0.5)
    small = _weights(spec, 3, str(tmp_path))
    assert twins.cannot_produce_nan(small)
    # Finite weights of 1e307 can overflow to infinities, whose difference is a NaN.
    matrix = small.unembed[1]
    small.unembed[1] = SparseMatrix(matrix.shape, matrix.rows, matrix.cols,
                                    matrix.values * 1e307)  # fmt: skip
    assert not twins.cannot_produce_nan(small)
    small.unembed[1] = matrix
    small.unembed_bias[1] = np.array([0.0, np.nan])
    assert not twins.cannot_produce_nan(small)
