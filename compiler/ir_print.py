"""The printed form of the IR, as `tlc ir` shows it (docs/ir.md describes the syntax)."""

from __future__ import annotations

from tlc.compiler import ir
from tlc.compiler.isa import to_signed


def format_unit(unit: ir.Unit) -> str:
    lines: list[str] = []
    for data in unit.data.values():
        lines.append(format_data(data))
    for function in unit.functions.values():
        if lines:
            lines.append("")
        lines.extend(format_function(function))
    return "\n".join(lines) + "\n"


def format_data(data: ir.DataObject) -> str:
    text = f"data {data.symbol}: {data.size} bytes, align {data.alignment}"
    if data.image.strip(b"\0"):
        text += " = " + _bytes_text(data.image)
    for relocation in data.relocations:
        text += f" [+{relocation.offset} = &{relocation.symbol}{_addend(relocation.addend)}]"
    if data.comment:
        text += f"  ; {data.comment}"
    return text


def _bytes_text(image: bytes) -> str:
    if image.endswith(b"\0") and all(32 <= b < 127 or b in (9, 10) for b in image[:-1]):
        body = image[:-1].decode("ascii").replace("\\", "\\\\").replace('"', '\\"')
        return '"' + body.replace("\n", "\\n").replace("\t", "\\t") + '\\0"'
    return " ".join(f"{b:02x}" for b in image)


def _addend(value: int) -> str:
    if value == 0:
        return ""
    return f"+{value}" if value > 0 else str(value)


def format_function(function: ir.Function) -> list[str]:
    frame = f", frame {function.frame_size} bytes at local{function.frame_slot}" if (
        function.frame_size) else ""
    result = "returns a value" if function.returns_value else "void"
    lines = [f"function {function.name}(params {function.params}, slots {function.slots}"
             f"{frame}) {result}  ; {function.source} line {function.line}"]
    for block in function.blocks:
        lines.append(f"  {block.label}:")
        for statement in block.statements:
            lines.append("    " + _with_line(format_statement(statement), statement.line))
        terminator = block.terminator
        if terminator is not None:
            lines.append("    " + _with_line(format_terminator(terminator), terminator.line))
    return lines


def _with_line(text: str, line: int | None) -> str:
    return text if line is None else f"{text}  ; line {line}"


def format_statement(statement: ir.Stmt) -> str:
    if isinstance(statement, ir.SetLocal):
        return f"local{statement.slot} = {format_expr(statement.value)}"
    if isinstance(statement, ir.Store):
        mnemonic = statement.opcode.mnemonic.lower()
        address = _address(statement.address, statement.offset)
        return f"{mnemonic} {address} = {format_expr(statement.value)}"
    if isinstance(statement, ir.Output):
        return f"output {format_expr(statement.value)}"
    assert isinstance(statement, ir.Eval)
    return f"eval {format_expr(statement.value)}"


def format_terminator(terminator: ir.Terminator) -> str:
    if isinstance(terminator, ir.Jump):
        return f"jump {terminator.target}"
    if isinstance(terminator, ir.Branch):
        return (f"branch {format_expr(terminator.condition)} {terminator.if_true} "
                f"{terminator.if_false}")
    if isinstance(terminator, ir.Return):
        if terminator.value is None:
            return "return"
        return f"return {format_expr(terminator.value)}"
    return f"halt {format_expr(terminator.value)}"


def _address(address: ir.Expr, offset: int) -> str:
    text = format_expr(address)
    return f"[{text} +{offset}]" if offset else f"[{text}]"


def format_expr(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Const):
        return str(to_signed(expr.value))
    if isinstance(expr, ir.SymbolAddress):
        return f"&{expr.symbol}{_addend(expr.offset)}"
    if isinstance(expr, ir.LocalGet):
        return f"local{expr.slot}"
    if isinstance(expr, ir.LocalTee):
        return f"(tee local{expr.slot} {format_expr(expr.value)})"
    if isinstance(expr, ir.Load):
        return f"({expr.opcode.mnemonic.lower()} {_address(expr.address, expr.offset)})"
    if isinstance(expr, ir.StoreTee):
        mnemonic = expr.opcode.mnemonic.lower()
        return (f"({mnemonic}-tee {_address(expr.address, expr.offset)} "
                f"{format_expr(expr.value)})")
    if isinstance(expr, ir.Binary):
        return (f"({expr.opcode.mnemonic.lower()} {format_expr(expr.left)} "
                f"{format_expr(expr.right)})")
    if isinstance(expr, ir.Unary):
        return f"({expr.opcode.mnemonic.lower()} {format_expr(expr.operand)})"
    if isinstance(expr, ir.Logical):
        op = "&&" if expr.op == "and" else "||"
        return f"({op} {format_expr(expr.left)} {format_expr(expr.right)})"
    if isinstance(expr, (ir.Conditional, ir.Select)):
        name = "if" if isinstance(expr, ir.Conditional) else "select"
        return (f"({name} {format_expr(expr.condition)} {format_expr(expr.then)} "
                f"{format_expr(expr.otherwise)})")
    if isinstance(expr, ir.Call):
        args = "".join(" " + format_expr(arg) for arg in expr.args)
        return f"(call {expr.function}{args})"
    if isinstance(expr, ir.Input):
        return "(input)"
    assert isinstance(expr, ir.Sequence)
    effects = "; ".join(format_statement(effect) for effect in expr.effects)
    return f"(seq [{effects}] {format_expr(expr.value)})"
