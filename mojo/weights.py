"""Read a tlc weight file (docs/model.md section 2) into plain numpy structures.

Both the numpy oracle (`tlc.mojo.reference`) and the Mojo runtime start from a
`ModelWeights`. The reader is generic: it finds layers, heads, shared blocks and experts
by tensor name, and takes only these facts from the JSON metadata under key "tlc":

* `D`: the residual width.
* `fields`: a list of `{"name", "vocab"}` objects, one per token field, in token order.
* the `RUN` value of the `kind` field: `kind["RUN"]` (a name-to-id map) or else the
  position of "RUN" in the `values` list of the field named `kind`.
* `layers[l]["heads"][h]["lookup"]`: "exact" for an exact-match head. A head without
  it is searched by brute force, which is exact for every head.
* `shapes`: the shape of every sparse matrix. A missing shape is inferred from the bias
  of the same block (every matrix of docs/model.md has one).

The output byte of a token is `out_byte` when the file has that field, else the bits
`out_bit0` .. `out_bit7` (bit i has weight 2^i); it counts only when `out_valid` is 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

METADATA_KEY = "tlc"
KIND_FIELD = "kind"
RUN_NAME = "RUN"
OUT_VALID_FIELD = "out_valid"
OUT_BYTE_FIELD = "out_byte"
OUT_BIT_FIELDS = tuple(f"out_bit{i}" for i in range(8))
EXACT_LOOKUP = "exact"


class WeightFileError(ValueError):
    """A weight file that does not follow docs/model.md section 2."""


@dataclass(frozen=True)
class SparseMatrix:
    """A matrix in coordinate form: entry `values[i]` sits at (`rows[i]`, `cols[i]`)."""

    shape: tuple[int, int]
    rows: np.ndarray  # int64
    cols: np.ndarray  # int64
    values: np.ndarray  # float64

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """Return self @ x for a dense vector x."""
        out = np.zeros(self.shape[0], dtype=np.float64)
        np.add.at(out, self.rows, self.values * x[self.cols])
        return out

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=np.float64)
        np.add.at(dense, (self.rows, self.cols), self.values)
        return dense

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (indptr, indices, values) of the compressed-sparse-row form, with the
        entries of each row in column order and duplicate coordinates summed."""
        n_rows, n_cols = self.shape
        keys = self.rows * n_cols + self.cols
        unique, inverse = np.unique(keys, return_inverse=True)
        values = np.zeros(len(unique), dtype=np.float64)
        np.add.at(values, inverse, self.values)
        rows = unique // max(n_cols, 1)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        return np.cumsum(indptr), unique % max(n_cols, 1), values

    def transpose(self) -> SparseMatrix:
        return SparseMatrix((self.shape[1], self.shape[0]), self.cols, self.rows, self.values)


@dataclass(frozen=True)
class Head:
    """One hard-max attention head: q, k, v projections with biases and the output
    projection `wo` of shape (D, d_v)."""

    lookup: str
    wq: SparseMatrix
    bq: np.ndarray
    wk: SparseMatrix
    bk: np.ndarray
    wv: SparseMatrix
    bv: np.ndarray
    wo: SparseMatrix


@dataclass(frozen=True)
class FeedForward:
    """One ReLU block: x + W2 ReLU(W1 y + b1) + b2."""

    w1: SparseMatrix
    b1: np.ndarray
    w2: SparseMatrix
    b2: np.ndarray


@dataclass(frozen=True)
class Layer:
    heads: list[Head]
    shared: FeedForward | None
    router_w: SparseMatrix | None
    router_b: np.ndarray | None
    experts: list[FeedForward]

    @property
    def blocks(self) -> list[FeedForward]:
        """The shared block, when the layer has one, then the experts."""
        return ([self.shared] if self.shared is not None else []) + self.experts


@dataclass(frozen=True)
class Field:
    name: str
    vocab: int


@dataclass
class ModelWeights:
    """Everything a runtime needs from one weight file."""

    width: int
    fields: list[Field]
    embed: list[SparseMatrix]
    unembed: list[SparseMatrix]
    unembed_bias: list[np.ndarray]
    layers: list[Layer]
    kind_field: int
    run_value: int
    out_valid_field: int | None
    # (field index, weight) pairs whose weighted sum is the output byte of a token.
    out_byte_terms: list[tuple[int, int]]
    prompt: np.ndarray | None = None  # (P, F) int64, present in a program file
    metadata: dict = field(default_factory=dict)

    def field_index(self, name: str) -> int:
        for index, entry in enumerate(self.fields):
            if entry.name == name:
                return index
        raise WeightFileError(f"the weight file has no token field named {name!r}")


def load_weights(path: str | Path) -> ModelWeights:
    """Read the weight file at `path`, checking its checksum and values as
    `tlc.model.weights.load_weights` does; raise WeightFileError when it is malformed."""
    from tlc.model.weights import REBUILD, TENSORS_INVALID, check_weights, invalid_contents

    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw_metadata = (handle.metadata() or {}).get(METADATA_KEY)
            if raw_metadata is None:
                raise WeightFileError(f"{path}: not a tlc weight file (metadata "
                                      f"{METADATA_KEY!r} is missing); {REBUILD}")  # fmt: skip
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = json.loads(raw_metadata)
    except (OSError, SafetensorError) as error:
        raise WeightFileError(f"{path}: not a readable safetensors file ({error}); "
                              f"{REBUILD}") from None  # fmt: skip
    except json.JSONDecodeError as error:
        raise WeightFileError(f"{path}: the metadata is not valid JSON ({error}); "
                              f"{REBUILD}") from None  # fmt: skip
    if not isinstance(metadata, dict):
        raise WeightFileError(f"{path}: the metadata is not a JSON object; {REBUILD}")
    try:
        check_weights(tensors, metadata, path)
    except ValueError as error:
        raise WeightFileError(str(error)) from None
    try:
        return weights_from_tensors(tensors, metadata, str(path))
    except WeightFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise WeightFileError(invalid_contents(path, TENSORS_INVALID, error)) from None


def weights_from_tensors(tensors: dict[str, np.ndarray], metadata: dict, source: str = "<model>"):
    """Build a ModelWeights from the tensors and the parsed metadata of a weight file."""
    reader = _Reader(tensors, metadata, source)
    fields = reader.fields()
    width = int(metadata["D"])
    embed = [reader.matrix(f"embed.{f}", (entry.vocab, width)) for f, entry in enumerate(fields)]
    unembed_bias = [reader.vector(f"unembed.{f}.bias") for f in range(len(fields))]
    unembed = [
        reader.matrix(f"unembed.{f}", (entry.vocab, width)) for f, entry in enumerate(fields)
    ]
    for f, entry in enumerate(fields):
        expected = (entry.vocab, width)
        for name, matrix in (("embed", embed[f]), ("unembed", unembed[f])):
            if tuple(matrix.shape) != expected:
                raise WeightFileError(f"{source}: {name}.{f} has shape {tuple(matrix.shape)}, "
                                      f"but the metadata gives field {entry.name!r} "
                                      f"{entry.vocab} values, so {expected}; rebuild it with "
                                      f"'tlc build'")  # fmt: skip
        if len(unembed_bias[f]) != entry.vocab:
            raise WeightFileError(f"{source}: unembed.{f}.bias has length "
                                  f"{len(unembed_bias[f])}, expected {entry.vocab}; rebuild "
                                  f"it with 'tlc build'")  # fmt: skip
    layers = [reader.layer(index, width) for index in range(reader.layer_count())]
    _check_layer_metadata(metadata.get("layers"), layers, source)
    names = [entry.name for entry in fields]
    out_valid = names.index(OUT_VALID_FIELD) if OUT_VALID_FIELD in names else None
    prompt = tensors.get("prompt")
    return ModelWeights(
        width=width,
        fields=fields,
        embed=embed,
        unembed=unembed,
        unembed_bias=unembed_bias,
        layers=layers,
        kind_field=_index_of(names, KIND_FIELD, source),
        run_value=_run_value(metadata, fields, source),
        out_valid_field=out_valid,
        out_byte_terms=_out_byte_terms(names, out_valid, source),
        prompt=None if prompt is None else np.asarray(prompt, dtype=np.int64),
        metadata=metadata,
    )


def _check_layer_metadata(described, layers: list[Layer], source: str) -> None:
    """Raise WeightFileError when the metadata's layer list disagrees with the tensors in
    the number of layers, heads or experts. The torch runtime builds its layers from the
    metadata and this runtime from the tensors, so both must describe the same model. A
    layer without heads and experts has no tensors, so the metadata may list more layers
    than the tensors show, as long as those are empty."""
    rebuild = "rebuild it with 'tlc build'"
    if not isinstance(described, list) or len(described) < len(layers):
        count = len(described) if isinstance(described, list) else "no list of"
        raise WeightFileError(f"{source}: the metadata describes {count} layers but the "
                              f"tensors hold {len(layers)}; {rebuild}")  # fmt: skip
    for index, description in enumerate(described):
        if not isinstance(description, dict):
            raise WeightFileError(f"{source}: metadata layer {index} is not an object; "
                                  f"{rebuild}")  # fmt: skip
        layer = layers[index] if index < len(layers) else None
        for key in ("heads", "experts"):
            stored = 0 if layer is None else len(getattr(layer, key))
            listed = description.get(key, [])
            if not isinstance(listed, list) or len(listed) != stored:
                count = len(listed) if isinstance(listed, list) else repr(listed)
                raise WeightFileError(f"{source}: metadata layer {index} lists {count} "
                                      f"{key} but the tensors hold {stored}; "
                                      f"{rebuild}")  # fmt: skip


def check_structure(tensors: dict[str, np.ndarray], metadata: dict, source: str) -> None:
    """Raise WeightFileError unless the tensors and metadata form a valid model. This
    runs the checks of `weights_from_tensors` for a runtime that builds its model
    another way."""
    from tlc.model.weights import TENSORS_INVALID, invalid_contents

    try:
        weights_from_tensors(tensors, metadata, source)
    except WeightFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise WeightFileError(invalid_contents(source, TENSORS_INVALID, error)) from None


def _index_of(names: list[str], name: str, source: str) -> int:
    if name not in names:
        raise WeightFileError(f"{source}: token field {name!r} is missing")
    return names.index(name)


def _run_value(metadata: dict, fields: list[Field], source: str) -> int:
    kind = metadata.get(KIND_FIELD)
    if isinstance(kind, dict) and RUN_NAME in kind:
        return int(kind[RUN_NAME])
    for entry in metadata.get("fields", []):
        if entry.get("name") == KIND_FIELD and RUN_NAME in entry.get("values", []):
            return list(entry["values"]).index(RUN_NAME)
    raise WeightFileError(f"{source}: metadata gives no token id for kind {RUN_NAME}")


def _out_byte_terms(names: list[str], out_valid: int | None, source: str):
    if out_valid is None:
        return []
    if OUT_BYTE_FIELD in names:
        return [(names.index(OUT_BYTE_FIELD), 1)]
    if all(name in names for name in OUT_BIT_FIELDS):
        return [(names.index(name), 1 << bit) for bit, name in enumerate(OUT_BIT_FIELDS)]
    raise WeightFileError(
        f"{source}: field {OUT_VALID_FIELD!r} needs {OUT_BYTE_FIELD!r} or "
        f"{OUT_BIT_FIELDS[0]!r} .. {OUT_BIT_FIELDS[-1]!r}"
    )


_LAYER_NAME = re.compile(r"layers\.(\d+)\.")
_HEAD_NAME = re.compile(r"layers\.(\d+)\.heads\.(\d+)\.")
_EXPERT_NAME = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.")


class _Reader:
    """Looks tensors up by name and checks their shapes."""

    def __init__(self, tensors: dict[str, np.ndarray], metadata: dict, source: str):
        self.tensors = tensors
        self.metadata = metadata
        self.source = source
        self.shapes = metadata.get("shapes", {})

    def fields(self) -> list[Field]:
        entries = self.metadata.get("fields")
        if not entries:
            raise WeightFileError(f"{self.source}: metadata lists no token fields")
        return [Field(str(entry["name"]), int(entry["vocab"])) for entry in entries]

    def layer_count(self) -> int:
        return _count(self.tensors, _LAYER_NAME, ())

    def vector(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise WeightFileError(f"{self.source}: tensor {name!r} is missing")
        return np.asarray(self.tensors[name], dtype=np.float64).reshape(-1)

    def matrix(self, name: str, shape: tuple[int, int]) -> SparseMatrix:
        """Read NAME.rows/.cols/.values; `shape` is used when the metadata has none."""
        parts = []
        for suffix in ("rows", "cols", "values"):
            key = f"{name}.{suffix}"
            if key not in self.tensors:
                raise WeightFileError(f"{self.source}: tensor {key!r} is missing")
            parts.append(np.asarray(self.tensors[key]).reshape(-1))
        rows, cols, values = parts
        shape = tuple(int(n) for n in self.shapes.get(name, shape))
        if not len(rows) == len(cols) == len(values):
            raise WeightFileError(f"{self.source}: {name} has rows, cols and values of "
                                  f"different lengths")  # fmt: skip
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]
                          or cols.min() < 0 or cols.max() >= shape[1]):  # fmt: skip
            raise WeightFileError(f"{self.source}: {name} has an entry outside shape {shape}")
        return SparseMatrix(
            shape, rows.astype(np.int64), cols.astype(np.int64), values.astype(np.float64)
        )

    def feed_forward(self, prefix: str, width: int) -> FeedForward:
        b1 = self.vector(f"{prefix}.b1")
        return FeedForward(
            w1=self.matrix(f"{prefix}.w1", (len(b1), width)),
            b1=b1,
            w2=self.matrix(f"{prefix}.w2", (width, len(b1))),
            b2=self.vector(f"{prefix}.b2"),
        )

    def head(self, layer: int, index: int, width: int) -> Head:
        prefix = f"layers.{layer}.heads.{index}"
        bq, bk, bv = (self.vector(f"{prefix}.{name}") for name in ("bq", "bk", "bv"))
        return Head(
            lookup=self._lookup(layer, index),
            wq=self.matrix(f"{prefix}.wq", (len(bq), width)),
            bq=bq,
            wk=self.matrix(f"{prefix}.wk", (len(bk), width)),
            bk=bk,
            wv=self.matrix(f"{prefix}.wv", (len(bv), width)),
            bv=bv,
            wo=self.matrix(f"{prefix}.wo", (width, len(bv))),
        )

    def _lookup(self, layer: int, head: int) -> str:
        try:
            return str(self.metadata["layers"][layer]["heads"][head].get("lookup", "hardmax"))
        except (KeyError, IndexError, TypeError, AttributeError):
            return "hardmax"

    def layer(self, index: int, width: int) -> Layer:
        heads = [
            self.head(index, h, width)
            for h in range(_count(self.tensors, _HEAD_NAME, (index,)))
        ]
        shared = None
        if f"layers.{index}.shared.b1" in self.tensors:
            shared = self.feed_forward(f"layers.{index}.shared", width)
        router_w = router_b = None
        experts = []
        if f"layers.{index}.router.b" in self.tensors:
            router_b = self.vector(f"layers.{index}.router.b")
            router_w = self.matrix(f"layers.{index}.router.w", (len(router_b), width))
            experts = [
                self.feed_forward(f"layers.{index}.experts.{e}", width)
                for e in range(len(router_b))
            ]
        return Layer(heads, shared, router_w, router_b, experts)


def _count(tensors: dict, pattern: re.Pattern, prefix: tuple[int, ...]) -> int:
    """Return 1 + the largest index that `pattern` captures after `prefix`, or 0."""
    found = -1
    for name in tensors:
        match = pattern.match(name)
        if match is None:
            continue
        numbers = tuple(int(group) for group in match.groups())
        if numbers[:-1] == prefix:
            found = max(found, numbers[-1])
    return found + 1
