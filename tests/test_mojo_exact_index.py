"""The exact-match index of the Mojo KV cache against a brute-force argmax in numpy.

`probe_exact` appends key i at position i and then looks up query i. The expected winner
of each query is computed here over the full history of keys, without eviction: the
position with the largest q . k, the latest position on ties.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def extension(mojo_extension):
    return mojo_extension


def probe(extension, keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Return one row per step: (winner through attend, winner by brute force, indexed)."""
    return probe_with_steps(extension, keys, queries)[0]


def probe_with_steps(extension, keys: np.ndarray, queries: np.ndarray):
    """Return the rows of `probe` and the number of extra hash buckets visited."""
    keys = np.ascontiguousarray(keys, dtype=np.float64)
    queries = np.ascontiguousarray(queries, dtype=np.float64)
    results = np.zeros((len(keys), 3), dtype=np.int64)
    steps = extension.probe_exact(keys.ctypes.data, queries.ctypes.data, len(keys),
                                  keys.shape[1], results.ctypes.data)  # fmt: skip
    return results, int(steps)


def expected_winners(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    winners = []
    for step in range(len(keys)):
        scores = keys[: step + 1] @ queries[step]
        winners.append(np.flatnonzero(scores == scores.max())[-1])
    return np.array(winners)


def sentinel(n: int) -> np.ndarray:
    return np.array([0.0] * n + [2.0 * n - 1.0])


def random_case(rng, n, count, pool_size, malformed_keys, malformed_queries, sentinel_at):
    """Return (keys, queries) of shape (count, n + 1) following the exact-match forms,
    drawn from a small pool of sign patterns so that keys repeat and queries hit."""
    pool = rng.choice([-1.0, 1.0], size=(pool_size, n))
    keys = np.zeros((count, n + 1))
    queries = np.zeros((count, n + 1))
    for i in range(count):
        form = rng.integers(0, 4 if malformed_keys else 3)
        if form <= 1:  # a full key (s, n)
            keys[i, :n] = pool[rng.integers(pool_size)]
            keys[i, n] = n
        elif form == 2:  # a low key: ternary signs, c <= n - 2
            keys[i, :n] = rng.integers(-1, 2, size=n)
            keys[i, n] = n - 2 - rng.integers(0, 3)
        else:  # outside every allowed form
            keys[i, :n] = rng.integers(-2, 3, size=n)
            keys[i, n] = rng.integers(n - 1, 2 * n + 1)
        queries[i, :n] = pool[rng.integers(pool_size)]
        if rng.random() < 0.3:  # a miss: a sign pattern that may not be cached
            queries[i, :n] = rng.choice([-1.0, 1.0], size=n)
        queries[i, n] = 1.0
        if malformed_queries and rng.random() < 0.3:
            queries[i, rng.integers(0, n + 1)] = rng.integers(-2, 3)
    if sentinel_at is not None and sentinel_at < count:
        keys[sentinel_at] = sentinel(n)
    return keys, queries


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    count=st.integers(1, 80),
    pool_size=st.integers(1, 6),
    malformed_keys=st.booleans(),
    malformed_queries=st.booleans(),
    sentinel_at=st.one_of(st.none(), st.integers(0, 10)),
)
def test_index_equals_brute_force(
    extension, seed, n, count, pool_size, malformed_keys, malformed_queries, sentinel_at
):
    rng = np.random.default_rng(seed)
    keys, queries = random_case(rng, n, count, pool_size, malformed_keys, malformed_queries,
                                sentinel_at)  # fmt: skip
    results = probe(extension, keys, queries)
    expected = expected_winners(keys, queries)
    assert np.array_equal(results[:, 0], expected)
    assert np.array_equal(results[:, 1], expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), count=st.integers(1, 60))
def test_well_formed_keys_use_index(extension, seed, n, count):
    rng = np.random.default_rng(seed)
    keys, queries = random_case(rng, n, count, 4, False, False, sentinel_at=0)
    results = probe(extension, keys, queries)
    assert results[:, 2].all()


def test_miss_returns_sentinel(extension):
    n = 3
    keys = np.array([sentinel(n), [1, -1, 1, n], [1, 1, 1, n]], dtype=np.float64)
    queries = np.tile([-1.0, -1.0, -1.0, 1.0], (3, 1))
    results = probe(extension, keys, queries)
    assert results[2, 2] == 1
    assert results[2, 0] == 0


def test_repeated_key_latest_wins(extension):
    n = 2
    keys = np.array([sentinel(n), [1, -1, n], [-1, -1, n], [1, -1, n]], dtype=np.float64)
    queries = np.tile([1.0, -1.0, 1.0], (4, 1))
    results = probe(extension, keys, queries)
    assert results[1, 0] == 1
    assert results[3, 0] == 3


def test_malformed_key_disables_index(extension):
    n = 2
    keys = np.array([sentinel(n), [1, 1, n], [0, 0, n], [1, 1, n]], dtype=np.float64)
    queries = np.tile([-1.0, -1.0, 1.0], (4, 1))
    results = probe(extension, keys, queries)
    assert results[1, 2] == 1
    assert results[2, 2] == 0
    assert results[3, 2] == 0
    assert np.array_equal(results[:, 0], expected_winners(keys, queries))


def test_without_sentinel_no_index(extension):
    n = 3
    keys = np.array([[1, 1, 1, n], [1, -1, 1, n]], dtype=np.float64)
    queries = np.tile([1.0, 1.0, 1.0, 1.0], (2, 1))
    results = probe(extension, keys, queries)
    assert not results[:, 2].any()
    assert np.array_equal(results[:, 0], expected_winners(keys, queries))


def test_negative_zero_key_evicts_zero_key(extension):
    n = 2
    keys = np.array([sentinel(n), [0.0, 0.0, 0.0], [-0.0, 0.0, -0.0]], dtype=np.float64)
    queries = np.tile([1.0, 1.0, 1.0], (3, 1))
    results = probe(extension, keys, queries)
    assert np.array_equal(results[:, 0], expected_winners(keys, queries))


def test_sign_keys_spread_over_buckets(extension):
    """Keys of +-1 differ only in the sign bits of their Float64 patterns. The hash must
    still spread them, because otherwise every lookup scans the whole table."""
    n, count = 20, 2000
    rng = np.random.default_rng(7)
    signs = rng.choice([-1.0, 1.0], size=(count, n))
    keys = np.hstack([signs, np.full((count, 1), float(n))])
    keys[0] = sentinel(n)
    queries = np.hstack([signs, np.ones((count, 1))])
    results, steps = probe_with_steps(extension, keys, queries)
    lookups = 2 * count  # one when appending, one for the query
    assert results[1:, 2].all()
    assert steps / lookups < 2.0
