"""Type checking of expressions: C's typing rules, implicit conversions and folding.

`ExpressionChecker.expr` sets `ctype` on every node it visits (the type of the
expression before array decay, qualifiers included, so that assignments to const
objects can be found) and `value` on integer constant expressions. `rvalue` applies
the conversions C performs when an expression's value is used: arrays decay to
pointers and qualifiers drop. Implicit conversions become `ImplicitCast` nodes, so that
every binary arithmetic operator sees two operands of its operation type.
"""

from __future__ import annotations

from tlc.compiler import astnodes as ast
from tlc.compiler import constfold
from tlc.compiler import typesys as ts
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.printf_format import (
    INTEGER_CONVERSIONS,
    Conversion,
    FormatError,
    parse_format,
)
from tlc.compiler.symbols import Builtin, Function, Variable

ARITHMETIC_OPS = ("*", "/", "%", "+", "-", "<<", ">>", "&", "|", "^")
COMPARISON_OPS = ("<", ">", "<=", ">=", "==", "!=")
LOGICAL_OPS = ("&&", "||")

# Library functions whose header a program must include, for a helpful message.
HEADER_OF = {
    "printf": "stdio.h", "putchar": "stdio.h", "getchar": "stdio.h", "puts": "stdio.h",
    "exit": "stdlib.h", "abs": "stdlib.h", "atoi": "stdlib.h",
    "memset": "string.h", "memcpy": "string.h", "strlen": "string.h", "strcmp": "string.h",
}  # fmt: skip


def is_null_constant(expr: ast.Expr) -> bool:
    """Return whether `expr` is a null pointer constant: integer 0, or 0 cast to void *."""
    if expr.value != 0:
        return False
    ctype = expr.ctype
    return ts.is_integer(ctype) or (ts.is_pointer(ctype) and ts.is_void(ctype.target))


class ExpressionChecker:
    """Expression rules; the subclass supplies `lookup` and `type_of_name`."""

    reporter: Reporter

    def lookup(self, name: str):  # pragma: no cover - provided by the Checker
        raise NotImplementedError

    def type_of_name(self, type_name: ast.TypeName) -> ts.Type:  # pragma: no cover
        raise NotImplementedError

    def error(self, node: ast.Node, message: str) -> None:
        self.reporter.error(node.span, message)

    # --- entry points ---

    def expr(self, node: ast.Expr) -> ast.Expr:
        """Check `node` and return it, or the node that replaces it, with `ctype` set."""
        method = getattr(self, "_" + type(node).__name__)
        result = method(node)
        assert result.ctype is not None, type(node).__name__
        return result

    def rvalue(self, node: ast.Expr, allow_void: bool = False) -> ast.Expr:
        """Check `node` as a value: decay arrays, reject functions and (unless allowed)
        void."""
        node = self.expr(node)
        ctype = node.ctype
        if isinstance(ctype, ts.ArrayType):
            return self._implicit(node, ts.decay(ctype))
        if isinstance(ctype, ts.FunctionType):
            self.error(node, "function pointers are not supported; call the function")
            node.ctype = ts.ERROR
        elif ts.is_void(ctype) and not allow_void:
            self.error(node, "void value not ignored as it ought to be")
            node.ctype = ts.ERROR
        elif ctype.const:
            node.ctype = ts.unqualified(ctype)
        return node

    def condition(self, node: ast.Expr) -> ast.Expr:
        """Check a controlling expression, which must have scalar type."""
        node = self.rvalue(node)
        if not ts.is_scalar(node.ctype) and not ts.is_error(node.ctype):
            self.error(node, f"used '{ts.type_text(node.ctype)}' where a scalar is required")
            node.ctype = ts.ERROR
        return node

    def integer_constant(self, node: ast.Expr, what: str) -> int | None:
        """Check an integer constant expression, such as an array size or case label."""
        node = self.rvalue(node)
        if ts.is_error(node.ctype):
            return None
        if not ts.is_integer(node.ctype):
            self.error(node, f"{what} has non-integer type '{ts.type_text(node.ctype)}'")
            return None
        if node.value is None:
            self.error(node, f"{what} is not an integer constant")
            return None
        return node.value

    def convert(self, node: ast.Expr, target: ts.Type) -> ast.Expr:
        """Convert the value `node` to `target`, adding an ImplicitCast when needed."""
        target = ts.unqualified(target)
        if ts.is_error(node.ctype) or ts.is_error(target) or node.ctype == target:
            return node
        return self._implicit(node, target)

    def _implicit(self, node: ast.Expr, target: ts.Type) -> ast.Expr:
        cast = ast.ImplicitCast(node.span, node, ctype=target)
        if node.value is not None and ts.is_scalar(target):
            cast.value = constfold.convert(node.value, target)
        return cast

    def assign_convert(self, node: ast.Expr, target: ts.Type, what: str) -> ast.Expr:
        """Convert a value as assignment does; `what` names the context in errors."""
        source = node.ctype
        target = ts.unqualified(target)
        if ts.is_error(source) or ts.is_error(target):
            return node
        problem = self._assignment_problem(node, source, target)
        if problem is not None:
            self.error(node, f"{what}: {problem}")
            return node
        return self.convert(node, target)

    def _assignment_problem(self, node: ast.Expr, source: ts.Type, target: ts.Type
                            ) -> str | None:
        if ts.is_integer(target) and ts.is_integer(source):
            return None
        if target == ts.BOOL and ts.is_pointer(source):
            return None
        if ts.is_pointer(target) and ts.is_pointer(source):
            if ts.is_void(source.target) or ts.is_void(target.target):
                return None
            if ts.strip_qualifiers(source.target) == ts.strip_qualifiers(target.target):
                return None
            return (f"incompatible pointer types ('{ts.type_text(source)}' to "
                    f"'{ts.type_text(target)}')")
        if ts.is_pointer(target) and ts.is_integer(source):
            if is_null_constant(node):
                return None
            return "makes a pointer from an integer without a cast"
        if ts.is_integer(target) and ts.is_pointer(source):
            return "makes an integer from a pointer without a cast"
        return f"cannot convert '{ts.type_text(source)}' to '{ts.type_text(target)}'"

    # --- leaves ---

    def _IntLiteral(self, node: ast.IntLiteral) -> ast.Expr:
        node.ctype = ts.UINT if node.is_unsigned else ts.INT
        node.value = node.number
        return node

    def _CharLiteral(self, node: ast.CharLiteral) -> ast.Expr:
        node.ctype = ts.INT
        node.value = node.number
        return node

    def _StringLiteral(self, node: ast.StringLiteral) -> ast.Expr:
        node.ctype = ts.ArrayType(ts.CHAR, len(node.data) + 1)
        return node

    def _Name(self, node: ast.Name) -> ast.Expr:
        symbol = self.lookup(node.name)
        node.symbol = symbol
        if symbol is None:
            self.error(node, f"'{node.name}' undeclared")
            node.ctype = ts.ERROR
        else:
            node.ctype = symbol.ctype
        return node

    def _ImplicitCast(self, node: ast.ImplicitCast) -> ast.Expr:
        return node  # already checked

    # --- unary operators ---

    def _Unary(self, node: ast.Unary) -> ast.Expr:
        if node.op == "&":
            return self._address_of(node)
        if node.op == "*":
            return self._dereference(node)
        operand = self.rvalue(node.operand)
        node.operand = operand
        ctype = operand.ctype
        if ts.is_error(ctype):
            node.ctype = ts.ERROR
            return node
        if node.op == "!":
            if not ts.is_scalar(ctype):
                return self._bad_operand(node, ctype)
            node.ctype = ts.INT
        else:
            if not ts.is_integer(ctype):
                return self._bad_operand(node, ctype)
            node.ctype = ts.promote(ctype)
            node.operand = self.convert(operand, node.ctype)
        if node.operand.value is not None:
            node.value = constfold.fold_unary(node.op, node.operand.value, node.ctype)
        return node

    def _bad_operand(self, node: ast.Expr, ctype: ts.Type) -> ast.Expr:
        self.error(node, f"invalid operand to unary '{node.op}' (have '{ts.type_text(ctype)}')")
        node.ctype = ts.ERROR
        return node

    def _address_of(self, node: ast.Unary) -> ast.Expr:
        operand = self.expr(node.operand)
        node.operand = operand
        if ts.is_error(operand.ctype):
            node.ctype = ts.ERROR
        elif isinstance(operand.ctype, ts.FunctionType):
            self.error(node, "function pointers are not supported")
            node.ctype = ts.ERROR
        elif not self.is_lvalue(operand):
            self.error(node, "lvalue required as unary '&' operand")
            node.ctype = ts.ERROR
        else:
            if isinstance(operand, ast.Name):
                operand.symbol.address_taken = True
            node.ctype = ts.PointerType(operand.ctype)
        return node

    def _dereference(self, node: ast.Unary) -> ast.Expr:
        operand = self.rvalue(node.operand)
        node.operand = operand
        ctype = operand.ctype
        if ts.is_error(ctype):
            node.ctype = ts.ERROR
        elif not ts.is_pointer(ctype):
            self.error(node, f"invalid type argument of unary '*' (have "
                       f"'{ts.type_text(ctype)}')")
            node.ctype = ts.ERROR
        elif ts.is_void(ctype.target):
            self.error(node, "dereferencing a 'void *' pointer")
            node.ctype = ts.ERROR
        else:
            node.ctype = ctype.target
        return node

    def is_lvalue(self, node: ast.Expr) -> bool:
        if isinstance(node, ast.Name):
            return isinstance(node.symbol, Variable)
        if isinstance(node, ast.Unary):
            return node.op == "*"
        return isinstance(node, (ast.Index, ast.StringLiteral))

    def modifiable_lvalue(self, node: ast.Expr, what: str, operator: ast.Expr) -> bool:
        """Report at `operator` unless `node` is an lvalue that may be assigned; `what`
        names the use."""
        if ts.is_error(node.ctype):
            return False
        if not self.is_lvalue(node):
            self.error(operator, f"lvalue required as {what}")
            return False
        if isinstance(node.ctype, ts.ArrayType):
            self.error(operator, "assignment to expression with array type")
            return False
        if ts.is_const_object(node.ctype):
            name = f" '{node.name}'" if isinstance(node, ast.Name) else ""
            self.error(operator, f"assignment of read-only location{name}")
            return False
        return True

    def _IncDec(self, node: ast.IncDec) -> ast.Expr:
        operand = self.expr(node.operand)
        node.operand = operand
        what = ("increment" if node.op == "++" else "decrement") + " operand"
        if not self.modifiable_lvalue(operand, what, node):
            node.ctype = ts.ERROR
            return node
        ctype = ts.unqualified(operand.ctype)
        if ts.is_pointer(ctype) and ts.size_of(ctype.target) is None:
            self.error(node, f"arithmetic on a pointer to an incomplete type "
                       f"'{ts.type_text(ctype)}'")
            ctype = ts.ERROR
        elif not ts.is_scalar(ctype):
            self.error(node, f"wrong type argument to {what}")
            ctype = ts.ERROR
        node.ctype = ctype
        return node

    # --- binary operators ---

    def _Binary(self, node: ast.Binary) -> ast.Expr:
        left = self.rvalue(node.left)
        right = self.rvalue(node.right)
        node.left, node.right = left, right
        if ts.is_error(left.ctype) or ts.is_error(right.ctype):
            node.ctype = ts.ERROR
            return node
        if node.op in LOGICAL_OPS:
            return self._logical(node)
        if node.op in COMPARISON_OPS:
            return self._comparison(node)
        if node.op in ("+", "-") and (ts.is_pointer(left.ctype) or ts.is_pointer(right.ctype)):
            return self._pointer_arithmetic(node)
        if not (ts.is_integer(left.ctype) and ts.is_integer(right.ctype)):
            return self._invalid_operands(node)
        if node.op in ("<<", ">>"):
            operation = ts.promote(left.ctype)
            node.left = self.convert(left, operation)
            node.right = self.convert(right, ts.promote(right.ctype))
        else:
            operation = ts.usual_arithmetic(left.ctype, right.ctype)
            node.left = self.convert(left, operation)
            node.right = self.convert(right, operation)
        node.ctype = operation
        self._fold_binary(node, operation)
        return node

    def _fold_binary(self, node: ast.Binary, operation: ts.Type) -> None:
        if node.left.value is not None and node.right.value is not None:
            node.value = constfold.fold_binary(node.op, node.left.value, node.right.value,
                                               operation)

    def _invalid_operands(self, node: ast.Binary) -> ast.Expr:
        self.error(node, f"invalid operands to binary '{node.op}' (have "
                   f"'{ts.type_text(node.left.ctype)}' and '{ts.type_text(node.right.ctype)}')")
        node.ctype = ts.ERROR
        return node

    def _logical(self, node: ast.Binary) -> ast.Expr:
        if not (ts.is_scalar(node.left.ctype) and ts.is_scalar(node.right.ctype)):
            return self._invalid_operands(node)
        node.ctype = ts.INT
        left, right = node.left.value, node.right.value
        if left is not None:
            decided = (left != 0) if node.op == "||" else (left == 0)
            if decided:
                node.value = int(node.op == "||")
            elif right is not None:
                node.value = int(right != 0)
        return node

    def _comparison(self, node: ast.Binary) -> ast.Expr:
        left, right = node.left, node.right
        node.ctype = ts.INT
        if ts.is_integer(left.ctype) and ts.is_integer(right.ctype):
            operation = ts.usual_arithmetic(left.ctype, right.ctype)
            node.left = self.convert(left, operation)
            node.right = self.convert(right, operation)
            self._fold_binary(node, operation)
            return node
        if ts.is_pointer(left.ctype) and ts.is_pointer(right.ctype):
            if self._comparable_pointers(node, left.ctype, right.ctype):
                return node
            self.error(node, f"comparison of distinct pointer types ('"
                       f"{ts.type_text(left.ctype)}' and '{ts.type_text(right.ctype)}')")
            node.ctype = ts.ERROR
            return node
        if node.op in ("==", "!="):
            if ts.is_pointer(left.ctype) and is_null_constant(right):
                node.right = self.convert(right, left.ctype)
                return node
            if ts.is_pointer(right.ctype) and is_null_constant(left):
                node.left = self.convert(left, right.ctype)
                return node
        self.error(node, f"comparison between pointer and integer ('"
                   f"{ts.type_text(left.ctype)}' and '{ts.type_text(right.ctype)}')")
        node.ctype = ts.ERROR
        return node

    def _comparable_pointers(self, node: ast.Binary, left: ts.Type, right: ts.Type) -> bool:
        if ts.strip_qualifiers(left.target) == ts.strip_qualifiers(right.target):
            return True
        if node.op in ("==", "!=") and (ts.is_void(left.target) or ts.is_void(right.target)):
            return True
        return False

    def _pointer_arithmetic(self, node: ast.Binary) -> ast.Expr:
        left, right = node.left, node.right
        if ts.is_pointer(left.ctype) and ts.is_pointer(right.ctype):
            if node.op != "-" or not self._comparable_pointers(node, left.ctype, right.ctype):
                return self._invalid_operands(node)
            if not self._complete_target(node, left.ctype):
                return node
            node.ctype = ts.PTRDIFF_TYPE
            return node
        pointer, integer = (left, right) if ts.is_pointer(left.ctype) else (right, left)
        if not ts.is_integer(integer.ctype) or (node.op == "-" and pointer is right):
            return self._invalid_operands(node)
        if not self._complete_target(node, pointer.ctype):
            return node
        converted = self.convert(integer, ts.promote(integer.ctype))
        if pointer is left:
            node.right = converted
        else:
            node.left = converted
        node.ctype = pointer.ctype
        return node

    def _complete_target(self, node: ast.Expr, pointer: ts.PointerType) -> bool:
        if ts.size_of(pointer.target) is None:
            self.error(node, f"arithmetic on a pointer to an incomplete type "
                       f"'{ts.type_text(pointer)}'")
            node.ctype = ts.ERROR
            return False
        return True

    # --- assignment, conditional, comma ---

    def _Assign(self, node: ast.Assign) -> ast.Expr:
        target = self.expr(node.target)
        node.target = target
        source = self.rvalue(node.source)
        node.source = source
        if not self.modifiable_lvalue(target, "left operand of assignment", node):
            node.ctype = ts.ERROR
            return node
        ctype = ts.unqualified(target.ctype)
        node.ctype = ctype
        if ts.is_error(source.ctype):
            return node
        if node.op == "=":
            node.source = self.assign_convert(source, ctype, "assignment")
            return node
        return self._compound_assign(node, ctype, source)

    def _compound_assign(self, node: ast.Assign, ctype: ts.Type, source: ast.Expr
                         ) -> ast.Expr:
        op = node.op[:-1]
        if ts.is_pointer(ctype) and op in ("+", "-") and ts.is_integer(source.ctype):
            if self._complete_target(node, ctype):
                node.source = self.convert(source, ts.promote(source.ctype))
                node.operation_type = ctype
            return node
        if not (ts.is_integer(ctype) and ts.is_integer(source.ctype)):
            self.error(node, f"invalid operands to '{node.op}' (have '{ts.type_text(ctype)}' "
                       f"and '{ts.type_text(source.ctype)}')")
            node.ctype = ts.ERROR
            return node
        if op in ("<<", ">>"):
            node.operation_type = ts.promote(ctype)
            node.source = self.convert(source, ts.promote(source.ctype))
        else:
            node.operation_type = ts.usual_arithmetic(ctype, source.ctype)
            node.source = self.convert(source, node.operation_type)
        return node

    def _Conditional(self, node: ast.Conditional) -> ast.Expr:
        node.condition = self.condition(node.condition)
        then = self.rvalue(node.then, allow_void=True)
        otherwise = self.rvalue(node.otherwise, allow_void=True)
        node.then, node.otherwise = then, otherwise
        node.ctype = self._conditional_type(node, then, otherwise)
        if ts.is_scalar(node.ctype):
            node.then = self.convert(then, node.ctype)
            node.otherwise = self.convert(otherwise, node.ctype)
            chosen = node.condition.value
            if chosen is not None:
                node.value = (node.then if chosen else node.otherwise).value
        return node

    def _conditional_type(self, node: ast.Expr, then: ast.Expr, otherwise: ast.Expr
                          ) -> ts.Type:
        a, b = then.ctype, otherwise.ctype
        if ts.is_error(a) or ts.is_error(b) or ts.is_error(node.condition.ctype):
            return ts.ERROR
        if ts.is_integer(a) and ts.is_integer(b):
            return ts.usual_arithmetic(a, b)
        if ts.is_void(a) and ts.is_void(b):
            return ts.VOID
        if ts.is_pointer(a) and is_null_constant(otherwise):
            return a
        if ts.is_pointer(b) and is_null_constant(then):
            return b
        if ts.is_pointer(a) and ts.is_pointer(b):
            if ts.strip_qualifiers(a) == ts.strip_qualifiers(b):
                return a
            if ts.is_void(a.target) or ts.is_void(b.target):
                return ts.PointerType(ts.VOID)
        self.error(node, f"type mismatch in conditional expression ('{ts.type_text(a)}' and "
                   f"'{ts.type_text(b)}')")
        return ts.ERROR

    def _Comma(self, node: ast.Comma) -> ast.Expr:
        node.left = self.rvalue(node.left, allow_void=True)
        node.right = self.rvalue(node.right, allow_void=True)
        node.ctype = node.right.ctype
        return node

    # --- casts and sizeof ---

    def _Cast(self, node: ast.Cast) -> ast.Expr:
        target = ts.unqualified(self.type_of_name(node.type_name))
        operand = self.rvalue(node.operand, allow_void=ts.is_void(target))
        node.operand = operand
        node.ctype = target
        if ts.is_error(target) or ts.is_error(operand.ctype):
            node.ctype = ts.ERROR
            return node
        if ts.is_void(target):
            return node
        if not ts.is_scalar(target):
            self.error(node, f"conversion to non-scalar type '{ts.type_text(target)}'")
            node.ctype = ts.ERROR
        elif not ts.is_scalar(operand.ctype):
            self.error(node, f"cannot cast '{ts.type_text(operand.ctype)}' to "
                       f"'{ts.type_text(target)}'")
            node.ctype = ts.ERROR
        elif operand.value is not None and (ts.is_integer(target) or operand.value == 0):
            node.value = constfold.convert(operand.value, target)
        return node

    def _SizeofExpr(self, node: ast.SizeofExpr) -> ast.Expr:
        operand = self.expr(node.operand)
        node.operand = operand
        return self._sizeof(node, operand.ctype)

    def _SizeofType(self, node: ast.SizeofType) -> ast.Expr:
        return self._sizeof(node, self.type_of_name(node.type_name))

    def _sizeof(self, node: ast.Expr, ctype: ts.Type) -> ast.Expr:
        node.ctype = ts.SIZE_TYPE
        if ts.is_error(ctype):
            node.ctype = ts.ERROR
            return node
        size = ts.size_of(ctype)
        if size is None:
            self.error(node, f"invalid application of 'sizeof' to type '{ts.type_text(ctype)}'")
            node.ctype = ts.ERROR
        elif ts.contains_pointer(ctype):
            self.error(node, f"sizeof of '{ts.type_text(ctype)}' is not supported: pointers "
                       "are 4 bytes in tlc but 8 bytes in 64-bit C")
            node.ctype = ts.ERROR
        else:
            node.value = size
        return node

    # --- indexing and calls ---

    def _Index(self, node: ast.Index) -> ast.Expr:
        base = self.rvalue(node.base)
        index = self.rvalue(node.index)
        if ts.is_integer(base.ctype) and ts.is_pointer(index.ctype):
            base, index = index, base
        node.base, node.index = base, index
        if ts.is_error(base.ctype) or ts.is_error(index.ctype):
            node.ctype = ts.ERROR
        elif not ts.is_pointer(base.ctype) or not ts.is_integer(index.ctype):
            self.error(node, "subscripted value is neither array nor pointer")
            node.ctype = ts.ERROR
        elif ts.size_of(base.ctype.target) is None:
            self.error(node, f"subscript of a pointer to an incomplete type "
                       f"'{ts.type_text(base.ctype)}'")
            node.ctype = ts.ERROR
        else:
            node.index = self.convert(index, ts.promote(index.ctype))
            node.ctype = base.ctype.target
        return node

    def _Call(self, node: ast.Call) -> ast.Expr:
        function = self._callee(node)
        if function is None:
            node.args = [self.rvalue(arg, allow_void=True) for arg in node.args]
            node.ctype = ts.ERROR
            return node
        if function.first_call is None:
            function.first_call = node.span
        node.ctype = function.ctype.result
        if function.builtin is Builtin.PRINTF:
            self._printf(node, function)
        else:
            self._arguments(node, function)
        return node

    def _callee(self, node: ast.Call) -> Function | None:
        callee = node.callee
        if not isinstance(callee, ast.Name):
            self.rvalue(callee)
            self.error(node, "called object is not a function (function pointers are not "
                       "supported)")
            return None
        symbol = self.lookup(callee.name)
        callee.symbol = symbol
        if symbol is None:
            header = HEADER_OF.get(callee.name)
            hint = f"; include <{header}>" if header else ""
            self.error(callee, f"implicit declaration of function '{callee.name}'{hint}")
            return None
        if not isinstance(symbol, Function):
            if not ts.is_error(symbol.ctype):
                self.error(callee, f"called object '{callee.name}' is not a function")
            return None
        callee.ctype = symbol.ctype
        return symbol

    def _arguments(self, node: ast.Call, function: Function) -> None:
        params = function.ctype.params
        if len(node.args) != len(params):
            few = "few" if len(node.args) < len(params) else "many"
            self.error(node, f"too {few} arguments to function '{function.name}' (expected "
                       f"{len(params)}, have {len(node.args)})")
        converted = []
        for position, arg in enumerate(node.args):
            arg = self.rvalue(arg)
            if position < len(params):
                what = f"passing argument {position + 1} of '{function.name}'"
                arg = self.assign_convert(arg, params[position], what)
            converted.append(arg)
        node.args = converted

    def _printf(self, node: ast.Call, function: Function) -> None:
        if not node.args or not isinstance(node.args[0], ast.StringLiteral):
            self.error(node, "the format of printf must be a string literal")
            node.args = [self.rvalue(arg) for arg in node.args]
            return
        format_node = node.args[0]
        self.expr(format_node)
        try:
            pieces = parse_format(format_node.data)
        except FormatError as error:
            self.error(format_node, str(error))
            return
        conversions = [piece for piece in pieces if isinstance(piece, Conversion)]
        arguments = node.args[1:]
        if len(arguments) != len(conversions):
            self.error(node, f"printf format has {len(conversions)} conversions but "
                       f"{len(arguments)} arguments follow it")
            return
        node.args = [format_node] + [
            self._printf_argument(arg, conversion, position + 2)
            for position, (arg, conversion) in enumerate(zip(arguments, conversions))
        ]
        node.format = pieces

    def _printf_argument(self, arg: ast.Expr, conversion: Conversion, position: int
                         ) -> ast.Expr:
        arg = self.rvalue(arg)
        ctype = arg.ctype
        if ts.is_error(ctype):
            return arg
        if conversion.conversion in INTEGER_CONVERSIONS:
            if not ts.is_integer(ctype):
                self.error(arg, f"%{conversion.conversion} expects an integer, but argument "
                           f"{position} has type '{ts.type_text(ctype)}'")
                return arg
            argument_type = ts.UINT if conversion.conversion in "uxX" else ts.INT
            return self.convert(arg, argument_type)
        if not (ts.is_pointer(ctype) and ts.strip_qualifiers(ctype.target) == ts.CHAR):
            self.error(arg, f"%s expects 'char *', but argument {position} has type "
                       f"'{ts.type_text(ctype)}'")
        return arg
