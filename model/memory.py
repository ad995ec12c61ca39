"""Experts for loads and stores, including the input and output ports.

Memory lives in four channels: the byte at address a is channel a mod 4, key a >> 2.
For an access of w bytes at e = p + o, channel c contains the byte of the one address in
[e, e + 4) congruent to c, whose word index is

    W_c = (e + 3 - c) >> 2        (= (e >> 2) + [c < e mod 4])

FFN 0 computes W_c with four adders (p + o + 3 - c, bits 2 .. 19), e mod 4, the bounds
check and the port test:

    in_bounds = [size - p - o - w >= 0]
    port      = [p + o - PORT + 2^34 (1 - onehot(port opcode)) == 0]
    cond_out_of_bounds = 1 - in_bounds - port          (a port address is never in bounds)

Byte j of the accessed value is at address e + j, so in channel (r + j) mod 4 for
r = e mod 4. FFN 1 selects it with one neuron per (r, j, bit): AND(e mod 4 == r, byte
bit, j < w, not port). Sign extension copies bit 7 (or 15) of the value into the high bits.
"""

from __future__ import annotations

from tlc.compiler.isa import INPUT_PORT, OUTPUT_PORT, Opcode
from tlc.model import tokens as tk
from tlc.model.context import Context, Family
from tlc.model.wiring import (
    Lin,
    add_bits,
    all_of,
    at_least_zero,
    bit,
    copy_bit,
    equals_zero,
    not_bit,
    number,
)

# Added to the port test of opcodes that cannot use the port: larger than any p + o - PORT.
PORT_EXCLUSION = float(1 << 34)
ADDRESS_WIDTH = 34  # p + o + 3 < 2^34, so the word adders never wrap

LOADS = {Opcode.I32_LOAD: 4, Opcode.I32_LOAD8_U: 1, Opcode.I32_LOAD8_S: 1,
         Opcode.I32_LOAD16_U: 2, Opcode.I32_LOAD16_S: 2}  # fmt: skip
STORES = {Opcode.I32_STORE: 4, Opcode.I32_STORE8: 1, Opcode.I32_STORE16: 2}


def _wider_than(ctx: Context, widths: dict[Opcode, int], j: int) -> list[Lin]:
    """Return the literals of "the access is wider than j bytes" (none for j = 0)."""
    if j == 0:
        return []
    return [ctx.opcode(*(op for op, w in widths.items() if w > j))]


def _address(ctx: Context, block, pointer: str, widths, port_opcode: Opcode, port: int,
             key_targets: bool) -> None:  # fmt: skip
    """FFN 0 part shared by loads and stores: words, e mod 4, bounds and port test."""
    r = ctx.r
    p_bits = ctx.bits(pointer)
    o_bits = ctx.bits("fetched_imm")
    e = number(r[pointer]) + number(r["fetched_imm"])
    width = Lin()
    for opcode, w in widths.items():
        width = width + ctx.opcode(opcode) * float(w)
    oob = r["cond_out_of_bounds"][0]
    at_least_zero(block, number(r["memory_size"]) - e - width, {oob: -1.0})
    port_test = e - float(port) + (1.0 - ctx.opcode(port_opcode)) * PORT_EXCLUSION
    equals_zero(block, port_test, {oob: -1.0, r["port"][0]: 1.0})
    block.constant({oob: 1.0})
    for c in range(tk.MEMORY_CHANNELS):
        extra = [list(r[f"next_mkey{c}"])] if key_targets else []
        add_bits(block, [p_bits, o_bits], 3 - c, width=ADDRESS_WIDTH,
                 value_dims=list(r[f"word{c}"]), first_bit=2,
                 extra_value_dims=extra)  # fmt: skip
    add_bits(block, [p_bits, o_bits], 0, width=2, value_dims=list(r["address_low"]))


def load_family(ctx: Context) -> Family:
    r = ctx.r
    family = Family("load", list(LOADS), "loads: bounds, ports, rotate, extend; I32.LOAD "
                    "at the input port reads stdin")  # fmt: skip
    first = family.block(0)
    _address(ctx, first, "t0", LOADS, Opcode.I32_LOAD, INPUT_PORT, key_targets=False)
    ctx.copy_window(first, None, ctx.bits("t1"), ctx.bits("t2"))

    second = family.block(1)
    port = bit(r["port"][0])
    patterns = ctx.literal_patterns(ctx.bits("address_low"))
    top = r["next_t0"]
    for j in range(4):
        wide = _wider_than(ctx, LOADS, j)
        for rotation, pattern in enumerate(patterns):
            channel = (rotation + j) % 4
            for k, byte_bit in enumerate(ctx.bits(f"memory_byte{channel}")):
                all_of(second, [not_bit(port), *pattern, byte_bit, *wide], top[8 * j + k])
    for opcode, sign_byte, first_extended in ((Opcode.I32_LOAD8_S, 0, 8),
                                              (Opcode.I32_LOAD16_S, 1, 16)):  # fmt: skip
        for rotation, pattern in enumerate(patterns):
            sign = bit(r[f"memory_byte{(rotation + sign_byte) % 4}"][7])
            all_of(second, [ctx.opcode(opcode), not_bit(port), *pattern, sign],
                   list(top[first_extended:]))  # fmt: skip
    _read_input(ctx, second)
    return family


def _read_input(ctx: Context, block) -> None:
    """At the input port: next_t0 = byte on a hit, else -1; cursor += hit.

    Value bits: i < 8: byte_i + 1 - hit, i >= 8: 1 - hit (the byte is 0 on a miss). The
    cursor carry into bit i is AND(port, hit, cursor bits 0 .. i-1).
    """
    r = ctx.r
    port = bit(r["port"][0])
    hit = bit(r["input_hit"][0])
    for i, dim in enumerate(r["next_t0"]):
        value = 1.0 - hit
        if i < tk.BYTE_BITS:
            value = value + bit(r["input_byte"][i])
        all_of(block, [port, value], dim)
    delta = r["delta_cursor"]
    cursor = ctx.bits("cursor")
    for i in range(tk.CURSOR_BITS + 1):
        outputs = {}
        if i < tk.CURSOR_BITS:
            outputs[delta[i]] = 1.0
        if i > 0:
            outputs[delta[i - 1]] = -2.0
        all_of(block, [port, hit, *cursor[:i]], outputs)


def store_family(ctx: Context) -> Family:
    """Stores ( p v -- ): memory channel writes, or one output byte at the output port."""
    r = ctx.r
    family = Family("store", list(STORES), "stores: bounds, channel writes; I32.STORE8 at "
                    "the output port writes stdout")  # fmt: skip
    first = family.block(0)
    _address(ctx, first, "t1", STORES, Opcode.I32_STORE8, OUTPUT_PORT, key_targets=True)
    ctx.change_sp(first, -2)
    ctx.copy_window(first, ctx.bits("t2"), ctx.bits("reload_a"))

    second = family.block(1)
    port = bit(r["port"][0])
    patterns = ctx.literal_patterns(ctx.bits("address_low"))
    value = ctx.bits("t0")
    for c in range(tk.MEMORY_CHANNELS):
        for rotation, pattern in enumerate(patterns):
            j = (c - rotation) % 4
            wide = _wider_than(ctx, STORES, j)
            all_of(second, [*pattern, not_bit(port), *wide], r["next_mkey_present"][c])
            for k in range(tk.BYTE_BITS):
                all_of(second, [*pattern, value[8 * j + k]], r["next_aux_val"][8 * c + k])
    miss = bit(r["cond_miss"][0])
    underflow = bit(r["cond_underflow"][0])
    all_of(second, [port, not_bit(miss), not_bit(underflow)], r["next_out_valid"][0])
    for k in range(tk.BYTE_BITS):
        copy_bit(second, value[k], r["next_out_bit"][k])
    ctx.copy_window(second, None, None, ctx.bits("reload_b"))
    return family


def memory_families(ctx: Context) -> list[Family]:
    return [load_family(ctx), store_family(ctx)]
