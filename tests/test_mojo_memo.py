"""The block memo of the Mojo runtime (engine.mojo): a block whose sums are exact adds
the output it remembered for an input it has seen, which must change no token."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
import pytest
from hypothesis import strategies as st

from tlc.cli import load_program
from tlc.model import tokens as model_tokens
from tlc.mojo import reference, runner, synthetic, twins
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import FeedForward, SparseMatrix, load_weights
from tlc.runtime import reference as interpreter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _block(w1: list[list[float]], w2: list[list[float]]) -> FeedForward:
    def sparse(values: list[list[float]]) -> SparseMatrix:
        dense = np.array(values, dtype=np.float64)
        rows, cols = np.nonzero(dense)
        return SparseMatrix(dense.shape, rows, cols, dense[rows, cols])

    hidden = len(w1)
    return FeedForward(sparse(w1), np.zeros(hidden), sparse(w2), np.zeros(len(w2)))


def test_layer_sums_exact_needs_a_bound():
    block = _block([[1.0, 2.0]], [[1.0], [0.0]])
    assert twins.layer_sums_exact(None, [block], np.ones(2))
    assert not twins.layer_sums_exact(None, [block], None)


def test_layer_sums_exact_bounds_the_hidden_units():
    block = _block([[2.0, 0.0]], [[0.0], [0.0]])
    assert twins.layer_sums_exact(None, [block], np.array([2.0**50, 1.0]))
    # 2 * 2^51 = 2^52 reaches the limit.
    assert not twins.layer_sums_exact(None, [block], np.array([2.0**51, 1.0]))


def test_layer_sums_exact_with_shared_block_and_expert():
    # Each block adds up to 2^51 to row 0, where x is at most 1.
    block = _block([[1.0]], [[2.0**51]])
    small = _block([[1.0]], [[1.0]])
    bound = np.ones(1)
    assert twins.layer_sums_exact(None, [block, small], bound)
    assert twins.layer_sums_exact(block, [small], bound)
    # 1 + 2^51 + 2^51 passes 2^52: x plus both outputs could round.
    assert not twins.layer_sums_exact(block, [small, block], bound)


def _synthetic(spec: SyntheticSpec, seed: int, folder: str):
    path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 8)
    return load_weights(path)


def _engine_run(weights, steps: int, limit: int | None = None):
    """Return (tokens, output, memo counts) of a Mojo run of the model's prompt."""
    with runner.MojoEngine(weights) as engine:
        if limit is not None:
            engine.limit_memo(limit)
        engine.feed(weights.prompt)
        chunk = engine.generate(steps, record=True)
        return chunk.tokens, chunk.output, engine.memo_counts()


# A small model that never halts and whose blocks see the same input again within
# 200 steps.
REPEATING = SyntheticSpec(run_bias=30, layers=2, data_vocab=2, key_bits=1, never_halt=True)


def test_engine_reuses_memo_outputs(mojo_extension, tmp_path):
    weights = _synthetic(REPEATING, 7, str(tmp_path))
    expected = reference.run_reference(weights, weights.prompt, 200)
    tokens, output, counts = _engine_run(weights, 200)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output
    assert counts.hits > 0
    assert counts.records > 0
    assert counts.clears == 0


def test_memo_cleared_when_full(mojo_extension, tmp_path):
    weights = _synthetic(REPEATING, 7, str(tmp_path))
    expected = reference.run_reference(weights, weights.prompt, 200)
    tokens, output, counts = _engine_run(weights, 200, limit=2)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output
    assert counts.clears > 0
    assert counts.records <= 2


def test_no_memo_for_fractional_weights(mojo_extension, tmp_path):
    weights = _synthetic(REPEATING, 7, str(tmp_path))
    for layer in weights.layers:
        for block in layer.blocks:
            block.w2.values[:] = block.w2.values + 0.25
    assert twins.input_bounds(weights) is None
    expected = reference.run_reference(weights, weights.prompt, 120)
    tokens, output, counts = _engine_run(weights, 120)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output
    assert counts.records == 0
    assert counts.hits == 0


def test_memo_per_expert_exactness(mojo_extension, tmp_path):
    # This model routes about half of the steps to each expert.
    weights = _synthetic(dataclasses.replace(REPEATING, layers=1), 16, str(tmp_path))
    # A bias of 1 - 2^52 keeps the unit off (its sum stays negative after any rounding),
    # but its interval passes 2^52, so expert 0 loses the memo.
    last = weights.layers[-1]
    last.experts[0].b1[0] = 1.0 - 2.0**52
    bound = twins.input_bounds(weights)[-1]
    assert not twins.layer_sums_exact(last.shared, [last.experts[0]], bound)
    assert twins.layer_sums_exact(last.shared, [last.experts[1]], bound)
    expected = reference.run_reference(weights, weights.prompt, 200)
    tokens, output, counts = _engine_run(weights, 200)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output
    # Only expert 1 looks up. A test over the whole layer would leave the memo off.
    assert 0 < counts.lookups < 200
    assert counts.hits > 0


def _first_layer_exact(weights) -> bool:
    """Return True when every expert of layer 0 passes the memo's exactness test."""
    first = weights.layers[0]
    bound = twins.input_bounds(weights)[0]
    return all(twins.layer_sums_exact(first.shared, [e], bound) for e in first.experts)


def _checked_run(weights, steps: int):
    """Return the memo counts of a Mojo run, after checking its tokens and output
    against the numpy oracle's."""
    expected = reference.run_reference(weights, weights.prompt, steps)
    tokens, output, counts = _engine_run(weights, steps)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output
    return counts


# 2^37 + 1 has 38 significant bits, so its Float64 has a set bit among the low 16 of
# the mantissa, where a memo word keeps a column or a row (engine.mojo, PACK_BITS).
UNPACKABLE = 2.0**37 + 1.0


@pytest.mark.parametrize("scaled", ["outputs", "inputs"])
def test_memo_skips_unpackable_values(mojo_extension, tmp_path, scaled):
    weights = _synthetic(REPEATING, 7, str(tmp_path))
    if scaled == "outputs":
        for layer in weights.layers:
            for block in layer.blocks:
                block.w2.values[:] = block.w2.values * UNPACKABLE
    else:
        for matrix in weights.embed:
            matrix.values[:] = matrix.values * UNPACKABLE
    # Layer 0 stays exact, so the engine tries its memo there.
    assert _first_layer_exact(weights)
    counts = _checked_run(weights, 200)
    if scaled == "outputs":
        # Every output has a scaled value: looked up, never recorded.
        assert counts.lookups > 0
        assert counts.records == 0
    else:
        # Every key has a scaled value: never looked up.
        assert counts.lookups == 0


def test_no_memo_past_packed_width(mojo_extension, tmp_path):
    # 65,537 dimensions: a row index no longer fits the 16 bits of a memo word.
    spec = dataclasses.replace(REPEATING, scratch=65534)
    weights = _synthetic(spec, 3, str(tmp_path))
    assert weights.width == 2**16 + 1
    # Its sums alone would let layer 0 use the memo.
    assert _first_layer_exact(weights)
    counts = _checked_run(weights, 60)
    assert counts.lookups == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3),
       shared_hidden=st.integers(0, 6), experts=st.integers(0, 3),
       twin_rows=st.booleans(), limit=st.sampled_from([None, 1, 2, 5]))  # fmt: skip
def test_memo_runs_match_reference(mojo_extension, seed, layers, shared_hidden, experts,
                                   twin_rows, limit):  # fmt: skip
    spec = SyntheticSpec(run_bias=30, layers=layers, shared_hidden=shared_hidden,
                         experts=experts, data_vocab=3, key_bits=2, twin_rows=twin_rows,
                         never_halt=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        weights = _synthetic(spec, seed, folder)
    expected = reference.run_reference(weights, weights.prompt, 150)
    tokens, output, _ = _engine_run(weights, 150, limit)
    assert len(tokens) == 150
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


def test_collatz_small_memo_matches_interpreter(mojo_extension):
    """Collatz through the universal model, with the engine's memo and with one
    cleared every 16 records (at most 3 lookups a step)."""
    program = load_program(str(EXAMPLES / "collatz.tl"))
    expected = interpreter.run_program(program)
    weights, packed = runner.load_universal()
    prompt = model_tokens.encode_prompt(weights.metadata, program, b"")
    clears = []
    for limit in (None, 16):
        with runner.MojoEngine(weights, packed) as engine:
            if limit is not None:
                engine.limit_memo(limit)
            engine.feed(prompt)
            decoded = runner.decode(engine, None, record=False)
            counts = engine.memo_counts()
        assert decoded.output == expected.output
        assert decoded.token_count == expected.steps
        assert counts.hits > 0
        clears.append(counts.clears)
    assert clears[1] > clears[0]


# Ten key bits and ten query bits, each +-1, are the only inputs of the shared blocks.
SIGNS = SyntheticSpec(key_bits=10, scratch=8, layers=2, dense_heads=1, exact_heads=1,
                      shared_hidden=4, experts=0, data_vocab=2, run_bias=30, never_halt=True)  # fmt: skip


def _sign_input_model(folder: str):
    """Return a model whose blocks read only the +-1 key and query bits."""
    weights = _synthetic(SIGNS, 1, folder)
    rng = np.random.default_rng(0)
    bits = 2 * SIGNS.key_bits
    for index, layer in enumerate(weights.layers):
        block = layer.shared
        dense = np.zeros((len(block.b1), SIGNS.width))
        dense[:, :bits] = rng.choice([-1.0, 1.0], size=(len(block.b1), bits))
        rows, cols = np.nonzero(dense)
        w1 = SparseMatrix(dense.shape, rows, cols, dense[rows, cols])
        shared = FeedForward(w1, block.b1, block.w2, block.b2)
        weights.layers[index] = dataclasses.replace(layer, shared=shared)
    return weights


def test_memo_hash_spreads_sign_flips(mojo_extension, tmp_path):
    """Keys of +-1 inputs differ only in sign bits, which a hash must not cancel."""
    weights = _sign_input_model(str(tmp_path))
    prompt = synthetic.random_prompt(SIGNS, 4000, np.random.default_rng(5))
    with runner.MojoEngine(weights) as engine:
        engine.feed(prompt)
        counts = engine.memo_counts()
    assert counts.records > 1000
    # Estimate: with linear probing and a uniform hash, a table half full reads about
    # 1.5 slots per hit and 2.5 per miss.
    assert counts.probes <= 3 * counts.lookups


@pytest.mark.parametrize("records", [0, -1, True, 1.5])
def test_limit_memo_rejects_bad_counts(mojo_extension, tmp_path, records):
    weights = _synthetic(REPEATING, 7, str(tmp_path))
    with runner.MojoEngine(weights) as engine:
        with pytest.raises(ValueError, match="positive record count"):
            engine.limit_memo(records)
