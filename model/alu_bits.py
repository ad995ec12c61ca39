"""One-layer adders on bit vectors, and the linear forms the ALU circuits are built from.

Every number here is a run of bit dimensions, least significant first, each exactly 0 or
1. Its unsigned value `A = sum 2^i a_i` is linear in the bits, so it costs nothing inside a
pre-activation. An adder computes all carries in one layer: with
`T_i = (A mod 2^i) + (B mod 2^i) + carry_in`, the carry into bit i is `c_i = [T_i >= 2^i]`,
one step of a linear form, and the sum bit is

    s_i = a_i + b_i + c_i - 2 c_(i+1)

because `T_(i+1) = 2^i (a_i + b_i + c_i) + (T_i mod 2^i)`. The terms `a_i + b_i` reach the
output through one copy neuron `ReLU(a_i + b_i)`, exact because the sum is never negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tlc.model.circuit import Block, Layout

# Largest magnitude a float64 pre-activation may reach while every integer stays exact.
EXACT_LIMIT = float(1 << 53)


@dataclass
class Affine:
    """A linear form `sum terms[dim] * x[dim] + const` over residual dimensions."""

    terms: dict[int, float] = field(default_factory=dict)
    const: float = 0.0

    def __add__(self, other: Affine | float) -> Affine:
        if not isinstance(other, Affine):
            return Affine(dict(self.terms), self.const + float(other))
        terms = dict(self.terms)
        for dim, weight in other.terms.items():
            terms[dim] = terms.get(dim, 0.0) + weight
        return Affine(terms, self.const + other.const)

    __radd__ = __add__

    def __mul__(self, scale: float) -> Affine:
        return Affine({d: w * scale for d, w in self.terms.items()}, self.const * scale)

    __rmul__ = __mul__

    def __neg__(self) -> Affine:
        return self * -1.0

    def __sub__(self, other: Affine | float) -> Affine:
        return self + (-other if isinstance(other, Affine) else -float(other))

    def __rsub__(self, other: float) -> Affine:
        return -self + other


def bounds(form: Affine, layout: Layout) -> tuple[float, float]:
    """Return the interval of `form` when every dim ranges over its Layout interval."""
    low = high = form.const
    for dim, weight in form.terms.items():
        dim_low, dim_high = layout.domain[dim]
        low += min(weight * dim_low, weight * dim_high)
        high += max(weight * dim_low, weight * dim_high)
    return low, high


def power_above(value: float) -> float:
    """Return the smallest power of two strictly above `value` (at least 1)."""
    power = 1.0
    while power <= value:
        power *= 2.0
    return power


def unsigned(bits: Sequence[int], scale: float = 1.0) -> Affine:
    """Return the integer `scale * sum 2^i x[bits[i]]` as a linear form."""
    return Affine({int(d): scale * float(1 << i) for i, d in enumerate(bits)})


def bit_sum(bits: Sequence[int]) -> Affine:
    """Return the number of set bits among `bits`, `sum x[d]`, as a linear form."""
    return Affine({int(d): 1.0 for d in bits})


def relu(block: Block, form: Affine, outputs: Mapping[int, float]) -> None:
    """Add `ReLU(form) * weight` to each output dim (one neuron)."""
    block.neuron(form.terms, form.const, outputs)


def step(block: Block, form: Affine, outputs: Mapping[int, float]) -> None:
    """Add `[form >= 0] * weight` to each output dim, for an integer-valued form.

    `[x >= 0] = ReLU(x + 1) - ReLU(x)`: two neurons.
    """
    block.step(form.terms, form.const, outputs)


def conjunction(block: Block, literals: Sequence[tuple[int, bool]], outputs) -> None:
    """Add the AND of bit literals (dim, positive) to outputs: one neuron."""
    block.conjunction(literals, outputs)


def _scaled(outputs: Mapping[int, float], scale: float) -> dict[int, float]:
    return {d: w * scale for d, w in outputs.items()}


def _accumulate(table: dict[int, float], dim: int, weight: float) -> None:
    table[dim] = table.get(dim, 0.0) + weight


def _carry_outputs(out: Sequence[int], i: int) -> dict[int, float]:
    """Return the output weights of the carry into bit i: +1 into s_i, -2 into s_(i-1)."""
    outputs: dict[int, float] = {}
    if i < len(out):
        _accumulate(outputs, out[i], 1.0)
    if 1 <= i <= len(out):
        _accumulate(outputs, out[i - 1], -2.0)
    return outputs


def _check_width(a: Sequence[int], out: Sequence[int]) -> None:
    if len(out) not in (len(a), len(a) + 1):
        raise ValueError(
            f"the output has {len(out)} bits; it needs {len(a)} (the sum mod 2^{len(a)}) "
            f"or {len(a) + 1} (the carry out too)"
        )


def add_bits(
    block: Block,
    a: Sequence[int],
    b: Sequence[int] | int,
    out: Sequence[int],
    carry_in: int = 0,
    carry_dim: int | None = None,
) -> None:
    """Add `a + b + carry` mod 2^len(out) into `out` in one layer.

    `b` is bit dims as wide as `a`, or a constant (taken mod 2^len(a), so -1 subtracts one
    with the carry out meaning "no borrow"). The carry is the constant `carry_in` (0 or 1)
    plus the bit dim `carry_dim` when given (at most 1 in total). `out` has len(a) bits, or
    len(a) + 1 to keep the carry out. Neurons: one copy per bit and a two-neuron step per
    carry. Bound: every pre-activation is `T_i - 2^i + (0 or 1)` with `0 <= T_i < 2^(i+1)`.
    """
    n = len(a)
    _check_width(a, out)
    constant = isinstance(b, int)
    if not constant and len(b) != n:
        raise ValueError(f"add_bits needs operands of equal width, got {n} and {len(b)}")
    b_value = b % (1 << n) if constant else 0
    low_sum = Affine(const=float(carry_in))
    if carry_dim is not None:
        low_sum = low_sum + Affine({carry_dim: 1.0})
    for i in range(n):
        pair = Affine({a[i]: 1.0})
        if constant:
            block.constant({out[i]: float((b_value >> i) & 1)})
        else:
            pair = pair + Affine({b[i]: 1.0})
        if i == 0:
            pair = pair + low_sum
        relu(block, pair, {out[i]: 1.0})
        low_sum = low_sum + Affine({a[i]: float(1 << i)})
        if constant:
            low_sum = low_sum + float(b_value & (1 << i))
        else:
            low_sum = low_sum + Affine({b[i]: float(1 << i)})
        step(block, low_sum - float(1 << (i + 1)), _carry_outputs(out, i + 1))


def increment_bits(block: Block, a: Sequence[int], out: Sequence[int]) -> None:
    """Add `a + 1` mod 2^len(out) into `out` (len(a) or len(a) + 1 bits) in one layer.

    The carry into bit i is AND(a_0 .. a_(i-1)), one neuron: 2 neurons per bit.
    """
    _check_width(a, out)
    block.constant({out[0]: 1.0})  # the carry into bit 0
    for i, dim in enumerate(a):
        relu(block, Affine({dim: 1.0}), {out[i]: 1.0})
        conjunction(block, [(d, True) for d in a[: i + 1]], _carry_outputs(out, i + 1))


def decrement_bits(block: Block, a: Sequence[int], out: Sequence[int]) -> None:
    """Add `a - 1` mod 2^len(out) into `out` (len(a) or len(a) + 1 bits) in one layer.

    With `z_i = [a_0 .. a_(i-1) all 0]` (one neuron each, z_0 = 1), `a - 1` has bits
    `a_i - z_i + 2 z_(i+1)`; the extra top bit, when asked for, is the "no borrow" bit
    `1 - z_n`, which is 1 unless a = 0.
    """
    _check_width(a, out)
    n = len(a)
    block.constant({out[0]: -1.0})  # -z_0
    for i, dim in enumerate(a):
        relu(block, Affine({dim: 1.0}), {out[i]: 1.0})
        outputs: dict[int, float] = {}
        if i + 1 < n:
            outputs[out[i + 1]] = -1.0
        outputs[out[i]] = 2.0
        if i + 1 == n and len(out) == n + 1:
            block.constant({out[n]: 1.0})
            outputs[out[n]] = -1.0
        conjunction(block, [(d, False) for d in a[: i + 1]], outputs)


def delta_range(delta: Mapping[int, float], offset: int = 0) -> tuple[int, int]:
    """Smallest and largest `offset + sum w_d x_d` when at most one x_d is 1."""
    weights = [int(w) for w in delta.values()]
    return offset + min([0, *weights]), offset + max([0, *weights])


def add_signed_small(
    block: Block,
    a: Sequence[int],
    delta: Mapping[int, float] | Sequence[tuple[int, float]],
    out: Sequence[int],
    offset: int = 0,
) -> None:
    """Add `a + delta` mod 2^len(a) into `out` in one layer, for a small signed delta.

    `delta = offset + sum over (dim, weight) of weight * x[dim]`, where the dims are bits of
    a one-hot (at most one of them is 1, for example opcode dims with weight = the stack
    change of that opcode) and every value delta can take lies in [-2, 2]. With
    `T_i = (A mod 2^i) + delta` in [-2, 2^(i+1)), the carry into bit i (negative: a borrow)
    is `c_i = floor(T_i / 2^i) = [T_i >= 2^i] + [T_i >= 0] - 1` for i >= 1, and `c_0 = delta`;
    the result bit is `a_i + c_i - 2 c_(i+1)`. Neurons: one copy and two steps per bit, and
    two for `c_0`. Bound: every pre-activation lies in [-2^(i+1), 2^(i+1)] for i <= len(a).
    """
    terms = dict(delta) if isinstance(delta, Mapping) else dict(delta)
    low, high = delta_range(terms, offset)
    if low < -2 or high > 2:
        raise ValueError(f"add_signed_small needs delta in [-2, 2], got [{low}, {high}]")
    if len(out) != len(a):
        raise ValueError(f"add_signed_small needs {len(a)} output bits, got {len(out)}")
    positive = {d: w for d, w in terms.items() if w > 0}
    negative = {d: -w for d, w in terms.items() if w < 0}
    relu(block, Affine(positive), {out[0]: 1.0})
    relu(block, Affine(negative), {out[0]: -1.0})
    block.constant({out[0]: float(offset)})
    low_sum = Affine(terms, float(offset))
    for i, dim in enumerate(a):
        relu(block, Affine({dim: 1.0}), {out[i]: 1.0})
        low_sum = low_sum + Affine({dim: float(1 << i)})
        outputs = _carry_outputs(out, i + 1)
        step(block, low_sum - float(1 << (i + 1)), outputs)
        step(block, low_sum, outputs)
        block.constant(_scaled(outputs, -1.0))


def subtract_bits(block: Block, a: Sequence[int], b: Sequence[int], out: Sequence[int]) -> None:
    """Add `a - b` mod 2^len(out) into `out` in one layer, as `a + NOT b + 1`.

    The carry into bit i is `[(A mod 2^i) - (B mod 2^i) >= 0]` and the result bit is
    `a_i + (1 - b_i) + c_i - 2 c_(i+1)` with `c_0 = 1`; the extra top bit, when `out` has
    len(a) + 1 bits, is the "no borrow" bit `[A >= B]`. Neurons: one copy
    `ReLU(a_i - b_i + 1)` and one two-neuron step per bit. Bound: |pre-activation| < 2^(n+1).
    """
    n = len(a)
    _check_width(a, out)
    if len(b) != n:
        raise ValueError(f"subtract_bits needs operands of equal width, got {n} and {len(b)}")
    block.constant({out[0]: 1.0})  # the carry into bit 0
    difference = Affine()
    for i in range(n):
        relu(block, Affine({a[i]: 1.0, b[i]: -1.0}, 1.0), {out[i]: 1.0})
        difference = difference + Affine({a[i]: float(1 << i), b[i]: -float(1 << i)})
        step(block, difference, _carry_outputs(out, i + 1))
