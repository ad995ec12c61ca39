"""The built model: embedding, layers of heads and feed-forward blocks, unembedding.

Matrices are scipy CSR matrices in float64. The structure is the one of docs/model.md
section 1; `tlc.model.weights` writes it to a safetensors file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from tlc.model.circuit import Block
from tlc.model.wiring import Lin


def rows_to_matrix(rows: Sequence[Lin], width: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Return (W, b) with row i of W x + b equal to rows[i]."""
    data, row_index, col_index = [], [], []
    bias = np.zeros(len(rows))
    for r, row in enumerate(rows):
        for dim, weight in row.terms.items():
            if weight != 0.0:
                row_index.append(r)
                col_index.append(dim)
                data.append(weight)
        bias[r] = row.const
    matrix = sp.csr_matrix((data, (row_index, col_index)), shape=(len(rows), width))
    matrix.sum_duplicates()
    return matrix, bias


@dataclass
class Head:
    """One hard-max attention head: score q . k_i, value v_j, output Wo v_j."""

    name: str
    role: str
    lookup: str  # "exact" (docs/model.md section 1) or "hardmax"
    wq: sp.csr_matrix
    bq: np.ndarray
    wk: sp.csr_matrix
    bk: np.ndarray
    wv: sp.csr_matrix
    bv: np.ndarray
    wo: sp.csr_matrix
    key_bits: int = 0  # n of an exact-match head

    @staticmethod
    def from_rows(name, role, lookup, queries, keys, values, outputs, width, key_bits=0):
        """Build a head from linear rows; `outputs[i]` is the residual dim that value
        component i is added to, and the components past len(outputs) are not read."""
        if len(outputs) > len(values):
            raise ValueError(f"head {name}: {len(outputs)} outputs for {len(values)} value "
                             f"components; give at most one output per component")  # fmt: skip
        if len(queries) != len(keys):
            raise ValueError(f"head {name}: {len(queries)} query rows but {len(keys)} keys")
        wq, bq = rows_to_matrix(queries, width)
        wk, bk = rows_to_matrix(keys, width)
        wv, bv = rows_to_matrix(values, width)
        wo = sp.csr_matrix(
            (np.ones(len(outputs)), (list(outputs), list(range(len(outputs))))),
            shape=(width, len(values)),
        )
        return Head(name, role, lookup, wq, bq, wk, bk, wv, bv, wo, key_bits)


@dataclass
class FeedForward:
    """x + W2 ReLU(W1 y + b1) + b2."""

    name: str
    role: str
    w1: sp.csr_matrix
    b1: np.ndarray
    w2: sp.csr_matrix
    b2: np.ndarray
    opcodes: list[str] = field(default_factory=list)

    @staticmethod
    def from_block(block: Block, width: int, role: str = "", opcodes=()) -> FeedForward:
        w1_rows, w1_cols, w1_data = [], [], []
        w2_rows, w2_cols, w2_data = [], [], []
        b1 = np.zeros(len(block.neurons))
        for unit_index, unit in enumerate(block.neurons):
            for dim, weight in unit.inputs.items():
                w1_rows.append(unit_index)
                w1_cols.append(dim)
                w1_data.append(weight)
            b1[unit_index] = unit.bias
            for dim, weight in unit.outputs.items():
                w2_rows.append(dim)
                w2_cols.append(unit_index)
                w2_data.append(weight)
        hidden = len(block.neurons)
        w1 = sp.csr_matrix((w1_data, (w1_rows, w1_cols)), shape=(hidden, width))
        w2 = sp.csr_matrix((w2_data, (w2_rows, w2_cols)), shape=(width, hidden))
        w1.sum_duplicates()
        w2.sum_duplicates()
        b2 = np.zeros(width)
        for dim, value in block.bias_out.items():
            b2[dim] += value
        return FeedForward(block.name, role, w1, b1, w2, b2, list(opcodes))

    @property
    def hidden(self) -> int:
        return self.w1.shape[0]


@dataclass
class Layer:
    heads: list[Head]
    shared: FeedForward | None
    router_w: sp.csr_matrix | None
    router_b: np.ndarray | None
    experts: list[FeedForward]


@dataclass
class Model:
    """The model part of a weight file: everything but the program."""

    width: int
    embed: list[np.ndarray]  # per field, (V_f, D)
    unembed: list[np.ndarray]  # per field, (V_f, D)
    unembed_bias: list[np.ndarray]
    layers: list[Layer]
    metadata: dict
    dims: dict[str, list[int]] = field(default_factory=dict)  # residual vectors by name
    domain: list[tuple[float, float]] = field(default_factory=list)  # declared intervals
    token_width: int = 0  # dims below this are written by the embedding only
