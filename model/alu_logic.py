"""One-layer ALU circuits: add, subtract, compare, bitwise, shift, rotate, count, ABS, NEG.

Operands are 32 bit dims each, least significant first: `a` is the first-pushed operand and
`b` the top of the stack, so SUB computes a - b and SHL shifts a left by b. Unary circuits
read only `b`. `A` and `B` are the unsigned values `sum 2^i a_i`, linear in the bits; the
signed value is `A - 2^32 a_31`. Every builder adds its neurons to one Block and writes the
32 result bits (exactly 0 or 1) into `out`, which holds 0 before the block runs. No
pre-activation here exceeds 2^34 in magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlc.model.alu_bits import (
    Affine,
    add_bits,
    bit_sum,
    conjunction,
    relu,
    step,
    subtract_bits,
    unsigned,
)
from tlc.model.circuit import Block

WORD_BITS = 32
COUNT_BITS = 5  # a shift or rotate count is b mod 32, the low 5 bits of b


def signed(bits: Sequence[int]) -> Affine:
    """Return the two's-complement value `A - 2^32 a_31` as a linear form."""
    return unsigned(bits) - Affine({bits[-1]: float(1 << len(bits))})


def build_add(block: Block, a: Sequence[int], b: Sequence[int], out: Sequence[int]) -> None:
    """ADD: a + b mod 2^32 (96 neurons)."""
    add_bits(block, a, b, out)


def build_sub(block: Block, a: Sequence[int], b: Sequence[int], out: Sequence[int]) -> None:
    """SUB: a - b mod 2^32 as a + NOT b + 1 (96 neurons)."""
    subtract_bits(block, a, b, out)


# For each comparison: (signed?, the form e(A, B) with "e >= 0" meaning true). Integers,
# so "A < B" is "B - A - 1 >= 0". |e| < 2^33 for both the signed and unsigned values.
COMPARISONS = {
    "LT_S": (True, lambda x, y: y - x - 1.0),
    "LT_U": (False, lambda x, y: y - x - 1.0),
    "GT_S": (True, lambda x, y: x - y - 1.0),
    "GT_U": (False, lambda x, y: x - y - 1.0),
    "LE_S": (True, lambda x, y: y - x),
    "LE_U": (False, lambda x, y: y - x),
    "GE_S": (True, lambda x, y: x - y),
    "GE_U": (False, lambda x, y: x - y),
}


def build_compare(mnemonic: str, block: Block, a, b, out) -> None:
    """LT/GT/LE/GE, signed or unsigned: one step of `e(A, B)` into out_0 (2 neurons)."""
    is_signed, form = COMPARISONS[mnemonic]
    value = signed if is_signed else unsigned
    step(block, form(value(a), value(b)), {out[0]: 1.0})


def build_equal(block: Block, a, b, out, negate: bool = False) -> None:
    """EQ (or NE with `negate`): [A - B == 0] = ReLU(x + 1) - 2 ReLU(x) + ReLU(x - 1).

    Three neurons; NE adds the constant 1 and subtracts the same neurons.
    """
    x = unsigned(a) - unsigned(b)
    sign = -1.0 if negate else 1.0
    if negate:
        block.constant({out[0]: 1.0})
    relu(block, x + 1.0, {out[0]: sign})
    relu(block, x, {out[0]: -2.0 * sign})
    relu(block, x - 1.0, {out[0]: sign})


def build_eqz(block: Block, b, out) -> None:
    """EQZ of the top operand b: ReLU(1 - B), which is 1 for B = 0 and 0 for B >= 1."""
    relu(block, 1.0 - unsigned(b), {out[0]: 1.0})


def build_bitwise(mnemonic: str, block: Block, a, b, out) -> None:
    """AND = ReLU(a + b - 1); OR = 1 - ReLU(1 - a - b); XOR = ReLU(a - b) + ReLU(b - a).

    32 neurons for AND and OR, 64 for XOR.
    """
    for a_i, b_i, out_i in zip(a, b, out):
        if mnemonic == "AND":
            relu(block, Affine({a_i: 1.0, b_i: 1.0}, -1.0), {out_i: 1.0})
        elif mnemonic == "OR":
            block.constant({out_i: 1.0})
            relu(block, Affine({a_i: -1.0, b_i: -1.0}, 1.0), {out_i: -1.0})
        else:
            relu(block, Affine({a_i: 1.0, b_i: -1.0}), {out_i: 1.0})
            relu(block, Affine({a_i: -1.0, b_i: 1.0}), {out_i: 1.0})


def count_literals(b: Sequence[int], count: int) -> list[tuple[int, bool]]:
    """Return the literals whose conjunction is [b mod 32 == count]."""
    return [(b[j], bool((count >> j) & 1)) for j in range(COUNT_BITS)]


def shift_source(mnemonic: str, i: int, k: int) -> int | None:
    """Return the bit of `a` that lands in result bit i for a count k, or None for a fill.

    SHR_S fills with a_31, handled separately, so it returns None there too.
    """
    if mnemonic == "SHL":
        return i - k if i >= k else None
    if mnemonic in ("SHR_U", "SHR_S"):
        return i + k if i + k < WORD_BITS else None
    if mnemonic == "ROTL":
        return (i - k) % WORD_BITS
    return (i + k) % WORD_BITS  # ROTR


def build_shift(mnemonic: str, block: Block, a, b, out) -> None:
    """SHL, SHR_U, SHR_S, ROTL, ROTR by k = b mod 32, in one layer.

    Result bit i is the sum over k of AND(b mod 32 == k, source bit), a conjunction of
    6 literals (one neuron): 528 neurons for the shifts, 1024 for the rotates. SHR_S adds
    the sign fill `a_31 AND [k >= 32 - i]` for i >= 1, one step of
    `K - (32 - i) - 32 (1 - a_31)` with `K = sum 2^j b_j` (j < 5): 62 neurons more.
    """
    for i, out_i in enumerate(out):
        for k in range(WORD_BITS):
            source = shift_source(mnemonic, i, k)
            if source is not None:
                conjunction(block, [*count_literals(b, k), (a[source], True)], {out_i: 1.0})
        if mnemonic == "SHR_S" and i >= 1:
            count = unsigned(b[:COUNT_BITS])
            fill = count - float(WORD_BITS - i) - WORD_BITS * (1.0 - Affine({a[-1]: 1.0}))
            step(block, fill, {out_i: 1.0})


def count_weights(out: Sequence[int], threshold: int) -> dict[int, float]:
    """Output weights of the flag [n >= threshold] in the bits of a count n.

    A count whose flags [n >= t] are all known has bit m equal to the telescoping sum
    over t of [n >= t] * (bit m of t - bit m of t - 1), a linear function of the flags.
    """
    weights = {}
    for m, dim in enumerate(out):
        change = ((threshold >> m) & 1) - (((threshold - 1) >> m) & 1)
        if change:
            weights[dim] = float(change)
    return weights


def build_clz(block: Block, b, out) -> None:
    """CLZ of b: [clz >= t] = AND(NOT b_(32-t) .. NOT b_31), one neuron per t = 1..32."""
    for t in range(1, WORD_BITS + 1):
        literals = [(d, False) for d in b[WORD_BITS - t :]]
        conjunction(block, literals, count_weights(out, t))


def build_ctz(block: Block, b, out) -> None:
    """CTZ of b: [ctz >= t] = AND(NOT b_0 .. NOT b_(t-1)), one neuron per t = 1..32."""
    for t in range(1, WORD_BITS + 1):
        conjunction(block, [(d, False) for d in b[:t]], count_weights(out, t))


def build_popcnt(block: Block, b, out) -> None:
    """POPCNT of b from the ramps r_t = ReLU(P - t), P = sum b_i, t = 0 .. 31.

    [P >= t] = r_(t-1) - r_t for t = 1..32 (r_32 = 0 because P <= 32), so the ramp r_u
    carries weight w(u + 1) - w(u) with w(t) the count weights of [P >= t]: 32 neurons.
    """
    total = bit_sum(b)
    for u in range(WORD_BITS):
        weights: dict[int, float] = dict(count_weights(out, u + 1))
        if u >= 1:
            for dim, w in count_weights(out, u).items():
                weights[dim] = weights.get(dim, 0.0) - w
        relu(block, total - float(u), weights)


def build_neg(block: Block, b, out) -> None:
    """NEG of b: 0 - b = NOT b + 1 (64 neurons).

    The carry into bit i is `c_i = AND(NOT b_0 .. NOT b_(i-1))` (c_0 = 1) and the result
    bit is `(1 - b_i) + c_i - 2 c_(i+1)`. NEG(INT_MIN) = INT_MIN.
    """
    block.constant({out[0]: 1.0})
    for i, out_i in enumerate(out):
        relu(block, Affine({b[i]: -1.0}, 1.0), {out_i: 1.0})
        carry_out = {out_i: -2.0}
        if i + 1 < len(out):
            carry_out[out[i + 1]] = 1.0
        conjunction(block, [(d, False) for d in b[: i + 1]], carry_out)


def build_abs(block: Block, b, out) -> None:
    """ABS of b: (b XOR s) + s with s = b_31, so ABS(INT_MIN) = INT_MIN (94 neurons).

    e_i = b_i XOR s = ReLU(b_i - s) + ReLU(s - b_i); the carry into bit i is
    `c_i = AND(s, NOT b_0 .. NOT b_(i-1))` (c_0 = s); bit i is `e_i + c_i - 2 c_(i+1)` for
    i < 31 and bit 31 is c_31 because e_31 = 0 and no carry leaves bit 31.
    """
    sign = b[-1]
    relu(block, Affine({sign: 1.0}), {out[0]: 1.0})
    last = len(out) - 1
    for i in range(last):
        relu(block, Affine({b[i]: 1.0, sign: -1.0}), {out[i]: 1.0})
        relu(block, Affine({b[i]: -1.0, sign: 1.0}), {out[i]: 1.0})
        carry_out = {out[i + 1]: 1.0, out[i]: -2.0}
        conjunction(block, [(sign, True), *[(d, False) for d in b[: i + 1]]], carry_out)
