"""The three tasks of ``steer-fast reproduce``: generated, seeded, split and scored here.

Every example is a prompt (a template filled in with an expression), a completion
``<answer>{answer}</answer>`` and the gold answer. A generated expression's answer is always
computed from its printed text (``listops_value``, ``boolean_value``, ``arithmetic_value``), so
the text and the answer cannot disagree.

- ``listops``: the ListOps language of Nangia & Bowman (2018), as the paper's listops-64 data.
  Operators ``[MIN``, ``[MAX``, ``[MED`` (median) and ``[SM`` (sum mod 10) over the digits 0-9,
  each written ``[OP arg ... ]``, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]``. Generation follows the
  original generator: below the depth limit a node is an operator with probability
  ``LISTOPS_VALUE_P`` (0.25) and a uniform digit otherwise; an operator has 2 to 5 arguments
  (uniform) and a uniform operator; nodes at depth ``LISTOPS_MAX_DEPTH`` (10, the root being
  depth 1) are digits. The root is always an operator (a bare digit is not an expression), and an
  expression is kept when it has at most ``max_tokens`` whitespace-separated tokens (64 by
  default). ``[MED`` is the original's ``int(np.median(args))``: with an even number of arguments
  the mean of the two middle values, rounded down (``[MED 4 7 ]`` is 5).
- ``boolean_expressions``: BIG-Bench Hard's boolean_expressions language: ``True``, ``False``,
  ``not``, ``and``, ``or`` and parentheses written as separate words, e.g.
  ``not ( True ) and ( False or True )``; 2 to 4 constants; Python's precedence
  (``not`` > ``and`` > ``or``).
- ``multistep_arithmetic``: BIG-Bench Hard's multistep_arithmetic_two language: two
  parenthesised groups of 2 to 4 integers in [-9, 9] joined by ``+``, ``-`` or ``*``, e.g.
  ``((-1 + 2) * (3 - -4))``; usual precedence; answers kept within +-``ARITHMETIC_ANSWER_LIMIT``
  so that the completion fits in ``MAX_NEW_TOKENS`` tokens when digits are single tokens.

Splits: each split draws from its own seeded stream, test first, then validation, then train,
skipping any expression already drawn, so the splits are disjoint and the test set does not
depend on the other sizes. Labels are balanced in every split: each answer class (the digit for
ListOps, True / False, the answer's sign for arithmetic) gets ``size // classes`` examples, and
the remainder goes to classes picked by the seeded stream; each split is then shuffled.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TASK_NAMES: tuple[str, ...] = ("listops", "boolean_expressions", "multistep_arithmetic")
MAX_NEW_TOKENS = 10

# The published ListOps template (the ellipsis is U+2026) and two templates in the same style.
LISTOPS_PROMPT = (
    "Evaluate the value of the following nested list expression.\n"
    "Return only the final numeric result inside <answer>…</answer>.\n\n"
    "Expression:\n{expression}\n"
)
BOOLEAN_PROMPT = (
    "Evaluate the following boolean expression.\n"
    "Return only the final result (True or False) inside <answer>…</answer>.\n\n"
    "Expression:\n{expression}\n"
)
ARITHMETIC_PROMPT = (
    "Evaluate the following arithmetic expression.\n"
    "Return only the final integer result inside <answer>…</answer>.\n\n"
    "Expression:\n{expression}\n"
)
PROMPTS: dict[str, str] = {
    "listops": LISTOPS_PROMPT,
    "boolean_expressions": BOOLEAN_PROMPT,
    "multistep_arithmetic": ARITHMETIC_PROMPT,
}

LISTOPS_OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_VALUE_P = 0.25  # a node below the depth limit is an operator when random() <= this
LISTOPS_MIN_ARGS, LISTOPS_MAX_ARGS = 2, 5
LISTOPS_MAX_DEPTH = 10
LISTOPS_MAX_TOKENS = 64
BOOLEAN_CONSTANTS = (2, 4)  # how many True / False constants an expression has
ARITHMETIC_GROUP_SIZES = (2, 4)  # how many integers each parenthesised group has
ARITHMETIC_ANSWER_LIMIT = 999
_ATTEMPTS_PER_EXAMPLE = 200  # draws allowed per requested example before giving up

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", flags=re.S | re.I)
_INTEGER_RE = re.compile(r"[-+]?[0-9]+")


@dataclass(frozen=True)
class Example:
    """One prompt/completion pair."""

    prompt: str  # the full prompt text (the task's template, filled in)
    completion: str  # what the model must produce, e.g. "<answer>7</answer>"
    answer: str  # the gold answer string, e.g. "7", "True", "-42"


@dataclass(frozen=True)
class TaskSplits:
    """A task's train, validation and test examples (disjoint when generated here)."""

    name: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]


def make_example(template: str, expression: str, answer: str) -> Example:
    """Returns the Example for ``expression`` with gold ``answer`` under ``template``."""
    return Example(
        prompt=template.format(expression=expression),
        completion=f"<answer>{answer}</answer>",
        answer=answer,
    )


# --- the three expression languages: values of printed expressions, and generators ---------


def listops_value(expression: str) -> int:
    """Returns the value (0-9) of a printed ListOps expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]``.

    Parentheses (the original release's bracketing) are ignored. ValueError on anything else.
    """
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for token in expression.split():
        if token in ("(", ")"):
            continue
        if result is not None:
            raise ValueError(f"expression has text after its end: {expression!r}")
        if token in LISTOPS_OPERATORS:
            stack.append((token, []))
        elif token == "]" and stack:
            operator, args = stack.pop()
            if not args:
                raise ValueError(f"operator {operator} without arguments in {expression!r}")
            value = _listops_apply(operator, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif len(token) == 1 and token.isdigit() and stack:
            stack[-1][1].append(int(token))
        else:
            raise ValueError(f"unexpected token {token!r} in ListOps expression {expression!r}")
    if result is None:
        raise ValueError(f"incomplete ListOps expression {expression!r}")
    return result


def _listops_apply(operator: str, args: list[int]) -> int:
    """Returns one operator's value; MED is int(np.median(args)): even counts round down."""
    if operator == "[MIN":
        return min(args)
    if operator == "[MAX":
        return max(args)
    if operator == "[SM":
        return sum(args) % 10
    ordered = sorted(args)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) // 2


def _listops_node(rng: random.Random, depth: int, out: list[str], limit: int) -> bool:
    """Appends one node's tokens to ``out``; returns False as soon as ``out`` exceeds ``limit``."""
    if depth > 1 and (depth >= LISTOPS_MAX_DEPTH or rng.random() > LISTOPS_VALUE_P):
        out.append(str(rng.randrange(10)))
        return len(out) <= limit
    out.append(rng.choice(LISTOPS_OPERATORS))
    for _ in range(rng.randint(LISTOPS_MIN_ARGS, LISTOPS_MAX_ARGS)):
        if not _listops_node(rng, depth + 1, out, limit):
            return False
    out.append("]")
    return len(out) <= limit


def _generate_listops(rng: random.Random, max_tokens: int | None) -> str | None:
    out: list[str] = []
    limit = LISTOPS_MAX_TOKENS if max_tokens is None else max_tokens
    return " ".join(out) if _listops_node(rng, 1, out, limit) else None


class _Parser:
    """Recursive-descent parsing over a token list (shared by the boolean and arithmetic forms)."""

    def __init__(self, tokens: list[str], expression: str):
        self.tokens, self.position, self.expression = tokens, 0, expression

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'!r} at {self.expression!r}")
        self.position += 1
        return token

    def finish(self, value):
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r} in {self.expression!r}")
        return value


def boolean_value(expression: str) -> bool:
    """Returns the value of a boolean expression (True/False/not/and/or/parentheses), with
    Python's precedence. ValueError on anything else."""
    parser = _Parser(re.findall(r"\(|\)|[^\s()]+", expression), expression)

    def disjunction() -> bool:
        value = conjunction()
        while parser.peek() == "or":
            parser.take()
            value = conjunction() or value
        return value

    def conjunction() -> bool:
        value = negation()
        while parser.peek() == "and":
            parser.take()
            value = negation() and value
        return value

    def negation() -> bool:
        if parser.peek() == "not":
            parser.take()
            return not negation()
        token = parser.take()
        if token == "(":
            value = disjunction()
            parser.take(")")
            return value
        if token in ("True", "False"):
            return token == "True"
        raise ValueError(f"unexpected {token!r} in boolean expression {expression!r}")

    return parser.finish(disjunction())


def _boolean_tokens(rng: random.Random, constants: int, top: bool) -> list[str]:
    if constants == 1:
        tokens, paren_p = [rng.choice(("True", "False"))], 0.25
    else:
        left = rng.randint(1, constants - 1)
        tokens = [
            *_boolean_tokens(rng, left, False),
            rng.choice(("and", "or")),
            *_boolean_tokens(rng, constants - left, False),
        ]
        paren_p = 0.0 if top else 0.5
    if rng.random() < paren_p:
        tokens = ["(", *tokens, ")"]
    nots = 0
    while nots < 3 and rng.random() < 0.3:
        nots += 1
    return ["not"] * nots + tokens


def _generate_boolean(rng: random.Random, max_tokens: int | None) -> str | None:
    tokens = _boolean_tokens(rng, rng.randint(*BOOLEAN_CONSTANTS), True)
    return " ".join(tokens) if max_tokens is None or len(tokens) <= max_tokens else None


def arithmetic_value(expression: str) -> int:
    """Returns the value of an integer expression over + - * and parentheses (unary minus
    allowed, usual precedence). ValueError on anything else."""
    tokens = re.findall(r"[0-9]+|\S", expression)
    parser = _Parser(tokens, expression)

    def total() -> int:
        value = product()
        while parser.peek() in ("+", "-"):
            value = value + product() if parser.take() == "+" else value - product()
        return value

    def product() -> int:
        value = factor()
        while parser.peek() == "*":
            parser.take()
            value *= factor()
        return value

    def factor() -> int:
        token = parser.take()
        if token == "-":
            return -factor()
        if token == "(":
            value = total()
            parser.take(")")
            return value
        if token.isdigit():
            return int(token)
        raise ValueError(f"unexpected {token!r} in arithmetic expression {expression!r}")

    return parser.finish(total())


def _generate_arithmetic(rng: random.Random, max_tokens: int | None) -> str | None:
    groups = []
    for _ in range(2):
        numbers = [str(rng.randint(-9, 9)) for _ in range(rng.randint(*ARITHMETIC_GROUP_SIZES))]
        groups.append(
            "(" + numbers[0] + "".join(f" {rng.choice('+-*')} {n}" for n in numbers[1:]) + ")"
        )
    expression = f"({groups[0]} {rng.choice('+-*')} {groups[1]})"
    if max_tokens is not None and len(expression.split()) > max_tokens:
        return None
    if abs(arithmetic_value(expression)) > ARITHMETIC_ANSWER_LIMIT:
        return None
    return expression


@dataclass(frozen=True)
class _TaskSpec:
    generate: Callable[[random.Random, int | None], str | None]  # None: rejected draw
    answer: Callable[[str], str]  # the printed expression's gold answer
    label_class: Callable[[str], str]  # the class a gold answer is balanced in
    classes: tuple[str, ...]
    min_tokens: int  # the shortest expression the task has, in whitespace-separated tokens


_TASKS: dict[str, _TaskSpec] = {
    "listops": _TaskSpec(
        _generate_listops, lambda e: str(listops_value(e)), str, tuple(map(str, range(10))), 4
    ),
    "boolean_expressions": _TaskSpec(
        _generate_boolean, lambda e: str(boolean_value(e)), str, ("True", "False"), 3
    ),
    "multistep_arithmetic": _TaskSpec(
        _generate_arithmetic,
        lambda e: str(arithmetic_value(e)),
        lambda a: "negative" if a.startswith("-") else "non-negative",
        ("negative", "non-negative"),
        7,
    ),
}


def make_task(
    name: str,
    *,
    train_size: int,
    validation_size: int,
    test_size: int,
    seed: int = 0,
    max_tokens: int | None = None,
) -> TaskSplits:
    """Generates a task's splits (see the module docstring for the rules).

    train_size and test_size must be >= 1, validation_size >= 0. max_tokens limits the
    expression's whitespace-separated tokens (ListOps: 64 when None; the other tasks: no limit
    when None). Returns the TaskSplits, the same for the same arguments. ValueError naming the
    argument for an unknown task, bad sizes or seed, a max_tokens below the task's shortest
    expression, or sizes the task cannot fill with distinct expressions under max_tokens.
    """
    if name not in _TASKS:
        raise ValueError(f"name={name!r} is not a task; choose from {', '.join(TASK_NAMES)}")
    sizes = {"test_size": test_size, "validation_size": validation_size, "train_size": train_size}
    for argument, value in sizes.items():
        minimum = int(argument != "validation_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    spec = _TASKS[name]
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or max_tokens < spec.min_tokens
    ):
        raise ValueError(
            f"max_tokens must be None or an integer >= {spec.min_tokens} (the shortest {name} "
            f"expression), got {max_tokens!r}"
        )
    seen: set[str] = set()
    splits = {
        argument.removesuffix("_size"): _generate_split(
            spec,
            name,
            argument,
            size,
            random.Random(f"{name}:{seed}:{argument}"),
            seen,
            max_tokens,
        )
        for argument, size in sizes.items()
    }
    return TaskSplits(name, splits["train"], splits["validation"], splits["test"])


def _generate_split(
    spec: _TaskSpec,
    name: str,
    argument: str,
    size: int,
    rng: random.Random,
    seen: set[str],
    max_tokens: int | None,
) -> tuple[Example, ...]:
    """Returns ``size`` new balanced examples drawn from ``rng``, adding them to ``seen``."""
    quota = dict.fromkeys(spec.classes, size // len(spec.classes))
    for label in rng.sample(spec.classes, size % len(spec.classes)):
        quota[label] += 1
    examples: list[Example] = []
    template = PROMPTS[name]
    for _ in range(_ATTEMPTS_PER_EXAMPLE * size + 10_000):
        if len(examples) == size:
            break
        expression = spec.generate(rng, max_tokens)
        if expression is None or expression in seen:
            continue
        answer = spec.answer(expression)
        label = spec.label_class(answer)
        if quota[label] == 0:
            continue
        quota[label] -= 1
        seen.add(expression)
        examples.append(make_example(template, expression, answer))
    else:
        if len(examples) < size:
            raise ValueError(
                f"{argument}={size}: only {len(examples)} new balanced {name} expressions found "
                f"(max_tokens={max_tokens}); lower the sizes or raise max_tokens"
            )
    rng.shuffle(examples)
    return tuple(examples)


# --- scoring ---------------------------------------------------------------------------------


def extract_answer(generated: str) -> str | None:
    """Returns the text inside the first ``<answer>…</answer>`` (stripped; tags matched in any
    case, across lines), or None when there is none."""
    match = _ANSWER_RE.search(generated)
    return None if match is None else match.group(1).strip()


def is_correct(generated: str, example: Example) -> bool:
    """Returns whether the first tagged answer in ``generated`` equals the example's answer.

    Integer answers compare as integers (``07`` and ``+7`` are 7); other answers compare
    case-insensitively (``true`` is True). No tag, or an empty one, is wrong.
    """
    predicted = extract_answer(generated)
    if not predicted:
        return False
    gold = example.answer.strip()
    if _INTEGER_RE.fullmatch(gold):
        return _INTEGER_RE.fullmatch(predicted) is not None and int(predicted) == int(gold)
    return predicted.casefold() == gold.casefold()


def load_task(
    source: str,
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> TaskSplits:
    """Returns the TaskSplits of a local file or folder or a Hugging Face dataset id; the
    formats are ``steer_fast_bench.reproduce.data.load_splits``'s."""
    from .data import load_splits  # data.py imports this module

    return load_splits(
        source,
        train_size=train_size,
        validation_size=validation_size,
        test_size=test_size,
        seed=seed,
    )
