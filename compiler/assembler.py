"""Assemble `.tasm` text into a `Program`, and print a `Program` back as `.tasm`.

The syntax is the one docs/isa.md specifies. Each line contains at most one instruction: a
mnemonic in any case and an optional immediate, which is a decimal or `0x` hexadecimal
number (negative numbers are taken mod 2^32) or a label. `name:` labels may share a line
with an instruction, `;` starts a comment, and the directives are `.memory SIZE` and
`.data ADDRESS ITEM...`.

`assemble` collects every error it finds and raises one `CompileError` with all of them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from tlc.compiler.errors import CompileError, Diagnostic, diagnostic_at
from tlc.compiler.isa import (
    BY_MNEMONIC,
    CODE_LIMIT,
    DEFAULT_MEMORY_SIZE,
    INT_MIN,
    LOCALS_PER_FRAME,
    MAX_MEMORY_SIZE,
    WORD_MASK,
    Immediate,
    Opcode,
    to_signed,
)
from tlc.runtime.machine import MIN_MEMORY_SIZE, Instruction, Program

logger = logging.getLogger("tlc.compiler")

# Immediates written as numbers must lie in [-2^31, 2^32): every 32-bit pattern, either
# as an unsigned number or as a signed one.
LOWEST_NUMBER = -INT_MIN
HIGHEST_NUMBER = WORD_MASK

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>;.*)
      | (?P<string>"(?:[^"\\]|\\.)*(?P<close>")?)
      | (?P<label>[A-Za-z_][\w.$]*):
      | (?P<word>[^\s;"]+)
    )""",
    re.VERBOSE,
)
_LABEL_NAME = re.compile(r"[A-Za-z_][\w.$]*\Z")
_DECIMAL = re.compile(r"-?[0-9]+\Z")
_HEXADECIMAL = re.compile(r"-?0[xX][0-9a-fA-F]+\Z")

_SIMPLE_ESCAPES = {
    "n": 0x0A, "t": 0x09, "r": 0x0D, "0": 0x00, "a": 0x07, "b": 0x08, "f": 0x0C,
    "v": 0x0B, "\\": 0x5C, '"': 0x22, "'": 0x27, "?": 0x3F,
}  # fmt: skip


@dataclass(frozen=True)
class _Token:
    kind: str  # "label", "word" or "string"
    text: str
    column: int  # 1-based


@dataclass
class _PendingInstruction:
    opcode: Opcode
    operand: _Token | None  # a label name still to resolve, or None
    immediate: int
    line: int


class _Assembler:
    """One assembly run: scans lines, then resolves labels, collecting diagnostics."""

    def __init__(self, text: str, name: str):
        self.text = text
        self.name = name
        self.diagnostics: list[Diagnostic] = []
        self.pending: list[_PendingInstruction] = []
        self.labels: dict[str, int] = {}
        self.label_lines: dict[str, int] = {}
        self.memory_size: int | None = None
        self.memory_line = 0
        self.data: list[tuple[int, bytes, int, int]] = []  # address, bytes, line, column

    def error(self, line: int, column: int, message: str) -> None:
        self.diagnostics.append(diagnostic_at(self.name, self.text, line, column, message))

    def run(self) -> Program:
        for number, line in enumerate(self.text.splitlines(), start=1):
            tokens = self.tokenize(line, number)
            if tokens is not None:
                self.assemble_line(tokens, number)
        instructions = [self.resolve(item) for item in self.pending]
        self.check_sizes()
        if self.diagnostics:
            raise CompileError(self.diagnostics)
        size = DEFAULT_MEMORY_SIZE if self.memory_size is None else self.memory_size
        data = [(address, payload) for address, payload, _, _ in self.data]
        program = Program(instructions, data, size, self.name, dict(self.labels))
        logger.debug("assembled %s: %d instructions", self.name, len(instructions))
        return program

    def tokenize(self, line: str, number: int) -> list[_Token] | None:
        """Split one line into labels, words and strings; None after a lexical error."""
        tokens: list[_Token] = []
        position = 0
        while position < len(line):
            match = _TOKEN.match(line, position)
            if match is None or match.end() == position:
                break  # only trailing white space is left
            position = match.end()
            kind = match.lastgroup
            if kind == "comment":
                break
            text = match.group(kind)
            column = match.start(kind) + 1
            if kind == "string" and match.group("close") is None:
                self.error(number, column, "unterminated string")
                return None
            tokens.append(_Token(kind, text, column))
        return tokens

    def assemble_line(self, tokens: list[_Token], number: int) -> None:
        index = 0
        while index < len(tokens) and tokens[index].kind == "label":
            self.define_label(tokens[index], number)
            index += 1
        if index == len(tokens):
            return
        head, arguments = tokens[index], tokens[index + 1 :]
        if head.kind != "word":
            self.error(number, head.column, "expected a mnemonic or a directive")
        elif head.text.startswith("."):
            self.directive(head, arguments, number)
        else:
            self.instruction(head, arguments, number)

    def define_label(self, token: _Token, number: int) -> None:
        name = token.text
        if name in self.labels:
            first = self.label_lines[name]
            message = f"duplicate label '{name}' (first defined on line {first})"
            self.error(number, token.column, message)
            return
        self.labels[name] = len(self.pending)
        self.label_lines[name] = number

    def instruction(self, head: _Token, arguments: list[_Token], number: int) -> None:
        opcode = BY_MNEMONIC.get(head.text.upper())
        if opcode is None:
            self.error(number, head.column, f"unknown mnemonic '{head.text}'")
            return
        kind = opcode.info.immediate
        mnemonic = opcode.mnemonic
        if self.reject_label_definitions(arguments, number):
            return
        if kind is Immediate.NONE:
            if arguments:
                self.error(number, arguments[0].column, f"{mnemonic} takes no immediate")
            self.pending.append(_PendingInstruction(opcode, None, 0, number))
            return
        if not arguments:
            end = head.column + len(head.text)
            self.error(number, end, f"{mnemonic} needs an immediate ({_describe(kind)})")
            return
        if len(arguments) > 1:
            extra = arguments[1]
            self.error(number, extra.column, f"unexpected '{extra.text}' after the immediate")
            return
        operand = arguments[0]
        if _LABEL_NAME.match(operand.text) and kind in (Immediate.TARGET, Immediate.VALUE):
            self.pending.append(_PendingInstruction(opcode, operand, 0, number))
            return
        value = self.immediate_value(operand, kind, number)
        if value is not None:
            self.pending.append(_PendingInstruction(opcode, None, value, number))

    def reject_label_definitions(self, arguments: list[_Token], number: int) -> bool:
        for token in arguments:
            if token.kind == "label":
                message = f"label '{token.text}:' must come before the mnemonic"
                self.error(number, token.column, message)
                return True
        return False

    def immediate_value(self, token: _Token, kind: Immediate, number: int) -> int | None:
        """Read a numeric immediate as a 32-bit pattern and check the range of its kind."""
        if token.kind != "word":
            self.error(number, token.column, f"expected {_describe(kind)}, found a string")
            return None
        value = self.number(token, number)
        if value is None:
            return None
        if kind is Immediate.LOCAL and not 0 <= value < LOCALS_PER_FRAME:
            message = f"local index {value} is out of range (0 .. {LOCALS_PER_FRAME - 1})"
            self.error(number, token.column, message)
            return None
        return value & WORD_MASK

    def number(self, token: _Token, number: int) -> int | None:
        """Parse a decimal or 0x number in [-2^31, 2^32), or record an error."""
        text = token.text
        if _DECIMAL.match(text):
            value = int(text, 10)
        elif _HEXADECIMAL.match(text):
            value = int(text, 16)
        else:
            self.error(number, token.column, f"malformed number '{text}'")
            return None
        if not LOWEST_NUMBER <= value <= HIGHEST_NUMBER:
            message = (
                f"number {text} is out of range ({LOWEST_NUMBER} .. {HIGHEST_NUMBER})"
            )
            self.error(number, token.column, message)
            return None
        return value

    def directive(self, head: _Token, arguments: list[_Token], number: int) -> None:
        name = head.text.lower()
        if self.reject_label_definitions(arguments, number):
            return
        if name == ".memory":
            self.memory_directive(head, arguments, number)
        elif name == ".data":
            self.data_directive(head, arguments, number)
        else:
            self.error(number, head.column, f"unknown directive '{head.text}'")

    def memory_directive(self, head: _Token, arguments: list[_Token], number: int) -> None:
        if self.memory_size is not None:
            message = f"duplicate .memory directive (first on line {self.memory_line})"
            self.error(number, head.column, message)
            return
        if len(arguments) != 1 or arguments[0].kind != "word":
            self.error(number, head.column, ".memory needs one size in bytes")
            return
        size = self.number(arguments[0], number)
        if size is None:
            return
        if not MIN_MEMORY_SIZE <= size <= MAX_MEMORY_SIZE:
            message = (
                f"memory size {size} is out of range ({MIN_MEMORY_SIZE} .. {MAX_MEMORY_SIZE})"
            )
            self.error(number, arguments[0].column, message)
            return
        self.memory_size = size
        self.memory_line = number

    def data_directive(self, head: _Token, arguments: list[_Token], number: int) -> None:
        if not arguments or arguments[0].kind != "word":
            self.error(number, head.column, ".data needs an address and then bytes or strings")
            return
        address = self.number(arguments[0], number)
        if address is None:
            return
        if address < 0:
            self.error(number, arguments[0].column, f"data address {address} is negative")
            return
        payload = bytearray()
        for item in arguments[1:]:
            chunk = self.data_item(item, number)
            if chunk is None:
                return
            payload += chunk
        self.data.append((address, bytes(payload), number, head.column))

    def data_item(self, item: _Token, number: int) -> bytes | None:
        if item.kind == "string":
            return self.string_bytes(item, number)
        value = self.number(item, number)
        if value is None:
            return None
        if not 0 <= value <= 0xFF:
            self.error(number, item.column, f"byte {item.text} is out of range (0 .. 255)")
            return None
        return bytes([value])

    def string_bytes(self, item: _Token, number: int) -> bytes | None:
        """Decode a double-quoted string with C escapes; other characters become UTF-8."""
        body = item.text[1:-1]
        result = bytearray()
        index = 0
        while index < len(body):
            char = body[index]
            if char != "\\":
                result += char.encode("utf-8")
                index += 1
                continue
            decoded = _decode_escape(body, index + 1)
            if decoded is None:
                column = item.column + 1 + index
                self.error(number, column, f"invalid escape sequence '{body[index:index + 2]}'")
                return None
            value, index = decoded
            result.append(value)
        return bytes(result)

    def resolve(self, item: _PendingInstruction) -> Instruction:
        if item.operand is None:
            return Instruction(item.opcode, item.immediate, item.line)
        name = item.operand.text
        if name not in self.labels:
            self.error(item.line, item.operand.column, f"undefined label '{name}'")
            return Instruction(item.opcode, 0, item.line)
        return Instruction(item.opcode, self.labels[name], item.line)

    def check_sizes(self) -> None:
        if len(self.pending) > CODE_LIMIT:
            line = self.pending[CODE_LIMIT].line
            message = f"program has {len(self.pending)} instructions, more than {CODE_LIMIT}"
            self.error(line, 1, message)
        if not self.pending and not self.diagnostics:
            self.error(1, 1, "program has no instructions")
        size = DEFAULT_MEMORY_SIZE if self.memory_size is None else self.memory_size
        for address, payload, line, column in self.data:
            if address + len(payload) > size:
                message = (
                    f"data at {address} .. {address + len(payload) - 1} does not fit in "
                    f"memory of {size} bytes"
                )
                self.error(line, column, message)


def _describe(kind: Immediate) -> str:
    return {
        Immediate.VALUE: "a value",
        Immediate.TARGET: "a label or an instruction address",
        Immediate.LOCAL: f"a local index 0 .. {LOCALS_PER_FRAME - 1}",
        Immediate.OFFSET: "a byte offset",
    }[kind]


def _decode_escape(body: str, index: int) -> tuple[int, int] | None:
    """Decode the escape whose character after the backslash is at `index`.

    Returns the byte and the index after the escape, or None when it is invalid. Octal
    escapes take 1 to 3 digits and `\\x` takes 1 or 2 hexadecimal digits.
    """
    if index >= len(body):
        return None
    char = body[index]
    octal = re.match(r"[0-7]{1,3}", body[index:])
    if octal:
        value = int(octal.group(), 8)
        return (value, index + octal.end()) if value <= 0xFF else None
    if char in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[char], index + 1
    if char == "x":
        digits = re.match(r"[0-9a-fA-F]{1,2}", body[index + 1 :])
        if digits:
            return int(digits.group(), 16), index + 1 + digits.end()
    return None


def assemble(text: str, name: str) -> Program:
    """Assemble `.tasm` text; `name` labels diagnostics and becomes the source name.

    Raises CompileError with every problem found, each located at its line and column.
    """
    return _Assembler(text, name).run()


def disassemble(program: Program) -> str:
    """Print `program` as `.tasm` that assembles back to the same instructions and memory.

    Data segments come back as the same initial memory image, but split into `.data`
    lines of 16 bytes each. Jump and call targets inside the program get labels: the
    program's own label names where it has them, `L<address>` otherwise. Targets outside
    the program stay numbers.
    """
    count = len(program.instructions)
    names = _label_names(program)
    lines = [f".memory {program.memory_size}"]
    for address, payload in program.data:
        lines.extend(_data_lines(address, payload))
    for address, instruction in enumerate(program.instructions):
        lines.extend(f"{name}:" for name in names.get(address, ()))
        lines.append("    " + _instruction_text(instruction, names, count))
    lines.extend(f"{name}:" for name in names.get(count, ()))
    return "\n".join(lines) + "\n"


def _label_names(program: Program) -> dict[int, list[str]]:
    count = len(program.instructions)
    names: dict[int, list[str]] = {}
    for name, address in sorted(program.labels.items(), key=lambda item: item[1]):
        if _LABEL_NAME.match(name) and 0 <= address <= count:
            names.setdefault(address, []).append(name)
    used_names = set(program.labels)
    for instruction in program.instructions:
        target = instruction.immediate
        is_jump = instruction.opcode.info.immediate is Immediate.TARGET
        if is_jump and target <= count and target not in names:
            name = f"L{target}"
            while name in used_names:
                name = "_" + name
            used_names.add(name)
            names[target] = [name]
    return names


def _instruction_text(instruction: Instruction, names: dict[int, list[str]], count: int) -> str:
    info = instruction.opcode.info
    immediate = instruction.immediate
    if info.immediate is Immediate.NONE:
        return info.mnemonic
    if info.immediate is Immediate.VALUE:
        return f"{info.mnemonic} {to_signed(immediate)}"
    if info.immediate is Immediate.TARGET and immediate <= count and immediate in names:
        return f"{info.mnemonic} {names[immediate][0]}"
    return f"{info.mnemonic} {immediate}"


_DATA_BYTES_PER_LINE = 16


def _data_lines(address: int, payload: bytes) -> list[str]:
    """Print a data segment as `.data` lines, printable runs as strings, others as hex."""
    lines = []
    for start in range(0, len(payload), _DATA_BYTES_PER_LINE):
        chunk = payload[start : start + _DATA_BYTES_PER_LINE]
        lines.append(f".data {address + start} " + " ".join(_data_items(chunk)))
    return lines


def _data_items(chunk: bytes) -> list[str]:
    items: list[str] = []
    text = ""
    for byte in chunk:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            text += chr(byte)
            continue
        if text:
            items.append(f'"{text}"')
            text = ""
        items.append(f"0x{byte:02x}")
    if text:
        items.append(f'"{text}"')
    return items
