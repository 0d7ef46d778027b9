"""tunelab.quant: code books, packing, blockwise quantization, QuantLinear, LoftQ, QLoRA/LoftQ training runs.

Reference oracles written here from the papers' equations (plain torch + the standard library's normal quantile),
bitsandbytes' NF4 table copied from its source, and peft's LoftQ SVD split when peft is installed.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.config import ConfigError, QuantizeSection, load_config
from tunelab.methods import lora
from tunelab.quant import NF4_BNB, QuantLinear, QuantSpec, codebook, dequantize, loftq, pack, quantize, unpack
from tunelab.quant.loftq import lowrank_factors, relative_error
from tunelab.quant.model import QuantError, layer_index, memory_report, quantize_model, spec_for
from tunelab.quant.quantizers import max_half_gap

from conftest import batch_for, tiny

# bitsandbytes/functional.py get_4bit_type("nf4"), verbatim
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def reference_nf(bits: int, offset: float = 0.9677083) -> list[float]:
    """QLoRA appendix E / bitsandbytes create_normal_map, with the standard library's normal quantile."""
    half = 2 ** (bits - 1)
    inv = statistics.NormalDist().inv_cdf

    def grid(n: int) -> list[float]:  # torch.linspace(offset, 0.5, n)[:-1] in fp32, as bitsandbytes builds it
        return [float(torch.tensor(offset + (0.5 - offset) * i / (n - 1), dtype=torch.float32)) for i in range(n - 1)]

    values = sorted([inv(p) for p in grid(half + 1)] + [0.0] + [-inv(p) for p in grid(half)])
    return [v / values[-1] for v in values]


def reference_quantize(w: torch.Tensor, values: torch.Tensor, block: int) -> torch.Tensor:
    """Ŵ = s_b · v_c, c = argmin_j |W/s_b − v_j|, s_b = max |W| over the block (plain torch, from the equation)."""
    flat = w.reshape(-1).double()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    s = blocks.abs().amax(1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    idx = ((blocks / s)[..., None] - values.double()).abs().argmin(-1)
    return (values.double()[idx] * s).reshape(-1)[: w.numel()].reshape(w.shape).float()


# --------------------------------------------------------------------------------------------------------------
# Code books and packing
# --------------------------------------------------------------------------------------------------------------


def test_nf4_is_the_bitsandbytes_table_and_follows_the_construction():
    assert NF4_BNB.tolist() == pytest.approx(BNB_NF4, abs=0)
    assert codebook("nf", 4).tolist() == pytest.approx(BNB_NF4, abs=0)
    assert reference_nf(4) == pytest.approx(BNB_NF4, abs=5e-7)  # fp32 linspace rounding
    from tunelab.quant.codebooks import nf_codebook

    assert nf_codebook(4).tolist() == pytest.approx(BNB_NF4, abs=2e-7)


@pytest.mark.parametrize("bits", [2, 8])
def test_nf_code_books(bits):
    cb = codebook("nf", bits)
    assert cb.tolist() == pytest.approx(reference_nf(bits), abs=1e-6)
    assert cb.numel() == 2**bits and cb.min() == -1 and cb.max() == 1 and 0.0 in cb.tolist()
    assert torch.all(cb[1:] > cb[:-1])
    if bits == 2:  # LoftQ's NF2 table
        assert cb.tolist() == pytest.approx([-1.0, 0.0, 0.33791, 1.0], abs=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_code_books_are_symmetric_uniform(bits):
    top = 2 ** (bits - 1) - 1
    assert codebook("int", bits).tolist() == pytest.approx([i / top for i in range(-top, top + 1)])


def test_unknown_code_book_says_what_exists():
    with pytest.raises(ValueError, match="use quant in"):
        codebook("fp", 4)


def test_pack_layout_and_round_trip():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x12]
    assert pack(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b11000110]
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (8 * 37,), generator=g).to(torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
        assert torch.equal(unpack(packed, bits), codes)


# --------------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quant", "bits"), [("nf", 4), ("nf", 2), ("int", 4), ("int", 8), ("int", 2)])
def test_quantize_matches_the_reference_and_the_error_bound(quant, bits):
    w = torch.randn(48, 70, generator=torch.Generator().manual_seed(1)) * 0.02
    spec = QuantSpec(quant, bits)
    got = dequantize(quantize(w, spec))
    torch.testing.assert_close(got, reference_quantize(w, spec.codebook(), 64), rtol=0, atol=1e-7)
    s = reference_block_absmax(w, 64)
    assert torch.all((w - got).abs() <= s * max_half_gap(spec) + 1e-7)


def reference_block_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block
    s = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block).abs().amax(1, keepdim=True)
    return s.expand(-1, block).reshape(-1)[: w.numel()].reshape(w.shape)


def test_memory_of_packed_codes():
    w = torch.randn(256, 512)
    for bits in (2, 4, 8):
        qt = quantize(w, QuantSpec("nf", bits))
        assert qt.codes.numel() == w.numel() * bits // 8 and qt.absmax.numel() == w.numel() // 64
    dq = quantize(w, QuantSpec("nf", 4, double_quant=True))
    assert dq.nbytes() < quantize(w, QuantSpec("nf", 4)).nbytes()
    assert dq.nbytes() / w.numel() * 8 == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


def test_double_quantization_keeps_scales_close():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    plain, dq = quantize(w, QuantSpec("nf", 4)), quantize(w, QuantSpec("nf", 4, double_quant=True))
    scale_err = (dq.scales() - plain.scales()).abs().max()
    span = (plain.scales() - plain.scales().mean()).abs().max()
    assert scale_err <= span / 127 / 2 + 1e-6  # INT-8 absmax: half a step
    assert relative_error(w, dequantize(dq)) < relative_error(w, dequantize(plain)) + 0.01


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 130), quant=st.sampled_from(["nf", "int"]),
       bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([4, 8, 12, 64]), dq=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quantizer_properties_on_odd_shapes(rows, cols, quant, bits, block, dq, seed):
    """Any shape (rows not a multiple of the block, one-row matrices): shape kept, codes within range, the error
    bound holds per element (with double quantization: up to the scales' own error), zeros stay zero."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[0, 0] = 0.0
    spec = QuantSpec(quant, bits, block, double_quant=dq)
    qt = quantize(w, spec)
    got = dequantize(qt)
    assert got.shape == w.shape and qt.codes.dtype == torch.uint8
    assert qt.codes.numel() == math.ceil(w.numel() / block) * block * bits // 8
    assert int(unpack(qt.codes, bits).max()) < spec.codebook().numel()
    s = reference_block_absmax(w, block)
    slack = (qt.scales().abs().max() * 2 / 127) if dq else 0.0
    assert torch.all((w - got).abs() <= (s + slack) * max_half_gap(spec) + slack + 1e-6)
    if not dq:
        assert got[0, 0] == 0.0
        torch.testing.assert_close(got, reference_quantize(w, spec.codebook(), block), rtol=0, atol=1e-6)


def test_spec_validation_names_the_rule():
    with pytest.raises(ValueError, match="multiple of 4 at 2 bits"):
        QuantSpec("nf", 2, block=6)
    with pytest.raises(ConfigError, match="quantize.bits must be 2, 4 or 8"):
        QuantizeSection(bits=3)


# --------------------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------------------


def _layer(bits=4, bias=True, d_in=96, d_out=40):
    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return lin, QuantLinear.from_linear(lin, QuantSpec("nf", bits))


def test_quant_linear_forward_and_input_gradient_match_the_dequantized_reference():
    lin, q = _layer()
    w_hat = dequantize(quantize(lin.weight, QuantSpec("nf", 4)))
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w_hat, lin.bias), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w_hat, rtol=1e-5, atol=1e-6)
    assert not list(p for p in q.parameters() if p.requires_grad)  # codes and scales are buffers
    assert q.codes.dtype == torch.uint8 and q.codes.grad is None


def test_quant_linear_does_not_save_the_dequantized_weight_for_backward():
    _, q = _layer(d_in=256, d_out=128)
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() >= 128 * 256 for t in saved), [t.shape for t in saved]


def test_quant_linear_bf16_autocast_runs_in_bf16():
    lin, q = _layer()
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, q.dequantize(), lin.bias)
    assert relative_error(ref, y.float()) < 0.02


def test_to_linear_is_the_dequantized_dense_layer():
    lin, q = _layer()
    dense = q.to_linear()
    x = torch.randn(2, 96)
    torch.testing.assert_close(dense(x), q(x))


# --------------------------------------------------------------------------------------------------------------
# LoftQ
# --------------------------------------------------------------------------------------------------------------


def _weight(d_out=96, d_in=128, seed=0):
    """A weight with a few strong directions plus heavy-tailed noise, like trained linear layers."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(d_out, 6, generator=g) @ torch.randn(6, d_in, generator=g) * 0.05
    return low + torch.distributions.StudentT(4).sample((d_out, d_in)) * 0.02


def reference_loftq(w, values, block, r, s, iters):
    """Li et al. Algorithm 1 with LoRA scaling s, from the equation (reference quantizer, full SVD)."""
    ba = torch.zeros_like(w)
    for _ in range(iters):
        q = reference_quantize(w - ba, values, block)
        u, sig, vh = torch.linalg.svd(w - q, full_matrices=False)
        b, a = u[:, :r] * (sig[:r] / s).sqrt(), (sig[:r] / s).sqrt()[:, None] * vh[:r]
        ba = s * b @ a
    return q, a, b


@pytest.mark.parametrize(("bits", "r", "alpha"), [(2, 8, 8), (4, 4, 32)])
def test_loftq_matches_the_reference(bits, r, alpha):
    w = _weight()
    s = alpha / r
    res = loftq(w, QuantSpec("nf", bits), r, s, iters=3)
    q, a, b = reference_loftq(w, codebook("nf", bits), 64, r, s, 3)
    # after T > 1 the quantized input W − s·B·A carries SVD round-off (LAPACK paths, threads): scales agree to fp32
    torch.testing.assert_close(dequantize(res.qweight), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s * res.B @ res.A, s * b @ a, rtol=1e-4, atol=1e-5)
    assert res.error == pytest.approx(relative_error(w, q + s * b @ a), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_loftq_error_decreases_with_iterations(bits):
    for seed in range(3):
        res = loftq(_weight(seed=seed), QuantSpec("nf", bits), 8, 2.0, iters=5)
        assert res.errors[0] < res.qlora_error
        assert res.errors[1] < res.errors[0] and res.errors[2] <= res.errors[1] * 1.01, res.errors
        # every T > 1 beats T = 1, but the alternation is not a descent method (q_N is not a projection onto a
        # convex set): at 2 bits the error can rise again after T = 3 (measured; see docs/methods/loftq.md)
        assert all(e < res.errors[0] for e in res.errors[1:]), res.errors


def test_alpha_not_equal_r_is_folded_into_the_factors():
    """s·B·A is the same rank-r approximation whatever α: the factors scale by 1/√s; peft's unscaled factors
    (exact only for α = r) would be off by the factor s."""
    w = _weight()
    spec = QuantSpec("nf", 2)
    one, four = loftq(w, spec, 8, 1.0, iters=2), loftq(w, spec, 8, 4.0, iters=2)
    torch.testing.assert_close(4.0 * four.B @ four.A, one.B @ one.A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(four.B, one.B / 2, rtol=1e-4, atol=1e-6)
    assert four.error == pytest.approx(one.error, rel=1e-5)
    wrong = relative_error(w, dequantize(one.qweight) + 4.0 * one.B @ one.A)  # peft's factors under s = 4
    assert wrong > 2 * one.error


def test_lowrank_split_matches_peft():
    pytest.importorskip("peft")
    from peft.utils.loftq_utils import _low_rank_decomposition

    residual = torch.randn(40, 72, generator=torch.Generator().manual_seed(5))
    a, b = lowrank_factors(residual, 6, 1.0)
    out = _low_rank_decomposition(residual, reduced_rank=6)
    torch.testing.assert_close(b @ a, out["L"] @ out["R"], rtol=1e-4, atol=1e-4)
    # the same √σ split (singular vectors are defined up to sign)
    torch.testing.assert_close(a.abs(), out["R"].abs(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.abs(), out["L"].abs(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_loftq_t1_beats_qlora_on_every_layer_and_moves_outputs_toward_full_precision(arch, bits):
    model, tok = tiny(arch)
    batch = batch_for(tok)
    with torch.no_grad():
        full = model(**batch).logits
    cfg = lora.Config(r=8, alpha=16)
    state = quantize_model(model, QuantizeSection(bits=bits, init="loftq", iters=1), lora.low_rank(cfg))
    assert all(r.loftq_error < r.qlora_error for r in state.report), [(r.name, r.loftq_error, r.qlora_error)
                                                                     for r in state.report]
    handle = lora.apply(model, cfg)
    state.init_adapters(handle, lora)
    with torch.no_grad():
        loftq_logits = model(**batch).logits
        with handle.disabled():
            qlora_logits = model(**batch).logits
    assert relative_error(full, loftq_logits) < relative_error(full, qlora_logits)


def test_init_adapters_refuses_another_rank():
    model, _ = tiny("tiny-llama")
    state = quantize_model(model, QuantizeSection(bits=4, init="loftq"), lora.low_rank(lora.Config(r=4, alpha=8)))
    handle = lora.apply(model, lora.Config(r=2, alpha=8))
    with pytest.raises(QuantError, match="Use the same method.r and method.alpha"):
        state.init_adapters(handle, lora)


def test_mixed_precision_by_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12 and layer_index("transformer.h.0.attn.c_attn") == 0
    section = QuantizeSection(bits=2, mixed=1, mixed_bits=4)
    assert spec_for("model.layers.0.mlp.up_proj", section).bits == 4
    assert spec_for("model.layers.1.mlp.up_proj", section).bits == 2
    model, _ = tiny("tiny-llama")
    state = quantize_model(model, section)
    assert {r.bits for r in state.report if ".layers.0." in r.name} == {4}
    assert {r.bits for r in state.report if ".layers.1." in r.name} == {2}


def test_memory_report_at_4_bits():
    model, _ = tiny("tiny-llama")
    quantize_model(model, QuantizeSection(bits=4))
    mem = memory_report(model)
    assert mem["quantized_ratio"] == pytest.approx(4.5 / 16, abs=1e-3)  # 4-bit codes + an fp32 scale per 64


def test_merge_onto_a_quantized_base_says_it_dequantizes():
    model, tok = tiny("tiny-llama")
    quantize_model(model, QuantizeSection(bits=2))
    handle = lora.apply(model, lora.Config(r=4, alpha=8))
    with pytest.warns(UserWarning, match="merge_and_unload\\(\\) returns a model whose adapted layers are dequantized"):
        plain = handle.merge_and_unload()
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert isinstance(plain.get_submodule("model.layers.0.mlp.up_proj"), torch.nn.Linear)


# --------------------------------------------------------------------------------------------------------------
# Config, training runs, quantized base directories, CLI
# --------------------------------------------------------------------------------------------------------------


def test_quantize_section_in_the_run_config():
    cfg = load_config(None, ["quantize.bits=2", "quantize.init=loftq", "method.name=lora"])
    assert cfg.quantize == QuantizeSection(bits=2, init="loftq")
    assert "quantize" not in load_config(None, []).to_dict()  # unquantized configs are unchanged
    with pytest.raises(ConfigError, match="unknown key 'bit' in section 'quantize'. Did you mean 'bits'"):
        load_config(None, ["quantize.bit=2"])


LORA = ["method.name=lora", "method.r=4", "method.alpha=8"]


def _train(tmp_path, name, overrides):
    from tunelab.config import load_config
    from tunelab.train.loop import train

    cfg = load_config(None, ["model.name=tiny-llama", "data.train=synthetic:arith:train:32", "train.max_steps=2", "train.batch_size=4",
                             "train.progress=false", f"output_dir={tmp_path / name}", *overrides])
    return train(cfg)


def _logits_of_run(run_dir):
    from tunelab.loading import load_run

    model, tok, _, _ = load_run(run_dir)
    with torch.no_grad():
        return model(**batch_for(tok)).logits


def test_train_with_a_quantize_section_and_load_the_run(tmp_path):
    result = _train(tmp_path, "loftq", [*LORA, "quantize.bits=2", "quantize.init=loftq", "quantize.iters=2"])
    assert (result.run_dir / "quantized_base.safetensors").is_file()
    first = _logits_of_run(result.run_dir)
    torch.testing.assert_close(_logits_of_run(result.run_dir), first)
    model, tok, handle, _ = __import__("tunelab.loading", fromlist=["load_run"]).load_run(result.run_dir)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with pytest.raises(QuantError, match="method .full. trains the base weights"):
        _train(tmp_path, "full", ["method.name=full", "quantize.bits=4"])
    with pytest.raises(QuantError, match="needs a method that starts from them"):
        _train(tmp_path, "series", ["method.name=series", "method.bottleneck=4", "quantize.init=loftq"])


def test_quantize_cli_writes_a_base_that_trains(tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "nf2"
    assert main(["quantize", "tiny-llama", "--bits", "2", "--rank", "4", "--alpha", "8", "--iters", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "QLoRA err" in printed and "LoftQ err" in printed and "memory:" in printed
    assert {p.name for p in out.iterdir()} >= {"quantize.json", "quantized_base.safetensors",
                                               "adapter_init.safetensors"}
    result = _train(tmp_path, "on-dir", [*LORA, f"model.name={out}"])
    assert result.total_params == tiny("tiny-llama")[0].num_parameters()
    _logits_of_run(result.run_dir)
    with pytest.raises(QuantError, match="already a quantized base"):
        _train(tmp_path, "twice", [*LORA, f"model.name={out}", "quantize.bits=4"])


def test_quantized_base_directory_initialises_lora_with_the_loftq_factors(tmp_path):
    from safetensors.torch import load_file

    from tunelab.loading import load_base
    from tunelab.quant.base import ADAPTER_INIT, prepare, quantize_to_dir

    out = tmp_path / "base"
    quantize_to_dir("tiny-llama", QuantizeSection(bits=4, init="loftq"), lora.low_rank(lora.Config(r=4, alpha=8)),
                    out)
    model, _ = load_base(str(out), "fp32")
    cfg = load_config(None, [f"model.name={out}", "method.name=lora", "method.r=4", "method.alpha=8"])
    state = prepare(model, cfg, lora, cfg.method_config())
    handle = lora.apply(model, cfg.method_config())
    state.init_adapters(handle, lora)
    saved = load_file(str(out / ADAPTER_INIT))
    torch.testing.assert_close(handle.state_dict(), saved)


# --------------------------------------------------------------------------------------------------------------
# Quantized token embedding and output head (quantize.embeddings)
# --------------------------------------------------------------------------------------------------------------


def _table(v=50, d=72, seed=3):
    emb = torch.nn.Embedding(v, d)
    torch.nn.init.normal_(emb.weight, std=0.05, generator=torch.Generator().manual_seed(seed))
    return emb


@pytest.mark.parametrize(("bits", "block", "dq", "d"), [(4, 64, False, 72), (4, 64, True, 128), (2, 8, True, 36),
                                                         (8, 32, False, 64)])
def test_quant_embedding_lookup_is_rows_of_the_dequantized_table(bits, block, dq, d, monkeypatch):
    from tunelab.quant import embedding as qemb

    emb = _table(d=d)
    spec = QuantSpec("nf", bits, block, double_quant=dq)
    q = qemb.QuantEmbedding.from_embedding(emb, spec)
    # the table is quantized row-blockwise with quantize() itself: rows zero-padded to whole blocks
    d_p = -(-d // block) * block
    full = dequantize(quantize(F.pad(emb.weight.detach(), (0, d_p - d)), spec))[:, :d]
    torch.testing.assert_close(q.dequantize(), full, rtol=0, atol=0)
    ref = reference_quantize(F.pad(emb.weight.detach(), (0, d_p - d)), spec.codebook(), block)[:, :d]
    if not dq:
        torch.testing.assert_close(full, ref, rtol=0, atol=1e-6)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 48]])
    shapes = []
    real = qemb.dequantize_codes
    monkeypatch.setattr(qemb, "dequantize_codes", lambda *a: shapes.append(a[3]) or real(*a))
    got = q(ids)
    assert got.shape == (2, 4, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[ids], rtol=0, atol=0)
    assert shapes == [(ids.numel(), d_p)]  # only the looked-up rows are dequantized
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(ids).dtype == torch.bfloat16
    assert q.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # model.to(bf16): lookups in bf16, codes unchanged
    assert q.codes.dtype == torch.uint8


@pytest.mark.parametrize("dq", [False, True])
def test_quant_head_chunked_logits_and_input_gradient_match_the_dense_reference(dq, monkeypatch):
    from tunelab.quant import embedding as qemb

    emb = _table(v=50, d=64)
    q = qemb.QuantEmbedding.from_embedding(emb, QuantSpec("nf", 4, double_quant=dq))
    head = qemb.QuantHead(q, tied=True, chunk=16)  # 50 rows: chunks of 16, 16, 16, 2
    w_hat = q.dequantize()
    h = torch.randn(7, 64, requires_grad=True)
    rows = []
    real = qemb.QuantTable.row_range
    monkeypatch.setattr(qemb.QuantTable, "row_range", lambda self, a, b, dt: rows.append(b - a) or real(self, a, b, dt))
    z = head(h)
    torch.testing.assert_close(z, F.linear(h, w_hat), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(z)
    (gh,) = torch.autograd.grad(z, h, g)
    torch.testing.assert_close(gh, g @ w_hat, rtol=1e-5, atol=1e-6)
    assert max(rows) == 16 and sum(rows) == 2 * 50  # forward + backward, never more than a chunk at a time
    with torch.no_grad():
        torch.testing.assert_close(head(h), F.linear(h, w_hat), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = head(h)
    assert zb.dtype == torch.bfloat16 and relative_error(F.linear(h, w_hat).detach(), zb.float().detach()) < 0.02
    assert not list(head.parameters()) and not list(head.buffers())  # tied: the codes are the embedding's


def test_quant_head_saves_no_table_sized_tensor_for_backward():
    from tunelab.quant.embedding import QuantEmbedding, QuantHead

    q = QuantEmbedding.from_embedding(_table(v=512, d=64), QuantSpec("nf", 4))
    head = QuantHead(q, tied=True, chunk=64)
    h = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        head(h).logsumexp(-1).sum().backward()
    assert not any(t.is_floating_point() and t.shape[-1] == 64 and t.numel() >= 64 * 64 for t in saved), \
        [t.shape for t in saved]
    assert h.grad is not None


def _untied_llama():
    from transformers import AutoModelForCausalLM

    from tunelab.models.tiny import tiny_llama_config

    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2", "untied-llama"])
def test_quantize_embeddings_keeps_the_tie_and_round_trips(arch, tmp_path):
    from tunelab.methods.core import find_targets, output_head_names
    from tunelab.quant.embedding import QuantEmbedding, QuantHead
    from tunelab.quant.model import install_quantized_layers

    def fresh():
        return (_untied_llama(), tiny("tiny-llama")[1]) if arch == "untied-llama" else tiny(arch)

    model, tok = fresh()
    batch = batch_for(tok)
    emb_w = model.get_input_embeddings().weight.detach().clone()
    head_w = model.get_output_embeddings().weight.detach().clone()
    state = quantize_model(model, QuantizeSection(bits=4, embeddings=True))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantHead)
    assert head.tied == (arch != "untied-llama")
    if head.tied:
        assert head.source is emb and not list(head.buffers())
    else:
        assert relative_error(head_w, head.weight) < 0.12 and head.source.nbytes() > 0
    assert relative_error(emb_w, emb.weight) < 0.12
    # LoRA's all-linear still leaves the head alone
    assert output_head_names(model) == {"lm_head"}
    assert "lm_head" not in find_targets(model, "all-linear")
    handle = lora.apply(model, lora.Config(r=4, alpha=8))
    assert "lm_head" not in handle.layers
    handle.remove()
    # the logits go through the chunked head: equal to the dense head over the dequantized table
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.base_model(**batch).last_hidden_state
    torch.testing.assert_close(logits, F.linear(hidden, head.weight), rtol=1e-5, atol=1e-5)
    # saved (one copy of a tied table) and installed into a fresh model: the same codes, the same logits
    path = tmp_path / "q.safetensors"
    state.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".codes") and "emb" in k or k.startswith("transformer.wte.") for k in keys)
    assert any(k.startswith("lm_head.") for k in keys) == (arch == "untied-llama")
    other, _ = fresh()
    installed = install_quantized_layers(other, path)
    assert set(installed.tables) == set(state.tables)
    assert other.get_output_embeddings().tied == head.tied
    if head.tied:
        assert other.get_output_embeddings().source is other.get_input_embeddings()
    assert torch.equal(other.get_input_embeddings().codes, emb.codes)
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, logits, rtol=0, atol=0)
    assert memory_report(other) == memory_report(model)


def _independent_ratio(model, dense_numel: int, other_bytes_per_value: int) -> float:
    """(codes + scales of every quantized module + the other parameters at ``other_bytes_per_value``) / (2 bytes
    · every weight of the dense model), counted from the modules' tensors."""
    from tunelab.quant.embedding import QuantTable

    q = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantTable)):
            q += sum(b.numel() * b.element_size() for n, b in m.named_buffers(recurse=False)
                     if n not in ("table", "scale_table"))
    rest = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return (q + other_bytes_per_value * rest) / (2 * dense_numel)


@pytest.mark.parametrize("dq", [False, True])
def test_whole_model_ratio_at_4_bits_with_embeddings_is_below_0_3(dq):
    dense, _ = tiny("tiny-llama")
    dense_numel = sum(p.numel() for p in dense.parameters())  # tied: the table once
    norms = sum(p.numel() for n, p in dense.named_parameters() if "norm" in n)
    assert norms > 0
    model, _ = tiny("tiny-llama")
    quantize_model(model, QuantizeSection(bits=4, double_quant=dq, embeddings=True))
    mem = memory_report(model)
    assert mem["model_bf16_bytes"] == 2 * dense_numel
    assert mem["model_ratio"] == pytest.approx(_independent_ratio(model, dense_numel, 2), rel=1e-12)
    if dq:  # 259 blocks: two INT-8 scale blocks, their fp32 scales and the mean weigh in on this tiny table
        assert 4.127 / 16 < mem["embedding_ratio"] < 4.5 / 16
    else:
        assert mem["embedding_ratio"] == pytest.approx(4.5 / 16, abs=1e-12)
    assert sum(p.numel() for p in model.parameters()) == norms  # everything else is codes
    assert _independent_ratio(model, dense_numel, 4) < 0.3  # even with the norms counted in fp32
    assert mem["model_ratio"] < 0.3
    # without the embedding the table stays bf16: the whole model is well above 0.3 on this tiny vocabulary
    plain, _ = tiny("tiny-llama")
    quantize_model(plain, QuantizeSection(bits=4, double_quant=dq))
    mem_plain = memory_report(plain)
    assert mem_plain["model_bf16_bytes"] == 2 * dense_numel and mem_plain["embedding_bytes"] == 0
    assert mem_plain["model_ratio"] == pytest.approx(_independent_ratio(plain, dense_numel, 2), rel=1e-12)
    assert mem_plain["model_ratio"] > mem["model_ratio"]


def test_embeddings_option_in_config_and_hash():
    from tunelab.train.loop import config_hash

    plain = load_config(None, ["quantize.bits=4"])
    assert "embeddings" not in plain.to_dict()["quantize"]  # configs without it keep their hash
    on = load_config(None, ["quantize.bits=4", "quantize.embeddings=true", "quantize.embedding_bits=8"])
    assert on.quantize.embeddings and on.to_dict()["quantize"]["embedding_bits"] == 8
    assert config_hash(on) != config_hash(plain)
    with pytest.raises(ConfigError, match="embedding_bits must be 0"):
        QuantizeSection(embedding_bits=3)
    model, _ = tiny("tiny-llama")
    state = quantize_model(model, on.quantize)
    assert {r.kind: r.bits for r in state.report} == {"linear": 4, "embedding": 8, "tied head": 8}


def test_train_and_load_a_run_with_quantized_embeddings(tmp_path):
    from tunelab.loading import load_run
    from tunelab.quant.embedding import QuantEmbedding, QuantHead

    result = _train(tmp_path, "emb", [*LORA, "quantize.bits=4", "quantize.embeddings=true"])
    assert result.total_params == tiny("tiny-llama")[0].num_parameters()
    model, tok, _, _ = load_run(result.run_dir)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), QuantHead) and model.get_output_embeddings().tied
    torch.testing.assert_close(_logits_of_run(result.run_dir), _logits_of_run(result.run_dir))
    from tunelab.eval.loglik import continuation_logprobs

    assert len(continuation_logprobs(model, tok, [("2 + 2 =", " 4")])) == 1


def test_quantize_cli_embeddings_flag(tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.loading import load_base
    from tunelab.quant.embedding import QuantEmbedding

    out = tmp_path / "nf4-emb"
    assert main(["quantize", "tiny-llama", "--bits", "4", "--init", "qlora", "--embeddings", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.embed_tokens (embedding)" in printed and "lm_head (tied head)" in printed
    assert "embedding table(s)" in printed
    model, _ = load_base(str(out), "fp32")
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    result = _train(tmp_path, "on-emb-dir", [*LORA, f"model.name={out}"])
    assert result.total_params == tiny("tiny-llama")[0].num_parameters()
    _logits_of_run(result.run_dir)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_weights_dequantize_once_with_the_same_outputs(dtype, monkeypatch):
    """Under inference_weights each quantized layer (and the quantized head, chunk by chunk) dequantizes once for
    any number of no-grad calls, with bit-identical logits and generations; after it nothing is kept and every call
    rebuilds Ŵ again."""
    from tunelab.eval.generate import GenerationSettings, generate_ids
    from tunelab.quant import QuantHead
    from tunelab.quant.linear import inference_weights

    model, tok = tiny("tiny-llama")
    quantize_model(model, QuantizeSection(bits=4, embeddings=True))
    model.to(dtype).eval()
    assert any(isinstance(m, QuantHead) for m in model.modules())
    batch = batch_for(tok)
    prompts = [tok(t)["input_ids"] for t in ("hello there", "a longer prompt for the batch", "x")]
    settings = GenerationSettings(max_new_tokens=6)
    with torch.no_grad():
        want_logits = model(**batch).logits
    want_gen = generate_ids(model, tok, prompts, settings)
    calls = []
    real = QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize", lambda self, d=torch.float32: calls.append(id(self)) or real(self, d))
    with inference_weights(model), torch.no_grad():
        got_logits = model(**batch).logits
        got_gen = generate_ids(model, tok, prompts, settings)
    n_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert len(calls) == n_layers == len(set(calls))  # once each, for a forward pass and 6 decode steps
    assert torch.equal(got_logits, want_logits)
    assert [g.text for g in got_gen] == [g.text for g in want_gen]
    assert all(m._dense is None for m in model.modules() if isinstance(m, QuantLinear | QuantHead))
    with inference_weights(model), torch.no_grad():  # nested: the inner block uses and leaves the outer's weights
        model(**batch)
        kept = [m._dense for m in model.modules() if isinstance(m, QuantLinear)]
        with inference_weights(model):
            model(**batch)
        assert [m._dense for m in model.modules() if isinstance(m, QuantLinear)] == kept and all(kept)
    assert all(m._dense is None for m in model.modules() if isinstance(m, QuantLinear | QuantHead))
    calls.clear()
    with torch.no_grad():
        model(**batch)
    assert len(calls) == n_layers  # outside the block: rebuilt per call again
