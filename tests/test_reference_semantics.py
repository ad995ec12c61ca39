"""Edge cases of docs/isa.md checked on the reference interpreter: the known pitfalls,
every trap, the I/O ports, call frames, step counting and the trace."""

from __future__ import annotations

import pytest

from tlc.compiler.assembler import assemble
from tlc.compiler.isa import OPCODES, Opcode
from tlc.runtime.machine import Instruction, Program, Status, Trap
from tlc.runtime.reference import run_program


def run(text: str, **options):
    return run_program(assemble(text, "test.tasm"), **options)


def result_of(text: str) -> int | None:
    outcome = run(text)
    assert outcome.status is Status.HALTED, outcome
    return outcome.result


def trap_of(text: str) -> Trap | None:
    outcome = run(text)
    assert outcome.status is Status.TRAPPED, outcome
    return outcome.trap


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("PUSH -7\nPUSH 2\nDIV_S\nHALT", -3),
        ("PUSH -7\nPUSH 2\nREM_S\nHALT", -1),
        ("PUSH 0x80000000\nPUSH -1\nREM_S\nHALT", 0),
        ("PUSH 1\nPUSH 32\nSHL\nHALT", 1),
        ("PUSH 1\nPUSH 0xFFFFFFFF\nLT_U\nHALT", 1),
        ("PUSH 1\nPUSH 0xFFFFFFFF\nLT_S\nHALT", 0),
        (".data 0 0x80\nPUSH 0\nI32.LOAD8_S 0\nHALT", -128),
        (".data 0 0x80\nPUSH 0\nI32.LOAD8_U 0\nHALT", 128),
        ("PUSH 5\nPOP\nPUSH 9\nHALT", 9),
        ("PUSH 7\nPUSH 2\nSUB\nHALT", 5),
        ("PUSH 0x80000000\nABS\nHALT", -(2**31)),
        ("PUSH 0x80000000\nNEG\nHALT", -(2**31)),
        ("PUSH -5\nABS\nHALT", 5),
        ("PUSH 0\nCLZ\nHALT", 32),
        ("PUSH 0\nCTZ\nHALT", 32),
        ("PUSH 1\nPUSH 2\nPUSH 3\nROT\nHALT", 1),
        ("PUSH 1\nPUSH 2\nPUSH 3\nROT\nPOP\nHALT", 3),
        ("PUSH 1\nPUSH 2\nOVER\nHALT", 1),
        ("PUSH 1\nPUSH 2\nSWAP\nHALT", 1),
        ("PUSH 10\nPUSH 20\nPUSH 1\nSELECT\nHALT", 10),
        ("PUSH 10\nPUSH 20\nPUSH 0\nSELECT\nHALT", 20),
        ("PUSH 0x12345678\nPUSH 8\nROTL\nHALT", 0x34567812),
        ("PUSH 0x12345678\nPUSH 8\nROTR\nHALT", 0x78123456),
        ("PUSH -16\nPUSH 2\nSHR_S\nHALT", -4),
        ("PUSH -16\nPUSH 28\nSHR_U\nHALT", 15),
    ],
)
def test_pitfall_result(program, expected):
    assert result_of(program) == expected


def test_div_s_overflow_traps():
    assert trap_of("PUSH 0x80000000\nPUSH -1\nDIV_S\nHALT") is Trap.INTEGER_OVERFLOW


def test_four_byte_load_at_size_minus_3_traps():
    assert trap_of(".memory 64\nPUSH 61\nI32.LOAD 0\nHALT") is Trap.OUT_OF_BOUNDS


def test_four_byte_load_at_size_minus_4_works():
    assert result_of(".memory 64\n.data 60 1 2 3 4\nPUSH 60\nI32.LOAD 0\nHALT") == 0x04030201


@pytest.mark.parametrize(
    "access",
    ["I32.LOAD 0", "I32.LOAD8_U 0", "I32.LOAD8_S 0", "I32.LOAD16_U 0", "I32.LOAD16_S 0"],
)
def test_load_at_max_address_traps(access):
    assert trap_of(f"PUSH 0xFFFFFFFF\n{access}\nHALT") is Trap.OUT_OF_BOUNDS


@pytest.mark.parametrize("access", ["I32.STORE 0", "I32.STORE8 0", "I32.STORE16 0"])
def test_store_at_max_address_traps(access):
    assert trap_of(f"PUSH 0xFFFFFFFF\nPUSH 1\n{access}\nHALT") is Trap.OUT_OF_BOUNDS


def test_address_plus_offset_does_not_wrap():
    # 0xFFFFFFFF + 1 would wrap to 0 in 32 bits; the machine adds exactly.
    assert trap_of("PUSH 0xFFFFFFFF\nI32.LOAD8_U 1\nHALT") is Trap.OUT_OF_BOUNDS


def test_huge_offset_traps():
    assert trap_of("PUSH 0xFFFFFFFF\nI32.LOAD 0xFFFFFFFF\nHALT") is Trap.OUT_OF_BOUNDS


@pytest.mark.parametrize(
    ("program", "trap"),
    [
        ("PUSH 1\nPUSH 0\nDIV_S\nHALT", Trap.DIVIDE_BY_ZERO),
        ("PUSH 1\nPUSH 0\nDIV_U\nHALT", Trap.DIVIDE_BY_ZERO),
        ("PUSH 1\nPUSH 0\nREM_S\nHALT", Trap.DIVIDE_BY_ZERO),
        ("PUSH 1\nPUSH 0\nREM_U\nHALT", Trap.DIVIDE_BY_ZERO),
        ("POP\nHALT", Trap.STACK_UNDERFLOW),
        ("PUSH 1\nADD\nHALT", Trap.STACK_UNDERFLOW),
        ("PUSH 1\nPUSH 2\nSELECT\nHALT", Trap.STACK_UNDERFLOW),
        ("PUSH 1\nPUSH 2\nROT\nHALT", Trap.STACK_UNDERFLOW),
        ("DUP\nHALT", Trap.STACK_UNDERFLOW),
        ("PUSH 1\nOVER\nHALT", Trap.STACK_UNDERFLOW),
        ("JZ 0\nHALT", Trap.STACK_UNDERFLOW),
        ("LOCAL.SET 0\nHALT", Trap.STACK_UNDERFLOW),
        ("PUSH 0\nI32.STORE 0\nHALT", Trap.STACK_UNDERFLOW),
        # Underflow is checked before the division's own trap.
        ("PUSH 0\nDIV_S\nHALT", Trap.STACK_UNDERFLOW),
        ("RETURN", Trap.RETURN_OUTSIDE_CALL),
        ("PUSH 1", Trap.INVALID_JUMP_TARGET),
        ("PUSH 0\nJZ 100\nHALT", Trap.INVALID_JUMP_TARGET),
        ("CALL 0xFFFFFFFF\nHALT", Trap.INVALID_JUMP_TARGET),
    ],
)
def test_trap_reason(program, trap):
    assert trap_of(program) is trap


def test_stack_overflow_at_1025_values():
    outcome = run("loop: PUSH 1\nPUSH 1\nJNZ loop")
    assert outcome.trap is Trap.STACK_OVERFLOW
    # Iteration k starts with k values: in iteration 1023 the first PUSH makes 1024 and
    # the second one traps.
    assert outcome.trap_ip == 1
    assert outcome.steps == 1023 * 3 + 1


def test_stack_of_1024_values_is_allowed():
    text = "\n".join(["PUSH 1"] * 1024 + ["HALT"])
    assert run(text).status is Status.HALTED


@pytest.mark.parametrize("grow", ["DUP", "OVER", "LOCAL.GET 0", "PUSH 3"])
def test_growing_opcodes_overflow(grow):
    text = "\n".join(["PUSH 1"] * 1024 + [grow, "HALT"])
    outcome = run(text)
    assert outcome.trap is Trap.STACK_OVERFLOW
    assert outcome.trap_ip == 1024


def test_call_depth_1024_then_exhausted():
    outcome = run("f: CALL f")
    assert outcome.trap is Trap.CALL_STACK_EXHAUSTED
    assert outcome.steps == 1024


def test_trap_ip_and_steps_exclude_trapping_instruction():
    outcome = run("PUSH 1\nPUSH 0\nDIV_U\nHALT")
    assert outcome.trap_ip == 2
    assert outcome.steps == 2


def test_invalid_jump_reports_target_address():
    outcome = run("PUSH 0\nJZ 77\nHALT")
    assert outcome.trap_ip == 77


def test_halt_counts_as_step():
    assert run("PUSH 1\nHALT").steps == 2


def test_empty_stack_at_halt_has_no_result():
    outcome = run("HALT")
    assert outcome.result is None
    assert outcome.exit_status == 0


def test_exit_status_is_low_8_bits():
    assert run("PUSH 300\nHALT").exit_status == 300 & 0xFF


def test_step_limit_stops_run():
    outcome = run("loop: PUSH 1\nJNZ loop", max_steps=10)
    assert outcome.status is Status.STEP_LIMIT
    assert outcome.steps == 10


def test_halt_within_step_limit_halts():
    assert run("PUSH 1\nHALT", max_steps=2).status is Status.HALTED


def test_output_port_streams_bytes():
    chunks: list[bytes] = []
    # 0x148 checks that only the low 8 bits are written.
    text = (
        "PUSH 0xFFFFFFF0\nPUSH 0x148\nI32.STORE8 0\n"
        "PUSH 0\nPUSH 105\nI32.STORE8 0xFFFFFFF0\nHALT"
    )
    outcome = run(text, write_output=chunks.append)
    assert outcome.output == b"Hi"
    assert chunks == [b"H", b"i"]


def test_input_port_reads_bytes_then_minus_one():
    text = (
        "PUSH 0xFFFFFFF4\nI32.LOAD 0\n"
        "PUSH 0\nI32.LOAD 0xFFFFFFF4\n"
        "PUSH 0\nI32.LOAD 0xFFFFFFF4\nHALT"
    )
    assert run(text, stdin=b"ABC").result == ord("C")
    assert run(text, stdin=b"AB").result == -1
    assert run(text, stdin=b"\xff\xff\xff").result == 0xFF


@pytest.mark.parametrize(
    "access",
    [
        "PUSH 0xFFFFFFF4\nI32.LOAD8_U 0",
        "PUSH 0xFFFFFFF0\nI32.LOAD 0",
        "PUSH 0xFFFFFFF0\nPUSH 1\nI32.STORE 0",
        "PUSH 0xFFFFFFF4\nPUSH 1\nI32.STORE8 0",
        "PUSH 0xFFFFFFF0\nPUSH 1\nI32.STORE16 0",
    ],
)
def test_port_with_wrong_access_traps(access):
    assert trap_of(access + "\nHALT") is Trap.OUT_OF_BOUNDS


def test_callee_cannot_see_caller_locals():
    text = """
        PUSH 42
        LOCAL.SET 3
        CALL f
        HALT
    f:  LOCAL.GET 3
        RETURN
    """
    assert result_of(text) == 0


def test_locals_restored_after_return():
    text = """
        PUSH 42
        LOCAL.SET 3
        CALL f
        LOCAL.GET 3
        HALT
    f:  PUSH 7
        LOCAL.SET 3
        RETURN
    """
    assert result_of(text) == 42


def test_frame_row_keeps_last_value_at_same_depth():
    # docs/isa.md: a row is not cleared on CALL, so the second call reads the first's value.
    text = """
        CALL set
        CALL get
        HALT
    set: PUSH 99
        LOCAL.SET 0
        RETURN
    get: LOCAL.GET 0
        RETURN
    """
    assert result_of(text) == 99


def test_data_segments_and_memory_size():
    text = '.memory 8\n.data 4 "ab" 0x63\nPUSH 4\nI32.LOAD 0\nHALT'
    assert result_of(text) == 0x636261


def test_trace_lines_match_format():
    lines: list[str] = []
    run("PUSH 7\nPUSH -2\nADD\nJZ 0\nHALT", trace=lines.append)
    assert lines == [
        "step=0 ip=0 op=PUSH imm=7 depth=1 top=7 line=1",
        "step=1 ip=1 op=PUSH imm=-2 depth=2 top=-2 line=2",
        "step=2 ip=2 op=ADD imm=- depth=1 top=5 line=3",
        "step=3 ip=3 op=JZ imm=0 depth=0 top=- line=4",
        "step=4 ip=4 op=HALT imm=- depth=0 top=- line=5",
    ]


def test_trace_omits_trapping_step():
    lines: list[str] = []
    outcome = run("PUSH 1\nPOP\nPOP\nHALT", trace=lines.append)
    assert len(lines) == 2
    assert outcome.trap is Trap.STACK_UNDERFLOW


def test_trace_respects_step_limit():
    lines: list[str] = []
    outcome = run("loop: PUSH 1\nJNZ loop", trace=lines.append, max_steps=5)
    assert len(lines) == 5
    assert outcome.status is Status.STEP_LIMIT


def test_traced_and_fast_runs_agree():
    text = """
        PUSH 10
        LOCAL.SET 0
    loop: LOCAL.GET 0
        PUSH 0xFFFFFFF0
        SWAP
        PUSH 48
        ADD
        I32.STORE8 0
        LOCAL.GET 0
        PUSH 1
        SUB
        LOCAL.TEE 0
        JNZ loop
        PUSH 3
        HALT
    """
    fast = run(text)
    traced = run(text, trace=lambda line: None)
    assert fast == traced


def test_invalid_program_raises_value_error():
    program = Program([Instruction(Opcode.LOCAL_GET, 256), Instruction(Opcode.HALT)])
    with pytest.raises(ValueError):
        run_program(program)


def test_every_opcode_is_dispatched():
    # Each opcode with enough operands must either run or trap with a documented reason.
    for opcode, info in OPCODES.items():
        instructions = [Instruction(Opcode.PUSH, 1)] * 3 + [
            Instruction(opcode, 0),
            Instruction(Opcode.HALT),
        ]
        outcome = run_program(Program(instructions))
        assert outcome.status in (Status.HALTED, Status.TRAPPED), info.mnemonic
