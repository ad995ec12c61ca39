"""Folding for the PyTorch runtime's one-program step: the products that write the
residual x also compute what later readers of x read (see `Folding`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from tlc.runtime.torch_sparse import DTYPE, torch_csr

if TYPE_CHECKING:
    from tlc.runtime.torch_runner import FusedBlock, Layer, TorchModel

# float64 represents every integer below 2^53. Bounds must stay below 2^52, which leaves
# room for the rounding of the bound arithmetic itself.
LIMIT = 2.0**52


@dataclass
class _Reader:
    """A group of rows of z that a later computation reads instead of a product of x."""

    rows: slice  # in z
    matrix: sp.csr_matrix  # (n, D): the product it replaces is matrix @ x + bias
    bias: np.ndarray
    time: float  # when the layer loop reads it (see `Folding`)


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
        self.embed = torch_csr(self._extend(embedding_t, ones, -1.0, self.start_stale))
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
        self.routers_matrix = torch_csr(sp.vstack([self.readers[r].matrix
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
        self.unembedding = torch_csr(unembedding)
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
            after = [before]  # per expert, and the largest of them for the next layer
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
        """Mark stale for every step the readers that read at `time` if R x + b could
        reach 2^52, so that they never fold."""
        for r, reader in enumerate(self.readers):
            if reader.time != time or self.start_stale[r]:
                continue
            bias = np.abs(np.where(np.isfinite(reader.bias), reader.bias, 0.0))
            direct = np.abs(reader.matrix) @ self.x_bounds[r] + bias
            # A bound that overflowed can be NaN (0 * inf), and NaN < LIMIT is False.
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
        return _Writer(torch_csr(matrix[window]), stales, len(self.windows) - 1)

    def new_residual(self) -> tuple:
        """Return a buffer z for one program's steps, its numpy view, its x part and its
        views of every writer's window."""
        z = torch.zeros(self.size, dtype=DTYPE)
        return z, z.numpy(), z[: self.width], [z[window] for window in self.windows]

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
