"""The Python side of the Mojo runtime: pack a weight file, decode, collect the output.

`run_tokens(weights, prompt, max_tokens)` is the model-level entry point: it returns the
generated tokens and output bytes, and the tests compare it token for token with the
numpy oracle `tlc.mojo.reference`. The decode loop itself runs in Mojo
(`tlc_mojo_engine`, built by `tlc.mojo.build`); Python only calls it in chunks so it can
stream output bytes and report progress between chunks.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlc.mojo import build
from tlc.mojo.deferred import Deferral
from tlc.mojo.twins import (
    cannot_produce_nan,
    growth,
    input_intervals,
    layer_sums_exact,
    magnitude,
    split_linear_units,
    twins_last,
)
from tlc.mojo.weights import (
    FeedForward,
    ModelWeights,
    SparseMatrix,
    WeightFileError,
    load_weights,
    weights_from_tensors,
)
from tlc.runtime.machine import RunResult, Status, check_run_arguments

logger = logging.getLogger("tlc.mojo")

# Must match MAGIC and END_MARK in engine.mojo.
PACK_MAGIC = 0x746C6301
PACK_END_MARK = 0x746C63FF

# Decoding runs in chunks of tokens: the first is small so that output appears at once,
# and each next one doubles while a chunk takes less than CHUNK_SECONDS.
FIRST_CHUNK = 1024
MAX_CHUNK = 1 << 20
# A recorded chunk stores F int64 per token, so its size is bounded in bytes.
MAX_RECORDED_BYTES = 8 << 20
# Prompt tokens converted to int64 and fed to the engine at a time.
FEED_CHUNK = 4096


def max_recorded_chunk(field_count: int) -> int:
    """Return the most tokens per chunk when tokens are recorded."""
    return max(1, MAX_RECORDED_BYTES // (8 * max(field_count, 1)))
CHUNK_SECONDS = 0.05


# ---- packing --------------------------------------------------------------------------


class _Packer:
    """Lays out every matrix and vector in the four flat arrays of engine.mojo and
    writes its header. Offsets count elements from the start of each array."""

    def __init__(self):
        self.int_parts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # ints[0]
        self.int_length = 1
        self.index_parts: list[np.ndarray] = []
        self.index_length = 0
        self.value_parts: list[np.ndarray] = []
        self.value_length = 0
        self.float_parts: list[np.ndarray] = []
        self.float_length = 0
        self.header: list[int] = []

    def _floats(self, values: np.ndarray) -> int:
        offset = self.float_length
        self.float_parts.append(np.asarray(values, dtype=np.float64))
        self.float_length += len(values)
        return offset

    def _indices(self, values: np.ndarray) -> int:
        offset = self.index_length
        self.index_parts.append(values.astype(np.int32))
        self.index_length += len(values)
        return offset

    def matrix(self, matrix: SparseMatrix, rows: int, cols: int, name: str,
               every_column: bool = False) -> None:  # fmt: skip
        """Add the 6 header Ints of a `Matrix` and its arrays: the nonempty columns, or
        every column when `every_column` (for lookups by column number)."""
        if matrix.shape != (rows, cols):
            raise WeightFileError(f"{name} has shape {matrix.shape}, expected {(rows, cols)}")
        pointers, row_ids, values = matrix.transpose().csr()
        column_ids = np.arange(cols, dtype=np.int64)
        if not every_column:
            column_ids = np.flatnonzero(np.diff(pointers))
            pointers = np.append(pointers[column_ids], pointers[-1])
        self.header += [rows, len(column_ids), self._ints(pointers), self._indices(column_ids),
                        self._indices(row_ids), self.value_length]  # fmt: skip
        self.value_parts.append(values.astype(np.float64))
        self.value_length += len(values)
        first_word, mask, rank = _column_mask(column_ids)
        self.header += [first_word, len(mask), self._ints(mask.view(np.int64)),
                        self._ints(rank)]  # fmt: skip

    def _ints(self, values: np.ndarray) -> int:
        offset = self.int_length
        self.int_parts.append(np.asarray(values, dtype=np.int64))
        self.int_length += len(values)
        return offset

    def vector(self, values: np.ndarray, length: int, name: str) -> None:
        if len(values) != length:
            raise WeightFileError(f"{name} has length {len(values)}, expected {length}")
        self.header.append(self._floats(values))

    def block(self, block: FeedForward, width: int, name: str,
              bound: np.ndarray | None, deferral: Deferral, exact: bool,
              linear: SparseMatrix | None = None) -> None:  # fmt: skip
        """Add a block with its twin rows (tlc.mojo.twins), the mask of the deferred
        heads its first layer reads, whether its sums are exact in any order
        (`layer_sums_exact`), and its linear map (`split_linear_units`, None: none)
        with the mask of the deferred heads it reads. `bound` bounds the block's input,
        or is None where twins are not allowed."""
        _check_block(block, width, name)
        reads = deferral.reads(block.w1)
        if linear is None:
            linear = SparseMatrix((width, width), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                  np.zeros(0))  # fmt: skip
        block, representatives, deltas = twins_last(block, bound)
        hidden = len(block.b1)
        self.matrix(block.w1, hidden, width, f"{name}.w1")
        self.vector(block.b1, hidden, f"{name}.b1")
        self.matrix(block.w2, width, hidden, f"{name}.w2")
        self.matrix(_column(block.b2), width, 1, f"{name}.b2")
        self.header += [len(representatives), self._ints(representatives),
                        self._floats(deltas), reads, int(exact)]  # fmt: skip
        self.matrix(linear, width, width, f"{name}.linear")
        self.header.append(deferral.reads(linear))

    def finish(self) -> PackedModel:
        header = np.array([PACK_MAGIC, *self.header, PACK_END_MARK], dtype=np.int64)
        ints = np.concatenate([*self.int_parts, header])
        ints[0] = self.int_length
        values = np.concatenate([np.zeros(0), *self.value_parts])
        # A value beyond the Float32 range becomes an infinity here and fails the
        # comparison, so numpy's overflow warning is not needed.
        with np.errstate(over="ignore"):
            narrow = bool(np.array_equal(values.astype(np.float32).astype(np.float64), values))
        if narrow:
            values = values.astype(np.float32)
            if len(values) % 2:
                values = np.append(values, np.float32(0.0))
        return PackedModel(
            ints=np.ascontiguousarray(ints),
            indices=np.ascontiguousarray(np.concatenate([np.zeros(0, np.int32),
                                                         *self.index_parts])),
            value_words=np.ascontiguousarray(values).view(np.float64),
            floats=np.ascontiguousarray(np.concatenate([np.zeros(0), *self.float_parts])),
            narrow=narrow,
        )


@dataclass(frozen=True)
class PackedModel:
    """The model in the layout of engine.mojo: entry pointers and header, Int32 column
    and row indices, entry values (as raw Float64 words, holding Float32 values when
    `narrow`) and bias vectors."""

    ints: np.ndarray
    indices: np.ndarray
    value_words: np.ndarray
    floats: np.ndarray
    narrow: bool

    def descriptor(self) -> np.ndarray:
        """Return the 9 Int64s that `create` of the extension reads."""
        parts = (self.ints, self.indices, self.value_words, self.floats)
        fields = [number for part in parts for number in (part.ctypes.data, len(part))]
        return np.array([*fields, int(self.narrow)], dtype=np.int64)


MASK_BITS = 64  # bits per mask word, as in kernels.mojo


def _column_mask(column_ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Return (first_word, mask, rank) of a `Matrix`.

    The mask words cover the 64-column words from first_word to the last one with a
    stored column. Bit c of mask[i] is set when column 64 (first_word + i) + c is stored,
    and rank[i] counts the stored columns before that word.
    """
    ids = np.asarray(column_ids, dtype=np.int64)
    if len(ids) == 0:
        return 0, np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    words = ids // MASK_BITS
    first_word = int(words.min())
    count = int(words.max()) - first_word + 1
    mask = np.zeros(count, dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), (ids % MASK_BITS).astype(np.uint64))
    np.bitwise_or.at(mask, words - first_word, bits)
    counts = np.bincount(words - first_word, minlength=count)
    rank = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return first_word, mask, rank


def _column(vector: np.ndarray) -> SparseMatrix:
    """Return a dense vector as a len(vector) x 1 sparse matrix of its nonzero entries."""
    rows = np.flatnonzero(vector)
    columns = np.zeros(len(rows), dtype=np.int64)
    return SparseMatrix((len(vector), 1), rows.astype(np.int64), columns, vector[rows])


def _stack_rows(matrices: list[SparseMatrix]) -> SparseMatrix:
    """Return the matrices stacked vertically (all have the same number of columns)."""
    offsets = np.cumsum([0] + [m.shape[0] for m in matrices])
    rows = np.concatenate([np.zeros(0, np.int64)]
                          + [m.rows + offset for m, offset in zip(matrices, offsets)])
    cols = np.concatenate([np.zeros(0, np.int64)] + [m.cols for m in matrices])
    values = np.concatenate([np.zeros(0)] + [m.values for m in matrices])
    width = matrices[0].shape[1] if matrices else 0
    return SparseMatrix((int(offsets[-1]), width), rows, cols, values)


def _check_block(block: FeedForward, width: int, name: str) -> None:
    """Raise WeightFileError when the block's shapes do not fit a residual of `width`."""
    hidden = len(block.b1)
    for part, matrix, shape in (("w1", block.w1, (hidden, width)),
                                ("w2", block.w2, (width, hidden))):  # fmt: skip
        if matrix.shape != shape:
            raise WeightFileError(f"{name}.{part} has shape {matrix.shape}, expected {shape}")
    if len(block.b2) != width:
        raise WeightFileError(f"{name}.b2 has length {len(block.b2)}, expected {width}")


def _check_layer(layer, width: int, name: str) -> None:
    """Raise WeightFileError when a head or block of the layer does not fit a residual
    of `width`, before the passes over the whole model index x with its rows."""
    for h, head in enumerate(layer.heads):
        key_width, value_width = len(head.bk), len(head.bv)
        for part, matrix, shape in (("wq", head.wq, (len(head.bq), width)),
                                    ("wk", head.wk, (key_width, width)),
                                    ("wv", head.wv, (value_width, width)),
                                    ("wo", head.wo, (width, value_width))):  # fmt: skip
            if matrix.shape != shape:
                raise WeightFileError(f"{name}.heads.{h}.{part} has shape {matrix.shape}, "
                                      f"expected {shape}")  # fmt: skip
    blocks = [("shared", layer.shared)] if layer.shared is not None else []
    blocks += [(f"experts.{e}", expert) for e, expert in enumerate(layer.experts)]
    for part, block in blocks:
        _check_block(block, width, f"{name}.{part}")


def _fuse_blocks(first: FeedForward, second: FeedForward) -> FeedForward:
    """Return one ReLU block that adds to x what both blocks add when they read the same
    y: the W1 rows of both stacked (the first block's hidden units first), their W2
    columns side by side and their b2 summed.

    The engine then runs one first and one second product instead of two each. Only the
    order of the additions into x changes, because b2 is summed before it is added. That
    is exact when every partial sum is an integer below 2^53, as in the certified models
    of docs/model.md, so the caller fuses only blocks whose b2 values are integers.
    """
    hidden = len(first.b1)
    w2 = SparseMatrix(
        (first.w2.shape[0], hidden + len(second.b1)),
        np.concatenate([first.w2.rows, second.w2.rows]),
        np.concatenate([first.w2.cols, second.w2.cols + hidden]),
        np.concatenate([first.w2.values, second.w2.values]),
    )
    return FeedForward(
        _stack_rows([first.w1, second.w1]),
        np.concatenate([first.b1, second.b1]),
        w2,
        np.asarray(first.b2, dtype=np.float64) + second.b2,
    )


def _integer_vector(values: np.ndarray) -> bool:
    """Return True when every entry is an integer of magnitude below 2^53."""
    values = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.floor(values) == values) and np.all(np.abs(values) < 2.0**53))


# Embedding values up to this size keep every sum of one value per field exact in
# Float64, for any order of additions and subtractions, with up to 2^20 fields.
_INCREMENTAL_LIMIT = 2.0**32


def _integer_valued(matrices: list[SparseMatrix]) -> bool:
    """Return True when every entry is an integer of magnitude at most 2^32, so that
    updating an embedding field by field gives exactly the sum over all fields."""
    for matrix in matrices:
        values = matrix.values
        if len(values) and not (np.all(np.floor(values) == values)
                                and np.abs(values).max() <= _INCREMENTAL_LIMIT):  # fmt: skip
            return False
    return True


def pack_model(weights: ModelWeights) -> PackedModel:
    """Return the model in the packed layout of engine.mojo."""
    packer = _Packer()
    width, fields = weights.width, weights.fields
    out_valid = -1 if weights.out_valid_field is None else weights.out_valid_field
    packer.header += [width, len(fields), len(weights.layers), weights.kind_field,
                      weights.run_value, out_valid, len(weights.out_byte_terms)]  # fmt: skip
    for field_index, weight in weights.out_byte_terms:
        packer.header += [field_index, weight]
    packer.header += [entry.vocab for entry in fields]
    for f, entry in enumerate(fields):
        for name, matrix in (("embed", weights.embed[f]), ("unembed", weights.unembed[f])):
            if matrix.shape != (entry.vocab, width):
                raise WeightFileError(f"{name}.{f} has shape {matrix.shape}, expected "
                                      f"{(entry.vocab, width)}")  # fmt: skip
        if len(weights.unembed_bias[f]) != entry.vocab:
            raise WeightFileError(f"unembed.{f}.bias has length "
                                  f"{len(weights.unembed_bias[f])}, expected {entry.vocab}")
    total_vocab = sum(entry.vocab for entry in fields)
    incremental = _integer_valued(weights.embed)
    packer.header.append(1 if incremental else 0)
    packer.header.append(0 if cannot_produce_nan(weights) else 1)
    packer.matrix(_stack_rows(weights.embed).transpose(), width, total_vocab, "embed",
                  every_column=True)  # fmt: skip
    packer.matrix(_stack_rows(weights.unembed), total_vocab, width, "unembed")
    packer.vector(np.concatenate([np.zeros(0), *weights.unembed_bias]), total_vocab,
                  "unembed bias")  # fmt: skip
    for index, layer in enumerate(weights.layers):
        _check_layer(layer, width, f"layers.{index}")
    deferral = Deferral(weights)
    packer.header.append(deferral.reads(_stack_rows(weights.unembed)))
    first_qkv = first_layer_qkv(weights) if incremental else None
    if first_qkv is None:
        packer.header.append(0)
    else:
        matrix, bias = first_qkv
        rows = matrix.shape[0]
        packer.header.append(rows)
        packer.matrix(matrix, rows, total_vocab, "layers.0 qkv of the embedding",
                      every_column=True)  # fmt: skip
        packer.vector(bias, rows, "layers.0 qkv bias")
    dependencies = head_dependencies(weights)
    intervals = input_intervals(weights) or [None] * len(weights.layers)
    first_head = 0
    for index, layer in enumerate(weights.layers):
        _pack_layer(packer, layer, width, f"layers.{index}", dependencies[index],
                    intervals[index], (deferral, first_head))  # fmt: skip
        first_head += len(layer.heads)
    return packer.finish()


def first_layer_qkv(weights: ModelWeights) -> tuple[SparseMatrix, np.ndarray] | None:
    """Return Wqkv E^T, the query, key and value maps of the first layer's heads applied
    to the embedding, and their biases, or None when the engine must compute them from x.

    The matrix has a row per component, by head and then q, k, v, and a column per token
    value, as the stacked embedding has.

    The first layer reads x before any layer writes it, so a head's q, k and v are the
    bias plus one column of this matrix per field. The engine updates them by the
    changed fields only, like the embedding. That gives exactly the plain product when
    every weight, bias and embedding value is an integer and |bias| plus the row sums of
    |Wqkv| |E^T| stay below 2^53, which bounds every partial sum of both (checked here).
    """
    if not weights.layers or not weights.layers[0].heads:
        return None
    width = weights.width
    parts, biases = [], []
    for head in weights.layers[0].heads:
        for matrix, bias in ((head.wq, head.bq), (head.wk, head.bk), (head.wv, head.bv)):
            if matrix.shape != (len(bias), width):
                return None  # _pack_layer reports the wrong shape
            parts.append(matrix)
            biases.append(np.asarray(bias, dtype=np.float64))
    projection = _stack_rows(parts)
    bias = np.concatenate(biases)
    if len(bias) == 0:
        return None  # the engine reads no matrix when it has no rows
    if not (_integer_vector(projection.values) and _integer_vector(bias)):
        return None
    # E^T by rows: the token values (stacked columns) and entries of each dimension.
    pointers, token_values, embedding_values = _stack_rows(weights.embed).transpose().csr()
    counts = pointers[projection.cols + 1] - pointers[projection.cols]
    starts = np.repeat(pointers[projection.cols], counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    entries = starts + within
    rows = np.repeat(projection.rows, counts)
    products = np.repeat(projection.values, counts) * embedding_values[entries]
    bound = np.abs(bias)
    np.add.at(bound, rows, np.abs(products))
    if len(bound) and bound.max() >= 2.0**53:
        return None
    total_vocab = sum(entry.vocab for entry in weights.fields)
    matrix = SparseMatrix((len(bias), total_vocab), rows, token_values[entries], products)
    return matrix, bias


TokenFields = list[int] | None


def head_dependencies(weights: ModelWeights) -> list[list[tuple[TokenFields, ...]]]:
    """Return, per layer and head, the token fields that its keys, values and queries
    depend on, each None when the projection reads a residual dimension that an earlier
    layer writes.

    A projection that reads only dimensions no earlier layer writes sees the embedding
    there, sum over f of E_f[t_f], so it is a function of the fields whose embedding
    rows have an entry in one of the dimensions it reads. The engine reuses the last
    key, value or winning slot of a head while none of those fields changes. The written
    dimensions are the rows of every earlier output projection and second-layer matrix
    and the nonzero components of every earlier b2, whatever their values.
    """
    stacked = _stack_rows(weights.embed)
    field_of_row = np.repeat(np.arange(len(weights.fields)),
                             [entry.vocab for entry in weights.fields])  # fmt: skip
    written = np.zeros(weights.width, dtype=bool)

    def fields_of(matrix: SparseMatrix) -> TokenFields:
        read = np.zeros(weights.width, dtype=bool)
        read[matrix.cols] = True
        if (read & written).any():
            return None
        return [int(f) for f in np.unique(field_of_row[stacked.rows[read[stacked.cols]]])]

    dependencies = []
    for layer in weights.layers:
        dependencies.append([(fields_of(head.wk), fields_of(head.wv), fields_of(head.wq))
                             for head in layer.heads])  # fmt: skip
        for head in layer.heads:
            written[head.wo.rows] = True
        for block in layer.blocks:
            written[block.w2.rows] = True
            written[np.flatnonzero(block.b2)] = True
    return dependencies


def _pack_layer(packer: _Packer, layer, width: int, name: str,
                dependencies: list[tuple[TokenFields, ...]],
                interval: tuple[np.ndarray, np.ndarray] | None,
                heads: tuple[Deferral, int]) -> None:  # fmt: skip
    """Add one layer. `interval` is the interval of the feed-forward input y (None where
    it is unknown), `heads` the model's Deferral and the global index of the layer's
    first head."""
    deferral, first_head = heads
    bound = None if interval is None else magnitude(interval)
    packer.header.append(len(layer.heads))
    for h, head in enumerate(layer.heads):
        prefix = f"{name}.heads.{h}"
        key_width, value_width = len(head.bk), len(head.bv)
        if len(head.bq) != key_width:
            raise WeightFileError(f"{prefix}: queries have {len(head.bq)} components and "
                                  f"keys {key_width}")  # fmt: skip
        packer.header.append(1 if head.lookup == "exact" else 0)
        for part, length in (("q", key_width), ("k", key_width), ("v", value_width)):
            packer.matrix(getattr(head, f"w{part}"), length, width, f"{prefix}.w{part}")
            packer.vector(getattr(head, f"b{part}"), length, f"{prefix}.b{part}")
        packer.matrix(head.wo, width, value_width, f"{prefix}.wo")
        for fields in dependencies[h]:
            packer.header += [-1] if fields is None else [len(fields), *fields]
        packer.header += [int(deferral.deferrable[first_head + h]),
                          *(deferral.reads(matrix, below=first_head)
                            for matrix in (head.wq, head.wk, head.wv))]  # fmt: skip
    shared = layer.shared
    experts = layer.experts
    if shared is not None and experts:
        _check_block(shared, width, f"{name}.shared")
        for e, expert in enumerate(experts):
            _check_block(expert, width, f"{name}.experts.{e}")
        # Each expert carries a copy of the shared block, so that a step runs one block,
        # unless an expert uses the block memo: a fused key mixes both blocks' inputs and
        # misses more often.
        has_memo = any(layer_sums_exact(shared, [expert], bound, interval)
                       for expert in experts)  # fmt: skip
        if not has_memo and all(_integer_vector(block.b2) for block in [shared, *experts]):
            experts = [_fuse_blocks(shared, expert) for expert in experts]
            shared = None
    # The shared block runs with every expert; an expert runs with the shared block only.
    packer.header.append(0 if shared is None else 1)
    split = _Split(shared, experts, interval, width)
    if shared is not None:
        exact = layer_sums_exact(shared, experts, bound, interval)
        shared_part, linear = split(shared, exact)
        packer.block(shared_part, width, f"{name}.shared", bound, deferral, exact, linear)
    packer.header.append(len(experts))
    if experts:
        count = len(experts)
        packer.matrix(layer.router_w, count, width, f"{name}.router.w")
        packer.vector(layer.router_b, count, f"{name}.router.b")
        packer.header.append(deferral.reads(layer.router_w))
        for e, expert in enumerate(experts):
            exact = layer_sums_exact(shared, [expert], bound, interval)
            part, linear = split(expert, exact)
            packer.block(part, width, f"{name}.experts.{e}", bound, deferral, exact, linear)


class _Split:
    """The splitter of one layer's exact blocks (`split_linear_units`)."""

    def __init__(self, shared: FeedForward | None, experts: list[FeedForward],
                 interval: tuple[np.ndarray, np.ndarray] | None, width: int):  # fmt: skip
        self.shared = shared
        self.experts = experts
        self.interval = interval
        # The rows that some block of the layer writes.
        self.written = np.zeros(width, dtype=bool)
        for block in ([] if shared is None else [shared]) + experts:
            self.written[block.w2.rows] = True
            self.written[np.flatnonzero(block.b2)] = True
        # The growth of the blocks that run with the shared block and with an expert,
        # found on first use.
        self.elsewhere: dict[bool, np.ndarray] = {}

    def __call__(self, block: FeedForward, exact: bool) -> tuple[FeedForward, SparseMatrix | None]:
        """Return the block to pack and its linear map, or None."""
        if not exact or self.interval is None:
            return block, None
        # An expert runs with the shared block, and the shared block with the largest
        # expert.
        is_shared = block is self.shared
        if is_shared not in self.elsewhere:
            others = self.experts if is_shared else [self.shared]
            elsewhere = np.zeros(len(self.written))
            for other in others:
                if other is not None:
                    elsewhere = np.maximum(elsewhere, growth(other, self.interval))
            self.elsewhere[is_shared] = elsewhere
        return split_linear_units(block, self.interval, self.written,
                                  self.elsewhere[is_shared])  # fmt: skip


# ---- the engine -----------------------------------------------------------------------


class MemoCounts(NamedTuple):
    """The counts of one engine's block memo: the records it contains, the outputs taken
    from it, its clears, its lookups and the hash-table slots those lookups read."""

    records: int
    hits: int
    clears: int
    lookups: int
    probes: int


class Chunk(NamedTuple):
    """The tokens, output bytes and counts of one MojoEngine.generate call."""

    tokens: np.ndarray | None  # (emitted, F) int64 when recorded
    output: bytes
    emitted: int
    stopped: bool


@dataclass
class Decoded:
    """The tokens, output bytes and counts of one decoding run."""

    tokens: np.ndarray | None  # (n, F) int64 when recorded
    output: bytes
    token_count: int
    stopped: bool  # a token whose kind is not RUN ended the run
    last_token: tuple[int, ...] | None  # None when no token was generated
    previous_token: tuple[int, ...] | None  # the token before last_token


class MojoEngine:
    """One loaded model with fresh KV caches. Feed it a prompt, then generate."""

    def __init__(self, weights: ModelWeights, packed: PackedModel | None = None):
        self._extension = build.load_extension()
        self.weights = weights
        packed = pack_model(weights) if packed is None else packed
        descriptor = packed.descriptor()  # keep it alive during the call
        self._handle = self._extension.create(descriptor.ctypes.data)
        # generate() writes (tokens emitted, bytes written, stopped), the last token and
        # the token before it.
        self._status = np.zeros(3 + 2 * len(weights.fields), dtype=np.int64)

    def close(self) -> None:
        if self._handle:
            self._extension.destroy(self._handle)
            self._handle = 0

    def __enter__(self) -> MojoEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_handle", 0):
            self.close()

    def feed(self, prompt) -> None:
        """Run the prompt. Its last token's prediction is the first generated token.

        The engine reads int64 tokens. A prompt of narrower integers (tlc.model.tokens
        builds uint8 ones) is converted FEED_CHUNK tokens at a time, so that a long
        stdin is never held as one int64 array. Each call predicts from its last token,
        which changes no cache, and the last call's prediction is the one that stays.
        """
        prompt = check_prompt(self.weights, prompt)
        for start in range(0, len(prompt), FEED_CHUNK):
            part = np.ascontiguousarray(prompt[start : start + FEED_CHUNK], dtype=np.int64)
            self._extension.feed(self._handle, part.ctypes.data, len(part))

    def generate(self, max_tokens: int, record: bool) -> Chunk:
        """Emit up to `max_tokens` tokens, fewer when one of them stops the run."""
        if isinstance(max_tokens, bool) or not hasattr(max_tokens, "__index__") or max_tokens < 0:
            raise ValueError(f"generate needs a token count of 0 or more, got {max_tokens!r}")
        max_tokens = operator.index(max_tokens)
        field_count = len(self.weights.fields)
        tokens = np.zeros((max_tokens, field_count), dtype=np.int64) if record else None
        output = np.zeros(max(max_tokens, 1), dtype=np.uint8)
        self._extension.generate(self._handle, max_tokens,
                                 0 if tokens is None else tokens.ctypes.data,
                                 output.ctypes.data, self._status.ctypes.data)  # fmt: skip
        emitted, written, stopped = (int(value) for value in self._status[:3])
        recorded = None if tokens is None else tokens[:emitted]
        return Chunk(recorded, output[:written].tobytes(), emitted, bool(stopped))

    def last_token(self) -> tuple[int, ...]:
        """Return the last token that generate() emitted."""
        count = len(self.weights.fields)
        return tuple(int(value) for value in self._status[3 : 3 + count])

    def previous_token(self) -> tuple[int, ...]:
        """Return the token before the last one emitted: the last prompt token when
        only one token was generated."""
        count = len(self.weights.fields)
        return tuple(int(value) for value in self._status[3 + count : 3 + 2 * count])

    def memo_counts(self) -> MemoCounts:
        """Return the block memo's counts (engine.mojo)."""
        counts = np.zeros(len(MemoCounts._fields), dtype=np.int64)
        self._extension.memo_counts(self._handle, counts.ctypes.data)
        return MemoCounts(*(int(count) for count in counts))

    def limit_memo(self, records: int) -> None:
        """Clear the block memo whenever it reaches `records` records. A count above the
        engine's largest limit, which is the default, uses that limit. Tests lower it so
        that runs clear the memo often."""
        if isinstance(records, bool) or not isinstance(records, int) or records < 1:
            raise ValueError(f"limit_memo needs a positive record count, got {records!r}")
        self._extension.limit_memo(self._handle, min(records, 2**31))

    def cache_sizes(self) -> list[int]:
        """Return the number of cached entries of every head, layer by layer."""
        sizes = np.zeros(sum(len(layer.heads) for layer in self.weights.layers) + 1,
                         dtype=np.int64)  # fmt: skip
        count = self._extension.cache_sizes(self._handle, sizes.ctypes.data)
        return [int(size) for size in sizes[:count]]


def check_prompt(weights: ModelWeights, prompt) -> np.ndarray:
    """Return the prompt as a (P, F) array of integers: its own integer type when it
    has one, else int64.

    Raises ValueError when the prompt is empty or a value is outside its field's
    vocabulary.
    """
    prompt = np.asarray(prompt)
    if not np.issubdtype(prompt.dtype, np.integer):
        # Whole floats (a prompt read from a float tensor) are token values too.
        if prompt.dtype.kind not in "fb" or not np.array_equal(prompt, np.floor(prompt)):
            raise ValueError(f"the prompt must contain whole token values, got an array of "
                             f"{prompt.dtype}")  # fmt: skip
        prompt = prompt.astype(np.int64)
    field_count = len(weights.fields)
    if prompt.ndim != 2 or prompt.shape[1] != field_count or len(prompt) == 0:
        raise ValueError(f"the prompt must be a non-empty (P, {field_count}) array of "
                         f"token values, got shape {prompt.shape}")  # fmt: skip
    vocab = np.array([entry.vocab for entry in weights.fields])
    bad = np.argwhere((prompt < 0) | (prompt >= vocab))
    if len(bad):
        row, column = (int(n) for n in bad[0])
        name = weights.fields[column].name
        raise ValueError(f"prompt token {row}: value {prompt[row, column]} of field "
                         f"{name!r} is outside its vocabulary of {vocab[column]}")  # fmt: skip
    return prompt


def decode(
    engine: MojoEngine,
    max_tokens: int | None,
    *,
    record: bool = True,
    write_output: Callable[[bytes], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Decoded:
    """Generate in chunks until the run stops or `max_tokens` tokens (None: no limit)."""
    field_count = len(engine.weights.fields)
    limit = max_recorded_chunk(field_count) if record else MAX_CHUNK
    chunk = min(FIRST_CHUNK, limit)
    chunks: list[np.ndarray] = []
    output = bytearray()
    count = 0
    stopped = False

    while not stopped and (max_tokens is None or count < max_tokens):
        size = chunk if max_tokens is None else min(chunk, max_tokens - count)
        started = time.perf_counter()
        piece = engine.generate(size, record)
        elapsed = time.perf_counter() - started
        stopped = piece.stopped
        count += piece.emitted
        if piece.tokens is not None:
            chunks.append(piece.tokens)
        output += piece.output
        if piece.output and write_output is not None:
            write_output(piece.output)
        if progress is not None and not stopped:
            progress(count)
        if elapsed < CHUNK_SECONDS:
            chunk = min(chunk * 2, limit)

    tokens = None
    if record:
        tokens = np.concatenate(chunks) if chunks else np.zeros((0, field_count), np.int64)
    last = engine.last_token() if count else None
    previous = engine.previous_token() if count else None
    return Decoded(tokens, bytes(output), count, stopped, last, previous)


# ---- loading with a cache --------------------------------------------------------------

# Loaded models by (path, size, modification time), plus the universal model.
_loaded: dict[tuple | str, tuple[ModelWeights, PackedModel]] = {}


def load_packed(path: str | Path) -> tuple[ModelWeights, PackedModel]:
    """Return the weights at `path` and their packed form, reusing the last load while
    the file's size and modification time are unchanged."""
    path = Path(path).resolve()
    if path.is_dir():
        raise WeightFileError(f"{path}: is a folder, not a weight file")
    try:
        info = os.stat(path)
    except OSError as error:
        raise WeightFileError(f"{path}: cannot read the weight file: "
                              f"{error.strerror}") from None  # fmt: skip
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _loaded:
        from tlc.model.weights import TENSORS_INVALID, invalid_contents

        weights = load_weights(path)
        try:
            packed = pack_model(weights)
        except WeightFileError as error:
            raise WeightFileError(f"{path}: {error}; rebuild it with `tlc build`") from None
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise WeightFileError(invalid_contents(path, TENSORS_INVALID, error)) from None
        for stale in [k for k in _loaded if k != _UNIVERSAL]:
            del _loaded[stale]
        _loaded[key] = (weights, packed)
    return _loaded[key]


def run_tokens(
    weights: ModelWeights | str | Path,
    prompt,
    max_tokens: int | None,
    *,
    record: bool = True,
) -> tuple[np.ndarray | None, bytes]:
    """Decode from `prompt` until a token whose kind is not RUN, or `max_tokens` tokens.

    Returns the generated tokens as an (n, F) int64 array (the stopping token included;
    None when `record` is off) and the output bytes they carry.
    """
    if isinstance(weights, ModelWeights):
        model, packed = weights, None
    else:
        model, packed = load_packed(weights)
    with MojoEngine(model, packed) as engine:
        engine.feed(prompt)
        decoded = decode(engine, max_tokens, record=record)
    return decoded.tokens, decoded.output


def engine_unavailable_reason() -> str | None:
    """Return why the Mojo engine cannot be built or loaded here, or None."""
    return build.unavailable_reason()


# ---- programs --------------------------------------------------------------------------


def _model_helpers():
    """Return tlc.model.tokens, which encodes programs as prompts and decodes generated
    tokens into trace lines and RunResults. Raises ImportError while it is missing."""
    from tlc.model import tokens

    for name in ("encode_prompt", "TokenDecoder"):
        if not hasattr(tokens, name):
            raise ImportError(f"tlc.model.tokens has no {name}")
    return tokens


_UNIVERSAL = "<universal model>"


def load_universal() -> tuple[ModelWeights, PackedModel]:
    """Return the universal interpreter model, from tlc.model's weight cache, and its
    packed form. Loaded once per process."""
    if _UNIVERSAL not in _loaded:
        from tlc.model.weights import universal_weights

        tensors, metadata = universal_weights()
        weights = weights_from_tensors(tensors, metadata, _UNIVERSAL)
        _loaded[_UNIVERSAL] = (weights, _cached_pack(weights))
    return _loaded[_UNIVERSAL]


# The sources whose code decides the packed layout of a weight file.
_PACKER_SOURCES = ("runner.py", "twins.py", "deferred.py", "weights.py")


def _cached_pack(weights: ModelWeights) -> PackedModel:
    """Return `pack_model(weights)` for the universal model, from the tlc cache folder
    when an earlier process packed the same weights with the same packer.

    Packing takes about 0.09 s, half of a short program's start-up. The cache key is the
    weights' checksum and a hash of the packer's sources, and weights without a checksum
    are packed each time. A cache that cannot be read or written is skipped.
    """
    from tlc.cache import cache_dir

    checksum = weights.metadata.get("checksum")
    if not isinstance(checksum, str):
        return pack_model(weights)
    hasher = hashlib.sha256(checksum.encode())
    folder = Path(__file__).resolve().parent
    for name in _PACKER_SOURCES:
        hasher.update((folder / name).read_bytes())
    path = cache_dir() / "packed" / f"universal-{hasher.hexdigest()[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as arrays:
                return PackedModel(arrays["ints"], arrays["indices"], arrays["value_words"],
                                   arrays["floats"], bool(arrays["narrow"]))  # fmt: skip
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            logger.warning("the cached packed model %s is invalid, packing again: %s", path, error)
    packed = pack_model(weights)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(handle, "wb") as file:
            np.savez(file, ints=packed.ints, indices=packed.indices,
                     value_words=packed.value_words, floats=packed.floats,
                     narrow=np.array(packed.narrow))  # fmt: skip
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        logger.info("cannot cache the packed universal model in %s: %s", path.parent, error)
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
    return packed


def unavailable_reason() -> str | None:
    """Return why `run_program` cannot run here, or None when it can."""
    reason = build.unavailable_reason()
    if reason is not None:
        return reason
    try:
        _model_helpers()
        from tlc.model.weights import model_tensors, universal_model  # noqa: F401
    except ImportError as error:
        return f"the interpreter model is not available yet: {error}"
    return None


def is_available() -> bool:
    """Return True when the Mojo runtime can run programs on this machine."""
    reason = unavailable_reason()
    if reason is not None:
        logger.info("the Mojo backend is not available: %s", reason)
    return reason is None


def run_program(
    program,
    *,
    stdin: bytes = b"",
    max_steps: int | None = None,
    trace: Callable[[str], None] | None = None,
    write_output: Callable[[bytes], None] | None = None,
    weights: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
):
    """Run `program` inside the model on the Mojo runtime and return its RunResult.

    One generated token is one executed instruction, so at most `max_steps` tokens are
    generated. `trace` gets one line per instruction, `write_output` each output byte
    as the program writes it and `progress` the token count between chunks.
    """
    check_run_arguments(stdin, max_steps)
    tokens = _model_helpers()
    from tlc.model.weights import TOKENS_INVALID, check_format, invalid_contents, uncovered_opcodes

    model, packed = load_universal() if weights is None else load_packed(weights)
    if weights is not None:
        # The engine runs any model of docs/model.md section 1, but a program's prompt
        # and trace need this version's token fields.
        try:
            check_format(model.metadata, weights)
        except ValueError as error:
            raise WeightFileError(str(error)) from None
    missing = uncovered_opcodes(model.metadata, program)
    if missing:
        raise ValueError(f"the model does not compute {', '.join(missing)} yet; "
                         "run this program with --backend ref")  # fmt: skip
    try:
        prompt = tokens.encode_prompt(model.metadata, program, stdin,
                                      tokens.token_dtype(model.metadata))
        # A traced run decodes every token and writes the output bytes as they come. An
        # untraced run decodes only the last tokens, and `decode` writes the output.
        decoder = tokens.TokenDecoder(
            model.metadata, program, max_steps=max_steps, trace=trace,
            write_output=write_output if trace is not None else None,
        )  # fmt: skip
    except (KeyError, IndexError, TypeError) as error:
        source = weights if weights is not None else "the universal weights"
        raise WeightFileError(invalid_contents(source, TOKENS_INVALID, error)) from None
    with MojoEngine(model, packed) as engine:
        engine.feed(prompt)
        if trace is not None:
            return _run_traced(engine, decoder, max_steps, progress)
        decoded = decode(engine, max_steps, record=False, write_output=write_output,
                         progress=progress)  # fmt: skip
    return _result_of(decoded, decoder, tokens.SCHEMA)


def _run_traced(engine: MojoEngine, decoder, max_steps: int | None, progress):
    """Generate in chunks and feed every token to the decoder, which prints the trace."""
    chunk = max_recorded_chunk(len(engine.weights.fields))
    count = 0
    while max_steps is None or count < max_steps:
        size = chunk if max_steps is None else min(chunk, max_steps - count)
        piece = engine.generate(size, record=True)
        count += piece.emitted
        for token in piece.tokens:
            if not decoder.feed(token):
                return decoder.result
        if progress is not None:
            progress(count)
        if piece.stopped:
            break
    return decoder.result if decoder.result is not None else _step_limit(decoder)


def _result_of(decoded: Decoded, decoder, schema):
    """Build the RunResult of an untraced run from its token count, its output and its
    last two tokens, without feeding every token through the decoder.

    Every token before the last has kind RUN (the engine stops at the first other kind)
    and is one executed instruction, so the decoder is set to the state it would have
    after them and then fed the last token.
    """
    if decoded.last_token is None:
        return _step_limit(decoder)
    last = np.asarray(decoded.last_token, dtype=np.int64)
    output = decoded.output
    if last[schema.index("out_valid")] == 1:
        output = output[:-1]  # the decoder adds the last token's byte itself
    decoder.steps = decoded.token_count - 1
    decoder.tokens = decoded.token_count - 1
    decoder.output = bytearray(output)
    if decoded.token_count > 1:
        decoder.previous_ip = schema.bits(np.asarray(decoded.previous_token), "ip")
    decoder.feed(last)
    return decoder.result if decoder.result is not None else _step_limit(decoder)


def _step_limit(decoder) -> RunResult:
    return RunResult(Status.STEP_LIMIT, decoder.steps, bytes(decoder.output),
                     tokens=decoder.tokens)  # fmt: skip
