"""The attention heads: every read of state that is not in the current token.

All but one are exact-match heads (docs/model.md section 1). A head on the auxiliary
channel has n = 3 + 20 key components: the 3-bit channel tag and 20 key bits. Its query
is (tag bits, key bits) as +-1 and the constant 1; a token's key is (aux_tag_pm,
aux_key_pm + [SENTINEL], c) with c = n for a token that writes the channel and c = 2n - 1
for the SENTINEL, whose key components are then all 0. Because the tag is part of the
key, a query for one channel never matches a write to another one. Memory channel c has
n = 18 (the word index bits).

Layer 0: fetch (ip), call stack (calls), spill reload A (key sp), input (cursor), memory
size (SENTINEL). Layer 1: locals ((calls, index)), spill reload B (key sp - 1), the four
memory channels (word indices computed by FFN 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from tlc.model import tokens as tk
from tlc.model.network import Head
from tlc.model.residual import MEMORY_SIZE_BITS, RETURN_ADDRESS_BITS, Residual
from tlc.model.wiring import Lin, bit

AUX_KEY_COMPONENTS = tk.AUX_TAG_BITS + tk.AUX_KEY_BITS


def _plus_minus(bits: Sequence[Lin], width: int) -> list[Lin]:
    """Query components 2b - 1 for bit expressions b, padded with -1 (bit 0) to width."""
    rows = [bit_expression * 2.0 - 1.0 for bit_expression in bits[:width]]
    rows += [Lin.constant(-1.0)] * (width - len(rows))
    return rows


def _tag_components(tag: str) -> list[Lin]:
    number = tk.aux_tag_id(tag)
    return [Lin.constant(1.0 if (number >> j) & 1 else -1.0) for j in range(tk.AUX_TAG_BITS)]


def _sentinel_flag(residual: Residual, n: int) -> Lin:
    return Lin.dim(residual["kind"][tk.kind_id("SENTINEL")], 2.0 * n - 1.0)


def _key_bits(residual: Residual, name: str) -> list[Lin]:
    """Return the key components of the key bits in `name`: 2b - 1 for each bit b, plus
    1 in the SENTINEL token, whose key bits are 0, so that its components are 0."""
    sentinel = Lin.dim(residual["kind"][tk.kind_id("SENTINEL")])
    return [Lin.dim(d) + sentinel for d in residual[name]]


def aux_head(residual, name, role, tag, key_bits: Sequence[Lin], values, outputs) -> Head:
    """Build an exact-match head on the auxiliary channel for writes tagged `tag`."""
    r = residual
    n = AUX_KEY_COMPONENTS
    queries = _tag_components(tag) + _plus_minus(key_bits, tk.AUX_KEY_BITS) + [Lin.constant(1)]
    keys = [Lin.dim(d) for d in r["aux_tag_pm"]] + _key_bits(r, "aux_key_pm")
    keys.append(Lin.dim(r["aux_present"][0], float(n)) + _sentinel_flag(r, n))
    return Head.from_rows(name, role, "exact", queries, keys, values, outputs, r.width, n)


def memory_head(residual: Residual, channel: int) -> Head:
    """Exact-match head on memory channel `channel`: query = word index of FFN 0."""
    r = residual
    n = tk.WORD_INDEX_BITS
    queries = _plus_minus([bit(d) for d in r[f"word{channel}"]], n) + [Lin.constant(1)]
    keys = _key_bits(r, f"mkey{channel}_pm")
    keys.append(Lin.dim(r[f"mkey{channel}_present"][0], float(n)) + _sentinel_flag(r, n))
    aux_val = r["aux_val"]
    values = [Lin.dim(aux_val[8 * channel + k]) for k in range(tk.BYTE_BITS)]
    return Head.from_rows(
        f"memory{channel}", f"memory channel {channel}: the byte at address 4w + "
        f"{channel}, w = word{channel}", "exact", queries, keys, values,
        list(r[f"memory_byte{channel}"]), r.width, n,
    )  # fmt: skip


def layer0_heads(residual: Residual) -> list[Head]:
    r = residual
    code = r["kind"][tk.kind_id("CODE")]
    fetch_values = [Lin.dim(d) for d in (*r["code_op"], *r["code_imm"], code)]
    fetch_outputs = [*r["fetched_op"], *r["fetched_imm"], r["fetch_hit"][0]]
    fetch = aux_head(r, "fetch", "fetch the instruction at ip: opcode one-hot, immediate, "
                     "hit flag", "code", [bit(d) for d in r["ip"]], fetch_values,
                     fetch_outputs)  # fmt: skip

    # Every head that reads aux_val takes all of it as its value, so runtimes can keep
    # one value per key for all of them. Each output reads only the bits it needs.
    aux_values = [Lin.dim(d) for d in r["aux_val"]]
    calls = aux_head(r, "call_stack", "return address of the active call (key: calls)",
                     "call", [bit(d) for d in r["calls"]], aux_values,
                     list(r["return_address"]))  # fmt: skip

    reload_a = aux_head(r, "reload_a", "stack slot sp - 4 from the latest spill keyed sp",
                        "spill", [bit(d) for d in r["sp"]],
                        aux_values, list(r["reload_a"]))  # fmt: skip

    # An INPUT token's aux_val is the byte plus tk.INPUT_PRESENT, the hit flag.
    stdin = aux_head(r, "input", "stdin byte at the cursor and a hit flag", "input",
                     [bit(d) for d in r["cursor"]], aux_values,
                     [*r["input_byte"], r["input_hit"][0]])  # fmt: skip

    sentinel = r["kind"][tk.kind_id("SENTINEL")]
    memory_size = Head.from_rows(
        "memory_size", "memory size from the SENTINEL token's t0", "hardmax",
        [Lin.constant(1.0)], [Lin.dim(sentinel)],
        [Lin.dim(d) for d in r["t0"][:MEMORY_SIZE_BITS]], list(r["memory_size"]), r.width,
    )
    return [fetch, calls, reload_a, stdin, memory_size]


def layer1_heads(residual: Residual) -> list[Head]:
    r = residual
    local_key = [bit(d) for d in r["fetched_imm"][: tk.LOCAL_INDEX_BITS]]
    local_key += [bit(d) for d in r["calls"]]
    aux_values = [Lin.dim(d) for d in r["aux_val"]]
    local = aux_head(r, "local", "local L[calls][imm]", "local", local_key, aux_values,
                     list(r["local"]))  # fmt: skip
    reload_b = aux_head(r, "reload_b", "stack slot sp - 5 from the latest spill keyed sp - 1",
                        "spill", [bit(d) for d in r["sp_minus_1"]], aux_values,
                        list(r["reload_b"]))  # fmt: skip
    return [local, reload_b] + [memory_head(r, c) for c in range(tk.MEMORY_CHANNELS)]
