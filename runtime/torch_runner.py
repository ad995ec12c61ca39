"""The PyTorch runtime: run a weight file's model one decoding step per instruction.

The decode loop only embeds tokens, runs the layers with the stored weights, takes
argmaxes, appends to the KV caches, copies output bytes and stops on a token whose kind
is not RUN. It contains no opcode semantics: `tlc.model.tokens.TokenDecoder` turns the
tokens into the trace and the result.

Activations are laid out (D, n): one column per row, where a row is a prompt position
during the prompt pass and a program during decoding. `run_batch` decodes many programs
(or one program on many inputs) in lockstep, one column each, so every layer runs one
product for the whole batch.

Attention is hard-max: each head scores every cached key, and among the best scores the
latest position wins. A cache keeps one entry per distinct key (exact eviction,
docs/model.md section 1): a new entry whose key equals a cached one replaces it. The
exact-match index answers the queries of exact heads without scoring (section 1 gives
the proof); any other query is scored against every key.

One program runs through torch.mv and torch.addmv on the sparse matrices, one vector
per product; a batch or a prompt chunk runs through torch.sparse.mm. For one program, a
layer's shared block and routed expert run as one block (see `FusedBlock`), and the
products that write x also compute what later q, k, v projections, routers and the
unembedding read of their output (see `Folding`). For a batch, the routers of all
layers are evaluated together (see `FusedRouters`).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from tlc.model import tokens as tk
from tlc.model.weights import (
    TENSORS_INVALID,
    TOKENS_INVALID,
    WeightFileError,
    invalid_contents,
    load_weights,
    sparse_from,
    uncovered_opcodes,
    universal_weights,
)
from tlc.runtime.machine import Program, RunResult, Status

logger = logging.getLogger("tlc.runtime")

DTYPE = torch.float64
INITIAL_CACHE_SLOTS = 64
PROGRESS_EVERY = 1024  # steps between calls of the progress callback
PREFILL_CHUNK = 2048  # prompt rows per pass: a (D, chunk) float64 activation at a time


def is_available() -> bool:
    return True


def _torch_csr(matrix: sp.spmatrix) -> torch.Tensor:
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    with warnings.catch_warnings():
        # torch warns that sparse CSR support is in beta; only sparse.mm uses it here.
        warnings.simplefilter("ignore", UserWarning)
        # int32 indices where they fit: with int64 indices a product on the CPU takes
        # about 1.7 microseconds longer (torch 2.13), a third of a small product's time
        # with int64 indices.
        index = np.int32 if matrix.nnz < 2**31 and max(matrix.shape) < 2**31 else np.int64
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(index)),
            torch.from_numpy(matrix.indices.astype(index)),
            torch.from_numpy(matrix.data.astype(np.float64)),
            size=matrix.shape,
            check_invariants=False,  # scipy built them; checking costs time on every load
        )


def _index(values) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


# --- feed-forward --------------------------------------------------------------------


class Block:
    """A ReLU block: the layer adds W2 ReLU(W1 y + b1) + b2 to x.

    `writes` lists the residual components W2 or b2 can change. One column (a single
    program) runs through torch.addmv on the sparse matrices; several columns through
    torch.sparse.mm.
    """

    def __init__(self, tensors: dict, shapes: dict, prefix: str):
        w1 = sparse_from(tensors, shapes, f"{prefix}.w1")
        w2 = sparse_from(tensors, shapes, f"{prefix}.w2").tocsr()
        b2 = np.asarray(tensors[f"{prefix}.b2"], dtype=np.float64)
        b1 = np.asarray(tensors[f"{prefix}.b1"], dtype=np.float64)
        self.hidden = w1.shape[0]
        self.writes = np.union1d(np.flatnonzero(np.diff(w2.indptr)), np.flatnonzero(b2))
        self.empty = len(self.writes) == 0
        self.parts = (sp.csr_matrix(w1), b1, w2, b2)  # scipy and numpy, for FusedBlock
        self.w1 = _torch_csr(w1)
        self.b1 = torch.from_numpy(b1)
        self.w2 = _torch_csr(w2)
        self.b2 = torch.from_numpy(b2) if b2.any() else None

    def delta_many(self, y: torch.Tensor) -> torch.Tensor:
        """Return W2 ReLU(W1 y + b1) + b2 for the columns of y (D, n)."""
        out = torch.zeros_like(y)
        if self.hidden:
            hidden = torch.sparse.mm(self.w1, y).add_(self.b1.unsqueeze(1)).relu_()
            out = torch.sparse.mm(self.w2, hidden)
        if self.b2 is not None:
            out = out + self.b2.unsqueeze(1)
        return out


class FusedBlock:
    """A layer's shared block and one of its experts as one ReLU block, for one program.

    Both read the same y, so their first layers stack into one matrix and their second
    layers into another. One more hidden unit, with a zero row and bias 1, carries the
    sum of both b2 vectors as a column of W2. One step of the layer's feed-forward part
    is then three torch calls. The sums run in another order than with the two blocks
    apart, which changes nothing: every value is an integer below 2^53 (the builder's
    certificate bounds each block, in any order of summation).
    """

    def __init__(self, blocks: Sequence[Block]):
        w1s, b1s, w2s = [], [], []
        b2 = None
        for block in blocks:
            w1, b1, w2, block_b2 = block.parts
            w1s.append(w1)
            b1s.append(b1)
            w2s.append(w2)
            b2 = block_b2.copy() if b2 is None else b2 + block_b2
        writes = [block.writes for block in blocks]
        self.writes = np.unique(np.concatenate(writes)) if writes else np.zeros(0, np.int64)
        self.empty = len(self.writes) == 0
        if b2 is not None and b2.any():
            w1s.append(sp.csr_matrix((1, w1s[0].shape[1])))
            b1s.append(np.ones(1))
            w2s.append(sp.csr_matrix(b2.reshape(-1, 1)))
        self.hidden = sum(w1.shape[0] for w1 in w1s)
        if self.empty or self.hidden == 0:
            self.empty = True
            return
        self.w1_scipy = sp.vstack(w1s).tocsr()
        self.w2_scipy = sp.hstack(w2s).tocsr()
        self.w1 = _torch_csr(self.w1_scipy)
        self.b1 = torch.from_numpy(np.concatenate(b1s))
        self.w2 = _torch_csr(self.w2_scipy)
        self.extended = None  # W2 and what readers read of its output: see `Folding`


class Router:
    """Logits W y + b of one or more routers.

    Several routers of up to `width` experts each are stacked with padding rows whose
    bias is -inf, so one product and one argmax choose every layer's expert. Both
    torch.argmax and numpy.argmax return the first maximal index: ties go to the lowest
    expert.
    """

    def __init__(self, matrices: Sequence[sp.spmatrix], biases: Sequence[np.ndarray]):
        self.count = len(matrices)
        self.width = max(m.shape[0] for m in matrices)
        size = matrices[0].shape[1]
        stacked = sp.vstack([
            sp.vstack([m, sp.csr_matrix((self.width - m.shape[0], size))])
            for m in matrices
        ]).tocsc()  # fmt: skip
        bias = np.full(self.count * self.width, -np.inf)
        for r, b in enumerate(biases):
            bias[r * self.width : r * self.width + len(b)] = b
        self.reads = np.flatnonzero(np.diff(stacked.indptr))
        self.weights = _torch_csr(stacked)
        self.bias = torch.from_numpy(bias)

    def choose_many(self, y: torch.Tensor) -> torch.Tensor:
        """Return each router's expert for each column of y: (count, n)."""
        logits = torch.sparse.mm(self.weights, y).add_(self.bias.unsqueeze(1))
        logits = logits.T.contiguous().view(-1, self.count, self.width)
        return logits.argmax(dim=2).T


# --- attention -----------------------------------------------------------------------


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
        # The table's lists, which it only changes in place.
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


class Attention:
    """All heads of one layer: q, k and v from one sparse product, one output product."""

    def __init__(self, tensors: dict, shapes: dict, prefix: str, heads: list[dict]):
        matrices, biases, self.heads = [], [], []
        start = output = 0
        for h, info in enumerate(heads):
            name = f"{prefix}.heads.{h}"
            widths = [len(tensors[f"{name}.{b}"]) for b in ("bq", "bk", "bv")]
            for part in ("q", "k", "v"):
                matrices.append(sparse_from(tensors, shapes, f"{name}.w{part}"))
                biases.append(tensors[f"{name}.b{part}"])
            q, k, v = widths
            exact = info.get("key_bits") if info.get("lookup") == "exact" else None
            self.heads.append(HeadLayout(
                slice(start, start + q), slice(start + q, start + q + k),
                slice(start + q + k, start + q + k + v), slice(output, output + v),
                k, v, exact,
            ))  # fmt: skip
            start += q + k + v
            output += v
        self.value_width = output
        # Where each head's q, k and v lie in the bytes of the layer's q, k, v vector.
        self.spans = [(8 * h.query.start, 8 * h.value.stop) for h in self.heads]
        self.qkv_scipy = sp.vstack(matrices).tocsr()
        self.qkv = _torch_csr(self.qkv_scipy)
        self.qkv_bias = torch.from_numpy(np.concatenate(biases).astype(np.float64))
        self.key_groups = self._group_keys()
        wo = sp.hstack([
            sparse_from(tensors, shapes, f"{prefix}.heads.{h}.wo") for h in range(len(heads))
        ]).tocsr()  # fmt: skip
        self.writes = np.flatnonzero(np.diff(wo.indptr))
        self.wo_scipy = wo
        self.wo = _torch_csr(wo)
        key_value_rows = np.concatenate([
            np.arange(head.key.start, head.value.stop) for head in self.heads
        ])  # fmt: skip
        self.key_value_reads = np.unique(self.qkv_scipy[key_value_rows].indices)

    def new_caches(self, programs: int) -> list[HeadCaches]:
        """Return each head's caches; heads with equal key projections share a table."""
        tables: dict[int, KeyTable] = {}
        caches = []
        for head, group in zip(self.heads, self.key_groups):
            if group not in tables:
                tables[group] = KeyTable(head.key_width, head.exact_bits, programs)
            caches.append(HeadCaches(head, programs, tables[group]))
        return caches

    def _group_keys(self) -> list[int]:
        """Return, per head, the first head whose key projection (rows of q, k, v,
        bias and lookup) equals its own."""
        groups = []
        for h, head in enumerate(self.heads):
            rows = self.qkv_scipy[head.key]
            bias = self.qkv_bias.numpy()[head.key]
            for g in range(h):
                other = self.heads[g]
                if (other.key_width == head.key_width and other.exact_bits == head.exact_bits
                        and (self.qkv_scipy[other.key] != rows).nnz == 0
                        and np.array_equal(self.qkv_bias.numpy()[other.key], bias)):  # fmt: skip
                    groups.append(groups[g])
                    break
            else:
                groups.append(h)
        return groups

    def attend_one(self, qkv: np.ndarray, caches: list[HeadCaches], program: int,
                   position: int) -> np.ndarray:  # fmt: skip
        """Append one step's keys and values, given its heads' q, k and v `qkv` (with
        -0.0 turned into 0.0), and return the winning values laid end to end, the input
        of the output projection."""
        raw = qkv.tobytes()
        winners = []
        for cache, head, (start, stop) in zip(caches, self.heads, self.spans):
            step = raw[start:stop]  # q, k and v are adjacent
            value = cache.repeat_one(program, step, position)
            if value is None:
                value = cache.attend_one(program, qkv[head.key], qkv[head.value],
                                         qkv[head.query], position, step)  # fmt: skip
            winners.append(value)
        return np.concatenate(winners) if winners else np.zeros(0)

    def append_many(self, x: torch.Tensor, caches: list[HeadCaches], program: int,
                    first_position: int) -> None:  # fmt: skip
        """Append the keys and values of the columns of x (D, n) to program `program`'s
        caches at positions first_position, first_position + 1, ..., without attending."""
        qkv = torch.sparse.mm(self.qkv, x).add_(self.qkv_bias.unsqueeze(1))
        qkv = np.ascontiguousarray(qkv.numpy().T) + 0.0  # + 0.0 turns -0.0 into 0.0
        for cache, head in zip(caches, self.heads):
            cache.extend(program, np.ascontiguousarray(qkv[:, head.key]), qkv[:, head.value],
                         first_position)  # fmt: skip

    def forward_many(self, x: torch.Tensor, caches: list[HeadCaches],
                     rows: Sequence[tuple[int, int]], distinct: bool) -> torch.Tensor:  # fmt: skip
        """Return x (D, n) plus the heads' output. `rows[r]` is (program, position) of
        column r. Each column appends its keys and values and attends over its own
        program's entries up to itself; with `distinct` (no program has two columns)
        every head handles all columns at once."""
        qkv = torch.sparse.mm(self.qkv, x).add_(self.qkv_bias.unsqueeze(1))
        qkv = np.ascontiguousarray(qkv.numpy().T) + 0.0  # + 0.0 turns -0.0 into 0.0
        values = np.empty((len(rows), self.value_width))
        if distinct:
            programs = [program for program, _ in rows]
            positions = [position for _, position in rows]
            for cache, head in zip(caches, self.heads):
                values[:, head.output] = cache.attend_rows(
                    programs, np.ascontiguousarray(qkv[:, head.key]), qkv[:, head.value],
                    qkv[:, head.query], positions,
                )  # fmt: skip
        else:
            for r, (program, position) in enumerate(rows):
                row = qkv[r]
                for cache, head in zip(caches, self.heads):
                    values[r, head.output] = cache.attend_one(
                        program, row[head.key], row[head.value], row[head.query], position
                    )
        return x + torch.sparse.mm(self.wo, torch.from_numpy(values.T.copy()))


# --- layers and model ----------------------------------------------------------------


class Layer:
    """Attention, then a shared block and one routed expert, both reading the same y."""

    def __init__(self, tensors, shapes, index: int, description: dict):
        prefix = f"layers.{index}"
        heads = description["heads"]
        self.attention = Attention(tensors, shapes, prefix, heads) if heads else None
        self.shared = None
        if f"{prefix}.shared.b1" in tensors:
            self.shared = Block(tensors, shapes, f"{prefix}.shared")
        self.router = None
        self.experts: list[Block] = []
        if f"{prefix}.router.b" in tensors:
            self.router_matrix = sparse_from(tensors, shapes, f"{prefix}.router.w")
            self.router_bias = np.asarray(tensors[f"{prefix}.router.b"], dtype=np.float64)
            self.router = Router([self.router_matrix], [self.router_bias])
            self.experts = [
                Block(tensors, shapes, f"{prefix}.experts.{e}")
                for e in range(len(description["experts"]))
            ]

        self._fused: dict[int | None, FusedBlock] = {}

    def fused_block(self, expert: int | None) -> FusedBlock:
        """Return the shared block and expert `expert` (None: no expert) as one block,
        for one program's step (see `Folding`)."""
        fused = self._fused.get(expert)
        if fused is None:
            blocks = [self.shared] if self.shared is not None else []
            if expert is not None:
                blocks.append(self.experts[expert])
            fused = FusedBlock(blocks)
            self._fused[expert] = fused
        return fused

    def feed_forward_many(self, x: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
        """Return x plus the shared block and each column's expert (`chosen`, (n,))."""
        updates = []
        if self.shared is not None and not self.shared.empty:
            updates.append((None, self.shared.delta_many(x)))
        if chosen is not None:
            for e in torch.unique(chosen).tolist():
                block = self.experts[e]
                if block.empty:
                    continue
                columns = torch.nonzero(chosen == e).flatten()
                if len(columns) == x.shape[1]:
                    updates.append((None, block.delta_many(x)))
                else:
                    updates.append((columns, block.delta_many(x.index_select(1, columns))))
        for columns, delta in updates:
            if columns is None:
                x = x + delta
            else:
                x = x.index_add(1, columns, delta)
        return x


class FusedRouters:
    """Every layer's router, evaluated in one product and again only when needed.

    A router's logits depend only on the components of x it reads. The product runs
    where the first router runs, and its logits for a later layer stay exact until
    something writes a component that layer's router reads: a later layer's attention,
    a shared block or a routed expert. `stale_after_attention[l]` and
    `stale_after_block[l][e]` (e None: no expert) record whether that happens, and the
    layer loop then runs the product again at the next router. Which components each
    matrix reads and writes comes from the stored matrices, nothing else.
    """

    def __init__(self, layers: list[Layer]):
        routed = [l for l, layer in enumerate(layers) if layer.router is not None]
        self.row_of_layer = {l: r for r, l in enumerate(routed)}
        self.routers = None
        if len(routed) >= 2:
            self.routers = Router([layers[l].router_matrix for l in routed],
                                  [layers[l].router_bias for l in routed])  # fmt: skip

        def read_from(first: int) -> np.ndarray:
            reads = [layers[m].router.reads for m in routed if m >= first]
            return np.unique(np.concatenate(reads)) if reads else np.zeros(0, np.int64)

        def overlaps(writes: np.ndarray, reads: np.ndarray) -> bool:
            return bool(np.intersect1d(writes, reads).size)

        self.stale_after_attention = [
            layer.attention is not None and overlaps(layer.attention.writes, read_from(l))
            for l, layer in enumerate(layers)
        ]
        self.stale_after_block: list[dict[int | None, bool]] = []
        for l, layer in enumerate(layers):
            later = read_from(l + 1)
            shared = layer.shared.writes if layer.shared is not None else np.zeros(0, np.int64)
            stale = {None: overlaps(shared, later)}
            for e, block in enumerate(layer.experts):
                stale[e] = stale[None] or overlaps(block.writes, later)
            self.stale_after_block.append(stale)

    def covers(self, layer: int) -> bool:
        return self.routers is not None and layer in self.row_of_layer


# --- folding readers into writers (one program) --------------------------------------

# float64 represents every integer below 2^53. Bounds must stay below 2^52, which leaves
# room for the rounding of the bound arithmetic itself.
LIMIT = 2.0**52


@dataclass
class _Reader:
    """A group of rows of z that a later computation reads instead of a product of x."""

    rows: slice  # in z
    matrix: sp.csr_matrix  # (n, D): the product it replaces is matrix @ x + bias
    bias: np.ndarray
    time: float  # when the layer loop reads it; see `Folding`


@dataclass
class _Writer:
    """A product that adds to x, extended to add to the readers that read x later."""

    matrix: torch.Tensor  # the rows of [W; R W] from window's start to its stop
    stales: list[int]  # readers it changes but does not update: read them from x after it
    window: int  # index in Folding.windows of the rows of z it adds to


class Folding:
    """One program's step with the extended residual z = [x; qkv; router logits; logits].

    Every query, key and value projection, router and the unembedding reads x linearly.
    Where x gets a term W v from an earlier product (the embedding, an output projection
    or the second layer of a block), the reader's share R W v can come out of the same
    product: that product runs with the matrix [W; R W] into z, whose rows after x hold
    the readers' values. A step then skips the products of layer 1's q, k and v, the
    routers and the unembedding, four of about ten.

    A folded reader gives the same bits as its own product R x + b because both are the
    exact integer. Folding requires every tensor of the file to be an integer, so every
    product and partial sum of both computations is one. float64 computes them exactly
    while they stay below 2^53, which an interval pass over the stored matrices proves.
    It bounds x, the heads' values and each expert's hidden units, layer by layer: |E^T| 1
    for the embedding, then |W| times the bound of each input. A writer folds into a
    reader only if three bounds stay below 2^52:

    * |R| |W|, which bounds the computation of the matrix R W;
    * the reader's folded sum so far plus |R W| times the writer's input bound;
    * at the read, |R| times the bound of x plus |b|, where x's bound adds only the
      writers that did not make this reader stale. That makes R x + b exact too.

    Otherwise the writer makes the reader stale, and for the rest of the step the reader
    is its own product of x, as it would be without folding. A reader that fails the
    third bound, or a file with any other value, never folds.

    Times order the reads and writes of one step. The embedding writes at -1. Layer l
    reads its q, k and v at 3l, its attention writes at 3l + 1, its router reads at
    3l + 1.5 and its block writes at 3l + 2. The unembedding reads at 3L. A writer folds
    only into readers that read after it.
    """

    def __init__(self, model: TorchModel, embedding_t: sp.csr_matrix, whole: bool):
        """Fold the readers of `model` into its writers. `whole` is True when every
        tensor of the file is an integer."""
        self._add_readers(model)
        self.width = model.width
        self.stacked = sp.vstack([reader.matrix for reader in self.readers]).tocsr()
        self.stacked_abs = np.abs(self.stacked)
        self.windows: list[slice] = []
        self.start_stale = [not whole] * len(self.readers)
        # Per reader: bounds of its folded sum, row by row, and of x, component by
        # component, over the writers that kept it fresh.
        self.sums = [np.zeros(r.matrix.shape[0]) for r in self.readers]
        self.x_bounds = [np.zeros(model.width) for _ in self.readers]
        bias = np.zeros(self.size)
        for r, reader in enumerate(self.readers):
            bias[reader.rows] = reader.bias
            self.sums[r] += np.abs(np.where(np.isfinite(reader.bias), reader.bias, 0.0))
        self.bias = torch.from_numpy(bias)
        # The embedding writes x = E^T indicator, a 0/1 vector, and the readers' shares.
        ones = np.ones(embedding_t.shape[1])
        self.embed = _torch_csr(self._extend(embedding_t, ones, -1.0, self.start_stale))
        self._fold_layers(model.layers, np.abs(embedding_t) @ ones)
        self.plan = self._plan(model)

    def _add_readers(self, model: TorchModel) -> None:
        """Lay out z: x, then each layer's q, k and v, the routers and the logits."""
        layers, width = model.layers, model.width
        self.readers: list[_Reader] = []
        self.qkv_reader: dict[int, int] = {}
        start = width
        for l, layer in enumerate(layers):
            if layer.attention is not None:
                attention = layer.attention
                self.qkv_reader[l] = len(self.readers)
                rows = attention.qkv_scipy.shape[0]
                self.readers.append(_Reader(slice(start, start + rows), attention.qkv_scipy,
                                            attention.qkv_bias.numpy(), 3 * l))  # fmt: skip
                start += rows

        # The routers sit side by side, `router_width` rows each (padding rows have bias
        # -inf), so that one argmax over a (count, width) view chooses every expert.
        routed = [l for l, layer in enumerate(layers) if layer.router is not None]
        self.router_index = {l: r for r, l in enumerate(routed)}
        self.router_width = max((layers[l].router_bias.size for l in routed), default=0)
        self.router_readers = []
        self.routers_start = start
        for l in routed:
            layer = layers[l]
            padding = self.router_width - layer.router_bias.size
            matrix = sp.vstack([layer.router_matrix,
                                sp.csr_matrix((padding, width))]).tocsr()  # fmt: skip
            bias = np.concatenate([layer.router_bias, np.full(padding, -np.inf)])
            self.router_readers.append(len(self.readers))
            self.readers.append(_Reader(slice(start, start + self.router_width), matrix,
                                        bias, 3 * l + 1.5))  # fmt: skip
            start += self.router_width
        self.routers_stop = start
        self.routers_matrix = _torch_csr(sp.vstack([self.readers[r].matrix
                                                    for r in self.router_readers])
                                         if routed else sp.csr_matrix((0, width)))  # fmt: skip
        self.routers_bias = torch.from_numpy(np.concatenate(
            [self.readers[r].bias for r in self.router_readers] or [np.zeros(0)]))  # fmt: skip

        # The logits sit grouped by vocabulary size, each group a (fields, vocab) block,
        # so that the argmax of each group runs on a view.
        self.logits_reader = len(self.readers)
        order = np.concatenate([rows.ravel() for _, rows in model.groups_np])
        unembedding = model.unembedding_scipy[order]
        self.readers.append(_Reader(slice(start, start + len(order)), unembedding,
                                    model.unembedding_bias.numpy()[order],
                                    3 * len(layers)))  # fmt: skip
        self.unembedding = _torch_csr(unembedding)
        self.unembedding_bias = torch.from_numpy(self.readers[-1].bias)
        self.logit_groups = []
        first = 0
        for fields, rows in model.groups_np:
            self.logit_groups.append((first, first + rows.size, rows.shape[1]))
            first += rows.size
        self.token_order = np.argsort(np.concatenate([f for f, _ in model.groups_np]))
        self.size = start + len(order)

    def _fold_layers(self, layers: list[Layer], bound: np.ndarray) -> None:
        """Extend every layer's writers, given the bound of x after the embedding."""
        self.attention: dict[int, _Writer] = {}
        self.blocks: list[dict[int | None, tuple[FusedBlock, list[int]]]] = []
        for l, layer in enumerate(layers):
            self._check_reads(3 * l)
            if layer.attention is not None:
                attention = layer.attention
                qkv = np.abs(attention.qkv_scipy) @ bound + np.abs(attention.qkv_bias.numpy())
                values = np.concatenate([qkv[head.value] for head in attention.heads])
                stales: list[int] = []
                matrix = self._extend(attention.wo_scipy, values, 3 * l + 1, stales)
                self.attention[l] = self._writer(matrix, stales)
                bound = bound + np.abs(attention.wo_scipy) @ values
            self._check_reads(3 * l + 1.5)
            experts = list(range(len(layer.experts))) if layer.router is not None else [None]
            blocks: dict[int | None, tuple[FusedBlock, list[int]]] = {}
            growth = np.zeros_like(bound)
            before = (self.sums, self.x_bounds)
            after = [before]  # per expert; the next layer takes the largest
            for expert in experts:
                block = layer.fused_block(expert)
                if block.empty:
                    blocks[expert] = (block, [])
                    continue
                hidden = np.abs(block.w1_scipy) @ bound + np.abs(block.b1.numpy())
                stales = []
                self.sums = [s.copy() for s in before[0]]
                self.x_bounds = [b.copy() for b in before[1]]
                block.extended = self._writer(
                    self._extend(block.w2_scipy, hidden, 3 * l + 2, stales), stales)
                after.append((self.sums, self.x_bounds))
                blocks[expert] = (block, stales)
                growth = np.maximum(growth, np.abs(block.w2_scipy) @ hidden)
            self.sums = [np.max(each, axis=0) for each in zip(*(a[0] for a in after))]
            self.x_bounds = [np.max(each, axis=0) for each in zip(*(a[1] for a in after))]
            self.blocks.append(blocks)
            bound = bound + growth
        self._check_reads(3 * len(layers))

    def _check_reads(self, time: float) -> None:
        """Never fold the readers that read at `time` if R x + b could reach 2^52."""
        for r, reader in enumerate(self.readers):
            if reader.time != time or self.start_stale[r]:
                continue
            bias = np.abs(np.where(np.isfinite(reader.bias), reader.bias, 0.0))
            direct = np.abs(reader.matrix) @ self.x_bounds[r] + bias
            # A bound that overflowed can turn into NaN (0 * inf), which must refuse too.
            if not direct.max(initial=0.0) < LIMIT:
                self.start_stale[r] = True

    def _plan(self, model: TorchModel) -> list[tuple]:
        """Return what `TorchModel._layers_one` needs per layer, looked up once.

        A layer's entry is its index, attention, q/k/v reader and rows, output writer,
        whether that writer changes a later router, and its router's index. The last
        item maps each expert to None (an empty block) or to (b1, W1, extended W2, stale
        readers, whether it changes a router, window).
        """
        fused = model.fused
        plan = []
        for l, layer in enumerate(model.layers):
            reader = self.qkv_reader.get(l)
            rows = self.readers[reader].rows if reader is not None else None
            planned = {
                expert: None if block.empty else
                (block.b1, block.w1, block.extended.matrix, stales,
                 fused.stale_after_block[l][expert], block.extended.window)
                for expert, (block, stales) in self.blocks[l].items()
            }  # fmt: skip
            plan.append((l, layer.attention, reader, rows, self.attention.get(l),
                         fused.stale_after_attention[l], self.router_index.get(l),
                         planned))  # fmt: skip
        return plan

    def _writer(self, matrix: sp.csr_matrix, stales: list[int]) -> _Writer:
        """Return the writer of an extended matrix, cut to the rows from its first entry
        to its last: a CSR product costs time for every row, empty or not."""
        used = np.flatnonzero(np.diff(matrix.indptr))
        window = slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 0)
        self.windows.append(window)
        return _Writer(_torch_csr(matrix[window]), stales, len(self.windows) - 1)

    def new_residual(self, width: int) -> tuple:
        """Return a buffer z for one program's steps, its numpy view, its x part and its
        views of every writer's window."""
        z = torch.zeros(self.size, dtype=DTYPE)
        return z, z.numpy(), z[:width], [z[window] for window in self.windows]

    def choose(self, layer: int, stale: list[bool], zn: np.ndarray, x: torch.Tensor) -> list[int]:
        """Return the expert of every routed layer from the router rows of z, or from
        one product of x when a router of `layer` or later is stale. Only the choices of
        `layer` and of later layers that nothing writes to before them are used."""
        index = self.router_index[layer]
        if any(stale[r] for r in self.router_readers[index:]):
            logits = torch.addmv(self.routers_bias, self.routers_matrix, x).numpy()
        else:
            logits = zn[self.routers_start : self.routers_stop]
        return logits.reshape(-1, self.router_width).argmax(axis=1).tolist()

    def _extend(self, matrix: sp.csr_matrix, inputs: np.ndarray, time: float,
                stales: list) -> sp.csr_matrix:  # fmt: skip
        """Return [matrix; R matrix for each reader R that reads after `time`] with
        zeros in the rows of readers that cannot fold. `inputs` bounds the magnitude of
        each input component. Adds each folded share to the bounds of its reader.

        Readers that cannot fold become stale. For the embedding (time -1), stales[r]
        is set to True for them. Any other writer appends them to `stales`."""
        growth = np.abs(matrix) @ inputs
        # Every reader's rows at once: the readers lie in z in order, right after x.
        shares = (self.stacked @ matrix).tocsr()
        magnitudes = (self.stacked_abs @ np.abs(matrix)).tocsr()
        largest = np.zeros(shares.shape[0])
        if magnitudes.nnz:
            largest = magnitudes.max(axis=1).toarray().ravel()
        bounds = np.abs(shares) @ inputs
        keep = np.zeros(shares.shape[0])
        for r, reader in enumerate(self.readers):
            if reader.time <= time or self.start_stale[r]:
                continue
            rows = slice(reader.rows.start - self.width, reader.rows.stop - self.width)
            total = self.sums[r] + bounds[rows]
            if largest[rows].max(initial=0.0) < LIMIT and total.max(initial=0.0) < LIMIT:
                self.sums[r] = total
                self.x_bounds[r] = self.x_bounds[r] + growth
                keep[rows] = 1.0
            elif time < 0:
                stales[r] = True
            else:
                stales.append(r)
        return sp.vstack([matrix, sp.diags(keep) @ shares]).tocsr()


def integral(values) -> bool:
    """Return whether every value is a finite integer."""
    values = np.asarray(values)
    return bool(np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)))


class Batch:
    """The KV caches and positions of a group of programs decoded together."""

    def __init__(self, layers: list[Layer], programs: int):
        self.caches = [
            layer.attention.new_caches(programs) if layer.attention is not None else []
            for layer in layers
        ]
        self.positions = [0] * programs
        self.residual = None  # one program's z buffer, see `Folding.new_residual`

    def cache_sizes(self, program: int = 0) -> list[int]:
        """Return the entries each head holds for `program`, layer by layer."""
        return [cache.sizes[program] for layer in self.caches for cache in layer]


class TorchModel(torch.nn.Module):
    """The model of a weight file: embedding, layers, unembedding with per-field argmax."""

    def __init__(self, tensors: dict[str, np.ndarray], metadata: dict):
        super().__init__()
        shapes = metadata["shapes"]
        self.metadata = metadata
        self.width = int(metadata["D"])
        vocabs = [int(entry["vocab"]) for entry in metadata["fields"]]
        self.field_count = len(vocabs)
        offsets = np.concatenate([[0], np.cumsum(vocabs)[:-1]]).astype(np.int64)
        self.offsets_np = offsets
        self.offsets = _index(offsets)
        self.total_vocab = int(sum(vocabs))
        # x = E^T onehot(token): one sparse product in place of a gather of F rows.
        embedding_t = self._stack(tensors, shapes, "embed", vocabs).T.tocsr()
        self.embedding_t = _torch_csr(embedding_t)
        self.unembedding_scipy = self._stack(tensors, shapes, "unembed", vocabs)
        self.unembedding = _torch_csr(self.unembedding_scipy)
        bias = np.concatenate([tensors[f"unembed.{f}.bias"] for f in range(len(vocabs))])
        self.unembedding_bias = torch.from_numpy(bias.astype(np.float64))
        self.groups = self._vocab_groups(vocabs, offsets)
        self.groups_np = [(fields.numpy(), rows.numpy()) for fields, rows in self.groups]
        self.layers = [
            Layer(tensors, shapes, index, description)
            for index, description in enumerate(metadata["layers"])
        ]
        self._check_widths()
        self.fused = FusedRouters(self.layers)
        whole = all(integral(t) for t in tensors.values() if np.asarray(t).dtype.kind == "f")
        self.folding = Folding(self, embedding_t, whole)
        self.token_keys = self._keys_depend_on_token_only()
        self.state = Batch(self.layers, 1)

    @staticmethod
    def _stack(tensors, shapes, prefix: str, vocabs: list[int]) -> sp.csr_matrix:
        """Concatenate the per-field (V_f, D) matrices into one sparse table."""
        return sp.vstack([sparse_from(tensors, shapes, f"{prefix}.{f}")
                          for f in range(len(vocabs))]).tocsr()  # fmt: skip

    def _vocab_groups(self, vocabs, offsets):
        """Fields grouped by vocabulary size: (field indices, logit rows (n, vocab))."""
        groups = []
        for vocab in sorted(set(vocabs)):
            fields = [f for f, v in enumerate(vocabs) if v == vocab]
            rows = [[offsets[f] + j for j in range(vocab)] for f in fields]
            groups.append((_index(fields), _index(rows)))
        return groups

    # --- the forward pass over the columns of x ---

    def _check_widths(self) -> None:
        """Raise ValueError unless every matrix reads or writes residuals of width D."""
        width = self.width
        reads = [("embed", self.embedding_t.shape[0]), ("unembed", self.unembedding.shape[1])]
        for l, layer in enumerate(self.layers):
            if layer.attention is not None:
                reads.append((f"layers.{l} q, k, v", layer.attention.qkv.shape[1]))
                reads.append((f"layers.{l} wo", layer.attention.wo.shape[0]))
            blocks = ([layer.shared] if layer.shared is not None else []) + layer.experts
            for block in blocks:
                reads.append((f"layers.{l} w1", block.w1.shape[1]))
                reads.append((f"layers.{l} w2", block.w2.shape[0]))
        for name, size in reads:
            if size != width:
                raise ValueError(f"{name} has residual width {size}, but D is {width}")

    def _keys_depend_on_token_only(self) -> bool:
        """Return whether every head's keys and values read only residual components
        that no layer writes, so that they are a function of the embedded token alone.
        The stored matrices decide: the rows of every output projection, second layer
        and b2 against the columns of every key and value projection."""
        written = [np.zeros(0, np.int64)]
        reads = [np.zeros(0, np.int64)]
        for layer in self.layers:
            if layer.attention is not None:
                written.append(layer.attention.writes)
                reads.append(layer.attention.key_value_reads)
            blocks = ([layer.shared] if layer.shared is not None else []) + layer.experts
            written += [block.writes for block in blocks]
        return not np.intersect1d(np.concatenate(written), np.concatenate(reads)).size

    def _embed_one(self, token: np.ndarray, z: torch.Tensor) -> None:
        """Write z for one token (F,): x and every reader's share of the embedding."""
        indicator = np.zeros(self.total_vocab)
        indicator[self.offsets_np + token] = 1.0
        folding = self.folding
        torch.addmv(folding.bias, folding.embed, torch.from_numpy(indicator), out=z)

    def _layers_one(self, batch: Batch, program: int, residual) -> list[bool]:
        """Run every layer in place on the embedded token in z, and return which readers
        are stale at the end (see `Folding`). `residual` is z, its numpy view, its x part
        and its writers' windows."""
        position = batch.positions[program]
        folding = self.folding
        _, zn, x, windows = residual
        stale = folding.start_stale.copy()
        choices = None
        for l, attention, reader, rows, writer, resets, route, blocks in folding.plan:
            if attention is not None:
                if stale[reader]:
                    qkv = torch.addmv(attention.qkv_bias, attention.qkv, x).numpy() + 0.0
                else:
                    qkv = zn[rows] + 0.0  # -0.0 becomes 0.0
                values = attention.attend_one(qkv, batch.caches[l], program, position)
                windows[writer.window].addmv_(writer.matrix, torch.from_numpy(values))
                for r in writer.stales:
                    stale[r] = True
                if resets:
                    choices = None
            if route is None:
                planned = blocks[None]
            else:
                if choices is None:
                    choices = folding.choose(l, stale, zn, x)
                planned = blocks[choices[route]]
            if planned is not None:
                b1, w1, w2, stales, resets, window = planned
                windows[window].addmv_(w2, torch.addmv(b1, w1, x).relu_())
                for r in stales:
                    stale[r] = True
                if resets:
                    choices = None
        return stale

    def _next_token_one(self, stale: list[bool], residual) -> np.ndarray:
        """Return the argmax token (F,) of the residual z."""
        folding = self.folding
        _, zn, x, _ = residual
        if stale[folding.logits_reader]:
            logits = torch.addmv(folding.unembedding_bias, folding.unembedding, x).numpy()
        else:
            logits = zn[folding.readers[folding.logits_reader].rows]
        # numpy.argmax returns the first maximal index: ties go to the lowest value.
        values = [logits[start:stop].reshape(-1, vocab).argmax(axis=1)
                  for start, stop, vocab in folding.logit_groups]  # fmt: skip
        return np.concatenate(values)[folding.token_order]

    def _embed_many(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return x (D, n) for the tokens (F, n)."""
        indicator = torch.zeros((self.total_vocab, tokens.shape[1]), dtype=DTYPE)
        indicator.scatter_(0, self.offsets.unsqueeze(1) + tokens, 1.0)
        return torch.sparse.mm(self.embedding_t, indicator)

    def _layers_many(self, x: torch.Tensor, batch: Batch, rows: Sequence[tuple[int, int]],
                     distinct: bool) -> torch.Tensor:  # fmt: skip
        """Run every layer on the columns of x (D, n); see Attention.forward_many."""
        fused = self.fused
        choices = None
        for l, layer in enumerate(self.layers):
            if layer.attention is not None:
                x = layer.attention.forward_many(x, batch.caches[l], rows, distinct)
                if fused.stale_after_attention[l]:
                    choices = None
            chosen = None
            if layer.router is not None:
                if fused.covers(l):
                    if choices is None:
                        choices = fused.routers.choose_many(x)
                    chosen = choices[fused.row_of_layer[l]]
                else:
                    chosen = layer.router.choose_many(x)[0]
            x = layer.feed_forward_many(x, chosen)
            experts = [None] if chosen is None else torch.unique(chosen).tolist()
            if any(fused.stale_after_block[l][e] for e in experts):
                choices = None
        return x

    def _next_tokens_many(self, x: torch.Tensor) -> np.ndarray:
        """Return the argmax token of each column of x as an (n, F) int64 array."""
        logits = torch.sparse.mm(self.unembedding, x).add_(self.unembedding_bias.unsqueeze(1))
        logits = logits.T.contiguous()  # (n, V): each field's logits contiguous
        tokens = torch.empty((x.shape[1], self.field_count), dtype=torch.int64)
        for fields, rows in self.groups:
            # torch.argmax returns the first maximal index: ties go to the lowest value.
            tokens[:, fields] = logits[:, rows].argmax(dim=2)
        return tokens.numpy()

    # --- prompt and decoding ---

    @torch.no_grad()
    def prefill_many(self, batch: Batch, prompts: Sequence[np.ndarray]) -> np.ndarray:
        """Run prompt i (P_i, F) as program i of `batch` and return the token that follows
        each prompt, (len(prompts), F). Equal to stepping token by token.

        When every key and value depends on its token alone (`token_keys`), the tokens
        before each prompt's last only append their keys and values: the layers'
        outputs at those positions change nothing that a later position reads. The
        last tokens then run as one decoding step.
        """
        if not self.token_keys:
            return self._prefill_layers(batch, prompts)
        for i, prompt in enumerate(prompts):
            body = np.asarray(prompt)[:-1]
            for start in range(0, len(body), PREFILL_CHUNK):
                chunk = np.ascontiguousarray(body[start : start + PREFILL_CHUNK].T)
                x = self._embed_many(torch.from_numpy(chunk))
                for l, layer in enumerate(self.layers):
                    if layer.attention is not None:
                        layer.attention.append_many(x, batch.caches[l], i,
                                                    batch.positions[i] + start)  # fmt: skip
            batch.positions[i] += len(body)
        lasts = np.stack([np.asarray(prompt)[-1] for prompt in prompts])
        return self.step_many(batch, list(range(len(prompts))), lasts)

    def _prefill_layers(self, batch: Batch, prompts: Sequence[np.ndarray]) -> np.ndarray:
        """Run `prefill_many` through every layer at every prompt position."""
        rows = [(i, batch.positions[i] + p)
                for i, prompt in enumerate(prompts) for p in range(len(prompt))]  # fmt: skip
        tokens = np.concatenate(list(prompts))
        ends = np.cumsum([len(p) for p in prompts]) - 1
        last = np.empty((len(prompts), self.field_count), dtype=np.int64)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            stop = min(start + PREFILL_CHUNK, len(tokens))
            x = self._embed_many(torch.from_numpy(np.ascontiguousarray(tokens[start:stop].T)))
            x = self._layers_many(x, batch, rows[start:stop], distinct=False)
            inside = [(i, end - start) for i, end in enumerate(ends) if start <= end < stop]
            if inside:
                columns = _index([column for _, column in inside])
                predicted = self._next_tokens_many(x.index_select(1, columns))
                for (i, _), token in zip(inside, predicted):
                    last[i] = token
        for i, prompt in enumerate(prompts):
            batch.positions[i] += len(prompt)
        return last

    @torch.no_grad()
    def step_many(self, batch: Batch, programs: list[int], tokens: np.ndarray) -> np.ndarray:
        """Run one token per program (`tokens` (n, F)) and return the next tokens (n, F)."""
        if len(programs) == 1:
            return self.step_one(batch, programs[0], tokens[0]).reshape(1, -1)
        x = self._embed_many(torch.from_numpy(np.ascontiguousarray(tokens.T)))
        rows = [(p, batch.positions[p]) for p in programs]
        x = self._layers_many(x, batch, rows, distinct=True)
        for p in programs:
            batch.positions[p] += 1
        return self._next_tokens_many(x)

    def step_one(self, batch: Batch, program: int, token: np.ndarray) -> np.ndarray:
        """Run one token (F,) of one program and return the next token (F,)."""
        residual = batch.residual
        if residual is None:
            residual = batch.residual = self.folding.new_residual(self.width)
        self._embed_one(token, residual[0])
        stale = self._layers_one(batch, program, residual)
        batch.positions[program] += 1
        return self._next_token_one(stale, residual)

    def reset(self) -> None:
        self.state = Batch(self.layers, 1)

    def prefill(self, prompt) -> np.ndarray:
        """Run a prompt into `self.state` and return the token that follows it (F,)."""
        return self.prefill_many(self.state, [np.asarray(prompt)])[0]

    def step(self, token) -> np.ndarray:
        """Run one token through `self.state` and return the next token (F,)."""
        return self.step_one(self.state, 0, np.asarray(token))


# Loaded models by (path, size, modification time) of their file, or "<universal>".
_MODELS: dict[tuple | str, TorchModel] = {}


def load_model(weights: str | Path | None = None) -> TorchModel:
    """Return the TorchModel of a weight file, or of the universal weights.

    A model stays loaded while its file keeps its size and modification time. Raises
    WeightFileError when the file is not a valid weight file.
    """
    if weights is None:
        if "<universal>" not in _MODELS:
            _MODELS["<universal>"] = TorchModel(*universal_weights())
        return _MODELS["<universal>"]
    path = Path(weights)
    try:
        info = path.stat()
    except OSError as error:
        raise WeightFileError(f"{weights}: cannot read the weight file: "
                              f"{error.strerror}") from None  # fmt: skip
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _MODELS:
        tensors, metadata = load_weights(path)
        try:
            model = TorchModel(tensors, metadata)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise WeightFileError(invalid_contents(weights, TENSORS_INVALID, error)) from None
        for stale in [k for k in _MODELS if k != "<universal>"]:
            del _MODELS[stale]
        _MODELS[key] = model
    return _MODELS[key]


def _check_coverage(metadata: dict, program: Program) -> None:
    missing = uncovered_opcodes(metadata, program)
    if missing:
        raise ValueError(f"the model does not compute {', '.join(missing)} yet; "
                         "run this program with --backend ref")  # fmt: skip


class _OneThread:
    """Run torch on one thread: the per-step products are small, and threads only add
    overhead. Runs in several Python threads at once share one setting, restored when
    the last of them ends."""

    _lock = threading.Lock()
    _active = 0
    _saved = 1

    def __enter__(self):
        with _OneThread._lock:
            if _OneThread._active == 0:
                _OneThread._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _OneThread._active += 1

    def __exit__(self, *exc):
        with _OneThread._lock:
            _OneThread._active -= 1
            if _OneThread._active == 0:
                torch.set_num_threads(_OneThread._saved)


def run_program(
    program: Program,
    *,
    stdin: bytes = b"",
    max_steps: int | None = None,
    trace: Callable[[str], None] | None = None,
    write_output: Callable[[bytes], None] | None = None,
    weights: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run `program` inside the model until HALT, a trap or `max_steps` instructions.

    Raises ValueError when the model does not compute an opcode that the program uses,
    and WeightFileError (a ValueError) for an invalid weight file. While it runs, torch
    uses one thread in the whole process (see `_OneThread`).
    """
    model = load_model(weights)
    metadata = model.metadata
    if max_steps is not None and max_steps <= 0:
        return RunResult(Status.STEP_LIMIT, 0, tokens=0)
    _check_coverage(metadata, program)
    try:
        prompt = tk.encode_prompt(metadata, program, stdin, tk.token_dtype(metadata))
        decoder = tk.TokenDecoder(metadata, program, max_steps=max_steps, trace=trace,
                                  write_output=write_output)  # fmt: skip
    except (KeyError, IndexError, TypeError) as error:
        source = weights if weights is not None else "the universal weights"
        raise WeightFileError(invalid_contents(source, TOKENS_INVALID, error)) from None
    # A Batch of its own, not model.state, so that runs in several threads stay apart.
    batch = Batch(model.layers, 1)
    with _OneThread(), torch.no_grad():
        token = model.prefill_many(batch, [prompt])[0]
        while decoder.feed(token):
            if progress is not None and decoder.steps % PROGRESS_EVERY == 0:
                progress(decoder.steps)
            token = model.step_one(batch, 0, token)
    return decoder.result


def run_batch(
    programs: Sequence[Program],
    stdins: Sequence[bytes] | None = None,
    *,
    max_steps: int | None = None,
    weights: str | Path | None = None,
    traces: Sequence[Callable[[str], None] | None] | None = None,
) -> list[RunResult]:
    """Run several programs (or one program on several inputs) in lockstep.

    Every step runs one forward pass whose activation has one column per program still
    running; a program leaves the batch after its last token. Each result, and the
    trace lines sent to traces[i], equal those of `run_program(programs[i],
    stdin=stdins[i], max_steps=max_steps)`.
    """
    if not programs:
        return []
    model = load_model(weights)
    metadata = model.metadata
    stdins = list(stdins) if stdins is not None else [b""] * len(programs)
    traces = list(traces) if traces is not None else [None] * len(programs)
    if len(stdins) != len(programs) or len(traces) != len(programs):
        raise ValueError(f"{len(programs)} programs but {len(stdins)} inputs and "
                         f"{len(traces)} traces")  # fmt: skip
    if max_steps is not None and max_steps <= 0:
        return [RunResult(Status.STEP_LIMIT, 0, tokens=0) for _ in programs]
    for program in programs:
        _check_coverage(metadata, program)
    dtype = tk.token_dtype(metadata)
    prompts = [tk.encode_prompt(metadata, p, s, dtype) for p, s in zip(programs, stdins)]
    decoders = [tk.TokenDecoder(metadata, p, max_steps=max_steps, trace=t)
                for p, t in zip(programs, traces)]  # fmt: skip
    batch = Batch(model.layers, len(programs))
    with _OneThread():
        decode_lockstep(model, batch, decoders, model.prefill_many(batch, prompts))
    return [decoder.result for decoder in decoders]


def decode_lockstep(model: TorchModel, batch: Batch, decoders: Sequence[tk.TokenDecoder],
                    tokens: np.ndarray) -> None:  # fmt: skip
    """Feed program i's tokens to decoders[i], starting from tokens[i] (the token after
    its prompt), and step every program still running in one forward pass until the
    last decoder ends its run."""
    if len(decoders) == 1:
        decoder, token = decoders[0], tokens[0]
        with torch.no_grad():
            while decoder.feed(token):
                token = model.step_one(batch, 0, token)
        return
    active = list(range(len(decoders)))
    while True:
        keep = [r for r, i in enumerate(active) if decoders[i].feed(tokens[r])]
        if not keep:
            return
        if len(keep) < len(active):
            active = [active[r] for r in keep]
            tokens = tokens[keep]
        tokens = model.step_many(batch, active, tokens)
