"""Write and read weight files (docs/model.md section 2), and cache the universal model.

Tensor names: `embed.{f}`, `unembed.{f}` and `unembed.{f}.bias` by field index f;
`layers.{l}.heads.{h}.{wq,bq,wk,bk,wv,bv,wo}`; `layers.{l}.shared.{w1,b1,w2,b2}`;
`layers.{l}.router.{w,b}`; `layers.{l}.experts.{e}.{w1,b1,w2,b2}`; `prompt`. A matrix M is
stored as `M.rows`, `M.cols` (int64) and `M.values` (float64), its shape in
metadata["shapes"]; a vector is one float64 tensor.

The functions a runtime needs are all importable from here: `build_model`,
`save_weights`, `load_weights`, `encode_prompt`, `decode_token_stream` and
`TokenDecoder`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tlc.cache import cache_dir
from tlc.compiler import isa
from tlc.model import tokens as tk
from tlc.model.tokens import TokenDecoder, decode_token_stream, encode_prompt
from tlc.runtime.machine import Program

if TYPE_CHECKING:
    import scipy.sparse as sp

    from tlc.model.network import Model

# The builder and scipy are imported only to build a model or convert a matrix. A run
# from the cached universal weights needs neither, and importing them took 0.1 s of its
# start-up.


def __getattr__(name: str):
    """Return `build_model`, imported on first use."""
    if name == "build_model":
        from tlc.model.build import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TokenDecoder",
    "build_model",
    "decode_token_stream",
    "encode_prompt",
    "load_weights",
    "model_tensors",
    "save_weights",
    "universal_model",
    "WeightFileError",
    "write_weight_file",
    "universal_weights",
]

logger = logging.getLogger("tlc.model")

CHECKSUM_KEY = "checksum"  # metadata key of `weights_checksum`
REBUILD = "rebuild it with `tlc build`"
TENSORS_INVALID = "the tensors do not form a valid model"
TOKENS_INVALID = "the metadata does not describe the tokens"


class WeightFileError(ValueError):
    """A file that is not a valid tlc weight file: unreadable, damaged or edited."""


def invalid_contents(source, problem: str, error: Exception) -> str:
    """Return the message for a weight file whose parts do not fit together, naming the
    file, the problem and the exception that showed it."""
    return f"{source}: {problem} ({type(error).__name__}: {error}); {REBUILD}"


@functools.lru_cache(maxsize=4)
def universal_model(numbering: tuple[str, ...] | None = None) -> Model:
    """Build (once per process and numbering) the universal model."""
    from tlc.model.build import build_model

    return build_model(numbering)


def _builder_hash() -> str:
    """Return a hash of the sources the universal weights are built from."""
    digest = hashlib.sha256()
    sources = sorted(Path(__file__).resolve().parent.glob("*.py")) + [Path(isa.__file__)]
    for source in sources:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def universal_weights() -> tuple[dict[str, np.ndarray], dict]:
    """Return (tensors, metadata) of the universal model, as `load_weights` gives them.

    Building takes seconds, so the file is cached under the tlc cache folder, keyed by a
    hash of the builder's sources. A cache that cannot be read or written is skipped.
    """
    path = cache_dir() / "weights" / f"universal-{_builder_hash()}.safetensors"
    if path.is_file():
        try:
            return load_weights(path)
        except WeightFileError as error:
            logger.warning("rebuilding the cached universal weights: %s", error)

    model = universal_model()
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
        os.close(handle)
        save_weights(model, temporary)
        os.replace(temporary, path)
        temporary = None
        return load_weights(path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        logger.info("cannot cache the universal weights in %s: %s", path.parent, error)
    tensors, shapes = model_tensors(model)
    return tensors, dict(model.metadata, shapes=shapes)


def model_tensors(model: Model) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Return the named tensors of `model` and the shapes of its matrices."""
    import scipy.sparse as sp

    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}

    def matrix(name: str, value) -> None:
        coo = sp.coo_matrix(value)
        tensors[f"{name}.rows"] = coo.row.astype(np.int64)
        tensors[f"{name}.cols"] = coo.col.astype(np.int64)
        tensors[f"{name}.values"] = coo.data.astype(np.float64)
        shapes[name] = [int(n) for n in coo.shape]

    def vector(name: str, value: np.ndarray) -> None:
        tensors[name] = np.ascontiguousarray(value, dtype=np.float64)

    for f, (table, out, bias) in enumerate(zip(model.embed, model.unembed, model.unembed_bias)):
        matrix(f"embed.{f}", table)
        matrix(f"unembed.{f}", out)
        vector(f"unembed.{f}.bias", bias)
    for l, layer in enumerate(model.layers):
        for h, head in enumerate(layer.heads):
            prefix = f"layers.{l}.heads.{h}"
            for name in ("wq", "wk", "wv", "wo"):
                matrix(f"{prefix}.{name}", getattr(head, name))
            for name in ("bq", "bk", "bv"):
                vector(f"{prefix}.{name}", getattr(head, name))
        blocks = [(f"layers.{l}.experts.{e}", block) for e, block in enumerate(layer.experts)]
        if layer.shared is not None:
            blocks.append((f"layers.{l}.shared", layer.shared))
        for prefix, block in blocks:
            matrix(f"{prefix}.w1", block.w1)
            matrix(f"{prefix}.w2", block.w2)
            vector(f"{prefix}.b1", block.b1)
            vector(f"{prefix}.b2", block.b2)
        if layer.router_w is not None:
            matrix(f"layers.{l}.router.w", layer.router_w)
            vector(f"layers.{l}.router.b", layer.router_b)
    return tensors, shapes


def program_metadata(program: Program) -> dict:
    return {
        "source": program.source_name,
        "memory_size": program.memory_size,
        "instructions": len(program.instructions),
        "lines": [instruction.line for instruction in program.instructions],
    }


def save_weights(model: Model, path: str | Path, program: Program | None = None,
                 stdin: bytes = b"") -> None:  # fmt: skip
    """Write `model` (and, with `program`, its prompt and program facts) to `path`."""
    tensors, shapes = model_tensors(model)
    metadata = dict(model.metadata)
    metadata["shapes"] = shapes
    if program is not None:
        tensors["prompt"] = tk.encode_prompt(metadata, program, stdin)
        metadata["program"] = program_metadata(program)
    write_weight_file(path, tensors, metadata)


def weights_checksum(tensors: dict[str, np.ndarray], metadata: dict) -> str:
    """Return the SHA-256 of the metadata (without its checksum) and of every tensor's
    name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    body = {key: value for key, value in metadata.items() if key != CHECKSUM_KEY}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def write_weight_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """Write `tensors` and `metadata` as a safetensors file, with their checksum in the
    metadata."""
    metadata = json.loads(json.dumps(metadata))  # the form `load_weights` will read back
    # safetensors writes an array's memory as it lies, so a transposed or sliced array
    # would come back scrambled.
    tensors = {name: np.ascontiguousarray(values) for name, values in tensors.items()}
    metadata[CHECKSUM_KEY] = weights_checksum(tensors, metadata)
    save_file(tensors, str(path), metadata={tk.METADATA_KEY: json.dumps(metadata)})


def load_weights(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Return (tensors, metadata) of a weight file.

    Raises WeightFileError when the file cannot be read, is not a tlc weight file, does
    not match its checksum or contains a value that is not finite.
    """
    if Path(path).is_dir():
        raise WeightFileError(f"{path}: is a folder, not a weight file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = (handle.metadata() or {}).get(tk.METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise WeightFileError(f"{path}: not a readable safetensors file ({error}); "
                              f"{REBUILD}") from None  # fmt: skip
    if raw is None:
        raise WeightFileError(f"{path}: not a tlc weight file (metadata "
                              f"{tk.METADATA_KEY!r} is missing); {REBUILD}")  # fmt: skip
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise WeightFileError(f"{path}: the metadata is not valid JSON ({error}); "
                              f"{REBUILD}") from None  # fmt: skip
    check_format(metadata, path)
    check_weights(tensors, metadata, path)
    return tensors, metadata


def check_format(metadata, path: str | Path) -> None:
    """Raise WeightFileError unless the metadata is a JSON object of this version's weight
    format, whose token fields the prompt encoder and the decoder use."""
    if not isinstance(metadata, dict) or metadata.get("format") != tk.FORMAT_VERSION:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise WeightFileError(f"{path}: weight format {found!r}, expected "
                              f"{tk.FORMAT_VERSION!r}; {REBUILD}")  # fmt: skip


def check_weights(tensors: dict[str, np.ndarray], metadata: dict, path: str | Path) -> None:
    """Raise WeightFileError unless the file's checksum matches and every value is finite."""
    rebuild = REBUILD
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        raise WeightFileError(f"{path}: the metadata has no checksum; {rebuild}")
    if stored != weights_checksum(tensors, metadata):
        raise WeightFileError(f"{path}: the tensors or the metadata do not match the "
                              f"file's checksum, so the file is damaged or was edited; "
                              f"{rebuild}")  # fmt: skip
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise WeightFileError(f"{path}: tensor {name!r} contains a value that is not "
                                  f"finite; {rebuild}")  # fmt: skip


def sparse_from(tensors: dict[str, np.ndarray], shapes: dict, name: str) -> sp.csr_matrix:
    """Return the stored matrix `name` as a CSR matrix."""
    import scipy.sparse as sp

    shape = tuple(shapes[name])
    return sp.csr_matrix(
        (tensors[f"{name}.values"], (tensors[f"{name}.rows"], tensors[f"{name}.cols"])),
        shape=shape,
    )


def uncovered_opcodes(metadata: dict, program: Program) -> Sequence[str]:
    """Return the mnemonics that `program` uses and the model does not compute."""
    covered = set(metadata.get("covered_opcodes", metadata["opcodes"]))
    used = {instruction.opcode.mnemonic for instruction in program.instructions}
    return sorted(used - covered)
