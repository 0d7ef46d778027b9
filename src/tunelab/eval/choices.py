"""Multiple-choice items from LLM-Adapters commonsense prompts, for log-likelihood scoring.

An LLM-Adapters record asks the model to *write* a label word ("answer3"). Log-likelihood scoring
(lm-evaluation-harness style) instead asks which option text the model finds most probable after a neutral
context, so it measures knowledge independent of whether the model learned the output format. This module
turns a record's instruction and gold label word into an :class:`MCItem`: the (context, continuation) pair
scored for each option, the index of the gold option, and the dataset's label words to report results in.

Styles (``DATASET_STYLES`` maps the LLM-Adapters folder names to them):

* ``"labeled"`` — ``<stem>\\n\\nAnswer1: <a> Answer2: <b> ...\\n\\nAnswer format: answer1/answer2/...``
  (ARC, OpenBookQA, SocialIQA; PIQA's ``Solution1:``; any label prefix named on the ``Answer format:`` line).
  Context ``"Question: <stem>\\nAnswer:"``, options ``" <option text>"``, as lm-eval's ARC / PIQA tasks.
* ``"boolq"`` — context ``"Question: <q>?\\nAnswer:"``, options ``" yes"`` / ``" no"`` for the labels
  ``true`` / ``false``. lm-eval's BoolQ scores ``yes``/``no``: it is how a yes/no question is answered in
  running text, so a base model is not penalised for the unusual words ``true``/``false``. (The
  LLM-Adapters copy of BoolQ has no passage, so the model answers from the question alone.)
* ``"winogrande"`` — lm-eval's partial scoring: each option is substituted into the blank and the model
  scores the *same* rest of the sentence after it, so the options differ in their contexts:
  ``(sentence[:blank] + option_i, " " + sentence[blank + 1:].strip())``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DATASET_STYLES", "STYLES", "MCItem", "label_word_item", "mc_item_from_record", "style_for_dataset"]

STYLES = ("labeled", "boolq", "winogrande")
LABEL_WORDS = "label-words"  # the style of label_word_item: the trained format, scored without generating

DATASET_STYLES: dict[str, str] = {
    "boolq": "boolq",
    "piqa": "labeled",
    "social_i_qa": "labeled",
    "winogrande": "winogrande",
    "openbookqa": "labeled",
    "ARC-Easy": "labeled",
    "ARC-Challenge": "labeled",
}

BOOLQ_OPTIONS = (" yes", " no")  # scored for the labels ("true", "false"), in that order


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, as the pairs a causal LM scores.

    Choice ``i`` is scored as log p(``options[i]`` | ``contexts[i]``) when ``contexts`` is given (options
    differ in their context, e.g. WinoGrande), else log p(``options[i]`` | ``context``). With ``contexts``,
    ``context`` is the question as shown to people (not scored). ``gold`` indexes the correct option and
    ``labels[i]`` is the dataset's label word for option ``i`` (``"answer1"``, ``"true"``...).
    """

    context: str
    options: list[str]
    gold: int
    labels: list[str]
    contexts: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.options)
        if n < 2 or len(self.labels) != n or (self.contexts is not None and len(self.contexts) != n):
            raise ValueError(
                f"MCItem needs >= 2 options and one label (and context, if given) per option; got "
                f"{n} options, {len(self.labels)} labels, "
                f"{'no' if self.contexts is None else len(self.contexts)} contexts"
            )
        if not 0 <= self.gold < n:
            raise ValueError(f"MCItem gold index {self.gold} is outside 0..{n - 1}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair scored for each option, in option order."""
        contexts = self.contexts if self.contexts is not None else [self.context] * len(self.options)
        return list(zip(contexts, self.options, strict=True))

    @property
    def gold_label(self) -> str:
        return self.labels[self.gold]


def style_for_dataset(name: str) -> str:
    """The scoring style for an LLM-Adapters folder name (``"ARC-Easy"`` -> ``"labeled"``)."""
    if name not in DATASET_STYLES:
        raise ValueError(
            f"no multiple-choice style known for dataset {name!r}; known: {', '.join(DATASET_STYLES)} "
            f"(or pass one of the styles {', '.join(STYLES)} directly)"
        )
    return DATASET_STYLES[name]


def label_word_item(prompt: str, instruction: str, gold_label: str, prefix: str = "", where: str = "") -> MCItem:
    """The LLM-Adapters answer as a fine-tuned model writes it, scored instead of generated.

    Context: ``prompt`` (the instruction rendered with the run's training template) followed by ``prefix`` (the
    fixed start of every answer, ``"the correct answer is"`` in LLM-Adapters' commonsense sets); options: the label
    words of the "Answer format:" line (``" answer1"``, ``" answer2"``, ...). This is the generation task's metric
    without its failure modes (a wrong format, running past the answer): it tells which label the model prefers
    in the format it was trained on.
    """
    try:
        _, labels = _split_format(instruction)
        gold = _gold_index(gold_label.strip().lower(), labels)
    except _ParseError as err:
        prefix_where = f"{where}: " if where else ""
        raise ValueError(f"{prefix_where}cannot read the label words of a {LABEL_WORDS!r} item: {err}") from None
    sep = " " if prefix else ""
    return MCItem(context=prompt + prefix, options=[f"{sep}{label}" for label in labels], gold=gold, labels=labels)


def mc_item_from_record(instruction: str, gold_label: str, style: str, where: str = "") -> MCItem:
    """Parse an LLM-Adapters instruction and its gold label word (the JSON ``answer``) into an MCItem.

    ``where`` (``"file:line"``) prefixes error messages; a record that cannot be parsed raises ValueError.
    """
    parsers = {"labeled": _labeled, "boolq": _boolq, "winogrande": _winogrande}
    if style not in parsers:
        raise ValueError(f"unknown multiple-choice style {style!r}; use one of: {', '.join(STYLES)} (or {LABEL_WORDS!r} "
                         "with a task prefix: tunelab.eval.choices.label_word_item)")
    try:
        return parsers[style](instruction, gold_label.strip().lower())
    except _ParseError as err:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}cannot read a {style!r} multiple-choice item: {err}. Instruction starts "
            f"{instruction[:80]!r}"
        ) from None


class _ParseError(Exception):
    """Why an instruction does not fit its style (mc_item_from_record adds the record's place)."""


_FORMAT = re.compile(r"answer format:[ \t]*(?P<labels>[^\n]*?)\s*\Z", re.IGNORECASE)
_LEAD = re.compile(r"^please\b.*?\b(?:question|sentence):\s*", re.IGNORECASE | re.DOTALL)
_LABEL = re.compile(r"(?P<prefix>[a-z]+)(?P<k>\d+)")


def _split_format(instruction: str) -> tuple[str, list[str]]:
    """(text before the "Answer format:" line, the label words it lists)."""
    match = _FORMAT.search(instruction.rstrip())  # anchored at the end: the line that ends the prompt
    if match is None:
        raise _ParseError("no 'Answer format: a/b/...' line")
    labels = [label.strip().lower() for label in match["labels"].split("/")]
    return instruction[: match.start()], labels


def _options(body: str, labels: list[str]) -> tuple[str, list[str]]:
    """(text before the first ``<Label>1:`` marker, the text after each marker) for labels prefix1..prefixN."""
    expected = [f"{labels[0].rstrip('0123456789')}{k}" for k in range(1, len(labels) + 1)]
    if len(labels) < 2 or labels != expected or not _LABEL.fullmatch(labels[0]):
        raise _ParseError(f"answer format {'/'.join(labels)!r} is not <word>1/<word>2/...")
    spans, pos = [], 0
    for label in labels:
        marker = re.compile(rf"\b{re.escape(label)}\s*:\s*", re.IGNORECASE).search(body, pos)
        if marker is None:
            raise _ParseError(f"no '{label.capitalize()}:' option after position {pos}")
        spans.append(marker.span())
        pos = marker.end()
    ends = [start for start, _ in spans[1:]] + [len(body)]
    texts = [body[end:nxt].strip() for (_, end), nxt in zip(spans, ends, strict=True)]
    if not all(texts):
        raise _ParseError(f"option {labels[texts.index('')]!r} is empty")
    return body[: spans[0][0]], texts


def _gold_index(gold_label: str, labels: list[str]) -> int:
    if gold_label not in labels:
        raise _ParseError(f"gold answer {gold_label!r} is not one of the labels {'/'.join(labels)}")
    return labels.index(gold_label)


def _stem(head: str) -> str:
    stem = _LEAD.sub("", head, count=1).strip()
    if not stem:
        raise _ParseError("empty question")
    return stem


def _labeled(instruction: str, gold_label: str) -> MCItem:
    body, labels = _split_format(instruction)
    head, texts = _options(body, labels)
    return MCItem(
        context=f"Question: {_stem(head)}\nAnswer:",
        options=[f" {text}" for text in texts],
        gold=_gold_index(gold_label, labels),
        labels=labels,
    )


def _boolq(instruction: str, gold_label: str) -> MCItem:
    body, labels = _split_format(instruction)
    if labels != ["true", "false"]:
        raise _ParseError(f"answer format is {'/'.join(labels)!r}, expected 'true/false'")
    question = _stem(body).rstrip("?").strip()
    return MCItem(
        context=f"Question: {question}?\nAnswer:",
        options=list(BOOLQ_OPTIONS),
        gold=_gold_index(gold_label, labels),
        labels=labels,
    )


def _winogrande(instruction: str, gold_label: str) -> MCItem:
    body, labels = _split_format(instruction)
    head, names = _options(body, labels)
    sentence = _stem(head)
    if sentence.count("_") != 1:
        raise _ParseError(f"the sentence has {sentence.count('_')} blanks '_', expected exactly one")
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    if not rest:
        raise _ParseError("nothing follows the blank '_' to score")
    return MCItem(
        context=sentence,
        options=[f" {rest}"] * len(names),
        gold=_gold_index(gold_label, labels),
        labels=labels,
        contexts=[sentence[:blank] + name for name in names],
    )
