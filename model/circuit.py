"""Named residual dimensions and ReLU feed-forward blocks built neuron by neuron.

The weight builder never writes a bare residual index: it allocates named vectors in a
`Layout` and wires neurons between them in `Block`s. A block is one feed-forward network
(the shared part of a layer or one expert); a multi-layer circuit is a list of blocks in
consecutive layers. `evaluate_blocks` runs blocks on a numpy vector so circuits can be
tested without a runtime, and `Layout.domain` gives the input interval of every dimension
for the exactness certificate.

Gates used everywhere (x an integer-valued pre-activation):

    [x >= 0]  = ReLU(x + 1) - ReLU(x)                  two neurons
    AND(b_1 .. b_k) of bits = ReLU(b_1 + .. + b_k - (k - 1))      one neuron
    copy of v >= 0 = ReLU(v)                           one neuron
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Vec(Sequence[int]):
    """A named run of residual dimensions, for example the 32 bits of the stack top."""

    name: str
    dims: tuple[int, ...]

    def __getitem__(self, index):  # type: ignore[override]
        return self.dims[index]

    def __len__(self) -> int:
        return len(self.dims)

    def __iter__(self) -> Iterator[int]:
        return iter(self.dims)


@dataclass
class Layout:
    """Allocator of residual dimensions by name, with each dimension's value interval."""

    names: dict[str, Vec] = field(default_factory=dict)
    domain: list[tuple[float, float]] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.domain)

    def add(self, name: str, width: int, low: float = 0.0, high: float = 1.0) -> Vec:
        """Allocate `width` new dimensions named `name`, each holding values in [low, high]."""
        if name in self.names:
            raise ValueError(f"residual vector {name!r} is already allocated")
        if width <= 0:
            raise ValueError(f"residual vector {name!r} needs a positive width, got {width}")
        start = self.width
        vec = Vec(name, tuple(range(start, start + width)))
        self.names[name] = vec
        self.domain.extend([(low, high)] * width)
        self.owner.extend([name] * width)
        return vec

    def __getitem__(self, name: str) -> Vec:
        return self.names[name]


@dataclass
class Neuron:
    """One hidden unit: ReLU(sum of weight * x[dim] + bias), added into output dims."""

    inputs: dict[int, float]
    bias: float
    outputs: dict[int, float]


@dataclass
class Block:
    """A ReLU feed-forward block: out = W2 ReLU(W1 x + b1) + b2, built one neuron at a time."""

    name: str
    neurons: list[Neuron] = field(default_factory=list)
    bias_out: dict[int, float] = field(default_factory=dict)

    def neuron(
        self, inputs: Mapping[int, float], bias: float, outputs: Mapping[int, float]
    ) -> None:
        """Add a hidden unit. Zero weights are dropped so the matrices stay sparse."""
        kept_in = {int(d): float(w) for d, w in inputs.items() if w != 0.0}
        kept_out = {int(d): float(w) for d, w in outputs.items() if w != 0.0}
        if kept_out:
            self.neurons.append(Neuron(kept_in, float(bias), kept_out))

    def constant(self, outputs: Mapping[int, float]) -> None:
        """Add a constant to output dims (the b2 bias)."""
        for dim, value in outputs.items():
            self.bias_out[int(dim)] = self.bias_out.get(int(dim), 0.0) + float(value)

    def step(self, inputs: Mapping[int, float], bias: float, outputs: Mapping[int, float]) -> None:
        """Add [sum w x + bias >= 0] * weight to each output dim (two neurons).

        Exact when the pre-activation takes integer values.
        """
        self.neuron(inputs, bias + 1.0, outputs)
        self.neuron(inputs, bias, {d: -w for d, w in outputs.items()})

    def conjunction(
        self, literals: Sequence[tuple[int, bool]], outputs: Mapping[int, float]
    ) -> None:
        """Add AND of bit literals (dim, positive) to outputs; a negative literal is 1 - x."""
        inputs: dict[int, float] = {}
        bias = -(len(literals) - 1.0)
        for dim, positive in literals:
            if positive:
                inputs[dim] = inputs.get(dim, 0.0) + 1.0
            else:
                inputs[dim] = inputs.get(dim, 0.0) - 1.0
                bias += 1.0
        self.neuron(inputs, bias, outputs)

    def copy(self, source: Sequence[int], target: Sequence[int], scale: float = 1.0) -> None:
        """Add scale * x[source[i]] to target[i] for non-negative sources (one neuron each)."""
        if len(source) != len(target):
            raise ValueError(f"copy needs equal widths, got {len(source)} and {len(target)}")
        for s, t in zip(source, target):
            self.neuron({s: 1.0}, 0.0, {t: scale})

    def matrices(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return dense (W1, b1, W2, b2) for a residual of `width` dims, for tests."""
        hidden = len(self.neurons)
        w1 = np.zeros((hidden, width))
        b1 = np.zeros(hidden)
        w2 = np.zeros((width, hidden))
        b2 = np.zeros(width)
        for row, unit in enumerate(self.neurons):
            for dim, weight in unit.inputs.items():
                w1[row, dim] += weight
            b1[row] = unit.bias
            for dim, weight in unit.outputs.items():
                w2[dim, row] += weight
        for dim, value in self.bias_out.items():
            b2[dim] += value
        return w1, b1, w2, b2


def evaluate_blocks(blocks: Sequence[Block], x: np.ndarray) -> np.ndarray:
    """Apply blocks in order as residual feed-forward layers: x = x + block(x)."""
    x = np.array(x, dtype=np.float64)
    for block in blocks:
        w1, b1, w2, b2 = block.matrices(x.shape[-1])
        x = x + np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    return x


def bits_of(value: int, width: int) -> list[int]:
    """Return the low `width` bits of `value`, least significant first."""
    return [(value >> i) & 1 for i in range(width)]


def value_of(bits: Sequence[float]) -> int:
    """Return the integer whose bits, least significant first, are `bits` (each 0 or 1)."""
    total = 0
    for i, bit in enumerate(bits):
        if bit not in (0.0, 1.0):
            raise ValueError(f"bit {i} is {bit}, not 0 or 1")
        total |= int(bit) << i
    return total
