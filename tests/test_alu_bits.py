"""The one-layer adders of model/alu_bits against Python integer arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from alu_oracle import EXACT_LIMIT, bit_matrix, integers, pre_activation_bounds
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.model.alu_bits import (
    add_bits,
    add_signed_small,
    decrement_bits,
    increment_bits,
    subtract_bits,
)
from tlc.model.circuit import Block, Layout, evaluate_blocks

WIDTHS = (1, 5, 11, 32)


class Bench:
    """A layout with n-bit operands a, b, a carry bit, a 4-dim one-hot and outputs."""

    def __init__(self, n: int):
        self.n = n
        self.layout = Layout()
        self.a = self.layout.add("a", n)
        self.b = self.layout.add("b", n)
        self.carry = self.layout.add("carry", 1)
        self.one_hot = self.layout.add("one_hot", 4)
        self.out = self.layout.add("out", n)
        self.wide = self.layout.add("wide", n + 1)
        self.block = Block("bits")

    def run(self, a: int, b: int = 0, carry: int = 0, hot: int | None = None) -> np.ndarray:
        x = np.zeros((1, self.layout.width))
        x[:, list(self.a)] = bit_matrix([a], self.n)
        x[:, list(self.b)] = bit_matrix([b], self.n)
        x[0, self.carry[0]] = carry
        if hot is not None:
            x[0, self.one_hot[hot]] = 1.0
        return evaluate_blocks([self.block], x)

    def value(self, x: np.ndarray, vec) -> int:
        bits = x[:, list(vec)]
        assert np.all((bits == 0.0) | (bits == 1.0)), "an output bit is not 0 or 1"
        return integers(bits)[0]

    def exact(self) -> bool:
        return max(pre_activation_bounds([self.block], self.layout)) < EXACT_LIMIT


def operands(draw, n):
    return draw(st.integers(0, (1 << n) - 1)), draw(st.integers(0, (1 << n) - 1))


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("keep_carry", [False, True])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_add_bits_of_dims(n, keep_carry, data):
    a, b = operands(data.draw, n)
    carry = data.draw(st.integers(0, 1))
    bench = Bench(n)
    out = bench.wide if keep_carry else bench.out
    add_bits(bench.block, bench.a, bench.b, out, carry_dim=bench.carry[0])
    modulus = 1 << len(out)
    assert bench.value(bench.run(a, b, carry), out) == (a + b + carry) % modulus
    assert bench.exact()


@pytest.mark.parametrize("n", WIDTHS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_add_bits_of_constant(n, data):
    a = data.draw(st.integers(0, (1 << n) - 1))
    constant = data.draw(st.integers(-(1 << n), (1 << n) - 1))
    carry_in = data.draw(st.integers(0, 1))
    bench = Bench(n)
    add_bits(bench.block, bench.a, constant, bench.out, carry_in=carry_in)
    want = (a + constant + carry_in) % (1 << n)
    assert bench.value(bench.run(a), bench.out) == want


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("keep_carry", [False, True])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_subtract_bits(n, keep_carry, data):
    a, b = operands(data.draw, n)
    bench = Bench(n)
    out = bench.wide if keep_carry else bench.out
    subtract_bits(bench.block, bench.a, bench.b, out)
    want = (a - b) % (1 << n) + ((1 << n) if keep_carry and a >= b else 0)
    assert bench.value(bench.run(a, b), out) == want
    assert bench.exact()


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("keep_carry", [False, True])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_increment_and_decrement(n, keep_carry, data):
    a = data.draw(st.one_of(st.sampled_from([0, 1, (1 << n) - 1]), st.integers(0, (1 << n) - 1)))
    for function, change in ((increment_bits, 1), (decrement_bits, -1)):
        bench = Bench(n)
        out = bench.wide if keep_carry else bench.out
        function(bench.block, bench.a, out)
        want = (a + change) % (1 << n)
        if keep_carry:
            # the extra bit is the carry out of a + 1, or "no borrow" for a - 1
            want += (1 << n) * int(a + 1 == 1 << n if change == 1 else a != 0)
        assert bench.value(bench.run(a), out) == want, f"{function.__name__}({a})"


DELTAS = (-2, -1, 1, 2)


@pytest.mark.parametrize("n", WIDTHS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_add_signed_small(n, data):
    a = data.draw(st.one_of(st.sampled_from([0, 1, 2, (1 << n) - 1]), st.integers(0, (1 << n) - 1)))
    hot = data.draw(st.one_of(st.none(), st.integers(0, 3)))
    bench = Bench(n)
    weights = {bench.one_hot[i]: float(delta) for i, delta in enumerate(DELTAS)}
    add_signed_small(bench.block, bench.a, weights, bench.out)
    delta = 0 if hot is None else DELTAS[hot]
    assert bench.value(bench.run(a, hot=hot), bench.out) == (a + delta) % (1 << n)
    assert bench.exact()


def test_add_signed_small_rejects_large_delta():
    bench = Bench(8)
    with pytest.raises(ValueError, match="delta"):
        add_signed_small(bench.block, bench.a, {bench.one_hot[0]: 3.0}, bench.out)


def test_add_bits_rejects_output_width():
    bench = Bench(8)
    with pytest.raises(ValueError, match="output"):
        add_bits(bench.block, bench.a, bench.b, bench.b[:3])
