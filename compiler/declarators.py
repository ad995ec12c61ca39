"""Types from declaration specifiers and declarators, with C's rules and tlc's limits.

A declarator is read inside out: `int *a[3]` applies `[3]` to the name first and `*` to
the result, so `a` is an array of 3 pointers to int. `build_declarator` walks the
`astnodes` declarator chain from the outside in, wrapping the specifier type at each
step, and returns the name with its full type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tlc.compiler import astnodes as ast
from tlc.compiler import typesys as ts
from tlc.compiler.astnodes import Span
from tlc.compiler.diagnostics import Reporter

# Accepted combinations of type words (sorted, `signed`/`unsigned` included) and their type.
_TYPE_WORDS: dict[tuple[str, ...], ts.Type] = {
    ("void",): ts.VOID,
    ("_Bool",): ts.BOOL,
    ("char",): ts.CHAR,
    ("char", "signed"): ts.CHAR,
    ("char", "unsigned"): ts.UCHAR,
    ("short",): ts.SHORT,
    ("int", "short"): ts.SHORT,
    ("short", "signed"): ts.SHORT,
    ("int", "short", "signed"): ts.SHORT,
    ("short", "unsigned"): ts.USHORT,
    ("int", "short", "unsigned"): ts.USHORT,
    ("int",): ts.INT,
    ("signed",): ts.INT,
    ("int", "signed"): ts.INT,
    ("unsigned",): ts.UINT,
    ("int", "unsigned"): ts.UINT,
}


@dataclass
class Specifiers:
    ctype: ts.Type
    static: bool


@dataclass
class ParameterInfo:
    name: str | None
    span: Span
    ctype: ts.Type


@dataclass
class Declared:
    """A declarator resolved to a name and type; `params` for a function declarator."""

    name: str | None
    span: Span
    ctype: ts.Type
    params: list[ParameterInfo] = field(default_factory=list)


def read_specifiers(specs: ast.DeclSpecs, reporter: Reporter) -> Specifiers:
    """Return the type and storage class that the specifier words denote."""
    words = [word for word, _ in specs.words]
    counts = Counter(words)
    static = counts.pop("static", 0) > 0
    const = counts.pop("const", 0) > 0
    type_words = sorted(counts.elements())
    ctype = _TYPE_WORDS.get(tuple(type_words))
    if ctype is None:
        if not type_words:
            reporter.error(specs.span, "type specifier missing in declaration")
        elif counts["signed"] and counts["unsigned"]:
            reporter.error(specs.span, "both 'signed' and 'unsigned' in declaration "
                           "specifiers")
        else:
            spelled = " ".join(word for word in words if word not in ("static", "const"))
            reporter.error(specs.span, f"invalid type '{spelled}'; two or more data types "
                           "in declaration specifiers")
        ctype = ts.ERROR
    if const:
        ctype = ts.with_const(ctype)
    return Specifiers(ctype, static)


class DeclaratorBuilder:
    """Applies declarators to a base type; array sizes go through `evaluate_size`."""

    def __init__(self, reporter: Reporter, evaluate_size: Callable[[ast.Expr], int | None]):
        self.reporter = reporter
        self.evaluate_size = evaluate_size
        self.allow_variadic = False  # only the stdlib headers declare printf with `...`

    def build(self, declarator: ast.Declarator, base: ts.Type) -> Declared:
        ctype = base
        params: list[ParameterInfo] = []
        node = declarator
        while not isinstance(node, ast.NameDeclarator):
            if isinstance(node, ast.PointerDeclarator):
                ctype = self._pointer(node, ctype)
            elif isinstance(node, ast.ArrayDeclarator):
                ctype = self._array(node, ctype)
            elif isinstance(node, ast.FunctionDeclarator):
                ctype, params = self._function(node, ctype)
            else:
                assert isinstance(node, ast.ParenDeclarator)
            node = node.inner
        return Declared(node.name, node.span, ctype, params)

    def _pointer(self, node: ast.PointerDeclarator, target: ts.Type) -> ts.Type:
        if isinstance(target, ts.FunctionType):
            self.reporter.error(node.span, "function pointers are not supported")
            return ts.ERROR
        return ts.PointerType(target, node.const)

    def _array(self, node: ast.ArrayDeclarator, element: ts.Type) -> ts.Type:
        if ts.is_error(element):
            return element
        if isinstance(element, ts.FunctionType):
            self.reporter.error(node.span, "declaration of an array of functions")
            return ts.ERROR
        if ts.size_of(element) is None:
            what = "void" if ts.is_void(element) else "elements of unknown size"
            self.reporter.error(node.span, f"declaration of an array of {what}")
            return ts.ERROR
        if node.size is None:
            return ts.ArrayType(element, None)
        length = self.evaluate_size(node.size)
        if length is None:
            return ts.ERROR
        if length <= 0:
            self.reporter.error(node.size.span, f"array size must be positive, not {length}")
            return ts.ERROR
        return ts.ArrayType(element, length)

    def _function(self, node: ast.FunctionDeclarator, result: ts.Type
                  ) -> tuple[ts.Type, list[ParameterInfo]]:
        if isinstance(result, (ts.ArrayType, ts.FunctionType)):
            what = "an array" if isinstance(result, ts.ArrayType) else "a function"
            self.reporter.error(node.span, f"a function cannot return {what}")
            result = ts.ERROR
        if node.variadic and not self.allow_variadic:
            self.reporter.error(node.span, "variadic functions are not supported")
        params = self._parameters(node.params)
        ctype = ts.FunctionType(ts.unqualified(result), tuple(p.ctype for p in params),
                                node.variadic)
        return ctype, params

    def _parameters(self, nodes: list[ast.Parameter]) -> list[ParameterInfo]:
        params = []
        for node in nodes:
            specifiers = read_specifiers(node.specs, self.reporter)
            if specifiers.static:
                self.reporter.error(node.span, "'static' is not allowed on a parameter")
            declared = self.build(node.declarator, specifiers.ctype)
            ctype = declared.ctype
            if ts.is_void(ctype) and declared.name is None and len(nodes) == 1:
                return []  # `(void)`: no parameters
            if ts.is_void(ctype):
                self.reporter.error(node.span, "parameter has type void")
                ctype = ts.ERROR
            elif isinstance(ctype, ts.FunctionType):
                self.reporter.error(node.span, "function pointers are not supported")
                ctype = ts.ERROR
            elif isinstance(ctype, ts.ArrayType):
                ctype = ts.PointerType(ctype.element)  # C adjusts array parameters
            params.append(ParameterInfo(declared.name, declared.span, ctype))
        return params

