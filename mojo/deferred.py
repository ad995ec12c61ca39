"""Deferred heads: attention outputs that the engine computes only when a step reads them.

Most heads of the interpreter model write dimensions that one family of experts reads:
the return address for RETURN, the memory bytes for loads, a local for LOCAL.GET. The
engine still appends every head's key and value at every position. It may postpone a
head's query, argmax and output projection until a product of the same step reads one
of the dimensions the head writes, and it skips them when none does. Every product that
runs then reads the same x, under two conditions that `Deferral` checks:

* no other head and no block writes the head's output rows, so adding the output later
  leaves those rows exactly as an immediate addition would;
* no head or block of its layer and no block or head of a later layer writes a column
  its query reads, so the query computed later equals the query at the head's own layer.

Each reader (a head projection, a router, the first layer of a block, the unembedding)
carries the bit mask of the deferrable heads whose output rows it reads, so the engine
tests one mask before it reads x. A head without output rows is never computed. Only
the first 64 heads can be deferred.
"""

from __future__ import annotations

import numpy as np

from tlc.mojo.weights import ModelWeights, SparseMatrix

MASK_HEADS = 64


class Deferral:
    """The deferrable heads of a model and the head masks of its readers."""

    def __init__(self, weights: ModelWeights):
        width = weights.width
        heads = [head for layer in weights.layers for head in layer.heads]
        layer_of = [index for index, layer in enumerate(weights.layers) for _ in layer.heads]

        # How many writers write each row, and which rows each head writes.
        writers = np.zeros(width, dtype=np.int64)
        self.rows = []
        for head in heads:
            rows = np.unique(head.wo.rows[head.wo.rows < width])
            self.rows.append(rows)
            writers[rows] += 1

        # Per layer, the rows that its blocks write, and those that its heads write.
        block_rows, head_rows = [], []
        for index, layer in enumerate(weights.layers):
            written = np.zeros(width, dtype=bool)
            for block in layer.blocks:
                rows = np.unique(block.w2.rows[block.w2.rows < width])
                rows = np.union1d(rows, np.flatnonzero(np.asarray(block.b2)[:width]))
                writers[rows] += 1
                written[rows] = True
            block_rows.append(written)
            from_heads = np.zeros(width, dtype=bool)
            for g, head in enumerate(heads):
                if layer_of[g] == index:
                    from_heads[self.rows[g]] = True
            head_rows.append(from_heads)

        self.deferrable = []
        for g, head in enumerate(heads):
            layer = layer_of[g]
            # Rows written at or after this layer's heads, where the query must not read.
            later = head_rows[layer].copy()
            for index in range(layer, len(weights.layers)):
                later |= block_rows[index]
                if index > layer:
                    later |= head_rows[index]
            query_columns = head.wq.cols[head.wq.cols < width]
            self.deferrable.append(
                g < MASK_HEADS
                and bool(np.all(writers[self.rows[g]] == 1))
                and not bool(later[query_columns].any())
            )

        self.head_of_row = np.full(width, -1, dtype=np.int64)
        for g, rows in enumerate(self.rows):
            if self.deferrable[g]:
                self.head_of_row[rows] = g

    def reads(self, matrix: SparseMatrix, below: int = MASK_HEADS) -> int:
        """Return the mask of the deferrable heads before head `below` whose output rows
        `matrix` reads, as a signed 64-bit integer (bit g for global head g).

        A head's own projections pass the layer's first head as `below`: they read x
        before any head of their layer adds its output.
        """
        columns = matrix.cols[(matrix.cols >= 0) & (matrix.cols < len(self.head_of_row))]
        heads = np.unique(self.head_of_row[columns])
        mask = np.uint64(0)
        for g in heads[(heads >= 0) & (heads < below)]:
            mask |= np.uint64(1) << np.uint64(g)
        return int(mask.view(np.int64))
