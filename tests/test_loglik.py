"""Log-likelihood multiple-choice scoring: hand-computed oracle, batching, tokenisation rule, choice parsing."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tunelab.eval import loglik
from tunelab.eval.choices import DATASET_STYLES, MCItem, mc_item_from_record, style_for_dataset
from tunelab.eval.loglik import (
    MCResult,
    continuation_logprobs,
    encode_pair,
    score_multiple_choice,
    summarize,
)

from conftest import SHARED_DATA, tiny

DATA = SHARED_DATA  # the one place that knows where ../shared/data is

PAIRS = [
    ("Question: What colour is the sky?\nAnswer:", " blue"),
    ("The cat sat on the ", "mat."),  # trailing space moves into the continuation
    ("x", " a much longer continuation with several words in it"),
]


@pytest.fixture(scope="module")
def llama():
    return tiny("tiny-llama", "fp32")


def hand_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Oracle: full-vocabulary log-softmax of the unpadded sequence, summed token by token."""
    ctx = tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :] if context.strip() else whole
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = sum(float(logp[len(ctx) - 1 + j, tok]) for j, tok in enumerate(cont))
    return total, len(cont)


# ------------------------------------------------------------------------------------------ log-likelihood


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_logprobs_match_hand_computation(name):
    model, tok = tiny(name, "fp32")
    got = continuation_logprobs(model, tok, PAIRS, batch_size=8)
    for (ctx, cont), (lp, n) in zip(PAIRS, got, strict=True):
        want, n_want = hand_logprob(model, tok, ctx, cont)
        assert n == n_want
        assert lp == pytest.approx(want, abs=1e-5)


def test_bf16_model_scores_with_an_fp32_head():
    """A bf16 model's hidden states go through the vocabulary projection in fp32: the scores stay close to an fp64
    head on the same model's bf16 hidden states, far closer than a bf16 head gets (which rounds logits, so options
    that differ by less than that tie). The hidden states of the batched scorer and of this one-sequence reference
    differ by bf16 rounding themselves (how much depends on the CPU's bf16 kernels: ~1e-4 on one without bf16
    units), so the check is relative to the bf16 head's error, not an absolute tolerance."""
    model, tok = tiny("tiny-llama", "bf16")
    got = continuation_logprobs(model, tok, PAIRS, batch_size=8)
    head = model.get_output_embeddings().weight
    ours, bf16_head = [], []
    for (ctx, cont), (lp, n) in zip(PAIRS, got, strict=True):
        c = tok(ctx.rstrip(), add_special_tokens=False)["input_ids"] or [tok.bos_token_id]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        cids = whole[len(c):] if ctx.strip() else whole
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([c + cids])).last_hidden_state[0]
        exact = torch.log_softmax(hidden.double() @ head.double().T, dim=-1)
        rounded = torch.log_softmax((hidden @ head.T).double(), dim=-1)
        want = sum(float(exact[len(c) - 1 + j, t]) for j, t in enumerate(cids))
        assert n == len(cids)
        assert lp == pytest.approx(want, abs=1e-3)
        ours.append(abs(lp - want))
        bf16_head.append(abs(sum(float(rounded[len(c) - 1 + j, t]) for j, t in enumerate(cids)) - want))
    assert sum(ours) < 0.25 * sum(bf16_head), (ours, bf16_head)


def test_batched_equals_one_at_a_time(llama):
    model, tok = llama
    pairs = PAIRS + [("Q: 2+2?\nA:", " 4"), ("", "Empty context scores from BOS.")]
    batched = continuation_logprobs(model, tok, pairs, batch_size=16)
    single = [continuation_logprobs(model, tok, [p], batch_size=1)[0] for p in pairs]
    for (a, na), (b, nb) in zip(batched, single, strict=True):
        assert na == nb
        assert a == pytest.approx(b, abs=1e-5)


def test_restores_training_mode_and_needs_no_grad(llama):
    model, tok = llama
    model.train()
    try:
        ((lp, _),) = continuation_logprobs(model, tok, [PAIRS[0]])
        assert model.training
        assert lp < 0
    finally:
        model.eval()


def test_long_inputs_are_cut_from_the_left(llama):
    model, tok = llama
    limit = model.config.max_position_embeddings
    context, continuation = "z" * (limit + 100), " tail"
    ((lp, n),) = continuation_logprobs(model, tok, [(context, continuation)])
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"][-(limit + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
    want = sum(float(logp[limit - n + j, t]) for j, t in enumerate(ids[-n:]))
    assert n == len(continuation)
    assert lp == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------------------------------ tokenisation


def test_trailing_space_moves_to_continuation(llama):
    _, tok = llama
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:"
    assert tok.decode(cont) == " yes"
    assert encode_pair(tok, "Answer:", " yes") == (ctx, cont)


def test_empty_context_is_conditioned_on_bos(llama):
    _, tok = llama
    ctx, cont = encode_pair(tok, "", "hi")
    assert ctx == [tok.bos_token_id]
    assert tok.decode(cont) == "hi"


class MergingTokenizer:
    """Fake BPE: "ab" is one token, so encode("a" + "b") does not start with encode("a")."""

    vocab = {"ab": 3, "a": 1, "b": 2, " ": 4}

    def __init__(self, add_bos: bool = False) -> None:
        self.add_bos = add_bos
        self.bos_token_id, self.eos_token_id = 9, 8

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            step = 2 if text[i : i + 2] in self.vocab else 1
            ids.append(self.vocab[text[i : i + step]])
            i += step
        return {"input_ids": ([self.bos_token_id] if self.add_bos and add_special_tokens else []) + ids}


def test_merged_boundary_falls_back_to_separate_encoding():
    tok = MergingTokenizer()
    assert encode_pair(tok, "a", "b") == ([1], [2])  # whole = [3] would lose the context token
    assert encode_pair(tok, "b", "a") == ([2], [1])  # no merge: tail of the whole encoding


def test_bos_prepended_when_tokenizer_uses_one():
    assert encode_pair(MergingTokenizer(add_bos=True), "b", "a") == ([9, 2], [1])


def test_empty_continuation_is_an_error(llama):
    _, tok = llama
    with pytest.raises(ValueError, match="empty continuation"):
        encode_pair(tok, "context", "")


# ------------------------------------------------------------------------------------------ multiple choice


def test_prefix_option_wins_acc(llama):
    """ℓ(" a b c" | c) = ℓ(" a" | c) + ℓ(" b c" | c, " a") < ℓ(" a" | c): acc must pick the prefix."""
    model, tok = llama
    items = [
        MCItem("Question: pick\nAnswer:", [" a b c d e", " a"], gold=1, labels=["answer1", "answer2"]),
        MCItem("Question: pick\nAnswer:", [" a", " a b c d e"], gold=0, labels=["answer1", "answer2"]),
    ]
    results = score_multiple_choice(model, tok, items)
    assert [r.pred for r in results] == [1, 0]
    assert all(r.correct for r in results)
    assert summarize(results)["accuracy"] == 1.0


def test_acc_norm_divides_by_continuation_bytes():
    item = MCItem("Q", [" a", " abcdefgh"], gold=1, labels=["answer1", "answer2"])
    result = loglik.mc_result(item, [-3.0, -9.0])  # per byte: -1.5 vs -1.0
    assert (result.pred, result.pred_norm) == (0, 1)
    assert (result.correct, result.correct_norm) == (False, True)


def test_acc_norm_counts_utf8_bytes_not_characters():
    item = MCItem("Q", [" éé", " abcd"], gold=0, labels=["answer1", "answer2"])
    result = loglik.mc_result(item, [-5.0, -5.1])  # bytes 5 vs 5: -1.0 vs -1.02; characters 3 vs 5 would flip
    assert result.pred_norm == 0


def test_identical_pairs_are_scored_once(llama, monkeypatch):
    model, tok = llama
    seen: list[list[tuple[str, str]]] = []
    real = loglik.continuation_logprobs

    def spy(model, tokenizer, pairs, *, batch_size=16, share_context=True):
        seen.append(list(pairs))
        return real(model, tokenizer, pairs, batch_size=batch_size, share_context=share_context)

    monkeypatch.setattr(loglik, "continuation_logprobs", spy)
    item = mc_item_from_record(
        "Please answer ... question: is it\n\nAnswer format: true/false", "true", "boolq"
    )
    results = score_multiple_choice(model, tok, [item, item, item])
    assert len(seen[0]) == 2
    assert results[0] == results[1] == results[2]


def _spy_runs(monkeypatch, uncached: list | None = None) -> list[tuple[int, int, bool]]:
    """(rows, columns, with a cache) of every model call the shared-context path makes; the one-sequence path's
    calls (no cache kept) go to ``uncached`` when given, else fail the test."""
    calls: list[tuple[int, int, bool]] = []
    real = loglik._run_body

    def spy(model, ids, mask, position_ids=None, cache=None, *, use_cache=True):
        if not use_cache:
            assert uncached is not None, "a pair ran as one sequence where its context should have been shared"
            uncached.append(tuple(ids.shape))
        else:
            calls.append((ids.shape[0], ids.shape[1], cache is not None))
        return real(model, ids, mask, position_ids, cache, use_cache=use_cache)

    monkeypatch.setattr(loglik, "_run_body", spy)
    return calls


def test_options_differing_in_their_last_token_need_the_context_pass_only(llama, monkeypatch):
    """Options of one token each after one context (label words are, in most vocabularies; digits are in the tiny
    byte-level one): the context's last position scores them all, with no pass over the continuations; the numbers
    are those of scoring each option alone."""
    model, tok = llama
    pairs = [("Q: pick one.\nA: the answer is answer", f"{k}") for k in range(1, 5)]
    assert all(len(encode_pair(tok, c, o)[1]) == 1 for c, o in pairs)
    alone = [loglik.continuation_logprobs(model, tok, [p])[0] for p in pairs]
    calls = _spy_runs(monkeypatch)
    together = loglik.continuation_logprobs(model, tok, pairs, batch_size=16)
    assert calls == [(1, len(encode_pair(tok, *pairs[0])[0]), False)]
    for (a, n), (b, m) in zip(alone, together, strict=True):
        assert n == m and a == pytest.approx(b, abs=1e-5)


def test_a_shared_context_runs_once_for_all_its_options(llama, monkeypatch):
    """Two items of several multi-token options each: one left-padded pass over the two contexts, cached passes
    over the options; each score equals the hand-computed full-sequence oracle."""
    model, tok = llama
    pairs = [("Question: Which one floats?\nAnswer:", o) for o in (" a wooden stick", " iron", " a stone wall")]
    pairs += [("Q: longer context here, with more words in it to pad?\nA:", o) for o in (" yes indeed", " no")]
    calls = _spy_runs(monkeypatch)
    got = loglik.continuation_logprobs(model, tok, pairs, batch_size=16)
    n_multi = sum(len(encode_pair(tok, c, o)[1]) > 1 for c, o in pairs)
    # one pass over the two contexts, then the options longest first, in the chunks _padded_chunks chose
    assert calls[0][0] == 2 and not calls[0][2]
    chunks = calls[1:]
    spans = sorted((len(encode_pair(tok, c, o)[1]) - 1 for c, o in pairs if len(encode_pair(tok, c, o)[1]) > 1),
                   reverse=True)
    want_chunks = [(stop - start, spans[start]) for start, stop in loglik._padded_chunks(spans)]
    assert all(cached for _, _, cached in chunks) and [(r, w) for r, w, _ in chunks] == want_chunks
    assert sum(r for r, _, _ in chunks) == n_multi
    for (ctx, cont), (lp, n) in zip(pairs, got, strict=True):
        want, n_want = hand_logprob(model, tok, ctx, cont)
        assert n == n_want and lp == pytest.approx(want, abs=1e-5)
    calls.clear()
    uncached: list = []
    monkeypatch.undo()
    _spy_runs(monkeypatch, uncached)
    unshared = loglik.continuation_logprobs(model, tok, pairs, batch_size=16, share_context=False)
    assert calls == [] and len(uncached) == 1 and [n for _, n in unshared] == [n for _, n in got]
    assert [lp for lp, _ in unshared] == pytest.approx([lp for lp, _ in got], abs=1e-5)


def test_padded_chunks_minimise_calls_plus_padded_positions():
    assert loglik._padded_chunks([]) == []
    assert loglik._padded_chunks([3, 3, 3, 3], overhead=64) == [(0, 4)]  # alike: one pass, no padding
    # one long option among many short ones: alone it costs 64 + 40; with the others padding would cost 20 x 40
    assert loglik._padded_chunks([40] + [2] * 19, overhead=64) == [(0, 1), (1, 20)]
    assert loglik._padded_chunks([5, 4, 3, 2], overhead=0) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # padding only
    # against every split by brute force
    import itertools
    spans = [9, 7, 7, 4, 3, 3, 2, 1]

    def cost(cuts):
        bounds = [0, *cuts, len(spans)]
        return sum(10 + (b - a) * spans[a] for a, b in itertools.pairwise(bounds))

    best = min(cost(c) for k in range(len(spans)) for c in itertools.combinations(range(1, len(spans)), k))
    chunks = loglik._padded_chunks(spans, overhead=10)
    assert cost([a for a, _ in chunks[1:]]) == best
    capped = loglik._padded_chunks([3] * 5, overhead=64, max_rows=2)  # rows capped: three passes, not one
    assert len(capped) == 3 and all(b - a <= 2 for a, b in capped) and capped[0][0] == 0 and capped[-1][1] == 5
    assert all(capped[i][1] == capped[i + 1][0] for i in range(2))
    with pytest.raises(ValueError, match="longest first"):
        loglik._padded_chunks([1, 2])


def test_context_batches_give_a_long_tail_its_own_batch():
    contexts = [tuple(range(n)) for n in [160] + [30] * 15 + [28] * 10]
    batches = loglik._context_batches(contexts, 16, equal_lengths=False)
    assert [len(b) for b in batches] == [1, 15, 10]  # 224 + 514 + 344 positions-equivalent: the cheapest split
    assert all(len(b) <= 16 for b in batches) and sum(len(b) for b in batches) == len(contexts)
    assert [c for b in batches for c in b] == contexts  # order kept: longest first
    same = loglik._context_batches([(1, 2), (3, 4), (5,)], 16, equal_lengths=True)
    assert sorted(len(b[0]) for b in same) == [1, 2] and all(len({len(c) for c in b}) == 1 for b in same)


def test_winogrande_item_scores_per_option_contexts(llama):
    model, tok = llama
    item = mc_item_from_record(WINO, "option2", "winogrande")
    (result,) = score_multiple_choice(model, tok, [item])
    want = [hand_logprob(model, tok, ctx, cont)[0] for ctx, cont in item.pairs]
    assert result.logprobs == pytest.approx(want, abs=1e-5)


def test_summarize_counts():
    results = [MCResult([0.0, -1.0], 0, 1, True, False), MCResult([-1.0, 0.0], 1, 1, False, True)]
    assert summarize(results) == {"n": 2, "accuracy": 0.5, "accuracy_norm": 0.5}
    assert summarize([])["n"] == 0


# ------------------------------------------------------------------------------------------ choice parsing

ARC = (
    "Please choose the correct answer to the question: Which gas do plants absorb?\n\n"
    "Answer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: argon\n\n"
    "Answer format: answer1/answer2/answer3/answer4"
)
PIQA = (
    "Please choose the correct solution to the question: How to open a jar?\n\n"
    "Solution1: Twist the lid. \n\nSolution2: Sing to it.\n\nAnswer format: solution1/solution2"
)
WINO = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much "
    "better surgeon than Maria so _ always got the easier cases.\n\n"
    "Option1: Sarah Option2: Maria Answer format: option1/option2"
)
BOOLQ = (
    "Please answer the following question with true or false, question: is the sky blue\n\n"
    "Answer format: true/false"
)


def test_labeled_item():
    item = mc_item_from_record(ARC, "answer2", "labeled")
    assert item.context == "Question: Which gas do plants absorb?\nAnswer:"
    assert item.options == [" oxygen", " carbon dioxide", " helium", " argon"]
    assert (item.gold, item.gold_label) == (1, "answer2")
    assert item.labels == ["answer1", "answer2", "answer3", "answer4"]
    assert item.pairs[1] == (item.context, " carbon dioxide")


def test_piqa_solutions():
    item = mc_item_from_record(PIQA, "solution1", "labeled")
    assert item.context == "Question: How to open a jar?\nAnswer:"
    assert item.options == [" Twist the lid.", " Sing to it."]
    assert item.gold == 0


def test_boolq_item():
    item = mc_item_from_record(BOOLQ, "false", "boolq")
    assert item.context == "Question: is the sky blue?\nAnswer:"
    assert item.options == [" yes", " no"]
    assert (item.labels, item.gold) == (["true", "false"], 1)


def test_winogrande_item():
    item = mc_item_from_record(WINO, "option2", "winogrande")
    assert item.pairs == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert (item.labels, item.gold) == (["option1", "option2"], 1)


@pytest.mark.parametrize(
    ("instruction", "gold", "style", "message"),
    [
        (ARC, "answer7", "labeled", "gold answer 'answer7'"),
        (ARC.replace("Answer3: helium ", ""), "answer1", "labeled", "no 'Answer3:'"),
        (ARC.rsplit("\n\n", 1)[0], "answer1", "labeled", "Answer format"),
        (WINO.replace("_", "the surgeon"), "option1", "winogrande", "0 blanks"),
        (BOOLQ.replace("true/false", "yes/no"), "yes", "boolq", "expected 'true/false'"),
        (ARC, "answer1", "hellaswag", "unknown multiple-choice style"),
    ],
)
def test_unparseable_records_name_their_place(instruction, gold, style, message):
    with pytest.raises(ValueError, match=message) as err:
        mc_item_from_record(instruction, gold, style, where="data/test.json:42")
    if style in DATASET_STYLES.values():
        assert "data/test.json:42" in str(err.value)


def test_style_for_dataset():
    assert style_for_dataset("ARC-Easy") == "labeled"
    assert style_for_dataset("winogrande") == "winogrande"
    with pytest.raises(ValueError, match="known: boolq"):
        style_for_dataset("gsm8k")


@pytest.mark.parametrize("dataset", list(DATASET_STYLES))
def test_every_real_record_parses(dataset):
    path = DATA / dataset / "test.json"
    if not path.is_file():
        pytest.skip(f"real data not present at {path}")
    rows = json.loads(path.read_text(encoding="utf-8"))
    style = style_for_dataset(dataset)
    items = [
        mc_item_from_record(r["instruction"], r["answer"], style, f"{path}:{i}") for i, r in enumerate(rows)
    ]
    assert len(items) == len(rows)
    assert all(len(item.options) >= 2 and all(cont.strip() for _, cont in item.pairs) for item in items)


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_arc_easy_zero_shot_beats_chance():
    path = DATA / "ARC-Easy" / "test.json"
    if not path.is_file():
        pytest.skip(f"real data not present at {path}")
    from tunelab.models import load_model

    model, tok = load_model("smollm2-135m", "fp32")
    rows = json.loads(path.read_text(encoding="utf-8"))[:100]
    items = [mc_item_from_record(r["instruction"], r["answer"], "labeled") for r in rows]
    start = time.perf_counter()
    summary = summarize(score_multiple_choice(model, tok, items, batch_size=16))
    print(f"\nSmolLM2-135M ARC-Easy[:100] zero-shot: {summary} in {time.perf_counter() - start:.1f} s")
    assert summary["accuracy"] > 0.35 and summary["accuracy_norm"] > 0.35


def test_label_word_item_scores_the_trained_answer_format():
    from tunelab.data import Record
    from tunelab.data.templates import render_prompt
    from tunelab.eval.choices import label_word_item

    prompt = render_prompt(Record(ARC, "", "the correct answer is answer2"), "alpaca")
    item = label_word_item(prompt, ARC, "Answer2", "the correct answer is")
    # the context is exactly the training prompt (ReFT intervenes on its last positions, as in training); the fixed
    # prefix is part of every option
    assert item.context == prompt and prompt.endswith("### Response:\n")
    assert item.options == [f"the correct answer is answer{k}" for k in range(1, 5)] and item.gold == 1
    assert label_word_item("P: ", BOOLQ, "false").options == ["true", "false"]
    with pytest.raises(ValueError, match=r"x\.json:7: .*gold answer 'answer9'"):
        label_word_item(prompt, ARC, "answer9", where="x.json:7")


def test_label_words_task_uses_the_runs_template(tmp_path):
    """The label-words loglik task renders prompts with the template it is given (a run's training template) and
    picks the label with the highest log-probability, here checked against scoring the pairs by hand."""
    import json as _json

    from tunelab.eval.harness import EvalOptions, evaluate_task
    from tunelab.eval.loglik import continuation_logprobs
    from tunelab.eval.tasks import TaskChoices, TaskSpec

    data = tmp_path / "arc.json"
    data.write_text(_json.dumps([{"instruction": ARC, "input": "", "answer": "answer2"}] * 3))
    spec = TaskSpec(name="lw", data=str(data), kind="loglik",
                    choices=TaskChoices(style="label-words", prefix="the correct answer is"))
    model, tok = tiny()
    summary = evaluate_task(model, tok, spec, EvalOptions(out_dir=str(tmp_path)), default_template="plain")
    assert summary["n"] == 3 and summary["template"] == "plain"
    [row, *_] = [_json.loads(x) for x in (tmp_path / "lw.jsonl").read_text().splitlines()]
    # by hand, on the training tokens: the plain template's prompt ids (the text and its newline), then each label's
    # response ids, as training encodes them
    from tunelab.data import Record, encode_prompts, encode_responses

    [prompt] = encode_prompts([Record(ARC, "", "x")], tok, template="plain")
    answers = encode_responses([f"the correct answer is answer{k}" for k in range(1, 5)], tok)
    by_hand = continuation_logprobs(model, tok, [(prompt, a) for a in answers])
    assert row["logprobs"] == pytest.approx([lp for lp, _ in by_hand], abs=1e-4)
    assert tok.decode(prompt).endswith(f"{ARC}\n")
