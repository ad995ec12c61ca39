"""Shared fixtures: the backends under test and the WebAssembly conformance cases.

Every backend exposes `run_program(program, *, stdin, max_steps, trace, write_output)`.
The `backend` fixture runs a test once per backend named in $TLC_TEST_BACKENDS (a comma
list, default `ref,torch,mojo`) and skips the backends that are not built or not usable
on this machine.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import wast

from tlc.runtime.machine import RunResult

BACKEND_MODULES = {
    "ref": "tlc.runtime.reference",
    "torch": "tlc.runtime.torch_runner",
    "mojo": "tlc.mojo.runner",
}
CONFORMANCE_FILES = ("i32.wast", "address.wast", "endianness.wast")
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Backend:
    """A backend under test: its name and its `run_program` function."""

    name: str
    run_program: Callable[..., RunResult]


def backend_names() -> list[str]:
    """Return the backends to test, from $TLC_TEST_BACKENDS or all of them."""
    names = os.environ.get("TLC_TEST_BACKENDS", ",".join(BACKEND_MODULES))
    return [name.strip() for name in names.split(",") if name.strip()]


def load_backend(name: str) -> Backend:
    """Import backend `name`, or skip the calling test when it cannot run here."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKEND_MODULES)}")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as error:
        pytest.skip(f"backend {name} is not available: {error}")
    is_available = getattr(module, "is_available", None)
    if is_available is not None and not is_available():
        pytest.skip(f"backend {name} is not available on this machine")
    return Backend(name, module.run_program)


@pytest.fixture(params=backend_names())
def backend(request) -> Backend:
    return load_backend(request.param)


def conformance_cases(filename: str) -> list[wast.WastCase]:
    """Return the runnable cases of one conformance file, or none when it is missing."""
    path = wast.conformance_dir() / filename
    return wast.collect_cases(path) if path.exists() else []


@pytest.fixture
def conformance_dir() -> Path:
    path = wast.conformance_dir()
    if not path.is_dir():
        pytest.skip(f"conformance vectors not found at {path}; set TLC_CONFORMANCE_DIR")
    return path


@pytest.fixture(scope="session")
def mojo_extension():
    """Return the built Mojo extension, skipping only when no Mojo compiler is installed."""
    from tlc.mojo import build

    try:
        return build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
