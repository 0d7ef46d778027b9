"""A synthetic multilingual world small enough for a laptop CPU: one latent sentence generator, several languages.

A latent sentence is a clause (subject, verb, object, tense); subject and object are entities (noun concept,
number, optional adjective). Each language renders it with its own

* lexicon — random pseudo-words over its own syllable inventory; some concepts have two synonyms, chosen at random
  on every rendering (free variation: the irreducible part E of the loss);
* word order — one of SVO, SOV, VSO, OVS, ...; adjectives before or after the noun;
* morphology — separate suffix tokens: plural on nouns, agreement of adjectives with the noun's gender and number,
  agreement of the verb with the subject's number, a tense suffix; gendered articles.

Pretraining documents are monolingual runs of sentences about a few entities (so context helps), plus a small share
of incidental parallel text ``<xx> sentence <yy> sentence`` (the way bilingual snippets occur on the web). The
downstream tasks are translation between two languages, in that same format, and a summarisation-like task (a
document in, the subject and verb of each of its sentences out). Text is a sequence of whitespace-separated tokens,
so a word-level tokenizer built from the world's vocabulary (``build_tokenizer``) covers it exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ORDERS = ("SVO", "SOV", "VSO", "OSV", "VOS", "OVS")
CONSONANTS = "ptkbdgmnlrsvzfhjw"
VOWELS = "aeiou"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
END = "."


@dataclass(frozen=True)
class WorldConfig:
    """Size of the toy world; every number that shapes the corpus and the tasks."""

    seed: int = 0
    languages: int = 4
    nouns: int = 40
    verbs: int = 20
    adjectives: int = 12
    synonym_share: float = 0.25  # concepts with two interchangeable words (free variation)
    adjective_rate: float = 0.5
    doc_sentences: tuple[int, int] = (3, 8)
    doc_entities: int = 3  # entities a document talks about
    parallel_share: float = 0.05  # share of pretraining documents that are incidental parallel text
    translate_pair: tuple[int, int] = (0, 1)  # source -> target language of the translation task
    summary_language: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.languages <= 26:
            raise ValueError(f"toy world: languages must be in [2, 26], got {self.languages}")
        for name in ("nouns", "verbs", "adjectives"):
            if getattr(self, name) < 2:
                raise ValueError(f"toy world: {name} must be at least 2, got {getattr(self, name)}")
        if not 0.0 <= self.parallel_share < 1.0:
            raise ValueError(f"toy world: parallel_share must be in [0, 1), got {self.parallel_share}")
        if max(self.translate_pair) >= self.languages or self.translate_pair[0] == self.translate_pair[1]:
            raise ValueError(f"toy world: translate_pair {self.translate_pair} needs two different languages "
                             f"among 0..{self.languages - 1}")


@dataclass(frozen=True)
class Entity:
    noun: int
    plural: bool
    adjective: int | None


@dataclass(frozen=True)
class Clause:
    subject: Entity
    verb: int
    obj: Entity
    past: bool


@dataclass
class Language:
    """How one language renders a clause."""

    tag: str
    order: str
    adjective_first: bool
    nouns: list[list[str]]  # concept -> one or two synonyms
    verbs: list[list[str]]
    adjectives: list[list[str]]
    genders: list[int]  # noun concept -> 0/1
    articles: list[str]  # [gender * 2 + plural]
    plural: str
    agreement: list[str]  # adjective suffix [gender * 2 + plural]
    verb_plural: str
    past: str

    def noun_phrase(self, e: Entity, rng: random.Random) -> list[str]:
        g = self.genders[e.noun]
        words = [self.articles[2 * g + e.plural], rng.choice(self.nouns[e.noun])]
        if e.plural:
            words.append(self.plural)
        if e.adjective is not None:
            adj = [rng.choice(self.adjectives[e.adjective]), self.agreement[2 * g + e.plural]]
            words = [words[0], *adj, *words[1:]] if self.adjective_first else [*words, *adj]
        return words

    def verb_phrase(self, c: Clause, rng: random.Random) -> list[str]:
        words = [rng.choice(self.verbs[c.verb])]
        if c.subject.plural:
            words.append(self.verb_plural)
        if c.past:
            words.append(self.past)
        return words

    def render(self, c: Clause, rng: random.Random) -> list[str]:
        parts = {"S": self.noun_phrase(c.subject, rng), "V": self.verb_phrase(c, rng),
                 "O": self.noun_phrase(c.obj, rng)}
        return [w for slot in self.order for w in parts[slot]] + [END]


class _Words:
    """Draws distinct pseudo-words from one language's syllable inventory."""

    def __init__(self, rng: random.Random, tag: str, taken: set[str]) -> None:
        self.rng = rng
        self.consonants = rng.sample(CONSONANTS, 8)
        self.vowels = rng.sample(VOWELS, 3)
        self.taken = taken
        self.tag = tag

    def syllable(self) -> str:
        return self.rng.choice(self.consonants) + self.rng.choice(self.vowels)

    def word(self, syllables: tuple[int, int] = (2, 3), prefix: str = "") -> str:
        while True:
            w = prefix + "".join(self.syllable() for _ in range(self.rng.randint(*syllables)))
            if w not in self.taken:
                self.taken.add(w)
                return w

    def lexicon(self, n: int, synonym_share: float) -> list[list[str]]:
        return [[self.word()] + ([self.word()] if self.rng.random() < synonym_share else []) for _ in range(n)]


def make_language(index: int, cfg: WorldConfig, taken: set[str]) -> Language:
    """Language ``index`` of the world (deterministic in ``cfg.seed``)."""
    rng = random.Random(f"{cfg.seed}-lang-{index}")
    tag = chr(ord("a") + index) * 2
    w = _Words(rng, tag, taken)
    suffix = lambda: w.word((1, 1), prefix="-")  # noqa: E731 - a tiny local factory reads best inline
    return Language(
        tag=tag, order=ORDERS[index % len(ORDERS)], adjective_first=rng.random() < 0.5,
        nouns=w.lexicon(cfg.nouns, cfg.synonym_share), verbs=w.lexicon(cfg.verbs, cfg.synonym_share),
        adjectives=w.lexicon(cfg.adjectives, cfg.synonym_share),
        genders=[rng.randint(0, 1) for _ in range(cfg.nouns)], articles=[w.word((1, 1)) for _ in range(4)],
        plural=suffix(), agreement=[suffix() for _ in range(4)], verb_plural=suffix(), past=suffix(),
    )


@dataclass
class World:
    """The latent generator and its languages."""

    cfg: WorldConfig
    languages: list[Language] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: WorldConfig) -> World:
        taken: set[str] = set()
        return cls(cfg, [make_language(i, cfg, taken) for i in range(cfg.languages)])

    def tag(self, lang: int) -> str:
        return f"<{self.languages[lang].tag}>"

    # -- latent --------------------------------------------------------------------------------------------------
    def entity(self, rng: random.Random, nouns: list[int] | None = None) -> Entity:
        noun = rng.choice(nouns) if nouns else rng.randrange(self.cfg.nouns)
        adj = rng.randrange(self.cfg.adjectives) if rng.random() < self.cfg.adjective_rate else None
        return Entity(noun, rng.random() < 0.5, adj)

    def clause(self, rng: random.Random, nouns: list[int] | None = None) -> Clause:
        return Clause(self.entity(rng, nouns), rng.randrange(self.cfg.verbs), self.entity(rng, nouns), rng.random() < 0.5)

    def topic(self, rng: random.Random) -> list[int]:
        return rng.sample(range(self.cfg.nouns), self.cfg.doc_entities)

    # -- text -----------------------------------------------------------------------------------------------------
    def sentence(self, clause: Clause, lang: int, rng: random.Random) -> str:
        return " ".join(self.languages[lang].render(clause, rng))

    def document(self, rng: random.Random) -> str:
        """A monolingual document, or (with probability parallel_share) a run of parallel sentence pairs."""
        topic = self.topic(rng)
        n = rng.randint(*self.cfg.doc_sentences)
        if rng.random() < self.cfg.parallel_share:
            a, b = rng.sample(range(self.cfg.languages), 2)
            return " ".join(self.pair(self.clause(rng, topic), a, b, rng) for _ in range(max(1, n // 2)))
        lang = rng.randrange(self.cfg.languages)
        return " ".join(self.sentence(self.clause(rng, topic), lang, rng) for _ in range(n))

    def pair(self, clause: Clause, a: int, b: int, rng: random.Random) -> str:
        return f"{self.tag(a)} {self.sentence(clause, a, rng)} {self.tag(b)} {self.sentence(clause, b, rng)}"

    # -- tasks ----------------------------------------------------------------------------------------------------
    def translation(self, rng: random.Random) -> dict[str, str]:
        """One translation example: instruction = source sentence, output = its rendering in the target language."""
        a, b = self.cfg.translate_pair
        clause = self.clause(rng)
        return {"instruction": self.sentence(clause, a, rng), "input": "", "output": self.sentence(clause, b, rng)}

    def summary(self, rng: random.Random) -> dict[str, str]:
        """A document in, the subject noun phrase and verb of each of its sentences out (same language)."""
        lang, topic = self.cfg.summary_language, self.topic(rng)
        clauses = [self.clause(rng, topic) for _ in range(rng.randint(*self.cfg.doc_sentences))]
        doc = " ".join(self.sentence(c, lang, rng) for c in clauses)
        language = self.languages[lang]
        heads = [" ".join(language.noun_phrase(c.subject, rng) + language.verb_phrase(c, rng) + [END])
                 for c in clauses]
        return {"instruction": doc, "input": "", "output": " ".join(heads)}

    def vocabulary(self) -> list[str]:
        """Every token the world can produce (sorted after the special and tag tokens)."""
        words: set[str] = {END}
        for lang in self.languages:
            for lex in (lang.nouns, lang.verbs, lang.adjectives):
                words.update(w for syn in lex for w in syn)
            words.update([*lang.articles, *lang.agreement, lang.plural, lang.verb_plural, lang.past])
        tags = [self.tag(i) for i in range(len(self.languages))] + ["<sum>"]
        return [*SPECIALS, *tags, *sorted(words)]


TASKS = ("translate", "summarise")
# Prompt formats (``data.template``) of the tasks: translation is phrased exactly like the incidental parallel text.
PRETRAIN_TEMPLATE = "{instruction}"


def task_template(world: World, task: str) -> str:
    if task == "translate":
        a, b = world.cfg.translate_pair
        return f"{world.tag(a)} {{instruction}} {world.tag(b)}"
    if task == "summarise":
        return "{instruction} <sum>"
    raise ValueError(f"unknown toy task {task!r}; toy tasks: {', '.join(TASKS)}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@dataclass(frozen=True)
class WorldFiles:
    """Paths written by :func:`write_world`."""

    root: Path
    corpus: Path
    tokenizer: Path
    tasks: dict[str, dict[str, Path]]


def write_world(cfg: WorldConfig, out: str | Path, *, documents: int, task_train: int, task_test: int) -> WorldFiles:
    """Write the pretraining corpus, the tasks (train/test JSONL), the tokenizer and world.json under ``out``.

    Corpus rows are records with an empty instruction and the document as output (loss on every token);
    task rows are ``{instruction, input, output}``. Test examples use their own random stream.
    """
    root = Path(out)
    world = World.build(cfg)
    rng = random.Random(f"{cfg.seed}-corpus")
    corpus = root / "corpus.jsonl"
    _write_jsonl(corpus, [{"instruction": "", "output": world.document(rng)} for _ in range(documents)])
    tasks: dict[str, dict[str, Path]] = {}
    for task in TASKS:
        make = world.translation if task == "translate" else world.summary
        tasks[task] = {}
        for split, n in (("train", task_train), ("test", task_test)):
            r = random.Random(f"{cfg.seed}-{task}-{split}")
            tasks[task][split] = root / "tasks" / f"{task}-{split}.jsonl"
            _write_jsonl(tasks[task][split], [make(r) for _ in range(n)])
    tok_dir = root / "tokenizer"
    build_tokenizer(world.vocabulary()).save_pretrained(str(tok_dir))
    meta = {"config": asdict(cfg), "documents": documents, "templates": {t: task_template(world, t) for t in TASKS},
            "languages": [{"tag": lang.tag, "order": lang.order, "adjective_first": lang.adjective_first}
                          for lang in world.languages], "vocab_size": len(world.vocabulary())}
    (root / "world.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return WorldFiles(root, corpus, tok_dir, tasks)


def build_tokenizer(vocab: list[str]) -> Any:
    """A word-level tokenizer over ``vocab`` (whitespace split, BOS prepended, unknown words -> <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    index = {w: i for i, w in enumerate(vocab)}
    backend = Tokenizer(models.WordLevel(vocab=index, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", index["<s>"])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
