"""Every method on every model family (tiny random configs of nine families, nothing downloaded): one optimizer step
lowers the loss on its batch, generation with the method applied runs and is batch-consistent, the target presets
resolve by module role, and a family without a role says so. The invariants matrix (test_invariants.py) checks
identity at init, merge, disable, gradients, save/load and the parameter count on the same families."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunelab.eval.generate import GenerationSettings, generate_ids
from tunelab.methods import REGISTRY, build_method_config, get_method
from tunelab.methods.core import MethodError, find_targets
from tunelab.models import TINY_MODELS
from tunelab.train.objective import IGNORE_INDEX, nll_sum

from conftest import batch_for, tiny

FAMILIES = sorted(TINY_MODELS)
OPTIONS = {"full": {}, "lora": {"r": 4, "alpha": 8}, "series": {"bottleneck": 8}, "parallel": {"bottleneck": 8},
           "prompt": {"num_tokens": 4}, "prefix": {"num_tokens": 4}, "loreft": {"r": 2, "positions": "f2+l2"},
           "direft": {"r": 2, "positions": "f2+l2"}, "random-mask": {"fraction": 0.05}}
STEP = 1e-2  # length of the gradient step (all trainable parameters together)


def test_every_method_is_exercised():
    assert set(OPTIONS) == set(REGISTRY)


def _loss(model, batch) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    total, count = nll_sum(model, {**batch, "labels": labels})
    return total / count


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_lowers_the_loss_and_generation_runs(family, method):
    model, tok = tiny(family)
    handle = get_method(method).apply(model, build_method_config({"name": method, **OPTIONS[method]}),
                                      tokenizer=tok)
    params = list(handle.trainable_parameters().values())
    batch = batch_for(tok)
    model.eval()  # no dropout: the two losses see the same function
    before = _loss(model, batch)
    before.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    assert norm > 0, "no gradient reached the method's parameters"
    with torch.no_grad():  # a gradient step of length STEP: first order, the loss must fall
        for p in params:
            if p.grad is not None:
                p -= STEP * p.grad / norm
        after = _loss(model, batch)
    assert torch.isfinite(before) and after < before, (family, method, float(before), float(after))
    prompts = [tok.encode("Hello"), tok.encode("What is 2 + 2?")]
    one_by_one = [generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=4, batch_size=1))[0]
                  for p in prompts]
    batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=4))
    assert all(g.n_tokens >= 1 for g in batched)
    assert [g.text for g in batched] == [g.text for g in one_by_one]  # padding in a batch changes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_target_presets_resolve_by_role(family):
    model, _ = tiny(family)
    attention, mlp = find_targets(model, "attention"), find_targets(model, "mlp")
    layers = model.config.num_hidden_layers
    assert attention and mlp and not set(attention) & set(mlp)
    assert len(attention) % layers == 0 and len(mlp) % layers == 0
    everything = set(find_targets(model, "all-linear"))
    assert set(attention) | set(mlp) == everything  # a decoder's linears are its attention's and its MLP's


def test_a_family_without_the_role_says_so():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(MethodError, match=r"target preset .attention.: no attention module found in Odd"):
        find_targets(Odd(), "attention")
