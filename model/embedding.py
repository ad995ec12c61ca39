"""The embedding (token fields to residual) and the unembedding (residual to next token).

Every logit is an integer-valued linear function of 0/1 residual values, and exactly one
value of each field gets the highest logit, so no argmax of a generated token ties:

* a binary field with next bit b: logits (1, 2b), key bits and write flags included;
* `op` and `aux_tag`: twice the one-hot dims, and 1 for the "none" value;
* `kind`: twice the next_kind dims of HALT and the traps, and 1 for RUN;
* `code_op`, `code_imm`: bias only, so every generated token has "no instruction" there.

Each residual dimension adds to one logit of a field, so the Mojo runtime's unembedding
adds one weight per field for each nonzero dimension.
"""

from __future__ import annotations

import numpy as np

from tlc.model import tokens as tk
from tlc.model.residual import DELTA_REGISTERS, WINDOW, Residual

# The logit of the kinds that only the prompt contains; never generated.
PROMPT_KIND_LOGIT = -1.0


def build_embedding(residual: Residual) -> list[np.ndarray]:
    """Return E_f, shape (V_f, D), for every field f in token order."""
    schema = tk.SCHEMA
    tables = [np.zeros((vocab, residual.width)) for vocab in schema.vocabs]
    for group in tk.GROUPS:
        for i, index in enumerate(schema.indices(group.name)):
            _embed_field(residual, group.name, i, tables[index])
    return tables


def _embed_field(residual: Residual, group: str, i: int, table: np.ndarray) -> None:
    if group == "kind":
        table[np.arange(len(tk.KIND_VALUES)), list(residual["kind"])] = 1.0
    elif group == "code_op":
        table[np.arange(tk.NO_OPCODE), list(residual["code_op"])] = 1.0
    elif group in (*DELTA_REGISTERS, "code_imm", *WINDOW, "aux_val"):
        table[1, residual[group][i]] = 1.0
    elif group == "aux_tag":
        for tag in range(1, len(tk.AUX_TAGS)):
            for j, dim in enumerate(residual["aux_tag_pm"]):
                table[tag, dim] = 1.0 if (tag >> j) & 1 else -1.0
            table[tag, residual["aux_present"][0]] = 1.0
    elif group == "aux_key" or group.startswith("mkey"):
        # Key bit b gives the key component 2b - 1.
        dim = residual[f"{group}_pm"][i]
        table[0, dim] = -1.0
        table[1, dim] = 1.0
    elif group == "mwrite":
        table[1, residual[f"mkey{i}_present"][0]] = 1.0
    # op, imm (the echo of the executed instruction), out_valid and out_bit have no
    # embedding: the model never reads them back.


def build_unembedding(residual: Residual) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return (U_f, c_f) for every field: logits_f = U_f x + c_f."""
    schema = tk.SCHEMA
    matrices = [np.zeros((vocab, residual.width)) for vocab in schema.vocabs]
    biases = [np.zeros(vocab) for vocab in schema.vocabs]
    for group in tk.GROUPS:
        for i, index in enumerate(schema.indices(group.name)):
            _unembed_field(residual, group.name, i, matrices[index], biases[index])
    return matrices, biases


def _binary(matrix, bias, dims: list[int]) -> None:
    """Set the logits of a binary field to (1, 2b) for b = sum of x[dims]."""
    for dim in dims:
        matrix[1, dim] += 2.0
    bias[0] += 1.0


def _unembed_field(residual: Residual, group: str, i: int, matrix, bias) -> None:
    r = residual
    if group == "kind":
        for value, name in enumerate(tk.KIND_VALUES):
            if name in ("CODE", "DATA", "INPUT", "SENTINEL"):
                bias[value] = PROMPT_KIND_LOGIT
            elif name == "RUN":
                bias[value] = 1.0  # unless a HALT or trap bit is set
            else:
                matrix[value, r.next_kind(name)] = 2.0
    elif group in DELTA_REGISTERS:
        _binary(matrix, bias, [r[group][i], r[f"delta_{group}"][i]])
    elif group == "op":
        for value, dim in enumerate(r["fetched_op"]):
            matrix[value, dim] = 2.0
        bias[tk.NO_OPCODE] = 1.0
    elif group == "imm":
        _binary(matrix, bias, [r["fetched_imm"][i]])
    elif group == "code_op":
        bias[tk.NO_OPCODE] = 1.0  # only prompt tokens carry an instruction here
    elif group == "code_imm":
        bias[0] = 1.0
    elif group in WINDOW:
        _binary(matrix, bias, [r[f"next_{group}"][i]])
    elif group == "aux_tag":
        for tag, dim in enumerate(r["next_tag"], start=1):
            matrix[tag, dim] = 2.0
        bias[0] = 1.0
    elif group == "aux_key":
        _binary(matrix, bias, [r["next_aux_key"][i]])
    elif group == "aux_val":
        _binary(matrix, bias, [r["next_aux_val"][i]])
    elif group.startswith("mkey"):
        _binary(matrix, bias, [r[f"next_{group}"][i]])
    elif group == "mwrite":
        _binary(matrix, bias, [r["next_mkey_present"][i]])
    elif group == "out_valid":
        _binary(matrix, bias, [r["next_out_valid"][0]])
    elif group == "out_bit":
        _binary(matrix, bias, [r["next_out_bit"][i]])
    else:
        raise ValueError(f"no unembedding for field group {group!r}")
