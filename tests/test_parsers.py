"""Answer parsers: hand-written (model output -> expected answer) tables, real gold answers, the registry."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.eval.parsers import (
    PARSERS,
    exact_match,
    get_parser,
    labels_match,
    letters_match,
    make_parser,
    numbers_match,
    parse_exact,
    parse_label,
    parse_letter,
    parse_number,
)

from conftest import SHARED_DATA

DATA = SHARED_DATA  # the one place that knows where ../shared/data is

# ------------------------------------------------------------------------------------------------ number

NUMBER_CASES = [
    # LLM-Adapters style outputs
    ("The answer is 18.", 18.0),
    ("The answer is 18", 18.0),
    ("18", 18.0),
    ("There are 3 apples and 5 pears, so 3 + 5 = 8 fruits.\nThe answer is 8.", 8.0),
    ("The answer is 0", 0.0),
    ("576.0", 576.0),
    ("The answer is 18.\n\n", 18.0),
    # commas and currency
    ("The total is 1,234.5 dollars.", 1234.5),
    ("He paid $5.", 5.0),
    ("$1,000,000 in total", 1_000_000.0),
    ("That is 1,00,000 rupees", 100_000.0),
    ("Totals: 1, 2, 3", 3.0),
    ("It grew by 50%", 50.0),
    # negatives and decimals
    ("The temperature is -7 degrees.", -7.0),
    ("x = -3.25", -3.25),
    ("The change is (-5)", -5.0),
    ("\u221212", -12.0),  # Unicode minus
    ("-0.5", -0.5),
    ("It costs .5 dollars", 0.5),
    ("The difference is 3.5 - 1.5 = 2.0", 2.0),
    ("10 - 4 = 6", 6.0),
    ("8-3", 3.0),  # binary minus, not -3 (LLM-Adapters: -3)
    # fractions and dates
    ("3/4", 0.75),
    ("She ate 1/3 of the pie.", 1 / 3),
    ("-3/4", -0.75),
    ("Born on 3/4/2020", 2020.0),
    ("He had 7/0 apples", None),
    # numbers inside words: not numbers; units after a number are fine
    ("The answer is 18. See step2", 18.0),
    ("CO2 levels rose", None),
    ("the correct answer is answer3", None),
    ("The mp3 player costs 20", 20.0),
    ("It weighs 18kg", 18.0),
    ("the 5th", 5.0),
    # no number
    ("I don't know", None),
    ("", None),
    ("Because the sum is large.", None),
    # the last-number rule reads a trailing question number, as in LLM-Adapters
    ("The answer is 18.\nQuestion 2: how many", 2.0),
]


@pytest.mark.parametrize(("text", "expected"), NUMBER_CASES)
def test_parse_number(text: str, expected: float | None) -> None:
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (18.0, "18.0", True),
        (18.0005, "18.0", True),
        (18.002, "18.0", False),
        (None, "18.0", False),
        (1.833, "1.8333333333333335", True),
        (-15.0, "-15.0", True),
        (15.0, "-15.0", False),
        (1 / 3, "0.3333333333333333", True),
        (576, 576.0, True),
        (1000.0, "1,000", True),
        (math.nan, "1.0", False),
        (math.inf, "1.0", False),
    ],
)
def test_numbers_match(pred: float | None, gold: str | float, expected: bool) -> None:
    assert numbers_match(pred, gold) is expected


def test_numbers_match_tolerance_and_bad_gold() -> None:
    assert numbers_match(18.4, "18", tol=0.5)
    assert not numbers_match(18.4, "18", tol=0.1)
    with pytest.raises(ValueError, match="not a number"):
        numbers_match(1.0, "C")


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False).map(lambda v: round(v, 4)))
def test_parse_number_reads_back_a_formatted_answer(value: float) -> None:
    assert numbers_match(parse_number(f"Step 1: think.\nThe answer is {value:,}."), value, tol=1e-6)


# ------------------------------------------------------------------------------------------------ letter

LETTER_CASES = [
    # the AQuA trap: LLM-Adapters takes the first capital A-E anywhere
    ("A train leaves at 3 pm and travels at 60 km/h. The answer is (D).", "D"),
    ("A train leaves at 3 pm and travels at 60 km/h.", None),
    ("Each BOX holds 5 CDs, so the answer is E", "E"),
    ("Each BOX holds 5 CDs.", None),
    # explicit statements
    ("The answer is C", "C"),
    ("the answer is (C).", "C"),
    ("Answer: C", "C"),
    ("answer is c", "C"),
    ("The correct answer is option D.", "D"),
    ("**Answer:** E", "E"),
    ("**Answer**: E", "E"),
    ("Answer: (B) 61 m", "B"),
    ("The answer is: C) 1000", "C"),
    ("The answer is A because 23.65 is the difference", "A"),
    ("Answer Choices: (A) 23.65 (B) 1000\nThe answer is A.", "A"),
    ("B is correct.", "B"),
    # restatements: the last explicit statement wins
    ("The answer is B. Wait, let me recheck. The answer is D.", "D"),
    ("C\nSo the answer is C.", "C"),
    ("(A) looks tempting, but the answer is (E).", "E"),
    # standalone letters
    ("(C)", "C"),
    ("C) 1000", "C"),
    ("C.", "C"),
    ("C. 1000 m", "C"),
    ("C", "C"),
    ("  C  \n", "C"),
    ("Option C", "C"),
    ("**C**", "C"),
    ("\\boxed{B}", "B"),
    ("The answer is 1000, which is option C.", "C"),
    # no answer
    ("I don't know", None),
    ("Because the sum is large", None),
    ("", None),
    ("the answer is a bit larger than 5", None),
    ("Answer: A train covers 60 km", None),
    ("(A) 60 m (B) 61 m (C) 62 m (D) 63 m (E) 64 m", None),
    ("The answer is B or C", None),
    ("the answer is either b or c", None),
    ("The answer is not C", None),
    ("answer is c because", None),  # a lowercase letter followed by a word reads as prose
    ("The answer is F", None),  # not one of the letters
]


@pytest.mark.parametrize(("text", "expected"), LETTER_CASES)
def test_parse_letter(text: str, expected: str | None) -> None:
    assert parse_letter(text) == expected


def test_parse_letter_custom_letters() -> None:
    assert parse_letter("The answer is F", letters="ABCDEF") == "F"
    assert parse_letter("The answer is E", letters="ABCD") is None
    with pytest.raises(ValueError, match="uppercase"):
        parse_letter("C", letters="abc")


@pytest.mark.parametrize(
    "text",
    [
        "answer" + " " * 20_000 + "x",
        "\n" * 20_000 + "x",
        "*" * 20_000,
        "(A)" * 5_000,
        "1" * 20_000 + "/",
        "option" + "\t" * 20_000,
    ],
)
def test_parsers_are_linear_on_adversarial_text(text: str) -> None:
    # a super-linear regex would take minutes here; a linear one takes milliseconds
    parse_letter(text)
    parse_number(text)
    parse_label(text, ["true", "false"])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ABCDEabcde ()*.:\nanswerisoptionthe", max_size=60))
def test_parse_letter_returns_a_letter_or_none(text: str) -> None:
    assert parse_letter(text) in {None, "A", "B", "C", "D", "E"}


# ------------------------------------------------------------------------------------------------- label

BOOL = ["true", "false"]
ANSWERS = [f"answer{i}" for i in range(1, 6)]
OPTIONS = ["option1", "option2"]
SOLUTIONS = ["solution1", "solution2"]
ENDINGS = [f"ending{i}" for i in range(1, 5)]

LABEL_CASES = [
    # BoolQ
    ("true", BOOL, "true"),
    ("True", BOOL, "true"),
    ("FALSE", BOOL, "false"),
    ("The answer is false.", BOOL, "false"),
    ("the correct answer is true", BOOL, "true"),
    ("false, because the passage says so", BOOL, "false"),
    ("untrue", BOOL, None),
    ("That is a falsehood", BOOL, None),
    ("It is not true that it is false", BOOL, "true"),  # first label, as in LLM-Adapters
    ("true/false", BOOL, "true"),
    ("I am not sure", BOOL, None),
    ("", BOOL, None),
    # SIQA, ARC, OBQA
    ("the correct answer is answer3", ANSWERS, "answer3"),
    ("Answer2", ANSWERS, "answer2"),
    ("answer1.", ANSWERS, "answer1"),
    ("(answer4)", ANSWERS, "answer4"),
    ("The answer is answer5", ANSWERS, "answer5"),
    ("answer3 and then answer2", ANSWERS, "answer3"),
    ("answer10", ANSWERS, None),
    ("answer12", ANSWERS, None),
    ("answer6", ANSWERS, None),
    ("myanswer1", ANSWERS, None),
    ("answer_1", ANSWERS, None),
    ("answer 3", ANSWERS, None),  # the label word is 'answer3', as LLM-Adapters trains it
    ("The answer is 3", ANSWERS, None),
    # WinoGrande
    ("the correct answer is option2", OPTIONS, "option2"),
    ("Option1", OPTIONS, "option1"),
    ("option12", OPTIONS, None),
    # PIQA
    ("the correct answer is solution1", SOLUTIONS, "solution1"),
    ("Solution2", SOLUTIONS, "solution2"),
    ("solution2a", SOLUTIONS, None),
    # HellaSwag
    ("the correct answer is ending3", ENDINGS, "ending3"),
    ("ending4\n", ENDINGS, "ending4"),
    ("ending5", ENDINGS, None),
]


@pytest.mark.parametrize(("text", "labels", "expected"), LABEL_CASES)
def test_parse_label(text: str, labels: list[str], expected: str | None) -> None:
    assert parse_label(text, labels) == expected


def test_parse_label_returns_the_spelling_in_labels() -> None:
    assert parse_label("true", ["True", "False"]) == "True"
    with pytest.raises(ValueError, match="distinct"):
        parse_label("true", ["true", "TRUE"])
    assert labels_match("True", " true ") and not labels_match(None, "true")


# ------------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "Paris"),
        ("  Paris  ", "Paris"),
        ("\n\n  Paris  \nThe capital of France.", "Paris"),
        ("1236\n### Instruction", "1236"),
        ("", ""),
        ("   \n \t\n", ""),
    ],
)
def test_parse_exact(text: str, expected: str) -> None:
    assert parse_exact(text) == expected


def test_exact_match_is_case_sensitive() -> None:
    assert exact_match("Paris", " Paris\n")
    assert not exact_match("paris", "Paris")
    assert not exact_match(None, "Paris")


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_parser() -> None:
    assert set(PARSERS) == {"number", "letter", "label", "exact", "equation", "option"}
    with pytest.raises(ValueError, match="exact, label, letter, number"):
        get_parser("regex")
    with pytest.raises(ValueError, match="unknown parser"):
        make_parser({"name": "numbers"})


@pytest.mark.parametrize(
    ("decl", "output", "gold", "expected"),
    [
        ("number", "The answer is 576.", "576.0", True),
        ({"name": "number", "tol": 0.5}, "about 575.6", "576.0", True),
        ("letter", "A train ... The answer is (D).", "D", True),
        ("letter", "A train leaves at 3 pm.", "A", False),
        ({"name": "letter", "letters": ["A", "B", "C", "D", "E", "F"]}, "Answer: F", "F", True),
        (
            {"name": "label", "labels": [True, False]},
            "True",
            "true",
            True,
        ),  # YAML reads [true, false] as booleans
        ({"name": "label", "labels": ANSWERS}, "the correct answer is answer3", "answer3", True),
        ("exact", "1236\nmore text", "1236", True),
    ],
)
def test_make_parser_is_correct(decl: object, output: str, gold: str, expected: bool) -> None:
    assert make_parser(decl).is_correct(output, gold) is expected  # type: ignore[arg-type]


def test_make_parser_option_errors() -> None:
    with pytest.raises(ValueError, match="needs option 'labels'"):
        make_parser("label")
    with pytest.raises(ValueError, match="no option 'label'.*labels"):
        make_parser({"name": "label", "label": ["true"]})
    with pytest.raises(ValueError, match="needs a 'name'"):
        make_parser({"labels": ["true"]})
    assert PARSERS["number"].parse("x = 3") == 3.0
    assert PARSERS["label"].score("true", "true", labels=["true", "false"])
    # options passed as read from YAML, without make_parser
    assert PARSERS["label"].parse("True.", labels=[True, False]) == "true"


# ----------------------------------------------------------------------------- real gold answers (if present)


def _records(name: str) -> list[dict]:
    path = DATA / name / "test.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return json.loads(path.read_text())


def _as_model_would_write(gold: str) -> str:
    value = float(gold)
    return f"{int(value):,}" if value.is_integer() else f"{value:.4f}"


@pytest.mark.parametrize("name", ["gsm8k", "SVAMP", "mawps", "AddSub", "MultiArith", "SingleEq"])
def test_real_math_golds(name: str) -> None:
    records = _records(name)
    for r in records:  # every gold parses and matches itself
        assert numbers_match(float(r["answer"]), r["answer"])
    for r in records[:50]:
        output = f"Let me think step by step.\nThe answer is {_as_model_would_write(r['answer'])}."
        assert numbers_match(parse_number(output), r["answer"]), (output, r["answer"])


@pytest.mark.parametrize("name", ["AQuA", "mathqa"])
def test_real_letter_golds(name: str) -> None:
    records = _records(name)
    assert {r["answer"] for r in records} <= set("ABCDE")
    for r in records[:50]:
        assert parse_letter(f"A train leaves at 3 pm. The answer is {r['answer']}.") == r["answer"]
        assert (
            parse_letter(f"A train leaves at 3 pm. So the answer is ({r['answer'].lower()}).") == r["answer"]
        )


@pytest.mark.parametrize("name", ["boolq", "piqa", "social_i_qa", "winogrande", "openbookqa", "ARC-Easy"])
def test_real_label_golds(name: str) -> None:
    for r in _records(name)[:100]:
        fmt = re.search(r"Answer format: (\S+)", r["instruction"])
        assert fmt is not None, r["instruction"][-200:]
        labels = fmt.group(1).split("/")
        assert r["answer"] in labels
        assert parse_label(f"the correct answer is {r['answer']}", labels) == r["answer"]
        assert parse_label(f"The correct answer is {r['answer'].capitalize()}.", labels) == r["answer"]


def test_letters_match() -> None:
    assert letters_match("C", " c ") and not letters_match(None, "C") and not letters_match("B", "C")
