"""The PyTorch runtime: run a weight file's model one decoding step per instruction.

The decode loop only embeds tokens, runs the layers with the stored weights, takes
argmaxes, appends to the KV caches, copies output bytes and stops on a token whose kind
is not RUN. It knows nothing about opcodes: `tlc.model.tokens.TokenDecoder` turns the
tokens into the trace and the result.

Attention is hard-max: each head scores every cached key, and among the best scores the
latest position wins. A cache keeps one entry per distinct key (exact eviction,
docs/model.md section 1): a new entry whose key equals a cached one replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tlc.model import tokens as tk
from tlc.model.weights import load_weights, model_tensors, universal_model, uncovered_opcodes
from tlc.runtime.machine import Program, RunResult, Status

logger = logging.getLogger("tlc.runtime")

DTYPE = torch.float64
INITIAL_CACHE_SLOTS = 64


def is_available() -> bool:
    return True


class SparseMatrix(torch.nn.Module):
    """y = W x for a stored sparse W, as a gather, a multiply and an index_add."""

    def __init__(self, tensors: dict, shapes: dict, name: str):
        super().__init__()
        rows, cols = shapes[name]
        self.rows_count = rows
        self.register_buffer("row", torch.from_numpy(np.asarray(tensors[f"{name}.rows"])))
        self.register_buffer("col", torch.from_numpy(np.asarray(tensors[f"{name}.cols"])))
        self.register_buffer("value", torch.from_numpy(np.asarray(tensors[f"{name}.values"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.rows_count, dtype=DTYPE)
        return out.index_add_(0, self.row, self.value * x[self.col])


def _vector(tensors: dict, name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(tensors[name], dtype=np.float64))


class Head(torch.nn.Module):
    """A hard-max head with its KV cache."""

    def __init__(self, tensors, shapes, prefix: str):
        super().__init__()
        self.wq = SparseMatrix(tensors, shapes, f"{prefix}.wq")
        self.wk = SparseMatrix(tensors, shapes, f"{prefix}.wk")
        self.wv = SparseMatrix(tensors, shapes, f"{prefix}.wv")
        self.wo = SparseMatrix(tensors, shapes, f"{prefix}.wo")
        self.register_buffer("bq", _vector(tensors, f"{prefix}.bq"))
        self.register_buffer("bk", _vector(tensors, f"{prefix}.bk"))
        self.register_buffer("bv", _vector(tensors, f"{prefix}.bv"))
        self.reset()

    def reset(self) -> None:
        self.keys = torch.zeros((INITIAL_CACHE_SLOTS, len(self.bk)), dtype=DTYPE)
        self.values = torch.zeros((INITIAL_CACHE_SLOTS, len(self.bv)), dtype=DTYPE)
        self.positions = torch.zeros(INITIAL_CACHE_SLOTS, dtype=torch.int64)
        self.size = 0
        self.slot_of_key: dict[bytes, int] = {}

    def _append(self, key: torch.Tensor, value: torch.Tensor, position: int) -> None:
        """Store (key, value); a cached entry with an equal key is replaced (evicted)."""
        identity = key.numpy().tobytes()
        slot = self.slot_of_key.get(identity)
        if slot is None:
            if self.size == len(self.keys):
                grow = len(self.keys)
                self.keys = torch.cat([self.keys, torch.zeros_like(self.keys[:grow])])
                self.values = torch.cat([self.values, torch.zeros_like(self.values[:grow])])
                self.positions = torch.cat([self.positions, torch.zeros_like(self.positions)])
            slot = self.size
            self.size += 1
            self.slot_of_key[identity] = slot
            self.keys[slot] = key
        self.values[slot] = value
        self.positions[slot] = position

    def forward(self, x: torch.Tensor, position: int) -> torch.Tensor:
        self._append(self.wk(x) + self.bk, self.wv(x) + self.bv, position)
        query = self.wq(x) + self.bq
        scores = self.keys[: self.size] @ query
        best = scores == scores.max()
        # Among the best scores the latest position wins.
        latest = torch.where(best, self.positions[: self.size], -1).argmax()
        return self.wo(self.values[latest])


class FeedForward(torch.nn.Module):
    def __init__(self, tensors, shapes, prefix: str):
        super().__init__()
        self.w1 = SparseMatrix(tensors, shapes, f"{prefix}.w1")
        self.w2 = SparseMatrix(tensors, shapes, f"{prefix}.w2")
        self.register_buffer("b1", _vector(tensors, f"{prefix}.b1"))
        self.register_buffer("b2", _vector(tensors, f"{prefix}.b2"))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(y) + self.b1)) + self.b2


class Layer(torch.nn.Module):
    def __init__(self, tensors, shapes, index: int, description: dict):
        super().__init__()
        prefix = f"layers.{index}"
        self.heads = torch.nn.ModuleList(
            Head(tensors, shapes, f"{prefix}.heads.{h}") for h in range(len(description["heads"]))
        )
        self.shared = None
        if f"{prefix}.shared.b1" in tensors:
            self.shared = FeedForward(tensors, shapes, f"{prefix}.shared")
        self.router = None
        self.experts = torch.nn.ModuleList()
        if f"{prefix}.router.b" in tensors:
            self.router = SparseMatrix(tensors, shapes, f"{prefix}.router.w")
            self.register_buffer("router_bias", _vector(tensors, f"{prefix}.router.b"))
            self.experts = torch.nn.ModuleList(
                FeedForward(tensors, shapes, f"{prefix}.experts.{e}")
                for e in range(len(description["experts"]))
            )

    def forward(self, x: torch.Tensor, position: int) -> torch.Tensor:
        for head in self.heads:
            x = x + head(x, position)
        y = x
        if self.shared is not None:
            x = x + self.shared(y)
        if self.router is not None:
            # torch.argmax returns the first maximal index: ties go to the lowest expert.
            expert = int(torch.argmax(self.router(y) + self.router_bias))
            x = x + self.experts[expert](y)
        return x


class TorchModel(torch.nn.Module):
    """The model of a weight file: embedding, layers, unembedding with per-field argmax."""

    def __init__(self, tensors: dict[str, np.ndarray], metadata: dict):
        super().__init__()
        shapes = metadata["shapes"]
        self.metadata = metadata
        self.width = int(metadata["D"])
        vocabs = [int(entry["vocab"]) for entry in metadata["fields"]]
        offsets = np.concatenate([[0], np.cumsum(vocabs)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets))
        self.register_buffer("embedding", self._stack(tensors, shapes, "embed", vocabs))
        self.register_buffer("unembedding", self._stack(tensors, shapes, "unembed", vocabs))
        bias = np.concatenate([tensors[f"unembed.{f}.bias"] for f in range(len(vocabs))])
        self.register_buffer("unembedding_bias", torch.from_numpy(bias.astype(np.float64)))
        self.groups = self._vocab_groups(vocabs, offsets)
        self.layers = torch.nn.ModuleList(
            Layer(tensors, shapes, index, description)
            for index, description in enumerate(metadata["layers"])
        )
        self.position = 0

    def _stack(self, tensors, shapes, prefix: str, vocabs: list[int]) -> torch.Tensor:
        """Concatenate the per-field (V_f, D) matrices into one dense table."""
        rows = []
        for f, vocab in enumerate(vocabs):
            table = np.zeros((vocab, self.width))
            name = f"{prefix}.{f}"
            np.add.at(table, (tensors[f"{name}.rows"], tensors[f"{name}.cols"]),
                      tensors[f"{name}.values"])  # fmt: skip
            rows.append(table)
        return torch.from_numpy(np.concatenate(rows))

    @staticmethod
    def _vocab_groups(vocabs, offsets):
        """For each vocabulary size: (field indices, logit index matrix (n, vocab))."""
        groups = []
        for vocab in sorted(set(vocabs)):
            fields = [f for f, v in enumerate(vocabs) if v == vocab]
            index = torch.tensor([[offsets[f] + j for j in range(vocab)] for f in fields])
            groups.append((torch.tensor(fields), index))
        return groups

    def reset(self) -> None:
        self.position = 0
        for layer in self.layers:
            for head in layer.heads:
                head.reset()

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Run one token through the model and return the next token (F,) int64."""
        x = self.embedding[self.offsets + token].sum(dim=0)
        for layer in self.layers:
            x = layer(x, self.position)
        self.position += 1
        logits = self.unembedding @ x + self.unembedding_bias
        token_out = torch.empty(len(self.offsets), dtype=torch.int64)
        for fields, index in self.groups:
            token_out[fields] = logits[index].argmax(dim=1)
        return token_out


_MODELS: dict[str, TorchModel] = {}


def load_model(weights: str | Path | None = None) -> TorchModel:
    """Return the TorchModel of a weight file, or of the universal weights (cached)."""
    key = str(weights) if weights is not None else "<universal>"
    if key not in _MODELS:
        if weights is None:
            tensors, shapes = model_tensors(universal_model())
            metadata = dict(universal_model().metadata, shapes=shapes)
        else:
            tensors, metadata = load_weights(weights)
        _MODELS[key] = TorchModel(tensors, metadata)
    return _MODELS[key]


def run_program(
    program: Program,
    *,
    stdin: bytes = b"",
    max_steps: int | None = None,
    trace: Callable[[str], None] | None = None,
    write_output: Callable[[bytes], None] | None = None,
    weights: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run `program` inside the model until HALT, a trap or `max_steps` instructions.

    Raises ValueError when the model does not compute an opcode that the program uses.
    """
    model = load_model(weights)
    metadata = model.metadata
    if max_steps is not None and max_steps <= 0:
        return RunResult(Status.STEP_LIMIT, 0, tokens=0)
    missing = uncovered_opcodes(metadata, program)
    if missing:
        raise ValueError(f"the model does not compute {', '.join(missing)} yet; "
                         "run this program with --backend ref")  # fmt: skip
    prompt = torch.from_numpy(tk.encode_prompt(metadata, program, stdin))
    decoder = tk.TokenDecoder(metadata, program, max_steps=max_steps, trace=trace,
                              write_output=write_output)  # fmt: skip
    model.reset()
    for token in prompt[:-1]:
        model.step(token)
    token = model.step(prompt[-1])
    while decoder.feed(token.numpy()):
        if progress is not None and decoder.steps % 1024 == 0:
            progress(decoder.steps)
        token = model.step(token)
    return decoder.result
