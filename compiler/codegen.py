"""Code generation: linked IR to 55-opcode stack code.

Expressions become postfix code, since the machine is a stack machine. The machine has
no unconditional jump, so `jump L` is `PUSH 0; JZ L`. The block order puts most jump
targets right after their jump, where the jump needs no code.

Calls follow docs/isa.md: arguments pushed left to right, the callee moves them into
slots 0 .. n-1 with `LOCAL.SET n-1 ... LOCAL.SET 0`, and the result is left on the
stack. A function with a memory frame keeps the memory stack pointer (SP, a word in the
data segment) in step. The stack grows down from the start of the data segment:

    prologue:  SP = SP - frame_size; fp = SP        (fp is the function's frame slot)
               load a byte at fp                    (traps if SP wrapped below 0)
    epilogue:  SP = fp + frame_size                 (before each RETURN)

The program starts with `CALL main; HALT`, so main's return value is the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlc.compiler import ir
from tlc.compiler.isa import INPUT_PORT, OUTPUT_PORT, WORD_MASK, Opcode
from tlc.runtime.machine import Instruction

ENTRY_POINT = "main"
MAX_OFFSET = (1 << 31) - 1  # largest offset immediate that never wraps an address

# Opcodes whose result is already 0 or 1, so `!= 0` before using it as a truth value
# is not needed.
_BOOLEAN_OPCODES = frozenset({
    Opcode.EQZ, Opcode.EQ, Opcode.NE, Opcode.LT_S, Opcode.LT_U, Opcode.GT_S, Opcode.GT_U,
    Opcode.LE_S, Opcode.LE_U, Opcode.GE_S, Opcode.GE_U,
})  # fmt: skip


@dataclass
class _Pending:
    """An instruction being emitted; `target` is a label resolved at the end."""

    opcode: Opcode
    immediate: int
    target: str | None
    line: int | None


def pushes_value(expr: ir.Expr) -> bool:
    """Return whether evaluating `expr` leaves a word on the stack (void calls do not)."""
    if isinstance(expr, ir.Call):
        return expr.returns_value
    if isinstance(expr, ir.Sequence):
        return expr.value is not None and pushes_value(expr.value)
    if isinstance(expr, ir.Conditional):
        return pushes_value(expr.then)
    return True


def is_boolean(expr: ir.Expr) -> bool:
    if isinstance(expr, (ir.Binary, ir.Unary)):
        return expr.opcode in _BOOLEAN_OPCODES
    return isinstance(expr, ir.Logical)


class CodeGenerator:
    """Emits the code of a linked unit; `addresses` maps data symbols to addresses."""

    def __init__(self, unit: ir.Unit, addresses: dict[str, int], stack_pointer: int,
                 library_sources: frozenset[str]):
        self.unit = unit
        self.addresses = addresses
        self.stack_pointer = stack_pointer
        self.library_sources = library_sources
        self.code: list[_Pending] = []
        self.labels: dict[str, int] = {}
        self.label_count = 0
        self.function: ir.Function | None = None
        self.line: int | None = None
        self._line_enabled = True
        self._label_positions: set[int] = set()  # code positions that some label names

    # --- emission ---

    def emit(self, opcode: Opcode, immediate: int = 0, target: str | None = None) -> None:
        if opcode is Opcode.LOCAL_GET and self._follows_set_of(immediate):
            self.code[-1].opcode = Opcode.LOCAL_TEE  # SET x; GET x  ==  TEE x
            return
        self.code.append(_Pending(opcode, immediate & WORD_MASK, target, self.line))

    def _follows_set_of(self, slot: int) -> bool:
        if not self.code or len(self.code) in self._label_positions:
            return False
        last = self.code[-1]
        return last.opcode is Opcode.LOCAL_SET and last.immediate == slot

    def label(self, name: str) -> None:
        assert name not in self.labels, f"duplicate label {name}"
        self.labels[name] = len(self.code)
        self._label_positions.add(len(self.code))

    def new_label(self) -> str:
        self.label_count += 1
        return f".L{self.label_count}"

    def jump(self, target: str) -> None:
        self.emit(Opcode.PUSH, 0)
        self.emit(Opcode.JZ, 0, target)

    # --- program ---

    def generate(self) -> tuple[list[Instruction], dict[str, int]]:
        self.emit(Opcode.CALL, 0, ENTRY_POINT)
        self.emit(Opcode.HALT)
        for function in self.unit.functions.values():
            self._function(function)
        instructions = []
        for pending in self.code:
            immediate = pending.immediate
            if pending.target is not None:
                immediate = self.labels[pending.target]
            instructions.append(Instruction(pending.opcode, immediate, pending.line))
        functions = {name: self.labels[name] for name in self.unit.functions}
        return instructions, functions

    def _function(self, function: ir.Function) -> None:
        self.function = function
        library = function.source in self.library_sources
        self.line = None if library else function.line
        self._line_enabled = not library
        self.label(function.name)
        for slot in reversed(range(function.params)):
            self.emit(Opcode.LOCAL_SET, slot)
        if function.frame_size:
            self._prologue(function)
        blocks = function.blocks
        for index, block in enumerate(blocks):
            following = blocks[index + 1].label if index + 1 < len(blocks) else None
            self.label(self._block_label(block.label))
            for statement in block.statements:
                self._set_line(statement.line)
                self.statement(statement)
            self._set_line(block.terminator.line)
            self.terminator(block.terminator, following)

    def _set_line(self, line: int | None) -> None:
        if self._line_enabled and line is not None:
            self.line = line

    def _block_label(self, label: str) -> str:
        return f"{self.function.name}:{label}"

    def _prologue(self, function: ir.Function) -> None:
        self.emit(Opcode.PUSH, self.stack_pointer)
        self.emit(Opcode.PUSH, self.stack_pointer)
        self.emit(Opcode.I32_LOAD)
        self.emit(Opcode.PUSH, function.frame_size)
        self.emit(Opcode.SUB)
        self.emit(Opcode.LOCAL_TEE, function.frame_slot)
        self.emit(Opcode.I32_STORE)
        # A stack that grew below address 0 wrapped to an address near 2^32: trap here.
        self.emit(Opcode.LOCAL_GET, function.frame_slot)
        self.emit(Opcode.I32_LOAD8_U)
        self.emit(Opcode.POP)

    def _epilogue(self, function: ir.Function) -> None:
        self.emit(Opcode.PUSH, self.stack_pointer)
        self.emit(Opcode.LOCAL_GET, function.frame_slot)
        self.emit(Opcode.PUSH, function.frame_size)
        self.emit(Opcode.ADD)
        self.emit(Opcode.I32_STORE)

    # --- statements and terminators ---

    def statement(self, statement: ir.Stmt) -> None:
        if isinstance(statement, ir.SetLocal):
            self.expr(statement.value)
            self.emit(Opcode.LOCAL_SET, statement.slot)
        elif isinstance(statement, ir.Store):
            offset = self._access_address(statement.address, statement.offset)
            self.expr(statement.value)
            self.emit(statement.opcode, offset)
        elif isinstance(statement, ir.Output):
            self.emit(Opcode.PUSH, OUTPUT_PORT)
            self.expr(statement.value)
            self.emit(Opcode.I32_STORE8)
        else:
            assert isinstance(statement, ir.Eval)
            self.expr(statement.value)
            if pushes_value(statement.value):
                self.emit(Opcode.POP)

    def terminator(self, terminator: ir.Terminator, following: str | None) -> None:
        if isinstance(terminator, ir.Jump):
            target = self._block_label(terminator.target)
            if terminator.target != following:
                self.jump(target)
        elif isinstance(terminator, ir.Branch):
            self._branch(terminator, following)
        elif isinstance(terminator, ir.Return):
            if terminator.value is not None:
                self.expr(terminator.value)
            if self.function.frame_size:
                self._epilogue(self.function)
            self.emit(Opcode.RETURN)
        else:
            assert isinstance(terminator, ir.Halt)
            self.expr(terminator.value)
            self.emit(Opcode.HALT)

    def _branch(self, branch: ir.Branch, following: str | None) -> None:
        if_true = self._block_label(branch.if_true)
        if_false = self._block_label(branch.if_false)
        if branch.if_false == following:
            self.conditional_jump(branch.condition, if_true, True)
        elif branch.if_true == following:
            self.conditional_jump(branch.condition, if_false, False)
        else:
            self.conditional_jump(branch.condition, if_true, True)
            self.jump(if_false)

    def conditional_jump(self, condition: ir.Expr, target: str, when: bool) -> None:
        """Jump to `target` if the truth of `condition` equals `when`, else fall through."""
        if isinstance(condition, ir.Const):
            if (condition.value != 0) == when:
                self.jump(target)
        elif isinstance(condition, ir.Unary) and condition.opcode is Opcode.EQZ:
            self.conditional_jump(condition.operand, target, not when)
        elif isinstance(condition, ir.Logical):
            self._logical_jump(condition, target, when)
        elif self._compares_with_zero(condition):
            when = when if condition.opcode is Opcode.NE else not when
            self.conditional_jump(condition.left, target, when)
        elif isinstance(condition, ir.Sequence) and condition.value is not None:
            for effect in condition.effects:
                self.statement(effect)
            self.conditional_jump(condition.value, target, when)
        else:
            self.expr(condition)
            self.emit(Opcode.JNZ if when else Opcode.JZ, 0, target)

    @staticmethod
    def _compares_with_zero(condition: ir.Expr) -> bool:
        return (
            isinstance(condition, ir.Binary)
            and condition.opcode in (Opcode.EQ, Opcode.NE)
            and isinstance(condition.right, ir.Const)
            and condition.right.value == 0
        )

    def _logical_jump(self, condition: ir.Logical, target: str, when: bool) -> None:
        # `a && b` is false as soon as a is; `a || b` is true as soon as a is.
        short_circuit = condition.op == "or"
        if when == short_circuit:
            self.conditional_jump(condition.left, target, when)
            self.conditional_jump(condition.right, target, when)
            return
        skip = self.new_label()
        self.conditional_jump(condition.left, skip, short_circuit)
        self.conditional_jump(condition.right, target, when)
        self.label(skip)

    # --- expressions ---

    def expr(self, expr: ir.Expr) -> None:
        method = getattr(self, "_expr_" + type(expr).__name__)
        method(expr)

    def _expr_Const(self, expr: ir.Const) -> None:
        self.emit(Opcode.PUSH, expr.value)

    def _expr_SymbolAddress(self, expr: ir.SymbolAddress) -> None:
        self.emit(Opcode.PUSH, self.addresses[expr.symbol] + expr.offset)

    def _expr_LocalGet(self, expr: ir.LocalGet) -> None:
        self.emit(Opcode.LOCAL_GET, expr.slot)

    def _expr_LocalTee(self, expr: ir.LocalTee) -> None:
        self.expr(expr.value)
        self.emit(Opcode.LOCAL_TEE, expr.slot)

    def _access_address(self, address: ir.Expr, offset: int) -> int:
        """Emit the address of a load or store and return its offset immediate.

        `x + &global` becomes x with the global's address in the immediate: data
        addresses are below 2^20, so the immediate cannot wrap.
        """
        if isinstance(address, ir.Binary) and address.opcode is Opcode.ADD and isinstance(
            address.right, ir.SymbolAddress
        ):
            symbol = address.right
            total = self.addresses[symbol.symbol] + symbol.offset + offset
            if 0 <= total <= MAX_OFFSET:
                self.expr(address.left)
                return total
        self.expr(address)
        return offset

    def _expr_Load(self, expr: ir.Load) -> None:
        offset = self._access_address(expr.address, expr.offset)
        self.emit(expr.opcode, offset)

    def _expr_StoreTee(self, expr: ir.StoreTee) -> None:
        offset = self._access_address(expr.address, expr.offset)
        self.expr(expr.value)
        self.emit(Opcode.LOCAL_TEE, expr.scratch)
        self.emit(expr.opcode, offset)
        self.emit(Opcode.LOCAL_GET, expr.scratch)

    def _expr_Binary(self, expr: ir.Binary) -> None:
        self.expr(expr.left)
        self.expr(expr.right)
        self.emit(expr.opcode)

    def _expr_Unary(self, expr: ir.Unary) -> None:
        self.expr(expr.operand)
        self.emit(expr.opcode)

    def _truth_value(self, expr: ir.Expr) -> None:
        self.expr(expr)
        if not is_boolean(expr):
            self.emit(Opcode.PUSH, 0)
            self.emit(Opcode.NE)

    def _expr_Logical(self, expr: ir.Logical) -> None:
        # `a && b`: a 0 from `a` is the result; otherwise drop it and use b != 0.
        end = self.new_label()
        if expr.op == "and":
            self.expr(expr.left)
            self.emit(Opcode.DUP)
            self.emit(Opcode.JZ, 0, end)
        else:
            self._truth_value(expr.left)
            self.emit(Opcode.DUP)
            self.emit(Opcode.JNZ, 0, end)
        self.emit(Opcode.POP)
        self._truth_value(expr.right)
        self.label(end)

    def _expr_Conditional(self, expr: ir.Conditional) -> None:
        otherwise = self.new_label()
        end = self.new_label()
        self.conditional_jump(expr.condition, otherwise, False)
        self.expr(expr.then)
        self.jump(end)
        self.label(otherwise)
        self.expr(expr.otherwise)
        self.label(end)

    def _expr_Select(self, expr: ir.Select) -> None:
        self.expr(expr.then)
        self.expr(expr.otherwise)
        self.expr(expr.condition)
        self.emit(Opcode.SELECT)

    def _expr_Call(self, expr: ir.Call) -> None:
        for arg in expr.args:
            self.expr(arg)
        self.emit(Opcode.CALL, 0, expr.function)

    def _expr_Input(self, expr: ir.Input) -> None:
        self.emit(Opcode.PUSH, INPUT_PORT)
        self.emit(Opcode.I32_LOAD)

    def _expr_Sequence(self, expr: ir.Sequence) -> None:
        for effect in expr.effects:
            self.statement(effect)
        if expr.value is not None:
            self.expr(expr.value)
