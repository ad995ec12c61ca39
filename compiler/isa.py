"""The 55-opcode instruction set: numbering, immediates and stack effects.

docs/isa.md is the specification. This table is the one place in the code that lists
the opcodes, and every other module (assembler, interpreter, weight builder) reads it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ISA_VERSION = "tlc-isa-1"

WORD_BITS = 32
WORD_MASK = 0xFFFF_FFFF
INT_MIN = 0x8000_0000

# Machine limits. Changing one changes the ISA version.
STACK_LIMIT = 1024  # operand stack slots
CALL_DEPTH_LIMIT = 1024  # active calls
LOCALS_PER_FRAME = 256  # LOCAL.* immediates are 0 .. 255
CODE_LIMIT = 65536  # instructions in one program
DEFAULT_MEMORY_SIZE = 65536  # bytes
MAX_MEMORY_SIZE = 1 << 20  # bytes

# Memory-mapped I/O ports, outside every valid memory size.
OUTPUT_PORT = 0xFFFF_FFF0  # I32.STORE8 here writes one byte to stdout
INPUT_PORT = 0xFFFF_FFF4  # I32.LOAD here reads one byte of stdin, or -1 at end of input


class Immediate(enum.Enum):
    """Kind of immediate operand an opcode takes."""

    NONE = "none"
    VALUE = "value"  # PUSH: any 32-bit pattern
    TARGET = "target"  # JZ, JNZ, CALL: an instruction address
    LOCAL = "local"  # LOCAL.*: a slot index below LOCALS_PER_FRAME
    OFFSET = "offset"  # loads and stores: unsigned byte offset added to the address


@dataclass(frozen=True)
class OpcodeInfo:
    """Static facts about one opcode: number, mnemonic, immediate kind and stack effect."""

    number: int
    mnemonic: str
    immediate: Immediate
    pops: int
    pushes: int


class Opcode(enum.IntEnum):
    """Opcode numbers in the order of the specification."""

    PUSH = 0
    POP = 1
    DUP = 2
    SWAP = 3
    OVER = 4
    ROT = 5
    NOP = 6
    HALT = 7
    ADD = 8
    SUB = 9
    MUL = 10
    DIV_S = 11
    DIV_U = 12
    REM_S = 13
    REM_U = 14
    EQZ = 15
    EQ = 16
    NE = 17
    LT_S = 18
    LT_U = 19
    GT_S = 20
    GT_U = 21
    LE_S = 22
    LE_U = 23
    GE_S = 24
    GE_U = 25
    AND = 26
    OR = 27
    XOR = 28
    SHL = 29
    SHR_S = 30
    SHR_U = 31
    ROTL = 32
    ROTR = 33
    CLZ = 34
    CTZ = 35
    POPCNT = 36
    ABS = 37
    NEG = 38
    SELECT = 39
    JZ = 40
    JNZ = 41
    CALL = 42
    RETURN = 43
    LOCAL_GET = 44
    LOCAL_SET = 45
    LOCAL_TEE = 46
    I32_LOAD = 47
    I32_STORE = 48
    I32_LOAD8_U = 49
    I32_LOAD8_S = 50
    I32_LOAD16_U = 51
    I32_LOAD16_S = 52
    I32_STORE8 = 53
    I32_STORE16 = 54

    @property
    def mnemonic(self) -> str:
        return OPCODES[self].mnemonic

    @property
    def info(self) -> OpcodeInfo:
        return OPCODES[self]


def _info(opcode: Opcode, immediate: Immediate, pops: int, pushes: int) -> OpcodeInfo:
    mnemonic = opcode.name.replace("LOCAL_", "LOCAL.").replace("I32_", "I32.")
    return OpcodeInfo(int(opcode), mnemonic, immediate, pops, pushes)


_N, _V, _T, _L, _O = (
    Immediate.NONE,
    Immediate.VALUE,
    Immediate.TARGET,
    Immediate.LOCAL,
    Immediate.OFFSET,
)

_BINARY = (
    "ADD SUB MUL DIV_S DIV_U REM_S REM_U EQ NE LT_S LT_U GT_S GT_U LE_S LE_U GE_S GE_U "
    "AND OR XOR SHL SHR_S SHR_U ROTL ROTR"
).split()
_UNARY = "EQZ CLZ CTZ POPCNT ABS NEG".split()

_EFFECTS: dict[Opcode, tuple[Immediate, int, int]] = {
    Opcode.PUSH: (_V, 0, 1),
    Opcode.POP: (_N, 1, 0),
    Opcode.DUP: (_N, 1, 2),
    Opcode.SWAP: (_N, 2, 2),
    Opcode.OVER: (_N, 2, 3),
    Opcode.ROT: (_N, 3, 3),
    Opcode.NOP: (_N, 0, 0),
    Opcode.HALT: (_N, 0, 0),
    Opcode.SELECT: (_N, 3, 1),
    Opcode.JZ: (_T, 1, 0),
    Opcode.JNZ: (_T, 1, 0),
    Opcode.CALL: (_T, 0, 0),
    Opcode.RETURN: (_N, 0, 0),
    Opcode.LOCAL_GET: (_L, 0, 1),
    Opcode.LOCAL_SET: (_L, 1, 0),
    Opcode.LOCAL_TEE: (_L, 1, 1),
    Opcode.I32_LOAD: (_O, 1, 1),
    Opcode.I32_LOAD8_U: (_O, 1, 1),
    Opcode.I32_LOAD8_S: (_O, 1, 1),
    Opcode.I32_LOAD16_U: (_O, 1, 1),
    Opcode.I32_LOAD16_S: (_O, 1, 1),
    Opcode.I32_STORE: (_O, 2, 0),
    Opcode.I32_STORE8: (_O, 2, 0),
    Opcode.I32_STORE16: (_O, 2, 0),
}
_EFFECTS.update({Opcode[name]: (_N, 2, 1) for name in _BINARY})
_EFFECTS.update({Opcode[name]: (_N, 1, 1) for name in _UNARY})

OPCODES: dict[Opcode, OpcodeInfo] = {
    op: _info(op, *_EFFECTS[op]) for op in Opcode
}
BY_MNEMONIC: dict[str, Opcode] = {info.mnemonic: op for op, info in OPCODES.items()}

# Access width in bytes of each load and store.
ACCESS_WIDTH: dict[Opcode, int] = {
    Opcode.I32_LOAD: 4,
    Opcode.I32_STORE: 4,
    Opcode.I32_LOAD8_U: 1,
    Opcode.I32_LOAD8_S: 1,
    Opcode.I32_STORE8: 1,
    Opcode.I32_LOAD16_U: 2,
    Opcode.I32_LOAD16_S: 2,
    Opcode.I32_STORE16: 2,
}

assert len(OPCODES) == 55, "the instruction set has exactly 55 opcodes"


def to_signed(value: int) -> int:
    """Return the 32-bit pattern `value` read as a two's-complement integer."""
    value &= WORD_MASK
    return value - (1 << WORD_BITS) if value & INT_MIN else value
