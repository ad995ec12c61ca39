"""Folding of readers into writers in the torch runtime's one-program step (`Folding`).

A folded share computes the same integer as the product it replaces. A share that could
leave float64's exact range is rejected. The fallback products give the reference trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from model_helpers import first_difference, outcome
from test_torch_random import programs as random_programs

from tlc.model import tokens as tk
from tlc.mojo import reference as oracle
from tlc.mojo import synthetic
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import load_weights as load_synthetic
from tlc.runtime import reference, torch_runner
from tlc.runtime.torch_folding import LIMIT, Folding, _Reader
from tlc.runtime.torch_sparse import torch_csr


def _folding_with(reader_matrix: sp.csr_matrix) -> Folding:
    """A Folding with one reader of the given matrix that reads after every writer."""
    folding = Folding.__new__(Folding)
    rows, width = reader_matrix.shape
    # z = [x; the reader's rows], as `Folding._add_readers` lays it out.
    folding.width = width
    folding.readers = [_Reader(slice(width, width + rows), reader_matrix, np.zeros(rows),
                               10.0)]  # fmt: skip
    folding.stacked = sp.csr_matrix(reader_matrix)
    folding.stacked_abs = np.abs(folding.stacked)
    folding.sums = [np.zeros(rows)]
    folding.x_bounds = [np.zeros(reader_matrix.shape[1])]
    folding.start_stale = [False]
    return folding


def _integer_matrix(draw, rows: int, columns: int, magnitude: int) -> sp.csr_matrix:
    entries = draw(st.lists(st.integers(-magnitude, magnitude), min_size=rows * columns,
                            max_size=rows * columns))  # fmt: skip
    dense = np.array(entries, dtype=np.float64).reshape(rows, columns)
    dense[np.array(draw(st.lists(st.booleans(), min_size=rows * columns,
                                 max_size=rows * columns))).reshape(rows, columns)] = 0.0  # fmt: skip
    return sp.csr_matrix(dense)


@st.composite
def fold_cases(draw):
    magnitude = 2 ** draw(st.integers(1, 30))
    reader = _integer_matrix(draw, draw(st.integers(1, 3)), 4, magnitude)
    writers = [_integer_matrix(draw, 4, 3, magnitude) for _ in range(2)]
    bounds = [draw(st.integers(0, 2**25)) for _ in range(3)]
    inputs = [[draw(st.integers(-b, b)) for b in bounds] for _ in range(2)]
    return reader, writers, bounds, inputs


def _exact_product(matrix: sp.csr_matrix, vector: list[int]) -> list[int]:
    return [sum(int(m) * v for m, v in zip(row, vector)) for row in matrix.toarray()]


@settings(max_examples=150, deadline=None)
@given(fold_cases())
def test_folded_shares_sum_exactly(case):
    """Two writers in turn. z starts at 0, and each folded share adds (R W) v in float64,
    as the runtime's z.addmv_ does. The sum must equal the integer R (W1 v1 + W2 v2) over
    the folded writers."""
    reader, writers, bounds, inputs = case
    folding = _folding_with(reader)
    z = torch.zeros(reader.shape[0], dtype=torch.float64)
    expected = [0] * reader.shape[0]
    for writer, v in zip(writers, inputs):
        stales: list[int] = []
        extended = folding._extend(writer, np.array(bounds, dtype=np.float64), 0.0, stales)
        assert extended.shape == (writer.shape[0] + reader.shape[0], writer.shape[1])
        assert (extended[: writer.shape[0]] != writer).nnz == 0
        part = extended[writer.shape[0] :]
        share = _exact_product(reader, _exact_product(writer, v))
        if part.nnz == 0:
            assert stales in ([], [0])  # rejected (stale), or nothing to fold
            if stales:
                return  # the runtime reads this reader from x for the rest of the step
            continue
        assert stales == []
        z.addmv_(torch_csr(part), torch.tensor(v, dtype=torch.float64))
        expected = [e + s for e, s in zip(expected, share)]
        assert [int(value) for value in z.tolist()] == expected
        assert all(abs(e) < LIMIT for e in expected)


def test_extend_rejects_share_past_limit():
    reader = sp.csr_matrix(np.array([[2.0**26, 1.0]]))
    writer = sp.csr_matrix(np.array([[2.0**20], [1.0]]))
    folding = _folding_with(reader)
    stales: list[int] = []
    extended = folding._extend(writer, np.array([2.0**10]), 0.0, stales)
    assert extended[2:].nnz == 0
    assert stales == [0]
    # The same writer with inputs 2^6 times smaller stays below 2^52 and folds.
    folding = _folding_with(reader)
    stales = []
    extended = folding._extend(writer, np.array([2.0**4]), 0.0, stales)
    assert extended[2:].toarray().tolist() == [[2.0**46 + 1.0]]
    assert stales == []


def test_check_reads_rejects_nan_bound():
    """A stored zero weight times an input bound that overflowed to inf gives NaN."""
    folding = _folding_with(sp.csr_matrix(np.array([[1.0, -1.0, 1.0]])))
    folding.x_bounds = [np.array([np.nan, 1.0, 1.0])]
    folding._check_reads(10.0)
    assert folding.start_stale == [True]
    folding = _folding_with(sp.csr_matrix(np.array([[1.0, -1.0, 1.0]])))
    folding.x_bounds = [np.array([1.0, 1.0, 1.0])]
    folding._check_reads(10.0)
    assert folding.start_stale == [False]


def test_extend_skips_earlier_readers():
    reader = sp.csr_matrix(np.array([[1.0, 1.0]]))
    writer = sp.csr_matrix(np.array([[1.0], [1.0]]))
    folding = _folding_with(reader)
    stales: list[int] = []
    extended = folding._extend(writer, np.array([1.0]), 10.0, stales)  # reads at 10
    assert extended[2:].nnz == 0
    assert stales == []


def test_folding_universal_weights_layers_0_1():
    model = torch_runner.load_model()
    folding = model.folding
    assert not any(folding.start_stale)
    assert all(writer.stales == [] for writer in folding.attention.values())
    for layer in (0, 1):
        assert all(stales == [] for _, stales in folding.blocks[layer].values())
    # Layer 1's q, k and v, the routers and the logits are rows of z, not products.
    assert folding.qkv_reader.keys() == {0, 1}
    assert len(folding.router_readers) == sum(l.router is not None for l in model.layers)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_programs(), st.binary(max_size=4))
def test_all_readers_stale_match_reference(program, stdin):
    """With every reader stale from the start, each reader runs its own product of x, the
    path the runtime takes for weights that do not fold."""
    model = torch_runner.load_model()
    folding = model.folding
    saved = folding.start_stale
    folding.start_stale = [True] * len(saved)
    try:
        trace: list[str] = []
        result = torch_runner.run_program(program, stdin=stdin, max_steps=300,
                                          trace=trace.append)  # fmt: skip
    finally:
        folding.start_stale = saved
    expected_trace: list[str] = []
    expected = reference.run_program(program, stdin=stdin, max_steps=300,
                                     trace=expected_trace.append)  # fmt: skip
    assert trace == expected_trace, first_difference(expected_trace, trace)
    assert outcome(result) == outcome(expected)


def _torch_model_of(path: Path) -> torch_runner.TorchModel:
    """Load a synthetic weight file into the torch runtime."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = json.loads(handle.metadata()[tk.METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return torch_runner.TorchModel(tensors, metadata)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.builds(SyntheticSpec, layers=st.integers(1, 3), dense_heads=st.integers(0, 2),
                   exact_heads=st.integers(0, 2), shared_hidden=st.integers(0, 6),
                   experts=st.integers(0, 3), density=st.sampled_from([0.2, 0.5]),
                   run_bias=st.integers(6, 30)),
    seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_synthetic_models_equal_the_numpy_oracle(tmp_path_factory, spec, seed):
    """Random models of another shape than the interpreter's (dense residual, heads in
    every layer): the folded one-program step gives the oracle's tokens."""
    path = synthetic.write_model(tmp_path_factory.mktemp("model") / "m.safetensors",
                                 spec, seed, 6)  # fmt: skip
    weights = load_synthetic(path)
    expected = oracle.run_reference(weights, weights.prompt, 60)
    model = _torch_model_of(path)
    batch = torch_runner.Batch(model.layers, 1)
    token = model.prefill_many(batch, [np.asarray(weights.prompt)])[0]
    tokens = [token]
    for _ in range(len(expected.tokens) - 1):
        token = model.step_one(batch, 0, token)
        tokens.append(token)
    assert np.array_equal(np.array(tokens), expected.tokens)


def _dense(tensors, metadata, name: str) -> np.ndarray:
    dense = np.zeros(metadata["shapes"][name])
    dense[tensors[f"{name}.rows"], tensors[f"{name}.cols"]] = tensors[f"{name}.values"]
    return dense


def _store(tensors, metadata, name: str, dense: np.ndarray) -> None:
    rows, columns = np.nonzero(dense)
    tensors[f"{name}.rows"] = rows.astype(np.int64)
    tensors[f"{name}.cols"] = columns.astype(np.int64)
    tensors[f"{name}.values"] = dense[rows, columns].astype(np.float64)
    metadata["shapes"][name] = list(dense.shape)


def _cancelling_model(hidden_bias: float, reading: int):
    """A one-layer model whose shared unit h = ReLU(hidden_bias) adds h to scratch
    components s1 and s2, while the embedding of the `kind` field sets s0 = 1. Logit
    `reading` of the `data` field reads s0 + s1 - s2 (bias 0), and the other of logits 0
    and 1 is the constant 1, so the exact logits tie. R W2 is zero, yet the product R x
    rounds for large or fractional h."""
    spec = SyntheticSpec(layers=1, dense_heads=0, exact_heads=0, shared_hidden=1, experts=0)
    tensors, metadata = synthetic.build_model(spec, 0, 8)
    s0, s1, s2 = spec.scratch_start, spec.scratch_start + 1, spec.scratch_start + 2
    names = [field["name"] for field in metadata["fields"]]

    for f, name in enumerate(names):
        for table in ("embed", "unembed"):
            dense = _dense(tensors, metadata, f"{table}.{f}")
            dense[:, [s0, s1, s2]] = 0.0
            if table == "embed" and name == "kind":
                dense[:, s0] = 1.0
            _store(tensors, metadata, f"{table}.{f}", dense)

    _store(tensors, metadata, "layers.0.shared.w1", np.zeros((1, spec.width)))
    tensors["layers.0.shared.b1"] = np.array([hidden_bias])
    w2 = np.zeros((spec.width, 1))
    w2[[s1, s2], 0] = 1.0
    _store(tensors, metadata, "layers.0.shared.w2", w2)
    tensors["layers.0.shared.b2"] = np.zeros(spec.width)

    data = names.index("data")
    unembedding = np.zeros(metadata["shapes"][f"unembed.{data}"])
    unembedding[reading, [s0, s1, s2]] = [1.0, 1.0, -1.0]
    _store(tensors, metadata, f"unembed.{data}", unembedding)
    bias = np.full(unembedding.shape[0], -100.0)
    bias[1 - reading], bias[reading] = 1.0, 0.0
    tensors[f"unembed.{data}.bias"] = bias
    return torch_runner.TorchModel(tensors, metadata), tensors["prompt"], data


def _tokens_both_ways(model, prompt, steps: int):
    """Return the tokens of the folded one-program step and of the batch step, which
    does not fold, from the same prompt."""
    single, pair = torch_runner.Batch(model.layers, 1), torch_runner.Batch(model.layers, 2)
    folded = model.prefill_many(single, [prompt])
    direct = model.prefill_many(pair, [prompt, prompt])
    rows_folded, rows_direct = [folded[0]], [direct[0]]
    for _ in range(steps):
        folded = model.step_many(single, [0], folded)
        direct = model.step_many(pair, [0, 1], direct)
        rows_folded.append(folded[0])
        rows_direct.append(direct[0])
    return np.array(rows_folded), np.array(rows_direct)


# 1 + 0.9 - 0.9 rounds to just below 1, so the constant logit 1 wins. 1 + (2^53 + 2)
# rounds to 2^53 + 4, so the reading logit 1 gets 2 and wins. An exact tie gives 0.
@pytest.mark.parametrize(("hidden_bias", "reading"), [(0.9, 0), (2.0**53 + 2, 1)])
def test_cancelling_share_stays_unfolded(hidden_bias, reading):
    model, prompt, data = _cancelling_model(hidden_bias, reading)
    assert model.folding.start_stale[model.folding.logits_reader]
    folded, direct = _tokens_both_ways(model, prompt, 4)
    assert np.array_equal(folded, direct)
    assert direct[0, data] == 1


def test_fractional_weight_disables_folding():
    spec = SyntheticSpec(layers=2, shared_hidden=4, experts=2, run_bias=20)
    tensors, metadata = synthetic.build_model(spec, 3, 8)
    tensors["layers.1.shared.b1"] = tensors["layers.1.shared.b1"] + 0.5
    model = torch_runner.TorchModel(tensors, metadata)
    assert all(model.folding.start_stale)
    folded, direct = _tokens_both_ways(model, tensors["prompt"], 20)
    assert np.array_equal(folded, direct)
