"""Lowering of checked expressions to IR expression trees and straight-line statements.

Here C's typing turns into machine operations. The signedness of the operation type
picks DIV_S or DIV_U (and LT_S or LT_U, SHR_S or SHR_U). Pointer arithmetic is scaled
by the element size. A conversion to a narrow type truncates the word to its canonical
form:

    to _Bool:            x != 0
    to unsigned char:    x & 0xFF          to unsigned short:  x & 0xFFFF
    to char:             (x << 24) >> 24   to short:           (x << 16) >> 16  (SHR_S)

A conversion is free when every value of the source type is a value of the target type,
because values are kept canonical (see typesys.py).

`value` lowers an expression whose result is used; `effects` lowers one evaluated only
for its side effects into statements that never branch, so that both can be nested in
any expression through `ir.Sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlc.compiler import astnodes as ast
from tlc.compiler import constfold
from tlc.compiler import ir
from tlc.compiler import typesys as ts
from tlc.compiler.isa import WORD_MASK, Opcode
from tlc.compiler.printf_format import Conversion, Text
from tlc.compiler.symbols import Builtin, Function, Variable

_PLAIN_OPCODES = {
    "+": Opcode.ADD, "-": Opcode.SUB, "*": Opcode.MUL, "&": Opcode.AND, "|": Opcode.OR,
    "^": Opcode.XOR, "<<": Opcode.SHL, "==": Opcode.EQ, "!=": Opcode.NE,
}  # fmt: skip
# (signed, unsigned) opcode pairs.
_SIGNED_OPCODES = {
    "/": (Opcode.DIV_S, Opcode.DIV_U), "%": (Opcode.REM_S, Opcode.REM_U),
    ">>": (Opcode.SHR_S, Opcode.SHR_U), "<": (Opcode.LT_S, Opcode.LT_U),
    ">": (Opcode.GT_S, Opcode.GT_U), "<=": (Opcode.LE_S, Opcode.LE_U),
    ">=": (Opcode.GE_S, Opcode.GE_U),
}  # fmt: skip

# Library functions replaced by instructions when the program does not define its own.
INLINED_LIBRARY = ("putchar", "getchar", "exit", "abs")

# printf helpers in stdlib/stdio.tl and the flag bits they take.
PRINT_SIGNED = "__tl_print_signed"  # (int value, int width, int flags)
PRINT_UNSIGNED = "__tl_print_unsigned"  # (unsigned value, unsigned base, int width, flags)
PRINT_STRING = "__tl_print_string"  # (const char *s, int width, int flags)
PRINT_CHAR = "__tl_print_char"  # (int c, int width, int flags)
WRITE_STRING = "__tl_write"  # (const char *s): writes s without a newline
FLAG_LEFT = 1
FLAG_ZERO = 2
FLAG_UPPER = 4
# A text piece of printf up to this many bytes becomes one output instruction per byte;
# longer ones are written by a loop in WRITE_STRING.
INLINE_TEXT_LIMIT = 12


@dataclass
class SlotPlace:
    """An lvalue that lives in a local slot."""

    slot: int
    ctype: ts.Type


@dataclass
class MemoryPlace:
    """An lvalue in memory at `address`."""

    address: ir.Expr
    ctype: ts.Type


def opcode_for(op: str, operation_type: ts.Type) -> Opcode:
    if op in _PLAIN_OPCODES:
        return _PLAIN_OPCODES[op]
    signed, unsigned = _SIGNED_OPCODES[op]
    return signed if ts.is_signed(operation_type) else unsigned


def convert(value: ir.Expr, source: ts.Type, target: ts.Type) -> ir.Expr:
    """Convert a canonical `source` value to the canonical form of `target`."""
    if not isinstance(target, ts.IntType) or ts.is_void(target):
        return value  # pointers and 32-bit targets take every word as it is
    if target.name == "_Bool":
        if isinstance(source, ts.IntType) and source.name == "_Bool":
            return value
        return ir.Binary(Opcode.NE, value, ir.Const(0))
    if target.size == 4 or _fits(source, target):
        return value
    bits = 8 * target.size
    if not target.signed:
        return ir.Binary(Opcode.AND, value, ir.Const((1 << bits) - 1))
    shift = ir.Const(32 - bits)
    return ir.Binary(Opcode.SHR_S, ir.Binary(Opcode.SHL, value, shift), shift)


def _fits(source: ts.Type, target: ts.IntType) -> bool:
    """Return whether every value of `source` is a value of `target`."""
    if not isinstance(source, ts.IntType):
        return False
    if source.name == "_Bool":
        return True
    if source.signed == target.signed:
        return source.size <= target.size
    return not source.signed and source.size < target.size


def has_side_effects(expr: ir.Expr) -> bool:
    if isinstance(expr, (ir.Const, ir.SymbolAddress, ir.LocalGet)):
        return False
    if isinstance(expr, ir.Load):
        return has_side_effects(expr.address)
    if isinstance(expr, ir.Binary):
        return has_side_effects(expr.left) or has_side_effects(expr.right)
    if isinstance(expr, ir.Unary):
        return has_side_effects(expr.operand)
    if isinstance(expr, (ir.Logical,)):
        return has_side_effects(expr.left) or has_side_effects(expr.right)
    if isinstance(expr, (ir.Conditional, ir.Select)):
        return any(has_side_effects(e) for e in (expr.condition, expr.then, expr.otherwise))
    return True


def _slots_read(expr: ir.Expr) -> set[int] | None:
    """Return the slots a pure, cheap address reads, or None if it is not one."""
    if isinstance(expr, (ir.Const, ir.SymbolAddress)):
        return set()
    if isinstance(expr, ir.LocalGet):
        return {expr.slot}
    if isinstance(expr, ir.Binary) and expr.opcode is Opcode.ADD:
        if isinstance(expr.right, ir.Const) and isinstance(expr.left, ir.LocalGet):
            return {expr.left.slot}
    return None


def _slots_written(expr) -> set[int]:
    written: set[int] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, (ir.LocalTee, ir.SetLocal)):
            written.add(node.slot)
        if isinstance(node, ir.StoreTee):
            written.add(node.scratch)
        for name in getattr(node, "__slots__", ()):
            child = getattr(node, name)
            if isinstance(child, (ir.Expr, ir.Stmt)):
                stack.append(child)
            elif isinstance(child, tuple):
                stack.extend(child)
    return written


class ExpressionLowering:
    """Expression lowering; the function lowering supplies storage and temporaries."""

    line: int | None

    def temporary(self) -> int:  # pragma: no cover - provided by FunctionLowering
        raise NotImplementedError

    def variable_place(self, variable: Variable) -> SlotPlace | MemoryPlace:  # pragma: no cover
        raise NotImplementedError

    def string_symbol(self, data: bytes) -> str:  # pragma: no cover
        raise NotImplementedError

    def inlines_library(self, function: Function) -> bool:  # pragma: no cover
        raise NotImplementedError

    # --- values ---

    def value(self, node: ast.Expr) -> ir.Expr:
        if node.value is not None and ts.is_scalar(node.ctype):
            return ir.Const(constfold.pattern(node.value))
        return getattr(self, "_value_" + type(node).__name__)(node)

    def _value_Name(self, node: ast.Name) -> ir.Expr:
        return self.read(self.place(node))

    def _value_ImplicitCast(self, node: ast.ImplicitCast | ast.Cast) -> ir.Expr:
        operand = node.operand
        if isinstance(operand.ctype, ts.ArrayType):
            return self.address(operand)
        if ts.is_void(node.ctype):
            return ir.Sequence(tuple(self.effects(operand)), None)
        return convert(self.value(operand), operand.ctype, node.ctype)

    _value_Cast = _value_ImplicitCast

    def _value_Unary(self, node: ast.Unary) -> ir.Expr:
        if node.op == "&":
            return self.address(node.operand)
        if node.op == "*":
            return self.read(self.place(node))
        operand = self.value(node.operand)
        if node.op == "-":
            return ir.Unary(Opcode.NEG, operand)
        if node.op == "~":
            return ir.Binary(Opcode.XOR, operand, ir.Const(WORD_MASK))
        if node.op == "!":
            return ir.Unary(Opcode.EQZ, operand)
        return operand

    def _value_Binary(self, node: ast.Binary) -> ir.Expr:
        if node.op in ("&&", "||"):
            op = "and" if node.op == "&&" else "or"
            return ir.Logical(op, self.value(node.left), self.value(node.right))
        left, right = node.left, node.right
        if ts.is_pointer(left.ctype) or ts.is_pointer(right.ctype):
            if node.op in ("+", "-") and not (ts.is_pointer(left.ctype) and
                                             ts.is_pointer(right.ctype)):
                return self._pointer_offset(node)
            if node.op == "-":
                return self._pointer_difference(node)
            operation = ts.UINT  # pointer comparisons are unsigned
        elif node.op in ("<", ">", "<=", ">=", "==", "!="):
            operation = left.ctype
        else:
            operation = node.ctype
        opcode = opcode_for(node.op, operation)
        return ir.Binary(opcode, self.value(left), self.value(right))

    def _pointer_offset(self, node: ast.Binary) -> ir.Expr:
        pointer, integer = node.left, node.right
        if ts.is_integer(pointer.ctype):
            pointer, integer = integer, pointer
        size = ts.size_of(pointer.ctype.target)
        offset = self.scaled(self.value(integer), size)
        opcode = Opcode.ADD if node.op == "+" else Opcode.SUB
        return ir.Binary(opcode, self.value(pointer), offset)

    def _pointer_difference(self, node: ast.Binary) -> ir.Expr:
        size = ts.size_of(node.left.ctype.target)
        difference = ir.Binary(Opcode.SUB, self.value(node.left), self.value(node.right))
        if size == 1:
            return difference
        # The difference is an exact multiple of the size, so a power of two can shift.
        if size & (size - 1) == 0:
            return ir.Binary(Opcode.SHR_S, difference, ir.Const(size.bit_length() - 1))
        return ir.Binary(Opcode.DIV_S, difference, ir.Const(size))

    @staticmethod
    def scaled(index: ir.Expr, size: int) -> ir.Expr:
        return index if size == 1 else ir.Binary(Opcode.MUL, index, ir.Const(size))

    def _value_Assign(self, node: ast.Assign) -> ir.Expr:
        return self.assignment(node, want_value=True)

    def _value_IncDec(self, node: ast.IncDec) -> ir.Expr:
        return self.increment(node, want_value=True)

    def _value_Conditional(self, node: ast.Conditional) -> ir.Expr:
        return ir.Conditional(self.value(node.condition), self.value(node.then),
                              self.value(node.otherwise))

    def _value_Comma(self, node: ast.Comma) -> ir.Expr:
        return ir.Sequence(tuple(self.effects(node.left)), self.value(node.right))

    def _value_Index(self, node: ast.Index) -> ir.Expr:
        return self.read(self.place(node))

    def _value_Call(self, node: ast.Call) -> ir.Expr:
        function = node.callee.symbol
        if function.builtin is Builtin.PRINTF:
            effects, count = self.printf(node, want_count=True)
            return ir.Sequence(tuple(effects), count)
        if function.builtin is Builtin.INPUT or (
            function.name == "getchar" and self.inlines_library(function)
        ):
            return ir.Input()
        if function.name == "abs" and self.inlines_library(function):
            return ir.Unary(Opcode.ABS, self.value(node.args[0]))
        if function.builtin is Builtin.OUTPUT:
            return ir.Sequence((ir.Output(self.value(node.args[0]), self.line),), None)
        assert function.builtin is not Builtin.HALT, "__tl_halt is a statement"
        args = tuple(self.value(arg) for arg in node.args)
        return ir.Call(function.link_name, args, not ts.is_void(function.ctype.result))

    def _value_StringLiteral(self, node: ast.StringLiteral) -> ir.Expr:
        return ir.SymbolAddress(self.string_symbol(node.data))

    # --- places (lvalues) ---

    def place(self, node: ast.Expr) -> SlotPlace | MemoryPlace:
        if isinstance(node, ast.Name):
            return self.variable_place(node.symbol)
        return MemoryPlace(self.address(node), node.ctype)

    def address(self, node: ast.Expr) -> ir.Expr:
        """Lower the address of an lvalue (for &, array decay and memory access)."""
        if isinstance(node, ast.Name):
            place = self.variable_place(node.symbol)
            assert isinstance(place, MemoryPlace), f"{node.name} has no address"
            return place.address
        if isinstance(node, ast.Unary):
            assert node.op == "*"
            return self.value(node.operand)
        if isinstance(node, ast.Index):
            size = ts.size_of(node.ctype)
            offset = self.scaled(self.value(node.index), size)
            return ir.Binary(Opcode.ADD, self.value(node.base), offset)
        assert isinstance(node, ast.StringLiteral), type(node).__name__
        return ir.SymbolAddress(self.string_symbol(node.data))

    def read(self, place: SlotPlace | MemoryPlace) -> ir.Expr:
        if isinstance(place, SlotPlace):
            return ir.LocalGet(place.slot)
        return ir.Load(ts.load_opcode(place.ctype), place.address)

    def write(self, place: SlotPlace | MemoryPlace, value: ir.Expr) -> ir.Stmt:
        if isinstance(place, SlotPlace):
            return ir.SetLocal(place.slot, value, self.line)
        return ir.Store(ts.store_opcode(place.ctype), place.address, value, 0, self.line)

    def write_value(self, place: SlotPlace | MemoryPlace, value: ir.Expr) -> ir.Expr:
        if isinstance(place, SlotPlace):
            return ir.LocalTee(place.slot, value)
        return ir.StoreTee(ts.store_opcode(place.ctype), place.address, value,
                           self.temporary())

    # --- assignments ---

    def assignment(self, node: ast.Assign, want_value: bool):
        """Lower `target op= source`: an expression when `want_value`, else statements."""
        place = self.place(node.target)
        ctype = node.ctype
        if node.op == "=":
            source = self.value(node.source)
            if want_value:
                return self.write_value(place, source)
            return [self.write(place, source)]
        source = self.value(node.source)
        effects, place = self._stable_place(place, source)

        def combine(old: ir.Expr) -> ir.Expr:
            return self._combine(node.op[:-1], old, source, ctype, node.operation_type)

        return self._update(place, effects, combine, want_value, post=False)

    def increment(self, node: ast.IncDec, want_value: bool):
        place = self.place(node.operand)
        ctype = node.ctype
        op = "+" if node.op == "++" else "-"
        effects, place = self._stable_place(place, None)
        operation = ctype if ts.is_pointer(ctype) else ts.promote(ctype)

        def combine(old: ir.Expr) -> ir.Expr:
            return self._combine(op, old, ir.Const(1), ctype, operation)

        return self._update(place, effects, combine, want_value, post=not node.prefix)

    def _combine(self, op: str, old: ir.Expr, source: ir.Expr, ctype: ts.Type,
                 operation: ts.Type) -> ir.Expr:
        """Compute `old op source` in `operation` and convert it back to `ctype`."""
        if ts.is_pointer(ctype):
            offset = self.scaled(source, ts.size_of(ctype.target))
            return ir.Binary(_PLAIN_OPCODES[op], old, offset)
        result = ir.Binary(opcode_for(op, operation), convert(old, ctype, operation), source)
        return convert(result, operation, ctype)

    def _stable_place(self, place, source: ir.Expr | None):
        """Make a memory place's address safe to evaluate twice (load, then store)."""
        if isinstance(place, SlotPlace):
            return [], place
        read = _slots_read(place.address)
        if read is not None and (source is None or not read & _slots_written(source)):
            return [], place
        slot = self.temporary()
        effects = [ir.SetLocal(slot, place.address, self.line)]
        return effects, MemoryPlace(ir.LocalGet(slot), place.ctype)

    def _update(self, place, effects: list, combine, want_value: bool, post: bool):
        if not want_value:
            return [*effects, self.write(place, combine(self.read(place)))]
        if not post:
            return _sequence(effects, self.write_value(place, combine(self.read(place))))
        old = self.temporary()
        effects = [*effects, ir.SetLocal(old, self.read(place), self.line),
                   self.write(place, combine(ir.LocalGet(old)))]
        return _sequence(effects, ir.LocalGet(old))

    # --- effects ---

    def effects(self, node: ast.Expr) -> list[ir.Stmt]:
        """Lower `node` evaluated for its side effects only, without branches."""
        if isinstance(node, ast.Assign):
            return self.assignment(node, want_value=False)
        if isinstance(node, ast.IncDec):
            return self.increment(node, want_value=False)
        if isinstance(node, ast.Comma):
            return self.effects(node.left) + self.effects(node.right)
        if isinstance(node, (ast.Cast, ast.ImplicitCast)) and not isinstance(
            node.operand.ctype, ts.ArrayType
        ):
            return self.effects(node.operand)
        if isinstance(node, ast.Call):
            return self._call_effects(node)
        if node.value is not None:
            return []
        lowered = self.value(node)
        if not has_side_effects(lowered):
            return []
        return [ir.Eval(lowered, self.line)]

    def _call_effects(self, node: ast.Call) -> list[ir.Stmt]:
        function = node.callee.symbol
        if function.builtin is Builtin.PRINTF:
            effects, _ = self.printf(node, want_count=False)
            return effects
        if function.builtin is Builtin.OUTPUT or (
            function.name == "putchar" and self.inlines_library(function)
        ):
            return [ir.Output(self.value(node.args[0]), self.line)]
        return [ir.Eval(self.value(node), self.line)]

    # --- printf ---

    def printf(self, node: ast.Call, want_count: bool) -> tuple[list[ir.Stmt], ir.Expr | None]:
        """Expand printf into output statements and helper calls.

        With `want_count`, the helpers' results (characters written) are summed in a
        temporary, and the returned expression is the total, as printf returns.
        """
        effects: list[ir.Stmt] = []
        counter = self.temporary() if want_count else None
        text_length = 0
        if counter is not None:
            effects.append(ir.SetLocal(counter, ir.Const(0), self.line))
        args = iter(node.args[1:])
        for piece in node.format:
            if isinstance(piece, Text):
                text_length += len(piece.data)
                effects.extend(self._print_text(piece.data, counter))
                continue
            call = self._conversion_call(piece, self.value(next(args)))
            if isinstance(call, ir.Stmt):
                effects.append(call)
                text_length += 1
            elif counter is None:
                effects.append(ir.Eval(call, self.line))
            else:
                total = ir.Binary(Opcode.ADD, ir.LocalGet(counter), call)
                effects.append(ir.SetLocal(counter, total, self.line))
        if counter is None:
            return effects, None
        return effects, ir.Binary(Opcode.ADD, ir.LocalGet(counter), ir.Const(text_length))

    def _print_text(self, data: bytes, counter: int | None) -> list[ir.Stmt]:
        if len(data) <= INLINE_TEXT_LIMIT:
            return [ir.Output(ir.Const(byte), self.line) for byte in data]
        call = ir.Call(WRITE_STRING, (ir.SymbolAddress(self.string_symbol(data)),), True)
        return [ir.Eval(call, self.line)]

    def _conversion_call(self, piece: Conversion, value: ir.Expr) -> ir.Expr | ir.Stmt:
        flags = 0
        if piece.left:
            flags |= FLAG_LEFT
        if piece.zero:
            flags |= FLAG_ZERO
        width = ir.Const(piece.width)
        conversion = piece.conversion
        if conversion == "c":
            if piece.width <= 1:
                return ir.Output(value, self.line)
            return ir.Call(PRINT_CHAR, (value, width, ir.Const(flags)), True)
        if conversion == "s":
            if piece.width == 0:
                return ir.Call(WRITE_STRING, (value,), True)
            return ir.Call(PRINT_STRING, (value, width, ir.Const(flags)), True)
        if conversion in "di":
            return ir.Call(PRINT_SIGNED, (value, width, ir.Const(flags)), True)
        base = 10 if conversion == "u" else 16
        if conversion == "X":
            flags |= FLAG_UPPER
        return ir.Call(PRINT_UNSIGNED, (value, ir.Const(base), width, ir.Const(flags)), True)


def _sequence(effects: list[ir.Stmt], value: ir.Expr) -> ir.Expr:
    return ir.Sequence(tuple(effects), value) if effects else value
