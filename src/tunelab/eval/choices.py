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

from dataclasses import dataclass

from tunelab.data.mc import ParseError as _ParseError
from tunelab.data.mc import gold_index as _gold_index
from tunelab.data.mc import split_format as _split_format
from tunelab.data.mc import split_options as _options
from tunelab.data.mc import stem as _stem

__all__ = ["DATASET_STYLES", "STYLES", "MCItem", "as_trained", "label_word_item", "mc_item_from_record", "style_for_dataset",
           "trained_item"]

STYLES = ("labeled", "boolq", "winogrande")
LABEL_WORDS = "label-words"  # the style of label_word_item: the trained label format, scored without generating
TRAINED = "trained"  # the style of trained_item: an mc-text record's option texts after its training prompt

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
    # the (context ids, continuation ids) scored per option when the item comes tokenised (trained_item: the
    # training tokenisation), instead of the texts above tokenised the lm-eval way (tunelab.eval.loglik.encode_pair)
    encoded: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None

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
        if self.encoded is not None and (len(self.encoded) != n or not all(c for _, c in self.encoded)):
            raise ValueError(f"MCItem needs one non-empty encoded continuation per option; got {len(self.encoded)} "
                             f"for {n} options")

    @property
    def pairs(self) -> list[tuple[str, str]] | list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The (context, continuation) pair scored for each option, in option order: texts, or token ids when the
        item comes tokenised."""
        if self.encoded is not None:
            return list(self.encoded)
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

    Context: ``prompt`` (the instruction rendered with the run's training template); options: ``prefix`` (the
    fixed start of every answer, ``"the correct answer is"`` in LLM-Adapters' commonsense sets) followed by each
    label word of the "Answer format:" line (``"the correct answer is answer1"``, ...). This is the generation task's metric
    without its failure modes (a wrong format, running past the answer): it tells which label the model prefers
    in the format it was trained on.
    """
    try:
        _, labels = _split_format(instruction)
        gold = _gold_index(gold_label.strip().lower(), labels)
    except _ParseError as err:
        prefix_where = f"{where}: " if where else ""
        raise ValueError(f"{prefix_where}cannot read the label words of a {LABEL_WORDS!r} item: {err}") from None
    # The fixed prefix is part of every option, not of the context: the context is then exactly the training prompt,
    # so methods that act on the prompt's last positions (ReFT) intervene where they were trained to. The prefix
    # adds the same log-probability to every option, so acc is unchanged for every other method.
    lead = f"{prefix} " if prefix else ""
    return MCItem(context=prompt, options=[f"{lead}{label}" for label in labels], gold=gold, labels=labels)


def trained_item(prompt: str, options: tuple[str, ...], gold_text: str, where: str = "") -> MCItem:
    """An mc-text record (``tunelab.data.formats``) scored in its training format: each option's text after the
    training prompt, which is where the fine-tuned model writes its answer (log p(option | prompt))."""
    if gold_text not in options:
        prefix_where = f"{where}: " if where else ""
        raise ValueError(f"{prefix_where}a {TRAINED!r} item needs a record with options (data format mc-text) whose "
                         f"answer is one of them; got answer {gold_text!r} and options {list(options)}")
    return MCItem(context=prompt, options=list(options), gold=options.index(gold_text), labels=list(options))


def as_trained(item: MCItem, prompt_ids: list[int], option_ids: list[list[int]]) -> MCItem:
    """``item`` scored on the tokens training puts before and after its prompt/response split
    (``tunelab.data.encode_prompts`` / ``encode_responses``) instead of its texts tokenised the lm-eval way, where the
    prompt's trailing newline moves into the continuation: so a method whose edit depends on the prompt's positions
    (ReFT) sees the positions it was trained on, and every option is scored as the tokens training taught."""
    import dataclasses

    return dataclasses.replace(item, encoded=[(tuple(prompt_ids), tuple(ids)) for ids in option_ids])


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
