"""Linking and memory layout: one program from the user's unit and the stdlib units.

`link` keeps the functions and data reachable from `main`. A name the program defines
itself wins over the stdlib's, so a program may bring its own `strlen`. `lay_out` puts
the data segment at the top of memory and the memory stack below it:

    0 ............................ stack_top | SP word | globals, strings ... | size
    memory stack, grows down  <-  stack_top

The SP word contains the memory stack pointer, initially `stack_top`. A stack that grows
past address 0 wraps to an address near 2^32, which traps on its first access; a stack
that has room never reaches the data above it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlc.compiler import ir
from tlc.compiler.isa import DEFAULT_MEMORY_SIZE, MAX_MEMORY_SIZE

STACK_POINTER_SYMBOL = "__tl_stack_pointer"
# The memory stack gets at least this many bytes. A program whose data leaves less room in
# the default memory gets a larger memory, up to MAX_MEMORY_SIZE.
MIN_STACK_BYTES = 16 * 1024
DATA_ALIGNMENT = 16


class UndefinedFunction(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class DataTooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


@dataclass
class Layout:
    addresses: dict[str, int]
    segments: list[tuple[int, bytes]]
    memory_size: int
    stack_pointer: int  # address of the SP word


def _children(node):
    for name in getattr(node, "__slots__", ()):
        child = getattr(node, name)
        if isinstance(child, (ir.Expr, ir.Stmt)):
            yield child
        elif isinstance(child, tuple):
            yield from (c for c in child if c is not None)


def references(function: ir.Function) -> tuple[set[str], set[str], bool]:
    """Return the functions it calls, the data symbols it uses and whether it reads input."""
    calls: set[str] = set()
    symbols: set[str] = set()
    reads_input = False
    stack: list = []
    for block in function.blocks:
        stack.extend(block.statements)
        terminator = block.terminator
        for name in ("condition", "value"):
            child = getattr(terminator, name, None)
            if child is not None:
                stack.append(child)
    while stack:
        node = stack.pop()
        if isinstance(node, ir.Call):
            calls.add(node.function)
        elif isinstance(node, ir.SymbolAddress):
            symbols.add(node.symbol)
        elif isinstance(node, ir.Input):
            reads_input = True
        stack.extend(_children(node))
    return calls, symbols, reads_input


def link(user: ir.Unit, libraries: list[ir.Unit]) -> tuple[ir.Unit, bool]:
    """Return the program reachable from main and whether it reads stdin.

    Raises UndefinedFunction for a called function that no unit defines.
    """
    functions: dict[str, ir.Function] = {}
    data: dict[str, ir.DataObject] = {}
    for unit in [user, *libraries]:
        for name, function in unit.functions.items():
            functions.setdefault(name, function)
        for name, item in unit.data.items():
            data.setdefault(name, item)
    reachable: set[str] = set()
    reads_input = False
    pending = ["main"]
    used_data: set[str] = set()
    while pending:
        name = pending.pop()
        if name in reachable:
            continue
        if name not in functions:
            raise UndefinedFunction(name)
        reachable.add(name)
        calls, symbols, reads = references(functions[name])
        reads_input = reads_input or reads
        pending.extend(calls)
        used_data |= symbols
    linked = ir.Unit()
    for name, function in functions.items():  # keep the units' order
        if name in reachable:
            linked.functions[name] = function
    _add_data(linked, data, used_data)
    return linked, reads_input


def _add_data(linked: ir.Unit, data: dict[str, ir.DataObject], used: set[str]) -> None:
    pending = list(used)
    keep = set()
    while pending:
        name = pending.pop()
        if name in keep:
            continue
        keep.add(name)
        pending.extend(relocation.symbol for relocation in data[name].relocations)
    for name, item in data.items():  # keep the units' order
        if name in keep:
            linked.data[name] = item


def _aligned(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def lay_out(unit: ir.Unit) -> Layout:
    """Assign addresses to the data objects and build the initial memory image."""
    offsets: dict[str, int] = {STACK_POINTER_SYMBOL: 0}
    size = 4
    for item in unit.data.values():
        size = _aligned(size, item.alignment)
        offsets[item.symbol] = size
        size += item.size
    memory_size = DEFAULT_MEMORY_SIZE
    while memory_size - _aligned(size, DATA_ALIGNMENT) < MIN_STACK_BYTES:
        memory_size *= 2
        if memory_size > MAX_MEMORY_SIZE:
            raise DataTooLarge(size)
    base = memory_size - _aligned(size, DATA_ALIGNMENT)
    addresses = {symbol: base + offset for symbol, offset in offsets.items()}
    segments = [(base, base.to_bytes(4, "little"))]  # the SP word starts at `base`
    for item in unit.data.values():
        image = bytearray(item.image)
        for relocation in item.relocations:
            value = (addresses[relocation.symbol] + relocation.addend) & 0xFFFFFFFF
            end = relocation.offset + 4
            if len(image) < end:
                image.extend(bytes(end - len(image)))
            image[relocation.offset : end] = value.to_bytes(4, "little")
        if any(image):
            segments.append((addresses[item.symbol], bytes(image)))
    return Layout(addresses, segments, memory_size, addresses[STACK_POINTER_SYMBOL])
