"""Experts for the arithmetic and logic opcodes.

A binary operator ( a b -- f(a, b) ) reads a = T1 and b = T0, writes f into next_t0,
moves T2 to next_t1 and reload A (slot sp - 4) to next_t2, and sets sp -= 1. A unary
operator ( a -- f(a) ) reads a = T0 and keeps T1 and T2.

Circuits (A, B: the unsigned values of a, b as linear sums of their bits):

* ADD: `add_bits(a, b)`; SUB: a + NOT b + 1.
* comparisons: one step per opcode, gated by its one-hot bit g through a large negative
  term, [e - 2^34 (1 - g) >= 0], with e = B - A - 1 for "a < b" and so on; the signed
  forms use A + 2^31 - 2^32 a_31 (the sign bit flipped). EQ and NE use [A - B == 0].
* AND, OR, XOR of bits with the opcode bit as one more literal.
"""

from __future__ import annotations

from tlc.compiler.isa import Opcode
from tlc.model.context import Context, Family
from tlc.model.wiring import (
    Lin,
    add_bits,
    all_of,
    at_least_zero,
    equals_zero,
    none_of,
    number,
)

# Subtracted from a step's argument when its opcode is not the fetched one.
OPCODE_GATE = float(1 << 34)


def _binary_window(ctx: Context, block) -> None:
    ctx.change_sp(block, -1)
    ctx.copy_window(block, None, ctx.bits("t2"), ctx.bits("reload_a"))


def _signed(ctx: Context, name: str) -> Lin:
    dims = ctx.r[name]
    return number(dims) + float(1 << 31) - Lin.dim(dims[31], float(1 << 32))


def add_sub_families(ctx: Context) -> list[Family]:
    r = ctx.r
    add = Family("add", [Opcode.ADD], "ADD: a + b mod 2^32")
    add_bits(add.block(0), [ctx.bits("t1"), ctx.bits("t0")], 0, width=32,
             value_dims=list(r["next_t0"]))  # fmt: skip
    _binary_window(ctx, add.block(0))
    sub = Family("sub", [Opcode.SUB], "SUB: a + NOT b + 1 mod 2^32")
    inverted = [1.0 - b for b in ctx.bits("t0")]
    add_bits(sub.block(0), [ctx.bits("t1"), inverted], 1, width=32,
             value_dims=list(r["next_t0"]))  # fmt: skip
    _binary_window(ctx, sub.block(0))
    return [add, sub]


COMPARISONS = {
    # opcode: (signed, e) with "e >= 0" meaning true; e from (A, B) as a lambda.
    Opcode.LT_S: (True, lambda a, b: b - a - 1.0),
    Opcode.LT_U: (False, lambda a, b: b - a - 1.0),
    Opcode.GT_S: (True, lambda a, b: a - b - 1.0),
    Opcode.GT_U: (False, lambda a, b: a - b - 1.0),
    Opcode.LE_S: (True, lambda a, b: b - a),
    Opcode.LE_U: (False, lambda a, b: b - a),
    Opcode.GE_S: (True, lambda a, b: a - b),
    Opcode.GE_U: (False, lambda a, b: a - b),
}


def compare_family(ctx: Context) -> Family:
    r = ctx.r
    opcodes = [*COMPARISONS, Opcode.EQ, Opcode.NE]
    family = Family("compare", opcodes, "EQ NE LT GT LE GE: 1 or 0")
    block = family.block(0)
    result = r["next_t0"][0]
    for opcode, (signed, expression) in COMPARISONS.items():
        a = _signed(ctx, "t1") if signed else number(r["t1"])
        b = _signed(ctx, "t0") if signed else number(r["t0"])
        gate = (1.0 - ctx.opcode(opcode)) * OPCODE_GATE
        at_least_zero(block, expression(a, b) - gate, result)
    difference = number(r["t1"]) - number(r["t0"])
    equal_gate = (1.0 - ctx.opcode(Opcode.EQ)) * OPCODE_GATE
    equals_zero(block, difference + equal_gate, result)
    # NE = NE_onehot - [A - B == 0 and NE].
    from tlc.model.wiring import copy_bit

    copy_bit(block, ctx.opcode(Opcode.NE), result)
    not_equal_gate = (1.0 - ctx.opcode(Opcode.NE)) * OPCODE_GATE
    equals_zero(block, difference + not_equal_gate, {result: -1.0})
    _binary_window(ctx, block)
    return family


def bitwise_family(ctx: Context) -> Family:
    """AND = AND(g, a, b); OR = AND(g, a) + AND(g, b) - AND(g, a, b); XOR likewise - 2."""
    r = ctx.r
    family = Family("bitwise", [Opcode.AND, Opcode.OR, Opcode.XOR], "AND OR XOR bit by bit")
    block = family.block(0)
    g_and, g_or, g_xor = (ctx.opcode(op) for op in (Opcode.AND, Opcode.OR, Opcode.XOR))
    either = g_or + g_xor
    for a, b, out in zip(ctx.bits("t1"), ctx.bits("t0"), r["next_t0"]):
        all_of(block, [ctx.opcode(Opcode.AND, Opcode.OR, Opcode.XOR), a, b],
               {out: 1.0})  # fmt: skip
        all_of(block, [either, a], {out: 1.0})
        all_of(block, [either, b], {out: 1.0})
        all_of(block, [g_or, a, b], {out: -2.0})
        all_of(block, [g_xor, a, b], {out: -3.0})
    del g_and
    _binary_window(ctx, block)
    return family


def eqz_family(ctx: Context) -> Family:
    family = Family("eqz", [Opcode.EQZ], "EQZ: 1 when a == 0")
    block = family.block(0)
    none_of(block, ctx.bits("t0"), ctx.r["next_t0"][0])
    ctx.copy_window(block, None, ctx.bits("t1"), ctx.bits("t2"))
    return family


def alu_families(ctx: Context) -> list[Family]:
    # NOTE: MUL, DIV_S, DIV_U, REM_S, REM_U, SHL, SHR_S, SHR_U, ROTL, ROTR, CLZ, CTZ,
    # POPCNT, ABS, NEG and SELECT-free unary ops are not built yet; programs that use
    # them are rejected by the runners (see `covered_opcodes` in the metadata).
    return [*add_sub_families(ctx), compare_family(ctx), bitwise_family(ctx),
            eqz_family(ctx)]  # fmt: skip
