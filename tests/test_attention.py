"""Attention in fp32 under bf16 autocast (tunelab.train.attention): what it computes and where it is switched on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_train import cfg_dict
from tunelab.config import config_from_dict
from tunelab.train.attention import FP32_SDPA, use_fp32_attention

from conftest import batch_for, tiny


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """Record the dtype of every query that reaches torch's scaled_dot_product_attention."""
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_fp32_attention_under_autocast_matches_an_fp32_reference(arch, sdpa_dtypes):
    """Under autocast the kernel sees fp32 q/k/v; the logits match a run whose attention is fp32 by construction
    (a model with fp32 weights and no autocast is the upper bound of precision) at least as well as native sdpa."""
    model, tok = tiny(arch, "bf16")
    batch = batch_for(tok)  # two lengths: padding and an attention mask are exercised
    reference, _ = tiny(arch, "fp32")
    with torch.no_grad():
        exact = reference(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = model(**batch).logits.float()
        restore = use_fp32_attention(model)
        assert model.config._attn_implementation == FP32_SDPA
        sdpa_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(**batch).logits.float()
    assert sdpa_dtypes and set(sdpa_dtypes) == {torch.float32}
    keep = batch["attention_mask"].bool()
    err_ours = (ours - exact)[keep].abs().max()
    err_native = (native - exact)[keep].abs().max()
    assert err_ours <= err_native * 1.5 + 1e-3
    restore()
    assert model.config._attn_implementation == "sdpa"


def test_outside_autocast_it_is_plain_sdpa(sdpa_dtypes):
    model, tok = tiny("tiny-llama", "bf16")
    batch = batch_for(tok)
    with torch.no_grad():
        before = model(**batch).logits
        use_fp32_attention(model)
        sdpa_dtypes.clear()
        after = model(**batch).logits
    assert torch.equal(before, after) and set(sdpa_dtypes) == {torch.bfloat16}


def test_other_implementations_are_left_alone():
    model, _ = tiny("tiny-llama", "fp32")
    model.set_attn_implementation("eager")
    use_fp32_attention(model)()
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(("dtype", "option", "expected"),
                         [("bf16", True, FP32_SDPA), ("bf16", False, "sdpa"), ("fp32", True, "sdpa")])
def test_trainer_switches_only_for_bf16_compute_and_restores(tmp_path, dtype, option, expected):
    from tunelab.train.loop import Trainer

    cfg = config_from_dict(cfg_dict(tmp_path, model={"name": "tiny-llama", "dtype": dtype},
                                    train__fp32_attention=option, train__max_steps=1))
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.model.config._attn_implementation == "sdpa"  # restored after the run
    t2 = Trainer(config_from_dict(cfg_dict(tmp_path / "b", model={"name": "tiny-llama", "dtype": dtype},
                                           train__fp32_attention=option)))
    t2.setup()
    assert t2.model.config._attn_implementation == expected
