"""The PyTorch runtime: run a weight file's model one decoding step per instruction.

The decode loop only embeds tokens, runs the layers with the stored weights, takes
argmaxes, appends to the KV caches, copies output bytes and stops on a token whose kind
is not RUN. It contains no opcode semantics: `tlc.model.tokens.TokenDecoder` turns the
tokens into the trace and the result.

Attention is hard-max: each head scores every cached key, and among the best scores the
latest position wins. A cache keeps one entry per distinct key (exact eviction,
docs/model.md section 1): a new entry whose key equals a cached one replaces it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tlc.model import tokens as tk
from tlc.model.weights import load_weights, uncovered_opcodes, universal_weights
from tlc.runtime.machine import Program, RunResult, Status

logger = logging.getLogger("tlc.runtime")

DTYPE = torch.float64
INITIAL_CACHE_SLOTS = 64
PROGRESS_EVERY = 1024  # steps between calls of the progress callback
PREFILL_CHUNK = 2048  # prompt positions per batched pass: (chunk, D) float64 at a time


def is_available() -> bool:
    return True


def sparse_matrix(tensors: dict, shapes: dict, names: list[str], axis: int = 0):
    """Return the stored matrices `names` stacked along `axis` as one torch CSR matrix."""
    import scipy.sparse as sp

    parts = []
    for name in names:
        rows, cols = shapes[name]
        parts.append(sp.csr_matrix(
            (tensors[f"{name}.values"], (tensors[f"{name}.rows"], tensors[f"{name}.cols"])),
            shape=(rows, cols),
        ))  # fmt: skip
    matrix = sp.vstack(parts, format="csr") if axis == 0 else sp.hstack(parts, format="csr")
    matrix.sum_duplicates()
    with warnings.catch_warnings():
        # torch warns that sparse CSR support is in beta; only torch.mv uses it here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(matrix.data.astype(np.float64)),
            size=matrix.shape,
            check_invariants=False,  # scipy built them; checking costs time on every load
        )


def _to_csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns that sparse CSR support is in beta; only torch.mv uses it here.
        warnings.simplefilter("ignore", UserWarning)
        return dense.to_sparse_csr()


def _vector(tensors: dict, name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(tensors[name], dtype=np.float64))


class HeadCache:
    """The KV cache of one hard-max head, one entry per distinct key.

    For an exact-match head (docs/model.md section 1) a query of the form (t, 1) with
    every t_i in {-1, +1} is looked up in the dict: the latest entry with key (t, n),
    else the sentinel (0 .. 0, 2n - 1). Any other query, and every query of other heads,
    scores every cached key; among the best scores the latest position wins.
    """

    def __init__(self, key_width: int, value_width: int, exact_bits: int | None):
        self.keys = np.zeros((INITIAL_CACHE_SLOTS, key_width))
        self.values = np.zeros((INITIAL_CACHE_SLOTS, value_width))
        self.positions = np.zeros(INITIAL_CACHE_SLOTS, dtype=np.int64)
        self.size = 0
        self.slot_of_key: dict[bytes, int] = {}
        self.exact_bits = exact_bits
        if exact_bits is not None:
            sentinel = np.zeros(key_width)
            sentinel[-1] = 2 * exact_bits - 1
            self.sentinel_key = sentinel.tobytes()

    def append(self, key: np.ndarray, value: np.ndarray, position: int) -> None:
        """Store (key, value); a cached entry with an equal key is replaced (evicted)."""
        identity = (key + 0.0).tobytes()  # + 0.0 turns -0.0 into 0.0
        slot = self.slot_of_key.get(identity)
        if slot is None:
            if self.size == len(self.keys):
                self.keys = np.concatenate([self.keys, np.zeros_like(self.keys)])
                self.values = np.concatenate([self.values, np.zeros_like(self.values)])
                self.positions = np.concatenate([self.positions, np.zeros_like(self.positions)])
            slot = self.size
            self.size += 1
            self.slot_of_key[identity] = slot
            self.keys[slot] = key
        self.values[slot] = value
        self.positions[slot] = position

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """Return the value of the winning entry for `query`."""
        if self.exact_bits is not None and _is_exact_query(query):
            key = query.copy()
            key[-1] = self.exact_bits
            slot = self.slot_of_key.get((key + 0.0).tobytes())
            if slot is None:
                slot = self.slot_of_key.get(self.sentinel_key)
            if slot is not None:
                return self.values[slot]
        scores = self.keys[: self.size] @ query
        best = scores == scores.max()
        return self.values[np.argmax(np.where(best, self.positions[: self.size], -1))]


def _is_exact_query(query: np.ndarray) -> bool:
    return query[-1] == 1.0 and bool(np.all(np.abs(query[:-1]) == 1.0))


class Layer(torch.nn.Module):
    """Attention (all heads' q, k, v from one sparse product) and the feed-forward part."""

    def __init__(self, tensors, shapes, index: int, description: dict):
        super().__init__()
        prefix = f"layers.{index}"
        heads = [f"{prefix}.heads.{h}" for h in range(len(description["heads"]))]
        self.head_slices = []
        self.caches: list[HeadCache] = []
        self.head_specs = []
        names, biases, start = [], [], 0
        for head, info in zip(heads, description["heads"]):
            widths = [len(tensors[f"{head}.{b}"]) for b in ("bq", "bk", "bv")]
            names += [f"{head}.wq", f"{head}.wk", f"{head}.wv"]
            biases += [tensors[f"{head}.{b}"] for b in ("bq", "bk", "bv")]
            q, k, v = widths
            self.head_slices.append((start, start + q, start + q + k, start + q + k + v))
            start += q + k + v
            exact = info.get("key_bits") if info.get("lookup") == "exact" else None
            self.head_specs.append((k, v, exact))
        self.has_heads = bool(heads)
        if heads:
            self.qkv = sparse_matrix(tensors, shapes, names)
            self.register_buffer("qkv_bias", torch.from_numpy(np.concatenate(biases)))
            self.wo = sparse_matrix(tensors, shapes, [f"{h}.wo" for h in heads], axis=1)
        self.shared = None
        if f"{prefix}.shared.b1" in tensors:
            self.shared = self._block(tensors, shapes, f"{prefix}.shared")
        self.router = None
        self.experts = []
        if f"{prefix}.router.b" in tensors:
            self.router = sparse_matrix(tensors, shapes, [f"{prefix}.router.w"])
            self.router_bias = _vector(tensors, f"{prefix}.router.b")
            self.experts = [
                self._block(tensors, shapes, f"{prefix}.experts.{e}")
                for e in range(len(description["experts"]))
            ]
        self.reset()

    @staticmethod
    def _block(tensors, shapes, prefix: str):
        return (
            sparse_matrix(tensors, shapes, [f"{prefix}.w1"]),
            _vector(tensors, f"{prefix}.b1"),
            sparse_matrix(tensors, shapes, [f"{prefix}.w2"]),
            _vector(tensors, f"{prefix}.b2"),
        )

    def reset(self) -> None:
        self.caches = [HeadCache(k, v, exact) for k, v, exact in self.head_specs]

    @staticmethod
    def _feed_forward(block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return x + W2 ReLU(W1 y + b1) + b2 (x itself for an empty block)."""
        w1, b1, w2, b2 = block
        if w1.shape[0] == 0:
            return x + b2 if bool(b2.any()) else x
        return x + torch.mv(w2, torch.relu(torch.mv(w1, y) + b1)) + b2

    def forward_many(self, x: torch.Tensor, first_position: int) -> torch.Tensor:
        """Run the layer on the rows of x (P, D), positions first_position + row, in order.

        Equal to calling `forward` row by row: the rows' keys enter the caches in order
        and each row attends over the caches up to itself; the products run batched.
        """
        if self.has_heads:
            qkv = (torch.sparse.mm(self.qkv, x.T).T + self.qkv_bias).numpy()
            values = np.zeros((len(x), self.wo.shape[1]))
            for row in range(len(x)):
                start = 0
                for cache, (q, k, v, end) in zip(self.caches, self.head_slices):
                    cache.append(qkv[row, k:v], qkv[row, v:end], first_position + row)
                    values[row, start : start + end - v] = cache.lookup(qkv[row, q:k])
                    start += end - v
            x = x + torch.sparse.mm(self.wo, torch.from_numpy(values).T).T
        y = x
        if self.shared is not None:
            x = x + self._feed_forward_many(self.shared, y)
        if self.router is not None:
            logits = torch.sparse.mm(self.router, y.T).T + self.router_bias
            # torch.argmax returns the first maximal index: ties go to the lowest expert.
            chosen = torch.argmax(logits, dim=1)
            for expert in torch.unique(chosen).tolist():
                rows = torch.nonzero(chosen == expert).flatten()
                x[rows] = x[rows] + self._feed_forward_many(self.experts[expert], y[rows])
        return x

    @staticmethod
    def _feed_forward_many(block, y: torch.Tensor) -> torch.Tensor:
        """Return W2 ReLU(W1 y + b1) + b2 for every row of y."""
        w1, b1, w2, b2 = block
        if w1.shape[0] == 0:
            return b2.expand(len(y), -1)
        hidden = torch.relu(torch.sparse.mm(w1, y.T).T + b1)
        return torch.sparse.mm(w2, hidden.T).T + b2

    def forward(self, x: torch.Tensor, position: int) -> torch.Tensor:
        if self.has_heads:
            qkv = (torch.mv(self.qkv, x) + self.qkv_bias).numpy()
            values = []
            for cache, (q, k, v, end) in zip(self.caches, self.head_slices):
                cache.append(qkv[k:v], qkv[v:end], position)
                values.append(cache.lookup(qkv[q:k]))
            x = x + torch.mv(self.wo, torch.from_numpy(np.concatenate(values)))
        y = x
        if self.shared is not None:
            x = self._feed_forward(self.shared, x, y)
        if self.router is not None:
            # torch.argmax returns the first maximal index: ties go to the lowest expert.
            expert = int(torch.argmax(torch.mv(self.router, y) + self.router_bias))
            x = self._feed_forward(self.experts[expert], x, y)
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
        # x = E^T onehot(token): one sparse product in place of a gather of F rows.
        self.embedding_t = _to_csr(self._stack(tensors, shapes, "embed", vocabs).T)
        self.total_vocab = int(sum(vocabs))
        self.unembedding = _to_csr(self._stack(tensors, shapes, "unembed", vocabs))
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
            layer.reset()

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Run one token through the model and return the next token (F,) int64."""
        indicator = torch.zeros(self.total_vocab, dtype=DTYPE)
        indicator[self.offsets + token] = 1.0
        x = torch.mv(self.embedding_t, indicator)
        for layer in self.layers:
            x = layer.forward(x, self.position)
        self.position += 1
        return self._next_token(x)

    def _next_token(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.mv(self.unembedding, x) + self.unembedding_bias
        token_out = torch.empty(len(self.offsets), dtype=torch.int64)
        for fields, index in self.groups:
            token_out[fields] = logits[index].argmax(dim=1)
        return token_out

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompt tokens (P, F) in chunks, layer by layer over each chunk, and
        return the token that follows the last one. Equal to `step` on each token."""
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            indicator = torch.zeros((self.total_vocab, len(chunk)), dtype=DTYPE)
            columns = torch.arange(len(chunk)).unsqueeze(1).expand(-1, chunk.shape[1])
            indicator[self.offsets + chunk, columns] = 1.0
            x = torch.sparse.mm(self.embedding_t, indicator).T.contiguous()
            for layer in self.layers:
                x = layer.forward_many(x, self.position)
            self.position += len(chunk)
        return self._next_token(x[-1])


_MODELS: dict[str, TorchModel] = {}


def load_model(weights: str | Path | None = None) -> TorchModel:
    """Return the TorchModel of a weight file, or of the universal weights (cached)."""
    key = str(weights) if weights is not None else "<universal>"
    if key not in _MODELS:
        if weights is None:
            tensors, metadata = universal_weights()
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
    # One thread: the per-step products are small, and threads only add overhead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.reset()
        token = model.prefill(prompt)
        while decoder.feed(token.numpy()):
            if progress is not None and decoder.steps % PROGRESS_EVERY == 0:
                progress(decoder.steps)
            token = model.step(token)
    finally:
        torch.set_num_threads(threads)
    return decoder.result
