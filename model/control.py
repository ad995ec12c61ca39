"""The shared (always-on) feed-forward blocks: machine bookkeeping and the trap logic.

FFN 0 (after the layer-0 heads fetched the instruction):

* delta_ip = (ip + 1) - ip on the low 17 bits (`add_bits`). Jumps correct it in FFN 1.
* sp_minus_1 = sp - 1, the query of spill reload B in layer 1.
* trap conditions, each a 0/1 value:
  miss       = 1 - AND(fetch_hit, ip bits 20..31 are 0)    (the fetch found no CODE token)
  underflow  = [pops - sp - 1 >= 0]                        pops = sum pops(op) onehot(op)
  overflow   = [sp + pushes - pops - 1025 >= 0]
  call stack exhausted = [calls + onehot(CALL) - 1025 >= 0]     (calls <= 1024)
  return outside a call = AND(onehot(RETURN), every calls bit is 0)

FFN 1 turns the conditions into the next token's kind, in the order of docs/isa.md:
invalid jump target, then stack underflow, then the operation's own trap (at most one
per instruction), then stack overflow. HALT gives kind HALT. At most one next_kind bit
is set, and with none the unembedding's bias picks RUN, so a step that neither traps
nor halts writes nothing there.
"""

from __future__ import annotations

from tlc.compiler.isa import CALL_DEPTH_LIMIT, OPCODES, STACK_LIMIT, Opcode
from tlc.model import tokens as tk
from tlc.model.circuit import Block
from tlc.model.context import Context
from tlc.model.residual import RETURN_ADDRESS_BITS, TRAP_CONDITIONS
from tlc.model.wiring import Lin, add_bits, all_of, at_least_zero, bit, not_bit, number, total

# Trap condition bits and the trap (kind value) each one raises.
CONDITION_TRAPS = {
    "miss": "INVALID_JUMP_TARGET",
    "underflow": "STACK_UNDERFLOW",
    "overflow": "STACK_OVERFLOW",
    "divide_by_zero": "DIVIDE_BY_ZERO",
    "integer_overflow": "INTEGER_OVERFLOW",
    "out_of_bounds": "OUT_OF_BOUNDS",
    "call_stack_exhausted": "CALL_STACK_EXHAUSTED",
    "return_outside_call": "RETURN_OUTSIDE_CALL",
}
OPERATION_TRAPS = ("divide_by_zero", "integer_overflow", "out_of_bounds",
                   "call_stack_exhausted", "return_outside_call")  # fmt: skip
# ip bits that the fetch query does not compare: any of them set means a miss.
FETCH_KEY_BITS = tk.AUX_KEY_BITS
assert set(CONDITION_TRAPS) == set(TRAP_CONDITIONS)


def condition(ctx: Context, name: str) -> Lin:
    return bit(ctx.r[f"cond_{name}"][0])


def shared_ffn0(ctx: Context) -> Block:
    r = ctx.r
    block = Block("shared.0")
    add_bits(block, [ctx.bits("ip", 0, RETURN_ADDRESS_BITS)], 1, width=RETURN_ADDRESS_BITS,
             delta_dims=list(r["delta_ip"][:RETURN_ADDRESS_BITS]))  # fmt: skip
    add_bits(block, [ctx.bits("sp")], -1, width=tk.SP_BITS, value_dims=list(r["sp_minus_1"]))

    miss = r["cond_miss"][0]
    high_ip = [not_bit(b) for b in ctx.bits("ip", FETCH_KEY_BITS)]
    all_of(block, [bit(r["fetch_hit"][0]), *high_ip], {miss: -1.0})
    block.constant({miss: 1.0})

    pops = total(ctx.opcode(op) * float(OPCODES[op].pops) for op in Opcode)
    pushes = total(ctx.opcode(op) * float(OPCODES[op].pushes) for op in Opcode)
    sp = number(r["sp"])
    at_least_zero(block, pops - sp - 1.0, r["cond_underflow"][0])
    at_least_zero(block, sp + pushes - pops - float(STACK_LIMIT + 1), r["cond_overflow"][0])

    calls = number(r["calls"])
    at_least_zero(block, calls + ctx.opcode(Opcode.CALL) - float(CALL_DEPTH_LIMIT + 1),
                  r["cond_call_stack_exhausted"][0])  # fmt: skip
    no_calls = [not_bit(b) for b in ctx.bits("calls")]
    all_of(block, [ctx.opcode(Opcode.RETURN), *no_calls], r["cond_return_outside_call"][0])
    return block


def shared_ffn1(ctx: Context) -> Block:
    r = ctx.r
    block = Block("shared.1")

    def emit(literals, kind: str) -> None:
        all_of(block, literals, {r.next_kind(kind): 1.0})

    miss = condition(ctx, "miss")
    underflow = condition(ctx, "underflow")
    emit([miss], "INVALID_JUMP_TARGET")
    emit([underflow, not_bit(miss)], "STACK_UNDERFLOW")
    for name in OPERATION_TRAPS:
        emit([condition(ctx, name), not_bit(underflow), not_bit(miss)], CONDITION_TRAPS[name])
    no_operation_trap = 1.0 - total(condition(ctx, name) for name in OPERATION_TRAPS)
    emit([condition(ctx, "overflow"), not_bit(underflow), not_bit(miss), no_operation_trap],
         "STACK_OVERFLOW")  # fmt: skip
    emit([ctx.opcode(Opcode.HALT), not_bit(miss)], "HALT")
    return block
