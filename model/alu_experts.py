"""Experts for the arithmetic and logic opcodes, one family per opcode.

Each family applies the opcode's circuit from `tlc.model.alu.CIRCUITS` (one block per
layer, from layer 0 on) to a = T1 and b = T0, written into next_t0, and moves the window:

* binary ( a b -- f(a, b) ): next_t1 = T2, next_t2 = reload A (slot sp - 4), sp -= 1;
* unary ( a -- f(a) ): next_t1 = T1, next_t2 = T2.

Division and remainder use `tlc.model.division` (long division in steps the certificate
can bound) and raise their traps in FFN 0:

    divide_by_zero   = ReLU(1 - sum of b's bits)                      (b == 0)
    integer_overflow = AND(a_31, NOT a_0 .. NOT a_30, b_0 .. b_31)   (DIV_S only:
                       a = INT_MIN and b = -1)
"""

from __future__ import annotations

from tlc.compiler.isa import OPCODES, Opcode
from tlc.model.alu import CIRCUITS
from tlc.model.circuit import Block
from tlc.model.context import Context, Family
from tlc.model.division import build_division, depth
from tlc.model.wiring import all_of, none_of, not_bit

DIVISIONS = (Opcode.DIV_S, Opcode.DIV_U, Opcode.REM_S, Opcode.REM_U)
ALU_OPCODES = (
    "ADD SUB MUL DIV_S DIV_U REM_S REM_U EQZ EQ NE LT_S LT_U GT_S GT_U LE_S LE_U GE_S GE_U "
    "AND OR XOR SHL SHR_S SHR_U ROTL ROTR CLZ CTZ POPCNT ABS NEG"
).split()


def _division_traps(ctx: Context, opcode: Opcode, block: Block) -> None:
    r = ctx.r
    none_of(block, ctx.bits("t0"), r["cond_divide_by_zero"][0])
    if opcode is Opcode.DIV_S:
        a = ctx.bits("t1")
        literals = [a[31], *(not_bit(x) for x in a[:31]), *ctx.bits("t0")]
        all_of(block, literals, r["cond_integer_overflow"][0])


def alu_family(ctx: Context, opcode: Opcode) -> Family:
    """Build the family of one ALU opcode from its circuit."""
    r = ctx.r
    prefix = f"alu.{opcode.name.lower()}."
    if opcode in DIVISIONS:
        layers = depth(opcode)
        role = f"{opcode.mnemonic}: radix-256 long division, {layers} layers"
    else:
        circuit = CIRCUITS[opcode.name]
        layers = circuit.depth
        role = f"{opcode.mnemonic}: {circuit.name} circuit, {layers} layer(s)"
    family = Family(opcode.name.lower(), [opcode], role)
    blocks = [family.block(layer) for layer in range(layers)]
    if opcode in DIVISIONS:
        build_division(opcode, blocks, r.layout, r["t1"], r["t0"], r["next_t0"], prefix)
    else:
        circuit.build(blocks, r.layout, {"a": r["t1"], "b": r["t0"]}, r["next_t0"], prefix)
    first = blocks[0]
    if OPCODES[opcode].pops == 2:
        ctx.change_sp(first, -1)
        ctx.copy_window(first, None, ctx.bits("t2"), ctx.bits("reload_a"))
    else:
        ctx.copy_window(first, None, ctx.bits("t1"), ctx.bits("t2"))
    if opcode in DIVISIONS:
        _division_traps(ctx, opcode, first)
    return family


def alu_families(ctx: Context) -> list[Family]:
    """Families for every ALU opcode whose circuit exists."""
    # NOTE: an opcode without a circuit in tlc.model.alu gets no family, so it is missing
    # from covered_opcodes and the runners reject programs that use it.
    return [
        alu_family(ctx, Opcode[name])
        for name in ALU_OPCODES
        if name in CIRCUITS or Opcode[name] in DIVISIONS
    ]
