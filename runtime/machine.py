"""Types shared by every backend: programs, traps, run results and the trace format.

A backend takes a `Program` and returns a `RunResult`. The trace line format lives here
so that the reference interpreter, the torch runtime and the Mojo runtime print
byte-identical traces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tlc.compiler.isa import (
    CODE_LIMIT,
    DEFAULT_MEMORY_SIZE,
    LOCALS_PER_FRAME,
    MAX_MEMORY_SIZE,
    WORD_MASK,
    Immediate,
    Opcode,
    to_signed,
)

# The smallest memory size docs/isa.md allows: one 32-bit word.
MIN_MEMORY_SIZE = 4

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
    # False when the compiler proves the program never reads stdin, so the CLI does not
    # wait for input on a terminal.
    reads_input: bool = True

    def validate(self) -> None:
        """Raise ValueError unless every backend can run this program as docs/isa.md specifies.

        Checks the code length, opcodes, immediate ranges (LOCAL.* below 256, others below
        2^32), the memory size and that every data segment lies inside memory.
        """
        if not self.instructions:
            raise ValueError("program has no instructions")
        if len(self.instructions) > CODE_LIMIT:
            raise ValueError(
                f"program has {len(self.instructions)} instructions, more than {CODE_LIMIT}"
            )
        for address, instruction in enumerate(self.instructions):
            _validate_instruction(address, instruction)
        if not MIN_MEMORY_SIZE <= self.memory_size <= MAX_MEMORY_SIZE:
            raise ValueError(
                f"memory size {self.memory_size} is outside {MIN_MEMORY_SIZE} .. "
                f"{MAX_MEMORY_SIZE} bytes"
            )
        for address, data in self.data:
            if address < 0 or address + len(data) > self.memory_size:
                raise ValueError(
                    f"data segment at {address} of {len(data)} bytes does not fit in "
                    f"memory of {self.memory_size} bytes"
                )

    def initial_memory(self) -> bytearray:
        """Return the memory image at the start of a run: zeros with the data applied."""
        memory = bytearray(self.memory_size)
        for address, data in self.data:
            memory[address : address + len(data)] = data
        return memory


def _validate_instruction(address: int, instruction: Instruction) -> None:
    if not isinstance(instruction.opcode, Opcode):
        raise ValueError(f"instruction {address}: {instruction.opcode!r} is not an Opcode")
    immediate = instruction.immediate
    if not 0 <= immediate <= WORD_MASK:
        raise ValueError(f"instruction {address}: immediate {immediate} is not a 32-bit pattern")
    kind = instruction.opcode.info.immediate
    if kind is Immediate.LOCAL and immediate >= LOCALS_PER_FRAME:
        raise ValueError(
            f"instruction {address}: local index {immediate} is not below {LOCALS_PER_FRAME}"
        )
    if kind is Immediate.NONE and immediate != 0:
        raise ValueError(
            f"instruction {address}: {instruction.opcode.mnemonic} takes no immediate "
            f"but has {immediate}"
        )


class Status(enum.Enum):
    """Final state of a run: halted, trapped or stopped at the step limit."""

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


# The maximum stdin length of a run, in bytes. The model counts input bytes in a 20-bit
# cursor (docs/model.md section 3). Every backend keeps this limit, so a run that one
# backend accepts runs on all of them.
MAX_INPUT_BYTES = (1 << 20) - 1


def check_run_arguments(stdin, max_steps) -> None:
    """Check the arguments that every backend's `run_program` takes. Raise TypeError
    unless `stdin` is bytes, a bytearray or a one-dimensional memoryview of bytes and
    `max_steps` is None or an integer, and ValueError for a negative `max_steps` or for
    stdin of more than MAX_INPUT_BYTES bytes."""
    bytes_view = isinstance(stdin, memoryview) and stdin.ndim == 1 and stdin.itemsize == 1
    if not (isinstance(stdin, (bytes, bytearray)) or bytes_view):
        raise TypeError(f"stdin must be bytes, not {type(stdin).__name__}")
    if len(stdin) > MAX_INPUT_BYTES:
        raise ValueError(
            f"stdin has {len(stdin):,} bytes, more than the {MAX_INPUT_BYTES:,} that a run "
            "can read; pass a shorter input"
        )
    if max_steps is None:
        return
    if isinstance(max_steps, bool) or not hasattr(max_steps, "__index__"):
        raise TypeError(f"max_steps must be an int or None, not {type(max_steps).__name__}")
    if max_steps < 0:
        raise ValueError(f"max_steps must be 0 or more, not {max_steps}")


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
