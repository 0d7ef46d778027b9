"""Answer parsers: turn a model's generated text into an answer, and score that answer against the gold one.

The rules follow the evaluation of LLM-Adapters (Hu et al., EMNLP 2023, https://arxiv.org/abs/2304.01933,
``evaluate.py`` and ``commonsense_evaluate.py``), with its known traps fixed. Each function documents its rule
and where it departs from LLM-Adapters:

- ``number`` (GSM8K, SVAMP, AddSub, MultiArith, SingleEq, MAWPS): the last number in the output;
  correct when ``|pred - gold| <= 1e-3``.
- ``letter`` (AQuA, MathQA): the option letter the output states as its answer (not the first capital letter).
- ``label`` (BoolQ, PIQA, SIQA, ARC, OBQA, WinoGrande, HellaSwag): the first label word, matched as a whole word.
- ``exact`` (synthetic tasks): the first non-empty line, compared exactly.

Tasks declared as data name their parser: ``parser: number`` or ``parser: {name: label, labels: [true, false]}``;
:func:`make_parser` turns either form into a :class:`Parser` with its options bound.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.contamination import normalise

# --------------------------------------------------------------------------------------------------- numbers

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUMBER = re.compile(
    r"""
    (?P<sign>(?<![\w.)\]])[-\u2212])?                   # a sign, not a binary minus as in '8-3'
    (?:
        (?<![\w./])(?P<num>\d+)/(?P<den>\d+)(?![\w/]|\.\d)  # a fraction '3/4' (not a date '3/4/2020')
      | (?<![\w.])(?P<dec>\d+(?:\.\d+)?|\.\d+)          # an integer or decimal; '5.' ends a sentence
    )
    """,
    re.VERBOSE,
)


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (LLM-Adapters' math rule), or None when there is none.

    Rule: delete commas between digits (``1,234.5`` -> 1234.5, also Indian ``1,00,000``), then take the last
    match of a signed integer or decimal. LLM-Adapters uses ``re.findall(r'-?\\d+\\.?\\d*', s.replace(',', ''))[-1]``;
    this rule agrees on ordinary answers ("The answer is 18.", "$5", "-3.5", "5." -> 5) and differs where that
    regex reads text that is not a number:

    - digits glued to a word are not numbers: ``x2``, ``CO2``, ``step3``, ``answer3`` (LLM-Adapters: 2, 2, 3, 3);
      digits followed by a unit still are (``18kg``, ``5th``, ``3pm``);
    - a minus sign right after a digit, letter or bracket is an operator: ``8-3`` ends in 3 (LLM-Adapters: -3);
    - ``.5`` is 0.5 (LLM-Adapters: 5); the Unicode minus ``−5`` is -5;
    - a fraction of two integers is its value: ``3/4`` -> 0.75 (LLM-Adapters: 4), so "1/3" matches the MAWPS
      gold 0.3333333333333333; ``x/0`` is skipped. Dates such as ``3/4/2020`` are not fractions (-> 2020).
      Mixed numbers are not read as one: ``1 1/2`` -> 0.5.
    """
    last: float | None = None
    for m in _NUMBER.finditer(_DIGIT_COMMA.sub("", text)):
        value = _number_value(m)
        if value is not None:
            last = value
    return last


def _number_value(m: re.Match[str]) -> float | None:
    if m["dec"] is not None:
        value = float(m["dec"])
    elif int(m["den"]) == 0:
        return None
    else:
        value = int(m["num"]) / int(m["den"])
    return -value if m["sign"] else value


def numbers_match(pred: float | None, gold: str | float, tol: float = 1e-3) -> bool:
    """``|pred - gold| <= tol`` (LLM-Adapters' rule, its ``miss = 0.001``); None, nan and inf never match.

    ``gold`` may be a string as stored in the data sets ("576.0", "1.8333333333333335", "-15.0"); a gold value that
    is not a number raises ValueError, since that is a data error rather than a wrong answer.
    """
    if pred is None or not math.isfinite(pred):
        return False
    return abs(pred - _gold_float(gold)) <= tol


def _gold_float(gold: str | float) -> float:
    if isinstance(gold, str):
        try:
            return float(_DIGIT_COMMA.sub("", gold.strip()))
        except ValueError:
            raise ValueError(
                f"gold answer {gold!r} is not a number; the 'number' parser needs numeric gold "
                f"answers such as '576.0'"
            ) from None
    return float(gold)


# --------------------------------------------------------------------------------------------------- equations

_ARITH_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EQUATION_SIDE = re.compile(r"^\s*[A-Za-z]+\s*=\s*(?P<rhs>[^=\n]+?)\s*$")


def _arith(node: ast.AST) -> float:
    """Value of an arithmetic expression tree: numbers, + - * /, unary minus, parentheses; nothing else."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _arith(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
        return _ARITH_OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError("not plain arithmetic")


def eval_arithmetic(text: str) -> float | None:
    """The value of ``text`` as plain arithmetic (``(22.0-14.0)/4.0`` -> 2.0), or None when it is not one.

    Parsed with :mod:`ast` and evaluated node by node over numbers and ``+ - * /`` only: no names, calls or
    powers are evaluated, so model output is never executed. Division by zero and overflow give None.
    """
    if len(text) > 500:
        return None
    try:
        value = _arith(ast.parse(text.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def parse_equation(text: str) -> float | None:
    """The value of the equation a model wrote (``x=((22.0-14.0)/4.0)`` -> 2.0), else the last number.

    Rule: the first non-empty line of the form ``<name> = <expression>`` is evaluated as plain arithmetic
    (:func:`eval_arithmetic`); when there is none, or it does not evaluate, the answer is the last number in the
    output (:func:`parse_number`), so a model that writes the result instead of the equation is still read. The
    target format of the ``mawps`` training format (``tunelab.data.formats``).
    """
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _EQUATION_SIDE.match(line)
        value = eval_arithmetic(m["rhs"]) if m else None
        if value is not None:
            return value
        break
    return parse_number(text)


# --------------------------------------------------------------------------------------------------- options


def parse_option(text: str, choices: Sequence[str] = ()) -> str | None:
    """The option (one of ``choices``) that the first line of ``text`` names, or None.

    Rule, on normalised text (:func:`normalise_text`): the option equal to the first non-empty line; else the one
    option that line starts with (the longest, when several do: "a bacterial population in the bloodstream,
    because ..."); else the one option that starts with the line, if the line has at least 3 characters (a model
    that stopped early). Anything else — no option, or an ambiguous one — is no answer. The answer of the mc-text
    format (``tunelab.data.formats``), whose records carry their options.
    """
    line = next((s for s in text.splitlines() if s.strip()), "")
    said = normalise(line)
    if not said or not choices:
        return None
    norm = {normalise(c): c for c in choices}
    if said in norm:
        return norm[said]
    starts = [n for n in norm if n and (said == n or said.startswith(n + " "))]
    if starts:
        return norm[max(starts, key=len)]
    prefix_of = [n for n in norm if n.startswith(said)]
    return norm[prefix_of[0]] if len(said) >= 3 and len(prefix_of) == 1 else None


def options_match(answer: str | None, gold: str) -> bool:
    return answer is not None and normalise(answer) == normalise(gold)


# --------------------------------------------------------------------------------------------------- letters

_ARTICLE_LIKE = "AI"  # option letters that are also English words: 'A train ...', 'I think ...'


@functools.lru_cache(maxsize=32)
def _letter_patterns(letters: str) -> tuple[tuple[re.Pattern[str], ...], tuple[re.Pattern[str], ...]]:
    """(explicit, standalone) patterns for ``letters``; each captures ``letter``.

    Adjacent repeated parts use disjoint character sets, so no input makes the matching super-linear.
    """
    up, anycase = f"[{letters}]", f"[{letters}{letters.lower()}]"
    cue = (
        r"\b(?i:answer)\b(?:\*\*)?(?:[\s:=\-]|\b(?i:is|was|would|should|will|must|be|then|therefore|thus)\b)*"
    )
    choice_word = r"(?:(?i:option|choice)[ \t]*(?:[:#][ \t]*)?)?"
    opening = r"(?:(?:\\boxed\{|[(\[*])[ \t]*)*"  # '(', '[', '**', '\boxed{', each maybe followed by spaces
    explicit = (
        # 'the answer is (C)', 'Answer: c', 'answer is option C', '**Answer:** C'
        re.compile(rf"{cue}{choice_word}{opening}(?P<letter>{anycase})(?!\w)"),
        # 'C is correct', '(C) is the right answer'
        re.compile(rf"(?<!\w)(?P<letter>{up})[)\]*]*[ \t]+is[ \t]+(?:the[ \t]+)?(?i:correct|right)\b"),
    )
    standalone = (
        # a line that is just 'C', '(C)', 'C.', '**C**'
        re.compile(rf"(?m)^[ \t>#*(\[]*(?P<letter>{up})[ \t)\].:*]*$"),
        # 'C) 1000', '(C) 1000', 'C. 1000' at the start of a line
        re.compile(rf"(?m)^[ \t]*[(\[]?(?P<letter>{up})[)\].:][ \t]"),
        # '(C)' or '[C]', '**C**', 'Option C', '\boxed{C}' anywhere
        re.compile(rf"[(\[][ \t]*(?P<letter>{up})[ \t]*[)\]]"),
        re.compile(rf"\*\*[ \t]*\(?(?P<letter>{up})\)?[ \t]*\*\*"),
        re.compile(rf"\b(?i:option|choice)[ \t]*(?:[:#][ \t]*)?[(\[]?(?P<letter>{anycase})(?!\w)"),
        re.compile(rf"\\boxed\{{(?P<letter>{up})\}}"),
    )
    return explicit, standalone


_FOLLOWED_BY_WORD = re.compile(r"[ \t]+[A-Za-z]")
_FOLLOWED_BY_LOWER_WORD = re.compile(r"[ \t]+[a-z]")


@functools.lru_cache(maxsize=32)
def _letter_list_pattern(letters: str) -> re.Pattern[str]:
    return re.compile(rf"[ \t]*(?:,|/|\bor\b|\band\b)[ \t]*[(\[]?[{letters}]\b")


def _is_prose(text: str, m: re.Match[str], letters: str) -> bool:
    """Whether the matched letter is a word of a sentence rather than an answer.

    A lowercase letter followed by a word is prose ('the answer is a bit', 'answer is c because' too: only
    "answer is c" with punctuation or the end after it counts); so is an uppercase 'A'/'I' that starts a sentence
    and is followed by a lowercase word ('Answer: A train leaves'); so is a letter in a list of letters ('B or C').
    """
    letter, end = m["letter"], m.end("letter")
    if _letter_list_pattern(letters).match(text, end):
        return True
    if not _FOLLOWED_BY_WORD.match(text, end):
        return False
    if letter.islower():
        return True
    return (
        letter in _ARTICLE_LIKE
        and _starts_sentence(text, m.start("letter"))
        and _FOLLOWED_BY_LOWER_WORD.match(text, end) is not None
    )


def _starts_sentence(text: str, pos: int) -> bool:
    """Whether only spaces and brackets stand between ``pos`` and the start of the text, a line or a sentence."""
    while pos > 0 and text[pos - 1] in " \t(*[":
        pos -= 1
    return pos == 0 or text[pos - 1] in ":.!?\n"


def _candidates(text: str, patterns: Sequence[re.Pattern[str]], letters: str) -> list[tuple[int, str]]:
    found = [
        (m.start("letter"), m["letter"].upper())
        for p in patterns
        for m in p.finditer(text)
        if not _is_prose(text, m, letters)
    ]
    return sorted(found)


def parse_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter that ``text`` gives as its answer, or None.

    Rule, in order:

    1. explicit statements — "the answer is C", "The correct answer is (C).", "Answer: C", "answer is option C",
       "answer is c." (any case after the cue), "**Answer:** C", "C is correct": the LAST one wins, since models
       restate and correct themselves ("the answer is B. Wait, ... the answer is D" -> D);
    2. otherwise standalone letters — a line that is just "C", "(C)", "**C**" or "C."; a line starting "C) 1000",
       "(C) 1000", "C. 1000"; "(C)", "[C]", "**C**", "\\boxed{C}" or "Option C" anywhere. If they all name
       the same letter, that letter; if they disagree (an echoed "(A) 60 (B) 61 ..." list) the answer is None
       rather than the first or last of the list.

    A letter used as a word is never an answer: "A train leaves ...", "the answer is a bit larger", "B or C"
    (see :func:`_is_prose`); "the answer is not C" states no answer. LLM-Adapters instead takes
    ``re.findall(r'A|B|C|D|E', text)[0]``, the first capital A–E anywhere, so it reads "A train leaves at 3 pm
    ... The answer is (D)." as A and any output starting with "A " as A.
    """
    explicit, standalone = _letter_patterns(_check_letters(letters))
    stated = _candidates(text, explicit, letters)
    if stated:
        return stated[-1][1]
    named = {letter for _, letter in _candidates(text, standalone, letters)}
    return named.pop() if len(named) == 1 else None


def _check_letters(letters: str) -> str:
    if not letters or not letters.isalpha() or not letters.isupper() or len(set(letters)) != len(letters):
        raise ValueError(f"letters must be distinct uppercase letters such as 'ABCDE', got {letters!r}")
    return letters


# ---------------------------------------------------------------------------------------------------- labels


@functools.lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` that occurs in ``text`` as a whole word, case-insensitively, spelled as in ``labels``.

    Rule: LLM-Adapters' ``re.findall('answer1|answer2|...', text)[0]`` (the first occurrence wins, so
    "the correct answer is answer3" -> answer3), with two fixes: a label must stand as a whole word, so
    "answer12", "answer10", "untrue" and "solution1a" are not labels (LLM-Adapters: answer1, answer1, true,
    solution1); and case is ignored, so "True" and "Answer2" count (LLM-Adapters is case-sensitive and reads
    "True" as no answer). An output that echoes the format line "true/false" yields its first label, as in
    LLM-Adapters. None when no label occurs.
    """
    by_lower = {label.lower(): label for label in labels}
    if len(by_lower) != len(labels) or not all(labels):
        raise ValueError(f"labels must be non-empty and distinct ignoring case, got {list(labels)!r}")
    m = _label_pattern(tuple(labels)).search(text)
    return None if m is None else by_lower[m.group(0).lower()]


def labels_match(pred: str | None, gold: str) -> bool:
    """``pred`` equals ``gold`` ignoring case and surrounding whitespace; None never matches."""
    return pred is not None and pred.strip().lower() == gold.strip().lower()


# ----------------------------------------------------------------------------------------------------- exact


def parse_exact(text: str) -> str:
    """The first non-empty line of ``text``, stripped; "" when there is none (synthetic exact-match tasks)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(pred: str | None, gold: str) -> bool:
    """``pred.strip() == gold.strip()``: case-sensitive ("Paris" != "paris"), whitespace at the ends ignored."""
    return pred is not None and pred.strip() == gold.strip()


def letters_match(pred: str | None, gold: str) -> bool:
    """``pred`` is the gold option letter (gold compared stripped and upper-cased); None never matches."""
    return pred is not None and pred == gold.strip().upper()


# -------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ParserSpec:
    """A named parser: ``parse(text, **options) -> answer | None`` and ``score(answer, gold, **options) -> bool``.

    ``parse_options`` and ``score_options`` name the keyword options each side accepts (``required`` ones must be
    given); an option meant for one side is accepted, and ignored, by the other, so a task passes one dict to both.
    Option values are normalised for YAML (see :func:`make_parser`), so raw task options can be passed as read.
    """

    name: str
    parse_fn: Callable[..., Any]
    score_fn: Callable[..., bool]
    parse_options: tuple[str, ...] = ()
    score_options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    description: str = ""

    def parse(self, text: str, **options: Any) -> Any:
        """The answer in ``text``, or None (``parse_exact`` returns "" instead)."""
        return self.parse_fn(text, **self._pick(options, self.parse_options))

    def score(self, answer: Any, gold: Any, **options: Any) -> bool:
        """Whether ``answer`` (from :meth:`parse`) is the gold answer."""
        return self.score_fn(answer, gold, **self._pick(options, self.score_options))

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError for an unknown or missing option, naming what this parser accepts."""
        known = set(self.parse_options) | set(self.score_options)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"parser {self.name!r} has no option {unknown[0]!r}; "
                f"its options are {sorted(known) or 'none'}"
            )
        missing = [k for k in self.required if k not in options]
        if missing:
            raise ValueError(
                f"parser {self.name!r} needs option {missing[0]!r}, e.g. "
                f"{{name: {self.name}, {missing[0]}: ...}}"
            )

    def _pick(self, options: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        self.check_options(options)
        return {k: _normalise_option(k, v) for k, v in options.items() if k in names}


PARSERS: dict[str, ParserSpec] = {
    "number": ParserSpec(
        "number",
        parse_number,
        numbers_match,
        score_options=("tol",),
        description="last number in the output; |pred - gold| <= tol (1e-3)",
    ),
    "letter": ParserSpec(
        "letter",
        parse_letter,
        letters_match,
        parse_options=("letters",),
        description="the option letter stated as the answer (A-E by default)",
    ),
    "label": ParserSpec(
        "label",
        parse_label,
        labels_match,
        parse_options=("labels",),
        required=("labels",),
        description="first whole-word label, case-insensitive (true/false, answer1..5, ...)",
    ),
    "equation": ParserSpec(
        "equation",
        parse_equation,
        numbers_match,
        score_options=("tol",),
        description="value of the first 'x = <arithmetic>' line, else the last number; |pred - gold| <= tol",
    ),
    "option": ParserSpec(
        "option",
        parse_option,
        options_match,
        parse_options=("choices",),
        description="the option text (of the record's options) that the first line names; mc-text records",
    ),
    "exact": ParserSpec(
        "exact",
        parse_exact,
        exact_match,
        description="first non-empty line equals the gold answer (case-sensitive)",
    ),
}


def get_parser(name: str) -> ParserSpec:
    """The registered parser ``name``; ValueError listing the names otherwise."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown parser {name!r}; choose one of {', '.join(sorted(PARSERS))}") from None


@dataclass(frozen=True)
class Parser:
    """A parser with its options bound, as a task declares it."""

    spec: ParserSpec
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def parse(self, text: str) -> Any:
        return self.spec.parse(text, **self.options)

    def score(self, answer: Any, gold: Any) -> bool:
        return self.spec.score(answer, gold, **self.options)

    def is_correct(self, text: str, gold: Any) -> bool:
        """Parse ``text`` and score it against ``gold``."""
        return self.score(self.parse(text), gold)


def make_parser(spec: str | Mapping[str, Any]) -> Parser:
    """A :class:`Parser` from a task's declaration: ``"number"`` or ``{"name": "label", "labels": [...]}``.

    Option values are normalised for YAML: ``labels: [true, false]`` arrives as booleans and becomes
    ``["true", "false"]``; ``letters`` may be a string or a list of letters.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if "name" not in spec:
        raise ValueError(
            f"a parser declaration needs a 'name' (one of {', '.join(sorted(PARSERS))}), got {spec!r}"
        )
    options = {k: _normalise_option(k, v) for k, v in spec.items() if k != "name"}
    parser = get_parser(str(spec["name"]))
    parser.check_options(options)
    return Parser(parser, options)


def _normalise_option(key: str, value: Any) -> Any:
    def word(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    if key == "labels":
        return tuple(word(v) for v in value)
    if key == "letters":
        return "".join(value).upper()
    if key == "tol":
        return float(value)
    return value
