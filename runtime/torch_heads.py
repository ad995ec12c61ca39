"""The KV caches of the PyTorch runtime's hard-max heads, with exact eviction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INITIAL_CACHE_SLOTS = 64


@dataclass
class HeadLayout:
    query: slice
    key: slice
    value: slice
    output: slice  # where the winning value goes in the layer's concatenated values
    key_width: int
    value_width: int
    exact_bits: int | None


class KeyTable:
    """The cached keys of one head, or of several heads of one layer whose key
    projections are equal, for a group of programs (one per batch row).

    Heads with equal key projections see the same key at every position, so they keep
    the same entries in the same slots: program p's keys are keys[p, :sizes[p]], and a
    dict per program finds a key's slot by its bytes. The table also records whether
    every key has a form that the exact-match index allows (`usable`) and the
    sentinel's slot.
    """

    def __init__(self, key_width: int, exact_bits: int | None, programs: int):
        self.keys = np.zeros((programs, INITIAL_CACHE_SLOTS, key_width))
        self.sizes = [0] * programs
        self.slot_of_key: list[dict[bytes, int]] = [{} for _ in range(programs)]
        self.exact_bits = exact_bits
        self.usable = [exact_bits is not None] * programs
        self.sentinel: list[int | None] = [None] * programs
        if exact_bits is not None:
            self.ones = np.ones(exact_bits).tobytes()

    def slot(self, program: int, identity: bytes, key: np.ndarray) -> int:
        """Return the slot of `key` (whose bytes are `identity`), adding it if new."""
        slot = self.slot_of_key[program].get(identity)
        if slot is not None:
            return slot
        slot = self.sizes[program]
        if slot == self.keys.shape[1]:
            self.keys = np.concatenate([self.keys, np.zeros_like(self.keys)], axis=1)
        self.sizes[program] = slot + 1
        self.slot_of_key[program][identity] = slot
        self.keys[program, slot] = key
        if self.usable[program]:
            self._check_key_form(program, key, slot)
        return slot

    def _check_key_form(self, program: int, key: np.ndarray, slot: int) -> None:
        """Keep the index only while keys are (s, n) with s in {-1, +1}^n, (s, c) with s in
        {-1, 0, +1}^n and c <= n - 2, or the sentinel (0 .. 0, 2n - 1)."""
        n = self.exact_bits
        signs, last = key[:-1], key[-1]
        if last == n and np.abs(signs).tobytes() == self.ones:
            return
        if last <= n - 2 and bool(np.all(np.isin(signs, (-1.0, 0.0, 1.0)))):
            return
        if last == 2 * n - 1 and not signs.any():
            self.sentinel[program] = slot
            return
        self.usable[program] = False


class HeadCaches:
    """The KV caches of one hard-max head for a group of programs (one per batch row),
    one entry per distinct key in each.

    Program p's entries are the keys of its `KeyTable` rows, values[p, ...] and
    positions[p, ...]: the position that last wrote each. A new entry whose key equals
    a cached one replaces it (exact eviction, docs/model.md section 1). Callers pass
    keys with -0.0 already turned into 0.0, because the table finds equal keys by their
    bytes. Heads that share a table must append at the same positions, in the same
    order of heads at every position.

    For a query (t, 1) with every t_i in {-1, +1}, an exact-match head looks in the dict:
    the entry with key (t, n), else the sentinel (0 .. 0, 2n - 1). The dict serves a
    program only while every key it cached has one of the forms the proof allows. Any
    other query, and every query of other heads, scores every cached key, and the
    latest position wins among the best.
    """

    def __init__(self, layout: HeadLayout, programs: int, table: KeyTable | None = None):
        # NOTE: one array contains every program's entries, so that a batch step indexes
        # them at once. Each program therefore takes as many slots as the program with
        # the most, and a batch beside one memory-heavy program costs its cache size
        # times the batch size.
        if table is None:
            table = KeyTable(layout.key_width, layout.exact_bits, programs)
        if (table.keys.shape[0], table.keys.shape[2], table.exact_bits) != (
            programs, layout.key_width, layout.exact_bits
        ):
            raise ValueError("a shared key table must have the head's programs, key width "
                             "and exact lookup")  # fmt: skip
        self.table = table
        # The table changes these lists only in place, so the references stay valid.
        self.sizes = table.sizes
        self.slot_of_key = table.slot_of_key
        self.usable = table.usable
        self.sentinel = table.sentinel
        self.capacity = INITIAL_CACHE_SLOTS
        self.values = np.zeros((programs, self.capacity, layout.value_width))
        self.positions = np.zeros((programs, self.capacity), dtype=np.int64)
        self.exact_bits = layout.exact_bits
        # Per program, the last scored query's bytes and its winner; see `_rescore`.
        self.scored: list[tuple[bytes, int] | None] = [None] * programs
        # Per program, the last step's (key, value, query) bytes, the slot it wrote and
        # the value it returned; see `attend_one`.
        self.last_step: list[tuple[bytes, int, np.ndarray] | None] = [None] * programs
        if layout.exact_bits is not None:
            self.last_bytes = np.array([float(layout.exact_bits)]).tobytes()
            self.ones = np.ones(layout.exact_bits).tobytes()

    @property
    def keys(self) -> np.ndarray:
        return self.table.keys

    # --- appending ---

    def _grow(self) -> None:
        """Give values and positions as many slots as the key table has."""
        capacity = self.table.keys.shape[1]
        extra = capacity - self.capacity
        programs, _, width = self.values.shape
        self.values = np.concatenate([self.values, np.zeros((programs, extra, width))], axis=1)
        self.positions = np.concatenate([self.positions,
                                         np.zeros((programs, extra), dtype=np.int64)],
                                        axis=1)  # fmt: skip
        self.capacity = capacity

    def _slot(self, program: int, identity: bytes, key: np.ndarray) -> int:
        slot = self.table.slot(program, identity, key)
        if slot >= self.capacity:
            self._grow()
        return slot

    def extend(self, program: int, keys: np.ndarray, values: np.ndarray,
               first_position: int) -> None:  # fmt: skip
        """Append rows (keys[i], values[i]) at positions first_position + i, in order,
        without attending: what appending them one by one would leave in the cache."""
        width = keys.shape[1] * 8
        identities = keys.tobytes()
        table = self.slot_of_key[program]
        latest: dict[int, int] = {}  # slot -> the last row that writes it
        for i in range(len(keys)):
            identity = identities[i * width : (i + 1) * width]
            slot = table.get(identity)
            if slot is None:
                slot = self._slot(program, identity, keys[i])
            latest[slot] = i
        if self.sizes[program] > self.capacity:
            self._grow()
        slots = list(latest)
        rows = list(latest.values())
        self.values[program, slots] = values[rows]
        self.positions[program, slots] = first_position + np.array(rows, dtype=np.int64)
        self.scored[program] = None
        self.last_step[program] = None

    # --- attending ---

    def attend_one(self, program: int, key: np.ndarray, value: np.ndarray,
                   query: np.ndarray, position: int, step: bytes | None = None) -> np.ndarray:  # fmt: skip
        """Append (key, value) at `position`, then return the winning value for `query`.

        `step`, when given, is the bytes of query, key and value, kept for `repeat_one`.
        """
        identity = key.tobytes()
        slot = self.slot_of_key[program].get(identity)
        if slot is None or slot >= self.capacity:
            slot = self._slot(program, identity, key)
        self.values[program, slot] = value
        self.positions[program, slot] = position
        winner = None
        if self.usable[program] and query[-1] == 1.0:
            winner = self.slot_of_key[program].get(query[:-1].tobytes() + self.last_bytes)
            sentinel = self.sentinel[program]
            # A hit is a key (t, n) with t in {-1, +1}^n, so the query has the exact form.
            if winner == sentinel:
                winner = None
            if winner is None and sentinel is not None:
                if np.abs(query[:-1]).tobytes() == self.ones:
                    winner = sentinel
        if winner is None:
            winner = self._rescore(program, query, slot)
        else:
            self.scored[program] = None  # `_rescore` assumes one write since the last
        result = self.values[program, winner].copy()
        self.last_step[program] = None if step is None else (step, slot, result)
        return result

    def repeat_one(self, program: int, step: bytes, position: int) -> np.ndarray | None:
        """Return the winning value for a step whose query, key and value bytes `step`
        equal those of this program's previous `attend_one` call, or None (changing
        nothing) when they differ.

        Only the position of the previous call's slot changes: the key owns the same
        slot and gets the same value, and the winner stays the same. It was that slot,
        which is still the latest of its score, or an entry that scored higher than it,
        because that slot won ties at the previous position.
        """
        last = self.last_step[program]
        if last is None or last[0] != step:
            return None
        self.positions[program, last[1]] = position
        return last[2]

    def _rescore(self, program: int, query: np.ndarray, written: int) -> int:
        """Return the brute-force winner for `query` after a write to slot `written`.

        When the query equals the one scored at the last step, only the written slot
        changed since then (a new key, or a new position and value for a cached key).
        The winner is then the written slot if it scores at least as high as the last
        winner, because it is the latest entry, and the last winner otherwise.
        """
        identity = query.tobytes()
        scored = self.scored[program]
        if scored is not None and scored[0] == identity:
            previous = scored[1]
            keys = self.table.keys[program]
            if previous == written or keys[written] @ query >= keys[previous] @ query:
                winner = written
            else:
                winner = previous
        else:
            winner = self._brute_force([program], query[None, :])[0]
        self.scored[program] = (identity, winner)
        return winner

    def attend_rows(self, programs: list[int], keys: np.ndarray, values: np.ndarray,
                    queries: np.ndarray, positions: list[int]) -> np.ndarray:  # fmt: skip
        """`attend_one` for rows of distinct programs at once; returns (n, value width)."""
        width = keys.shape[1] * 8
        identities = keys.tobytes()
        tables = self.slot_of_key
        slots = [tables[p].get(identities[i * width : (i + 1) * width])
                 for i, p in enumerate(programs)]  # fmt: skip
        for i, slot in enumerate(slots):
            if slot is None or slot >= self.capacity:
                identity = identities[i * width : (i + 1) * width]
                slots[i] = self._slot(programs[i], identity, keys[i])
        self.values[programs, slots] = values
        self.positions[programs, slots] = positions
        for program in programs:
            self.scored[program] = None  # `_rescore` assumes one write since the last
            self.last_step[program] = None
        winners, brute = self._exact_winners(programs, queries)
        if brute:
            found = self._brute_force([programs[i] for i in brute], queries[brute])
            for i, slot in zip(brute, found):
                winners[i] = slot
        return self.values[programs, winners]

    def _exact_winners(self, programs: list[int], queries: np.ndarray):
        """Return (winners, rows left for scoring) of the exact-match index."""
        if self.exact_bits is None:
            return [0] * len(programs), list(range(len(programs)))
        signs = np.ascontiguousarray(queries[:, :-1])
        width = signs.shape[1] * 8
        probes = signs.tobytes()
        last = self.last_bytes
        tables = self.slot_of_key
        winners = [tables[p].get(probes[i * width : (i + 1) * width] + last)
                   for i, p in enumerate(programs)]  # fmt: skip
        brute, check = [], []
        ones = queries[:, -1] == 1.0
        for i, p in enumerate(programs):
            slot = winners[i]
            sentinel = self.sentinel[p]
            if slot is not None and slot != sentinel and self.usable[p] and ones[i]:
                continue  # a hit: a key (t, n), so the query has the exact form
            if sentinel is not None and self.usable[p] and ones[i]:
                winners[i] = sentinel
                check.append(i)
            else:
                brute.append(i)
        if check:
            exact_form = (np.abs(signs[check]) == 1.0).all(axis=1).tolist()
            brute += [i for i, ok in zip(check, exact_form) if not ok]
        return winners, brute

    def _brute_force(self, programs: list[int], queries: np.ndarray) -> list[int]:
        """Return, per row, the slot with the best score q . k, the latest position
        winning ties."""
        sizes = np.array([self.sizes[p] for p in programs])
        count = int(sizes.max())
        if count > self.capacity:
            self._grow()
        keys = self.table.keys[programs, :count]
        scores = np.matmul(keys, queries[:, :, None])[:, :, 0]
        scores = np.where(np.arange(count) < sizes[:, None], scores, -np.inf)
        best = scores == scores.max(axis=1, keepdims=True)
        stamps = np.where(best, self.positions[programs, :count], -1)
        return stamps.argmax(axis=1).tolist()
