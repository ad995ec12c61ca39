"""Hypothesis: random .tasm-level programs give the same trace and result inside the
model (PyTorch runtime) as in the reference interpreter.

Programs use every opcode the model computes, with immediates biased toward edge values
(0, 1, sign bits, all ones, shift counts around 32, addresses at the ends of memory and
at the ports), jumps and calls to real and missing targets, data segments, stdin, and
stacks deep enough to spill and reload.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_helpers import first_difference, outcome, run_both

from tlc.compiler.isa import INPUT_PORT, OUTPUT_PORT, WORD_MASK, Immediate, Opcode
from tlc.runtime import torch_runner
from tlc.runtime.machine import Instruction, Program

MEMORY_SIZE = 64
MAX_STEPS = 200
EDGE_VALUES = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 255, 256, 0x7FFF, 0x8000,
               0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, OUTPUT_PORT,
               INPUT_PORT, MEMORY_SIZE - 4, MEMORY_SIZE - 2, MEMORY_SIZE - 1,
               MEMORY_SIZE]  # fmt: skip
OFFSETS = [0, 1, 2, 3, 4, 5, MEMORY_SIZE - 1, WORD_MASK]
RANDOM_SETTINGS = settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def covered_opcodes() -> list[Opcode]:
    names = set(torch_runner.load_model().metadata["covered_opcodes"])
    return [op for op in Opcode if op.mnemonic in names]


values = st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, WORD_MASK))


@st.composite
def instructions(draw, size: int, opcodes: list[Opcode]):
    # Pushes and locals are drawn more often so that stacks get deep.
    weighted = opcodes + [Opcode.PUSH] * 8 + [Opcode.LOCAL_GET, Opcode.LOCAL_SET] * 2
    opcode = draw(st.sampled_from(weighted))
    kind = opcode.info.immediate
    if kind is Immediate.VALUE:
        immediate = draw(values)
    elif kind is Immediate.TARGET:
        immediate = draw(st.one_of(st.integers(0, size), st.sampled_from([size + 5,
                                                                          WORD_MASK])))
    elif kind is Immediate.LOCAL:
        immediate = draw(st.integers(0, 3))
    elif kind is Immediate.OFFSET:
        immediate = draw(st.sampled_from(OFFSETS))
    else:
        immediate = 0
    return Instruction(opcode, immediate)


@st.composite
def programs(draw):
    opcodes = covered_opcodes()
    size = draw(st.integers(1, 30))
    code = [draw(instructions(size, opcodes)) for _ in range(size)]
    segments = draw(st.lists(
        st.tuples(st.integers(0, MEMORY_SIZE - 8), st.binary(min_size=1, max_size=8)),
        max_size=2,
    ))  # fmt: skip
    return Program(code, data=segments, memory_size=MEMORY_SIZE)


def _check(program: Program, stdin: bytes) -> None:
    (expected, expected_trace), (actual, actual_trace) = run_both(
        torch_runner.run_program, program, stdin, MAX_STEPS
    )
    assert actual_trace == expected_trace, first_difference(expected_trace, actual_trace)
    assert outcome(actual) == outcome(expected)


@RANDOM_SETTINGS
@given(programs(), st.binary(max_size=4))
def test_random_program_matches_reference(program, stdin):
    _check(program, stdin)


@RANDOM_SETTINGS
@given(st.lists(values, min_size=4, max_size=12), st.data())
def test_deep_stack_program_matches_reference(pushed, data):
    """Push many values, then run random instructions over the deep stack."""
    opcodes = covered_opcodes()
    tail = [data.draw(instructions(len(pushed) + 12, opcodes)) for _ in range(12)]
    code = [Instruction(Opcode.PUSH, value) for value in pushed] + tail
    code.append(Instruction(Opcode.HALT))
    _check(Program(code, memory_size=MEMORY_SIZE), b"ab")


@RANDOM_SETTINGS
@given(st.sampled_from([Opcode.I32_STORE, Opcode.I32_STORE8, Opcode.I32_STORE16]),
       st.sampled_from([Opcode.I32_LOAD, Opcode.I32_LOAD8_U, Opcode.I32_LOAD8_S,
                        Opcode.I32_LOAD16_U, Opcode.I32_LOAD16_S]),
       st.integers(0, MEMORY_SIZE), st.integers(0, MEMORY_SIZE), values,
       st.sampled_from(OFFSETS))  # fmt: skip
def test_store_then_load_matches_reference(store, load, store_at, load_at, value, offset):
    code = [
        Instruction(Opcode.PUSH, store_at), Instruction(Opcode.PUSH, value),
        Instruction(store, offset), Instruction(Opcode.PUSH, load_at),
        Instruction(load, offset), Instruction(Opcode.PUSH, store_at),
        Instruction(Opcode.I32_LOAD, 0), Instruction(Opcode.HALT),
    ]  # fmt: skip
    _check(Program(code, data=[(0, bytes(range(1, 65)))], memory_size=MEMORY_SIZE), b"")
