"""Experts for the stack, control-flow and local-variable opcodes.

Each family writes the whole change of state of its opcodes: the next stack window
(next_t0 .. next_t2), the register deltas it needs beyond the shared ip + 1, and its
writes. Stack growth by one spills the slot that leaves the window (old T2) keyed by the
new sp. A shrink by one brings back slot sp - 4 (reload A, key sp), and a shrink by two
also slot sp - 5 (reload B, key sp - 1). docs/model.md proves that these reads return
the slots' values.

Jumps: FFN 0 leaves delta_ip = (ip + 1) - ip; a taken jump to t adds, bit by bit,
t_i - (ip + 1)_i in FFN 1 (`change_bits`), so ip + delta_ip becomes t.
"""

from __future__ import annotations

from tlc.compiler.isa import Opcode
from tlc.model import tokens as tk
from tlc.model.context import Context, Family
from tlc.model.residual import RETURN_ADDRESS_BITS
from tlc.model.wiring import Lin, add_bits, all_of, bit, change_bits, copy_bit, relu, total


def push_family(ctx: Context) -> list[Family]:
    """PUSH, DUP, OVER: grow the stack by one with a new top."""
    families = []
    for opcode, top in ((Opcode.PUSH, "fetched_imm"), (Opcode.DUP, "t0"), (Opcode.OVER, "t1")):
        family = Family(opcode.name.lower(), [opcode], f"{opcode.mnemonic}: push {top}")
        block = family.block(0)
        ctx.spill(block)
        ctx.copy_window(block, ctx.bits(top), ctx.bits("t0"), ctx.bits("t1"))
        families.append(family)
    return families


def shuffle_families(ctx: Context) -> list[Family]:
    """POP, SWAP, ROT, NOP, HALT: move slots within the window."""
    families = []
    pop = Family("pop", [Opcode.POP], "POP: drop the top, reload slot sp - 4")
    ctx.change_sp(pop.block(0), -1)
    ctx.copy_window(pop.block(0), ctx.bits("t1"), ctx.bits("t2"), ctx.bits("reload_a"))
    families.append(pop)
    moves = {
        Opcode.SWAP: ("t1", "t0", "t2"),
        Opcode.ROT: ("t2", "t0", "t1"),
        Opcode.NOP: ("t0", "t1", "t2"),
        Opcode.HALT: ("t0", "t1", "t2"),
    }
    for opcode, sources in moves.items():
        family = Family(opcode.name.lower(), [opcode], f"{opcode.mnemonic}: window "
                        f"becomes {', '.join(sources)}")  # fmt: skip
        ctx.copy_window(family.block(0), *(ctx.bits(s) for s in sources))
        families.append(family)
    return families


def select_family(ctx: Context) -> Family:
    """SELECT ( a b c -- c != 0 ? a : b ): a = T2, b = T1, c = T0.

    FFN 0: flag = [T0 != 0] = 1 - ReLU(1 - sum of T0 bits). FFN 1: next_t0_i =
    AND(flag, T2_i) + AND(1 - flag, T1_i).
    """
    r = ctx.r
    family = Family("select", [Opcode.SELECT], "SELECT: c != 0 ? a : b, reload two slots")
    first = family.block(0)
    flag = r["flag"][0]
    relu(first, 1.0 - total(ctx.bits("t0")), {flag: -1.0})
    first.constant({flag: 1.0})
    ctx.change_sp(first, -2)
    ctx.copy_window(first, None, ctx.bits("reload_a"))
    second = family.block(1)
    for i, (a, b) in enumerate(zip(ctx.bits("t2"), ctx.bits("t1"))):
        all_of(second, [bit(flag), a], r["next_t0"][i])
        all_of(second, [1.0 - bit(flag), b], r["next_t0"][i])
    ctx.copy_window(second, None, None, ctx.bits("reload_b"))
    return family


def jump_family(ctx: Context) -> Family:
    """JZ t, JNZ t: pop the condition; taken = JZ AND c == 0, or JNZ AND c != 0.

    FFN 0: flag = ReLU(JZ - sum c_i) + JNZ - ReLU(JNZ - sum c_i). FFN 1: move ip + 1 to
    t when flag is 1.
    """
    r = ctx.r
    family = Family("jump", [Opcode.JZ, Opcode.JNZ], "JZ, JNZ: conditional jump to imm")
    first = family.block(0)
    flag = r["flag"][0]
    bits_sum = total(ctx.bits("t0"))
    jz, jnz = ctx.opcode(Opcode.JZ), ctx.opcode(Opcode.JNZ)
    relu(first, jz - bits_sum, {flag: 1.0})
    copy_bit(first, jnz, {flag: 1.0})
    relu(first, jnz - bits_sum, {flag: -1.0})
    ctx.change_sp(first, -1)
    ctx.copy_window(first, ctx.bits("t1"), ctx.bits("t2"), ctx.bits("reload_a"))
    change_bits(family.block(1), ctx.ip_plus_one(), ctx.bits("fetched_imm"),
                r["delta_ip"], gate=bit(flag))  # fmt: skip
    return family


def call_families(ctx: Context) -> list[Family]:
    """CALL t: calls += 1, write (key calls + 1, value ip + 1) on the call channel, ip = t.
    RETURN: ip = the return address read at key calls, calls -= 1."""
    r = ctx.r
    call = Family("call", [Opcode.CALL], "CALL: push ip + 1 on the call stack, jump to imm")
    first = call.block(0)
    first.constant({r.next_tag("call"): 1.0})
    add_bits(first, [ctx.bits("calls")], 1, width=tk.CALLS_BITS,
             delta_dims=list(r["delta_calls"]),
             extra_value_dims=[list(r["next_aux_key"][: tk.CALLS_BITS])])  # fmt: skip
    ctx.copy_window(first, ctx.bits("t0"), ctx.bits("t1"), ctx.bits("t2"))
    second = call.block(1)
    return_address = ctx.ip_plus_one()[:RETURN_ADDRESS_BITS]
    ctx.copy(second, return_address, "next_aux_val")
    change_bits(second, ctx.ip_plus_one(), ctx.bits("fetched_imm"), r["delta_ip"])

    ret = Family("return", [Opcode.RETURN], "RETURN: jump to the return address, calls -= 1")
    first = ret.block(0)
    add_bits(first, [ctx.bits("calls")], -1, width=tk.CALLS_BITS,
             delta_dims=list(r["delta_calls"]))  # fmt: skip
    ctx.copy_window(first, ctx.bits("t0"), ctx.bits("t1"), ctx.bits("t2"))
    target = ctx.bits("return_address") + [Lin()] * (tk.IP_BITS - RETURN_ADDRESS_BITS)
    change_bits(ret.block(1), ctx.ip_plus_one(), target, r["delta_ip"])
    return [call, ret]


def local_families(ctx: Context) -> list[Family]:
    """LOCAL.GET i (push the local read in layer 1), LOCAL.SET i, LOCAL.TEE i (write
    (key: i in bits 0..7, calls in bits 8..18; value T0) on the local channel)."""
    r = ctx.r
    get = Family("local_get", [Opcode.LOCAL_GET], "LOCAL.GET: push L[calls][imm]")
    ctx.spill(get.block(0))
    ctx.copy_window(get.block(0), None, ctx.bits("t0"), ctx.bits("t1"))
    ctx.copy_window(get.block(1), ctx.bits("local"))

    families = [get]
    for opcode, pops in ((Opcode.LOCAL_SET, True), (Opcode.LOCAL_TEE, False)):
        family = Family(opcode.name.lower(), [opcode], f"{opcode.mnemonic}: "
                        "L[calls][imm] = T0")  # fmt: skip
        block = family.block(0)
        block.constant({r.next_tag("local"): 1.0})
        ctx.copy(block, ctx.bits("fetched_imm", 0, tk.LOCAL_INDEX_BITS), "next_aux_key")
        ctx.copy(block, ctx.bits("calls"), "next_aux_key", start=tk.LOCAL_INDEX_BITS)
        ctx.copy(block, ctx.bits("t0"), "next_aux_val")
        if pops:
            ctx.change_sp(block, -1)
            ctx.copy_window(block, ctx.bits("t1"), ctx.bits("t2"), ctx.bits("reload_a"))
        else:
            ctx.copy_window(block, ctx.bits("t0"), ctx.bits("t1"), ctx.bits("t2"))
        families.append(family)
    return families


def control_families(ctx: Context) -> list[Family]:
    """Build every family of this module."""
    return [
        *push_family(ctx),
        *shuffle_families(ctx),
        select_family(ctx),
        jump_family(ctx),
        *call_families(ctx),
        *local_families(ctx),
    ]
