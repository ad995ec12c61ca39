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

The head caches live in `tlc.runtime.torch_heads`, the folding in
`tlc.runtime.torch_folding` and the conversion of sparse matrices in
`tlc.runtime.torch_sparse`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
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
from tlc.mojo.weights import check_structure
from tlc.runtime.machine import Program, RunResult, Status, check_run_arguments
from tlc.runtime.torch_folding import Folding, integral
from tlc.runtime.torch_heads import HeadCaches, HeadLayout, KeyTable
from tlc.runtime.torch_sparse import DTYPE, torch_csr

logger = logging.getLogger("tlc.runtime")

PROGRESS_EVERY = 1024  # steps between calls of the progress callback
PREFILL_CHUNK = 2048  # prompt rows per pass: a (D, chunk) float64 activation at a time


def is_available() -> bool:
    return True


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
        self.w1 = torch_csr(w1)
        self.b1 = torch.from_numpy(b1)
        self.w2 = torch_csr(w2)
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
        self.w1 = torch_csr(self.w1_scipy)
        self.b1 = torch.from_numpy(np.concatenate(b1s))
        self.w2 = torch_csr(self.w2_scipy)
        self.extended = None  # W2 extended with the readers' shares (see `Folding`)


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
        self.weights = torch_csr(stacked)
        self.bias = torch.from_numpy(bias)

    def choose_many(self, y: torch.Tensor) -> torch.Tensor:
        """Return each router's expert for each column of y: (count, n)."""
        logits = torch.sparse.mm(self.weights, y).add_(self.bias.unsqueeze(1))
        logits = logits.T.contiguous().view(-1, self.count, self.width)
        return logits.argmax(dim=2).T


# --- attention -----------------------------------------------------------------------


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
        self.qkv = torch_csr(self.qkv_scipy)
        self.qkv_bias = torch.from_numpy(np.concatenate(biases).astype(np.float64))
        self.key_groups = self._group_keys()
        wo = sp.hstack([
            sparse_from(tensors, shapes, f"{prefix}.heads.{h}.wo") for h in range(len(heads))
        ]).tocsr()  # fmt: skip
        self.writes = np.flatnonzero(np.diff(wo.indptr))
        self.wo_scipy = wo
        self.wo = torch_csr(wo)
        key_value_rows = np.concatenate([
            np.arange(head.key.start, head.value.stop) for head in self.heads
        ])  # fmt: skip
        self.key_value_reads = np.unique(self.qkv_scipy[key_value_rows].indices)

    def new_caches(self, programs: int) -> list[HeadCaches]:
        """Return each head's caches. Heads with equal key projections share a table."""
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
        self.embedding_t = torch_csr(embedding_t)
        self.unembedding_scipy = self._stack(tensors, shapes, "unembed", vocabs)
        self.unembedding = torch_csr(self.unembedding_scipy)
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
        """Concatenate the per-field (V_f, D) matrices into one sparse table, from their
        stored entries with each field's rows moved below the fields before it."""
        names = [f"{prefix}.{f}" for f in range(len(vocabs))]
        heights = [int(shapes[name][0]) for name in names]
        starts = np.concatenate([[0], np.cumsum(heights)[:-1]]).astype(np.int64)
        rows = np.concatenate([np.asarray(tensors[f"{name}.rows"], dtype=np.int64) + start
                               for name, start in zip(names, starts)])  # fmt: skip
        columns = np.concatenate([tensors[f"{name}.cols"] for name in names])
        values = np.concatenate([tensors[f"{name}.values"] for name in names])
        width = int(shapes[names[0]][1]) if names else 0
        return sp.csr_matrix((values, (rows, columns)), shape=(sum(heights), width))

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
            residual = batch.residual = self.folding.new_residual()
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
        # The Mojo runtime's reader checks every shape against the metadata, which
        # TorchModel trusts.
        try:
            check_structure(tensors, metadata, str(weights))
        except ValueError as error:
            raise WeightFileError(str(error)) from None
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
    check_run_arguments(stdin, max_steps)
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
    for stdin in stdins:
        check_run_arguments(stdin, max_steps)
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
