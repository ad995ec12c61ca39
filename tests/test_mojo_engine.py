"""The Mojo runtime against the numpy oracle on random synthetic weight files.

Each model is written to a real safetensors file, read back by both runtimes and
decoded from its prompt. The token streams, the output bytes and the KV cache sizes
must agree exactly. A cache's size is the number of distinct keys its head has seen.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlc.mojo import reference, runner, synthetic
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import SparseMatrix, load_weights

MAX_TOKENS = 120


@pytest.fixture(scope="module", autouse=True)
def extension(mojo_extension):
    """Build the extension once for every test of this file."""
    return mojo_extension


SPECS = st.builds(
    SyntheticSpec,
    key_bits=st.integers(1, 4),
    scratch=st.integers(2, 20),
    layers=st.integers(0, 3),
    dense_heads=st.integers(0, 2),
    exact_heads=st.integers(0, 2),
    dense_key_width=st.integers(0, 3),
    value_width=st.integers(0, 3),
    shared_hidden=st.integers(0, 6),
    experts=st.integers(0, 3),
    expert_hidden=st.integers(1, 5),
    data_vocab=st.integers(1, 6),
    byte_bits=st.booleans(),
    density=st.sampled_from([0.2, 0.4, 0.7]),
    run_bias=st.integers(0, 24),
    well_formed=st.booleans(),
    twin_rows=st.booleans(),
    private_head_rows=st.booleans(),
)


def distinct_key_counts(model: reference.ReferenceModel) -> list[int]:
    """Return, per head in layer order, how many distinct keys the oracle has cached."""
    return [
        len(np.unique(cache.keys, axis=0)) for layer in model.caches for cache in layer
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPECS, seed=st.integers(0, 2**32 - 1), prompt_length=st.integers(1, 12))
def test_tokens_equal_reference(spec, seed, prompt_length):
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed,
                                     prompt_length)  # fmt: skip
        weights = load_weights(path)
        expected = reference.run_reference(weights, weights.prompt, MAX_TOKENS)
        with runner.MojoEngine(weights) as engine:
            engine.feed(weights.prompt)
            decoded = runner.decode(engine, MAX_TOKENS)
            sizes = engine.cache_sizes()
    assert decoded.tokens.shape == expected.tokens.shape
    assert np.array_equal(decoded.tokens, expected.tokens)
    assert decoded.output == expected.output
    assert sizes == distinct_key_counts(expected.model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPECS, seed=st.integers(0, 2**32 - 1))
def test_separate_embedding_rows(spec, seed):
    # With no residual row written by both the embedding and a layer, the engine keeps
    # the embedding in x itself and sets the layers' rows back to zero each position.
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 8)
        weights = load_weights(path)
    layer_rows = set()
    for layer in weights.layers:
        for head in layer.heads:
            layer_rows.update(head.wo.rows.tolist())
        for block in layer.blocks:
            layer_rows.update(block.w2.rows.tolist())
            layer_rows.update(np.flatnonzero(np.asarray(block.b2)).tolist())
    rows = sorted(layer_rows)
    for f, matrix in enumerate(weights.embed):
        keep = ~np.isin(matrix.cols, rows)
        weights.embed[f] = SparseMatrix(matrix.shape, matrix.rows[keep], matrix.cols[keep],
                                        matrix.values[keep])  # fmt: skip

    expected = reference.run_reference(weights, weights.prompt, MAX_TOKENS)
    tokens, output = runner.run_tokens(weights, weights.prompt, MAX_TOKENS)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@pytest.mark.parametrize("seed", range(6))
def test_run_tokens_from_file(tmp_path, seed):
    spec = SyntheticSpec(run_bias=30, well_formed=seed % 2 == 0, byte_bits=seed % 3 == 0)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, seed, 10)
    prompt = load_weights(path).prompt
    tokens, output = runner.run_tokens(path, prompt, 200)
    expected_tokens, expected_output = reference.run_tokens(path, prompt, 200)
    assert np.array_equal(tokens, expected_tokens)
    assert output == expected_output


def test_engine_rejects_bad_counts_and_prompts(tmp_path):
    spec = SyntheticSpec(run_bias=40)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 3, 9)
    weights = load_weights(path)
    with runner.MojoEngine(weights) as engine:
        with pytest.raises(ValueError, match="whole token values"):
            engine.feed(np.full(weights.prompt.shape, 0.5))
        engine.feed(weights.prompt.astype(np.float64))
        for count in (-5, 2.0, True):
            with pytest.raises(ValueError, match="token count"):
                engine.generate(count, record=True)
        assert engine.generate(np.int64(3), record=True).emitted == 3


@pytest.mark.parametrize("columns", [(0,), (0, 1)])
def test_router_on_few_columns_matches_reference(tmp_path, columns):
    # Column 0 is -1, 0 or +1, so a router that reads it alone takes all three paths:
    # no input (its bias), the one-hot table at +1 and the product at -1.
    spec = SyntheticSpec(run_bias=30, layers=2, experts=3, never_halt=True)
    for seed in range(4):
        path = synthetic.write_model(tmp_path / f"model{seed}.safetensors", spec, seed, 9)
        weights = load_weights(path)
        rng = np.random.default_rng(seed)
        layers = []
        for layer in weights.layers:
            rows = np.repeat(np.arange(spec.experts), len(columns))
            cols = np.tile(np.array(columns), spec.experts)
            values = rng.integers(-3, 4, len(rows)).astype(np.float64)
            router = SparseMatrix(layer.router_w.shape, rows, cols, values)
            layers.append(dataclasses.replace(layer, router_w=router))
        weights = dataclasses.replace(weights, layers=layers)
        expected = reference.run_reference(weights, weights.prompt, 150)
        with runner.MojoEngine(weights) as engine:
            engine.feed(weights.prompt)
            chunk = engine.generate(150, record=True)
        assert np.array_equal(chunk.tokens, expected.tokens)
        assert chunk.output == expected.output


def test_chunked_generation_equals_one_call(tmp_path):
    spec = SyntheticSpec(run_bias=40, layers=3)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 11, 9)
    weights = load_weights(path)
    with runner.MojoEngine(weights) as engine:
        engine.feed(weights.prompt)
        whole = engine.generate(300, record=True)
    pieces, outputs = [], b""
    with runner.MojoEngine(weights) as engine:
        engine.feed(weights.prompt)
        for size in (1, 2, 3, 50, 244):
            piece = engine.generate(size, record=True)
            pieces.append(piece.tokens)
            outputs += piece.output
    assert np.array_equal(np.concatenate(pieces), whole.tokens)
    assert outputs == whole.output


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_prompt_fed_in_pieces_gives_same_tokens(tmp_path, monkeypatch, chunk):
    spec = SyntheticSpec(run_bias=40, layers=2)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 12, 10)
    weights = load_weights(path)
    expected = reference.run_reference(weights, weights.prompt, 200)
    monkeypatch.setattr(runner, "FEED_CHUNK", chunk)
    narrow = weights.prompt.astype(np.uint8)
    with runner.MojoEngine(weights) as engine:
        engine.feed(narrow)
        decoded = runner.decode(engine, 200)
    assert np.array_equal(decoded.tokens, expected.tokens)
    assert decoded.output == expected.output


def test_unrecorded_run_gives_same_output(tmp_path):
    spec = SyntheticSpec(run_bias=40)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 5, 6)
    weights = load_weights(path)
    recorded, output = runner.run_tokens(path, weights.prompt, 500)
    unrecorded, unrecorded_output = runner.run_tokens(path, weights.prompt, 500, record=False)
    assert unrecorded is None
    assert unrecorded_output == output


def test_decode_counts_unrecorded_tokens(tmp_path):
    spec = SyntheticSpec(run_bias=40)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 5, 6)
    weights = load_weights(path)
    expected, _ = reference.run_tokens(weights, weights.prompt, 3000)
    with runner.MojoEngine(weights) as engine:
        engine.feed(weights.prompt)
        decoded = runner.decode(engine, 3000, record=False)
    assert decoded.token_count == len(expected)
    assert decoded.last_token == tuple(expected[-1])
    assert decoded.previous_token == tuple(expected[-2])


def test_halting_token_stops_run(tmp_path):
    spec = SyntheticSpec(run_bias=-40)  # every prediction's kind is HALT or TRAP
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 3, 4)
    weights = load_weights(path)
    with runner.MojoEngine(weights) as engine:
        engine.feed(weights.prompt)
        decoded = runner.decode(engine, 100)
    assert decoded.token_count == 1
    assert decoded.tokens[0, weights.kind_field] != weights.run_value
    assert decoded.previous_token == tuple(weights.prompt[-1])


def test_prompt_value_outside_vocabulary(tmp_path):
    path = synthetic.write_model(tmp_path / "model.safetensors", SyntheticSpec(), 1, 4)
    weights = load_weights(path)
    prompt = weights.prompt.copy()
    prompt[2, weights.kind_field] = weights.fields[weights.kind_field].vocab
    with pytest.raises(ValueError, match="outside its vocabulary"):
        runner.run_tokens(path, prompt, 10)


def test_packed_vocab_past_int32_rejected(tmp_path):
    """The engine stores token fields as Int32, so a vocabulary past that is an error."""
    path = synthetic.write_model(tmp_path / "model.safetensors", SyntheticSpec(), 1, 4)
    weights = load_weights(path)
    packed = runner.pack_model(weights)
    ints = packed.ints.copy()
    # The header: magic, D, F, L, kind, RUN, out_valid, the byte terms, then the vocabs.
    header = int(ints[0])
    byte_terms = int(ints[header + 7])
    ints[header + 8 + 2 * byte_terms] = 2**31
    damaged = runner.PackedModel(ints, packed.indices, packed.value_words, packed.floats,
                                 packed.narrow)  # fmt: skip
    with pytest.raises(Exception, match="2\\^31 - 1"):
        runner.MojoEngine(weights, damaged)


def test_empty_prompt_rejected(tmp_path):
    path = synthetic.write_model(tmp_path / "model.safetensors", SyntheticSpec(), 1, 4)
    fields = len(load_weights(path).fields)
    with pytest.raises(ValueError, match="non-empty"):
        runner.run_tokens(path, np.zeros((0, fields), dtype=np.int64), 10)


def test_corrupted_head_changes_tokens(tmp_path):
    spec = SyntheticSpec(run_bias=40, exact_heads=0, dense_heads=2, layers=1)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 21, 10)
    weights = load_weights(path)
    tokens, _ = runner.run_tokens(weights, weights.prompt, 200)
    head = weights.layers[0].heads[0]
    head.wo.values[:] *= 7.0
    corrupted, _ = runner.run_tokens(weights, weights.prompt, 200)
    expected, _ = reference.run_tokens(weights, weights.prompt, 200)
    assert np.array_equal(corrupted, expected)
    assert not np.array_equal(corrupted, tokens)


def test_fractional_embedding_summed_in_full(tmp_path):
    spec = SyntheticSpec(run_bias=40)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 8, 7)
    weights = load_weights(path)
    for matrix in weights.embed:
        matrix.values[:] *= 0.5
    assert not runner._integer_valued(weights.embed)
    tokens, output = runner.run_tokens(weights, weights.prompt, 200)
    expected_tokens, expected_output = reference.run_tokens(weights, weights.prompt, 200)
    assert np.array_equal(tokens, expected_tokens)
    assert output == expected_output


def test_fractional_weights_use_plain_products(tmp_path):
    # A half in the first layer's q, k, v weights and in a b2 vector turns off the
    # incremental first-layer projections and the fusion of the shared block with the
    # experts. The engine must still match the oracle token for token.
    from tlc.model.weights import write_weight_file

    spec = SyntheticSpec(run_bias=30, layers=2, shared_hidden=4, experts=2)
    tensors, metadata = synthetic.build_model(spec, 7, 8)
    name = next(key for key in sorted(tensors)
                if key.startswith("layers.0.heads.") and key.endswith(".wk.values")
                and len(tensors[key]))  # fmt: skip
    tensors[name] = tensors[name].copy()
    tensors[name][0] += 0.5
    tensors["layers.0.shared.b2"] = tensors["layers.0.shared.b2"].copy()
    tensors["layers.0.shared.b2"][0] += 0.5
    path = tmp_path / "fractional.safetensors"
    write_weight_file(path, tensors, metadata)
    weights = load_weights(path)
    assert runner.first_layer_qkv(weights) is None
    expected = reference.run_reference(weights, weights.prompt, MAX_TOKENS)
    with runner.MojoEngine(weights) as engine:
        engine.feed(weights.prompt)
        decoded = runner.decode(engine, MAX_TOKENS)
    assert np.array_equal(decoded.tokens, expected.tokens)
    assert decoded.output == expected.output


def test_wide_weights_match_reference(tmp_path):
    # 2^30 + 1 has no Float32 form, so the packer keeps every entry as Float64 and the
    # engine stores rows as 64-bit integers beside the values.
    spec = SyntheticSpec(run_bias=30, layers=2, shared_hidden=4, experts=2, twin_rows=True)
    path = synthetic.write_model(tmp_path / "model.safetensors", spec, 9, 8)
    weights = load_weights(path)
    unembed = next(matrix for matrix in weights.unembed if len(matrix.values))
    unembed.values[0] = 2.0**30 + 1
    assert not runner.pack_model(weights).narrow
    expected = reference.run_reference(weights, weights.prompt, MAX_TOKENS)
    tokens, output = runner.run_tokens(weights, weights.prompt, MAX_TOKENS)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


def _synthetic_weights(spec: SyntheticSpec, seed: int):
    """Return the weights of a synthetic model written to and read from a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic.write_model(Path(folder) / "model.safetensors", spec, seed, 8)
        return load_weights(path)


def _assert_matches_reference(weights) -> None:
    """Assert that the engine gives the oracle's tokens and output after the prompt."""
    expected = reference.run_reference(weights, weights.prompt, MAX_TOKENS)
    tokens, output = runner.run_tokens(weights, weights.prompt, MAX_TOKENS)
    assert np.array_equal(tokens, expected.tokens)
    assert output == expected.output


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), token_values=st.booleans())
def test_values_shared_with_a_key_follower(mojo_extension, seed, token_values):
    # All exact-match heads have the same key projection, so exact head 0 of layer 0
    # leads their keys. Exact heads 2 of both layers get the value projection of exact
    # head 1 of layer 0, not that of the key leader, and read head 1's values. With
    # `token_values` that projection reads token dimensions only, so layer 1's head 2
    # may read the values that layer 0 cached.
    spec = SyntheticSpec(run_bias=30, layers=2, dense_heads=1, exact_heads=3)
    weights = _synthetic_weights(spec, seed)
    exact = [h for h, head in enumerate(weights.layers[0].heads) if head.lookup == "exact"]
    source = weights.layers[0].heads[exact[1]]
    if token_values:
        dense = source.wv.to_dense()
        dense[:, spec.scratch_start :] = 0.0
        rows, cols = np.nonzero(dense)
        source = dataclasses.replace(
            source, wv=SparseMatrix(dense.shape, rows, cols, dense[rows, cols])
        )
        weights.layers[0].heads[exact[1]] = source
    assert not np.array_equal(source.wv.to_dense(), weights.layers[0].heads[exact[0]].wv.to_dense())
    for layer in weights.layers:
        layer.heads[exact[2]] = dataclasses.replace(
            layer.heads[exact[2]], wv=source.wv, bv=source.bv
        )
    _assert_matches_reference(weights)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), written=st.booleans())
def test_keys_shared_across_layers(mojo_extension, seed, written):
    # Every synthetic exact-match head has the same key projection, which reads token
    # dimensions only. So the second layer's head finds its slots through the first
    # layer's cache. With `written`, both keys also read a scratch row that the first
    # layer writes. The weights stay equal but the keys differ, so each head must keep
    # its own cache.
    spec = SyntheticSpec(run_bias=30, layers=2, dense_heads=1, exact_heads=1)
    weights = _synthetic_weights(spec, seed)
    exact = [next(h for h, head in enumerate(layer.heads) if head.lookup == "exact")
             for layer in weights.layers]  # fmt: skip
    keys = [layer.heads[h].wk.to_dense() for layer, h in zip(weights.layers, exact)]
    assert np.array_equal(keys[0], keys[1])
    if written:
        for layer, h, dense in zip(weights.layers, exact, keys):
            dense[spec.key_bits, spec.shared_scratch[0]] = 1.0
            rows, cols = np.nonzero(dense)
            key = SparseMatrix(dense.shape, rows, cols, dense[rows, cols])
            layer.heads[h] = dataclasses.replace(layer.heads[h], wk=key)
    dependencies = runner.head_dependencies(weights)
    assert (dependencies[1][exact[1]][0] is None) == written
    _assert_matches_reference(weights)
