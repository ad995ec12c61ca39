"""Linear expressions over residual dimensions and the bit circuits built from them.

A `Lin` is `sum of weight * x[dim] + const`. A *bit expression* is a `Lin` whose value is
0 or 1 on every input the machine can produce, for example a bit dimension `x[d]`, its
negation `1 - x[d]`, or the sum of mutually exclusive bits such as two opcode one-hot
dimensions. The circuits below take bit expressions and add exact ReLU neurons to a
`Block`:

    all_of(l_1 .. l_k)     = ReLU(l_1 + .. + l_k - (k - 1))            one neuron
    [e >= 0]               = ReLU(e + 1) - ReLU(e)                     two neurons
    [e == 0]               = ReLU(e + 1) - 2 ReLU(e) + ReLU(e - 1)     three neurons

for an integer-valued e. `add_bits` adds numbers given by their bits in one layer: the
carry into bit i is floor(S_i / 2^i) with S_i the (linear) sum of the operands' low i
bits, computed as a sum of steps, so no carry waits for another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tlc.model.circuit import Block


@dataclass
class Lin:
    """A linear expression `sum terms[dim] * x[dim] + const`."""

    terms: dict[int, float] = field(default_factory=dict)
    const: float = 0.0

    @staticmethod
    def dim(dim: int, weight: float = 1.0) -> Lin:
        return Lin({int(dim): float(weight)})

    @staticmethod
    def constant(value: float) -> Lin:
        return Lin({}, float(value))

    def __add__(self, other: Lin | float) -> Lin:
        if not isinstance(other, Lin):
            return Lin(dict(self.terms), self.const + float(other))
        terms = dict(self.terms)
        for dim, weight in other.terms.items():
            terms[dim] = terms.get(dim, 0.0) + weight
        return Lin(terms, self.const + other.const)

    __radd__ = __add__

    def __mul__(self, scale: float) -> Lin:
        return Lin({d: w * scale for d, w in self.terms.items()}, self.const * scale)

    __rmul__ = __mul__

    def __neg__(self) -> Lin:
        return self * -1.0

    def __sub__(self, other: Lin | float) -> Lin:
        return self + (-other if isinstance(other, Lin) else -float(other))

    def __rsub__(self, other: float) -> Lin:
        return -self + other


def bit(dim: int) -> Lin:
    """Return the bit expression x[dim]."""
    return Lin.dim(dim)


def not_bit(expression: Lin | int) -> Lin:
    """Return the negation 1 - e of a bit expression (or of a bit dimension)."""
    if not isinstance(expression, Lin):
        expression = bit(expression)
    return 1.0 - expression


def total(expressions: Iterable[Lin]) -> Lin:
    result = Lin()
    for expression in expressions:
        result = result + expression
    return result


def number(dims: Sequence[int]) -> Lin:
    """Return the unsigned integer sum of 2^i x[dims[i]]."""
    return Lin({int(d): float(1 << i) for i, d in enumerate(dims)})


def bits_of_dims(dims: Sequence[int]) -> list[Lin]:
    return [bit(d) for d in dims]


def constant_bits(value: int, width: int) -> list[Lin]:
    return [Lin.constant((value >> i) & 1) for i in range(width)]


def _outputs(dims: Mapping[int, float] | Sequence[int] | int, scale: float = 1.0):
    if isinstance(dims, int):
        return {dims: scale}
    if isinstance(dims, Mapping):
        return {d: w * scale for d, w in dims.items()}
    return {d: scale for d in dims}


def relu(block: Block, expression: Lin, outputs) -> None:
    """Add ReLU(expression) * weight to each output dim."""
    block.neuron(expression.terms, expression.const, _outputs(outputs))


def copy_bit(block: Block, expression: Lin, outputs) -> None:
    """Add a bit expression (0 or 1, so ReLU passes it unchanged) to outputs."""
    relu(block, expression, outputs)


def all_of(block: Block, literals: Sequence[Lin], outputs) -> None:
    """Add AND of bit expressions to outputs: ReLU(sum - (k - 1)), one neuron."""
    relu(block, total(literals) - (len(literals) - 1), outputs)


def at_least_zero(block: Block, expression: Lin, outputs) -> None:
    """Add [e >= 0] for an integer-valued e (two neurons)."""
    out = _outputs(outputs)
    block.neuron(expression.terms, expression.const + 1.0, out)
    block.neuron(expression.terms, expression.const, {d: -w for d, w in out.items()})


def equals_zero(block: Block, expression: Lin, outputs) -> None:
    """Add [e == 0] for an integer-valued e (three neurons)."""
    out = _outputs(outputs)
    block.neuron(expression.terms, expression.const + 1.0, out)
    block.neuron(expression.terms, expression.const, {d: -2.0 * w for d, w in out.items()})
    block.neuron(expression.terms, expression.const - 1.0, out)


def none_of(block: Block, bits: Sequence[Lin], outputs) -> None:
    """Add [all bits are 0] = ReLU(1 - sum of bits), one neuron."""
    relu(block, 1.0 - total(bits), outputs)


def add_bits(
    block: Block,
    operands: Sequence[Sequence[Lin]],
    constant: int = 0,
    *,
    width: int,
    value_dims: Sequence[int] | None = None,
    delta_dims: Sequence[int] | None = None,
    first_bit: int = 0,
    extra_value_dims: Sequence[Sequence[int]] = (),
) -> None:
    """Add the bits of (sum of operands + constant) mod 2^width to residual dims.

    Each operand is a list of bit expressions, least significant first (missing high
    bits are 0). Result bit `first_bit + i` is added to `value_dims[i]`; with
    `delta_dims`, result bit minus operand 0's bit is added to `delta_dims[i]` (the
    change of a register that operand 0 holds). `extra_value_dims` receive the result
    bits too, from the same neurons. With S_i the sum of the operands' low i
    bits plus (constant mod 2^i), the carry into bit i is c_i = floor(S_i / 2^i) and

        result_i = (sum of operand bits i) + constant_i + c_i - 2 c_(i+1),

    which is exact because S_(i+1) = S_i mod 2^i + 2^i (bits i + constant_i + c_i).
    """
    count = len(value_dims if value_dims is not None else delta_dims or [])
    last = first_bit + count
    constant %= 1 << width
    value_lists = ([value_dims] if value_dims is not None else []) + list(extra_value_dims)
    all_lists = value_lists + ([delta_dims] if delta_dims is not None else [])

    def operand_bit(operand: Sequence[Lin], i: int) -> Lin | None:
        return operand[i] if i < len(operand) else None

    for i in range(max(first_bit, 1), min(last, width) + 1):
        low_sum = Lin.constant(constant % (1 << i))
        high = constant % (1 << i)
        for operand in operands:
            for j in range(min(i, len(operand))):
                low_sum = low_sum + operand[j] * float(1 << j)
            high += (1 << min(i, len(operand))) - 1
        outputs: dict[int, float] = {}
        for dims in all_lists:
            if first_bit <= i < last:
                outputs[dims[i - first_bit]] = outputs.get(dims[i - first_bit], 0.0) + 1.0
            if first_bit <= i - 1 < last:
                outputs[dims[i - 1 - first_bit]] = outputs.get(dims[i - 1 - first_bit], 0.0) - 2.0
        for multiple in range(1, high // (1 << i) + 1):
            at_least_zero(block, low_sum - float(multiple << i), outputs)

    for i in range(first_bit, last):
        constant_bit = (constant >> i) & 1 if i < width else 0
        for dims in all_lists:
            if constant_bit:
                block.constant({dims[i - first_bit]: 1.0})
        for index, operand in enumerate(operands):
            expression = operand_bit(operand, i)
            if expression is None:
                continue
            targets = [dims[i - first_bit] for dims in value_lists]
            if delta_dims is not None and index != 0:
                targets.append(delta_dims[i - first_bit])
            if targets:
                copy_bit(block, expression, targets)


def change_bits(block: Block, old: Sequence[Lin], new: Sequence[Lin], delta_dims, gate=None):
    """Add new_i - old_i to delta_dims[i] for bit expressions (optionally only when the
    bit expression `gate` is 1): ReLU(new - old + g - 1) - ReLU(old - new + g - 1)."""
    for old_bit, new_bit, dim in zip(old, new, delta_dims):
        shift = Lin() if gate is None else gate - 1.0
        relu(block, new_bit - old_bit + shift, {dim: 1.0})
        relu(block, old_bit - new_bit + shift, {dim: -1.0})
