"""Types shared by every backend: programs, traps, run results and the trace format.

A backend takes a `Program` and returns a `RunResult`. The trace line format lives here
so that the reference interpreter, the torch runtime and the Mojo runtime print
byte-identical traces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tlc.compiler.isa import (
    DEFAULT_MEMORY_SIZE,
    Immediate,
    Opcode,
    to_signed,
)

# Process exit statuses of `tlc run` besides the program's own status.
EXIT_COMPILE_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_STEP_LIMIT = 124
EXIT_TRAP = 134


class Trap(enum.Enum):
    """Reasons a program stops abnormally. The value is the text after `trap: `."""

    DIVIDE_BY_ZERO = "integer divide by zero"
    INTEGER_OVERFLOW = "integer overflow"
    OUT_OF_BOUNDS = "out of bounds memory access"
    STACK_UNDERFLOW = "stack underflow"
    STACK_OVERFLOW = "stack overflow"
    CALL_STACK_EXHAUSTED = "call stack exhausted"
    RETURN_OUTSIDE_CALL = "return outside a call"
    INVALID_JUMP_TARGET = "invalid jump target"


@dataclass(frozen=True)
class Instruction:
    """One instruction: opcode, immediate (a 32-bit pattern, 0 when there is none) and
    the source line it came from, when known."""

    opcode: Opcode
    immediate: int = 0
    line: int | None = None


@dataclass
class Program:
    """Stack code with its initial memory image, ready for any backend."""

    instructions: list[Instruction]
    data: list[tuple[int, bytes]] = field(default_factory=list)
    memory_size: int = DEFAULT_MEMORY_SIZE
    source_name: str = "<program>"
    labels: dict[str, int] = field(default_factory=dict)


class Status(enum.Enum):
    """How a run ended."""

    HALTED = "halted"
    TRAPPED = "trapped"
    STEP_LIMIT = "step limit"


@dataclass
class RunResult:
    """Outcome of one run. `steps` counts executed instructions: HALT counts, an
    instruction that traps does not. `tokens` counts decoding steps of a model backend."""

    status: Status
    steps: int
    output: bytes = b""
    result: int | None = None  # top of stack at HALT as a signed value, None if empty
    trap: Trap | None = None
    trap_ip: int | None = None
    tokens: int | None = None

    @property
    def exit_status(self) -> int:
        """Return the process exit status that `tlc run` uses for this outcome."""
        if self.status is Status.TRAPPED:
            return EXIT_TRAP
        if self.status is Status.STEP_LIMIT:
            return EXIT_STEP_LIMIT
        return (self.result or 0) & 0xFF


def format_trace_line(
    step: int,
    ip: int,
    instruction: Instruction,
    depth: int,
    top: int | None,
) -> str:
    """Format the trace line of one executed instruction.

    `step` counts from 0, `ip` is the address of the executed instruction, `depth` and
    `top` describe the operand stack after it ran. PUSH shows its immediate signed,
    other immediates unsigned, and opcodes without an immediate show `-`.
    """
    info = instruction.opcode.info
    if info.immediate is Immediate.NONE:
        immediate = "-"
    elif info.immediate is Immediate.VALUE:
        immediate = str(to_signed(instruction.immediate))
    else:
        immediate = str(instruction.immediate)
    top_text = "-" if top is None else str(to_signed(top))
    line = f"step={step} ip={ip} op={info.mnemonic} imm={immediate} depth={depth} top={top_text}"
    if instruction.line is not None:
        line += f" line={instruction.line}"
    return line
