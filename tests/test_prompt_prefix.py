"""Prompt tuning and prefix tuning against independent references.

Oracles: plain torch (prompt tuning = the soft embeddings concatenated before the input embeddings; prefix tuning =
a transformers cache filled by hand), peft's PromptTuning / PrefixTuning with the same weights, and generation with
the KV cache against an argmax loop that recomputes the whole sequence without a cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DynamicCache

from tunelab.config import ConfigError, config_from_dict
from tunelab.eval.generate import GenerationSettings, generate_ids
from tunelab.methods import prefix, prompt
from tunelab.methods.core import MethodError
from tunelab.train.objective import IGNORE_INDEX, nll_sum

from conftest import batch_for, tiny

ARCHS = ["tiny-llama", "tiny-gpt2"]
TEXTS = ("Hello there, tiny model.", "Hi", "What is 2 + 2? It is 4.")  # right-padded, three lengths


def _soft(handle) -> torch.Tensor:
    return handle.layers[prompt.MODULE_NAME].embedding


def _randomise(handle, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _prompt_reference(model, handle, batch) -> torch.Tensor:
    """Logits of the input positions when [S ; E(x)] goes through the plain model (method disabled)."""
    soft = _soft(handle).detach()
    n, p = batch["input_ids"].shape[0], soft.shape[0]
    embeds = torch.cat([soft.expand(n, -1, -1), model.get_input_embeddings()(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(n, p, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad(), handle.disabled():
        return model(inputs_embeds=embeds, attention_mask=mask).logits[:, p:]


def _prefix_reference(model, handle, batch) -> torch.Tensor:
    """Logits with the prefix put in a DynamicCache by hand, the mask extended and positions starting at P."""
    table = handle.layers[prefix.MODULE_NAME].table().detach()
    n, p = batch["input_ids"].shape[0], table.shape[3]
    cache = DynamicCache(config=model.config)
    for layer in range(table.shape[0]):
        cache.update(table[layer, 0].expand(n, -1, -1, -1), table[layer, 1].expand(n, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(n, p, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad(), handle.disabled():
        return model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits


def _close_on_tokens(actual, expected, mask, atol=1e-5):
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Plain-torch references
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_equals_concatenated_soft_embeddings(arch):
    model, tok = tiny(arch)
    handle = prompt.apply(model, prompt.Config(num_tokens=6))
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
        with handle.disabled():
            base = model(**batch).logits
    expected = _prompt_reference(model, handle, batch)
    _close_on_tokens(ours, expected, batch["attention_mask"])
    assert not torch.allclose(ours, base, atol=1e-3), "the soft prompt should change the output"


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_loss_is_the_reference_loss_on_input_tokens_only(arch):
    model, tok = tiny(arch)
    handle = prompt.apply(model, prompt.Config(num_tokens=4))
    batch = batch_for(tok, TEXTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    total, count = nll_sum(model, {**batch, "labels": labels})
    ref = _prompt_reference(model, handle, batch)  # logits of the input positions only: no loss on soft tokens
    expected = F.cross_entropy(ref[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-5)
    total.backward()
    assert _soft(handle).grad is not None and _soft(handle).grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_equals_hand_filled_cache(arch, reparam):
    model, tok = tiny(arch)
    handle = prefix.apply(model, prefix.Config(num_tokens=5, reparam=reparam, reparam_hidden=16))
    _randomise(handle)
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
    _close_on_tokens(ours, _prefix_reference(model, handle, batch), batch["attention_mask"])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_from_text_equals_prompt_from_the_same_text(arch):
    """A prefix initialised with the keys/values of a text is prompt tuning with that text's embeddings."""
    model, tok = tiny(arch)
    handle = prompt.apply(model, prompt.Config(num_tokens=7, init="text", init_text="Be brief."), tokenizer=tok)
    other, _ = tiny(arch)
    prefix.apply(other, prefix.Config(num_tokens=7, init="text", init_text="Be brief."), tokenizer=tok)
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        _close_on_tokens(other(**batch).logits, model(**batch).logits, batch["attention_mask"])
    ids = tok("Be brief.", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 2)[:7]]
    torch.testing.assert_close(_soft(handle), expected)


# --------------------------------------------------------------------------------------------------------------
# peft as a second oracle
# --------------------------------------------------------------------------------------------------------------


def _peft_logits(arch, peft_config, copy) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    base, tok = tiny(arch)
    pm = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        copy(pm.prompt_encoder["default"])
    pm.eval()
    with torch.no_grad():
        return pm(**batch_for(tok, TEXTS)).logits, pm


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_same_as_peft_prompt_tuning(arch):
    peft = pytest.importorskip("peft")
    model, tok = tiny(arch)
    handle = prompt.apply(model, prompt.Config(num_tokens=5))
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    theirs, pm = _peft_logits(arch, cfg, lambda enc: enc.embedding.weight.copy_(_soft(handle)))
    _close_on_tokens(theirs[:, 5:], ours, batch["attention_mask"])  # peft also returns the soft positions
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == handle.num_trainable()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_same_as_peft_prefix_tuning(arch, reparam):
    peft = pytest.importorskip("peft")
    model, tok = tiny(arch)
    cfg = prefix.Config(num_tokens=4, reparam=reparam, reparam_hidden=16)
    handle = prefix.apply(model, cfg)
    _randomise(handle, scale=0.1)
    src = handle.layers[prefix.MODULE_NAME]
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits

    def copy(enc):
        if reparam:  # peft's prefix_projection: Embedding(P, d_kv) -> Linear -> Tanh -> Linear(2·L·d_kv)
            enc.embedding.weight.copy_(src.embedding)
            for i in (0, 2):
                enc.transform[i].weight.copy_(src.mlp[i].weight)
                enc.transform[i].bias.copy_(src.mlp[i].bias)
        else:  # peft's table is [P, (layer, key/value, head, d_head)]
            enc.embedding.weight.copy_(src.prefix.permute(3, 0, 1, 2, 4).reshape(4, -1))

    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=reparam,
                                   encoder_hidden_size=16)
    theirs, pm = _peft_logits(arch, pcfg, copy)
    _close_on_tokens(theirs, ours, batch["attention_mask"])
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_peft == handle.num_trainable() == prefix.num_parameters(tiny(arch)[0], cfg)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _recompute_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence goes through the model at every step."""
    seq, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            tok = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


METHODS = [
    pytest.param(prompt, {"num_tokens": 7}, id="prompt"),
    pytest.param(prefix, {"num_tokens": 6}, id="prefix"),
    pytest.param(prefix, {"num_tokens": 3, "reparam": True, "reparam_hidden": 16}, id="prefix-reparam"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("module", "options"), METHODS)
def test_cached_batched_generation_equals_recomputation(arch, module, options):
    """Left-padded batch, KV cache: every step's logits equal a cache-free forward over the prompt alone."""
    model, tok = tiny(arch)
    handle = module.apply(model, module.Config(**options))
    _randomise(handle, scale=0.2)
    texts = ("Hello there", "A", "What is 2 + 2? It is")
    tok.padding_side = "left"
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    for row, text in enumerate(texts):
        seq = tok(text)["input_ids"] + new[row].tolist()
        with torch.no_grad():
            full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        n = len(seq) - new.shape[1]
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[row], full[n - 1 + step], atol=1e-4, rtol=0)
    prompts = [tok(t)["input_ids"] for t in texts]
    batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=8))
    single = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert [g.text for g in batched] == [g.text for g in single]
    for p, g in zip(prompts, batched, strict=True):
        ref = _recompute_greedy(model, p, 8, tok.eos_token_id)
        assert g.text == tok.decode(ref, skip_special_tokens=True) and g.n_tokens == len(ref)


@pytest.mark.parametrize(("module", "options"), METHODS[:2])
def test_beam_search_batched_equals_single(module, options):
    model, tok = tiny("tiny-llama")
    module.apply(model, module.Config(**options))
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "A", "What is 2 + 2? It is")]
    beams = GenerationSettings(max_new_tokens=6, num_beams=3, batch_size=8)
    batched = generate_ids(model, tok, prompts, beams)
    single = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=6, num_beams=3, batch_size=1))
    assert [g.text for g in batched] == [g.text for g in single]


# --------------------------------------------------------------------------------------------------------------
# Lengths, packing, initialisation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_tokens", [1, 300])
def test_prompt_lengths_from_one_to_hundreds(arch, num_tokens):
    model, tok = tiny(arch)  # 512 positions
    handle = prompt.apply(model, prompt.Config(num_tokens=num_tokens))
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
    _close_on_tokens(ours, _prompt_reference(model, handle, batch), batch["attention_mask"], atol=2e-5)
    out = generate_ids(model, tok, [batch["input_ids"][1, :2].tolist()], GenerationSettings(max_new_tokens=3))
    assert out[0].n_tokens == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_of_300_tokens(arch):
    model, tok = tiny(arch)
    handle = prefix.apply(model, prefix.Config(num_tokens=300, init="vocab"))
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        _close_on_tokens(model(**batch).logits, _prefix_reference(model, handle, batch), batch["attention_mask"])


@pytest.mark.parametrize("arch", ARCHS)
def test_context_limits_are_explained(arch):
    model, tok = tiny(arch)
    with pytest.raises(MethodError, match="num_tokens=512 leaves no room"):
        prompt.apply(model, prompt.Config(num_tokens=512))
    prefix.apply(model, prefix.Config(num_tokens=500))
    with pytest.raises(MethodError, match="at most 12 tokens"):
        model(input_ids=torch.ones(1, 13, dtype=torch.long))
    model(input_ids=torch.ones(1, 12, dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("module", "options"), METHODS[:2])
def test_packed_rows_see_the_prefix_and_only_their_own_tokens(arch, module, options):
    model, tok = tiny(arch)
    module.apply(model, module.Config(**options))
    a, b = tok("Hello there")["input_ids"], tok("What is 2+2")["input_ids"]
    packed = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    labels = packed.clone()
    labels[0, len(a)] = IGNORE_INDEX  # the first token of b is not predicted from a
    with torch.no_grad():
        total, count = nll_sum(model, {"input_ids": packed, "position_ids": positions, "labels": labels})
        ta, na = nll_sum(model, {"input_ids": torch.tensor([a]), "labels": torch.tensor([a])})
        tb, nb = nll_sum(model, {"input_ids": torch.tensor([b]), "labels": torch.tensor([b])})
    assert count == na + nb
    torch.testing.assert_close(total, ta + tb, atol=1e-4, rtol=1e-5)


def test_init_vocab_samples_regular_tokens_and_random_matches_embedding_scale():
    torch.manual_seed(0)
    model, _ = tiny("tiny-llama")
    handle = prompt.apply(model, prompt.Config(num_tokens=200))
    table = model.get_input_embeddings().weight
    rows = [int((table == row).all(dim=1).nonzero()[0]) for row in _soft(handle)]
    assert len(set(rows)) == 200 and max(rows) < 256  # distinct, never pad / bos / eos (ids 256-258)
    few = prompt.apply(tiny("tiny-llama")[0], prompt.Config(num_tokens=400, vocab_top=10))  # more than the pool
    assert _soft(few).shape == (400, 64)
    rnd = prompt.apply(tiny("tiny-llama")[0], prompt.Config(num_tokens=300, init="random"))
    assert _soft(rnd).std().item() == pytest.approx(table.std().item(), rel=0.1)


@pytest.mark.parametrize("module", [prompt, prefix])
def test_init_text_takes_the_tokenizer_from_the_caller(module):
    """The caller passes the tokenizer (the trainer and load_run do); without one, init: text says so — no method
    reloads the model to find it."""
    model, tok = tiny("tiny-gpt2")
    cfg = module.Config(num_tokens=3, init="text", init_text="Summarise:")
    with pytest.raises(MethodError, match="init: text needs the model's tokenizer"):
        module.apply(model, cfg)
    handle = module.apply(model, cfg, tokenizer=tok)
    if module is prompt:
        ids = tok("Summarise:", add_special_tokens=False)["input_ids"][:3]
        torch.testing.assert_close(_soft(handle), model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize(
    ("module", "options", "match"),
    [
        (prompt, {"num_tokens": 0}, "num_tokens must be at least 1"),
        (prompt, {"init": "text"}, "init: text needs init_text"),
        (prompt, {"init_text": "hi"}, "only used with init: text"),
        (prefix, {"reparam": True, "init": "vocab"}, "use init: random with reparam"),
        (prefix, {"reparam": True, "reparam_hidden": 0}, "reparam_hidden must be at least 1"),
    ],
)
def test_config_errors_say_what_works(module, options, match):
    with pytest.raises(ConfigError, match=match):
        module.Config(**options)


# --------------------------------------------------------------------------------------------------------------
# Save / load, folding the reparameterisation, remove
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_reparam_folds_into_plain_prefix(arch):
    model, tok = tiny(arch)
    cfg = prefix.Config(num_tokens=4, reparam=True, reparam_hidden=16)
    handle = prefix.apply(model, cfg)
    _randomise(handle, scale=0.1)
    batch = batch_for(tok, TEXTS)
    with torch.no_grad():
        before = model(**batch).logits
    training_state = handle.state_dict()  # what checkpoints keep: the MLP, so training can resume
    assert {k.split(".")[1] for k in training_state} == {"embedding", "mlp"}
    saved = handle.inference_state_dict()  # what a finished run keeps
    assert set(saved) == {"prefix_tuning.prefix"} and saved["prefix_tuning.prefix"].shape == (2, 2, *{
        "tiny-llama": (2, 4, 16), "tiny-gpt2": (4, 4, 16)}[arch])
    assert [n for n, _ in model.named_parameters() if n.startswith("prefix_tuning")] == ["prefix_tuning.prefix"]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-6, rtol=0)
    for state in (saved, training_state):  # a fresh reparam handle loads either form
        fresh, _ = tiny(arch)
        prefix.apply(fresh, cfg).load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(fresh(**batch).logits, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("module", "options"), METHODS)
def test_remove_takes_off_only_what_the_method_added(module, options):
    model, tok = tiny("tiny-gpt2")
    mine = model.base_model.register_forward_pre_hook(lambda m, a: None)
    names = {n for n, _ in model.named_parameters()}
    handle = module.apply(model, module.Config(**options))
    assert {n for n, _ in model.named_parameters()} - names
    handle.remove()
    assert {n for n, _ in model.named_parameters()} == names
    assert list(model.base_model._forward_pre_hooks) == [mine.id]


def test_cache_filled_without_the_prefix_is_refused():
    model, tok = tiny("tiny-llama")
    handle = prefix.apply(model, prefix.Config(num_tokens=2))
    ids = torch.tensor([tok("Hello")["input_ids"]])
    with torch.no_grad(), handle.disabled():
        cache = model(input_ids=ids, use_cache=True).cache
    with pytest.raises(MethodError, match="already holds 5 tokens but not the method's prefix"):
        model(input_ids=ids[:, -1:], cache=cache)


@pytest.mark.parametrize(("method", "options"), [("prompt", {"num_tokens": 4, "init": "text", "init_text": "Go"}),
                                                 ("prefix", {"num_tokens": 3, "reparam": True, "reparam_hidden": 8})])
def test_training_run_saves_and_loads_back(tmp_path, method, options):
    from tunelab.loading import load_run
    from tunelab.train.loop import train

    cfg = {
        "model": {"name": "tiny-llama", "dtype": "fp32"},
        "method": {"name": method, **options},
        "data": {"train": "synthetic:arith:train:16", "template": "plain", "max_length": 48, "packing": True},
        "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 4, "seed": 1, "progress": False, "save_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    res = train(config_from_dict(cfg))
    module = {"prompt": prompt, "prefix": prefix}[method]
    expected_count = module.num_parameters(tiny("tiny-llama")[0], module.Config(**options))
    assert res.trainable_params == expected_count
    adapter = load_file(str(res.run_dir / "adapter.safetensors"))
    checkpoint = load_file(str(next((res.run_dir / "checkpoints").glob("step-*")) / "trainable.safetensors"))
    if method == "prefix":  # folded when saved; checkpoints keep the MLP to resume training
        assert set(adapter) == {"prefix_tuning.prefix"} and "prefix_tuning.mlp.0.weight" in checkpoint
    else:
        assert set(adapter) == set(checkpoint) == {"prompt_tuning.embedding"}
    model, tok, handle, _ = load_run(res.run_dir)
    for key, value in adapter.items():
        torch.testing.assert_close(handle.state_dict()[key], value)
