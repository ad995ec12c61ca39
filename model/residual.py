"""The residual stream: which dimensions the embedding writes and which the layers write.

Token dimensions are written by the embedding only, and no layer ever adds to them, so
the keys and values that any layer computes from a position's token dimensions are the
same at every layer, for prompt tokens too. Scratch dimensions start at 0 and are written
by the layers; the unembedding reads the *next-state* scratch dimensions.

Token dimensions (value intervals in brackets):

* `kind` one-hot [0, 1] (14), `code_op` one-hot by model opcode number [0, 1] (55)
* register and value bits [0, 1]: ip, sp, calls, cursor, code_imm, t0, t1, t2, aux_val
* nothing for the `op` and `imm` fields, the echo of the executed instruction
* key components [-1, 1]: `aux_tag_pm` (3), 0 for tag none, and `aux_key_pm` (20),
  `mkey{c}_pm` (18 each), +1 for a key bit 1 and -1 for a bit 0
* `aux_present`, `mkey{c}_present` [0, 1]: the token writes that channel (from
  `aux_tag` and `mwrite c`)

The next token's registers come out as `register + delta` (ip, sp, calls, cursor, whose
deltas most instructions leave at 0 or get from one shared circuit) or as a new value
(the stack window, the write fields, the output and the kind).
"""

from __future__ import annotations

from tlc.model import tokens as tk
from tlc.model.circuit import Layout, Vec

OPCODE_COUNT = tk.NO_OPCODE
MEMORY_SIZE_BITS = tk.MAX_MEMORY_SIZE.bit_length()  # 21: sizes up to 2^20 inclusive
RETURN_ADDRESS_BITS = 17  # return addresses are at most 65536

# Registers whose next value is `register + delta`, and their widths.
DELTA_REGISTERS = {"ip": tk.IP_BITS, "sp": tk.SP_BITS, "calls": tk.CALLS_BITS,
                   "cursor": tk.CURSOR_BITS}  # fmt: skip
WINDOW = ("t0", "t1", "t2")
# Condition bits that FFN 0 computes and the kind logic of FFN 1 reads.
TRAP_CONDITIONS = ("miss", "underflow", "overflow", "divide_by_zero", "integer_overflow",
                   "out_of_bounds", "call_stack_exhausted", "return_outside_call")  # fmt: skip


class Residual:
    """Named residual vectors of the model, allocated once in a fixed order."""

    def __init__(self):
        self.layout = Layout()
        self.token_width = 0
        self._allocate_token_dims()
        self.token_width = self.layout.width
        self._allocate_scratch()

    def __getitem__(self, name: str) -> Vec:
        return self.layout[name]

    def add(self, name: str, width: int, low: float = 0.0, high: float = 1.0) -> Vec:
        return self.layout.add(name, width, low, high)

    @property
    def width(self) -> int:
        return self.layout.width

    def _allocate_token_dims(self) -> None:
        add = self.layout.add
        add("kind", len(tk.KIND_VALUES))
        add("code_op", OPCODE_COUNT)
        for name in ("ip", "sp", "calls", "cursor"):
            add(name, DELTA_REGISTERS[name])
        add("code_imm", tk.WORD_BITS)
        for name in WINDOW:
            add(name, tk.WORD_BITS)
        add("aux_tag_pm", tk.AUX_TAG_BITS, -1.0, 1.0)
        add("aux_present", 1)
        add("aux_key_pm", tk.AUX_KEY_BITS, -1.0, 1.0)
        add("aux_val", tk.WORD_BITS)
        for c in range(tk.MEMORY_CHANNELS):
            add(f"mkey{c}_pm", tk.WORD_INDEX_BITS, -1.0, 1.0)
            add(f"mkey{c}_present", 1)

    def _allocate_scratch(self) -> None:
        add = self.layout.add
        # Read by attention.
        add("fetched_op", OPCODE_COUNT)
        add("fetched_imm", tk.WORD_BITS)
        add("fetch_hit", 1)
        add("return_address", RETURN_ADDRESS_BITS)
        add("reload_a", tk.WORD_BITS)
        add("reload_b", tk.WORD_BITS)
        add("input_byte", tk.BYTE_BITS)
        add("input_hit", 1)
        add("memory_size", MEMORY_SIZE_BITS)
        add("local", tk.WORD_BITS)
        for c in range(tk.MEMORY_CHANNELS):
            add(f"memory_byte{c}", tk.BYTE_BITS)
        # Written by FFN 0 for later layers.
        add("sp_minus_1", tk.SP_BITS)
        for name in TRAP_CONDITIONS:
            add(f"cond_{name}", 1)
        for c in range(tk.MEMORY_CHANNELS):
            add(f"word{c}", tk.WORD_INDEX_BITS)
        add("address_low", 2)
        add("port", 1)
        add("flag", 1)  # a family's own condition bit: jump taken, SELECT's c != 0
        # The next token.
        for name, width in DELTA_REGISTERS.items():
            add(f"delta_{name}", width, -1.0, 1.0)
        for name in WINDOW:
            add(f"next_{name}", tk.WORD_BITS)
        add("next_tag", len(tk.AUX_TAGS) - 1)  # tags 1 .. 5
        add("next_aux_key", tk.AUX_KEY_BITS)
        add("next_aux_val", tk.WORD_BITS)
        for c in range(tk.MEMORY_CHANNELS):
            add(f"next_mkey{c}", tk.WORD_INDEX_BITS)
        add("next_mkey_present", tk.MEMORY_CHANNELS)
        add("next_out_valid", 1)
        add("next_out_bit", tk.BYTE_BITS)
        add("next_kind", len(tk.KIND_VALUES))

    def is_token_dim(self, dim: int) -> bool:
        return dim < self.token_width

    def next_tag(self, tag: str) -> int:
        """Return the next_tag dimension of aux tag `tag` (tags count from 1)."""
        return self["next_tag"][tk.aux_tag_id(tag) - 1]

    def next_kind(self, kind: str) -> int:
        return self["next_kind"][tk.kind_id(kind)]
