"""The device setting (tunelab.devices): selection with CUDA simulated, clear refusals, the dtype that ``auto``
picks per device, and — where torch sees a GPU — training, generation and evaluation on CUDA against the CPU.

The CUDA cases skip on a machine without a GPU (every CI machine of this project so far): they are the checks to
run when one is lent (docs/distributed.md, "What was verified where")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab import devices
from tunelab.config import config_from_dict
from tunelab.devices import move_batch, resolve_device
from tunelab.errors import RunError
from tunelab.models import dtype as dtype_mod
from tunelab.train.loop import train

from conftest import batch_for, tiny

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def fake_cuda(monkeypatch, count: int = 2, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert devices.available_devices() == ["cpu"]


def test_auto_takes_the_local_ranks_gpu(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # plain cuda under torchrun: this process's GPU
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU can be chosen beside a GPU
    assert devices.available_devices() == ["cpu", "cuda"]
    with pytest.raises(RunError, match=r"this machine has 2 CUDA device"):  # more processes than GPUs: no sharing
        resolve_device("auto", local_rank=2)


def test_refusals_name_the_key_and_what_works(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunError, match=r"train\.device: 'cuda' asked for a CUDA device, but torch sees none"):
        resolve_device("cuda")
    with pytest.raises(RunError, match=r"--device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", where="--device")
    with pytest.raises(RunError, match="unknown device 'mps'"):
        resolve_device("mps")
    fake_cuda(monkeypatch, count=2)
    with pytest.raises(RunError, match=r"'cuda:3': this machine has 2 CUDA device\(s\) \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:3")


def test_auto_dtype_follows_the_device_not_the_machine(monkeypatch):
    """A GPU with bf16 beside a CPU without fast bf16: training on the CPU must stay fp32 (bf16 would be emulated
    there), on the GPU bf16."""
    fake_cuda(monkeypatch, bf16=True)
    monkeypatch.setattr(dtype_mod, "cpu_has_fast_bf16", lambda: False)
    assert dtype_mod.resolve_dtype("auto", "cpu") == torch.float32
    assert dtype_mod.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert dtype_mod.resolve_dtype("auto") == torch.bfloat16  # no device: the machine's GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert dtype_mod.resolve_dtype("auto", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dtype_mod, "cpu_has_fast_bf16", lambda: True)
    assert dtype_mod.resolve_dtype("auto") == torch.bfloat16  # no GPU: the CPU decides
    assert dtype_mod.resolve_dtype("fp32", "cuda") == torch.float32  # a named dtype is never changed


def test_a_cpu_batch_stays_the_same_object():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}
    assert move_batch(batch, torch.device("cpu")) is batch


def _cfg(tmp_path: Path, name: str, method: dict, device: str, **train_over) -> dict:
    return {
        "model": {"name": "tiny-llama", "dtype": "fp32"},
        "method": method,
        "data": {"train": "synthetic:arith:train:64", "eval": "synthetic:arith:test:16", "template": "plain",
                 "max_length": 64, "group_by_length": False},
        "train": {"lr": 1e-2, "max_steps": 4, "batch_size": 4, "seed": 1, "progress": False, "device": device,
                  **train_over},
        "output_dir": str(tmp_path / name),
    }


def test_asking_for_cuda_without_one_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config_from_dict(_cfg(tmp_path, "run", {"name": "lora", "r": 4}, "cuda"))
    with pytest.raises(RunError, match=r"train\.device: 'cuda' asked for a CUDA device"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_device_is_recorded_and_does_not_change_the_config_hash(tmp_path):
    from tunelab.train.loop import config_hash

    cfg = config_from_dict(_cfg(tmp_path, "run", {"name": "lora", "r": 4}, "cpu"))
    result = train(cfg)
    assert result.device == "cpu" and result.peak_device_mb is None
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["metrics"]["device"] == "cpu"
    other = config_from_dict(_cfg(tmp_path, "run", {"name": "lora", "r": 4}, "auto"))
    assert config_hash(other) == config_hash(cfg)  # a run trained on one device resumes on another


# -- on a GPU (skipped without one) ------------------------------------------------------------------------------

METHODS = [{"name": "full"}, {"name": "lora", "r": 4}, {"name": "loreft", "r": 2}, {"name": "prompt", "num_tokens": 4},
           {"name": "prefix", "num_tokens": 4}, {"name": "series", "bottleneck": 8},
           {"name": "parallel", "bottleneck": 8}, {"name": "direft", "r": 2},
           {"name": "random-mask", "fraction": 0.05}]


@CUDA
@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_cuda_training_matches_the_cpu_in_fp32(tmp_path, method):
    """The same run on the CPU and on CUDA, fp32, no autocast: the loss curves agree to 1e-3 (kernels differ in
    summation order), the trained weights to 1e-3, and the CUDA run records its device peak."""
    from safetensors.torch import load_file

    runs = {}
    for dev in ("cpu", "cuda"):
        cfg = config_from_dict(_cfg(tmp_path, dev, method, dev, autocast="off"))
        runs[dev] = train(cfg)
    assert runs["cuda"].device.startswith("cuda") and runs["cuda"].peak_device_mb > 0
    curves = {dev: [json.loads(line)["loss"] for line in (tmp_path / dev / "metrics.jsonl").read_text().splitlines()
                    if '"loss"' in line] for dev in runs}
    torch.testing.assert_close(torch.tensor(curves["cuda"]), torch.tensor(curves["cpu"]), rtol=1e-3, atol=1e-4)
    a, b = load_file(tmp_path / "cpu" / "adapter.safetensors"), load_file(tmp_path / "cuda" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3)


@CUDA
def test_cuda_bf16_autocast_trains_and_resumes(tmp_path):
    """bf16 autocast on the GPU (sdpa's flash kernel, fused AdamW): finite losses, and a run resumed on the GPU from
    its step-3 checkpoint ends with the uninterrupted run's weights."""
    import shutil

    from safetensors.torch import load_file

    from tunelab.files import atomic_write_json

    over = dict(autocast="bf16", max_steps=6, save_every=3)
    cfg = _cfg(tmp_path, "run", {"name": "lora", "r": 4}, "cuda", **over)
    whole = train(config_from_dict(cfg))
    assert torch.isfinite(torch.tensor(whole.train_loss))
    shutil.copytree(tmp_path / "run", tmp_path / "whole")  # the finished run, kept; "run" goes back to step 3
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    atomic_write_json(tmp_path / "run" / "meta.json", {**meta, "status": "running"})
    (tmp_path / "run" / "adapter.safetensors").unlink()
    from tunelab.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None  # the resume starts from step 3
    train(config_from_dict(cfg), resume=True)
    a, b = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "run" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_generation_equals_the_cpu_in_fp32():
    from tunelab.eval.generate import GenerationSettings, generate_ids

    model, tok = tiny()
    prompts = [tok(t)["input_ids"] for t in ("1 + 2 =", "the cat sat on", "abc")]
    on_cpu = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=2))
    model.to("cuda")
    on_gpu = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=2))
    assert [g.text for g in on_gpu] == [g.text for g in on_cpu]


@CUDA
def test_cuda_logits_match_the_cpu_for_a_quantized_base():
    from tunelab.config import QuantizeSection
    from tunelab.quant.model import quantize_model

    model, tok = tiny()
    quantize_model(model, QuantizeSection(bits=4), None)
    batch = batch_for(tok)
    with torch.no_grad():
        cpu = model(**batch).logits
        model.to("cuda")
        gpu = model(**move_batch(batch, torch.device("cuda"))).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
