"""WebAssembly i32 semantics in plain Python, and a harness that runs ALU circuits.

The oracle works on Python integers with the WebAssembly rules (two's complement, shift
counts mod 32, division rounding toward zero, remainder with the dividend's sign), written
without looking at how the circuits compute, so the tests compare two independent
derivations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tlc.model.circuit import Block, Layout, Vec, evaluate_blocks

MASK = 0xFFFFFFFF
INT_MIN = 0x80000000
EXACT_LIMIT = 2.0**53

EDGE_VALUES = (0, 1, 2, 3, 31, 32, 33, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFE, 0xFFFFFFFF)  # fmt: skip


def to_signed(value: int) -> int:
    return value - (1 << 32) if value & INT_MIN else value


def _truncated_quotient(x: int, y: int) -> int:
    quotient = abs(x) // abs(y)
    return -quotient if (x < 0) != (y < 0) else quotient


def _rotate_left(a: int, k: int) -> int:
    k %= 32
    return ((a << k) | (a >> (32 - k))) & MASK if k else a


def _count_leading_zeros(a: int) -> int:
    return 32 - a.bit_length()


def _count_trailing_zeros(a: int) -> int:
    if a == 0:
        return 32
    count = 0
    while not (a >> count) & 1:
        count += 1
    return count


BINARY = {
    "ADD": lambda a, b: a + b,
    "SUB": lambda a, b: a - b,
    "MUL": lambda a, b: a * b,
    "DIV_U": lambda a, b: a // b,
    "REM_U": lambda a, b: a % b,
    "DIV_S": lambda a, b: _truncated_quotient(to_signed(a), to_signed(b)),
    "REM_S": lambda a, b: to_signed(a)
    - to_signed(b) * _truncated_quotient(to_signed(a), to_signed(b)),
    "EQ": lambda a, b: int(a == b),
    "NE": lambda a, b: int(a != b),
    "LT_S": lambda a, b: int(to_signed(a) < to_signed(b)),
    "LT_U": lambda a, b: int(a < b),
    "GT_S": lambda a, b: int(to_signed(a) > to_signed(b)),
    "GT_U": lambda a, b: int(a > b),
    "LE_S": lambda a, b: int(to_signed(a) <= to_signed(b)),
    "LE_U": lambda a, b: int(a <= b),
    "GE_S": lambda a, b: int(to_signed(a) >= to_signed(b)),
    "GE_U": lambda a, b: int(a >= b),
    "AND": lambda a, b: a & b,
    "OR": lambda a, b: a | b,
    "XOR": lambda a, b: a ^ b,
    "SHL": lambda a, b: a << (b % 32),
    "SHR_U": lambda a, b: a >> (b % 32),
    "SHR_S": lambda a, b: to_signed(a) >> (b % 32),
    "ROTL": lambda a, b: _rotate_left(a, b % 32),
    "ROTR": lambda a, b: _rotate_left(a, (32 - b % 32) % 32),
}
UNARY = {
    "EQZ": lambda b: int(b == 0),
    "CLZ": _count_leading_zeros,
    "CTZ": _count_trailing_zeros,
    "POPCNT": lambda b: bin(b).count("1"),
    "ABS": lambda b: abs(to_signed(b)),
    "NEG": lambda b: -b,
}
DIVISIONS = ("DIV_S", "DIV_U", "REM_S", "REM_U")


def expected(mnemonic: str, a: int, b: int) -> int | None:
    """The 32-bit result pattern, or None where the machine traps (the bits are free)."""
    if mnemonic in UNARY:
        return UNARY[mnemonic](b) & MASK
    if mnemonic in DIVISIONS and b == 0:
        return None
    if mnemonic == "DIV_S" and a == INT_MIN and b == MASK:
        return None
    return BINARY[mnemonic](a, b) & MASK


def bit_matrix(values: Sequence[int], width: int = 32) -> np.ndarray:
    """Rows of bits, least significant first."""
    column = np.array(values, dtype=np.uint64).reshape(-1, 1)
    return ((column >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.float64)


def integers(bits: np.ndarray) -> list[int]:
    """The unsigned values of rows of 0/1 floats, least significant first."""
    return [sum(int(v) << i for i, v in enumerate(row)) for row in bits]


@dataclass
class Harness:
    """A layout with operand vectors a, b, c and result `out`, and the blocks built in it."""

    layout: Layout
    inputs: dict[str, Vec]
    out: Vec
    blocks: list[Block]

    @classmethod
    def empty(cls, depth: int, out_width: int = 32) -> Harness:
        layout = Layout()
        inputs = {name: layout.add(name, 32) for name in ("a", "b", "c")}
        out = layout.add("out", out_width)
        blocks = [Block(f"alu.{k}") for k in range(depth)]
        return cls(layout, inputs, out, blocks)

    def run(self, a_values: Sequence[int], b_values: Sequence[int]) -> np.ndarray:
        """Evaluate the blocks on one residual row per operand pair."""
        x = np.zeros((len(a_values), self.layout.width))
        x[:, list(self.inputs["a"])] = bit_matrix(a_values)
        x[:, list(self.inputs["b"])] = bit_matrix(b_values)
        return evaluate_blocks(self.blocks, x)


def pre_activation_bounds(blocks: Sequence[Block], layout: Layout) -> list[float]:
    """For every block, the largest |pre-activation| or |neuron output| its neurons reach
    when every residual dim ranges over its Layout interval (interval arithmetic)."""
    reach = [max(abs(low), abs(high)) for low, high in layout.domain]
    worst = []
    for block in blocks:
        largest = 0.0
        for unit in block.neurons:
            bound = abs(unit.bias) + sum(abs(w) * reach[d] for d, w in unit.inputs.items())
            scale = max([1.0, *[abs(w) for w in unit.outputs.values()]])
            largest = max(largest, bound * scale)
        worst.append(largest)
    return worst
