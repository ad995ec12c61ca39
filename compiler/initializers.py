"""Initializers: brace lists and strings flattened into (offset, value) plans.

`InitializerChecker.plan` checks an initializer against the declared type and returns an
`InitPlan`: the complete type (an `int a[] = {1, 2}` gets its length here) and a list of
scalar items at byte offsets, with C's brace elision (`int m[2][2] = {1, 2, 3, 4}`).
Bytes not covered by an item are zero, as C requires for partly initialized objects.

Globals need initializers that are constant at compile time: `static_value` evaluates an
item to an integer or to an address (a global or string literal plus a byte offset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlc.compiler import astnodes as ast
from tlc.compiler import typesys as ts
from tlc.compiler.symbols import Storage, Variable


@dataclass
class ScalarItem:
    offset: int
    ctype: ts.Type  # a scalar type
    expr: ast.Expr  # already converted to ctype


@dataclass
class BytesItem:
    """Bytes of a string literal that initializes a char array."""

    offset: int
    data: bytes


@dataclass
class InitPlan:
    ctype: ts.Type
    items: list[ScalarItem | BytesItem] = field(default_factory=list)


@dataclass(frozen=True)
class Address:
    """A constant address: a global variable or a string literal, plus a byte offset."""

    target: Variable | bytes
    offset: int


class _Cursor:
    def __init__(self, items: list):
        self.items = items
        self.position = 0

    def more(self) -> bool:
        return self.position < len(self.items)

    def peek(self):
        return self.items[self.position]

    def take(self):
        item = self.items[self.position]
        self.position += 1
        return item


def _is_char_array(ctype: ts.Type) -> bool:
    return isinstance(ctype, ts.ArrayType) and isinstance(ctype.element, ts.IntType) and (
        ctype.element.size == 1 and ctype.element.name != "_Bool"
    )


class InitializerChecker:
    """Builds initializer plans; mixed into the Checker, which supplies the expression
    rules."""

    def plan(self, ctype: ts.Type, init: ast.Initializer) -> InitPlan:
        plan = InitPlan(ctype)
        if isinstance(ctype, ts.ArrayType) and ctype.length is None:
            length = self._unknown_length(ctype, init, plan)
            ctype = plan.ctype = ts.ArrayType(ctype.element, length)
        else:
            self._initialize(ctype, init, 0, plan)
        return plan

    def _unknown_length(self, ctype: ts.ArrayType, init, plan: InitPlan) -> int:
        if _is_char_array(ctype) and self._string_of(init) is not None:
            string = self._string_of(init)
            plan.items.append(BytesItem(0, string.data + b"\0"))
            return len(string.data) + 1
        if not isinstance(init, ast.InitList):
            self.error(init, "array must be initialized with a brace-enclosed initializer")
            return 1
        cursor = _Cursor(init.items)
        count = self._fill_array(ctype, cursor, 0, plan)
        self._check_excess(cursor)
        return max(count, 1)

    def _initialize(self, ctype: ts.Type, init, offset: int, plan: InitPlan) -> None:
        if isinstance(ctype, ts.ArrayType):
            string = self._string_of(init) if _is_char_array(ctype) else None
            if string is not None:
                self._string_item(ctype, string, offset, plan)
            elif isinstance(init, ast.InitList):
                cursor = _Cursor(init.items)
                self._fill_array(ctype, cursor, offset, plan)
                self._check_excess(cursor)
            else:
                self.error(init, "array must be initialized with a brace-enclosed "
                           "initializer")
            return
        if isinstance(init, ast.InitList):
            if not init.items:
                self.error(init, "empty scalar initializer")
                return
            if len(init.items) > 1:
                self.error(init.items[1], "excess elements in scalar initializer")
            init = init.items[0]
            if isinstance(init, ast.InitList):
                self.error(init, "braces around scalar initializer")
                return
        expr = self.assign_convert(self.rvalue(init), ctype, "initialization")
        plan.items.append(ScalarItem(offset, ts.unqualified(ctype), expr))

    def _string_of(self, init) -> ast.StringLiteral | None:
        if isinstance(init, ast.InitList) and len(init.items) == 1:
            init = init.items[0]
        return init if isinstance(init, ast.StringLiteral) else None

    def _string_item(self, ctype: ts.ArrayType, string: ast.StringLiteral, offset: int,
                     plan: InitPlan) -> None:
        string.ctype = ts.ArrayType(ts.CHAR, len(string.data) + 1)
        data = string.data + b"\0"
        if len(string.data) > ctype.length:
            self.error(string, f"initializer-string for an array of {ctype.length} chars is "
                       "too long")
        plan.items.append(BytesItem(offset, data[: ctype.length]))

    def _fill_array(self, ctype: ts.ArrayType, cursor: _Cursor, offset: int,
                    plan: InitPlan) -> int:
        """Initialize elements from `cursor` (eliding braces); return how many."""
        element = ctype.element
        size = ts.size_of(element)
        count = 0
        while cursor.more() and (ctype.length is None or count < ctype.length):
            item = cursor.peek()
            at = offset + count * size
            if isinstance(element, ts.ArrayType) and not self._starts_aggregate(element, item):
                self._fill_array(element, cursor, at, plan)
            else:
                self._initialize(element, cursor.take(), at, plan)
            count += 1
        return count

    def _starts_aggregate(self, element: ts.ArrayType, item) -> bool:
        if isinstance(item, ast.InitList):
            return True
        return _is_char_array(element) and isinstance(item, ast.StringLiteral)

    def _check_excess(self, cursor: _Cursor) -> None:
        if cursor.more():
            self.error(cursor.peek(), "excess elements in array initializer")


def static_value(expr: ast.Expr) -> int | Address | None:
    """Evaluate a global's initializer item: an integer, an address, or None."""
    if expr.value is not None:
        return expr.value
    if isinstance(expr, (ast.ImplicitCast, ast.Cast)):
        if ts.is_pointer(expr.ctype):
            return _static_address(expr.operand)
        return None
    return _static_address(expr)


def _static_address(expr: ast.Expr) -> Address | None:
    if isinstance(expr, (ast.ImplicitCast, ast.Cast)) and ts.is_pointer(expr.ctype):
        return _static_address(expr.operand)
    if isinstance(expr.ctype, ts.ArrayType):  # an array that decays to its address
        return _static_lvalue_address(expr)
    if isinstance(expr, ast.Unary) and expr.op == "&":
        return _static_lvalue_address(expr.operand)
    if isinstance(expr, ast.Binary) and expr.op in ("+", "-") and ts.is_pointer(expr.ctype):
        pointer, integer = (expr.left, expr.right)
        if ts.is_integer(pointer.ctype):
            pointer, integer = integer, pointer
        base = _static_address(pointer)
        if base is None or integer.value is None:
            return None
        step = integer.value * ts.size_of(expr.ctype.target)
        return Address(base.target, base.offset + (step if expr.op == "+" else -step))
    return None


def _static_lvalue_address(expr: ast.Expr) -> Address | None:
    if isinstance(expr, ast.Name):
        return _global_address(expr)
    if isinstance(expr, ast.StringLiteral):
        return Address(expr.data, 0)
    if isinstance(expr, ast.Index):
        base = _static_address(expr.base)
        if base is None or expr.index.value is None:
            return None
        return Address(base.target, base.offset + expr.index.value * ts.size_of(expr.ctype))
    if isinstance(expr, ast.Unary) and expr.op == "*":
        return _static_address(expr.operand)
    return None


def _global_address(expr: ast.Name) -> Address | None:
    symbol = expr.symbol
    if isinstance(symbol, Variable) and symbol.storage is Storage.GLOBAL:
        return Address(symbol, 0)
    return None
