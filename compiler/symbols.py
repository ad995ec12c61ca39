"""Symbols that names resolve to: variables and functions, with their storage.

The checker creates symbols and records how the program uses them: whether a variable's
address is taken and where a function is first called. Lowering then decides where each
variable lives: a local slot, the call's memory frame or the data segment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tlc.compiler.astnodes import Span
from tlc.compiler.typesys import FunctionType, Type


class Storage(enum.Enum):
    GLOBAL = "global"  # file-scope variables and static locals: the data segment
    LOCAL = "local"  # automatic variables: a local slot or the call's memory frame
    PARAMETER = "parameter"


@dataclass(eq=False)
class Variable:
    name: str
    ctype: Type
    span: Span
    storage: Storage
    link_name: str  # unique name of a global in the linked program
    address_taken: bool = False
    init: Any = None  # the initializer plan of a global (see initializers.py)
    has_definition: bool = False  # a global with an initializer
    parameter_index: int | None = None


class Builtin(enum.Enum):
    """Functions that lowering expands or replaces by machine instructions."""

    PRINTF = "printf"  # the format string is expanded at compile time
    OUTPUT = "__tl_putc"  # stores a byte to the output port
    INPUT = "__tl_getc"  # loads a byte, or -1 at end of input, from the input port
    HALT = "__tl_halt"  # halts the machine with the argument as the result


@dataclass(eq=False)
class Function:
    name: str
    ctype: FunctionType
    span: Span
    link_name: str
    definition: Any = None  # the FunctionDef node
    from_header: bool = False
    builtin: Builtin | None = None
    first_call: Span | None = None
    param_names: list[str] = field(default_factory=list)
