"""The weight file and the token schema: round trips, metadata, prompt encoding, decoding,
and the Mojo runtime's reader on a file written by the builder."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tlc.compiler.assembler import assemble
from tlc.model import tokens as tk
from tlc.model.weights import (
    WeightFileError,
    decode_token_stream,
    encode_prompt,
    load_weights,
    model_tensors,
    save_weights,
    universal_model,
    write_weight_file,
)
from tlc.runtime import reference, torch_runner
from tlc.runtime.machine import Status, Trap

PROGRAM = '.memory 64\n.data 6 "hi"\nPUSH 6\nI32.LOAD16_U 0\nPUSH 1\nADD\nHALT'


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "program.safetensors"
    save_weights(universal_model(), path, assemble(PROGRAM, "p.tasm"))
    return path


def test_weight_file_round_trip(weight_file):
    tensors, metadata = load_weights(weight_file)
    expected, shapes = model_tensors(universal_model())
    assert metadata["shapes"] == shapes
    for name, value in expected.items():
        assert np.array_equal(tensors[name], value), name


def test_metadata_describes_the_model(weight_file):
    _, metadata = load_weights(weight_file)
    assert metadata["format"] == tk.FORMAT_VERSION
    assert metadata["dtype"] == "float64"
    assert [f["name"] for f in metadata["fields"]] == tk.SCHEMA.names
    assert metadata["kind"]["RUN"] == tk.kind_id("RUN")
    assert metadata["output"]["bits"] == [f"out_bit{i}" for i in range(8)]
    assert len(metadata["opcodes"]) == 55
    assert sorted(metadata["covered_opcodes"]) == sorted(metadata["opcodes"])
    assert metadata["program"]["memory_size"] == 64
    assert metadata["certificate"]["passed"] is True


def test_every_head_and_expert_has_a_role(weight_file):
    _, metadata = load_weights(weight_file)
    for layer in metadata["layers"]:
        for head in layer["heads"]:
            assert head["role"], head
            assert head["lookup"] in ("exact", "hardmax")
        for expert in layer["experts"][1:]:
            assert expert["opcodes"], expert
            assert expert["role"], expert


def test_prompt_layout():
    metadata = universal_model().metadata
    program = assemble(PROGRAM, "p.tasm")
    prompt = encode_prompt(metadata, program, b"ab")
    schema = tk.SCHEMA
    kinds = [tk.KIND_VALUES[t[schema.index("kind")]] for t in prompt]
    # sentinel, 5 instructions, 2 data words (bytes 6, 7 sit in word 1), 2 input bytes,
    # start state
    assert kinds == ["SENTINEL"] + ["CODE"] * 5 + ["DATA"] + ["INPUT"] * 2 + ["RUN"]
    assert schema.bits(prompt[0], "t0") == 64
    data = prompt[6]
    # Bytes 6 and 7 are channels 2 and 3 of word 1, so channels 0 and 1 stay unwritten.
    assert [data[schema.index("mwrite", c)] for c in range(4)] == [0, 0, 1, 1]
    assert schema.bits(data, "mkey2") == schema.bits(data, "mkey3") == 1
    assert schema.bits(data, "mkey0") == schema.bits(data, "mkey1") == 0
    assert (schema.bits(data, "aux_val") >> 16) & 0xFFFF == int.from_bytes(b"hi", "little")


def test_prompt_input_tokens_carry_byte_and_index():
    metadata = universal_model().metadata
    program = assemble(PROGRAM, "p.tasm")
    stdin = bytes(range(256)) + b"tail"
    prompt = encode_prompt(metadata, program, stdin)
    compact = encode_prompt(metadata, program, stdin, tk.token_dtype(metadata))
    schema = tk.SCHEMA
    first = len(prompt) - len(stdin) - 1
    key_fields = schema.indices("aux_key")
    for index, byte in enumerate(stdin):
        row = prompt[first + index]
        assert tk.KIND_VALUES[row[schema.index("kind")]] == "INPUT"
        assert schema.bits(row, "aux_val") == byte + 256  # bit 8: the input head's hit flag
        assert row[key_fields].tolist() == [(index >> i) & 1 for i in range(len(key_fields))]
    assert compact.dtype == np.uint8
    assert np.array_equal(compact, prompt)


def test_prompt_rejects_long_input():
    program = assemble("HALT", "t")
    with pytest.raises(ValueError, match="input has"):
        encode_prompt(universal_model().metadata, program, bytes(tk.MAX_INPUT_BYTES + 1))


def test_stored_prompt_runs(weight_file):
    tensors, metadata = load_weights(weight_file)
    program = assemble(PROGRAM, "p.tasm")
    assert np.array_equal(tensors["prompt"], encode_prompt(metadata, program))
    result = torch_runner.run_program(program, weights=weight_file)
    assert result.status is Status.HALTED
    assert result.result == reference.run_program(program).result


def _token(**registers) -> np.ndarray:
    schema = tk.SCHEMA
    token = schema.empty_token()
    token[schema.index("kind")] = tk.kind_id(registers.pop("kind", "RUN"))
    token[schema.index("op")] = registers.pop("op", 0)
    for group, value in registers.items():
        schema.set_bits(token, group, value)
    return token


def test_decoder_builds_trace_and_result():
    metadata = universal_model().metadata
    program = assemble("PUSH 5\nHALT", "t")
    push = metadata["opcodes"].index("PUSH")
    halt = metadata["opcodes"].index("HALT")
    tokens = [_token(op=push, imm=5, ip=1, sp=1, t0=5),
              _token(kind="HALT", op=halt, ip=2, sp=1, t0=5)]  # fmt: skip
    result, lines = decode_token_stream(metadata, program, tokens)
    assert lines == ["step=0 ip=0 op=PUSH imm=5 depth=1 top=5 line=1",
                     "step=1 ip=1 op=HALT imm=- depth=1 top=5 line=2"]  # fmt: skip
    assert result.status is Status.HALTED
    assert result.result == 5
    assert result.steps == 2


def test_decoder_reports_trap_at_previous_ip():
    metadata = universal_model().metadata
    program = assemble("PUSH 5\nPOP\nPOP", "t")
    push = metadata["opcodes"].index("PUSH")
    tokens = [_token(op=push, imm=5, ip=1, sp=1, t0=5), _token(op=0, ip=2),
              _token(kind="STACK_UNDERFLOW")]  # fmt: skip
    result, lines = decode_token_stream(metadata, program, tokens)
    assert result.status is Status.TRAPPED
    assert result.trap is Trap.STACK_UNDERFLOW
    assert result.trap_ip == 2
    assert result.steps == 2
    assert len(lines) == 2


def test_mojo_reader_and_oracle_agree_with_torch(weight_file):
    weights_module = pytest.importorskip("tlc.mojo.weights")
    reference_module = pytest.importorskip("tlc.mojo.reference")
    weights = weights_module.load_weights(weight_file)
    assert weights.width == universal_model().width
    program = assemble(PROGRAM, "p.tasm")
    prompt = encode_prompt(weights.metadata, program)
    tokens, _ = reference_module.run_tokens(weights, prompt, 50)
    result, _ = decode_token_stream(weights.metadata, program, tokens)
    expected = torch_runner.run_program(program, weights=weight_file)
    assert result.status is expected.status
    assert result.result == expected.result
    assert result.steps == expected.steps


def test_load_rejects_file_without_checksum(tmp_path):
    tensors, metadata = load_weights(_copy(tmp_path))
    del metadata["checksum"]
    path = _save_unchecked(tensors, metadata, tmp_path / "plain.safetensors")
    with pytest.raises(WeightFileError, match="no checksum"):
        load_weights(path)


def test_load_rejects_edited_tensor(tmp_path):
    tensors, metadata = load_weights(_copy(tmp_path))
    name = next(name for name in sorted(tensors) if name.endswith(".values") and len(tensors[name]))
    tensors[name] = tensors[name].copy()
    tensors[name][0] += 1.0
    path = _save_unchecked(tensors, metadata, tmp_path / "edited.safetensors")
    with pytest.raises(WeightFileError, match="do not match the file's checksum"):
        load_weights(path)


def test_load_rejects_nan_with_valid_checksum(tmp_path):
    tensors, metadata = load_weights(_copy(tmp_path))
    tensors["layers.0.router.b"] = tensors["layers.0.router.b"].copy()
    tensors["layers.0.router.b"][1] = np.nan
    path = tmp_path / "nan.safetensors"
    write_weight_file(path, tensors, metadata)
    with pytest.raises(WeightFileError, match="not finite"):
        load_weights(path)


def test_write_weight_file_keeps_strided_tensors(tmp_path):
    """A transposed or sliced tensor reads back with the same values."""
    tensors, metadata = load_weights(_copy(tmp_path))
    name = "layers.0.router.b"
    tensors[name] = np.repeat(tensors[name], 2)[::2]
    tensors["prompt"] = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    path = tmp_path / "strided.safetensors"
    write_weight_file(path, tensors, metadata)
    loaded, _ = load_weights(path)
    assert np.array_equal(loaded[name], tensors[name])
    assert np.array_equal(loaded["prompt"], tensors["prompt"])


def test_torch_reloads_rewritten_file(tmp_path):
    path = _copy(tmp_path)
    first = torch_runner.load_model(path)
    tensors, metadata = load_weights(path)
    metadata["note"] = "rewritten"
    write_weight_file(path, tensors, metadata)
    second = torch_runner.load_model(path)
    assert second is not first
    assert second.metadata["note"] == "rewritten"


def _save_unchecked(tensors, metadata, path):
    """Write a weight file as given, without computing a new checksum."""
    save_file(tensors, str(path), metadata={tk.METADATA_KEY: json.dumps(metadata)})
    return path


def _copy(tmp_path):
    path = tmp_path / "universal.safetensors"
    save_weights(universal_model(), path)
    return path


def test_torch_runs_in_two_threads():
    # Different programs, so that runs sharing KV caches would fetch each other's code.
    names = ["countdown.tasm", "factorial.tasm", "hello.tasm", "upcase.tasm"] * 2
    examples = Path(__file__).resolve().parents[1] / "examples"
    programs = [assemble((examples / name).read_text(), name) for name in names]

    def run(program):
        return torch_runner.run_program(program, stdin=b"threads", max_steps=3000)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, programs))
    for program, result in zip(programs, results):
        expected = reference.run_program(program, stdin=b"threads", max_steps=3000)
        assert result.status == expected.status
        assert result.steps == expected.steps
        assert result.output == expected.output
        assert result.result == expected.result
