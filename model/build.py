"""Build the universal model: residual layout, heads, shared blocks, experts, certificate.

    residual = Residual()                 token and scratch dimensions
    families = control + memory + ALU     one expert per family and layer
    layers   = heads of layers 0 and 1, shared FFN 0 and 1, routers over the families
    embedding, unembedding
    certificate (interval bounds), rejected when a value could reach 2^53

Nothing depends on a program: the program enters as the prompt (`tokens.encode_prompt`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tlc.compiler.isa import Opcode
from tlc.model import tokens as tk
from tlc.model.alu_experts import alu_families
from tlc.model.certificate import CertificateError, certify
from tlc.model.circuit import Block
from tlc.model.context import Context, Family
from tlc.model.control import shared_ffn0, shared_ffn1
from tlc.model.embedding import build_embedding, build_unembedding
from tlc.model.families import control_families
from tlc.model.heads import layer0_heads, layer1_heads
from tlc.model.memory import memory_families
from tlc.model.network import FeedForward, Layer, Model, rows_to_matrix
from tlc.model.residual import Residual
from tlc.model.wiring import Lin

logger = logging.getLogger("tlc.model")

IDLE_EXPERT = "idle"


def build_model(
    numbering: Sequence[str] | None = None,
    *,
    domain_overrides: dict[str, tuple[float, float]] | None = None,
) -> Model:
    """Build the model for an opcode numbering (mnemonics by number; default: isa.py).

    `domain_overrides` replaces the declared interval of named token vectors, to show that
    the certificate rejects a domain it cannot bound. Raises CertificateError when a value
    could reach 2^53.
    """
    numbering = list(numbering) if numbering is not None else tk.default_numbering()
    residual = Residual()
    for name, interval in (domain_overrides or {}).items():
        for dim in residual[name]:
            residual.layout.domain[dim] = interval
    ctx = Context(residual, numbering)
    families = [*control_families(ctx), *memory_families(ctx), *alu_families(ctx)]
    _check_families(families)

    layer_count = max(2, max(max(f.blocks) for f in families) + 1)
    shared = {0: shared_ffn0(ctx), 1: shared_ffn1(ctx)}
    layers = []
    for index in range(layer_count):
        heads = layer0_heads(residual) if index == 0 else []
        if index == 1:
            heads = layer1_heads(residual)
        layers.append(_layer(ctx, index, heads, shared.get(index), families))
    _check_no_token_writes(residual, layers)

    embed = build_embedding(residual)
    _check_embedding_domain(residual, embed)
    unembed, unembed_bias = build_unembedding(residual)
    certificate = certify(residual.layout.domain, residual.token_width, layers, unembed,
                          unembed_bias)  # fmt: skip
    if not certificate.passed:
        raise CertificateError(
            f"a value of the model could reach {certificate.max_abs:.3g}, not below the "
            f"float64 exact-integer bound 2^53; the weights are not emitted"
        )
    covered = sorted({op.mnemonic for f in families for op in f.opcodes})
    metadata = _metadata(residual, numbering, layers, certificate, families, covered)
    dims = {name: list(vec) for name, vec in residual.layout.names.items()}
    logger.info("built model: D=%d, %d layers", residual.width, layer_count)
    return Model(residual.width, embed, unembed, unembed_bias, layers, metadata, dims,
                 list(residual.layout.domain), residual.token_width)  # fmt: skip


def _check_families(families: list[Family]) -> None:
    seen: dict[Opcode, str] = {}
    for family in families:
        for opcode in family.opcodes:
            if opcode in seen:
                raise ValueError(f"{opcode.mnemonic} is in families {seen[opcode]} and "
                                 f"{family.name}")  # fmt: skip
            seen[opcode] = family.name


def _layer(ctx: Context, index: int, heads, shared: Block | None, families) -> Layer:
    width = ctx.r.width
    shared_ff = None
    if shared is not None:
        shared_ff = FeedForward.from_block(shared, width, role="machine bookkeeping")
    present = [f for f in families if index in f.blocks]
    if not present:
        return Layer(heads, shared_ff, None, None, [])
    experts = [FeedForward.from_block(Block(IDLE_EXPERT), width, role="no instruction")]
    router_rows = [Lin()]
    for family in present:
        opcodes = [op.mnemonic for op in family.opcodes]
        expert = FeedForward.from_block(family.blocks[index], width, family.role, opcodes)
        expert.name = family.name
        experts.append(expert)
        router_rows.append(ctx.opcode(*family.opcodes))
    router_w, router_b = rows_to_matrix(router_rows, width)
    return Layer(heads, shared_ff, router_w, router_b, experts)


def _check_no_token_writes(residual: Residual, layers: list[Layer]) -> None:
    """Reject any layer output into a token dimension (keys and values read those)."""
    for index, layer in enumerate(layers):
        outputs = [head.wo for head in layer.heads]
        blocks = ([layer.shared] if layer.shared else []) + layer.experts
        outputs += [block.w2 for block in blocks]
        for matrix in outputs:
            rows = np.unique(matrix.nonzero()[0])
            if rows.size and rows.min() < residual.token_width:
                name = residual.layout.owner[int(rows.min())]
                raise ValueError(f"layer {index} writes token dimension {name}")
        for block in blocks:
            touched = np.nonzero(block.b2[: residual.token_width])[0]
            if touched.size:
                raise ValueError(f"layer {index} block {block.name} biases a token dimension")


def _check_embedding_domain(residual: Residual, embed: list[np.ndarray]) -> None:
    """Check that every token's embedding lies in the declared domain of each dimension."""
    low = sum(table.min(axis=0) for table in embed)
    high = sum(table.max(axis=0) for table in embed)
    for dim in range(residual.token_width):
        declared_low, declared_high = residual.layout.domain[dim]
        if low[dim] < declared_low or high[dim] > declared_high:
            raise ValueError(
                f"embedding of {residual.layout.owner[dim]} reaches [{low[dim]}, {high[dim]}], "
                f"outside its declared domain [{declared_low}, {declared_high}]"
            )


def _metadata(residual, numbering, layers, certificate, families, covered) -> dict:
    metadata = tk.schema_metadata(numbering)
    metadata["dtype"] = "float64"
    metadata["D"] = residual.width
    metadata["covered_opcodes"] = covered
    metadata["layers"] = [_layer_metadata(layer) for layer in layers]
    metadata["certificate"] = certificate.as_json()
    metadata["residual"] = {
        name: [vec[0], len(vec)] for name, vec in residual.layout.names.items()
    }
    return metadata


def _layer_metadata(layer: Layer) -> dict:
    heads = [
        {"name": h.name, "role": h.role, "lookup": h.lookup, "d_key": h.wk.shape[0],
         "d_value": h.wv.shape[0], "key_bits": h.key_bits}
        for h in layer.heads
    ]  # fmt: skip
    shared = None
    if layer.shared is not None:
        shared = {"role": layer.shared.role, "hidden": layer.shared.hidden}
    experts = [
        {"name": e.name, "role": e.role, "opcodes": e.opcodes, "hidden": e.hidden}
        for e in layer.experts
    ]
    return {"heads": heads, "shared": shared, "experts": experts}
