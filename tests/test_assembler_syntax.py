"""The `.tasm` syntax of docs/isa.md and the disassembler's round trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.compiler.assembler import assemble, disassemble
from tlc.compiler.isa import DEFAULT_MEMORY_SIZE, LOCALS_PER_FRAME, OPCODES, Immediate, Opcode
from tlc.runtime.machine import Instruction, Program


def opcodes_and_immediates(program: Program) -> list[tuple[Opcode, int]]:
    return [(i.opcode, i.immediate) for i in program.instructions]


def test_mnemonics_in_any_case():
    program = assemble("local.get 1\nI32.Load8_U 2\nhalt", "t.tasm")
    assert opcodes_and_immediates(program) == [
        (Opcode.LOCAL_GET, 1),
        (Opcode.I32_LOAD8_U, 2),
        (Opcode.HALT, 0),
    ]


def test_number_forms():
    text = "PUSH 10\nPUSH 0x10\nPUSH 0XfF\nPUSH -1\nPUSH -0x10\nPUSH 4294967295\nPUSH -2147483648"
    values = [immediate for _, immediate in opcodes_and_immediates(assemble(text, "t"))]
    assert values == [10, 16, 255, 0xFFFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF, 0x80000000]


def test_labels_forward_backward_and_shared_line():
    text = """
    start: PUSH 1      ; comment after an instruction
    ; a whole-line comment
    again:
        JNZ end
        JZ start
    end: CALL again
    """
    program = assemble(text, "t.tasm")
    assert opcodes_and_immediates(program) == [
        (Opcode.PUSH, 1),
        (Opcode.JNZ, 3),
        (Opcode.JZ, 0),
        (Opcode.CALL, 1),
    ]
    assert program.labels == {"start": 0, "again": 1, "end": 3}


def test_label_without_space_before_mnemonic():
    program = assemble("top:NOP\nJZ top", "t")
    assert program.instructions[1].immediate == 0


def test_label_at_end_points_past_code():
    program = assemble("JZ out\nout:", "t")
    assert program.instructions[0].immediate == 1


def test_numeric_target_outside_program_is_accepted():
    assert assemble("JZ 1000", "t").instructions[0].immediate == 1000


def test_source_lines_recorded():
    program = assemble("\n\nPUSH 1\n\nHALT", "t")
    assert [i.line for i in program.instructions] == [3, 5]


def test_memory_directive():
    assert assemble(".memory 0x100\nHALT", "t").memory_size == 256


def test_default_memory_size():
    assert assemble("HALT", "t").memory_size == DEFAULT_MEMORY_SIZE


def test_data_directive_bytes_and_strings():
    text = r'.data 8 "a;b" 0x41 66 "\n\t\\\"\x7f\101\0"' + "\nHALT"
    program = assemble(text, "t")
    assert program.data == [(8, b"a;bAB\n\t\\\"\x7fA\x00")]


def test_data_string_utf8():
    assert assemble('.data 0 "é"\nHALT', "t").data == [(0, "é".encode())]


def test_directives_in_any_case():
    program = assemble(".MEMORY 64\n.Data 0 1\nHALT", "t")
    assert program.memory_size == 64
    assert program.data == [(0, b"\x01")]


def test_source_name_kept():
    assert assemble("HALT", "prog.tasm").source_name == "prog.tasm"


def test_disassemble_round_trip_example():
    text = """
    .memory 128
    .data 0 "hello, \\"world\\"\\n" 0 255
    main: PUSH -5
    loop: LOCAL.TEE 7
        JZ done
        CALL helper
        JNZ 999
    done: HALT
    helper: I32.LOAD16_S 0xFFFFFFFF
        RETURN
    """
    program = assemble(text, "t")
    again = assemble(disassemble(program), "again")
    assert opcodes_and_immediates(again) == opcodes_and_immediates(program)
    assert again.initial_memory() == program.initial_memory()
    assert again.memory_size == program.memory_size
    assert again.labels == program.labels


def _immediate_for(opcode: Opcode, draw_value: int, count: int) -> int:
    kind = OPCODES[opcode].immediate
    if kind is Immediate.NONE:
        return 0
    if kind is Immediate.LOCAL:
        return draw_value % LOCALS_PER_FRAME
    if kind is Immediate.TARGET:
        return draw_value % (count + 3)  # some targets fall outside the program
    return draw_value


@st.composite
def programs(draw) -> Program:
    count = draw(st.integers(1, 30))
    instructions = []
    for _ in range(count):
        opcode = draw(st.sampled_from(list(Opcode)))
        value = draw(st.integers(0, 0xFFFFFFFF))
        instructions.append(Instruction(opcode, _immediate_for(opcode, value, count)))
    size = draw(st.integers(64, 4096))
    address = draw(st.integers(0, 32))
    payload = draw(st.binary(max_size=32))
    data = [(address, payload)] if payload else []
    return Program(instructions, data, size)


@settings(max_examples=100, deadline=None)
@given(programs())
def test_disassemble_round_trip_random(program):
    again = assemble(disassemble(program), "again")
    assert opcodes_and_immediates(again) == opcodes_and_immediates(program)
    assert again.initial_memory() == program.initial_memory()
    assert again.memory_size == program.memory_size
