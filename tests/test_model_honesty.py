"""The model, not the runtime, executes programs: a shuffled opcode numbering runs
unchanged through the same runtime, breaking one expert or head breaks exactly the
programs that need it, and the builder rejects a domain it cannot certify."""

from __future__ import annotations

import random

import numpy as np
import pytest
from model_helpers import outcome

from tlc.compiler.assembler import assemble
from tlc.model import tokens as tk
from tlc.model.build import build_model
from tlc.model.certificate import CertificateError
from tlc.model.weights import (
    load_weights,
    model_tensors,
    save_weights,
    universal_model,
    write_weight_file,
)
from tlc.runtime import reference, torch_runner

SWAP_PROGRAM = "PUSH 1\nPUSH 2\nSWAP\nSUB\nHALT"
NO_SWAP_PROGRAM = "PUSH 2\nPUSH 1\nSUB\nPUSH 5\nADD\nHALT"
DEEP_POP_PROGRAM = "PUSH 1\nPUSH 2\nPUSH 3\nPUSH 4\nPUSH 5\nPOP\nPOP\nPOP\nPOP\nHALT"
LOOP_PROGRAM = "PUSH 3\nloop: PUSH 1\nSUB\nDUP\nJNZ loop\nPUSH 0xFFFFFFF0\nPUSH 33\n" \
               "I32.STORE8 0\nHALT"  # fmt: skip


def _run(source: str, weights=None):
    return torch_runner.run_program(assemble(source, "t.tasm"), weights=weights, stdin=b"z")


def _write(path, tensors: dict, metadata: dict) -> str:
    write_weight_file(path, tensors, metadata)
    return str(path)


def _universal_file(tmp_path):
    model = universal_model()
    path = tmp_path / "universal.safetensors"
    save_weights(model, path)
    return load_weights(path)


def _expert_index(metadata: dict, layer: int, name: str) -> int:
    names = [expert["name"] for expert in metadata["layers"][layer]["experts"]]
    return names.index(name)


def _head_index(metadata: dict, layer: int, name: str) -> int:
    names = [head["name"] for head in metadata["layers"][layer]["heads"]]
    return names.index(name)


@pytest.fixture(scope="module")
def permuted_weights(tmp_path_factory):
    numbering = tk.default_numbering()
    random.Random(7).shuffle(numbering)
    path = tmp_path_factory.mktemp("permuted") / "permuted.safetensors"
    save_weights(build_model(numbering), path)
    return path, numbering


def test_permuted_numbering_changes_weights(permuted_weights):
    path, numbering = permuted_weights
    tensors, metadata = load_weights(path)
    default, _ = model_tensors(universal_model())
    assert metadata["opcodes"] == numbering
    assert metadata["opcodes"] != tk.default_numbering()
    changed = [name for name in default if name.endswith(".cols")
               and not np.array_equal(default[name], tensors[name])]  # fmt: skip
    assert any(".router." in name for name in changed)
    assert any(".shared." in name for name in changed)


@pytest.mark.parametrize("source", [SWAP_PROGRAM, NO_SWAP_PROGRAM, DEEP_POP_PROGRAM,
                                    LOOP_PROGRAM, "CALL 3\nPUSH 1\nHALT\nPUSH 2\nRETURN",
                                    ".memory 8\nPUSH 4\nPUSH 0x01020304\nI32.STORE 0\n"
                                    "PUSH 5\nI32.LOAD16_S 0\nHALT"])  # fmt: skip
def test_permuted_numbering_runs_unchanged(permuted_weights, source):
    path, _ = permuted_weights
    program = assemble(source, "t.tasm")
    expected = reference.run_program(program, stdin=b"z")
    expected_trace: list[str] = []
    permuted_trace: list[str] = []
    reference.run_program(program, stdin=b"z", trace=expected_trace.append)
    actual = torch_runner.run_program(program, stdin=b"z", weights=path,
                                      trace=permuted_trace.append)  # fmt: skip
    assert outcome(actual) == outcome(expected)
    assert permuted_trace == expected_trace


def test_zeroed_expert_breaks_only_its_opcode(tmp_path):
    tensors, metadata = _universal_file(tmp_path)
    expert = _expert_index(metadata, 0, "swap")
    tensors[f"layers.0.experts.{expert}.w2.values"] = np.zeros_like(
        tensors[f"layers.0.experts.{expert}.w2.values"]
    )
    broken = _write(tmp_path / "no_swap.safetensors", tensors, metadata)
    assert outcome(_run(SWAP_PROGRAM, broken)) != outcome(_run(SWAP_PROGRAM))
    assert outcome(_run(NO_SWAP_PROGRAM, broken)) == outcome(_run(NO_SWAP_PROGRAM))
    assert outcome(_run(LOOP_PROGRAM, broken)) == outcome(_run(LOOP_PROGRAM))


def test_zeroed_head_breaks_only_programs_that_read_it(tmp_path):
    tensors, metadata = _universal_file(tmp_path)
    head = _head_index(metadata, 0, "reload_a")
    name = f"layers.0.heads.{head}.wo.values"
    tensors[name] = np.zeros_like(tensors[name])
    broken = _write(tmp_path / "no_reload.safetensors", tensors, metadata)
    assert outcome(_run(DEEP_POP_PROGRAM, broken)) != outcome(_run(DEEP_POP_PROGRAM))
    assert outcome(_run(SWAP_PROGRAM, broken)) == outcome(_run(SWAP_PROGRAM))


def test_zeroed_fetch_head_breaks_every_program(tmp_path):
    tensors, metadata = _universal_file(tmp_path)
    head = _head_index(metadata, 0, "fetch")
    name = f"layers.0.heads.{head}.wo.values"
    tensors[name] = np.zeros_like(tensors[name])
    broken = _write(tmp_path / "no_fetch.safetensors", tensors, metadata)
    for source in (SWAP_PROGRAM, NO_SWAP_PROGRAM, "HALT"):
        assert outcome(_run(source, broken)) != outcome(_run(source))


def test_widened_domain_is_rejected():
    with pytest.raises(CertificateError, match="2\\^53"):
        build_model(domain_overrides={"t0": (-float(1 << 40), float(1 << 40))})


def test_default_domain_is_certified():
    certificate = universal_model().metadata["certificate"]
    assert certificate["passed"] is True
    assert certificate["max_abs"] < certificate["bound"]
    assert certificate["bound"] == float(1 << 53)
