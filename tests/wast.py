"""Read WebAssembly `.wast` conformance scripts and turn their i32 cases into tlc programs.

`collect_cases(path)` returns one `WastCase(name, program, expected)` per `assert_return`
or `assert_trap` that the 55-opcode machine can express. Every backend's tests can run
the same cases.

A case becomes a `.tasm` program that is assembled by `tlc.compiler.assembler`:

* When the invoked function is one instruction applied to its parameters in order, as
  every function of i32.wast and the loads of address.wast are, the program is
  `PUSH arg...; OPCODE; HALT`.
* Otherwise the program is `PUSH arg...; CALL f; HALT` followed by a translation of the
  function and every function it calls, using the calling convention of docs/isa.md
  (the callee moves its arguments into locals with `LOCAL.SET n-1 ... LOCAL.SET 0`).

The translator handles the folded (s-expression) form of `i32.const`, `local.get`, `call`,
`drop`, the i32 operators that are opcodes, and i32 loads and stores with `offset=`.
Functions that use anything else (i64, f32, f64, `i32.extend8_s`, ...) are skipped, and so
are the cases that invoke them. `skipped_cases(path)` lists those cases with the reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tlc.compiler.assembler import assemble
from tlc.compiler.isa import BY_MNEMONIC, WORD_MASK, Immediate, to_signed
from tlc.runtime.machine import Program, Trap

WASM_PAGE_SIZE = 65536


def conformance_dir() -> Path:
    """Return the folder of the conformance vectors: $TLC_CONFORMANCE_DIR, or the folder
    `shared/conformance` beside the repository."""
    override = os.environ.get("TLC_CONFORMANCE_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "conformance"


@dataclass(frozen=True)
class Expected:
    """What a case must produce: a result (signed, None for an empty stack) or a trap."""

    result: int | None = None
    trap: Trap | None = None


class WastCase(NamedTuple):
    name: str
    program: Program
    expected: Expected


class Untranslatable(Exception):
    """A construct that has no counterpart in the 55-opcode machine."""


# --- s-expressions -------------------------------------------------------------------

_SEXPR_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<line_comment>;;[^\n]*)
      | (?P<block_comment>\(;.*?;\))
      | (?P<open>\()
      | (?P<close>\))
      | (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<atom>[^\s()";]+)""",
    re.VERBOSE | re.DOTALL,
)


@dataclass
class SExpr:
    """A parenthesized list with the line it starts on."""

    items: list  # of SExpr, str atoms and Text strings
    line: int

    @property
    def head(self) -> str | None:
        return self.items[0] if self.items and isinstance(self.items[0], str) else None


class Text(str):
    """A string literal, decoded to bytes with `decode_wasm_string`."""


def parse_sexprs(source: str) -> list[SExpr]:
    """Parse a whole `.wast` file into its top-level lists."""
    stack: list[SExpr] = [SExpr([], 0)]
    position = 0
    line = 1
    while position < len(source):
        match = _SEXPR_TOKEN.match(source, position)
        if match is None:
            raise ValueError(f"line {line}: cannot read {source[position:position + 20]!r}")
        kind, text = match.lastgroup, match.group()
        if kind == "open":
            stack.append(SExpr([], line))
        elif kind == "close":
            finished = stack.pop()
            stack[-1].items.append(finished)
        elif kind == "string":
            stack[-1].items.append(Text(text[1:-1]))
        elif kind == "atom":
            stack[-1].items.append(text)
        line += text.count("\n")
        position = match.end()
    if len(stack) != 1:
        raise ValueError("unbalanced parentheses")
    return stack[0].items


def decode_wasm_string(text: str) -> bytes:
    """Decode the escapes of a WebAssembly text string: \\t \\n \\r \\" \\' \\\\ \\hh \\u{h+}."""
    simple = {"t": b"\t", "n": b"\n", "r": b"\r", '"': b'"', "'": b"'", "\\": b"\\"}
    result = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            result += char.encode("utf-8")
            index += 1
        elif text[index + 1] in simple:
            result += simple[text[index + 1]]
            index += 2
        elif text[index + 1] == "u":
            end = text.index("}", index)
            result += chr(int(text[index + 3 : end], 16)).encode("utf-8")
            index = end + 1
        else:
            result.append(int(text[index + 1 : index + 3], 16))
            index += 3
    return bytes(result)


def parse_i32(text: str) -> int:
    """Read a WebAssembly i32 literal (decimal or hex, `_` separators, signed or not) as
    a 32-bit pattern."""
    digits = text.replace("_", "")
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-")
    value = int(digits, 16) if digits.lower().startswith("0x") else int(digits, 10)
    return (sign * value) & WORD_MASK


# --- modules -------------------------------------------------------------------------


@dataclass
class Function:
    index: int
    params: list[str | None]  # parameter names (None when unnamed), all i32
    param_types: list[str]
    results: list[str]
    body: list  # folded instructions (SExpr) and flat atoms


@dataclass
class Module:
    functions: list[Function] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)  # $name -> function index
    exports: dict[str, int] = field(default_factory=dict)  # export name -> index
    memory_size: int | None = None
    data: list[tuple[int, bytes]] = field(default_factory=list)


def read_module(form: SExpr) -> Module:
    module = Module()
    for item in form.items[1:]:
        if not isinstance(item, SExpr):
            continue
        if item.head == "func":
            _read_function(module, item)
        elif item.head == "memory":
            module.memory_size = int(item.items[-1]) * WASM_PAGE_SIZE
        elif item.head == "data":
            offset = item.items[1]
            if not (isinstance(offset, SExpr) and offset.head == "i32.const"):
                raise Untranslatable("data segment without an i32.const offset")
            payload = b"".join(decode_wasm_string(part) for part in item.items[2:])
            module.data.append((parse_i32(offset.items[1]), payload))
    return module


def _read_function(module: Module, form: SExpr) -> None:
    function = Function(len(module.functions), [], [], [], [])
    items = form.items[1:]
    if items and isinstance(items[0], str) and items[0].startswith("$"):
        module.names[items[0]] = function.index
        items = items[1:]
    for item in items:
        head = item.head if isinstance(item, SExpr) else None
        if head == "export":
            module.exports[item.items[1]] = function.index
        elif head == "param":
            parts = item.items[1:]
            if parts and parts[0].startswith("$"):
                function.params.append(parts[0])
                function.param_types.append(parts[1])
            else:
                function.params.extend([None] * len(parts))
                function.param_types.extend(parts)
        elif head == "result":
            function.results.extend(item.items[1:])
        else:
            function.body.append(item)
    module.functions.append(function)


# --- translation to .tasm ------------------------------------------------------------

_MEMORY_INSTRUCTIONS = {
    f"i32.{name}": f"I32.{name.upper()}"
    for name in ("load", "load8_u", "load8_s", "load16_u", "load16_s", "store", "store8", "store16")
}


def _plain_mnemonic(name: str) -> str | None:
    """Return the tlc mnemonic of an i32 operator without immediates, or None."""
    if not name.startswith("i32.") or name in _MEMORY_INSTRUCTIONS:
        return None
    mnemonic = name[4:].upper()
    opcode = BY_MNEMONIC.get(mnemonic)
    if opcode is None or opcode.info.immediate is not Immediate.NONE:
        return None
    return mnemonic


class _Translator:
    """Translates the functions of one module that a case needs into .tasm lines."""

    def __init__(self, module: Module):
        self.module = module
        self.done: set[int] = set()
        self.queue: list[int] = []

    def function_label(self, index: int) -> str:
        if index not in self.done:
            self.done.add(index)
            self.queue.append(index)
        return f"function_{index}"

    def translate_all(self, first: int) -> list[str]:
        lines: list[str] = []
        self.function_label(first)
        while self.queue:
            lines += self.translate_function(self.module.functions[self.queue.pop(0)])
        return lines

    def translate_function(self, function: Function) -> list[str]:
        _check_i32(function)
        lines = [f"function_{function.index}:"]
        lines += [f"    LOCAL.SET {k}" for k in reversed(range(len(function.params)))]
        for item in function.body:
            lines += self.expression(item, function)
        lines.append("    RETURN")
        return lines

    def expression(self, item, function: Function) -> list[str]:
        if not isinstance(item, SExpr):
            raise Untranslatable(f"flat instruction {item}")
        head, operands = item.head, item.items[1:]
        if head == "i32.const":
            return [f"    PUSH {to_signed(parse_i32(operands[0]))}"]
        if head == "local.get":
            return [f"    LOCAL.GET {self.local_index(operands[0], function)}"]
        if head == "call":
            target = self.function_index(operands[0])
            code = self.arguments(operands[1:], function)
            return code + [f"    CALL {self.function_label(target)}"]
        if head == "drop":
            return self.arguments(operands, function) + ["    POP"]
        if head in _MEMORY_INSTRUCTIONS:
            offset = 0
            rest = []
            for operand in operands:
                if isinstance(operand, str) and operand.startswith("offset="):
                    offset = int(operand[len("offset=") :], 0)
                elif not (isinstance(operand, str) and operand.startswith("align=")):
                    rest.append(operand)
            code = self.arguments(rest, function)
            return code + [f"    {_MEMORY_INSTRUCTIONS[head]} {offset}"]
        mnemonic = _plain_mnemonic(head or "")
        if mnemonic is None:
            raise Untranslatable(f"instruction {head}")
        return self.arguments(operands, function) + [f"    {mnemonic}"]

    def arguments(self, operands, function: Function) -> list[str]:
        code: list[str] = []
        for operand in operands:
            code += self.expression(operand, function)
        return code

    def local_index(self, reference: str, function: Function) -> int:
        if reference.startswith("$"):
            return function.params.index(reference)
        return int(reference)

    def function_index(self, reference: str) -> int:
        if reference.startswith("$"):
            return self.module.names[reference]
        return int(reference)


def _check_i32(function: Function) -> None:
    for kind in function.param_types + function.results:
        if kind != "i32":
            raise Untranslatable(f"{kind} parameter or result")


def _direct_instruction(function: Function) -> str | None:
    """Return the `.tasm` instruction when `function` is one instruction applied to its
    parameters in order, else None."""
    if len(function.body) != 1 or not isinstance(function.body[0], SExpr):
        return None
    form = function.body[0]
    head = form.head or ""
    operands = [x for x in form.items[1:] if not (isinstance(x, str) and "=" in x)]
    expected = [f"local.get {name}" for name in function.params]
    actual = [
        f"local.get {x.items[1]}" if isinstance(x, SExpr) and x.head == "local.get" else None
        for x in operands
    ]
    if actual != expected or len(function.results) != 1:
        return None
    if head in _MEMORY_INSTRUCTIONS and head.startswith("i32.load"):
        offsets = [x for x in form.items[1:] if isinstance(x, str) and x.startswith("offset=")]
        offset = int(offsets[0][len("offset=") :], 0) if offsets else 0
        return f"{_MEMORY_INSTRUCTIONS[head]} {offset}"
    return _plain_mnemonic(head)


def case_source(module: Module, export: str, arguments: list[int]) -> str:
    """Return the `.tasm` text that invokes `export` with `arguments` and halts."""
    function = module.functions[module.exports[export]]
    _check_i32(function)
    lines = []
    if module.memory_size is not None:
        lines.append(f".memory {module.memory_size}")
    lines += [_data_directive(address, payload) for address, payload in module.data]
    lines += [f"    PUSH {to_signed(value)}" for value in arguments]
    direct = _direct_instruction(function)
    if direct is not None:
        lines += [f"    {direct}", "    HALT"]
    else:
        lines += [f"    CALL function_{function.index}", "    HALT"]
        lines += _Translator(module).translate_all(function.index)
    return "\n".join(lines) + "\n"


def _data_directive(address: int, payload: bytes) -> str:
    printable = all(0x20 <= byte < 0x7F and byte not in b'"\\' for byte in payload)
    if printable and payload:
        return f'.data {address} "{payload.decode("ascii")}"'
    return f".data {address} " + " ".join(str(byte) for byte in payload)


# --- cases ---------------------------------------------------------------------------


def _invocation(form: SExpr) -> tuple[str, list[int]]:
    invoke = form.items[1]
    if not (isinstance(invoke, SExpr) and invoke.head == "invoke"):
        raise Untranslatable(f"{form.head} without invoke")
    arguments = []
    for argument in invoke.items[2:]:
        if argument.head != "i32.const":
            raise Untranslatable(f"{argument.head} argument")
        arguments.append(parse_i32(argument.items[1]))
    return invoke.items[1], arguments


def _expected(form: SExpr) -> Expected:
    if form.head == "assert_trap":
        return Expected(trap=Trap(str(form.items[2])))
    values = form.items[2:]
    if not values:
        return Expected(result=None)
    if len(values) != 1 or values[0].head != "i32.const":
        raise Untranslatable(f"{values[0].head} result")
    return Expected(result=to_signed(parse_i32(values[0].items[1])))


def _walk(path: Path):
    """Yield (form, module, case or None, skip reason or None) for every assertion."""
    module: Module | None = None
    for form in parse_sexprs(path.read_text()):
        if form.head == "module":
            is_text = not (len(form.items) > 1 and form.items[1] in ("quote", "binary"))
            module = read_module(form) if is_text else None
        elif form.head in ("assert_return", "assert_trap"):
            yield form, *_case(path, form, module)


def _case(path: Path, form: SExpr, module: Module | None):
    try:
        if module is None:
            raise Untranslatable("no text module")
        export, arguments = _invocation(form)
        expected = _expected(form)
        text = case_source(module, export, arguments)
    except Untranslatable as reason:
        return None, str(reason)
    call = ",".join(str(to_signed(value)) for value in arguments)
    name = f"{path.name}:{form.line}:{export}({call})"
    return WastCase(name, assemble(text, name), expected), None


def collect_cases(path: Path) -> list[WastCase]:
    """Return every assertion of `path` that the 55-opcode machine can run."""
    return [case for _, case, _ in _walk(path) if case is not None]


def skipped_cases(path: Path) -> list[tuple[int, str]]:
    """Return (line, reason) for every assertion of `path` that `collect_cases` leaves out."""
    return [(form.line, reason) for form, case, reason in _walk(path) if case is None]
