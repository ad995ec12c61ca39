"""Random weight files that follow docs/model.md, for testing and timing the runtimes.

A synthetic model has no meaning: its weights are small random integers, so every
runtime computes exact integer values in float64 and ties in every argmax are common,
which exercises the tie rules. Its structure follows the contract:

* Token fields: `kind` (RUN, HALT, TRAP), `out_valid`, the output byte (`out_byte`, or
  `out_bit0` .. `out_bit7`), `key` and `query` (values below 2^n give n bits of +-1; the
  value 2^n, "none", gives zeros), `tag` (NORMAL, SENTINEL, LOW) and `data`.
* Residual layout: n key bits, n query bits, the key's last component `c`, then
  `scratch` dimensions. Only the embedding writes the first 2n + 1 dimensions, so
  exact-match heads see keys `(bits of key, c)` and queries `(bits of query, 1)` with
  c = n for NORMAL, 2n - 1 for SENTINEL and at most n - 2 for LOW.
* With `well_formed=True` the unembedding never produces key or query "none" or the
  SENTINEL tag, because their logits get a large negative bias. The prompt contains
  exactly one sentinel token, so every exact-match key and query has the form of
  docs/model.md. With `well_formed=False` malformed keys and queries occur, and a
  runtime must notice them and search by brute force.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KIND_NAMES = ("RUN", "HALT", "TRAP")
TAG_NORMAL, TAG_SENTINEL, TAG_LOW = 0, 1, 2
# Added to the logits of the token values a well-formed model must never generate.
FORBIDDEN_BIAS = -1.0e9


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and knobs of a synthetic model."""

    key_bits: int = 3
    scratch: int = 24
    layers: int = 2
    dense_heads: int = 1  # brute-force hard-max heads per layer
    exact_heads: int = 1  # exact-match heads per layer
    dense_key_width: int = 2
    value_width: int = 2
    shared_hidden: int = 6  # 0: no shared block
    experts: int = 2  # 0: no router and no experts
    expert_hidden: int = 4
    data_vocab: int = 5
    byte_bits: bool = False  # out_bit0..7 in place of out_byte
    density: float = 0.3  # fraction of nonzero entries in random matrices
    weight_range: int = 2  # random weights are integers in [-weight_range, weight_range]
    run_bias: int = 6  # added to the RUN logit so that runs do not halt at once
    well_formed: bool = True
    never_halt: bool = False  # the kind field always predicts RUN (for timing runs)
    # About half of the hidden units copy the W1 row of an earlier unit of their block
    # and keep their own bias, as the steps of a tlc model do (tlc.mojo.twins).
    twin_rows: bool = False
    # Heads get rows of their own at the end of the residual, which no block and no
    # other head writes, so that the engine may defer them (tlc.mojo.deferred). Up to
    # scratch // 2 heads get one, in layer order.
    private_head_rows: bool = False

    @property
    def width(self) -> int:
        return 2 * self.key_bits + 1 + self.scratch

    @property
    def scratch_start(self) -> int:
        return 2 * self.key_bits + 1

    @property
    def private_rows(self) -> int:
        """Return how many heads write a row of their own."""
        if not self.private_head_rows:
            return 0
        return min(self.layers * (self.dense_heads + self.exact_heads), self.scratch // 2)

    @property
    def shared_scratch(self) -> tuple[int, int]:
        """Return the scratch rows that blocks and heads without a row of their own
        write."""
        return self.scratch_start, self.width - self.private_rows


class _Builder:
    def __init__(self, spec: SyntheticSpec, rng: np.random.Generator):
        self.spec = spec
        self.rng = rng
        self.tensors: dict[str, np.ndarray] = {}
        self.shapes: dict[str, list[int]] = {}

    def random_dense(self, shape, row_range=None, col_range=None) -> np.ndarray:
        """Return a random integer matrix, zero outside the given row and column ranges."""
        spec = self.spec
        values = self.rng.integers(-spec.weight_range, spec.weight_range + 1, size=shape)
        mask = self.rng.random(shape) < spec.density
        dense = np.where(mask, values, 0).astype(np.float64)
        if row_range is not None:
            keep = np.zeros(shape[0], dtype=bool)
            keep[row_range[0] : row_range[1]] = True
            dense[~keep, :] = 0.0
        if col_range is not None:
            keep = np.zeros(shape[1], dtype=bool)
            keep[col_range[0] : col_range[1]] = True
            dense[:, ~keep] = 0.0
        return dense

    def random_vector(self, length: int, start: int = 0) -> np.ndarray:
        spec = self.spec
        vector = self.rng.integers(-spec.weight_range, spec.weight_range + 1, size=length)
        vector = vector.astype(np.float64)
        vector[:start] = 0.0
        return vector

    def matrix(self, name: str, dense: np.ndarray) -> None:
        rows, cols = np.nonzero(dense)
        self.tensors[f"{name}.rows"] = rows.astype(np.int64)
        self.tensors[f"{name}.cols"] = cols.astype(np.int64)
        self.tensors[f"{name}.values"] = dense[rows, cols].astype(np.float64)
        self.shapes[name] = list(dense.shape)

    def vector(self, name: str, values: np.ndarray) -> None:
        self.tensors[name] = np.asarray(values, dtype=np.float64)


def _fields(spec: SyntheticSpec) -> list[dict]:
    fields = [
        {"name": "kind", "vocab": len(KIND_NAMES), "values": list(KIND_NAMES)},
        {"name": "out_valid", "vocab": 2},
    ]
    if spec.byte_bits:
        fields += [{"name": f"out_bit{i}", "vocab": 2} for i in range(8)]
    else:
        fields.append({"name": "out_byte", "vocab": 256})
    none = 1 << spec.key_bits
    fields += [
        {"name": "key", "vocab": none + 1},
        {"name": "query", "vocab": none + 1},
        {"name": "tag", "vocab": 3, "values": ["NORMAL", "SENTINEL", "LOW"]},
        {"name": "data", "vocab": spec.data_vocab},
    ]
    return fields


def _bits(value: int, count: int) -> np.ndarray:
    """Return +-1 for each of the `count` low bits of value (bit set: +1)."""
    return np.array([1.0 if value >> i & 1 else -1.0 for i in range(count)])


def _embedding(builder: _Builder, name: str, vocab: int) -> np.ndarray:
    """Return the (vocab, D) embedding of one field: random scratch entries, plus the
    structured key, query and tag dimensions for those fields."""
    spec = builder.spec
    n = spec.key_bits
    table = builder.random_dense((vocab, spec.width), col_range=(spec.scratch_start, spec.width))
    if name in ("key", "query"):
        start = 0 if name == "key" else n
        for value in range(1 << n):
            table[value, start : start + n] = _bits(value, n)
    if name == "tag":
        c_dim = 2 * n
        table[TAG_NORMAL, c_dim] = n
        table[TAG_SENTINEL, c_dim] = 2 * n - 1
        table[TAG_LOW, c_dim] = n - 2 - int(builder.rng.integers(0, 3))
    return table


def _head(builder: _Builder, prefix: str, exact: bool, number: int) -> None:
    """Add one head, the model's head number `number` in layer order."""
    spec = builder.spec
    n, width, scratch = spec.key_bits, spec.width, spec.shared_scratch
    if number < spec.private_rows:
        row = spec.width - 1 - number
        scratch = (row, row + 1)
    if exact:
        wq = np.zeros((n + 1, width))
        wk = np.zeros((n + 1, width))
        wq[np.arange(n), n + np.arange(n)] = 1.0
        wk[np.arange(n), np.arange(n)] = 1.0
        wk[n, 2 * n] = 1.0
        bq = np.zeros(n + 1)
        bq[n] = 1.0
        bk = np.zeros(n + 1)
    else:
        wq = builder.random_dense((spec.dense_key_width, width))
        wk = builder.random_dense((spec.dense_key_width, width))
        bq = builder.random_vector(spec.dense_key_width)
        bk = builder.random_vector(spec.dense_key_width)
    builder.matrix(f"{prefix}.wq", wq)
    builder.vector(f"{prefix}.bq", bq)
    builder.matrix(f"{prefix}.wk", wk)
    builder.vector(f"{prefix}.bk", bk)
    builder.matrix(f"{prefix}.wv", builder.random_dense((spec.value_width, width)))
    builder.vector(f"{prefix}.bv", builder.random_vector(spec.value_width))
    builder.matrix(f"{prefix}.wo", builder.random_dense((width, spec.value_width), scratch))


def _feed_forward(builder: _Builder, prefix: str, hidden: int) -> None:
    spec = builder.spec
    w1 = builder.random_dense((hidden, spec.width))
    if spec.twin_rows:
        for unit in range(1, hidden):
            if builder.rng.random() < 0.5:
                w1[unit] = w1[builder.rng.integers(unit)]
    builder.matrix(f"{prefix}.w1", w1)
    builder.vector(f"{prefix}.b1", builder.random_vector(hidden))
    scratch = spec.shared_scratch
    builder.matrix(f"{prefix}.w2", builder.random_dense((spec.width, hidden), scratch))
    b2 = builder.random_vector(spec.width, spec.scratch_start)
    b2[scratch[1] :] = 0.0
    builder.vector(f"{prefix}.b2", b2)


def _layer(builder: _Builder, index: int) -> dict:
    spec = builder.spec
    heads = []
    lookups = ["hardmax"] * spec.dense_heads + ["exact"] * spec.exact_heads
    order = builder.rng.permutation(len(lookups))
    for h, position in enumerate(order):
        lookup = lookups[position]
        number = index * len(lookups) + h
        _head(builder, f"layers.{index}.heads.{h}", exact=lookup == "exact", number=number)
        heads.append({"role": f"synthetic {lookup}", "lookup": lookup})
    if spec.shared_hidden:
        _feed_forward(builder, f"layers.{index}.shared", spec.shared_hidden)
    if spec.experts:
        builder.matrix(f"layers.{index}.router.w", builder.random_dense((spec.experts, spec.width)))
        builder.vector(f"layers.{index}.router.b", builder.random_vector(spec.experts))
        for e in range(spec.experts):
            _feed_forward(builder, f"layers.{index}.experts.{e}", spec.expert_hidden)
    experts = [{"name": f"synthetic expert {e}"} for e in range(spec.experts)]
    return {"heads": heads, "shared": bool(spec.shared_hidden), "experts": experts}


def _unembedding(builder: _Builder, index: int, entry: dict) -> None:
    spec = builder.spec
    vocab = entry["vocab"]
    name = entry["name"]
    matrix = builder.random_dense((vocab, spec.width))
    bias = builder.random_vector(vocab)
    if spec.never_halt and name == "kind":
        matrix[:] = 0.0
        bias[:] = 0.0
        bias[0] = 1.0
    builder.matrix(f"unembed.{index}", matrix)
    if name == "kind":
        bias[0] += spec.run_bias
    if spec.well_formed and name in ("key", "query"):
        bias[1 << spec.key_bits] = FORBIDDEN_BIAS
    if spec.well_formed and name == "tag":
        bias[TAG_SENTINEL] = FORBIDDEN_BIAS
    builder.vector(f"unembed.{index}.bias", bias)


def random_prompt(spec: SyntheticSpec, length: int, rng: np.random.Generator) -> np.ndarray:
    """Return a (length, F) prompt. A well-formed prompt starts with the sentinel token
    (key and query "none", tag SENTINEL) and has only well-formed tokens after it."""
    fields = _fields(spec)
    prompt = np.stack([rng.integers(0, entry["vocab"], size=length) for entry in fields], axis=1)
    names = [entry["name"] for entry in fields]
    key, query, tag = names.index("key"), names.index("query"), names.index("tag")
    none = 1 << spec.key_bits
    if spec.well_formed:
        prompt[:, key] = rng.integers(0, none, size=length)
        prompt[:, query] = rng.integers(0, none, size=length)
        prompt[:, tag] = rng.choice([TAG_NORMAL, TAG_LOW], size=length)
        prompt[0, key] = none
        prompt[0, tag] = TAG_SENTINEL
    prompt[:, names.index("kind")] = 0
    return prompt.astype(np.int64)


def build_model(spec: SyntheticSpec, seed: int, prompt_length: int = 8):
    """Return (tensors, metadata) of a random model with a random prompt."""
    rng = np.random.default_rng(seed)
    builder = _Builder(spec, rng)
    fields = _fields(spec)
    for index, entry in enumerate(fields):
        builder.matrix(f"embed.{index}", _embedding(builder, entry["name"], entry["vocab"]))
    layers = [_layer(builder, index) for index in range(spec.layers)]
    for index, entry in enumerate(fields):
        _unembedding(builder, index, entry)
    builder.tensors["prompt"] = random_prompt(spec, prompt_length, rng)
    metadata = {
        "format": "tlc-synthetic-1",
        "dtype": "float64",
        "D": spec.width,
        "fields": fields,
        "kind": {name: value for value, name in enumerate(KIND_NAMES)},
        "layers": layers,
        "shapes": builder.shapes,
    }
    return builder.tensors, metadata


def write_model(path: str | Path, spec: SyntheticSpec, seed: int, prompt_length: int = 8) -> Path:
    """Write a random model to `path` as a safetensors file and return the path."""
    from tlc.model.weights import write_weight_file

    tensors, metadata = build_model(spec, seed, prompt_length)
    write_weight_file(path, tensors, metadata)
    return Path(path)
