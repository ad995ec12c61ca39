"""Simple IR optimizations: expression rewrites and control-flow cleanup.

Every rewrite keeps the machine's semantics exactly, traps included. No rewrite drops an
expression that has side effects or may trap, and constant folding leaves alone an
operation (division) whose constant operands would trap. The rewrites:

- fold operators on constants; drop `x + 0`, `x * 1`, `x | 0`, `x << 0` ...;
- multiply by 2^k becomes `shl k`; unsigned divide and remainder by 2^k become
  `shr_u k` and `and (2^k - 1)`;
- `(x + c1) + c2` becomes `x + (c1 + c2)`; a constant added to an address moves into the
  offset immediate of the load or store when it is below 2^31 (the immediate adds
  without wrap-around, so a "negative" constant must stay an ADD);
- `!(a < b)` becomes `a >= b`, and `b != 0` of a value that is already 0 or 1 is b;
- `c ? x : y` with constant or local arms becomes a branch-free SELECT;
- branches on constants become jumps, jumps to empty blocks are threaded, unreachable
  blocks go, and a block that is the only successor of its only predecessor is merged
  into it.
"""

from __future__ import annotations

from tlc.compiler import ir
from tlc.compiler.codegen import is_boolean
from tlc.compiler.isa import INT_MIN, WORD_MASK, Opcode, to_signed

_INVERSE = {
    Opcode.EQ: Opcode.NE, Opcode.NE: Opcode.EQ,
    Opcode.LT_S: Opcode.GE_S, Opcode.GE_S: Opcode.LT_S,
    Opcode.GT_S: Opcode.LE_S, Opcode.LE_S: Opcode.GT_S,
    Opcode.LT_U: Opcode.GE_U, Opcode.GE_U: Opcode.LT_U,
    Opcode.GT_U: Opcode.LE_U, Opcode.LE_U: Opcode.GT_U,
}  # fmt: skip
_COMMUTATIVE = frozenset({Opcode.ADD, Opcode.MUL, Opcode.AND, Opcode.OR, Opcode.XOR})
# The largest constant that may move into an offset immediate.
MAX_FOLDED_OFFSET = (1 << 31) - 1


def evaluate_binary(opcode: Opcode, a: int, b: int) -> int | None:
    """Compute a binary opcode on 32-bit patterns; None where the machine would trap."""
    sa, sb = to_signed(a), to_signed(b)
    if opcode in (Opcode.DIV_S, Opcode.DIV_U, Opcode.REM_S, Opcode.REM_U):
        if b == 0 or (opcode is Opcode.DIV_S and a == INT_MIN and sb == -1):
            return None
        if opcode is Opcode.DIV_U:
            return a // b
        if opcode is Opcode.REM_U:
            return a % b
        quotient = abs(sa) // abs(sb) * (1 if (sa < 0) == (sb < 0) else -1)
        return (quotient if opcode is Opcode.DIV_S else sa - sb * quotient) & WORD_MASK
    count = b & 31
    results = {
        Opcode.ADD: lambda: a + b, Opcode.SUB: lambda: a - b, Opcode.MUL: lambda: a * b,
        Opcode.AND: lambda: a & b, Opcode.OR: lambda: a | b, Opcode.XOR: lambda: a ^ b,
        Opcode.SHL: lambda: a << count, Opcode.SHR_S: lambda: sa >> count,
        Opcode.SHR_U: lambda: a >> count,
        Opcode.ROTL: lambda: (a << count) | (a >> (32 - count)),
        Opcode.ROTR: lambda: (a >> count) | (a << (32 - count)),
        Opcode.EQ: lambda: a == b, Opcode.NE: lambda: a != b,
        Opcode.LT_S: lambda: sa < sb, Opcode.LT_U: lambda: a < b,
        Opcode.GT_S: lambda: sa > sb, Opcode.GT_U: lambda: a > b,
        Opcode.LE_S: lambda: sa <= sb, Opcode.LE_U: lambda: a <= b,
        Opcode.GE_S: lambda: sa >= sb, Opcode.GE_U: lambda: a >= b,
    }  # fmt: skip
    return int(results[opcode]()) & WORD_MASK


def evaluate_unary(opcode: Opcode, a: int) -> int:
    if opcode is Opcode.EQZ:
        return int(a == 0)
    if opcode is Opcode.NEG:
        return -a & WORD_MASK
    if opcode is Opcode.ABS:
        return abs(to_signed(a)) & WORD_MASK
    if opcode is Opcode.POPCNT:
        return bin(a).count("1")
    if opcode is Opcode.CLZ:
        return 32 - a.bit_length()
    assert opcode is Opcode.CTZ
    return 32 if a == 0 else (a & -a).bit_length() - 1


def _power_of_two(value: int) -> int | None:
    if value and value & (value - 1) == 0:
        return value.bit_length() - 1
    return None


def _is_simple(expr: ir.Expr) -> bool:
    """Cheap to evaluate, free of side effects and unable to trap."""
    return isinstance(expr, (ir.Const, ir.LocalGet, ir.SymbolAddress))


# --- expressions ----------------------------------------------------------------------


def simplify(expr: ir.Expr) -> ir.Expr:
    method = _SIMPLIFIERS.get(type(expr))
    return method(expr) if method is not None else expr


def _simplify_binary(expr: ir.Binary) -> ir.Expr:
    left, right = simplify(expr.left), simplify(expr.right)
    opcode = expr.opcode
    if isinstance(left, ir.Const) and isinstance(right, ir.Const):
        value = evaluate_binary(opcode, left.value, right.value)
        if value is not None:
            return ir.Const(value)
    if opcode in _COMMUTATIVE and isinstance(left, (ir.Const, ir.SymbolAddress)) and not (
        isinstance(right, (ir.Const, ir.SymbolAddress))
    ):
        left, right = right, left
    if isinstance(right, ir.Const):
        rewritten = _with_constant(opcode, left, right.value)
        if rewritten is not None:
            return rewritten
    if opcode is Opcode.NE and isinstance(right, ir.Const) and right.value == 0 and (
        is_boolean(left)
    ):
        return left
    return ir.Binary(opcode, left, right)


def _with_constant(opcode: Opcode, left: ir.Expr, constant: int) -> ir.Expr | None:
    """Rewrite `left opcode constant`, or return None to keep it."""
    identity = {Opcode.ADD: 0, Opcode.SUB: 0, Opcode.OR: 0, Opcode.XOR: 0, Opcode.SHL: 0,
                Opcode.SHR_S: 0, Opcode.SHR_U: 0, Opcode.MUL: 1, Opcode.DIV_S: 1,
                Opcode.DIV_U: 1, Opcode.AND: WORD_MASK}
    if identity.get(opcode) == constant:
        return left
    shift = _power_of_two(constant)
    if opcode is Opcode.MUL and shift is not None:
        return ir.Binary(Opcode.SHL, left, ir.Const(shift))
    if opcode is Opcode.DIV_U and shift is not None:
        return ir.Binary(Opcode.SHR_U, left, ir.Const(shift))
    if opcode is Opcode.REM_U and shift is not None:
        return ir.Binary(Opcode.AND, left, ir.Const(constant - 1))
    if opcode is Opcode.ADD:
        if isinstance(left, ir.SymbolAddress):
            return ir.SymbolAddress(left.symbol, left.offset + to_signed(constant))
        if isinstance(left, ir.Binary) and left.opcode is Opcode.ADD and isinstance(
            left.right, ir.Const
        ):
            total = (left.right.value + constant) & WORD_MASK
            return _with_constant(Opcode.ADD, left.left, total) or ir.Binary(
                Opcode.ADD, left.left, ir.Const(total))
    return None


def _simplify_unary(expr: ir.Unary) -> ir.Expr:
    operand = simplify(expr.operand)
    if isinstance(operand, ir.Const):
        return ir.Const(evaluate_unary(expr.opcode, operand.value))
    if expr.opcode is Opcode.EQZ and isinstance(operand, ir.Binary) and (
        operand.opcode in _INVERSE
    ):
        return ir.Binary(_INVERSE[operand.opcode], operand.left, operand.right)
    if expr.opcode is Opcode.EQZ and isinstance(operand, ir.Unary) and (
        operand.opcode is Opcode.EQZ and is_boolean(operand.operand)
    ):
        return operand.operand
    return ir.Unary(expr.opcode, operand)


def _fold_offset(address: ir.Expr, offset: int) -> tuple[ir.Expr, int]:
    """Move a constant addend of `address` into the access's offset immediate."""
    if isinstance(address, ir.Binary) and address.opcode is Opcode.ADD and isinstance(
        address.right, ir.Const
    ):
        constant = address.right.value
        if constant <= MAX_FOLDED_OFFSET and offset + constant <= MAX_FOLDED_OFFSET:
            return _fold_offset(address.left, offset + constant)
    if isinstance(address, ir.SymbolAddress) and address.offset + offset >= 0 and offset:
        return ir.SymbolAddress(address.symbol, address.offset + offset), 0
    return address, offset


def _simplify_load(expr: ir.Load) -> ir.Expr:
    address, offset = _fold_offset(simplify(expr.address), expr.offset)
    return ir.Load(expr.opcode, address, offset)


def _simplify_store_tee(expr: ir.StoreTee) -> ir.Expr:
    address, offset = _fold_offset(simplify(expr.address), expr.offset)
    return ir.StoreTee(expr.opcode, address, simplify(expr.value), expr.scratch, offset)


def _simplify_logical(expr: ir.Logical) -> ir.Expr:
    left, right = simplify(expr.left), simplify(expr.right)
    if isinstance(left, ir.Const):
        decided = (left.value != 0) == (expr.op == "or")
        if decided:
            return ir.Const(int(expr.op == "or"))
        return right if is_boolean(right) else ir.Binary(Opcode.NE, right, ir.Const(0))
    return ir.Logical(expr.op, left, right)


def _simplify_conditional(expr: ir.Conditional) -> ir.Expr:
    condition = simplify(expr.condition)
    then, otherwise = simplify(expr.then), simplify(expr.otherwise)
    if isinstance(condition, ir.Const):
        return then if condition.value else otherwise
    if _is_simple(then) and _is_simple(otherwise):
        if isinstance(then, ir.Const) and isinstance(otherwise, ir.Const) and (
            then.value == 1 and otherwise.value == 0
        ):
            return condition if is_boolean(condition) else ir.Binary(
                Opcode.NE, condition, ir.Const(0))
        return ir.Select(condition, then, otherwise)
    return ir.Conditional(condition, then, otherwise)


def _simplify_sequence(expr: ir.Sequence) -> ir.Expr:
    effects = tuple(simplify_statement(effect) for effect in expr.effects)
    value = simplify(expr.value) if expr.value is not None else None
    if not effects and value is not None:
        return value
    return ir.Sequence(effects, value)


_SIMPLIFIERS = {
    ir.Binary: _simplify_binary,
    ir.Unary: _simplify_unary,
    ir.Load: _simplify_load,
    ir.StoreTee: _simplify_store_tee,
    ir.Logical: _simplify_logical,
    ir.Conditional: _simplify_conditional,
    ir.Sequence: _simplify_sequence,
    ir.LocalTee: lambda e: ir.LocalTee(e.slot, simplify(e.value)),
    ir.Select: lambda e: ir.Select(simplify(e.condition), simplify(e.then),
                                   simplify(e.otherwise)),
    ir.Call: lambda e: ir.Call(e.function, tuple(simplify(a) for a in e.args),
                               e.returns_value),
}


def simplify_statement(statement: ir.Stmt) -> ir.Stmt:
    if isinstance(statement, ir.SetLocal):
        return ir.SetLocal(statement.slot, simplify(statement.value), statement.line)
    if isinstance(statement, ir.Store):
        address, offset = _fold_offset(simplify(statement.address), statement.offset)
        return ir.Store(statement.opcode, address, simplify(statement.value), offset,
                        statement.line)
    if isinstance(statement, ir.Output):
        return ir.Output(simplify(statement.value), statement.line)
    return ir.Eval(simplify(statement.value), statement.line)


def _simplify_terminator(terminator: ir.Terminator) -> ir.Terminator:
    if isinstance(terminator, ir.Branch):
        condition = simplify(terminator.condition)
        if isinstance(condition, ir.Const):
            target = terminator.if_true if condition.value else terminator.if_false
            return ir.Jump(target, terminator.line)
        return ir.Branch(condition, terminator.if_true, terminator.if_false, terminator.line)
    if isinstance(terminator, ir.Return) and terminator.value is not None:
        return ir.Return(simplify(terminator.value), terminator.line)
    if isinstance(terminator, ir.Halt):
        return ir.Halt(simplify(terminator.value), terminator.line)
    return terminator


# --- control flow ---------------------------------------------------------------------


def _successors(terminator: ir.Terminator) -> list[str]:
    if isinstance(terminator, ir.Jump):
        return [terminator.target]
    if isinstance(terminator, ir.Branch):
        return [terminator.if_true, terminator.if_false]
    return []


def _thread_jumps(blocks: list[ir.Block]) -> None:
    """Point jumps and branches at the final target of chains of empty jump blocks."""
    by_label = {block.label: block for block in blocks}

    def final(label: str) -> str:
        seen = set()
        while label not in seen:
            seen.add(label)
            block = by_label[label]
            if block.statements or not isinstance(block.terminator, ir.Jump):
                return label
            label = block.terminator.target
        return label

    for block in blocks:
        terminator = block.terminator
        if isinstance(terminator, ir.Jump):
            block.terminator = ir.Jump(final(terminator.target), terminator.line)
        elif isinstance(terminator, ir.Branch):
            block.terminator = ir.Branch(terminator.condition, final(terminator.if_true),
                                         final(terminator.if_false), terminator.line)


def _reachable(blocks: list[ir.Block]) -> list[ir.Block]:
    by_label = {block.label: block for block in blocks}
    seen = {blocks[0].label}
    stack = [blocks[0]]
    while stack:
        for label in _successors(stack.pop().terminator):
            if label not in seen:
                seen.add(label)
                stack.append(by_label[label])
    return [block for block in blocks if block.label in seen]


def _merge_blocks(blocks: list[ir.Block]) -> list[ir.Block]:
    predecessors: dict[str, int] = {}
    for block in blocks:
        for label in _successors(block.terminator):
            predecessors[label] = predecessors.get(label, 0) + 1
    by_label = {block.label: block for block in blocks}
    merged: set[str] = set()
    for block in blocks:
        if block.label in merged:
            continue
        while isinstance(block.terminator, ir.Jump):
            target = by_label[block.terminator.target]
            if target is block or predecessors.get(target.label) != 1 or target is blocks[0]:
                break
            block.statements.extend(target.statements)
            block.terminator = target.terminator
            merged.add(target.label)
    return [block for block in blocks if block.label not in merged]


def optimize_function(function: ir.Function) -> None:
    for block in function.blocks:
        block.statements = [simplify_statement(s) for s in block.statements]
        block.terminator = _simplify_terminator(block.terminator)
    _thread_jumps(function.blocks)
    blocks = _reachable(function.blocks)
    function.blocks = _merge_blocks(blocks)


def optimize_unit(unit: ir.Unit) -> ir.Unit:
    for function in unit.functions.values():
        optimize_function(function)
    return unit
