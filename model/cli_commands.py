"""`tlc build` and `tlc inspect`, called by tlc/cli.py with its parsed arguments.

    tlc build FILE -o OUT.safetensors    universal weights + FILE's prompt + metadata
    tlc inspect W.safetensors            layers, heads, experts, sizes, certificate
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

from safetensors import SafetensorError

from tlc.model.weights import invalid_contents, load_weights, save_weights, universal_model


def build_command(args) -> int:
    """Write the universal weights with the program of `args.file` as the prompt."""
    from tlc.cli import UsageError, load_program

    program = load_program(args.file)
    try:
        program.validate()
    except ValueError as error:
        raise UsageError(f"{args.file}: {error}") from None
    model = universal_model()
    output = Path(args.output)
    cannot = f"{args.output}: cannot write the weight file"
    if str(args.output).endswith(("/", "\\")):
        raise UsageError(f"{cannot}: the path ends with a folder separator")
    if not output.parent.is_dir():
        raise UsageError(f"{cannot}: {output.parent} is not an existing folder")
    try:
        same_as_source = output.exists() and output.samefile(args.file)
    except OSError as error:
        raise UsageError(f"{cannot}: {error.strerror}") from None
    if same_as_source:
        raise UsageError(f"{cannot}: it is the program's source file; choose another "
                         "output path")  # fmt: skip
    if output.exists() and not output.is_file():
        # safetensors 0.8 renames a new file onto the path, which would replace a
        # device.
        raise UsageError(f"{cannot}: it exists and is not a regular file; choose another "
                         "output path")  # fmt: skip
    try:
        save_weights(model, output, program)
        # safetensors 0.8 creates the file with mode 0600. Give it the usual mode for new
        # files, 0666 minus the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(output, 0o666 & ~umask)
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{cannot}: {reason}") from None
    certificate = model.metadata["certificate"]
    print(f"wrote {args.output}: D={model.width}, {len(model.layers)} layers, "
          f"{len(program.instructions)} instructions, certificate "
          f"{'passed' if certificate['passed'] else 'FAILED'}", file=sys.stderr)  # fmt: skip
    return 0


def _matrix_sizes(tensors: dict, shapes: dict) -> dict[str, tuple[int, int]]:
    """Return {matrix name: (stored entries, dense entries)}."""
    return {
        name: (len(tensors[f"{name}.values"]), shape[0] * shape[1])
        for name, shape in shapes.items()
    }


def _group_sizes(sizes: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Sum the sizes by part: embedding, unembedding, and per layer heads/shared/experts."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, (stored, dense) in sizes.items():
        parts = name.split(".")
        key = parts[0] if parts[0] in ("embed", "unembed") else ".".join(parts[:4])
        if parts[0] == "layers" and parts[2] in ("shared", "router"):
            key = ".".join(parts[:3])
        groups[key][0] += stored
        groups[key][1] += dense
    return groups


def inspect_command(args) -> int:
    """Print what a weight file contains, for people."""
    from tlc.cli import UsageError
    from tlc.mojo.weights import check_structure

    try:
        tensors, metadata = load_weights(args.weights)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the weight file {error}") from None
    try:
        # The runtimes' structure checks, so that inspect accepts only files they run.
        check_structure(tensors, metadata, str(args.weights))
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        return _describe(args, tensors, metadata)
    except (KeyError, IndexError, TypeError) as error:
        problem = "the metadata or the tensors are incomplete"
        raise UsageError(invalid_contents(args.weights, problem, error)) from None


def _describe(args, tensors: dict, metadata: dict) -> int:
    out = sys.stdout
    sizes = _matrix_sizes(tensors, metadata["shapes"])
    groups = _group_sizes(sizes)
    stored = sum(s for s, _ in sizes.values())
    dense = sum(d for _, d in sizes.values())
    print(f"{args.weights}: format {metadata['format']}, ISA {metadata['isa']}, "
          f"dtype {metadata['dtype']}", file=out)  # fmt: skip
    print(f"residual width D={metadata['D']}, {len(metadata['fields'])} token fields, "
          f"{len(metadata['layers'])} layers", file=out)  # fmt: skip
    print(f"parameters: {stored} stored nonzero weights of {dense} dense entries "
          f"({100.0 * (1 - stored / max(dense, 1)):.3f}% sparse)", file=out)  # fmt: skip
    print(f"computes {len(metadata['covered_opcodes'])} of {len(metadata['opcodes'])} "
          f"opcodes", file=out)  # fmt: skip
    missing = sorted(set(metadata["opcodes"]) - set(metadata["covered_opcodes"]))
    if missing:
        print(f"  not computed (programs using them are rejected): {' '.join(missing)}",
              file=out)  # fmt: skip
    for key in ("embed", "unembed"):
        print(f"{key}: {groups[key][0]} weights", file=out)
    for index, layer in enumerate(metadata["layers"]):
        _print_layer(out, index, layer, groups)
    _print_certificate(out, metadata["certificate"])
    program = metadata.get("program")
    if program is not None:
        print(f"program: {program['source']}, {program['instructions']} instructions, "
              f"memory {program['memory_size']} bytes, prompt of "
              f"{len(tensors['prompt'])} tokens", file=out)  # fmt: skip
    return 0


def _print_layer(out, index: int, layer: dict, groups) -> None:
    print(f"layer {index}:", file=out)
    for h, head in enumerate(layer["heads"]):
        weights = groups[f"layers.{index}.heads.{h}"][0]
        print(f"  head {h} {head['name']} ({head['lookup']}, d_key={head['d_key']}, "
              f"d_value={head['d_value']}, {weights} weights): {head['role']}",
              file=out)  # fmt: skip
    if layer["shared"] is not None:
        weights = groups[f"layers.{index}.shared"][0]
        print(f"  shared block: {layer['shared']['hidden']} neurons, {weights} weights: "
              f"{layer['shared']['role']}", file=out)  # fmt: skip
    for e, expert in enumerate(layer["experts"]):
        weights = groups[f"layers.{index}.experts.{e}"][0]
        opcodes = " ".join(expert["opcodes"]) or "-"
        print(f"  expert {e} {expert['name']} [{opcodes}]: {expert['hidden']} neurons, "
              f"{weights} weights", file=out)  # fmt: skip


def _print_certificate(out, certificate: dict) -> None:
    verdict = "passed" if certificate["passed"] else "FAILED"
    print(f"exactness certificate ({certificate['dtype']}): max |value| "
          f"{certificate['max_abs']:.6g} < bound {certificate['bound']:.6g} (2^53): "
          f"{verdict}", file=out)  # fmt: skip
    by_layer: dict[str, float] = defaultdict(float)
    for entry in certificate["entries"]:
        key = str(entry["layer"])
        by_layer[key] = max(by_layer[key], entry["max_abs"])
    for layer, largest in by_layer.items():
        print(f"  {layer}: max |value| {largest:.6g}", file=out)
