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


# -- the compiled grouped-query kernel (train.compiled_attention) ----------------------------------------------
from tunelab.train import attention as attn  # noqa: E402


def _reference(q, k, v, keep, scale):
    """fp32 attention by hand, k and v repeated per query head."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~(keep[:, None] if keep.dim() == 3 else keep), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_attention_matches_an_fp32_reference(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 6, 8, dtype=torch.bfloat16)
    k, v = torch.randn(2, 3, kv_heads, 6, 8, dtype=torch.bfloat16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    padded = causal.expand(3, 6, 6).clone()
    padded[1, :, :2] = False  # left padding in row 1: its first two queries keep no key at all
    for keep in (causal, padded):
        out = attn.grouped_attention(q, k, v, keep, 8 ** -0.5).float()
        ref = _reference(q, k, v, keep, 8 ** -0.5)
        assert torch.isfinite(out).all()  # rows with no key kept: uniform weights, not NaN
        rows = keep.expand(3, 6, 6).any(-1)[:, None].expand(3, 4, 6)
        torch.testing.assert_close(out[rows], ref[rows], atol=3e-2, rtol=3e-2)


def test_compiled_attention_in_a_model_matches_fp32_as_well_as_native_sdpa(sdpa_dtypes):
    """Under autocast the compiled kernel runs (torch's sdpa is not called) and the logits are as close to an fp32
    model's as native bf16 sdpa's; padding and the attention mask are exercised."""
    model, tok = tiny("tiny-llama", "bf16")
    batch = batch_for(tok)
    reference, _ = tiny("tiny-llama", "fp32")
    with torch.no_grad():
        exact = reference(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = model(**batch).logits.float()
        restore = use_fp32_attention(model, compiled=True)
        assert model.config._attn_implementation == attn.COMPILED_ATTENTION
        sdpa_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(**batch).logits.float()
    assert not sdpa_dtypes
    keep = batch["attention_mask"].bool()
    assert (ours - exact)[keep].abs().max() <= (native - exact)[keep].abs().max() * 1.5 + 1e-3
    restore()
    assert model.config._attn_implementation == "sdpa"


def test_compiled_attention_gradients_match_fp32_sdpa():
    model, tok = tiny("tiny-llama", "bf16")
    batch = batch_for(tok)
    grads = []
    for compiled in (False, True):
        restore = use_fp32_attention(model, compiled=compiled)
        model.zero_grad()
        model.model.embed_tokens.weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).logits.float().pow(2).mean().backward()
        grads.append(model.model.embed_tokens.weight.grad.float())
        restore()
    torch.testing.assert_close(grads[1], grads[0], atol=2e-2 * grads[0].abs().max().item(), rtol=0.05)


def test_compiled_attention_falls_back_to_fp32_sdpa_where_it_does_not_apply(sdpa_dtypes):
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q = torch.randn(1, 4, 5, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attn.compiled_attention_under_autocast(module, q, k, k, None)
        assert not sdpa_dtypes
        # fp32 q/k/v (an fp32 residual stream, as in full tuning): the compiled kernel on their bf16 casts
        out32, _ = attn.compiled_attention_under_autocast(module, q.float(), k.float(), k.float(), None)
        assert not sdpa_dtypes and out32.dtype == torch.bfloat16
        torch.testing.assert_close(out32, out, atol=0, rtol=0)
        attn.compiled_attention_under_autocast(module, q, k, k, None, dropout=0.1)  # dropout: flash kernel
        assert sdpa_dtypes == [torch.float32]
        float_mask = torch.zeros(1, 1, 5, 5)  # additive masks may carry biases: flash kernel
        attn.compiled_attention_under_autocast(module, q, k, k, float_mask)
        assert sdpa_dtypes == [torch.float32] * 2
    attn.compiled_attention_under_autocast(module, q, k, k, None)  # outside autocast: plain sdpa
    assert sdpa_dtypes[-1] == torch.bfloat16


def test_trainer_uses_the_compiled_kernel_when_asked(tmp_path):
    from tunelab.train.loop import Trainer

    trainer = Trainer(config_from_dict(cfg_dict(tmp_path, model={"name": "tiny-llama", "dtype": "bf16"},
                                                train__compiled_attention=True)))
    trainer.setup()
    assert trainer.model.config._attn_implementation == attn.COMPILED_ATTENTION
    auto = Trainer(config_from_dict(cfg_dict(tmp_path / "b", model={"name": "tiny-llama", "dtype": "bf16"})))
    auto.setup()
    assert auto.model.config._attn_implementation == FP32_SDPA  # auto: tiny models stay off (compile cost)
