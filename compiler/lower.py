"""Lowering of a checked translation unit to IR: storage, control flow and data.

Storage. Parameters arrive in slots 0 .. n-1 (the calling convention of docs/isa.md).
Slot n is reserved for the frame pointer. Scalar locals whose address is never taken
get their own slots, reused once their block ends. Arrays and address-taken locals live
in the call's memory frame, `frame_size` bytes that code generation allocates on entry
by moving the memory stack pointer down (see codegen.py). Globals and string literals
are data objects.

Control flow. Loops are rotated so that each iteration runs one conditional branch:

    while (c) body        →    entry: branch c → body, exit
                               body:  ...
                               next:  branch c → body, exit     (continue jumps here)
                               exit:

`for` adds the step at `next`, and `do ... while` has no entry test. A `switch` compares
the value against each case in turn and branches to the matching label.
"""

from __future__ import annotations

import logging

from tlc.compiler import astnodes as ast
from tlc.compiler import constfold
from tlc.compiler import ir
from tlc.compiler import typesys as ts
from tlc.compiler.check import CheckedUnit
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.initializers import Address, BytesItem, InitPlan, static_value
from tlc.compiler.isa import LOCALS_PER_FRAME, Opcode
from tlc.compiler.lower_expr import (
    INLINED_LIBRARY,
    ExpressionLowering,
    MemoryPlace,
    SlotPlace,
)
from tlc.compiler.symbols import Builtin, Function, Storage, Variable

logger = logging.getLogger("tlc.compiler")

# Slots kept free for temporaries: a scalar local that would take one of them lives in
# the memory frame instead.
TEMPORARY_RESERVE = 16
FRAME_ALIGNMENT = 4
# A local array initializer of up to this many words is written by one store per word.
# A larger one is copied from an image in the data segment by a loop.
UNROLLED_INIT_WORDS = 16
WORD = 4


class UnitLowering:
    """Lowers the functions and globals of one checked unit; `prefix` names its data."""

    def __init__(self, checked: CheckedUnit, reporter: Reporter, prefix: str, library: bool):
        self.checked = checked
        self.reporter = reporter
        self.prefix = prefix
        self.library = library
        self.unit = ir.Unit()
        self.strings: dict[bytes, str] = {}
        self.images = 0

    def lower(self) -> ir.Unit:
        for variable in self.checked.globals:
            if not ts.is_error(variable.ctype):
                self._global(variable)
        for function in self.checked.functions:
            if function.definition is not None and function.builtin is None:
                lowering = FunctionLowering(self, function)
                self.unit.functions[function.link_name] = lowering.lower()
        return self.unit

    # --- data ---

    def string_symbol(self, data: bytes) -> str:
        symbol = self.strings.get(data)
        if symbol is None:
            symbol = f"{self.prefix}.str.{len(self.strings)}"
            self.strings[data] = symbol
            image = data + b"\0"
            self.unit.data[symbol] = ir.DataObject(symbol, len(image), 1, image,
                                                   comment="string literal")
        return symbol

    def image_symbol(self, image: bytes) -> str:
        symbol = f"{self.prefix}.init.{self.images}"
        self.images += 1
        self.unit.data[symbol] = ir.DataObject(symbol, len(image), WORD, image,
                                               comment="local array initializer")
        return symbol

    def _global(self, variable: Variable) -> None:
        size = ts.size_of(variable.ctype)
        data = ir.DataObject(variable.link_name, size, ts.alignment_of(variable.ctype), b"",
                             comment=f"{variable.span.file} line {variable.span.line}")
        if variable.init is not None:
            image = bytearray(size)
            self._fill_image(variable.init, image, data.relocations)
            data.image = bytes(image).rstrip(b"\0")
        self.unit.data[variable.link_name] = data

    def _fill_image(self, plan: InitPlan, image: bytearray, relocations: list) -> None:
        for item in plan.items:
            if isinstance(item, BytesItem):
                image[item.offset : item.offset + len(item.data)] = item.data
                continue
            value = static_value(item.expr)
            width = ts.scalar_width(item.ctype)
            if isinstance(value, Address):
                symbol = (self.string_symbol(value.target) if isinstance(value.target, bytes)
                          else value.target.link_name)
                relocations.append(ir.Relocation(item.offset, symbol, value.offset))
                continue
            pattern = constfold.pattern(value)
            image[item.offset : item.offset + width] = pattern.to_bytes(4, "little")[:width]


class _Loop:
    def __init__(self, break_label: str, continue_label: str | None):
        self.break_label = break_label
        self.continue_label = continue_label


class FunctionLowering(ExpressionLowering):
    def __init__(self, unit: UnitLowering, function: Function):
        self.unit = unit
        self.function = function
        self.definition: ast.FunctionDef = function.definition
        self.line: int | None = self.definition.span.line
        self.params = len(function.ctype.params)
        self.frame_slot = self.params
        self.next_slot = self.params + 1
        self.highest_slot = self.next_slot
        self.free_slots: list[int] = []
        self.scope_slots: list[list[int]] = [[]]
        self.statement_slots: list[int] = []
        self.frame_size = 0
        self.places: dict[int, SlotPlace | MemoryPlace] = {}
        self.blocks: list[ir.Block] = []
        self.current: ir.Block | None = None
        self.loops: list[_Loop] = []
        self.labels = 0
        self.case_labels: dict[int, str] = {}  # id of a Case or Default node -> its label

    # --- interface for expression lowering ---

    def variable_place(self, variable: Variable) -> SlotPlace | MemoryPlace:
        if variable.storage is Storage.GLOBAL:
            return MemoryPlace(ir.SymbolAddress(variable.link_name), variable.ctype)
        return self.places[id(variable)]

    def string_symbol(self, data: bytes) -> str:
        return self.unit.string_symbol(data)

    def inlines_library(self, function: Function) -> bool:
        """Whether a call of this library function may become instructions."""
        return function.name in INLINED_LIBRARY and (
            self.unit.library or function.definition is None
        )

    def temporary(self) -> int:
        slot = self._allocate_slot()
        if slot is None:
            raise self.unit.reporter.fatal(
                ast.Span(self.definition.span.file, self.line or 1, 1),
                f"function '{self.function.name}' needs more than {LOCALS_PER_FRAME} local "
                "slots; split it into smaller functions")
        self.statement_slots.append(slot)
        return slot

    # --- slots and frame ---

    def _allocate_slot(self, limit: int = LOCALS_PER_FRAME) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        if self.next_slot >= limit:
            return None
        slot = self.next_slot
        self.next_slot += 1
        self.highest_slot = max(self.highest_slot, self.next_slot)
        return slot

    def _frame_offset(self, ctype: ts.Type) -> int:
        offset = self.frame_size
        size = ts.size_of(ctype)
        self.frame_size += -(-size // FRAME_ALIGNMENT) * FRAME_ALIGNMENT
        return offset

    def frame_address(self, offset: int) -> ir.Expr:
        return ir.Binary(Opcode.ADD, ir.LocalGet(self.frame_slot), ir.Const(offset))

    def _place_variable(self, variable: Variable) -> SlotPlace | MemoryPlace:
        needs_memory = variable.address_taken or not ts.is_scalar(variable.ctype)
        if not needs_memory:
            slot = self._allocate_slot(LOCALS_PER_FRAME - TEMPORARY_RESERVE)
            if slot is not None:
                self.scope_slots[-1].append(slot)
                place = SlotPlace(slot, variable.ctype)
                self.places[id(variable)] = place
                return place
        address = self.frame_address(self._frame_offset(variable.ctype))
        place = MemoryPlace(address, variable.ctype)
        self.places[id(variable)] = place
        return place

    # --- blocks ---

    def new_label(self, hint: str) -> str:
        self.labels += 1
        return f"{hint}.{self.labels}"

    def start(self, label: str) -> None:
        if self.current is not None:
            self.terminate(ir.Jump(label, self.line))
        self.current = ir.Block(label)
        self.blocks.append(self.current)

    def emit(self, statement: ir.Stmt) -> None:
        if self.current is None:
            self.start(self.new_label("unreachable"))
        self.current.statements.append(statement)

    def terminate(self, terminator: ir.Terminator) -> None:
        if self.current is None:
            self.start(self.new_label("unreachable"))
        self.current.terminator = terminator
        self.current = None

    def branch(self, condition: ast.Expr, if_true: str, if_false: str) -> None:
        self.line = condition.span.line
        self.terminate(ir.Branch(self.value(condition), if_true, if_false, self.line))
        self._end_statement()

    # --- the function ---

    def lower(self) -> ir.Function:
        if self.params >= LOCALS_PER_FRAME:
            raise self.unit.reporter.fatal(
                self.function.span, f"function '{self.function.name}' has {self.params} "
                f"parameters; at most {LOCALS_PER_FRAME - 1} fit in the machine's local slots")
        self.start("entry")
        for variable in self.definition.param_symbols:
            self._parameter(variable)
        for item in self.definition.body.items:
            self.block_item(item)
        if self.current is not None:
            self.line = None
            returns = not ts.is_void(self.function.ctype.result)
            # Falling off the end returns 0: C requires it for main and leaves the value
            # of other functions undefined, but the stack must stay balanced.
            self.terminate(ir.Return(ir.Const(0) if returns else None))
        return ir.Function(
            name=self.function.link_name,
            params=self.params,
            returns_value=not ts.is_void(self.function.ctype.result),
            slots=self.highest_slot,
            frame_size=self.frame_size,
            frame_slot=self.frame_slot,
            blocks=self.blocks,
            line=self.definition.span.line,
            source=self.definition.span.file,
        )

    def _parameter(self, variable: Variable) -> None:
        index = variable.parameter_index
        if not variable.address_taken:
            self.places[id(variable)] = SlotPlace(index, variable.ctype)
            return
        place = MemoryPlace(self.frame_address(self._frame_offset(variable.ctype)),
                            variable.ctype)
        self.places[id(variable)] = place
        self.emit(self.write(place, ir.LocalGet(index)))

    # --- statements ---

    def block_item(self, item) -> None:
        if isinstance(item, ast.Declaration):
            for declarator in item.items:
                self._local(declarator)
        else:
            self.statement(item)

    def statement(self, node: ast.Stmt) -> None:
        self.line = node.span.line
        getattr(self, "_stmt_" + type(node).__name__)(node)
        self._end_statement()

    def _end_statement(self) -> None:
        self.free_slots.extend(self.statement_slots)
        self.statement_slots = []

    def _stmt_Compound(self, node: ast.Compound) -> None:
        self.scope_slots.append([])
        for item in node.items:
            self.block_item(item)
        self.free_slots.extend(self.scope_slots.pop())

    def _stmt_ExprStmt(self, node: ast.ExprStmt) -> None:
        if node.expr is None:
            return
        halt = self._halt_argument(node.expr)
        if halt is not None:
            self.terminate(ir.Halt(self.value(halt), self.line))
            return
        for statement in self.effects(node.expr):
            self.emit(statement)

    def _halt_argument(self, expr: ast.Expr) -> ast.Expr | None:
        """Return the status of a call that halts (exit, __tl_halt), else None."""
        if not isinstance(expr, ast.Call):
            return None
        function = expr.callee.symbol
        if function.builtin is Builtin.HALT:
            return expr.args[0]
        if function.name == "exit" and self.inlines_library(function):
            return expr.args[0]
        return None

    def _stmt_If(self, node: ast.If) -> None:
        then_label = self.new_label("then")
        end_label = self.new_label("endif")
        else_label = self.new_label("else") if node.otherwise is not None else end_label
        self.branch(node.condition, then_label, else_label)
        self.start(then_label)
        self.statement(node.then)
        if node.otherwise is not None:
            self.terminate(ir.Jump(end_label, self.line))
            self.start(else_label)
            self.statement(node.otherwise)
        self.start(end_label)

    def _loop(self, condition: ast.Expr | None, body: ast.Stmt, step: ast.Expr | None,
              test_first: bool) -> None:
        body_label = self.new_label("loop")
        next_label = self.new_label("next")
        exit_label = self.new_label("endloop")
        if test_first and condition is not None:
            self.branch(condition, body_label, exit_label)
        self.start(body_label)
        self.loops.append(_Loop(exit_label, next_label))
        self.statement(body)
        self.loops.pop()
        self.start(next_label)
        if step is not None:
            self.line = step.span.line
            for statement in self.effects(step):
                self.emit(statement)
            self._end_statement()
        if condition is None:
            self.terminate(ir.Jump(body_label, self.line))
        else:
            self.branch(condition, body_label, exit_label)
        self.start(exit_label)

    def _stmt_While(self, node: ast.While) -> None:
        self._loop(node.condition, node.body, None, test_first=True)

    def _stmt_DoWhile(self, node: ast.DoWhile) -> None:
        self._loop(node.condition, node.body, None, test_first=False)

    def _stmt_For(self, node: ast.For) -> None:
        self.scope_slots.append([])
        if isinstance(node.init, ast.Declaration):
            self.block_item(node.init)
        elif node.init is not None:
            for statement in self.effects(node.init):
                self.emit(statement)
            self._end_statement()
        self._loop(node.condition, node.body, node.step, test_first=True)
        self.free_slots.extend(self.scope_slots.pop())

    def _stmt_Break(self, node: ast.Break) -> None:
        self.terminate(ir.Jump(self.loops[-1].break_label, self.line))

    def _stmt_Continue(self, node: ast.Continue) -> None:
        for loop in reversed(self.loops):
            if loop.continue_label is not None:
                self.terminate(ir.Jump(loop.continue_label, self.line))
                return
        raise AssertionError("continue outside a loop passed the checker")

    def _stmt_Return(self, node: ast.Return) -> None:
        if node.value is None:
            self.terminate(ir.Return(None, self.line))
        elif ts.is_void(node.value.ctype):
            for statement in self.effects(node.value):
                self.emit(statement)
            self.terminate(ir.Return(None, self.line))
        else:
            self.terminate(ir.Return(self.value(node.value), self.line))

    def _stmt_Switch(self, node: ast.Switch) -> None:
        exit_label = self.new_label("endswitch")
        control = self.value(node.condition)
        if not isinstance(control, ir.LocalGet):
            slot = self.temporary()
            self.emit(ir.SetLocal(slot, control, self.line))
            control = ir.LocalGet(slot)
        case_labels = self.case_labels
        for case in node.cases:
            case_labels[id(case)] = label = self.new_label("case")
            test = self.new_label("test")
            value = ir.Const(constfold.pattern(case.value.value))
            self.terminate(ir.Branch(ir.Binary(Opcode.EQ, control, value), label, test,
                                     case.span.line))
            self.start(test)
        default_label = self.new_label("default") if node.default is not None else exit_label
        if node.default is not None:
            case_labels[id(node.default)] = default_label
        self.terminate(ir.Jump(default_label, self.line))
        self.loops.append(_Loop(exit_label, None))
        self._end_statement()
        self.statement(node.body)
        self.loops.pop()
        self.start(exit_label)

    def _stmt_Case(self, node: ast.Case) -> None:
        self.start(self.case_labels[id(node)])
        self.statement(node.body)

    _stmt_Default = _stmt_Case

    # --- local declarations ---

    def _local(self, declarator: ast.InitDeclarator) -> None:
        variable = declarator.symbol
        if not isinstance(variable, Variable) or variable.storage is Storage.GLOBAL:
            return  # local prototypes and static locals need no code here
        self.line = declarator.span.line
        place = self._place_variable(variable)
        plan = variable.init
        if plan is None:
            return
        if isinstance(place, SlotPlace) or ts.is_scalar(variable.ctype):
            item = plan.items[0]
            self.emit(self.write(place, self.value(item.expr)))
        else:
            self._initialize_array(place, plan)
        self._end_statement()

    def _initialize_array(self, place: MemoryPlace, plan: InitPlan) -> None:
        """Write every word of a local array: the constant image, then computed items."""
        size = -(-ts.size_of(plan.ctype) // WORD) * WORD
        image = bytearray(size)
        computed = []
        for item in plan.items:
            if isinstance(item, BytesItem):
                image[item.offset : item.offset + len(item.data)] = item.data
            elif item.expr.value is not None:
                width = ts.scalar_width(item.ctype)
                pattern = constfold.pattern(item.expr.value)
                image[item.offset : item.offset + width] = pattern.to_bytes(4, "little")[:width]
            else:
                computed.append(item)
        if size // WORD <= UNROLLED_INIT_WORDS:
            for offset in range(0, size, WORD):
                word = int.from_bytes(image[offset : offset + WORD], "little")
                self.emit(ir.Store(Opcode.I32_STORE, place.address, ir.Const(word), offset,
                                   self.line))
        else:
            self._copy_image(place.address, self.unit.image_symbol(bytes(image)), size)
        for item in computed:
            address = ir.Binary(Opcode.ADD, place.address, ir.Const(item.offset))
            self.emit(self.write(MemoryPlace(address, item.ctype), self.value(item.expr)))

    def _copy_image(self, destination: ir.Expr, symbol: str, size: int) -> None:
        """Emit a loop that copies `size` bytes (a multiple of 4) from data `symbol`."""
        index = self.temporary()
        loop_label = self.new_label("copy")
        exit_label = self.new_label("copied")
        self.emit(ir.SetLocal(index, ir.Const(0), self.line))
        self.start(loop_label)
        source = ir.Load(Opcode.I32_LOAD,
                         ir.Binary(Opcode.ADD, ir.SymbolAddress(symbol), ir.LocalGet(index)))
        target = ir.Binary(Opcode.ADD, destination, ir.LocalGet(index))
        self.emit(ir.Store(Opcode.I32_STORE, target, source, 0, self.line))
        step = ir.Binary(Opcode.ADD, ir.LocalGet(index), ir.Const(WORD))
        condition = ir.Binary(Opcode.LT_U, ir.LocalTee(index, step), ir.Const(size))
        self.terminate(ir.Branch(condition, loop_label, exit_label, self.line))
        self.start(exit_label)


def lower_unit(checked: CheckedUnit, reporter: Reporter, prefix: str, library: bool
               ) -> ir.Unit:
    return UnitLowering(checked, reporter, prefix, library).lower()
