"""DIV_U, DIV_S, REM_U, REM_S as radix-256 long division that the certificate can bound.

The quotient comes out one 8-bit digit per stage, from the top, with shifts s = 24, 16,
8, 0, using the threshold forms of `tlc.model.alu_div`: with R the partial remainder
(R < 2^(s+8) B) and B_low = B mod 2^(32-s),

    d_t = R - t 2^s B_low - W H,     t = 1 .. 255,

where H counts the bits of B at or above bit 32 - s and W = 2^32 > R, so every d_t < 0
when 2^s B >= 2^32 (the digit is then 0), and otherwise [d_t >= 0] = [q >= t]. Bit m of
the digit q is the telescoping sum of the flags (`count_weights`).

Each stage takes two layers so that every product has a bit factor:

    layer 2k:     flags [d_t >= 0] -> digit bits q_0 .. q_7
    layer 2k + 1: U_c = q * C_c = sum_m 2^m ReLU(C_c - 255 (1 - q_m))

for the byte chunks C_c of B_low (0 <= C_c <= 255, so each ReLU is q_m C_c exactly), and
the next stage reads R' = R - sum_c 2^(s + 8c) U_c as a linear form. Every neuron's
interval is then narrow (a step's two neurons share one input row, and a gated chunk lies
in [0, 255]), where a one-layer stage with ReLU(C + M d_t) - M ReLU(d_t) defeats interval
arithmetic.

Signed forms divide the magnitudes (ABS, so |INT_MIN| = 2^31), then negate the quotient
when the signs differ. Remainders are a - q b mod 2^32 with `build_multiply_subtract`
from the (signed) quotient bits; with the truncated signed quotient this gives the sign of
the dividend, and INT_MIN % -1 = 0. Layers: DIV_U 7, REM_U 9, DIV_S 9, REM_S 11.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlc.compiler.isa import Opcode
from tlc.model.alu_bits import Affine, bounds, relu, step
from tlc.model.alu_div import threshold_form, unsigned_divisor
from tlc.model.alu_logic import build_abs, count_weights
from tlc.model.alu_mul import build_multiply_subtract
from tlc.model.circuit import Block, Layout
from tlc.model.wiring import all_of, bit, copy_bit, not_bit

WORD_BITS = 32
DIGIT_BITS = 8
DIGIT_MAX = (1 << DIGIT_BITS) - 1
STAGE_SHIFTS = (24, 16, 8, 0)
QUOTIENT_LAYERS = 2 * len(STAGE_SHIFTS) - 1  # the last stage needs no remainder update
REMAINDER_LAYERS = 2  # build_multiply_subtract
SIGNED_LAYERS = 2  # magnitudes before the stages, the quotient's sign after them


def depth(opcode: Opcode) -> int:
    """Return the number of layers the circuit of a division opcode takes."""
    signed = opcode in (Opcode.DIV_S, Opcode.REM_S)
    remainder = opcode in (Opcode.REM_S, Opcode.REM_U)
    return (QUOTIENT_LAYERS + (SIGNED_LAYERS if signed else 0)
            + (REMAINDER_LAYERS if remainder else 0))  # fmt: skip


def build_quotient(blocks: Sequence[Block], layout: Layout, a: Sequence[int],
                   b: Sequence[int], quotient: Sequence[int], prefix: str) -> None:  # fmt: skip
    """Write floor(A / B) for unsigned bits a, b into `quotient` over 7 blocks (garbage
    when B = 0, which traps)."""
    remainder = Affine({int(d): float(1 << i) for i, d in enumerate(a)})
    for index, shift in enumerate(STAGE_SHIFTS):
        digit = list(quotient[shift : shift + DIGIT_BITS])
        divisor = unsigned_divisor(b, shift)
        flags = blocks[2 * index]
        for t in range(1, DIGIT_MAX + 1):
            d = threshold_form(remainder, divisor, shift, t, layout)
            step(flags, d, count_weights(digit, t))
        if index + 1 == len(STAGE_SHIFTS):
            break
        update = blocks[2 * index + 1]
        for c, (offset, chunk) in enumerate(divisor.chunks):
            slope = bounds(chunk, layout)[1]
            product = layout.add(f"{prefix}product{shift}_{c}", 1, 0.0, slope * DIGIT_MAX)[0]
            for m, digit_bit in enumerate(digit):
                gate = Affine({digit_bit: slope}, -slope)  # -slope (1 - q_m)
                relu(update, chunk + gate, {product: float(1 << m)})
            remainder = remainder - Affine({product: float(1 << (shift + offset))})


def build_negate_if(block: Block, value: Sequence[int], sign: int, out: Sequence[int]) -> None:
    """Write sign ? -V : V (mod 2^32) into `out` for bits `value` and a sign bit.

    With c_i = AND(NOT v_0 .. NOT v_(i-1)) (the carry of NOT V + 1), bit i is
    v_i + s (1 - 2 v_i) + s c_i - 2 s c_(i+1): one neuron per product of s and literals.
    """
    s = bit(sign)
    for i, dim in enumerate(out):
        v = bit(value[i])
        copy_bit(block, v, dim)
        copy_bit(block, s, dim)
        all_of(block, [s, v], {dim: -2.0})
        all_of(block, [s, *(not_bit(value[j]) for j in range(i))], {dim: 1.0})
        all_of(block, [s, *(not_bit(value[j]) for j in range(i + 1))], {dim: -2.0})


def build_division(opcode: Opcode, blocks: Sequence[Block], layout: Layout,
                   a: Sequence[int], b: Sequence[int], out: Sequence[int],
                   prefix: str) -> None:  # fmt: skip
    """Write the result of a division opcode on bits a (dividend) and b into `out`."""
    if len(blocks) != depth(opcode):
        raise ValueError(f"{opcode.mnemonic} needs {depth(opcode)} blocks, got {len(blocks)}")
    signed = opcode in (Opcode.DIV_S, Opcode.REM_S)
    remainder = opcode in (Opcode.REM_S, Opcode.REM_U)
    rest = list(blocks)
    dividend, divisor = list(a), list(b)
    if signed:
        first = rest.pop(0)
        dividend = list(layout.add(f"{prefix}abs_a", WORD_BITS))
        divisor = list(layout.add(f"{prefix}abs_b", WORD_BITS))
        build_abs(first, a, dividend)
        build_abs(first, b, divisor)
        # The truncated quotient is negative when the signs differ: a_31 XOR b_31.
        sign = layout.add(f"{prefix}sign", 1)[0]
        relu(first, Affine({a[-1]: 1.0, b[-1]: -1.0}), {sign: 1.0})
        relu(first, Affine({a[-1]: -1.0, b[-1]: 1.0}), {sign: 1.0})
    needs_scratch = signed or remainder
    magnitude = list(layout.add(f"{prefix}quotient", WORD_BITS)) if needs_scratch else out
    build_quotient(rest[:QUOTIENT_LAYERS], layout, dividend, divisor, magnitude, prefix)
    rest = rest[QUOTIENT_LAYERS:]
    quotient = magnitude
    if signed:
        quotient = out if not remainder else list(layout.add(f"{prefix}signed_q", WORD_BITS))
        build_negate_if(rest.pop(0), magnitude, sign, quotient)
    if remainder:
        build_multiply_subtract(rest, layout, a, quotient, b, out, prefix)
