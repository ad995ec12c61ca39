"""The reference interpreter: the semantic oracle of the 55-opcode machine, in plain Python.

It follows docs/isa.md exactly and is built for speed. The program is decoded once into
`(kind, argument)` pairs, where a kind number orders the dispatch chain by how often
compiled code uses the opcode. The rarer binary and unary operators share one kind whose
argument is the Python function that computes them. The main loop keeps every hot name in
a local variable and counts steps with a `for` loop over a range, which also enforces the
step limit. It detects an empty stack or a fetch past the end of the code by catching the
IndexError of the list operation instead of checking on every step.

The machine state lives in `_Machine` between calls of `_execute`, so tracing runs the same
loop one step at a time and there is a single copy of the semantics.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Callable

from tlc.compiler.isa import (
    CALL_DEPTH_LIMIT,
    INPUT_PORT,
    INT_MIN,
    LOCALS_PER_FRAME,
    OUTPUT_PORT,
    STACK_LIMIT,
    WORD_MASK,
    Opcode,
    to_signed,
)
from tlc.runtime.machine import (
    Program,
    RunResult,
    Status,
    Trap,
    check_run_arguments,
    format_trace_line,
)

logger = logging.getLogger("tlc.runtime")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SIGN = INT_MIN  # the sign bit of a 32-bit pattern
_END_OF_INPUT = WORD_MASK  # -1, pushed by a read at the end of stdin
# Steps between two calls of the `progress` callback: about 0.1 s at 10^6 steps/s.
PROGRESS_INTERVAL = 100_000

# Dispatch kinds, in the order the main loop tests them.
(
    K_LOCAL_GET, K_PUSH, K_LOCAL_SET, K_ADD, K_JZ, K_LOAD, K_STORE, K_LT_S, K_JNZ,
    K_SUB, K_LOCAL_TEE, K_MUL, K_CALL, K_RETURN, K_EQ, K_NE, K_DUP, K_POP, K_BINARY,
    K_UNARY, K_LOAD8_U, K_STORE8, K_SWAP, K_OVER, K_ROT, K_SELECT, K_LOAD8_S,
    K_LOAD16_U, K_LOAD16_S, K_STORE16, K_NOP, K_HALT, K_DIVIDE,
) = range(33)  # fmt: skip


def _signed(value: int) -> int:
    return value - ((value & _SIGN) << 1)


def _div_s(a: int, b: int) -> int:
    """Signed division rounded toward zero; the caller has excluded b = 0 and overflow."""
    quotient = abs(_signed(a)) // abs(_signed(b))
    return (-quotient if (a ^ b) & _SIGN else quotient) & WORD_MASK


def _rem_s(a: int, b: int) -> int:
    """Signed remainder with the sign of a: a - b * trunc(a / b)."""
    remainder = abs(_signed(a)) % abs(_signed(b))
    return (-remainder if a & _SIGN else remainder) & WORD_MASK


def _div_u(a: int, b: int) -> int:
    return a // b


def _rem_u(a: int, b: int) -> int:
    return a % b


def _rotl(a: int, b: int) -> int:
    count = b & 31
    return ((a << count) | (a >> (32 - count))) & WORD_MASK


def _rotr(a: int, b: int) -> int:
    count = b & 31
    return ((a >> count) | (a << (32 - count))) & WORD_MASK


def _ctz(a: int) -> int:
    return ((a & -a).bit_length() - 1) if a else 32


# Binary operators without a dedicated dispatch kind: f(a, b) with a pushed first.
_BINARY_FUNCTIONS: dict[Opcode, Callable[[int, int], int]] = {
    Opcode.LT_U: lambda a, b: int(a < b),
    Opcode.GT_S: lambda a, b: int((a ^ _SIGN) > (b ^ _SIGN)),
    Opcode.GT_U: lambda a, b: int(a > b),
    Opcode.LE_S: lambda a, b: int((a ^ _SIGN) <= (b ^ _SIGN)),
    Opcode.LE_U: lambda a, b: int(a <= b),
    Opcode.GE_S: lambda a, b: int((a ^ _SIGN) >= (b ^ _SIGN)),
    Opcode.GE_U: lambda a, b: int(a >= b),
    Opcode.AND: lambda a, b: a & b,
    Opcode.OR: lambda a, b: a | b,
    Opcode.XOR: lambda a, b: a ^ b,
    Opcode.SHL: lambda a, b: (a << (b & 31)) & WORD_MASK,
    Opcode.SHR_S: lambda a, b: (_signed(a) >> (b & 31)) & WORD_MASK,
    Opcode.SHR_U: lambda a, b: a >> (b & 31),
    Opcode.ROTL: _rotl,
    Opcode.ROTR: _rotr,
}

_UNARY_FUNCTIONS: dict[Opcode, Callable[[int], int]] = {
    Opcode.EQZ: lambda a: int(a == 0),
    Opcode.CLZ: lambda a: 32 - a.bit_length(),
    Opcode.CTZ: _ctz,
    Opcode.POPCNT: lambda a: a.bit_count(),
    Opcode.ABS: lambda a: ((a ^ WORD_MASK) + 1) & WORD_MASK if a & _SIGN else a,
    Opcode.NEG: lambda a: -a & WORD_MASK,
}

_DIVISION_FUNCTIONS = {
    Opcode.DIV_S: _div_s,
    Opcode.DIV_U: _div_u,
    Opcode.REM_S: _rem_s,
    Opcode.REM_U: _rem_u,
}

_KIND_WITH_IMMEDIATE = {
    Opcode.PUSH: K_PUSH, Opcode.JZ: K_JZ, Opcode.JNZ: K_JNZ, Opcode.CALL: K_CALL,
    Opcode.LOCAL_GET: K_LOCAL_GET, Opcode.LOCAL_SET: K_LOCAL_SET,
    Opcode.LOCAL_TEE: K_LOCAL_TEE, Opcode.I32_LOAD: K_LOAD, Opcode.I32_STORE: K_STORE,
    Opcode.I32_LOAD8_U: K_LOAD8_U, Opcode.I32_LOAD8_S: K_LOAD8_S,
    Opcode.I32_LOAD16_U: K_LOAD16_U, Opcode.I32_LOAD16_S: K_LOAD16_S,
    Opcode.I32_STORE8: K_STORE8, Opcode.I32_STORE16: K_STORE16,
}  # fmt: skip

_KIND_WITHOUT_IMMEDIATE = {
    Opcode.POP: K_POP, Opcode.DUP: K_DUP, Opcode.SWAP: K_SWAP, Opcode.OVER: K_OVER,
    Opcode.ROT: K_ROT, Opcode.NOP: K_NOP, Opcode.HALT: K_HALT, Opcode.ADD: K_ADD,
    Opcode.SUB: K_SUB, Opcode.MUL: K_MUL, Opcode.EQ: K_EQ, Opcode.NE: K_NE,
    Opcode.LT_S: K_LT_S, Opcode.SELECT: K_SELECT, Opcode.RETURN: K_RETURN,
}  # fmt: skip


def decode(program: Program) -> list[tuple[int, object]]:
    """Translate each instruction into the (kind, argument) pair the main loop dispatches on.

    The argument is the immediate, the operator function for the shared binary, unary and
    division kinds (division also carries its opcode to pick the trap), or None.
    """
    code: list[tuple[int, object]] = []
    for instruction in program.instructions:
        opcode = instruction.opcode
        if opcode in _KIND_WITH_IMMEDIATE:
            code.append((_KIND_WITH_IMMEDIATE[opcode], instruction.immediate))
        elif opcode in _KIND_WITHOUT_IMMEDIATE:
            code.append((_KIND_WITHOUT_IMMEDIATE[opcode], None))
        elif opcode in _BINARY_FUNCTIONS:
            code.append((K_BINARY, _BINARY_FUNCTIONS[opcode]))
        elif opcode in _UNARY_FUNCTIONS:
            code.append((K_UNARY, _UNARY_FUNCTIONS[opcode]))
        else:
            code.append((K_DIVIDE, (opcode is Opcode.DIV_S, _DIVISION_FUNCTIONS[opcode])))
    return code


class _Machine:
    """The machine state of docs/isa.md, kept between calls of `_execute`."""

    def __init__(self, program: Program, stdin: bytes, write_output):
        self.code = decode(program)
        self.ip = 0
        self.stack: list[int] = []
        self.return_addresses: list[int] = []
        # Row k contains the locals of call depth k. Rows are created on first use and never
        # cleared, as docs/isa.md specifies.
        self.local_rows: list[list[int]] = [[0] * LOCALS_PER_FRAME]
        self.memory = program.initial_memory()
        self.stdin = stdin
        self.input_position = 0
        self.output = bytearray()
        self.write_output = write_output


def _execute(machine: _Machine, budget: int | None) -> tuple[Status | None, Trap | None, int]:
    """Run at most `budget` steps (no limit when None).

    Returns (status, trap, steps executed); status is None when the budget ran out first.
    A trapping instruction is not counted and leaves `machine.ip` at its address.
    """
    code = machine.code
    stack = machine.stack
    push = stack.append
    pop = stack.pop
    return_addresses = machine.return_addresses
    local_rows = machine.local_rows
    frame = local_rows[len(return_addresses)]
    memory = machine.memory
    size = len(memory)
    size_minus_4 = size - 4
    size_minus_2 = size - 2
    unpack32 = _U32.unpack_from
    pack32 = _U32.pack_into
    unpack16 = _U16.unpack_from
    pack16 = _U16.pack_into
    mask = WORD_MASK
    sign = _SIGN
    stack_limit = STACK_LIMIT
    ip = machine.ip
    trap = None
    status = None
    step = -1
    counter = itertools.count() if budget is None else range(budget)
    try:
        for step in counter:
            kind, argument = code[ip]
            if kind == K_LOCAL_GET:
                if len(stack) >= stack_limit:
                    trap = Trap.STACK_OVERFLOW
                    break
                push(frame[argument])
                ip += 1
            elif kind == K_PUSH:
                if len(stack) >= stack_limit:
                    trap = Trap.STACK_OVERFLOW
                    break
                push(argument)
                ip += 1
            elif kind == K_LOCAL_SET:
                frame[argument] = pop()
                ip += 1
            elif kind == K_ADD:
                b = pop()
                stack[-1] = (stack[-1] + b) & mask
                ip += 1
            elif kind == K_JZ:
                if pop():
                    ip += 1
                else:
                    ip = argument
            elif kind == K_LOAD:
                address = pop() + argument
                if address <= size_minus_4:
                    push(unpack32(memory, address)[0])
                elif address == INPUT_PORT:
                    push(_read_input(machine))
                else:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                ip += 1
            elif kind == K_STORE:
                value = pop()
                address = pop() + argument
                if address > size_minus_4:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                pack32(memory, address, value)
                ip += 1
            elif kind == K_LT_S:
                b = pop()
                stack[-1] = 1 if (stack[-1] ^ sign) < (b ^ sign) else 0
                ip += 1
            elif kind == K_JNZ:
                if pop():
                    ip = argument
                else:
                    ip += 1
            elif kind == K_SUB:
                b = pop()
                stack[-1] = (stack[-1] - b) & mask
                ip += 1
            elif kind == K_LOCAL_TEE:
                frame[argument] = stack[-1]
                ip += 1
            elif kind == K_MUL:
                b = pop()
                stack[-1] = (stack[-1] * b) & mask
                ip += 1
            elif kind == K_CALL:
                depth = len(return_addresses)
                if depth >= CALL_DEPTH_LIMIT:
                    trap = Trap.CALL_STACK_EXHAUSTED
                    break
                return_addresses.append(ip + 1)
                depth += 1
                if depth == len(local_rows):
                    local_rows.append([0] * LOCALS_PER_FRAME)
                frame = local_rows[depth]
                ip = argument
            elif kind == K_RETURN:
                if not return_addresses:
                    trap = Trap.RETURN_OUTSIDE_CALL
                    break
                ip = return_addresses.pop()
                frame = local_rows[len(return_addresses)]
            elif kind == K_EQ:
                b = pop()
                stack[-1] = 1 if stack[-1] == b else 0
                ip += 1
            elif kind == K_NE:
                b = pop()
                stack[-1] = 1 if stack[-1] != b else 0
                ip += 1
            elif kind == K_DUP:
                a = stack[-1]
                if len(stack) >= stack_limit:
                    trap = Trap.STACK_OVERFLOW
                    break
                push(a)
                ip += 1
            elif kind == K_POP:
                pop()
                ip += 1
            elif kind == K_BINARY:
                b = pop()
                stack[-1] = argument(stack[-1], b)
                ip += 1
            elif kind == K_UNARY:
                stack[-1] = argument(stack[-1])
                ip += 1
            elif kind == K_LOAD8_U:
                address = pop() + argument
                if address >= size:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                push(memory[address])
                ip += 1
            elif kind == K_STORE8:
                value = pop()
                address = pop() + argument
                if address < size:
                    memory[address] = value & 0xFF
                elif address == OUTPUT_PORT:
                    _write_output(machine, value & 0xFF)
                else:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                ip += 1
            elif kind == K_SWAP:
                b = pop()
                a = stack[-1]
                stack[-1] = b
                push(a)
                ip += 1
            elif kind == K_OVER:
                a = stack[-2]
                if len(stack) >= stack_limit:
                    trap = Trap.STACK_OVERFLOW
                    break
                push(a)
                ip += 1
            elif kind == K_ROT:
                a = stack[-3]
                del stack[-3]
                push(a)
                ip += 1
            elif kind == K_SELECT:
                c = pop()
                b = pop()
                a = stack[-1]
                stack[-1] = a if c else b
                ip += 1
            elif kind == K_LOAD8_S:
                address = pop() + argument
                if address >= size:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                byte = memory[address]
                push(byte | 0xFFFFFF00 if byte & 0x80 else byte)
                ip += 1
            elif kind == K_LOAD16_U:
                address = pop() + argument
                if address > size_minus_2:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                push(unpack16(memory, address)[0])
                ip += 1
            elif kind == K_LOAD16_S:
                address = pop() + argument
                if address > size_minus_2:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                half = unpack16(memory, address)[0]
                push(half | 0xFFFF0000 if half & 0x8000 else half)
                ip += 1
            elif kind == K_STORE16:
                value = pop()
                address = pop() + argument
                if address > size_minus_2:
                    trap = Trap.OUT_OF_BOUNDS
                    break
                pack16(memory, address, value & 0xFFFF)
                ip += 1
            elif kind == K_NOP:
                ip += 1
            elif kind == K_HALT:
                status = Status.HALTED
                break
            else:  # K_DIVIDE
                b = pop()
                a = stack[-1]
                if b == 0:
                    trap = Trap.DIVIDE_BY_ZERO
                    break
                is_signed, function = argument
                if is_signed and a == sign and b == mask:
                    trap = Trap.INTEGER_OVERFLOW
                    break
                stack[-1] = function(a, b)
                ip += 1
    except IndexError:
        # A fetch at an address outside the code, or a pop from an empty stack. A fetch
        # fails before `ip` is used, and every handler pops before it moves `ip`.
        trap = Trap.INVALID_JUMP_TARGET if ip >= len(code) else Trap.STACK_UNDERFLOW
    machine.ip = ip
    if trap is not None:
        return Status.TRAPPED, trap, step
    if status is Status.HALTED:
        return status, None, step + 1
    return None, None, step + 1


def _read_input(machine: _Machine) -> int:
    position = machine.input_position
    if position >= len(machine.stdin):
        return _END_OF_INPUT
    machine.input_position = position + 1
    return machine.stdin[position]


def _write_output(machine: _Machine, byte: int) -> None:
    machine.output.append(byte)
    if machine.write_output is not None:
        machine.write_output(bytes((byte,)))


def run_program(
    program: Program,
    *,
    stdin: bytes = b"",
    max_steps: int | None = None,
    trace: Callable[[str], None] | None = None,
    write_output: Callable[[bytes], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run `program` until HALT, a trap or `max_steps` executed instructions.

    `trace` receives one formatted line per executed instruction. `write_output`
    receives each output byte as the program writes it. `progress` receives the number
    of steps so far after every PROGRESS_INTERVAL steps. Raises ValueError for a program
    that fails `Program.validate`. Every runtime error of the program is a trap in the
    result, never an exception.
    """
    check_run_arguments(stdin, max_steps)
    program.validate()
    machine = _Machine(program, stdin, write_output)
    if trace is None and progress is None:
        status, trap, steps = _execute(machine, max_steps)
    elif trace is None:
        status, trap, steps = _execute_with_progress(machine, max_steps, progress)
    else:
        status, trap, steps = _execute_traced(machine, program, max_steps, trace)
    return _result(machine, program, status, trap, steps)


def _execute_with_progress(machine, max_steps, progress):
    """Run in slices of PROGRESS_INTERVAL steps and report the count after each slice."""
    steps = 0
    while True:
        budget = PROGRESS_INTERVAL
        if max_steps is not None:
            budget = min(budget, max_steps - steps)
        status, trap, executed = _execute(machine, budget)
        steps += executed
        if status is not None or (max_steps is not None and steps >= max_steps):
            return status, trap, steps
        progress(steps)


def _execute_traced(machine, program, max_steps, trace):
    """Run one step at a time through `_execute` and report each executed instruction."""
    steps = 0
    while max_steps is None or steps < max_steps:
        ip = machine.ip
        status, trap, executed = _execute(machine, 1)
        if executed:
            top = machine.stack[-1] if machine.stack else None
            trace(format_trace_line(steps, ip, program.instructions[ip], len(machine.stack), top))
            steps += 1
        if status is not None:
            return status, trap, steps
    return None, None, steps


def _result(machine, program, status, trap, steps) -> RunResult:
    output = bytes(machine.output)
    if status is None:
        return RunResult(Status.STEP_LIMIT, steps, output)
    if status is Status.TRAPPED:
        return RunResult(Status.TRAPPED, steps, output, trap=trap, trap_ip=machine.ip)
    result = to_signed(machine.stack[-1]) if machine.stack else None
    return RunResult(Status.HALTED, steps, output, result=result)
