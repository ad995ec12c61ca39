"""The torch runtime's KV caches (`HeadCaches`) against a brute-force argmax over every
entry ever appended: exact-match lookups, the sentinel for misses, eviction of repeated
keys, latest-position ties, and keys that switch the index off."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.runtime.torch_heads import HeadCaches, HeadLayout, KeyTable

BITS = 3  # key width BITS + 1
VALUE_WIDTH = 2

signs = st.lists(st.sampled_from([-1.0, 1.0]), min_size=BITS, max_size=BITS)
ternary = st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=BITS, max_size=BITS)
exact_keys = st.one_of(
    signs.map(lambda s: [*s, float(BITS)]),
    st.tuples(ternary, st.integers(-3, BITS - 2)).map(lambda t: [*t[0], float(t[1])]),
    st.just([0.0] * BITS + [2.0 * BITS - 1]),
)
any_keys = st.one_of(
    st.lists(st.integers(-2, 2).map(float), min_size=BITS + 1, max_size=BITS + 1),
    ternary.map(lambda s: [*s, 2.0 * BITS - 1]),  # the sentinel's last component
)
exact_queries = signs.map(lambda s: [*s, 1.0])
any_queries = st.lists(st.integers(-2, 2).map(float), min_size=BITS + 1, max_size=BITS + 1)
values = st.lists(st.integers(-9, 9).map(float), min_size=VALUE_WIDTH, max_size=VALUE_WIDTH)


def _layout(exact: bool) -> HeadLayout:
    return HeadLayout(slice(0), slice(0), slice(0), slice(0), BITS + 1, VALUE_WIDTH,
                      BITS if exact else None)  # fmt: skip


def _brute_force(entries, query) -> list[float]:
    """The value of the best-scoring entry; the latest one wins ties."""
    best = max(range(len(entries)),
               key=lambda i: (float(np.dot(entries[i][0], query)), i))  # fmt: skip
    return entries[best][1]


def _steps(key_strategy, query_strategy, programs: int, value_strategy=values):
    step = st.tuples(key_strategy, value_strategy, query_strategy)
    return st.lists(st.lists(step, min_size=programs, max_size=programs),
                    min_size=1, max_size=40)  # fmt: skip


def _attend_like_the_runtime(caches: HeadCaches, key, value, query, position: int):
    """Call `repeat_one`, then `attend_one` when it returns None, as one program's
    decoding step does."""
    step = query.tobytes() + key.tobytes() + value.tobytes()
    found = caches.repeat_one(0, step, position)
    if found is None:
        found = caches.attend_one(0, key, value, query, position, step)
    return found


def _run(exact: bool, steps, programs: int) -> None:
    rows = HeadCaches(_layout(exact), programs)
    single = [HeadCaches(_layout(exact), 1) for _ in range(programs)]
    entries: list[list] = [[] for _ in range(programs)]
    for position, step in enumerate(steps):
        keys = np.array([key for key, _, _ in step]) + 0.0
        vals = np.array([value for _, value, _ in step])
        queries = np.array([query for _, _, query in step]) + 0.0
        got = rows.attend_rows(list(range(programs)), keys, vals, queries,
                               [position] * programs)  # fmt: skip
        for p in range(programs):
            entries[p].append((keys[p], list(vals[p])))
            expected = _brute_force(entries[p], queries[p])
            alone = _attend_like_the_runtime(single[p], keys[p], vals[p], queries[p], position)
            assert list(got[p]) == expected
            assert list(alone) == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_exact_head_matches_brute_force(data):
    programs = data.draw(st.integers(1, 4))
    keys = data.draw(st.sampled_from([exact_keys, st.one_of(exact_keys, any_keys)]))
    queries = data.draw(st.sampled_from([exact_queries, st.one_of(exact_queries, any_queries)]))
    _run(True, data.draw(_steps(keys, queries, programs)), programs)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_scored_head_matches_brute_force(data):
    programs = data.draw(st.integers(1, 4))
    _run(False, data.draw(_steps(any_keys, any_queries, programs)), programs)


def test_repeated_key_keeps_one_entry():
    caches = HeadCaches(_layout(True), 1)
    key = np.array([1.0, -1.0, 1.0, float(BITS)])
    for position in range(5):
        caches.attend_one(0, key, np.array([position, 0.0]), key, position)
    assert caches.sizes[0] == 1


few_keys = st.sampled_from([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
few_queries = st.sampled_from([[1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
few_values = st.sampled_from([[1.0, 2.0], [0.0, 0.0]])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_repeated_steps_match_brute_force(data):
    # For a query seen at the last step, `_rescore` compares only the last winner and
    # the written slot. For a whole step seen at the last position, `repeat_one`
    # returns that position's value. Neither scores every key again.
    exact = data.draw(st.booleans())
    keys = st.one_of(few_keys, any_keys, exact_keys) if exact else st.one_of(few_keys, any_keys)
    queries = st.one_of(few_queries, exact_queries) if exact else few_queries
    programs = data.draw(st.integers(1, 2))
    steps = _steps(keys, queries, programs, st.one_of(few_values, values))
    _run(exact, data.draw(steps), programs)


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.one_of(few_keys, any_keys), values), min_size=1, max_size=30),
       exact=st.booleans())  # fmt: skip
def test_extend_matches_appending_one_by_one(rows, exact):
    keys = np.array([key for key, _ in rows]) + 0.0
    vals = np.array([value for _, value in rows])
    extended = HeadCaches(_layout(exact), 1)
    extended.extend(0, keys, vals, 3)
    appended = HeadCaches(_layout(exact), 1)
    query = np.zeros(BITS + 1)
    for i in range(len(rows)):
        appended.attend_one(0, keys[i], vals[i], query, 3 + i)
    size = appended.sizes[0]
    assert extended.sizes[0] == size
    assert extended.keys[0, :size].tolist() == appended.keys[0, :size].tolist()
    assert extended.values[0, :size].tolist() == appended.values[0, :size].tolist()
    assert extended.positions[0, :size].tolist() == appended.positions[0, :size].tolist()
    assert extended.usable == appended.usable
    assert extended.sentinel == appended.sentinel


wide_keys = st.lists(st.integers(-9, 9).map(float), min_size=BITS + 1, max_size=BITS + 1)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.one_of(wide_keys, exact_keys),
                  st.lists(st.tuples(values, st.one_of(any_queries, exact_queries)),
                           min_size=3, max_size=3)),
        min_size=1, max_size=150),
    exact=st.booleans(),
    batch=st.booleans(),
    distinct=st.integers(0, 80),
)  # fmt: skip
def test_shared_key_table_matches_brute_force(steps, exact, batch, distinct):
    """Three heads with one key table: the same key at every position, their own values
    and queries. Up to 80 distinct keys first, so that the table grows (it starts with
    64 slots) while the other heads still have fewer."""
    first = [([float(i % 9), float(i // 9), 1.0, 2.0],
              [([float(i), float(h)], [1.0, 0.0, -1.0, 1.0]) for h in range(3)])
             for i in range(distinct)]  # fmt: skip
    steps = first + steps
    table = KeyTable(BITS + 1, BITS if exact else None, 1)
    heads = [HeadCaches(_layout(exact), 1, table) for _ in range(3)]
    entries: list[list] = [[] for _ in heads]
    for position, (key, per_head) in enumerate(steps):
        key = np.array(key) + 0.0
        for h, (caches, (value, query)) in enumerate(zip(heads, per_head)):
            value, query = np.array(value), np.array(query) + 0.0
            entries[h].append((key, list(value)))
            if batch:
                got = caches.attend_rows([0], key[None, :], value[None, :], query[None, :],
                                         [position])[0]  # fmt: skip
            else:
                got = _attend_like_the_runtime(caches, key, value, query, position)
            assert list(got) == _brute_force(entries[h], query)
    assert table.sizes[0] == len({tuple(key) for key, _ in steps})


def test_shared_key_table_rejects_other_layout():
    table = KeyTable(BITS + 1, BITS, 1)
    with pytest.raises(ValueError, match="shared key table"):
        HeadCaches(_layout(False), 1, table)
    with pytest.raises(ValueError, match="shared key table"):
        HeadCaches(_layout(True), 2, table)
