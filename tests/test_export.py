"""tunelab export: a merged run loads in plain transformers with the same logits (full tuning, LoRA, random
masking, QLoRA and LoftQ on quantized bases, on a Llama and on GPT-2, whose Conv1D layers must come back as
Conv1D); peft's format for LoRA; methods without a merged form say so."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import RunError
from tunelab.export import export_run
from tunelab.loading import load_run
from tunelab.train.loop import train

from conftest import batch_for

CASES = {
    "full": ["method.name=full", "train.lr=1e-3"],
    "lora": ["method.name=lora", "method.r=4", "method.alpha=8"],
    "random-mask": ["method.name=random-mask", "method.fraction=0.05"],
    "qlora-nf4": ["method.name=lora", "method.r=4", "method.alpha=8", "quantize.bits=4"],
    "loftq-nf2": ["method.name=lora", "method.r=4", "method.alpha=8", "quantize.bits=2", "quantize.init=loftq"],
}


def _train(tmp_path, arch, name, options):
    cfg = load_config(None, [f"model.name={arch}", "data.train=synthetic:arith:train:16", "train.max_steps=3",
                             "train.batch_size=4", "train.lr=1e-2", "train.progress=false",
                             f"output_dir={tmp_path / name}", *options])
    return train(cfg).run_dir


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_export_loads_in_transformers_with_the_same_logits(tmp_path, arch, case):
    run = _train(tmp_path, arch, case, CASES[case])
    model, tok, _, _ = load_run(run, dtype="fp32")
    batch = batch_for(tok)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_run(run, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_peft_export_and_the_methods_without_a_merged_form(tmp_path, capsys):
    run = _train(tmp_path, "tiny-llama", "lora", CASES["lora"])
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    prompt = _train(tmp_path, "tiny-llama", "prompt", ["method.name=prompt", "method.num_tokens=4"])
    with pytest.raises(RunError, match="cannot be merged into the weights.*Formats for it: peft"):
        export_run(prompt, tmp_path / "x")
    assert (export_run(prompt, tmp_path / "prompt-peft", "peft") / "adapter_config.json").is_file()
    reft = _train(tmp_path, "tiny-llama", "loreft", ["method.name=loreft", "method.r=2"])
    with pytest.raises(RunError, match="cannot be merged into the weights.*No other tool loads"):
        export_run(reft, tmp_path / "x")
    with pytest.raises(RunError, match="has no peft format here"):
        export_run(reft, tmp_path / "x", "peft")
    assert main(["export", str(reft), "--out", str(tmp_path / "x")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix-reparam"])
def test_prompt_and_prefix_peft_exports_load_in_peft_with_the_same_logits(tmp_path, arch, method):
    peft = pytest.importorskip("peft")
    from tunelab.methods import get_method

    from conftest import tiny

    name = method.split("-")[0]
    module = get_method(name)
    options = {"num_tokens": 4, **({"reparam": True, "reparam_hidden": 16} if method.endswith("reparam") else {})}
    model, tok = tiny(arch)
    handle = module.apply(model, module.Config(**options), tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    batch = batch_for(tok)
    with torch.no_grad():
        ours = model(**batch).logits
    module.export(handle, tmp_path / "peft", arch)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if name == "prompt" else "PREFIX_TUNING")
    base, _ = tiny(arch)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
    if name == "prompt":
        theirs = theirs[:, 4:]  # peft returns the soft positions too
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[keep], ours[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["lora", "qlora-nf4"])
def test_gguf_export_reads_back_with_the_transformers_gguf_loader(tmp_path, case):
    run = _train(tmp_path, "tiny-llama", case, CASES[case])
    model, tok, _, _ = load_run(run, dtype="fp32")
    batch = batch_for(tok)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_run(run, tmp_path / "gguf", "gguf")
    plain = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_gguf_export_of_another_architecture_says_what_to_do(tmp_path):
    run = _train(tmp_path, "tiny-gpt2", "lora", CASES["lora"])
    with pytest.raises(RunError, match="Llama-architecture models.*convert_hf_to_gguf"):
        export_run(run, tmp_path / "gguf", "gguf")
