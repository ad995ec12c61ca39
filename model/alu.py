"""Exact ALU circuits for the 32-bit opcodes, keyed by mnemonic.

A `Circuit` is a builder for `depth` consecutive feed-forward blocks. Its operands are bit
vectors in the residual: `inputs["a"]` is the first-pushed operand and `inputs["b"]` the
top, and unary opcodes read only "b". It writes the 32 result bits, each exactly 0 or 1,
into `out`. It allocates its scratch dims in the `Layout` under `prefix`, each with its
true value interval. Scratch written by block k is read by block k + 1 or later.

    from tlc.model.alu import CIRCUITS
    circuit = CIRCUITS["MUL"]
    blocks = [Block(f"mul.{k}") for k in range(circuit.depth)]
    circuit.build(blocks, layout, {"a": a_bits, "b": b_bits}, out_bits, "mul.")

The one-layer circuits live in `alu_logic`, MUL in `alu_mul`, division and remainder in
`alu_div`; `alu_bits` has the adders that bookkeeping circuits reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tlc.model import alu_logic as logic
from tlc.model import alu_div, alu_mul
from tlc.model.alu_div import division_traps  # noqa: F401 (re-exported)
from tlc.model.alu_bits import (  # noqa: F401 (re-exported for the model builder)
    EXACT_LIMIT,
    Affine,
    add_bits,
    bounds,
    power_above,
    add_signed_small,
    decrement_bits,
    increment_bits,
    subtract_bits,
)
from tlc.model.circuit import Block, Layout, Vec

BuildFunction = Callable[[list[Block], Layout, Mapping[str, Vec], Vec, str], None]


@dataclass(frozen=True)
class Circuit:
    """The builder of one opcode's result: `depth` blocks, one per consecutive layer."""

    name: str
    depth: int
    build: BuildFunction


def _check_blocks(name: str, depth: int, blocks: list[Block]) -> None:
    if len(blocks) != depth:
        raise ValueError(f"circuit {name} needs {depth} blocks, got {len(blocks)}")


def _one_layer(name: str, function: Callable[..., None], operands: str) -> Circuit:
    """Wrap a one-block builder `function(block, *operand vecs, out)`."""

    def build(blocks, layout, inputs, out, prefix) -> None:
        del layout, prefix  # one-layer circuits need no scratch dims
        _check_blocks(name, 1, blocks)
        function(blocks[0], *[inputs[key] for key in operands], out)

    return Circuit(name.lower(), 1, build)


def _bind(function: Callable[..., None], mnemonic: str) -> Callable[..., None]:
    def bound(block, *args) -> None:
        function(mnemonic, block, *args)

    return bound


def _one_layer_circuits() -> dict[str, Circuit]:
    circuits = {
        "ADD": _one_layer("ADD", logic.build_add, "ab"),
        "SUB": _one_layer("SUB", logic.build_sub, "ab"),
        "EQ": _one_layer("EQ", logic.build_equal, "ab"),
        "NE": _one_layer("NE", lambda blk, a, b, out: logic.build_equal(blk, a, b, out, True),
                         "ab"),  # fmt: skip
        "EQZ": _one_layer("EQZ", logic.build_eqz, "b"),
        "CLZ": _one_layer("CLZ", logic.build_clz, "b"),
        "CTZ": _one_layer("CTZ", logic.build_ctz, "b"),
        "POPCNT": _one_layer("POPCNT", logic.build_popcnt, "b"),
        "ABS": _one_layer("ABS", logic.build_abs, "b"),
        "NEG": _one_layer("NEG", logic.build_neg, "b"),
    }
    for mnemonic in logic.COMPARISONS:
        circuits[mnemonic] = _one_layer(mnemonic, _bind(logic.build_compare, mnemonic), "ab")
    for mnemonic in ("AND", "OR", "XOR"):
        circuits[mnemonic] = _one_layer(mnemonic, _bind(logic.build_bitwise, mnemonic), "ab")
    for mnemonic in ("SHL", "SHR_S", "SHR_U", "ROTL", "ROTR"):
        circuits[mnemonic] = _one_layer(mnemonic, _bind(logic.build_shift, mnemonic), "ab")
    return circuits


def _build_mul(blocks, layout, inputs, out, prefix) -> None:
    _check_blocks("MUL", 2, blocks)
    alu_mul.build_mul(blocks, layout, inputs["a"], inputs["b"], out, prefix)


def _division_circuit(mnemonic: str) -> Circuit:
    is_signed = mnemonic.endswith("_S")
    is_remainder = mnemonic.startswith("REM")
    depth = alu_div.REMAINDER_DEPTH if is_remainder else alu_div.QUOTIENT_DEPTH

    def build(blocks, layout, inputs, out, prefix) -> None:
        _check_blocks(mnemonic, depth, blocks)
        a, b = inputs["a"], inputs["b"]
        if is_remainder:
            alu_div.build_remainder(blocks, layout, a, b, out, prefix, is_signed)
        elif is_signed:
            alu_div.build_signed_quotient(blocks, layout, a, b, out, prefix)
        else:
            alu_div.build_unsigned_quotient(blocks, layout, a, b, out, prefix)

    return Circuit(mnemonic.lower(), depth, build)


CIRCUITS: dict[str, Circuit] = {
    **_one_layer_circuits(),
    "MUL": Circuit("mul", 2, _build_mul),
    **{m: _division_circuit(m) for m in ("DIV_S", "DIV_U", "REM_S", "REM_U")},
}


def gate_blocks(blocks: list[Block], layout: Layout, gate: int) -> None:
    """Make built blocks write nothing unless the bit dim `gate` is 1 (an opcode one-hot).

    Every neuron `ReLU(x)` becomes `ReLU(x - G (1 - gate))` with G the power of two above
    the interval maximum of x, and every output constant c becomes the neuron
    `ReLU(c gate)` (or its negation). With gate = 1 nothing changes; with gate = 0 every
    neuron is off, so the blocks add 0 and scratch dims stay 0, which later blocks of the
    same circuit read as inputs of neurons that are off too. Several circuits can then share
    one expert. Raises ValueError when a gated pre-activation could reach 2^53.
    """
    for block in blocks:
        for unit in block.neurons:
            high = bounds(Affine(unit.inputs, unit.bias), layout)[1]
            slope = power_above(max(high, 0.0))
            low = bounds(Affine(unit.inputs, unit.bias), layout)[0] - slope
            if max(abs(low), high) >= EXACT_LIMIT:
                raise ValueError(f"gating block {block.name} would reach {low:.3g}")
            unit.inputs[gate] = unit.inputs.get(gate, 0.0) + slope
            unit.bias -= slope
        constants, block.bias_out = block.bias_out, {}
        for dim, value in constants.items():
            sign = 1.0 if value > 0 else -1.0
            block.neuron({gate: abs(value)}, 0.0, {dim: sign})
