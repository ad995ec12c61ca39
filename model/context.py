"""The build context of every circuit: the residual, the opcode numbering and bit helpers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tlc.compiler.isa import Opcode
from tlc.model import tokens as tk
from tlc.model.circuit import Block
from tlc.model.residual import Residual
from tlc.model.wiring import Lin, add_bits, bit, copy_bit, total


@dataclass
class Family:
    """An expert per layer for a group of opcodes: `blocks[layer]` is its FFN there."""

    name: str
    opcodes: list[Opcode]
    role: str
    blocks: dict[int, Block] = field(default_factory=dict)

    def block(self, layer: int) -> Block:
        if layer not in self.blocks:
            self.blocks[layer] = Block(f"{self.name}.{layer}")
        return self.blocks[layer]


class Context:
    """The residual layout and the opcode numbering the builders wire against."""

    def __init__(self, residual: Residual, numbering: Sequence[str]):
        self.r = residual
        self.numbering = list(numbering)
        self.number = {name: i for i, name in enumerate(self.numbering)}
        if sorted(self.number) != sorted(op.mnemonic for op in Opcode):
            raise ValueError("the opcode numbering must list every mnemonic exactly once")

    def bits(self, name: str, start: int = 0, stop: int | None = None) -> list[Lin]:
        dims = self.r[name]
        return [bit(d) for d in dims[start:stop]]

    def opcode(self, *opcodes: Opcode) -> Lin:
        """Return the bit expression "the fetched opcode is one of `opcodes`"."""
        dims = self.r["fetched_op"]
        return total(bit(dims[self.number[op.mnemonic]]) for op in opcodes)

    def opcode_dim(self, opcode: Opcode) -> int:
        return self.r["fetched_op"][self.number[opcode.mnemonic]]

    def copy(self, block: Block, sources: Sequence[Lin], target: str, start: int = 0) -> None:
        """Copy bit expressions into the residual vector `target` from index `start`."""
        dims = self.r[target]
        for i, source in enumerate(sources):
            copy_bit(block, source, dims[start + i])

    def copy_window(self, block: Block, t0: Sequence[Lin] | None, t1=None, t2=None) -> None:
        """Write the next stack window; None leaves that slot to another layer."""
        for name, sources in (("next_t0", t0), ("next_t1", t1), ("next_t2", t2)):
            if sources is not None:
                self.copy(block, sources, name)

    def change_sp(self, block: Block, delta: int, spill_key: bool = False) -> None:
        """Add sp + delta - sp to delta_sp; with `spill_key`, also write sp + delta into
        the low bits of next_aux_key (the key of a spill write)."""
        r = self.r
        extra = [list(r["next_aux_key"][: tk.SP_BITS])] if spill_key else []
        add_bits(block, [self.bits("sp")], delta, width=tk.SP_BITS,
                 delta_dims=list(r["delta_sp"]), extra_value_dims=extra)  # fmt: skip

    def spill(self, block: Block) -> None:
        """Grow the stack by one: sp += 1 and spill old T2 as slot sp_new - 4, key sp_new."""
        block.constant({self.r.next_tag("spill"): 1.0})
        self.change_sp(block, 1, spill_key=True)
        self.copy(block, self.bits("t2"), "next_aux_val")

    def ip_plus_one(self) -> list[Lin]:
        """Bits of ip + 1, readable from FFN 1 on: ip + delta_ip written by FFN 0."""
        r = self.r
        return [bit(a) + bit(b) for a, b in zip(r["ip"], r["delta_ip"])]

    def literal_patterns(self, bits: Sequence[Lin]) -> list[list[Lin]]:
        """Return, for each value v < 2^len(bits), the literals of "the bits are v"."""
        patterns = []
        for value in range(1 << len(bits)):
            patterns.append([
                b if (value >> j) & 1 else 1.0 - b for j, b in enumerate(bits)
            ])  # fmt: skip
        return patterns


def opcodes_named(names: Iterable[str]) -> list[Opcode]:
    return [Opcode[name] for name in names]
