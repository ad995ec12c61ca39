"""Build the Mojo extension module `tlc_mojo_engine` on first use and cache it.

The cached library is keyed by a hash of every `.mojo` file in this folder, the Mojo
compiler version and the Python version, so editing a source rebuilds it and an
unchanged tree loads in milliseconds. The cache folder is `$TLC_CACHE_DIR`, else
`$XDG_CACHE_HOME/tlc`, else `~/.cache/tlc`.

The build runs the `mojo` launcher installed beside the Python interpreter by the `mojo`
package, else `mojo` from PATH:

    mojo build tlc_mojo_engine.mojo --emit shared-lib -I <this folder> -o <cache>/...so
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from tlc.cache import cache_dir

logger = logging.getLogger("tlc.mojo")
logger.addHandler(logging.NullHandler())

SOURCE_DIR = Path(__file__).resolve().parent
MODULE_NAME = "tlc_mojo_engine"
ROOT_SOURCE = SOURCE_DIR / f"{MODULE_NAME}.mojo"
BUILD_TIMEOUT_SECONDS = 600
# Variables that loading a Mojo extension sets in the process environment.
_ENVIRONMENT_SET_BY_MOJO = ("PYTHONPATH", "PYTHONEXECUTABLE", "MOJO_PYTHON_LIBRARY")
# Lines that the compiler prints on every run, whatever the build does.
_NOISE_PREFIXES = ("Failed to initialize Crashpad",)

_loaded: ModuleType | None = None
_failure: MojoBuildError | None = None


class MojoBuildError(RuntimeError):
    """The Mojo extension could not be built or loaded. The message gives the reason
    and the next step."""


class MojoCompilerMissing(MojoBuildError):
    """No Mojo compiler is installed, so the extension cannot be built on this machine."""


def _compiler_version() -> str:
    try:
        return importlib.metadata.version("mojo")
    except importlib.metadata.PackageNotFoundError:
        return "mojo-from-path"


def source_hash() -> str:
    """Return a hash of the Mojo sources, the compiler version and the Python version."""
    hasher = hashlib.sha256()
    hasher.update(_compiler_version().encode())
    hasher.update(sys.version.encode())
    for path in sorted(SOURCE_DIR.glob("*.mojo")):
        hasher.update(path.name.encode())
        hasher.update(b"\0")
        hasher.update(path.read_bytes())
        hasher.update(b"\0")
    return hasher.hexdigest()[:20]


def library_path() -> Path:
    """Return where the extension for the current sources is (or will be) cached."""
    return cache_dir() / "mojo" / source_hash() / f"{MODULE_NAME}.so"


def _compiler_command() -> list[str]:
    """Return the mojo executable: the launcher that the `mojo` Python package installs
    beside this interpreter, else `mojo` from PATH.

    The launcher is run as a program rather than imported, because the `mojo` folder of
    this repository shadows the `mojo` package when the repository root is on sys.path.
    """
    beside_python = Path(sys.executable).parent / "mojo"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return [str(beside_python)]
    found = shutil.which("mojo")
    if found is None:
        raise MojoCompilerMissing(
            "the Mojo compiler was not found: install the `mojo` Python package "
            "(pip install 'mojo>=1.2,<1.3') or put `mojo` on PATH"
        )
    return [found]


def _clean_output(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.startswith(_NOISE_PREFIXES)]
    return "\n".join(lines).strip()


def build(target: Path | None = None) -> Path:
    """Compile the extension to `target` (default: `library_path()`) and return it.

    Writes to a temporary file first and renames it, so concurrent builds never leave
    a half-written library behind. Raises MojoBuildError with the compiler's message.
    """
    target = library_path() if target is None else target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = _compiler_command()
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [*prefix, "build", str(ROOT_SOURCE), "--emit", "shared-lib",
               "-I", str(SOURCE_DIR), "-o", temporary]  # fmt: skip
    logger.info("building the Mojo extension: %s", " ".join(command))
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS
        )
        if completed.returncode != 0:
            message = _clean_output(completed.stderr + completed.stdout)
            raise MojoBuildError(
                f"building the Mojo runtime failed (exit status {completed.returncode}):\n"
                f"{message}\nFix the error in {SOURCE_DIR}, or run with --backend torch."
            )
        os.replace(temporary, target)
    except subprocess.TimeoutExpired:
        raise MojoBuildError(
            f"building the Mojo runtime timed out after {BUILD_TIMEOUT_SECONDS} s"
        ) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def _c_getenv(name: str) -> bytes | None:
    """Return a variable of the C-level environment, which os.environ does not track."""
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    return getenv(name.encode())


def _import_library(path: Path) -> ModuleType:
    """Import the extension, then undo the environment changes that loading it makes.

    Loading a Mojo 1.2 extension sets PYTHONPATH=":" and two more variables in the
    C-level environment. Child processes inherit that environment, and the empty
    PYTHONPATH entries put their working directory on sys.path, where this repository's
    `mojo` folder shadows the `mojo` package (the compiler launcher then fails).
    """
    saved = {name: _c_getenv(name) for name in _ENVIRONMENT_SET_BY_MOJO}
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    if spec is None:
        raise MojoBuildError(f"cannot load the Mojo extension at {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    for name, value in saved.items():
        if _c_getenv(name) == value:
            continue
        if value is None:
            os.unsetenv(name)
        else:
            os.putenv(name, value.decode())
    return module


def load_extension() -> ModuleType:
    """Return the extension module, building it first when the cache has none.

    Raises MojoBuildError when the build or the import fails; the failure is
    remembered, so later calls in the same process raise at once.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise _failure
    try:
        path = library_path()
        if not path.exists():
            build(path)
        _loaded = _import_library(path)
    except MojoBuildError as error:
        _failure = error
        raise
    except (OSError, ImportError) as error:
        _failure = MojoBuildError(f"loading the Mojo extension failed: {error}")
        raise _failure from error
    return _loaded


def unavailable_reason() -> str | None:
    """Return why the Mojo runtime cannot run here, or None when it can."""
    try:
        load_extension()
    except MojoBuildError as error:
        return str(error)
    return None


def is_available() -> bool:
    """Return True when the extension is built (building it if needed) and loads."""
    reason = unavailable_reason()
    if reason is not None:
        logger.warning("the Mojo runtime is not available: %s", reason)
    return reason is None
