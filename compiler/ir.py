"""The intermediate representation between the checked AST and stack code.

A function is a list of basic blocks. A block contains statements and ends in one
terminator (jump, branch, return or halt). Statements and terminators contain expression
trees in which every operator is already a machine opcode. So all C typing decisions
(signedness, scaling of pointer arithmetic, truncation to narrow types) are made when
the IR is built, and code generation only chooses the instruction order. Every value
is one 32-bit word. docs/ir.md describes the printed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlc.compiler.isa import Opcode

# --- expressions ----------------------------------------------------------------------


class Expr:
    """An IR expression: evaluating it pushes exactly one word (none for a void Call)."""

    __slots__ = ()


@dataclass(frozen=True, eq=False, slots=True)
class Const(Expr):
    value: int  # a 32-bit pattern, 0 .. 2^32 - 1


@dataclass(frozen=True, eq=False, slots=True)
class SymbolAddress(Expr):
    """The address of a global or string literal plus `offset`, fixed at layout."""

    symbol: str
    offset: int = 0


@dataclass(frozen=True, eq=False, slots=True)
class LocalGet(Expr):
    slot: int


@dataclass(frozen=True, eq=False, slots=True)
class LocalTee(Expr):
    """Store `value` in a local slot and yield it."""

    slot: int
    value: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Load(Expr):
    opcode: Opcode  # one of the I32.LOAD* opcodes
    address: Expr
    offset: int = 0  # added to the address without wrap-around, as the machine does


@dataclass(frozen=True, eq=False, slots=True)
class StoreTee(Expr):
    """Store `value` at `address + offset` and yield it, using `scratch` as a temporary."""

    opcode: Opcode
    address: Expr
    value: Expr
    scratch: int
    offset: int = 0


@dataclass(frozen=True, eq=False, slots=True)
class Binary(Expr):
    opcode: Opcode
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Unary(Expr):
    opcode: Opcode  # EQZ, NEG, ABS, CLZ, CTZ or POPCNT
    operand: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Logical(Expr):
    """C's && and ||: 0 or 1, and `right` is evaluated only when needed."""

    op: str  # "and" or "or"
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Conditional(Expr):
    """C's ?: : evaluates exactly one of `then` and `otherwise`."""

    condition: Expr
    then: Expr
    otherwise: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Select(Expr):
    """Evaluates both arms, then keeps `then` when `condition` is non-zero (no branch)."""

    condition: Expr
    then: Expr
    otherwise: Expr


@dataclass(frozen=True, eq=False, slots=True)
class Call(Expr):
    function: str  # link name
    args: tuple[Expr, ...]
    returns_value: bool


@dataclass(frozen=True, eq=False, slots=True)
class Input(Expr):
    """The next byte of stdin, or -1 at the end of the input."""


@dataclass(frozen=True, eq=False, slots=True)
class Sequence(Expr):
    """Run `effects`, then evaluate `value`."""

    effects: tuple[Stmt, ...]
    value: Expr


# --- statements -----------------------------------------------------------------------


class Stmt:
    __slots__ = ()


@dataclass(frozen=True, eq=False, slots=True)
class SetLocal(Stmt):
    slot: int
    value: Expr
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Store(Stmt):
    opcode: Opcode  # I32.STORE, I32.STORE16 or I32.STORE8
    address: Expr
    value: Expr
    offset: int = 0
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Eval(Stmt):
    """Evaluate for the side effects and drop the value, if any."""

    value: Expr
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Output(Stmt):
    """Write the low 8 bits of `value` to stdout."""

    value: Expr
    line: int | None = None


# --- terminators ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False, slots=True)
class Jump:
    target: str
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Branch:
    condition: Expr
    if_true: str
    if_false: str
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Return:
    value: Expr | None
    line: int | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Halt:
    """Stop the machine with `value` on top of the stack, as `exit` does."""

    value: Expr
    line: int | None = None


Terminator = Jump | Branch | Return | Halt


# --- containers -----------------------------------------------------------------------


@dataclass(eq=False)
class Block:
    label: str
    statements: list[Stmt] = field(default_factory=list)
    terminator: Terminator | None = None


@dataclass(eq=False)
class Function:
    """A function: `params` arguments arrive in slots 0 .. params-1.

    When `frame_size` is non-zero the function owns `frame_size` bytes of the memory
    stack while it runs, and slot `frame_slot` contains the frame's lowest address.
    """

    name: str
    params: int
    returns_value: bool
    slots: int
    frame_size: int
    frame_slot: int
    blocks: list[Block]
    line: int
    source: str  # the file it was compiled from


@dataclass(frozen=True)
class Relocation:
    """Bytes `offset .. offset+3` of a data object hold the address of `symbol` plus
    `addend`."""

    offset: int
    symbol: str
    addend: int


@dataclass(eq=False)
class DataObject:
    """A global variable, string literal or initializer image in the data segment."""

    symbol: str
    size: int
    alignment: int
    image: bytes  # the initial bytes (shorter than size when the rest is zero)
    relocations: list[Relocation] = field(default_factory=list)
    comment: str = ""


@dataclass(eq=False)
class Unit:
    """The IR of one translation unit, or of a linked program."""

    functions: dict[str, Function] = field(default_factory=dict)
    data: dict[str, DataObject] = field(default_factory=dict)
