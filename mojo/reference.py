"""A plain numpy implementation of the model of docs/model.md section 1.

This is the oracle that the Mojo runtime is tested against, so it favours being
obviously right over being fast. Attention keeps every position (no eviction, no hash
index) and takes the brute-force argmax, the latest position winning ties. Matrix
products go through coordinate-form matrices, and every field takes the lowest index
among its maximal logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlc.mojo.weights import FeedForward, Head, ModelWeights, load_weights


class _HeadCache:
    """Every (key, value) pair a head has seen, in position order."""

    def __init__(self, head: Head):
        self.keys = np.zeros((0, len(head.bk)), dtype=np.float64)
        self.values = np.zeros((0, len(head.bv)), dtype=np.float64)

    def append(self, key: np.ndarray, value: np.ndarray) -> None:
        self.keys = np.vstack([self.keys, key])
        self.values = np.vstack([self.values, value])

    def attend(self, query: np.ndarray) -> np.ndarray:
        """Return the value of the position with the largest q . k, the latest on ties."""
        scores = self.keys @ query
        winner = np.flatnonzero(scores == scores.max())[-1]
        return self.values[winner]


class ReferenceModel:
    """Runs tokens through the layers one position at a time, filling the caches."""

    def __init__(self, weights: ModelWeights):
        self.weights = weights
        self.caches = [[_HeadCache(head) for head in layer.heads] for layer in weights.layers]
        self.embed_tables = [matrix.to_dense() for matrix in weights.embed]

    def step(self, token) -> tuple[int, ...]:
        """Run one token through the model and return the argmax token it predicts."""
        weights = self.weights
        x = np.zeros(weights.width, dtype=np.float64)
        for table, value in zip(self.embed_tables, token, strict=True):
            x += table[int(value)]
        for layer, caches in zip(weights.layers, self.caches, strict=True):
            x = self._attention(layer.heads, caches, x)
            x = self._feed_forward(layer, x)
        return tuple(
            _first_argmax(matrix.matvec(x) + bias)
            for matrix, bias in zip(weights.unembed, weights.unembed_bias, strict=True)
        )

    @staticmethod
    def _attention(heads, caches, x: np.ndarray) -> np.ndarray:
        update = np.zeros_like(x)
        for head, cache in zip(heads, caches, strict=True):
            cache.append(head.wk.matvec(x) + head.bk, head.wv.matvec(x) + head.bv)
            value = cache.attend(head.wq.matvec(x) + head.bq)
            update += head.wo.matvec(value)
        return x + update

    @staticmethod
    def _feed_forward(layer, y: np.ndarray) -> np.ndarray:
        x = y.copy()
        if layer.shared is not None:
            x += _block(layer.shared, y)
        if layer.experts:
            expert = _first_argmax(layer.router_w.matvec(y) + layer.router_b)
            x += _block(layer.experts[expert], y)
        return x


def _block(block: FeedForward, y: np.ndarray) -> np.ndarray:
    """Return W2 ReLU(W1 y + b1) + b2."""
    hidden = np.maximum(block.w1.matvec(y) + block.b1, 0.0)
    return block.w2.matvec(hidden) + block.b2


def _first_argmax(logits: np.ndarray) -> int:
    """Return the lowest index among the maximal entries (np.argmax does exactly that)."""
    return int(np.argmax(logits))


def output_byte(weights: ModelWeights, token) -> int | None:
    """Return the byte a generated token writes to stdout, or None when it writes none."""
    if weights.out_valid_field is None or token[weights.out_valid_field] != 1:
        return None
    return sum(weight * int(token[f]) for f, weight in weights.out_byte_terms) & 0xFF


@dataclass
class ReferenceRun:
    """The generated tokens (n, F), their output bytes, and the model with its caches."""

    tokens: np.ndarray
    output: bytes
    model: ReferenceModel


def run_reference(weights: ModelWeights | str | Path, prompt, max_tokens: int) -> ReferenceRun:
    """Decode from `prompt` until a token whose kind is not RUN, or `max_tokens` tokens.

    The generated tokens include the stopping token. Every generated token but the last
    is fed back, so the caches hold the prompt and the fed-back tokens.
    """
    if not isinstance(weights, ModelWeights):
        weights = load_weights(weights)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or len(prompt) == 0 or prompt.shape[1] != len(weights.fields):
        raise ValueError(f"prompt must be a non-empty (P, {len(weights.fields)}) array")
    model = ReferenceModel(weights)
    for token in prompt[:-1]:
        model.step(token)
    generated: list[tuple[int, ...]] = []
    output = bytearray()
    token = tuple(int(v) for v in prompt[-1])
    while len(generated) < max_tokens:
        token = model.step(token)
        generated.append(token)
        byte = output_byte(weights, token)
        if byte is not None:
            output.append(byte)
        if token[weights.kind_field] != weights.run_value:
            break
    tokens = np.array(generated, dtype=np.int64).reshape(-1, len(weights.fields))
    return ReferenceRun(tokens, bytes(output), model)


def run_tokens(
    weights: ModelWeights | str | Path, prompt, max_tokens: int
) -> tuple[np.ndarray, bytes]:
    """Return (generated tokens, output bytes) of `run_reference`."""
    run = run_reference(weights, prompt, max_tokens)
    return run.tokens, run.output
