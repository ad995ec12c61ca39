"""Bit circuits of model/wiring.py evaluated exhaustively on small widths, and the
certificate's interval bounds checked against sampled evaluations."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.model.certificate import Interval, _feed_forward_delta
from tlc.model.circuit import Block, Layout, bits_of, evaluate_blocks, value_of
from tlc.model.network import FeedForward
from tlc.model.wiring import (
    add_bits,
    all_of,
    at_least_zero,
    bit,
    change_bits,
    equals_zero,
    not_bit,
    number,
)

WIDTH = 4


def _layout():
    layout = Layout()
    a = layout.add("a", WIDTH)
    b = layout.add("b", WIDTH)
    value = layout.add("value", WIDTH + 1, -4.0, 4.0)
    delta = layout.add("delta", WIDTH + 1, -4.0, 4.0)
    flag = layout.add("flag", 1, -4.0, 4.0)
    return layout, a, b, value, delta, flag


def _input(layout, vectors: dict) -> np.ndarray:
    x = np.zeros(layout.width)
    for vec, number_value in vectors.items():
        for dim, bit_value in zip(vec, bits_of(number_value, len(vec))):
            x[dim] = bit_value
    return x


def test_add_bits_two_operands_and_constant():
    layout, a, b, value, delta, _ = _layout()
    for constant in (0, 1, 5, 15):
        block = Block("add")
        add_bits(block, [[bit(d) for d in a], [bit(d) for d in b]], constant, width=WIDTH,
                 value_dims=list(value[:WIDTH]), delta_dims=list(delta[:WIDTH]))  # fmt: skip
        for x_value, y_value in itertools.product(range(16), repeat=2):
            out = evaluate_blocks([block], _input(layout, {a: x_value, b: y_value}))
            expected = (x_value + y_value + constant) % 16
            assert value_of(out[list(value[:WIDTH])]) == expected
            changes = [out[d] for d in delta[:WIDTH]]
            assert changes == [e - x for e, x in zip(bits_of(expected, WIDTH),
                                                     bits_of(x_value, WIDTH))]  # fmt: skip


def test_add_bits_high_bits_only():
    layout, a, b, value, _, _ = _layout()
    block = Block("high")
    add_bits(block, [[bit(d) for d in a], [bit(d) for d in b]], 3, width=WIDTH + 2,
             value_dims=list(value[:3]), first_bit=2)  # fmt: skip
    for x_value, y_value in itertools.product(range(16), repeat=2):
        out = evaluate_blocks([block], _input(layout, {a: x_value, b: y_value}))
        assert value_of(out[list(value[:3])]) == ((x_value + y_value + 3) >> 2) & 7


def test_subtraction_by_complement():
    layout, a, b, value, _, _ = _layout()
    block = Block("sub")
    add_bits(block, [[bit(d) for d in a], [not_bit(d) for d in b]], 1, width=WIDTH,
             value_dims=list(value[:WIDTH]))  # fmt: skip
    for x_value, y_value in itertools.product(range(16), repeat=2):
        out = evaluate_blocks([block], _input(layout, {a: x_value, b: y_value}))
        assert value_of(out[list(value[:WIDTH])]) == (x_value - y_value) % 16


def test_steps_and_equality():
    layout, a, b, value, _, flag = _layout()
    for threshold in range(-1, 17):
        step_block = Block("step")
        at_least_zero(step_block, number(a) - float(threshold), flag[0])
        equal_block = Block("equal")
        equals_zero(equal_block, number(a) - number(b), value[0])
        for x_value, y_value in itertools.product(range(16), repeat=2):
            x = _input(layout, {a: x_value, b: y_value})
            assert evaluate_blocks([step_block], x)[flag[0]] == float(x_value >= threshold)
            assert evaluate_blocks([equal_block], x)[value[0]] == float(x_value == y_value)


def test_all_of_and_gated_change():
    layout, a, b, value, delta, flag = _layout()
    block = Block("gated")
    all_of(block, [bit(a[0]), not_bit(a[1]), bit(b[0])], flag[0])
    change_bits(block, [bit(d) for d in a], [bit(d) for d in b], list(delta[:WIDTH]),
                gate=bit(b[3]))  # fmt: skip
    for x_value, y_value in itertools.product(range(16), repeat=2):
        out = evaluate_blocks([block], _input(layout, {a: x_value, b: y_value}))
        x_bits, y_bits = bits_of(x_value, WIDTH), bits_of(y_value, WIDTH)
        assert out[flag[0]] == float(x_bits[0] and not x_bits[1] and y_bits[0])
        expected = [(y - x) if y_bits[3] else 0 for x, y in zip(x_bits, y_bits)]
        assert [out[d] for d in delta[:WIDTH]] == expected


@st.composite
def random_blocks(draw):
    """A block with a few input rows shared by several neurons (as steps share them)."""
    width = 6
    block = Block("random")
    for _ in range(draw(st.integers(1, 4))):
        row = {d: float(draw(st.integers(-3, 3))) for d in range(width)}
        for _ in range(draw(st.integers(1, 4))):
            outputs = {draw(st.integers(0, width - 1)): float(draw(st.integers(-4, 4)))}
            block.neuron(row, float(draw(st.integers(-5, 5))), outputs)
    low = [float(draw(st.integers(-4, 0))) for _ in range(width)]
    high = [lo + float(draw(st.integers(0, 5))) for lo in low]
    return block, np.array(low), np.array(high)


@settings(max_examples=60, deadline=None)
@given(random_blocks(), st.data())
def test_certificate_bounds_contain_every_value(case, data):
    block, low, high = case
    width = len(low)
    feed_forward = FeedForward.from_block(block, width)
    bound, _ = _feed_forward_delta(feed_forward, Interval(low, high))
    w1, b1, w2, b2 = block.matrices(width)
    for _ in range(20):
        x = np.array([data.draw(st.floats(lo, hi)) for lo, hi in zip(low, high)])
        out = w2 @ np.maximum(w1 @ x + b1, 0.0) + b2
        assert np.all(out >= bound.low - 1e-9)
        assert np.all(out <= bound.high + 1e-9)


def test_certificate_keeps_steps_in_unit_interval():
    layout, a, _, _, _, flag = _layout()
    block = Block("step")
    at_least_zero(block, number(a) * 1000.0 - 7.0, flag[0])
    feed_forward = FeedForward.from_block(block, layout.width)
    low = np.zeros(layout.width)
    high = np.ones(layout.width)
    bound, _ = _feed_forward_delta(feed_forward, Interval(low, high))
    assert bound.low[flag[0]] == 0.0
    assert bound.high[flag[0]] == 1.0
