"""The token schema of the model: fields, their values, prompt encoding and token decoding.

This module is the one place that names the token fields and the JSON metadata keys that
describe them, so the weight builder, the PyTorch runtime and the Mojo runtime agree.
docs/model.md section 2 documents the same schema.

A token is a tuple of small integers, one per field. Field groups, in token order:

| group | fields | vocab | meaning |
| --- | --- | --- | --- |
| kind | 1 | 14 | CODE DATA INPUT SENTINEL RUN HALT and one value per trap reason |
| ip, sp, calls, cursor | 32, 11, 11, 20 | 2 | machine registers, bit i of the value |
| op | 1 | 56 | executed opcode (model numbering); the last value means "no instruction" |
| imm | 32 | 2 | immediate bits of the executed instruction |
| code_op, code_imm | 1, 32 | 56, 2 | a CODE token's instruction; "no instruction" and 0 elsewhere |
| t0, t1, t2 | 32 each | 2 | the top three stack slots, 0 where a slot does not exist |
| aux_tag | 1 | 6 | which auxiliary channel the token writes: none code spill local call input |
| aux_key | 20 | 2 | key of that write, bit i; only a token whose aux_tag is not none writes |
| aux_val | 32 | 2 | value of that write; byte c is memory channel c's byte for memory writes |
| mkey0 .. mkey3 | 18 each | 2 | word index of a store in memory channel c, bit i |
| mwrite0 .. mwrite3 | 4 | 2 | 1 when the token writes memory channel c |
| out_valid, out_bit0..7 | 1 + 8 | 2 | an output byte, bit i weighs 2^i |

A RUN token is the machine state after one executed instruction, with the instruction
echoed in `op` and `imm` and its writes in the write fields. No layer reads the echo.
The model fetches instructions from CODE tokens, which carry them in `code_op` and
`code_imm`, so the fields that change at every step feed no head. Prompt tokens use the
same fields: CODE tokens write the code channel (key = address, value = `code_op` and
`code_imm`), DATA tokens write memory channels like a store, INPUT tokens write the
input channel (key = index, value = the byte plus INPUT_PRESENT), and the SENTINEL
token carries the memory size in `t0`.

Key fields are plain bits, and one field tells whether a token writes a channel:
`aux_tag` or `mwrite c`. A token that writes nothing on the auxiliary channel has
auxiliary key bits 0, and every token but a store has memory key bits 0. A store writes
into each channel's key the word that contains that channel's byte at its address (two
neighbouring words for an unaligned store). `mwrite` marks the channels it writes, none
for a store to the output port. So consecutive tokens differ only in the key bits that
are 1, while key fields with their own "absent" value would flip every field at every
write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tlc.compiler.isa import (
    ISA_VERSION,
    MAX_MEMORY_SIZE,
    OPCODES,
    Opcode,
    to_signed,
)
from tlc.runtime.machine import (
    MAX_INPUT_BYTES,
    Instruction,
    Program,
    RunResult,
    Status,
    Trap,
    format_trace_line,
)

FORMAT_VERSION = "tlc-weights-2"
METADATA_KEY = "tlc"

# Register widths in bits.
WORD_BITS = 32
IP_BITS = 32  # a jump may target any 32-bit address, which then traps at the fetch
SP_BITS = 11  # 0 .. 1024 values on the operand stack
CALLS_BITS = 11  # 0 .. 1024 active calls
CURSOR_BITS = MAX_INPUT_BYTES.bit_length()  # input position: 20 bits
AUX_KEY_BITS = 20
WORD_INDEX_BITS = (MAX_MEMORY_SIZE // 4 - 1).bit_length()  # 18 for 1 MiB
MEMORY_CHANNELS = 4
BYTE_BITS = 8
LOCAL_INDEX_BITS = 8  # the local key is (index in bits 0..7, calls in bits 8..18)

KIND_VALUES: tuple[str, ...] = (
    "CODE", "DATA", "INPUT", "SENTINEL", "RUN", "HALT", *(trap.name for trap in Trap)
)  # fmt: skip
AUX_TAGS: tuple[str, ...] = ("none", "code", "spill", "local", "call", "input")
AUX_TAG_BITS = 3  # tags 1 .. 5 as 3-bit numbers in the keys
NO_OPCODE = len(OPCODES)  # the op value of tokens that carry no instruction
# Added to the byte in an INPUT token's aux_val: the input head's hit flag.
INPUT_PRESENT = 1 << BYTE_BITS


@dataclass(frozen=True)
class FieldGroup:
    """A run of token fields with one meaning: `width` fields of vocabulary `vocab`."""

    name: str
    width: int
    vocab: int

    def field_names(self) -> list[str]:
        if self.width == 1:
            return [self.name]
        separator = "_" if self.name[-1].isdigit() else ""
        return [f"{self.name}{separator}{i}" for i in range(self.width)]


GROUPS: tuple[FieldGroup, ...] = (
    FieldGroup("kind", 1, len(KIND_VALUES)),
    FieldGroup("ip", IP_BITS, 2),
    FieldGroup("sp", SP_BITS, 2),
    FieldGroup("calls", CALLS_BITS, 2),
    FieldGroup("cursor", CURSOR_BITS, 2),
    FieldGroup("op", 1, NO_OPCODE + 1),
    FieldGroup("imm", WORD_BITS, 2),
    FieldGroup("code_op", 1, NO_OPCODE + 1),
    FieldGroup("code_imm", WORD_BITS, 2),
    FieldGroup("t0", WORD_BITS, 2),
    FieldGroup("t1", WORD_BITS, 2),
    FieldGroup("t2", WORD_BITS, 2),
    FieldGroup("aux_tag", 1, len(AUX_TAGS)),
    FieldGroup("aux_key", AUX_KEY_BITS, 2),
    FieldGroup("aux_val", WORD_BITS, 2),
    *(FieldGroup(f"mkey{c}", WORD_INDEX_BITS, 2) for c in range(MEMORY_CHANNELS)),
    FieldGroup("mwrite", MEMORY_CHANNELS, 2),
    FieldGroup("out_valid", 1, 2),
    FieldGroup("out_bit", BYTE_BITS, 2),
)


class Schema:
    """Field indices of every group, in token order."""

    def __init__(self, groups: Sequence[FieldGroup] = GROUPS):
        self.groups = {group.name: group for group in groups}
        self.names: list[str] = []
        self.vocabs: list[int] = []
        self.start: dict[str, int] = {}
        for group in groups:
            self.start[group.name] = len(self.names)
            self.names.extend(group.field_names())
            self.vocabs.extend([group.vocab] * group.width)

    @property
    def count(self) -> int:
        return len(self.names)

    def index(self, group: str, bit: int = 0) -> int:
        if not 0 <= bit < self.groups[group].width:
            raise IndexError(f"field group {group!r} has no field {bit}")
        return self.start[group] + bit

    def indices(self, group: str) -> list[int]:
        start = self.start[group]
        return list(range(start, start + self.groups[group].width))

    def empty_token(self) -> np.ndarray:
        """Return a token with every field 0 and `op`, `code_op` set to "no instruction"."""
        token = np.zeros(self.count, dtype=np.int64)
        token[self.index("op")] = NO_OPCODE
        token[self.index("code_op")] = NO_OPCODE
        return token

    def set_bits(self, token: np.ndarray, group: str, value: int) -> None:
        for i, index in enumerate(self.indices(group)):
            token[index] = (value >> i) & 1

    def bits(self, token: np.ndarray, group: str) -> int:
        """Return the integer whose bit i is bit 0 of field i of `group` in `token`."""
        start = self.start[group]
        width = self.groups[group].width
        fields = np.asarray(token[start : start + width], dtype=np.int64) & 1
        return int(fields @ _POWERS_OF_TWO[:width])


_POWERS_OF_TWO = np.left_shift(np.int64(1), np.arange(62, dtype=np.int64))
SCHEMA = Schema()


def kind_id(name: str) -> int:
    return KIND_VALUES.index(name)


def aux_tag_id(name: str) -> int:
    return AUX_TAGS.index(name)


def default_numbering() -> list[str]:
    """Return the mnemonic of each opcode number, in the numbering of compiler/isa.py."""
    return [OPCODES[op].mnemonic for op in Opcode]


# --- prompt encoding -----------------------------------------------------------------


def encode_prompt(metadata: dict, program: Program, stdin: bytes = b"",
                  dtype=np.int64) -> np.ndarray:  # fmt: skip
    """Return the prompt tokens (P, F) of `program` and its input, as `dtype` (see
    `token_dtype` for the smallest type that fits every token value).

    Order: the SENTINEL token, one CODE token per instruction, one DATA token per memory
    word that a data segment touches, one INPUT token per stdin byte, then the start
    state (a RUN token with every register 0). Raises ValueError for an invalid program
    or an input longer than the cursor can count.
    """
    program.validate()
    if len(stdin) > MAX_INPUT_BYTES:
        raise ValueError(f"input has {len(stdin)} bytes, more than {MAX_INPUT_BYTES}")
    schema = _schema_of(metadata)
    numbers = {name: number for number, name in enumerate(metadata["opcodes"])}
    head = [_sentinel_token(schema, program.memory_size)]
    for address, instruction in enumerate(program.instructions):
        head.append(_code_token(schema, numbers, address, instruction))
    head.extend(_data_tokens(schema, program))
    # One row at a time into the result, so that a long input never needs a second
    # copy of the prompt as a list of int64 tokens.
    prompt = np.empty((len(head) + len(stdin) + 1, schema.count), dtype=dtype)
    for row, token in enumerate(head):
        prompt[row] = token
    token = schema.empty_token()
    token[schema.index("kind")] = kind_id("INPUT")
    token[schema.index("aux_tag")] = aux_tag_id("input")
    for index, byte in enumerate(stdin):
        schema.set_bits(token, "aux_key", index)
        schema.set_bits(token, "aux_val", byte | INPUT_PRESENT)
        prompt[len(head) + index] = token
    start = schema.empty_token()
    start[schema.index("kind")] = kind_id("RUN")
    prompt[-1] = start
    return prompt


def token_dtype(metadata: dict) -> np.dtype:
    """Return the smallest unsigned integer type that fits every field's values."""
    largest = max(int(entry["vocab"]) for entry in metadata["fields"]) - 1
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _schema_of(metadata: dict) -> Schema:
    names = [entry["name"] for entry in metadata["fields"]]
    if names != SCHEMA.names:
        raise ValueError("the weight file's token fields differ from this version of tlc")
    return SCHEMA


def _sentinel_token(schema: Schema, memory_size: int) -> np.ndarray:
    token = schema.empty_token()
    token[schema.index("kind")] = kind_id("SENTINEL")
    schema.set_bits(token, "t0", memory_size)
    return token


def _code_token(schema, numbers, address: int, instruction: Instruction) -> np.ndarray:
    token = schema.empty_token()
    token[schema.index("kind")] = kind_id("CODE")
    token[schema.index("code_op")] = numbers[instruction.opcode.mnemonic]
    schema.set_bits(token, "code_imm", instruction.immediate)
    token[schema.index("aux_tag")] = aux_tag_id("code")
    schema.set_bits(token, "aux_key", address)
    return token


def _data_tokens(schema: Schema, program: Program) -> list[np.ndarray]:
    """Return one DATA token per word that data segments touch, with its initial bytes.

    Later segments override earlier ones, as in `Program.initial_memory`.
    """
    image = program.initial_memory()
    words: dict[int, set[int]] = {}
    for address, data in program.data:
        for byte_address in range(address, address + len(data)):
            words.setdefault(byte_address >> 2, set()).add(byte_address & 3)
    tokens = []
    for word in sorted(words):
        token = schema.empty_token()
        token[schema.index("kind")] = kind_id("DATA")
        value = 0
        for channel in sorted(words[word]):
            schema.set_bits(token, f"mkey{channel}", word)
            token[schema.index("mwrite", channel)] = 1
            value |= image[4 * word + channel] << (8 * channel)
        schema.set_bits(token, "aux_val", value)
        tokens.append(token)
    return tokens


# --- token decoding ------------------------------------------------------------------


class TokenDecoder:
    """Turns generated tokens into trace lines, output bytes and a RunResult.

    Feed the tokens in order with `feed`; it returns False once the run has ended. The
    decoder reads registers from the tokens only: the trace line of token t uses the ip
    of token t - 1 (the address of the executed instruction) and the opcode, immediate,
    stack depth and top of token t.
    """

    def __init__(
        self,
        metadata: dict,
        program: Program,
        *,
        max_steps: int | None = None,
        trace: Callable[[str], None] | None = None,
        write_output: Callable[[bytes], None] | None = None,
    ):
        self.schema = _schema_of(metadata)
        self.kind_index = self.schema.index("kind")
        self.out_valid_index = self.schema.index("out_valid")
        self.kinds = list(metadata["kind"]["values"])
        self.opcodes = [Opcode[name.replace(".", "_")] for name in metadata["opcodes"]]
        self.program = program
        self.max_steps = max_steps
        self.trace = trace
        self.write_output = write_output
        self.previous_ip = 0
        self.steps = 0
        self.tokens = 0
        self.output = bytearray()
        self.result: RunResult | None = None

    def feed(self, token: np.ndarray) -> bool:
        """Consume one generated token; return True while the run goes on."""
        schema = self.schema
        self.tokens += 1
        kind = self.kinds[int(token[self.kind_index])]
        if kind not in ("RUN", "HALT"):
            self._finish_trap(kind)
            return False
        self._emit_output(token)
        if self.trace is not None:
            self.trace(self._trace_line(token))
        self.steps += 1
        self.previous_ip = schema.bits(token, "ip")
        if kind == "HALT":
            depth = schema.bits(token, "sp")
            result = to_signed(schema.bits(token, "t0")) if depth else None
            self.result = self._result(Status.HALTED, result=result)
            return False
        if self.max_steps is not None and self.steps >= self.max_steps:
            self.result = self._result(Status.STEP_LIMIT)
            return False
        return True

    def _emit_output(self, token: np.ndarray) -> None:
        schema = self.schema
        if token[self.out_valid_index] != 1:
            return
        byte = bytes((schema.bits(token, "out_bit"),))
        self.output += byte
        if self.write_output is not None:
            self.write_output(byte)

    def _trace_line(self, token: np.ndarray) -> str:
        schema = self.schema
        opcode = self.opcodes[int(token[schema.index("op")])]
        line = None
        if self.previous_ip < len(self.program.instructions):
            line = self.program.instructions[self.previous_ip].line
        instruction = Instruction(opcode, schema.bits(token, "imm"), line)
        depth = schema.bits(token, "sp")
        top = schema.bits(token, "t0") if depth else None
        return format_trace_line(self.steps, self.previous_ip, instruction, depth, top)

    def _finish_trap(self, kind: str) -> None:
        if kind not in Trap.__members__:
            raise ValueError(f"the model generated a {kind} token, which is not a state")
        self.result = self._result(Status.TRAPPED, trap=Trap[kind], trap_ip=self.previous_ip)

    def _result(self, status: Status, **fields) -> RunResult:
        return RunResult(status, self.steps, bytes(self.output), tokens=self.tokens, **fields)


def decode_token_stream(
    metadata: dict,
    program: Program,
    tokens: Iterable[np.ndarray],
    *,
    max_steps: int | None = None,
) -> tuple[RunResult | None, list[str]]:
    """Decode generated tokens into (result, trace lines); result is None when the
    tokens end before the run does."""
    lines: list[str] = []
    decoder = TokenDecoder(metadata, program, max_steps=max_steps, trace=lines.append)
    for token in tokens:
        if not decoder.feed(np.asarray(token)):
            break
    return decoder.result, lines


def schema_metadata(numbering: Sequence[str]) -> dict:
    """Return the metadata entries that describe tokens: fields, kinds, opcodes, output."""
    fields = []
    for group in GROUPS:
        for name in group.field_names():
            entry: dict = {"name": name, "vocab": group.vocab, "group": group.name}
            if group.name == "kind":
                entry["values"] = list(KIND_VALUES)
            elif group.name == "aux_tag":
                entry["values"] = list(AUX_TAGS)
            elif group.name in ("op", "code_op"):
                entry["values"] = [*numbering, "NONE"]
            fields.append(entry)
    return {
        "format": FORMAT_VERSION,
        "isa": ISA_VERSION,
        "fields": fields,
        "kind": {"field": "kind", "values": list(KIND_VALUES),
                 **{name: i for i, name in enumerate(KIND_VALUES)}},  # fmt: skip
        "opcodes": list(numbering),
        "output": {"valid": "out_valid", "bits": SCHEMA.groups["out_bit"].field_names()},
    }
