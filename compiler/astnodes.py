"""The abstract syntax tree of .tl programs: plain dataclasses with a source span each.

The parser (`parse.py`) builds these nodes. The checker (`check.py`) fills in the fields
marked "set by the checker": the C type of every expression, its folded constant value
and the symbol behind every name. It also wraps operands in `ImplicitCast` nodes where C
converts them implicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Span:
    """A source position: file name, line and column, both counting from 1."""

    file: str
    line: int
    column: int


@dataclass(eq=False)
class Node:
    span: Span


# --- expressions ----------------------------------------------------------------------


@dataclass(eq=False)
class Expr(Node):
    # Set by the checker: the C type, and the value when the expression is an integer
    # constant expression (a 32-bit pattern).
    ctype: Any = field(default=None, kw_only=True, repr=False)
    value: int | None = field(default=None, kw_only=True, repr=False)


@dataclass(eq=False)
class IntLiteral(Expr):
    number: int
    is_unsigned: bool  # the literal has type unsigned int (u suffix or hex/octal range)
    text: str


@dataclass(eq=False)
class CharLiteral(Expr):
    number: int  # the value of the int-typed character constant


@dataclass(eq=False)
class StringLiteral(Expr):
    data: bytes  # the bytes without the terminating NUL


@dataclass(eq=False)
class Name(Expr):
    name: str
    symbol: Any = field(default=None, kw_only=True, repr=False)  # set by the checker


@dataclass(eq=False)
class Unary(Expr):
    op: str  # one of - + ~ ! & *
    operand: Expr


@dataclass(eq=False)
class IncDec(Expr):
    op: str  # ++ or --
    prefix: bool
    operand: Expr


@dataclass(eq=False)
class Binary(Expr):
    op: str  # an arithmetic, bitwise, shift, comparison or logical (&& ||) operator
    left: Expr
    right: Expr


@dataclass(eq=False)
class Assign(Expr):
    op: str  # = or a compound assignment operator such as +=
    target: Expr
    source: Expr
    # Set by the checker for a compound assignment: the type `target op source` is
    # computed in before the result is converted back to the target's type.
    operation_type: Any = field(default=None, kw_only=True, repr=False)


@dataclass(eq=False)
class Conditional(Expr):
    condition: Expr
    then: Expr
    otherwise: Expr


@dataclass(eq=False)
class Comma(Expr):
    left: Expr
    right: Expr


@dataclass(eq=False)
class Cast(Expr):
    type_name: TypeName
    operand: Expr


@dataclass(eq=False)
class ImplicitCast(Expr):
    """A conversion that C applies without a cast; `ctype` is the target type."""

    operand: Expr


@dataclass(eq=False)
class SizeofExpr(Expr):
    operand: Expr


@dataclass(eq=False)
class SizeofType(Expr):
    type_name: TypeName


@dataclass(eq=False)
class Index(Expr):
    base: Expr
    index: Expr


@dataclass(eq=False)
class Call(Expr):
    callee: Expr
    args: list[Expr]
    # Set by the checker for printf: the parsed conversions of the format string.
    format: Any = field(default=None, kw_only=True, repr=False)


# --- declarations ---------------------------------------------------------------------


@dataclass(eq=False)
class DeclSpecs(Node):
    """The specifier words before a declarator, such as `static const unsigned char`."""

    words: list[tuple[str, Span]]


@dataclass(eq=False)
class Declarator(Node):
    """A declarator: `NameDeclarator` wrapped in pointer, array and function parts."""


@dataclass(eq=False)
class NameDeclarator(Declarator):
    name: str | None  # None in an abstract declarator (a type name or unnamed parameter)


@dataclass(eq=False)
class PointerDeclarator(Declarator):
    inner: Declarator
    const: bool


@dataclass(eq=False)
class ArrayDeclarator(Declarator):
    inner: Declarator
    size: Expr | None


@dataclass(eq=False)
class FunctionDeclarator(Declarator):
    inner: Declarator
    params: list[Parameter]
    variadic: bool


@dataclass(eq=False)
class ParenDeclarator(Declarator):
    """A parenthesised declarator such as the `(*f)` of a function pointer."""

    inner: Declarator


@dataclass(eq=False)
class Parameter(Node):
    specs: DeclSpecs
    declarator: Declarator


@dataclass(eq=False)
class TypeName(Node):
    specs: DeclSpecs
    declarator: Declarator


@dataclass(eq=False)
class InitList(Node):
    items: list[Initializer]


Initializer = Expr | InitList


@dataclass(eq=False)
class InitDeclarator(Node):
    declarator: Declarator
    init: Initializer | None
    symbol: Any = field(default=None, kw_only=True, repr=False)  # set by the checker


@dataclass(eq=False)
class Declaration(Node):
    specs: DeclSpecs
    items: list[InitDeclarator]


@dataclass(eq=False)
class FunctionDef(Node):
    specs: DeclSpecs
    declarator: Declarator
    body: Compound
    symbol: Any = field(default=None, kw_only=True, repr=False)  # set by the checker
    # Set by the checker: the symbols of the parameters, in order.
    param_symbols: list = field(default_factory=list, kw_only=True, repr=False)


@dataclass(eq=False)
class TranslationUnit(Node):
    items: list[Declaration | FunctionDef]


# --- statements -----------------------------------------------------------------------


@dataclass(eq=False)
class Stmt(Node):
    pass


@dataclass(eq=False)
class Compound(Stmt):
    items: list[Stmt | Declaration]


@dataclass(eq=False)
class ExprStmt(Stmt):
    expr: Expr | None


@dataclass(eq=False)
class If(Stmt):
    condition: Expr
    then: Stmt
    otherwise: Stmt | None


@dataclass(eq=False)
class While(Stmt):
    condition: Expr
    body: Stmt


@dataclass(eq=False)
class DoWhile(Stmt):
    body: Stmt
    condition: Expr


@dataclass(eq=False)
class For(Stmt):
    init: Declaration | Expr | None
    condition: Expr | None
    step: Expr | None
    body: Stmt


@dataclass(eq=False)
class Break(Stmt):
    pass


@dataclass(eq=False)
class Continue(Stmt):
    pass


@dataclass(eq=False)
class Return(Stmt):
    value: Expr | None


@dataclass(eq=False)
class Switch(Stmt):
    condition: Expr
    body: Stmt
    # Set by the checker: the case statements and the default statement of this switch.
    cases: list = field(default_factory=list, kw_only=True, repr=False)
    default: Any = field(default=None, kw_only=True, repr=False)


@dataclass(eq=False)
class Case(Stmt):
    value: Expr
    body: Stmt


@dataclass(eq=False)
class Default(Stmt):
    body: Stmt
