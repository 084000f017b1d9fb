"""The generated tasks of steer-fast reproduce: rules, values, splits, balance and scoring."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from steer_fast_bench.reproduce.tasks import (
    ARITHMETIC_ANSWER_LIMIT,
    LISTOPS_MAX_ARGS,
    LISTOPS_MAX_DEPTH,
    LISTOPS_MIN_ARGS,
    LISTOPS_OPERATORS,
    TASK_NAMES,
    Example,
    arithmetic_value,
    boolean_value,
    extract_answer,
    is_correct,
    listops_value,
    make_task,
)

SIZES = {"train_size": 60, "validation_size": 25, "test_size": 33}
PUBLISHED_LISTOPS_PROMPT = (
    "Evaluate the value of the following nested list expression.\n"
    "Return only the final numeric result inside <answer>\u2026</answer>.\n\nExpression:\n"
)
PREFIXES = {
    "listops": PUBLISHED_LISTOPS_PROMPT,
    "boolean_expressions": (
        "Evaluate the following boolean expression.\nReturn only the final result (True or "
        "False) inside <answer>\u2026</answer>.\n\nExpression:\n"
    ),
    "multistep_arithmetic": (
        "Evaluate the following arithmetic expression.\nReturn only the final integer result "
        "inside <answer>\u2026</answer>.\n\nExpression:\n"
    ),
}


def expression_of(example: Example, task: str) -> str:
    assert example.prompt.startswith(PREFIXES[task]) and example.prompt.endswith("\n")
    return example.prompt[len(PREFIXES[task]) : -1]


def splits_of(task_splits):
    return {
        "train": task_splits.train,
        "validation": task_splits.validation,
        "test": task_splits.test,
    }


def reference_listops(expression: str) -> int:
    """The original generator's to_value, on a tree parsed here: MED is int(np.median)."""
    tokens = iter(expression.split())

    def node(token):
        if token.isdigit():
            return int(token)
        args = []
        for nxt in tokens:
            if nxt == "]":
                break
            args.append(node(nxt))
        ops = {
            "[MIN": min,
            "[MAX": max,
            "[MED": lambda a: int(np.median(a)),
            "[SM": lambda a: int(np.sum(a) % 10),
        }
        return ops[token](args)

    return node(next(tokens))


def listops_shape(expression: str) -> tuple[list[int], int]:
    """Returns (argument count of every operator, depth) of a printed ListOps expression."""
    counts, stack, depth = [], [], 0
    for token in expression.split():
        if token in LISTOPS_OPERATORS:
            if stack:
                stack[-1] += 1
            stack.append(0)
            depth = max(depth, len(stack))
        elif token == "]":
            counts.append(stack.pop())
        else:
            stack[-1] += 1
            depth = max(depth, len(stack) + 1)
    return counts, depth


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generation_is_deterministic_per_seed(task):
    first = make_task(task, **SIZES, seed=3)
    assert make_task(task, **SIZES, seed=3) == first
    assert make_task(task, **SIZES, seed=4).test != first.test
    # The test split is drawn first from its own stream: other sizes do not change it.
    assert make_task(task, train_size=5, validation_size=0, test_size=33, seed=3).test == first.test


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_disjoint_balanced_and_published_format(task):
    splits = splits_of(make_task(task, **SIZES, seed=1))
    seen = set()
    for name, examples in splits.items():
        assert len(examples) == SIZES[f"{name}_size"]
        expressions = {expression_of(e, task) for e in examples}
        assert len(expressions) == len(examples) and not expressions & seen
        seen |= expressions
        for example in examples:
            assert example.completion == f"<answer>{example.answer}</answer>"
        if task == "multistep_arithmetic":
            labels = collections.Counter(e.answer.startswith("-") for e in examples)
            classes = 2
        else:
            labels = collections.Counter(e.answer for e in examples)
            classes = 10 if task == "listops" else 2
            expected = set(map(str, range(10))) if task == "listops" else {"True", "False"}
            assert set(labels) <= expected
        base = len(examples) // classes
        assert sum(labels.values()) == len(examples)
        assert all(count in (base, base + 1) for count in labels.values()), labels
        assert len(labels) == min(classes, len(examples))


def test_listops_prompt_is_the_published_one():
    example = make_task("listops", train_size=1, validation_size=0, test_size=1).test[0]
    expression = expression_of(example, "listops")
    assert example.prompt == PUBLISHED_LISTOPS_PROMPT + expression + "\n"
    assert re.fullmatch(
        r"(\[(MIN|MAX|MED|SM)|\]|[0-9])( (\[(MIN|MAX|MED|SM)|\]|[0-9]))*", expression
    )


@pytest.mark.parametrize(
    "expression, value",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 3 8 1 ]", 1),
        ("[MAX 3 8 1 5 2 ]", 8),
        ("[SM 7 8 9 ]", 4),
        ("[SM 0 0 ]", 0),
        ("[MED 3 9 1 ]", 3),
        ("[MED 4 7 ]", 5),  # even count: the mean of the middle two, rounded down
        ("[MED 1 2 8 9 ]", 5),
        ("[MED 0 1 ]", 0),
        ("[MED 9 9 0 0 ]", 4),
        ("[SM [MAX 9 9 ] [MIN 5 6 ] ]", 4),
        ("[MIN [MAX 1 [SM 5 5 ] ] [MED 6 2 7 ] ]", 1),
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # the original release's bracketing
    ],
)
def test_listops_values(expression, value):
    assert listops_value(expression) == value


@pytest.mark.parametrize(
    "expression, value",
    [
        ("not ( True ) and ( False or True )", False),
        ("True or False and False", True),  # and binds tighter than or
        ("not False and False", False),  # not binds tighter than and
        ("not not True", True),
        ("( True or False ) and False", False),
        ("False or not ( False and True )", True),
    ],
)
def test_boolean_values(expression, value):
    assert boolean_value(expression) is value


@pytest.mark.parametrize(
    "expression, value",
    [
        ("((-1 + 2) * (3 - -4))", 7),
        ("((2 + 3 * 4) - (-6 - 2 * -3))", 14),
        ("((-8 + -2 * 5 - 8) - (-5 - 2 - 9 * -5))", -64),
        ("-2 * -3", 6),
        ("((0 * 7 - 9) * (9 - 9 * 9))", 648),
    ],
)
def test_arithmetic_values(expression, value):
    assert arithmetic_value(expression) == value


@pytest.mark.parametrize(
    "function, expression",
    [
        (listops_value, "[MAX 2 9"),
        (listops_value, "[FOO 1 2 ]"),
        (listops_value, "[MAX ]"),
        (listops_value, "[MAX 1 2 ] 3"),
        (listops_value, "[MAX 12 3 ]"),
        (boolean_value, "True and"),
        (boolean_value, "True nand False"),
        (boolean_value, "( True"),
        (arithmetic_value, "(1 + 2"),
        (arithmetic_value, "1 / 2"),
        (arithmetic_value, "1 2"),
    ],
)
def test_malformed_expressions_raise(function, expression):
    with pytest.raises(ValueError):
        function(expression)


def test_generated_answers_match_independent_evaluation():
    for task, evaluate in [
        ("listops", reference_listops),
        ("boolean_expressions", lambda e: eval(e, {"__builtins__": {}})),  # noqa: S307
        ("multistep_arithmetic", lambda e: eval(e, {"__builtins__": {}})),  # noqa: S307
    ]:
        for example in make_task(task, train_size=300, validation_size=0, test_size=1).train:
            assert example.answer == str(evaluate(expression_of(example, task)))


def test_listops_follows_the_generator_rules():
    examples = make_task("listops", train_size=500, validation_size=0, test_size=1, seed=2).train
    lengths, operators, arg_counts, depths = [], collections.Counter(), set(), []
    for example in examples:
        expression = expression_of(example, "listops")
        tokens = expression.split()
        assert tokens[0] in LISTOPS_OPERATORS and tokens[-1] == "]"
        counts, depth = listops_shape(expression)
        lengths.append(len(tokens))
        operators.update(t for t in tokens if t in LISTOPS_OPERATORS)
        arg_counts.update(counts)
        depths.append(depth)
    assert set(operators) == set(LISTOPS_OPERATORS)
    assert arg_counts == set(range(LISTOPS_MIN_ARGS, LISTOPS_MAX_ARGS + 1))
    assert max(depths) <= LISTOPS_MAX_DEPTH and max(depths) >= 4
    assert max(lengths) <= 64 and max(lengths) > 32  # the default limit binds, listops-64


@pytest.mark.parametrize(
    "task, limit", [("listops", 12), ("boolean_expressions", 7), ("multistep_arithmetic", 9)]
)
def test_max_tokens_limits_the_expression(task, limit):
    splits = make_task(task, train_size=80, validation_size=10, test_size=10, max_tokens=limit)
    lengths = [len(expression_of(e, task).split()) for e in splits.train]
    assert max(lengths) == limit


def test_arithmetic_and_boolean_shapes():
    arithmetic = make_task("multistep_arithmetic", train_size=300, validation_size=0, test_size=1)
    for example in arithmetic.train:
        assert abs(int(example.answer)) <= ARITHMETIC_ANSWER_LIMIT
        assert re.fullmatch(
            r"\(\(-?\d( [-+*] -?\d){1,3}\) [-+*] \(-?\d( [-+*] -?\d){1,3}\)\)",
            expression_of(example, "multistep_arithmetic"),
        )
    boolean = make_task("boolean_expressions", train_size=300, validation_size=0, test_size=1)
    constants = collections.Counter(
        len(re.findall(r"True|False", expression_of(e, "boolean_expressions")))
        for e in boolean.train
    )
    assert set(constants) == {2, 3, 4}


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"name": "gsm8k"}, "name"),
        ({"train_size": 0}, "train_size"),
        ({"test_size": 0}, "test_size"),
        ({"validation_size": -1}, "validation_size"),
        ({"train_size": 1.5}, "train_size"),
        ({"train_size": True}, "train_size"),
        ({"test_size": "10"}, "test_size"),
        ({"seed": "0"}, "seed"),
        ({"max_tokens": 3}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4, "train_size": 500}, "train_size"),  # only 400 such expressions
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, argument):
    arguments = {"name": "listops", **SIZES, **kwargs}
    with pytest.raises(ValueError, match=argument):
        make_task(arguments.pop("name"), **arguments)


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("<answer>7</answer>", "7"),
        ("  <answer> 7 </answer>  ", "7"),
        ("The result is <answer>3</answer> because", "3"),
        ("<answer>1</answer><answer>2</answer>", "1"),
        ("<ANSWER>4</Answer>", "4"),
        ("<answer>\n5\n</answer>", "5"),
        ("<answer></answer>", ""),
        ("7", None),
        ("<answer>7", None),
        ("answer>7</answer>", None),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


@pytest.mark.parametrize(
    "answer, generated, correct",
    [
        ("7", "<answer>7</answer>", True),
        ("7", "<answer>8</answer>", False),
        ("7", " <answer> 7 </answer>\n", True),
        ("7", "<answer>07</answer>", True),
        ("7", "<answer>7.0</answer>", False),
        ("7", "<answer>seven</answer>", False),
        ("7", "<answer></answer>", False),
        ("7", "7", False),
        ("7", "<answer>7</answer><answer>8</answer>", True),
        ("7", "<answer>8</answer><answer>7</answer>", False),
        ("7", "Sure! <answer>7</answer> is the value.", True),
        ("-42", "<answer>-42</answer>", True),
        ("-42", "<answer>42</answer>", False),
        ("-42", "<answer>- 42</answer>", False),
        ("True", "<answer>True</answer>", True),
        ("True", "<answer>true</answer>", True),
        ("True", "<answer>False</answer>", False),
        ("True", "<answer>True.</answer>", False),
        ("False", "True", False),
    ],
)
def test_is_correct(answer, generated, correct):
    example = Example(prompt="p", completion=f"<answer>{answer}</answer>", answer=answer)
    assert is_correct(generated, example) is correct
