"""Hypothesis properties of the reference interpreter: arithmetic identities, shift and
rotate laws, memory round trips, stack effects from compiler/isa.py, and agreement of the
traced and untraced runs."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tlc.compiler.isa import INT_MIN, OPCODES, WORD_MASK, Immediate, Opcode, to_signed
from tlc.runtime.machine import Instruction, Program, Status
from tlc.runtime.reference import run_program

words = st.integers(0, WORD_MASK)
nonzero_words = st.integers(1, WORD_MASK)
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


def evaluate(opcode: Opcode, *operands: int, immediate: int = 0) -> int:
    """Run `PUSH operand...; opcode; HALT` and return the top of the stack as a pattern."""
    instructions = [Instruction(Opcode.PUSH, value) for value in operands]
    instructions += [Instruction(opcode, immediate), Instruction(Opcode.HALT)]
    outcome = run_program(Program(instructions))
    assert outcome.status is Status.HALTED, outcome
    return outcome.result & WORD_MASK


@PROPERTY_SETTINGS
@given(words, nonzero_words)
def test_unsigned_division_identity(a, b):
    quotient = evaluate(Opcode.DIV_U, a, b)
    remainder = evaluate(Opcode.REM_U, a, b)
    assert quotient * b + remainder == a
    assert remainder < b


@PROPERTY_SETTINGS
@given(words, nonzero_words)
def test_signed_division_identity(a, b):
    assume(not (a == INT_MIN and b == WORD_MASK))
    quotient = to_signed(evaluate(Opcode.DIV_S, a, b))
    remainder = to_signed(evaluate(Opcode.REM_S, a, b))
    assert quotient * to_signed(b) + remainder == to_signed(a)
    assert abs(remainder) < abs(to_signed(b))
    assert remainder == 0 or (remainder < 0) == (to_signed(a) < 0)


@PROPERTY_SETTINGS
@given(words, words)
def test_rotate_right_inverts_rotate_left(a, b):
    rotated = evaluate(Opcode.ROTL, a, b)
    assert evaluate(Opcode.ROTR, rotated, b) == a


@PROPERTY_SETTINGS
@given(words, words)
def test_rotate_left_matches_shifts(a, b):
    count = b % 32
    expected = ((a << count) | (a >> (32 - count))) & WORD_MASK
    assert evaluate(Opcode.ROTL, a, b) == expected


@PROPERTY_SETTINGS
@given(st.sampled_from([Opcode.SHL, Opcode.SHR_S, Opcode.SHR_U, Opcode.ROTL, Opcode.ROTR]),
       words, words)  # fmt: skip
def test_shift_count_taken_mod_32(opcode, a, b):
    assert evaluate(opcode, a, b) == evaluate(opcode, a, b % 32)


@PROPERTY_SETTINGS
@given(words, st.integers(0, 31))
def test_shifts_match_integer_arithmetic(a, count):
    assert evaluate(Opcode.SHL, a, count) == (a * 2**count) % 2**32
    assert evaluate(Opcode.SHR_U, a, count) == a // 2**count
    assert to_signed(evaluate(Opcode.SHR_S, a, count)) == to_signed(a) // 2**count


@PROPERTY_SETTINGS
@given(words, words)
def test_comparisons_match_integer_order(a, b):
    signed_a, signed_b = to_signed(a), to_signed(b)
    assert evaluate(Opcode.LT_S, a, b) == int(signed_a < signed_b)
    assert evaluate(Opcode.LT_U, a, b) == int(a < b)
    assert evaluate(Opcode.GE_S, a, b) == int(signed_a >= signed_b)
    assert evaluate(Opcode.GT_U, a, b) == int(a > b)
    assert evaluate(Opcode.LE_S, a, b) == int(signed_a <= signed_b)


@PROPERTY_SETTINGS
@given(words)
def test_bit_counts(a):
    bits = format(a, "032b")
    assert evaluate(Opcode.CLZ, a) == len(bits) - len(bits.lstrip("0"))
    assert evaluate(Opcode.CTZ, a) == len(bits) - len(bits.rstrip("0"))
    assert evaluate(Opcode.POPCNT, a) == bits.count("1")


# (store, zero-extending load, sign-extending load, width in bytes)
WIDTHS = [
    (Opcode.I32_STORE8, Opcode.I32_LOAD8_U, Opcode.I32_LOAD8_S, 1),
    (Opcode.I32_STORE16, Opcode.I32_LOAD16_U, Opcode.I32_LOAD16_S, 2),
    (Opcode.I32_STORE, Opcode.I32_LOAD, Opcode.I32_LOAD, 4),
]
MEMORY_SIZE = 256


@PROPERTY_SETTINGS
@given(st.sampled_from(WIDTHS), st.integers(0, MEMORY_SIZE), st.integers(0, 8), words)
def test_store_then_load_round_trip(width, address, offset, value):
    store, load_unsigned, load_signed, size = width
    assume(address + offset + size <= MEMORY_SIZE)
    bits = 8 * size
    low = value & ((1 << bits) - 1)
    for load, expected in [
        (load_unsigned, low),
        (load_signed, (low - (1 << bits) if low >> (bits - 1) else low) & WORD_MASK),
    ]:
        instructions = [
            Instruction(Opcode.PUSH, address),
            Instruction(Opcode.PUSH, value),
            Instruction(store, offset),
            Instruction(Opcode.PUSH, address),
            Instruction(load, offset),
            Instruction(Opcode.HALT),
        ]
        outcome = run_program(Program(instructions, memory_size=MEMORY_SIZE))
        assert outcome.result & WORD_MASK == expected, load.mnemonic


@PROPERTY_SETTINGS
@given(st.sampled_from(WIDTHS), st.integers(MEMORY_SIZE - 4, MEMORY_SIZE + 4), words)
def test_access_past_end_traps(width, address, value):
    store, load, _, size = width
    in_bounds = address + size <= MEMORY_SIZE
    for program in [
        [Instruction(Opcode.PUSH, address), Instruction(load, 0), Instruction(Opcode.HALT)],
        [Instruction(Opcode.PUSH, address), Instruction(Opcode.PUSH, value),
         Instruction(store, 0), Instruction(Opcode.HALT)],
    ]:  # fmt: skip
        outcome = run_program(Program(program, memory_size=MEMORY_SIZE))
        assert (outcome.status is Status.HALTED) == in_bounds


def _stack_effect_program(opcode: Opcode, operands: list[int]) -> tuple[list[Instruction], int]:
    """Return a program that runs `opcode` once on `operands`, and the address to halt at."""
    instructions = [Instruction(Opcode.PUSH, value) for value in operands]
    kind = OPCODES[opcode].immediate
    if opcode is Opcode.RETURN:
        call_at = len(instructions)
        instructions += [Instruction(Opcode.CALL, call_at + 2), Instruction(Opcode.HALT)]
        instructions += [Instruction(Opcode.RETURN)]
        return instructions, call_at + 1
    halt_at = len(instructions) + 1
    immediate = halt_at if kind is Immediate.TARGET else 0
    instructions += [Instruction(opcode, immediate), Instruction(Opcode.HALT)]
    return instructions, halt_at


@PROPERTY_SETTINGS
@given(st.sampled_from(list(Opcode)), st.data())
def test_stack_effect_matches_isa_table(opcode, data):
    info = OPCODES[opcode]
    # Small positive operands are valid divisors, in-bounds addresses and conditions.
    extra = data.draw(st.integers(0, 3))
    operands = data.draw(st.lists(st.integers(1, 100), min_size=info.pops + extra,
                                  max_size=info.pops + extra))  # fmt: skip
    instructions, _ = _stack_effect_program(opcode, operands)
    depths: list[int] = []
    run_program(Program(instructions), trace=lambda line: depths.append(_depth(line)))
    executed_at = len(operands) if opcode is not Opcode.RETURN else len(operands) + 1
    depth_after = depths[executed_at]
    assert depth_after == len(operands) - info.pops + info.pushes


def _depth(trace_line: str) -> int:
    fields = dict(item.split("=", 1) for item in trace_line.split())
    return int(fields["depth"])


simple_opcodes = st.sampled_from([op for op in Opcode if op is not Opcode.HALT])


@st.composite
def random_programs(draw) -> Program:
    count = draw(st.integers(1, 40))
    instructions = []
    for _ in range(count):
        opcode = draw(simple_opcodes)
        kind = OPCODES[opcode].immediate
        if kind is Immediate.TARGET:
            immediate = draw(st.integers(0, count))
        elif kind is Immediate.LOCAL:
            immediate = draw(st.integers(0, 3))
        elif kind is Immediate.NONE:
            immediate = 0
        else:
            immediate = draw(st.one_of(st.integers(0, 70), words))
        instructions.append(Instruction(opcode, immediate))
    instructions.append(Instruction(Opcode.HALT))
    return Program(instructions, memory_size=64)


@PROPERTY_SETTINGS
@given(random_programs(), st.binary(max_size=4))
def test_traced_run_equals_fast_run(program, stdin):
    lines: list[str] = []
    fast = run_program(program, stdin=stdin, max_steps=500)
    traced = run_program(program, stdin=stdin, max_steps=500, trace=lines.append)
    assert traced == fast
    assert len(lines) == fast.steps


@PROPERTY_SETTINGS
@given(random_programs(), st.integers(0, 60))
def test_step_limit_is_a_prefix(program, limit):
    full = run_program(program, max_steps=500)
    limited = run_program(program, max_steps=limit)
    if full.steps + (full.status is not Status.HALTED) <= limit:
        assert limited == full
    else:
        assert limited.status is Status.STEP_LIMIT
        assert limited.steps == limit
