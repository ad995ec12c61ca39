"""ALU circuits against the WebAssembly i32 semantics, with exactness checks.

Each circuit is built once into its own Layout and run through `evaluate_blocks` on a
batch of residual rows (one operand pair per row). Results must equal the independent
oracle in alu_oracle, every output dim must be exactly 0.0 or 1.0, and interval
arithmetic over the Layout domains must keep every pre-activation below 2^53.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from alu_oracle import (
    EDGE_VALUES,
    EXACT_LIMIT,
    MASK,
    Harness,
    bit_matrix,
    expected,
    integers,
    pre_activation_bounds,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.model.alu import CIRCUITS, division_traps, gate_blocks
from tlc.model.circuit import evaluate_blocks

MNEMONICS = ("ADD SUB MUL DIV_S DIV_U REM_S REM_U EQZ EQ NE LT_S LT_U GT_S GT_U LE_S LE_U "
             "GE_S GE_U AND OR XOR SHL SHR_S SHR_U ROTL ROTR CLZ CTZ POPCNT ABS NEG").split()
# Shift counts 0, 31, 32, 33 and their neighbours, plus values whose low 5 bits wrap.
SHIFT_COUNTS = (0, 1, 31, 32, 33, 63, 64, 0xFFFFFFE0, 0xFFFFFFFF)


@functools.cache
def built(mnemonic: str) -> Harness:
    circuit = CIRCUITS[mnemonic]
    harness = Harness.empty(circuit.depth)
    circuit.build(harness.blocks, harness.layout, harness.inputs, harness.out, "alu.")
    return harness


def results(mnemonic: str, a_values, b_values) -> np.ndarray:
    harness = built(mnemonic)
    return harness.run(a_values, b_values)[:, list(harness.out)]


def check(mnemonic: str, a_values, b_values) -> None:
    bits = results(mnemonic, a_values, b_values)
    assert np.all((bits == 0.0) | (bits == 1.0)), f"{mnemonic} wrote a bit that is not 0 or 1"
    for a, b, got in zip(a_values, b_values, integers(bits)):
        want = expected(mnemonic, a, b)
        if want is not None:
            assert got == want, f"{mnemonic}({a:#x}, {b:#x}) = {got:#x}, expected {want:#x}"


def test_circuits_cover_every_alu_opcode():
    assert set(CIRCUITS) == set(MNEMONICS)


@pytest.mark.parametrize("mnemonic", MNEMONICS)
def test_edge_operands(mnemonic):
    values = sorted(set(EDGE_VALUES) | set(SHIFT_COUNTS))
    pairs = [(a, b) for a in values for b in values]
    check(mnemonic, [a for a, _ in pairs], [b for _, b in pairs])


def _word_strategy():
    small = st.integers(0, 300)
    return st.one_of(
        st.sampled_from(EDGE_VALUES),
        st.integers(0, MASK),
        small,
        small.map(lambda v: (-v) & MASK),
        st.integers(0, 16).flatmap(lambda k: st.integers(0, (1 << (2 * k)) - 1)),
    )


PAIRS = st.lists(st.tuples(_word_strategy(), _word_strategy()), min_size=1, max_size=20)


@pytest.mark.parametrize("mnemonic", MNEMONICS)
@settings(max_examples=20, deadline=None)
@given(pairs=PAIRS)
def test_random_operands(mnemonic, pairs):
    check(mnemonic, [a for a, _ in pairs], [b for _, b in pairs])


@pytest.mark.parametrize("mnemonic", MNEMONICS)
def test_pre_activations_stay_exact(mnemonic):
    harness = built(mnemonic)
    for index, bound in enumerate(pre_activation_bounds(harness.blocks, harness.layout)):
        assert bound < EXACT_LIMIT, f"{mnemonic} block {index} reaches {bound:.3g}"


@pytest.mark.parametrize("mnemonic", ["MUL", "DIV_S", "DIV_U", "REM_S", "REM_U"])
def test_scratch_stays_in_declared_interval(mnemonic):
    harness = built(mnemonic)
    values = sorted(set(EDGE_VALUES))
    rng = np.random.default_rng(5)
    a_values = values * len(values) + [int(v) for v in rng.integers(0, MASK, 200)]
    b_values = [v for v in values for _ in values] + [int(v) for v in rng.integers(1, 999, 200)]
    x = harness.run(a_values, b_values)
    low = np.array([d[0] for d in harness.layout.domain])
    high = np.array([d[1] for d in harness.layout.domain])
    assert np.all(x >= low), "a scratch dim went below its declared interval"
    assert np.all(x <= high), "a scratch dim went above its declared interval"
    assert np.all(x == np.round(x)), "a residual dim holds a non-integer"


@pytest.mark.parametrize("mnemonic", ["ADD", "MUL", "DIV_U"])
def test_wrong_block_count_rejected(mnemonic):
    circuit = CIRCUITS[mnemonic]
    harness = Harness.empty(circuit.depth + 1)
    with pytest.raises(ValueError, match="blocks"):
        circuit.build(harness.blocks, harness.layout, harness.inputs, harness.out, "x.")


@pytest.mark.parametrize("mnemonic", ["EQZ", "CLZ", "CTZ", "POPCNT", "ABS", "NEG"])
def test_unary_ignores_first_operand(mnemonic):
    b_values = list(EDGE_VALUES)
    first = results(mnemonic, [0] * len(b_values), b_values)
    second = results(mnemonic, [MASK] * len(b_values), b_values)
    assert np.array_equal(first, second)


def test_division_traps():
    harness = Harness.empty(1)
    zero = harness.layout.add("zero", 1)
    overflow = harness.layout.add("overflow", 1)
    division_traps(harness.blocks, harness.layout, harness.inputs, zero, overflow, "t.")
    values = sorted(set(EDGE_VALUES))
    a_values = [a for a in values for _ in values]
    b_values = [b for _ in values for b in values]
    x = harness.run(a_values, b_values)
    for row, a, b in zip(x, a_values, b_values):
        assert row[zero[0]] == float(b == 0), f"zero flag for b = {b:#x}"
        assert row[overflow[0]] == float(a == 0x80000000 and b == MASK), f"({a:#x}, {b:#x})"


def test_trap_flags_stay_exact():
    harness = Harness.empty(1)
    zero = harness.layout.add("zero", 1)
    overflow = harness.layout.add("overflow", 1)
    division_traps(harness.blocks, harness.layout, harness.inputs, zero, overflow, "t.")
    assert pre_activation_bounds(harness.blocks, harness.layout)[0] < EXACT_LIMIT



def test_check_detects_a_corrupted_neuron():
    circuit = CIRCUITS["MUL"]
    harness = Harness.empty(circuit.depth)
    circuit.build(harness.blocks, harness.layout, harness.inputs, harness.out, "alu.")
    first_step = harness.blocks[1].neurons[0]  # the step [P_0 >= 1] of product bit 0
    first_step.outputs = {dim: -weight for dim, weight in first_step.outputs.items()}
    bits = harness.run([0x12345678, MASK, 0xDEADBEEF], [0x9ABCDEF1, MASK, 3])[:, list(harness.out)]
    wrong = [
        got != expected("MUL", a, b)
        for a, b, got in zip([0x12345678, MASK, 0xDEADBEEF], [0x9ABCDEF1, MASK, 3], integers(bits))
    ]
    assert any(wrong)


@pytest.mark.parametrize("mnemonic", ["NE", "NEG", "SHR_S", "MUL", "DIV_S", "REM_U"])
def test_gated_circuit_follows_gate(mnemonic):
    circuit = CIRCUITS[mnemonic]
    harness = Harness.empty(circuit.depth)
    gate = harness.layout.add("gate", 1)[0]
    circuit.build(harness.blocks, harness.layout, harness.inputs, harness.out, "alu.")
    gate_blocks(harness.blocks, harness.layout, gate)
    values = sorted(set(EDGE_VALUES))
    a_values = [a for a in values for _ in values]
    b_values = [b for _ in values for b in values]
    for gate_value in (0.0, 1.0):
        x = np.zeros((len(a_values), harness.layout.width))
        x[:, list(harness.inputs["a"])] = bit_matrix(a_values)
        x[:, list(harness.inputs["b"])] = bit_matrix(b_values)
        x[:, gate] = gate_value
        y = evaluate_blocks(harness.blocks, x)
        changed = y - x
        if gate_value == 0.0:
            assert not np.any(changed), f"gated-off {mnemonic} changed the residual"
            continue
        bits = y[:, list(harness.out)]
        for a, b, got in zip(a_values, b_values, integers(bits)):
            want = expected(mnemonic, a, b)
            if want is not None:
                assert got == want, f"gated {mnemonic}({a:#x}, {b:#x}) = {got:#x}"
    bounds = pre_activation_bounds(harness.blocks, harness.layout)
    assert max(bounds) < EXACT_LIMIT
