"""LoReFT and DiReFT against independent references.

Oracles: the paper's equations written here in plain torch (per vector, and on the whole model through hand-written
hooks at hand-computed positions), pyreft's LoreftIntervention and ReftModel with the same weights (when pyreft is
installed), unbatched runs for every row of a padded batch (right and left padding), and generation with the KV
cache against a cache-free recomputation with the interventions on the prompt.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunelab.config import ConfigError, config_from_dict
from tunelab.data import Example, collate, collate_packed
from tunelab.eval.generate import GenerationSettings, generate_ids
from tunelab.methods import direft, loreft, reft
from tunelab.methods.core import MethodError, prompt_lengths
from tunelab.train.objective import IGNORE_INDEX, nll_sum, prompt_lengths_from_labels

from conftest import tiny

ARCHS = ["tiny-llama", "tiny-gpt2"]
VARIANTS = [pytest.param(loreft, id="loreft"), pytest.param(direft, id="direft")]
ACTS = {"linear": lambda x: x, "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def _apply(arch, module, seed=0, **options):
    model, tok = tiny(arch)
    torch.manual_seed(seed)
    handle = module.apply(model, module.Config(**options))
    model.eval()
    return model, tok, handle


def _randomise(handle, seed=0, scale=0.3):
    """Move every weight away from its init; LoReFT's stored R̃ is then re-orthonormalised by fold()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    handle.fold()


# --------------------------------------------------------------------------------------------------------------
# The equations, written from the paper
# --------------------------------------------------------------------------------------------------------------


def paper_phi(h, w, b, proj, act, lo: bool):
    """LoReFT (eq. 2): h + Rᵀ(a(Wh + b) − Rh); DiReFT: h + W₂ᵀ a(W₁h + b). Rows of h are vectors."""
    edit = act(h @ w.T + b) - (h @ proj.T if lo else 0)
    return h + edit @ proj


@pytest.mark.parametrize("module", VARIANTS)
@pytest.mark.parametrize("activation", ["linear", "gelu", "tanh"])
def test_intervention_equals_the_paper_equation(module, activation):
    model, _, handle = _apply("tiny-llama", module, activation=activation)
    _randomise(handle)
    iv = handle.layers["reft"]["layer0"]
    h = torch.randn(5, 64, dtype=torch.float64).float()
    expected = paper_phi(h, iv.source.weight, iv.source.bias, iv.project, ACTS[activation], module is loreft)
    torch.testing.assert_close(iv(h), expected, atol=1e-5, rtol=1e-5)


def test_orthonormal_rows_is_a_projection_onto_the_stiefel_manifold():
    a = torch.randn(4, 40)
    r = reft.orthonormal_rows(a)
    torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-6, rtol=0)
    coeff = torch.linalg.lstsq(r.T, a.T).solution  # a's rows lie in the span of r's rows
    torch.testing.assert_close(r.T @ coeff, a.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(reft.orthonormal_rows(r), r, atol=1e-6, rtol=0)  # identity on orthonormal rows


def test_lo_reft_is_rank_r_edit_inside_the_subspace():
    """LoReFT moves h only inside the row space of R, to the point where R h' = a(W h + b)."""
    model, _, handle = _apply("tiny-llama", loreft, r=3)
    _randomise(handle)
    iv = handle.layers["reft"]["layer1"]
    h = torch.randn(6, 64)
    out = iv(h)
    r = iv.project
    torch.testing.assert_close(out @ r.T, iv.source(h), atol=1e-5, rtol=1e-5)
    orth = torch.eye(64) - r.T @ r
    torch.testing.assert_close(out @ orth, h @ orth, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# pyreft
# --------------------------------------------------------------------------------------------------------------


def _pyreft():
    pytest.importorskip("pyvene")
    return pytest.importorskip("pyreft")


def _copy_to_pyreft(iv, pyreft_iv):
    with torch.no_grad():
        pyreft_iv.rotate_layer.weight = iv.project.T.clone()  # goes through the orthogonal parametrisation
        pyreft_iv.learned_source.weight.copy_(iv.source.weight)
        pyreft_iv.learned_source.bias.copy_(iv.source.bias)
    torch.testing.assert_close(pyreft_iv.rotate_layer.weight, iv.project.T, atol=1e-5, rtol=0)


def test_loreft_equals_pyreft_intervention():
    pyreft = _pyreft()
    model, _, handle = _apply("tiny-llama", loreft, r=4)
    _randomise(handle)
    iv = handle.layers["reft"]["layer0"]
    theirs = pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=4, dtype=torch.float32)
    _copy_to_pyreft(iv, theirs)
    h = torch.randn(3, 7, 64)
    torch.testing.assert_close(iv(h), theirs(h), atol=1e-5, rtol=1e-5)


def test_loreft_model_equals_pyreft_model():
    """The whole model: pyreft's ReftModel (pyvene hooks, positions given by hand) and ours, the same weights."""
    pyreft = _pyreft()
    model, tok, handle = _apply("tiny-llama", loreft, r=2, positions="f2+l3")
    _randomise(handle)
    texts = ["Hello there, tiny model.", "What is 2 + 2?", "Bye"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
    base, _ = tiny("tiny-llama")
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": 2,
             "intervention": pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=2, dtype=torch.float32)}
            for i in range(2)]
    theirs = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=reps))
    for i, iv in enumerate(theirs.interventions.values()):
        _copy_to_pyreft(handle.layers["reft"][f"layer{i}"], iv[0] if isinstance(iv, tuple | list) else iv)
    locations = []
    for n in batch["attention_mask"].sum(1).tolist():
        first, last = min(2, n // 2), min(3, n // 2)
        row = list(range(first)) + list(range(n - last, n))
        locations.append(row + [row[-1]] * (5 - len(row)))  # pyvene needs equal counts: a repeated position
        # is gathered from the same h and written back with the same Φ(h), so it is edited once
    with torch.no_grad():
        _, out = theirs(base=dict(batch), unit_locations={"sources->base": (None, [locations] * 2)}, subspaces=None)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], ours[mask], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------------


def _positions(spans):
    return {k: sorted(zip(r.tolist(), c.tolist(), strict=True)) for k, (r, c) in spans.items()}


def test_positions_per_row_on_either_padding_side():
    right = torch.tensor([[1] * 10 + [0] * 2, [1] * 5 + [0] * 7])
    left = right.flip(1)
    got = _positions(reft.prompt_spans(right, None, 3, 2, tied=False))
    assert got == {"first": [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], "last": [(0, 8), (0, 9), (1, 3), (1, 4)]}
    got = _positions(reft.prompt_spans(left, None, 3, 2, tied=False))
    assert got == {"first": [(0, 2), (0, 3), (0, 4), (1, 7), (1, 8)], "last": [(0, 10), (0, 11), (1, 10), (1, 11)]}
    tied = _positions(reft.prompt_spans(right, torch.tensor([6, 5]), 3, 2, tied=True))
    assert tied == {"all": [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (1, 0), (1, 1), (1, 3), (1, 4)]}


@pytest.mark.parametrize(("length", "n", "m", "first", "last"), [
    (20, 7, 7, 7, 7), (9, 7, 7, 4, 4), (5, 7, 7, 2, 2), (1, 7, 7, 0, 0), (3, 7, 0, 3, 0), (3, 0, 7, 0, 3)])
def test_short_prompts_are_clamped_like_pyreft(length, n, m, first, last):
    n_b, m_b = reft.clamp_spans(torch.tensor([length]), n, m)
    assert (int(n_b), int(m_b)) == (first, last)


def test_prompt_length_from_labels():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100],  # right padded, prompt 3
                           [-100, -100, -100, -100, 7, 8],  # left padded by 1, prompt 3
                           [4, 5, 6, 7, -100, -100]])  # train_on_prompt: no split -> whole row
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert prompt_lengths_from_labels(labels, mask).tolist() == [3, 3, 4]


# --------------------------------------------------------------------------------------------------------------
# Batches against unbatched runs and the hand-written model-level reference
# --------------------------------------------------------------------------------------------------------------


def _examples(tok):
    pairs = [("Question: what is 12 + 30? Answer:", " 42"), ("Hi:", " hello there friend"),
             ("Sort: c b a ->", " a b c"), ("A:", " B")]
    out = []
    for p, r in pairs:
        pi, ri = tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]
        out.append(Example(input_ids=pi + ri, labels=[IGNORE_INDEX] * len(pi) + ri))
    return out


def _reference_logits(model, handle, ids, prompt_len):
    """One example, no padding: the plain model with hooks that apply the paper's Φ at hand-computed positions."""
    cfg = handle.config
    n, m = cfg.spans
    cap = prompt_len // 2 if n and m else prompt_len
    first, last = list(range(min(n, cap))), list(range(prompt_len - min(m, cap), prompt_len))
    layers = reft.decoder_layers(model)
    hooks = []
    for key, iv in handle.layers["reft"].items():
        layer = int(key[5:].split("_")[0])
        where = {"layer": first + last, "first": first, "last": last}[key.split("_")[-1] if "_" in key else "layer"]

        def hook(mod, args, out, iv=iv, where=where):
            h = out.clone()
            act = ACTS[cfg.activation]
            h[0, where] = paper_phi(out[0, where], iv.source.weight, iv.source.bias, iv.project, act, cfg.orthogonal)
            return h
        hooks.append(layers[layer].register_forward_hook(hook))
    try:
        with handle.disabled(), torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", VARIANTS)
@pytest.mark.parametrize("options", [{"positions": "f3+l2"}, {"positions": "f2+l3", "tied": False, "layers": [1]}],
                         ids=["tied", "untied"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_row_of_a_batch_equals_its_unbatched_run_and_the_reference(arch, module, options, side):
    model, tok, handle = _apply(arch, module, r=3, **options)
    _randomise(handle)
    examples = _examples(tok)
    batch = collate(examples, tok.pad_token_id, padding_side=side)
    with torch.no_grad(), prompt_lengths(prompt_lengths_from_labels(batch["labels"], batch["attention_mask"])):
        mask = batch["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate does: GPT-2's absolute positions
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
    for row, ex in enumerate(examples):
        real = batch["attention_mask"][row].bool()
        single = collate([ex], tok.pad_token_id)
        with torch.no_grad(), prompt_lengths(prompt_lengths_from_labels(single["labels"], None)):
            alone = model(input_ids=single["input_ids"]).logits[0]
        torch.testing.assert_close(logits[row][real], alone, atol=1e-5, rtol=1e-5)
        prompt_len = next(i for i, x in enumerate(ex.labels) if x != IGNORE_INDEX)
        torch.testing.assert_close(alone, _reference_logits(model, handle, ex.input_ids, prompt_len),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", VARIANTS)
def test_training_loss_of_a_batch_is_the_sum_of_unbatched_losses(module):
    model, tok, handle = _apply("tiny-llama", module)
    _randomise(handle)
    examples = _examples(tok)
    total, count = nll_sum(model, collate(examples, tok.pad_token_id))
    parts = [nll_sum(model, collate([e], tok.pad_token_id)) for e in examples]
    torch.testing.assert_close(total, sum(p[0] for p in parts), atol=1e-4, rtol=1e-5)
    assert count == sum(p[1] for p in parts)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _count_calls(handle):
    calls = []
    hooks = [iv.register_forward_hook(lambda *a: calls.append(1)) for iv in handle.layers["reft"].values()]
    return calls, hooks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", VARIANTS)
def test_cached_generation_equals_recomputation_with_the_prompt_edited(arch, module):
    """Left-padded batch with the KV cache: every step's logits equal a cache-free forward of prompt + generated
    tokens in which the interventions act on the prompt only; decode steps run no intervention."""
    model, tok, handle = _apply(arch, module, positions="f2+l2", tied=False)
    _randomise(handle)
    texts = ("Hello there", "A b", "What is 2 + 2? It is")
    tok.padding_side = "left"
    batch = tok(list(texts), return_tensors="pt", padding=True)
    calls, hooks = _count_calls(handle)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    assert len(calls) == len(handle.layers["reft"])  # once per intervention, in the prefill
    for h in hooks:
        h.remove()
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    for row, text in enumerate(texts):
        prompt = tok(text)["input_ids"]
        seq = prompt + new[row].tolist()
        with torch.no_grad(), prompt_lengths(torch.tensor([len(prompt)])):
            full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[row], full[len(prompt) - 1 + step], atol=1e-4, rtol=0)
    prompts = [tok(t)["input_ids"] for t in texts]
    batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=8))
    single = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert [g.text for g in batched] == [g.text for g in single]


def test_loglik_scoring_edits_the_context_only():
    from tunelab.eval.loglik import continuation_logprobs, encode_pair

    model, tok, handle = _apply("tiny-llama", loreft, positions="f2+l2")
    _randomise(handle)
    ctx, cont = "Question: is the sky blue? Answer:", " yes it is"
    (lp, n), = continuation_logprobs(model, tok, [(ctx, cont)])
    c, y = encode_pair(tok, ctx, cont)
    with torch.no_grad(), prompt_lengths(torch.tensor([len(c)])):
        logits = model(input_ids=torch.tensor([c + y[:-1]])).logits[0, len(c) - 1:]
    assert n == len(y)
    assert lp == pytest.approx(float(logits.log_softmax(-1).gather(1, torch.tensor(y)[:, None]).sum()), abs=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Training, saving, hooks, errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", VARIANTS)
def test_training_run_keeps_r_orthonormal_saves_and_loads_back(tmp_path, module):
    from tunelab.loading import load_run
    from tunelab.train.loop import train

    name = module.Config.method
    options = {"r": 4, "positions": "f3+l3", "tied": False}
    cfg = {
        "model": {"name": "tiny-llama", "dtype": "fp32"},
        "method": {"name": name, **options},
        "data": {"train": "synthetic:arith:train:32", "template": "plain", "max_length": 48},
        "train": {"lr": 2e-2, "max_steps": 4, "batch_size": 8, "seed": 1, "progress": False, "save_every": 2},
        "output_dir": str(tmp_path / "run"),
    }
    res = train(config_from_dict(cfg))
    assert res.trainable_params == module.num_parameters(tiny("tiny-llama")[0], module.Config(**options))
    adapter = load_file(str(res.run_dir / "adapter.safetensors"))
    assert len(adapter) == 2 * 2 * 3  # 2 layers x (first, last) x (project, W, b)
    torch.manual_seed(0)
    init = module.apply(tiny("tiny-llama")[0], module.Config(**options)).state_dict()
    for key, value in adapter.items():
        assert not torch.allclose(value, init[key]), f"{key} did not train"
        if key.endswith("project") and module is loreft:
            torch.testing.assert_close(value @ value.T, torch.eye(4), atol=1e-5, rtol=0)
    model, tok, handle, _ = load_run(res.run_dir)
    for key, value in adapter.items():
        torch.testing.assert_close(handle.state_dict()[key], value)


def test_remove_takes_off_exactly_its_own_hooks():
    model, tok = tiny("tiny-gpt2")
    layers = reft.decoder_layers(model)
    body_hook = model.base_model.register_forward_pre_hook(lambda m, a: None)
    layer_hook = layers[1].register_forward_hook(lambda m, a, o: None)
    names = {n for n, _ in model.named_parameters()}
    handle = loreft.apply(model, loreft.Config(r=2))
    assert len(model.base_model._forward_pre_hooks) == 2 and len(layers[1]._forward_hooks) == 2
    handle.remove()
    assert list(model.base_model._forward_pre_hooks) == [body_hook.id]
    assert list(layers[1]._forward_hooks) == [layer_hook.id] and not layers[0]._forward_hooks
    assert {n for n, _ in model.named_parameters()} == names


def test_packed_rows_are_refused_with_what_to_do():
    model, tok, _ = _apply("tiny-llama", loreft)
    batch = collate_packed(_examples(tok), [[0, 1], [2, 3]], tok.pad_token_id)
    with pytest.raises(MethodError, match="data.packing: false"):
        nll_sum(model, batch)


@pytest.mark.parametrize(("options", "match"), [
    ({"positions": "first7"}, "not of the form 'f<n>\\+l<m>'"),
    ({"positions": "f0+l0"}, "selects no token"),
    ({"layers": "some"}, "'all' or a list of layer indices"),
    ({"r": 0}, "r must be at least 1"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_config_errors_say_what_works(options, match):
    with pytest.raises(ConfigError, match=match):
        loreft.Config(**options)


@pytest.mark.parametrize(("options", "match"), [({"layers": [0, 5]}, "indices in 0..1"), ({"r": 65}, "r <= 64")])
def test_apply_errors_name_the_model_limits(options, match):
    model, _ = tiny("tiny-llama")
    with pytest.raises(MethodError, match=match):
        direft.apply(model, direft.Config(**options))


def test_parameter_count_of_the_benchmark_setting():
    """SmolLM2-135M (d = 576, 30 layers), r = 4, all layers, tied: 30 · (2·4·576 + 4) = 138,360; untied 2×."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=8, vocab_size=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert loreft.num_parameters(model, loreft.Config(r=4)) == 138_360
    assert direft.num_parameters(model, direft.Config(r=4, tied=False)) == 276_720


@pytest.mark.parametrize("module", VARIANTS)
def test_trained_format_scores_match_the_training_objective(module, tmp_path):
    """A ReFT model's log-likelihood of each option in the trained format (loglik styles 'trained' and
    'label-words') is minus the training objective's NLL of that option as the response (EOS not scored): the
    interventions sit on the prompt positions training used. Scored the lm-eval way (the prompt's final newline moved
    into the continuation) the last-position edits would shift by one token and these would differ."""
    import dataclasses

    from tunelab.data import Record, collate, tokenize_records
    from tunelab.eval.choices import TRAINED
    from tunelab.eval.harness import mc_items
    from tunelab.eval.loglik import continuation_logprobs, score_multiple_choice
    from tunelab.eval.tasks import TaskChoices, TaskSpec
    from tunelab.train.objective import nll_sum

    model, tok, handle = _apply("tiny-llama", module, r=2, positions="f1+l3")
    _randomise(handle)
    records = [Record("Which one is a planet? Options: Mars; the Sun; Io", "", "Mars", options=("Mars", "the Sun", "Io")),
               Record("Pick the even number. Options: 3; 8", "", "8", options=("3", "8"))]
    spec = TaskSpec(name="t", data="x", kind="loglik", format="mc-text", choices=TaskChoices(style=TRAINED))
    items = mc_items(spec, records, tok, "alpaca")
    results = score_multiple_choice(model, tok, items, batch_size=2)
    for record, item, res in zip(records, items, results, strict=True):
        expected = []
        for option in record.options:
            [ex], _ = tokenize_records([dataclasses.replace(record, output=option)], tok, template="alpaca")
            ex.labels[-1] = -100  # training's EOS target: not part of the option
            with torch.no_grad():
                total, _ = nll_sum(model, collate([ex], tok.pad_token_id))
            expected.append(-float(total))
        assert res.logprobs == pytest.approx(expected, abs=1e-4)
        lm_eval_way = [lp for lp, _ in continuation_logprobs(model, tok, [(item.context, o) for o in item.options])]
        assert max(abs(a - b) for a, b in zip(lm_eval_way, expected, strict=True)) > 1e-3
