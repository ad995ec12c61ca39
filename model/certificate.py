"""The exactness certificate: interval bounds on every value the model computes.

Starting from the interval of every token dimension (the residual's declared domain;
scratch dimensions start at 0), the bounds go through each layer in order:

* attention: q, k and v of any position lie in W [lo, hi] + b (one interval per
  component, computed with the positive and negative parts of W); a score is bounded by
  sum |q_i|max |k_i|max; the head adds Wo v to the residual;
* feed-forward: pre-activations W1 y + b1, ReLU, W2 h + b2 for the shared block and for
  every expert, and the residual after the layer is the union over experts (including
  the idle one, which adds 0), since the router picks exactly one;
* router and unembedding logits likewise.

Interval arithmetic over-approximates, so a bound below 2^53 proves that float64 holds
every intermediate integer exactly, on every input the domain allows, for any number of
decoding steps (no value depends on the position). The builder rejects a model whose
bound reaches 2^53.

"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from tlc.model.network import Layer

FLOAT64_EXACT_LIMIT = float(1 << 53)


class CertificateError(ValueError):
    """A value of the model could reach the dtype's exact-integer limit."""


@dataclass
class Interval:
    low: np.ndarray
    high: np.ndarray

    def magnitude(self) -> float:
        if self.low.size == 0:
            return 0.0
        return float(max(np.abs(self.low).max(), np.abs(self.high).max()))


@dataclass
class Certificate:
    """Largest |value| per layer and stage, the bound, and whether every value is below."""

    bound: float = FLOAT64_EXACT_LIMIT
    entries: list[dict] = field(default_factory=list)

    def record(self, layer: int | str, stage: str, magnitude: float) -> None:
        self.entries.append({"layer": layer, "stage": stage, "max_abs": magnitude})

    @property
    def max_abs(self) -> float:
        return max((entry["max_abs"] for entry in self.entries), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_abs < self.bound

    def as_json(self) -> dict:
        return {
            "dtype": "float64",
            "bound": self.bound,
            "max_abs": self.max_abs,
            "passed": self.passed,
            "entries": self.entries,
        }


def affine(matrix: sp.csr_matrix, bias: np.ndarray, x: Interval) -> Interval:
    """Return the interval of matrix @ x + bias over the box x."""
    positive = matrix.maximum(0)
    negative = matrix.minimum(0)
    low = positive @ x.low + negative @ x.high + bias
    high = positive @ x.high + negative @ x.low + bias
    return Interval(np.asarray(low).ravel(), np.asarray(high).ravel())


def _neuron_groups(w1: sp.csr_matrix) -> list[np.ndarray]:
    """Group the neurons whose input rows are equal (they differ only in bias)."""
    groups: dict[tuple[bytes, bytes], list[int]] = {}
    for n in range(w1.shape[0]):
        start, end = w1.indptr[n], w1.indptr[n + 1]
        key = (w1.indices[start:end].tobytes(), w1.data[start:end].tobytes())
        groups.setdefault(key, []).append(n)
    return [np.array(members) for members in groups.values()]


def _group_range(members, biases, x_low, x_high, w2: sp.csc_matrix):
    """Return (dims, low, high): the exact range of the group's contribution
    sum_n W2[d, n] ReLU(x + b_n) to each output dim d for x in [x_low, x_high].

    The contribution is piecewise linear in the one scalar x with breakpoints at -b_n,
    so its extremes lie at the interval's ends or at breakpoints inside it.
    """
    inside = [-b for b in biases if x_low < -b < x_high]
    points = np.array([x_low, x_high, *inside])
    activations = np.maximum(points[None, :] + biases[:, None], 0.0)
    sub = w2[:, members]
    dims = np.unique(sub.indices)
    weights = sub[dims, :].toarray()
    values = weights @ activations
    return dims, values.min(axis=1), values.max(axis=1)


def _feed_forward_delta(block, y: Interval) -> tuple[Interval, float]:
    """Bound W2 ReLU(W1 y + b1) + b2 over the box y, group by group (see `_group_range`),
    which keeps a step [x >= 0] = ReLU(x + 1) - ReLU(x) within [0, 1] where plain interval
    arithmetic would give [-M, M + 1].

    Returns the interval and the largest magnitude among the pre-activations and the sums
    of |W2| ReLU(pre) + |b2| per output, which bound every partial sum of the product.
    """
    pre = affine(block.w1, block.b1, y)
    hidden_max = np.maximum(pre.high, 0.0)
    term_sums = abs(block.w2) @ hidden_max + np.abs(block.b2)
    largest = max(pre.magnitude(), float(term_sums.max(initial=0.0)))
    x_low, x_high = pre.low - block.b1, pre.high - block.b1
    low, high = block.b2.copy(), block.b2.copy()
    w2 = block.w2.tocsc()
    for members in _neuron_groups(block.w1):
        first = members[0]
        dims, group_low, group_high = _group_range(
            members, block.b1[members], x_low[first], x_high[first], w2
        )
        low[dims] += group_low
        high[dims] += group_high
    return Interval(low, high), largest


def _attention(index: int, layer: Layer, x: Interval, certificate: Certificate) -> Interval:
    low, high = x.low.copy(), x.high.copy()
    score_bound = 0.0
    for head in layer.heads:
        q = affine(head.wq, head.bq, x)
        k = affine(head.wk, head.bk, x)
        v = affine(head.wv, head.bv, x)
        q_max = np.maximum(np.abs(q.low), np.abs(q.high))
        k_max = np.maximum(np.abs(k.low), np.abs(k.high))
        score_bound = max(score_bound, float(q_max @ k_max))
        out = affine(head.wo, np.zeros(head.wo.shape[0]), v)
        low += out.low
        high += out.high
        certificate.record(index, f"head {head.name} q/k/v",
                           max(q.magnitude(), k.magnitude(), v.magnitude()))  # fmt: skip
    certificate.record(index, "attention scores", score_bound)
    return Interval(low, high)


def _feed_forward(index: int, layer: Layer, y: Interval, certificate: Certificate):
    low, high = y.low.copy(), y.high.copy()
    if layer.shared is not None:
        delta, pre = _feed_forward_delta(layer.shared, y)
        low += delta.low
        high += delta.high
        certificate.record(index, "shared pre-activations and output terms", pre)
    if layer.experts:
        router = affine(layer.router_w, layer.router_b, y)
        certificate.record(index, "router logits", router.magnitude())
        expert_low = np.zeros_like(low)
        expert_high = np.zeros_like(high)
        largest = 0.0
        for expert in layer.experts:
            delta, pre = _feed_forward_delta(expert, y)
            expert_low = np.minimum(expert_low, delta.low)
            expert_high = np.maximum(expert_high, delta.high)
            largest = max(largest, pre)
        certificate.record(index, "expert pre-activations and output terms", largest)
        low += expert_low
        high += expert_high
    return Interval(low, high)


def certify(domain: list[tuple[float, float]], token_width: int, layers: list[Layer],
            unembed: list[np.ndarray], unembed_bias: list[np.ndarray]) -> Certificate:
    """Propagate intervals through the model and return the certificate."""
    certificate = Certificate()
    width = len(domain)
    low = np.zeros(width)
    high = np.zeros(width)
    for dim in range(token_width):
        low[dim], high[dim] = domain[dim]
    x = Interval(low, high)
    certificate.record("embedding", "residual", x.magnitude())
    for index, layer in enumerate(layers):
        x = _attention(index, layer, x, certificate)
        x = _feed_forward(index, layer, x, certificate)
        certificate.record(index, "residual", x.magnitude())
    largest = 0.0
    for matrix, bias in zip(unembed, unembed_bias):
        logits = affine(sp.csr_matrix(matrix), bias, x)
        largest = max(largest, logits.magnitude())
    certificate.record("unembedding", "logits", largest)
    return certificate
