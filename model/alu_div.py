"""Division and remainder, unsigned and signed, as radix-256 restoring division.

The quotient comes out 8 bits per layer, from the top, in 4 stages with shifts s = 24, 16,
8, 0. Stage s reads the partial remainder R (an exact integer below 2^32, a linear form of
residual dims) and the divisor B, with R < 256 * 2^s * B. Its digit q = floor(R / (2^s B))
comes from the monotone flags

    g_t = [d_t >= 0],   d_t = R - t 2^s B_low - W H,    t = 1 .. 255

where B_low = B mod 2^(32-s), W is the power of two above the largest R (2^32, or 2^33
in the signed first stage) and H counts the set bits of B at or above bit 32 - s (later
stages read it as one guard flag). When H >= 1, 2^s B >= 2^32 > R, so q = 0, and the W H
term makes every d_t negative. When H = 0, B = B_low and the flags are exact comparisons.
Bit m of q is the telescoping sum over t of g_t (bit m of t - bit m of t - 1), linear in
the flags, so digit bits cost no extra neurons. The new remainder R - 2^s B q needs
`g_t * B`, a product: with B_low split into byte chunks C_c (B_low = sum 2^(o_c) C_c,
0 <= C_c <= M, M = 255 or 256),

    C_c * g_t = ReLU(C_c + M d_t) - M ReLU(d_t)

because for d_t >= 0 both ReLUs pass, and for d_t <= -1, C_c + M d_t <= 0. Each chunk
accumulates `U_c = -C_c q` in its own scratch dim, and the next stage reads
`R' = R + sum 2^(s + o_c) U_c`. Keeping U_c per chunk (output weights 1 and M, not
2^(s + o_c)) keeps sums exact. Interval bounds over the Layout domains: every
pre-activation is below 2^50 in magnitude, every neuron output times its weight below
2^42, and no dim receives more than about 2^10 such terms.

Signed forms divide magnitudes and fix the sign in the last stage. Remainders are
`a - q * b` mod 2^32 from the quotient bits, two more layers (see alu_mul); for the signed
forms this uses the truncated signed quotient, which gives the remainder with the sign of
the dividend, and INT_MIN % -1 = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tlc.model.alu_bits import (
    Affine,
    bit_sum,
    bounds,
    conjunction,
    power_above,
    relu,
    step,
    unsigned,
)
from tlc.model.alu_logic import build_abs, count_weights
from tlc.model.alu_mul import build_multiply_subtract
from tlc.model.circuit import Block, Layout, Vec

WORD_BITS = 32
MASK = (1 << WORD_BITS) - 1
DIGIT_BITS = 8
STAGE_SHIFTS = (24, 16, 8, 0)  # one stage per layer, 8 quotient bits each
CHUNK_BITS = 8  # divisor chunks for the remainder update; their maximum is the gate slope M
QUOTIENT_DEPTH = len(STAGE_SHIFTS)
# The magnitude of a signed quotient is at most 2^31, so the top digit is at most 128.
SIGNED_TOP_DIGIT = 1 << (WORD_BITS - 1 - STAGE_SHIFTS[0])


@dataclass
class Divisor:
    """One case of the divisor at one stage: B_low = sum 2^offset * chunk.

    `guard` is 0 when B < 2^(32 - s) and at least 1 otherwise; `gate` is 0 when this case
    applies (sign cases of signed division) and at least 1 otherwise.
    """

    chunks: list[tuple[int, Affine]]
    guard: Affine
    gate: Affine


def unsigned_divisor(bits: Sequence[int], shift: int, gate: Affine | None = None) -> Divisor:
    """Return the divisor with unsigned bits `bits` at stage shift `shift`."""
    width = WORD_BITS - shift
    chunks = [
        (offset, unsigned(bits[offset : min(offset + CHUNK_BITS, width)]))
        for offset in range(0, width, CHUNK_BITS)
    ]
    return Divisor(chunks, bit_sum(bits[width:]), gate or Affine())


def negative_top_divisor(bits: Sequence[int], gate: Affine) -> Divisor:
    """Return |B| = 2^32 - B for a negative B, in the form the first stage (s = 24) uses.

    If bits 8..31 are all 1, |B| = 2^8 - (B mod 2^8), in [1, 2^8]; otherwise |B| > 2^8
    and the guard, the number of 0 bits among 8..31, is at least 1.
    """
    width = WORD_BITS - STAGE_SHIFTS[0]
    chunk = float(1 << width) - unsigned(bits[:width])
    guard = float(WORD_BITS - width) - bit_sum(bits[width:])
    return Divisor([(0, chunk)], guard, gate)


@dataclass
class IntegerDivisor:
    """The divisor as scratch integers: its bytes, and guard flags [B >= 2^(32 - s)]."""

    bytes: list[int]
    guards: dict[int, int]  # stage shift -> dim of its guard flag

    def at(self, shift: int) -> Divisor:
        width = WORD_BITS - shift
        chunks = [
            (offset, Affine({self.bytes[offset // CHUNK_BITS]: 1.0}))
            for offset in range(0, width, CHUNK_BITS)
        ]
        guard = Affine({self.guards[shift]: 1.0}) if shift else Affine()
        return Divisor(chunks, guard, Affine())


def build_integer_divisor(
    block: Block, layout: Layout, bits: Sequence[int], shifts: Sequence[int], prefix: str
) -> IntegerDivisor:
    """Write the bytes of B (one neuron each) and, for each nonzero shift s, the guard
    [B >= 2^(32 - s)] = 1 - AND(NOT b_(32-s) .. NOT b_31) (one neuron) into scratch.

    Later stages read these few dims in place of 32 bits, which cuts their fan-in.
    """
    byte_values = float((1 << CHUNK_BITS) - 1)
    dims = []
    for offset in range(0, WORD_BITS, CHUNK_BITS):
        dim = layout.add(f"{prefix}divisor_byte{offset // CHUNK_BITS}", 1, 0.0, byte_values)[0]
        relu(block, unsigned(bits[offset : offset + CHUNK_BITS]), {dim: 1.0})
        dims.append(dim)
    guards = {}
    for shift in shifts:
        if shift:
            dim = layout.add(f"{prefix}divisor_guard{shift}", 1)[0]
            block.constant({dim: 1.0})
            conjunction(block, [(d, False) for d in bits[WORD_BITS - shift :]], {dim: -1.0})
            guards[shift] = dim
    return IntegerDivisor(dims, guards)


@dataclass
class Stage:
    """One layer of the division: its shift, digit count and where results go."""

    shift: int
    thresholds: int
    digit: Sequence[int]  # dims receiving the 8 digit bits
    update: bool  # whether to write the next remainder


def threshold_form(remainder: Affine, divisor: Divisor, shift: int, t: int, layout) -> Affine:
    """d_t = R - t 2^s B_low - W guard - W gate, with W a power of two above max R."""
    wide = power_above(bounds(remainder, layout)[1])
    form = remainder - wide * divisor.guard - wide * divisor.gate
    for offset, chunk in divisor.chunks:
        form = form - chunk * float(t << (shift + offset))
    return form


def build_stage(
    block: Block,
    layout: Layout,
    cases: Sequence[tuple[Affine, Divisor]],
    stage: Stage,
    prefix: str,
) -> Affine:
    """Add one stage's neurons for each (remainder, divisor) case; return the change of
    the remainder, `sum 2^(s + o_c) U_c` (zero without an update).

    Neurons per threshold and case: 2 for the flag and 1 per updated chunk.
    """
    chunk_count = len(cases[0][1].chunks)
    updates: list[Vec] = []
    slopes: list[float] = []
    if stage.update:
        for c in range(chunk_count):
            slope = max(bounds(divisor.chunks[c][1], layout)[1] for _, divisor in cases)
            low = -slope * stage.thresholds
            updates.append(layout.add(f"{prefix}update{stage.shift}_{c}", 1, low, 0.0))
            slopes.append(slope)
    for remainder, divisor in cases:
        for t in range(1, stage.thresholds + 1):
            d = threshold_form(remainder, divisor, stage.shift, t, layout)
            digit = count_weights(stage.digit, t)
            relu(block, d + 1.0, digit)
            falling = {dim: -w for dim, w in digit.items()}
            for (_, chunk), update, slope in zip(divisor.chunks, updates, slopes):
                relu(block, chunk + d * slope, {update[0]: -1.0})
                falling[update[0]] = slope
            relu(block, d, falling)
    change = Affine()
    for (offset, _), update in zip(cases[0][1].chunks, updates):
        change = change + Affine({update[0]: float(1 << (stage.shift + offset))})
    return change


def _stages(target: Sequence[int], top_thresholds: int, last_update: bool) -> list[Stage]:
    stages = []
    for index, shift in enumerate(STAGE_SHIFTS):
        count = top_thresholds if index == 0 else (1 << DIGIT_BITS) - 1
        update = index + 1 < len(STAGE_SHIFTS) or last_update
        stages.append(Stage(shift, count, target[shift : shift + DIGIT_BITS], update))
    return stages


def build_unsigned_quotient(blocks, layout, a, b, quotient: Sequence[int], prefix) -> None:
    """Write floor(A / B) into `quotient` in 4 blocks (all ones when B = 0).

    Block 1 runs the first stage on the bits of a and b and writes A, the bytes of B and
    the guards of stages 2 and 3 as scratch integers for the later stages.
    """
    stages = _stages(quotient, (1 << DIGIT_BITS) - 1, False)
    first = blocks[0]
    dividend = layout.add(f"{prefix}dividend", 1, 0.0, float(MASK))[0]
    relu(first, unsigned(a), {dividend: 1.0})
    divisor = build_integer_divisor(first, layout, b, STAGE_SHIFTS[1:], prefix)
    top = [(unsigned(a), unsigned_divisor(b, stages[0].shift))]
    remainder = Affine({dividend: 1.0}) + build_stage(first, layout, top, stages[0], prefix)
    for block, stage in zip(blocks[1:], stages[1:]):
        case = (remainder, divisor.at(stage.shift))
        remainder = remainder + build_stage(block, layout, [case], stage, prefix)


def _literal(dim: int, positive: bool) -> Affine:
    """Return the bit literal x[dim] or 1 - x[dim] as a linear form."""
    return Affine({dim: 1.0}) if positive else Affine({dim: -1.0}, 1.0)


def signed_top_cases(a: Sequence[int], b: Sequence[int]) -> list[tuple[Affine, Divisor]]:
    """Return the four sign cases of the first signed stage, read from the bits of a, b.

    |A| is A or 2^32 - A and |B| as in `negative_top_divisor`; the gate of a case counts
    the sign bits that contradict it, so exactly one case has gate 0.
    """
    cases = []
    for a_negative in (False, True):
        remainder = float(1 << WORD_BITS) - unsigned(a) if a_negative else unsigned(a)
        a_gate = _literal(a[-1], not a_negative)
        for b_negative in (False, True):
            gate = a_gate + _literal(b[-1], not b_negative)
            if b_negative:
                divisor = negative_top_divisor(b, gate)
            else:
                divisor = unsigned_divisor(b, STAGE_SHIFTS[0], gate)
            cases.append((remainder, divisor))
    return cases


def digit_change(t: int, out: Sequence[int], negate: bool) -> dict[int, float]:
    """Count weights of flag t for the digit q, or for (-q) mod 2^8 with `negate`."""
    if not negate:
        return count_weights(out, t)
    size = 1 << DIGIT_BITS
    weights = {}
    for m, dim in enumerate(out):
        change = (((-t) % size) >> m & 1) - (((1 - t) % size) >> m & 1)
        if change:
            weights[dim] = float(change)
    return weights


def build_signed_last_stage(
    block, layout, remainder, divisor: Divisor, high, sign, out, prefix
) -> None:
    """Add the last stage of signed division, which writes sign ? -Q : Q into `out`.

    Q = 2^8 H + q, with the bits of H (Q's bits 8..31) in `high` and q the last digit.
    Low bits: for sign = 1 the digit flags g_t also carry the weights of (-q) mod 2^8
    minus those of q, through the steps [d_t - W (1 - sign) >= 0] (2 more neurons per t).
    High bit k: -Q has bit `Q_k XOR n_k` with n_k = [Q mod 2^k != 0] = 1 - (1 - g_1) Z_k,
    Z_k = AND(NOT Q_8 .. NOT Q_(k-1)), so

        out_k = Q_k + sign (1 - 2 Q_k) - (1 - g_1) sign (1 - 2 Q_k) Z_k

    where each product of (1 - g_1) = [-d_1 - 1 >= 0] with literals is one gated step
    [-d_1 - 1 - W' (number of false literals) >= 0]: 7 neurons per high bit.
    """
    stage = Stage(0, (1 << DIGIT_BITS) - 1, out[:DIGIT_BITS], False)
    build_stage(block, layout, [(remainder, divisor)], stage, prefix)
    wide = power_above(bounds(remainder, layout)[1])
    not_sign = _literal(sign, False)
    for t in range(1, stage.thresholds + 1):
        d = threshold_form(remainder, divisor, 0, t, layout)
        weights = digit_change(t, stage.digit, True)
        for dim, w in count_weights(stage.digit, t).items():
            weights[dim] = weights.get(dim, 0.0) - w
        step(block, d - wide * not_sign, weights)
    below = -threshold_form(remainder, divisor, 0, 1, layout) - 1.0  # >= 0 iff q = 0
    slope = power_above(bounds(below, layout)[1])
    for k in range(DIGIT_BITS, WORD_BITS):
        q_k = high[k - DIGIT_BITS]
        lower = high[: k - DIGIT_BITS]
        relu(block, Affine({q_k: 1.0}), {out[k]: 1.0})
        for positive, weight in ((False, 1.0), (True, -1.0)):
            conjunction(block, [(sign, True), (q_k, positive)], {out[k]: weight})
            false_literals = not_sign + _literal(q_k, not positive) + bit_sum(lower)
            step(block, below - slope * false_literals, {out[k]: -weight})


def build_magnitude(block: Block, bits: Sequence[int], dim: int) -> None:
    """Write |A| as an integer: ReLU(A - 2^32 a_31) + ReLU(2^32 - A - 2^32 (1 - a_31))."""
    value = unsigned(bits)
    wide = float(1 << WORD_BITS)
    relu(block, value - Affine({bits[-1]: wide}), {dim: 1.0})
    relu(block, wide - value - wide * _literal(bits[-1], False), {dim: 1.0})


def build_signed_quotient(blocks, layout, a, b, quotient: Sequence[int], prefix) -> None:
    """Write the truncated signed quotient a / b into `quotient` in 4 blocks.

    Block 1 runs the first stage in four sign cases and writes |a| (an integer), the bits
    of |b| (ABS, so |INT_MIN| reads as 2^31) and the quotient's sign a_31 XOR b_31. Block 2
    reads the bits of |b| and writes its bytes and the guard of stage 3 for blocks 3 and 4.
    """
    magnitude_a = layout.add(f"{prefix}abs_a", 1, 0.0, float(1 << (WORD_BITS - 1)))[0]
    magnitude_b = layout.add(f"{prefix}abs_b", WORD_BITS)
    sign = layout.add(f"{prefix}sign", 1)[0]
    high = layout.add(f"{prefix}abs_q_high", WORD_BITS - DIGIT_BITS)
    first = blocks[0]
    build_magnitude(first, a, magnitude_a)
    build_abs(first, b, magnitude_b)
    relu(first, Affine({a[-1]: 1.0, b[-1]: -1.0}), {sign: 1.0})
    relu(first, Affine({a[-1]: -1.0, b[-1]: 1.0}), {sign: 1.0})

    target = [*quotient[:DIGIT_BITS], *high]
    stages = _stages(target, SIGNED_TOP_DIGIT, False)
    change = build_stage(first, layout, signed_top_cases(a, b), stages[0], prefix)
    remainder = Affine({magnitude_a: 1.0}) + change
    second = blocks[1]
    divisor = build_integer_divisor(second, layout, magnitude_b, STAGE_SHIFTS[2:], prefix)
    case = (remainder, unsigned_divisor(magnitude_b, stages[1].shift))
    remainder = remainder + build_stage(second, layout, [case], stages[1], prefix)
    case = (remainder, divisor.at(stages[2].shift))
    remainder = remainder + build_stage(blocks[2], layout, [case], stages[2], prefix)
    build_signed_last_stage(
        blocks[3], layout, remainder, divisor.at(0), high, sign, quotient, prefix
    )


REMAINDER_DEPTH = QUOTIENT_DEPTH + 2


def build_remainder(blocks, layout, a, b, out, prefix, is_signed: bool) -> None:
    """Write a - (a / b) * b mod 2^32 into `out` in 6 blocks: the quotient, then the
    multiply-subtract of alu_mul."""
    quotient = layout.add(f"{prefix}quotient", WORD_BITS)
    build_quotient = build_signed_quotient if is_signed else build_unsigned_quotient
    build_quotient(blocks[:QUOTIENT_DEPTH], layout, a, b, quotient, prefix)
    build_multiply_subtract(blocks[QUOTIENT_DEPTH:], layout, a, quotient, b, out, prefix)


def division_traps(
    blocks: list[Block], layout: Layout, inputs, zero_flag: Vec, overflow_flag: Vec, prefix=""
) -> None:
    """Write [b == 0] into zero_flag and [a == INT_MIN and b == -1] into overflow_flag.

    One block (blocks[0]), two neurons: ReLU(1 - B) and a 64-literal conjunction.
    """
    del layout, prefix  # no scratch dims
    a, b = inputs["a"], inputs["b"]
    block = blocks[0]
    relu(block, 1.0 - unsigned(b), {zero_flag[0]: 1.0})
    literals = [(d, False) for d in a[:-1]] + [(a[-1], True)] + [(d, True) for d in b]
    conjunction(block, literals, {overflow_flag[0]: 1.0})
