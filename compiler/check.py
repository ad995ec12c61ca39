"""Semantic analysis: scopes, declarations, statements and the rules of C around them.

`check_unit` checks one translation unit (the program, or one stdlib source) after the
headers it includes. It resolves every name to a symbol, types every expression (see
check_expr.py), builds initializer plans and reports every independent error it finds
before stopping. The result lists the unit's functions and globals for lowering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlc.compiler import astnodes as ast
from tlc.compiler import constfold
from tlc.compiler import typesys as ts
from tlc.compiler.check_expr import ExpressionChecker
from tlc.compiler.declarators import DeclaratorBuilder, read_specifiers
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.initializers import InitializerChecker, static_value
from tlc.compiler.symbols import Builtin, Function, Storage, Variable

# Intrinsics that the stdlib sources call; lowering replaces them by instructions.
INTRINSICS = {
    Builtin.OUTPUT: ts.FunctionType(ts.VOID, (ts.INT,)),
    Builtin.INPUT: ts.FunctionType(ts.INT, ()),
    Builtin.HALT: ts.FunctionType(ts.VOID, (ts.INT,)),
}


@dataclass
class CheckedUnit:
    """The symbols of a checked unit, in source order."""

    functions: list[Function] = field(default_factory=list)  # every declared function
    globals: list[Variable] = field(default_factory=list)  # file-scope and static locals


@dataclass
class _Context:
    """The checker's position inside a function body."""

    function: Function
    breakable: list[ast.Stmt] = field(default_factory=list)  # enclosing loops and switches
    loops: int = 0
    static_locals: int = 0


def check_unit(unit: ast.TranslationUnit, headers: list[ast.TranslationUnit],
               reporter: Reporter, *, library: str | None = None) -> CheckedUnit:
    """Check `unit` after `headers`; `library` names a stdlib unit (which may use
    intrinsics and whose statics get unique link names)."""
    checker = Checker(reporter, library)
    for header in headers:
        checker.translation_unit(header, from_header=True)
    checker.translation_unit(unit, from_header=False)
    reporter.check()
    return checker.result


class Checker(ExpressionChecker, InitializerChecker):
    def __init__(self, reporter: Reporter, library: str | None):
        self.reporter = reporter
        self.library = library
        self.result = CheckedUnit()
        self.scopes: list[dict[str, Variable | Function]] = [{}]
        self.context: _Context | None = None
        self.declarators = DeclaratorBuilder(reporter, self._array_size)
        if library is not None:
            for builtin, ctype in INTRINSICS.items():
                self._add_function(builtin.value, ctype, ast.Span(library, 1, 1),
                                   builtin=builtin)

    # --- scopes ---

    def lookup(self, name: str):
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _bind(self, name: str, symbol, span: ast.Span) -> None:
        scope = self.scopes[-1]
        if name in scope:
            self.reporter.error(span, f"redefinition of '{name}'")
        scope[name] = symbol

    def type_of_name(self, type_name: ast.TypeName) -> ts.Type:
        specifiers = read_specifiers(type_name.specs, self.reporter)
        if specifiers.static:
            self.error(type_name, "'static' is not allowed in a type name")
        return self.declarators.build(type_name.declarator, specifiers.ctype).ctype

    def _array_size(self, expr: ast.Expr) -> int | None:
        return self.integer_constant(expr, "array size")

    # --- translation units and file-scope declarations ---

    def translation_unit(self, unit: ast.TranslationUnit, from_header: bool) -> None:
        self.declarators.allow_variadic = from_header
        for item in unit.items:
            if isinstance(item, ast.FunctionDef):
                self._function_definition(item)
            else:
                self._file_declaration(item, from_header)
        self.declarators.allow_variadic = False

    def _file_declaration(self, declaration: ast.Declaration, from_header: bool) -> None:
        specifiers = read_specifiers(declaration.specs, self.reporter)
        for item in declaration.items:
            declared = self.declarators.build(item.declarator, specifiers.ctype)
            if declared.name is None:
                continue
            if isinstance(declared.ctype, ts.FunctionType):
                if item.init is not None:
                    self.error(item, f"function '{declared.name}' is initialized like a "
                               "variable")
                function = self._declare_function(declared, from_header, specifiers.static)
                item.symbol = function
                continue
            variable = self._declare_global(declared, specifiers.static, item)
            item.symbol = variable

    def _declare_function(self, declared, from_header: bool, static: bool = False
                          ) -> Function:
        name = declared.name
        existing = self.scopes[0].get(name)
        if existing is None:
            builtin = Builtin.PRINTF if from_header and name == "printf" else None
            function = self._add_function(name, declared.ctype, declared.span, builtin)
            if static and self.library:
                function.link_name = f"{self.library}.{name}"
            function.from_header = from_header
            function.param_names = [p.name for p in declared.params]
            return function
        if not isinstance(existing, Function):
            self.reporter.error(declared.span, f"'{name}' redeclared as a different kind of "
                                "symbol")
            return Function(name, declared.ctype, declared.span, name)
        if ts.strip_qualifiers(existing.ctype) != ts.strip_qualifiers(declared.ctype):
            self.reporter.error(declared.span, f"conflicting types for '{name}' ("
                                f"'{ts.type_text(declared.ctype)}' after "
                                f"'{ts.type_text(existing.ctype)}')")
        return existing

    def _add_function(self, name: str, ctype: ts.FunctionType, span: ast.Span,
                      builtin: Builtin | None = None) -> Function:
        function = Function(name, ctype, span, name, builtin=builtin)
        self.scopes[0][name] = function
        self.result.functions.append(function)
        return function

    def _declare_global(self, declared, static: bool, item: ast.InitDeclarator) -> Variable:
        name = declared.name
        ctype = self._object_type(declared, item)
        existing = self.scopes[0].get(name)
        if existing is not None and not isinstance(existing, Variable):
            self.reporter.error(declared.span, f"'{name}' redeclared as a different kind of "
                                "symbol")
            existing = None
        if existing is not None:
            variable = self._merge_global(existing, declared, ctype)
        else:
            link_name = f"{self.library}.{name}" if self.library and static else name
            variable = Variable(name, ctype, declared.span, Storage.GLOBAL, link_name)
            self.scopes[0][name] = variable
            self.result.globals.append(variable)
        if item.init is not None:
            if variable.has_definition:
                self.reporter.error(declared.span, f"redefinition of '{name}'")
            variable.has_definition = True
            if not ts.is_error(variable.ctype):
                self._global_initializer(variable, item.init)
        elif isinstance(variable.ctype, ts.ArrayType) and variable.ctype.length is None:
            self.reporter.error(declared.span, f"array size missing in '{name}'")
            variable.ctype = ts.ERROR
        return variable

    def _merge_global(self, existing: Variable, declared, ctype: ts.Type) -> Variable:
        old, new = ts.strip_qualifiers(existing.ctype), ts.strip_qualifiers(ctype)
        same = old == new
        if isinstance(old, ts.ArrayType) and isinstance(new, ts.ArrayType):
            same = old.element == new.element and (
                old.length is None or new.length is None or old.length == new.length
            )
        if not same:
            self.reporter.error(declared.span, f"conflicting types for '{declared.name}'")
        elif isinstance(new, ts.ArrayType) and new.length is not None:
            existing.ctype = ctype
        return existing

    def _object_type(self, declared, node: ast.Node) -> ts.Type:
        ctype = declared.ctype
        if ts.is_void(ctype):
            self.error(node, f"variable '{declared.name}' declared void")
            return ts.ERROR
        return ctype

    def _global_initializer(self, variable: Variable, init: ast.Initializer) -> None:
        plan = self.plan(variable.ctype, init)
        variable.ctype = plan.ctype
        variable.init = plan
        for item in plan.items:
            if hasattr(item, "expr") and not ts.is_error(item.expr.ctype):
                if static_value(item.expr) is None:
                    self.error(item.expr, "initializer element is not a compile-time "
                               "constant")

    # --- function definitions ---

    def _function_definition(self, definition: ast.FunctionDef) -> None:
        specifiers = read_specifiers(definition.specs, self.reporter)
        declared = self.declarators.build(definition.declarator, specifiers.ctype)
        if not isinstance(declared.ctype, ts.FunctionType) or declared.name is None:
            self.error(definition, "expected a function declarator before '{'")
            return
        function = self._declare_function(declared, False, specifiers.static)
        if function.definition is not None:
            self.reporter.error(declared.span, f"redefinition of '{declared.name}'")
        function.definition = definition
        function.from_header = False
        function.param_names = [p.name for p in declared.params]
        definition.symbol = function
        if declared.name == "main":
            self._check_main(definition, declared)
        self._function_body(definition, function, declared.params)

    def _check_main(self, definition: ast.FunctionDef, declared) -> None:
        if declared.ctype.result != ts.INT:
            self.reporter.error(declared.span, "'main' must return 'int'")
        if declared.params:
            self.reporter.error(declared.span, "'main' must take no parameters: tlc "
                                "programs have no command-line arguments")

    def _function_body(self, definition: ast.FunctionDef, function: Function,
                       params) -> None:
        self.scopes.append({})
        self.context = _Context(function)
        definition.param_symbols = []
        for index, param in enumerate(params):
            if param.name is None:
                self.reporter.error(param.span, "parameter name omitted")
                continue
            variable = Variable(param.name, param.ctype, param.span, Storage.PARAMETER,
                                param.name, parameter_index=index)
            self._bind(param.name, variable, param.span)
            definition.param_symbols.append(variable)
        for item in definition.body.items:
            self._block_item(item)
        self.context = None
        self.scopes.pop()

    # --- statements ---

    def _block_item(self, item) -> None:
        if isinstance(item, ast.Declaration):
            self._local_declaration(item)
        else:
            self.statement(item)

    def statement(self, node: ast.Stmt) -> None:
        getattr(self, "_stmt_" + type(node).__name__)(node)

    def _stmt_Compound(self, node: ast.Compound) -> None:
        self.scopes.append({})
        for item in node.items:
            self._block_item(item)
        self.scopes.pop()

    def _stmt_ExprStmt(self, node: ast.ExprStmt) -> None:
        if node.expr is not None:
            node.expr = self.rvalue(node.expr, allow_void=True)

    def _stmt_If(self, node: ast.If) -> None:
        node.condition = self.condition(node.condition)
        self.statement(node.then)
        if node.otherwise is not None:
            self.statement(node.otherwise)

    def _loop_body(self, node: ast.Stmt, body: ast.Stmt) -> None:
        self.context.breakable.append(node)
        self.context.loops += 1
        self.statement(body)
        self.context.loops -= 1
        self.context.breakable.pop()

    def _stmt_While(self, node: ast.While) -> None:
        node.condition = self.condition(node.condition)
        self._loop_body(node, node.body)

    def _stmt_DoWhile(self, node: ast.DoWhile) -> None:
        self._loop_body(node, node.body)
        node.condition = self.condition(node.condition)

    def _stmt_For(self, node: ast.For) -> None:
        self.scopes.append({})
        if isinstance(node.init, ast.Declaration):
            self._local_declaration(node.init)
        elif node.init is not None:
            node.init = self.rvalue(node.init, allow_void=True)
        if node.condition is not None:
            node.condition = self.condition(node.condition)
        if node.step is not None:
            node.step = self.rvalue(node.step, allow_void=True)
        self._loop_body(node, node.body)
        self.scopes.pop()

    def _stmt_Break(self, node: ast.Break) -> None:
        if not self.context.breakable:
            self.error(node, "break statement not within a loop or switch")

    def _stmt_Continue(self, node: ast.Continue) -> None:
        if self.context.loops == 0:
            self.error(node, "continue statement not within a loop")

    def _stmt_Return(self, node: ast.Return) -> None:
        function = self.context.function
        result = function.ctype.result
        if node.value is None:
            if not ts.is_void(result) and not ts.is_error(result):
                self.error(node, f"'return' with no value, in function '{function.name}' "
                           "returning non-void")
            return
        value = self.rvalue(node.value, allow_void=True)
        if ts.is_void(result):
            if not ts.is_void(value.ctype):
                self.error(node, f"'return' with a value, in function '{function.name}' "
                           "returning void")
            node.value = value
            return
        node.value = self.assign_convert(value, result, "returning")

    def _stmt_Switch(self, node: ast.Switch) -> None:
        condition = self.rvalue(node.condition)
        if not ts.is_integer(condition.ctype) and not ts.is_error(condition.ctype):
            self.error(condition, "switch quantity is not an integer")
            condition.ctype = ts.ERROR
        if ts.is_integer(condition.ctype):
            condition = self.convert(condition, ts.promote(condition.ctype))
        node.condition = condition
        node.cases, node.default = [], None
        self.context.breakable.append(node)
        self.statement(node.body)
        self.context.breakable.pop()

    def _enclosing_switch(self, node: ast.Stmt, label: str) -> ast.Switch | None:
        for enclosing in reversed(self.context.breakable):
            if isinstance(enclosing, ast.Switch):
                return enclosing
        self.error(node, f"'{label}' label not within a switch statement")
        return None

    def _stmt_Case(self, node: ast.Case) -> None:
        switch = self._enclosing_switch(node, "case")
        value = self.integer_constant(node.value, "case label")
        if switch is not None and value is not None and ts.is_integer(switch.condition.ctype):
            value = constfold.convert(value, switch.condition.ctype)
            if any(case.value.value == value for case in switch.cases):
                self.error(node, f"duplicate case value {value}")
            node.value.value = value
            switch.cases.append(node)
        self.statement(node.body)

    def _stmt_Default(self, node: ast.Default) -> None:
        switch = self._enclosing_switch(node, "default")
        if switch is not None:
            if switch.default is not None:
                self.error(node, "multiple default labels in one switch")
            switch.default = node
        self.statement(node.body)

    # --- block-scope declarations ---

    def _local_declaration(self, declaration: ast.Declaration) -> None:
        specifiers = read_specifiers(declaration.specs, self.reporter)
        for item in declaration.items:
            declared = self.declarators.build(item.declarator, specifiers.ctype)
            if declared.name is None:
                continue
            if isinstance(declared.ctype, ts.FunctionType):
                function = self._declare_function(declared, from_header=False)
                self._bind(declared.name, function, declared.span)
                item.symbol = function
            elif specifiers.static:
                item.symbol = self._static_local(declared, item)
            else:
                item.symbol = self._local_variable(declared, item)

    def _static_local(self, declared, item: ast.InitDeclarator) -> Variable:
        context = self.context
        context.static_locals += 1
        link_name = f"{context.function.link_name}.{declared.name}.{context.static_locals}"
        if self.library:
            link_name = f"{self.library}.{link_name}"
        variable = Variable(declared.name, self._object_type(declared, item), declared.span,
                            Storage.GLOBAL, link_name)
        self._bind(declared.name, variable, declared.span)
        self.result.globals.append(variable)
        if item.init is not None:
            variable.has_definition = True
            self._global_initializer(variable, item.init)
        self._require_complete(variable, item)
        return variable

    def _local_variable(self, declared, item: ast.InitDeclarator) -> Variable:
        variable = Variable(declared.name, self._object_type(declared, item), declared.span,
                            Storage.LOCAL, declared.name)
        # As in C, the name is in scope from the end of its declarator, initializer included.
        self._bind(declared.name, variable, declared.span)
        if item.init is not None and not ts.is_error(variable.ctype):
            plan = self.plan(variable.ctype, item.init)
            variable.ctype = plan.ctype
            variable.init = plan
        self._require_complete(variable, item)
        return variable

    def _require_complete(self, variable: Variable, item: ast.InitDeclarator) -> None:
        if not ts.is_error(variable.ctype) and ts.size_of(variable.ctype) is None:
            self.error(item, f"storage size of '{variable.name}' is not known")
            variable.ctype = ts.ERROR
