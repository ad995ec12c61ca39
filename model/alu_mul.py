"""Multiplication mod 2^32 in two layers, and the multiply-subtract that remainders use.

Layer 1 builds one integer per result bit k, the column sum of every partial product
that lands at or below bit k:

    P_k = sum over j <= k of y_j * ((X * 2^j) mod 2^(k+1))
        = sum over i + j <= k of 2^(i+j) x_i y_j,            0 <= P_k <= k 2^(k+1) + 1

Each term is one neuron `ReLU(L_kj - 2^(k+1) (1 - y_j))` with `L_kj = sum over i <= k - j
of 2^(i+j) x_i < 2^(k+1)`, exact because the ReLU passes L_kj when y_j = 1 and cuts it to
0 when y_j = 0: 528 neurons and 32 scratch dims. `P_k` agrees with X * Y modulo 2^(k+1),
so layer 2 reads bit k of the product as the parity of floor(V_k / 2^k), with
`V_k = P_k` for MUL and `V_k = (A mod 2^(k+1)) - P_k` for A - X * Y (remainders). That
parity is a sum of alternating steps `[V_k >= u 2^k]` over the values u that
floor(V_k / 2^k) can take, about 2k steps per bit. Every pre-activation is below
32 * 2^32 = 2^37 in magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tlc.model.alu_bits import Affine, bounds, relu, step, unsigned
from tlc.model.circuit import Block, Layout, Vec


def build_columns(
    block: Block, layout: Layout, x: Sequence[int], y: Sequence[int], prefix: str
) -> list[Vec]:
    """Write the column integers P_k of X * Y (k < len(x)) into new scratch dims.

    Column k's dim has the interval [0, k 2^(k+1) + 1].
    """
    columns = []
    for k in range(len(x)):
        column = layout.add(f"{prefix}column{k}", 1, 0.0, float(k * (2 << k) + 1))
        for j in range(k + 1):
            shifted = unsigned(x[: k + 1 - j], float(1 << j))
            gate = Affine({y[j]: float(2 << k)}, -float(2 << k))  # -2^(k+1) (1 - y_j)
            relu(block, shifted + gate, {column[0]: 1.0})
        columns.append(column)
    return columns


def parity_bit(block: Block, layout: Layout, form: Affine, k: int, out_dim: int) -> None:
    """Add bit k of the integer `form` (two's complement, any sign) to `out_dim`.

    With `f = floor(V / 2^k)` in [f_low, f_high] (from the Layout intervals), bit k is the
    parity of f, which is `parity(f_low) + sum over u in (f_low, f_high] of
    [V >= u 2^k] * (parity(u) - parity(u - 1))`: two neurons per value of u.
    """
    low, high = bounds(form, layout)
    f_low = math.floor(low / (1 << k))
    f_high = math.floor(high / (1 << k))
    if f_low % 2:
        block.constant({out_dim: 1.0})
    for u in range(f_low + 1, f_high + 1):
        weight = float(u % 2 - (u - 1) % 2)
        step(block, form - float(u * (1 << k)), {out_dim: weight})


def build_mul(blocks: list[Block], layout: Layout, a, b, out, prefix: str) -> None:
    """MUL: a * b mod 2^32 in two blocks (528 + 1986 neurons)."""
    columns = build_columns(blocks[0], layout, a, b, prefix)
    for k, (column, out_k) in enumerate(zip(columns, out)):
        parity_bit(blocks[1], layout, Affine({column[0]: 1.0}), k, out_k)


def build_multiply_subtract(
    blocks: list[Block], layout: Layout, a, x, y, out, prefix: str
) -> None:
    """Write a - x * y mod 2^32 into `out` in two blocks (528 + 2112 neurons).

    Bit k is the parity of floor(V_k / 2^k) with `V_k = (A mod 2^(k+1)) - P_k` in
    [-(k 2^(k+1) + 1), 2^(k+1) - 1], which is congruent to A - X * Y modulo 2^(k+1).
    """
    columns = build_columns(blocks[0], layout, x, y, prefix)
    for k, (column, out_k) in enumerate(zip(columns, out)):
        difference = unsigned(a[: k + 1]) - Affine({column[0]: 1.0})
        parity_bit(blocks[1], layout, difference, k, out_k)
