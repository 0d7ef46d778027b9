"""The training loop: loss normalisation, schedules, runs on disk, resume after a kill, divergence, DDP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, config_from_dict
from tunelab.errors import RunError
from tunelab.loading import load_run
from tunelab.train.loop import TrainingDiverged, train
from tunelab.train.objective import linear_cross_entropy, nll_sum
from tunelab.train.schedules import lr_factor

from conftest import REPO, tiny


def cfg_dict(tmp_path: Path, **over) -> dict:
    d = {
        "model": {"name": "tiny-llama", "dtype": "fp32"},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": "synthetic:arith:train:64", "template": "plain", "max_length": 64, "group_by_length": False},
        "train": {"lr": 1e-2, "max_steps": 4, "batch_size": 4, "seed": 1, "progress": False, "warmup_steps": 1},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            d[section][name] = value
        else:
            d[section] = value
    return d


def test_schedule_shapes():
    assert lr_factor(0, 10, 2, "cosine") == 0.5
    assert lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_nll_sum_equals_cross_entropy_on_full_logits():
    model, tok = tiny()
    enc = tok(["abc def", "a much longer example text"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[0, :3] = -100
    total, n = nll_sum(model, {**enc, "labels": labels})
    logits = model(**enc).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    assert n == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk", [1, 70, 1 << 22])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("w_block", [1 << 25, 37 * 4])
def test_linear_cross_entropy_equals_linear_then_cross_entropy(autocast, chunk, with_bias, w_block, monkeypatch):
    """Loss and the gradients of h, W and b equal autograd through F.linear + F.cross_entropy (fp32 and bf16
    autocast, any chunking, ∂/∂W in one block or in blocks of 4 positions), with a non-unit incoming gradient (the
    loop divides the sum by the target count)."""
    import tunelab.train.objective as objective

    monkeypatch.setattr(objective, "GRAD_W_BLOCK_ELEMENTS", w_block)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(13, 24, generator=gen)
    w, b = torch.randn(37, 24, generator=gen) / 5, torch.randn(37, generator=gen) if with_bias else None
    y = torch.randint(0, 37, (13,), generator=gen)
    results = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True) if with_bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = linear_cross_entropy(hh, ww, bb, y, chunk_elements=chunk)
            else:
                loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hh, ww, bb).float(), y,
                                                         reduction="sum")
        (loss / 7).backward()
        results.append((loss.detach(), hh.grad, ww.grad, bb.grad if with_bias else None))
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    for got, want in zip(results[0], results[1], strict=True):
        if want is not None:
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # evaluation: same loss
        torch.testing.assert_close(linear_cross_entropy(h, w.requires_grad_(True), b, y, chunk), results[0][0])


def test_nll_sum_fuses_a_plain_head_and_falls_back_for_a_wrapped_one(monkeypatch):
    import tunelab.train.objective as objective

    model, tok = tiny()
    enc = tok(["abc def", "a much longer example text"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    calls = []
    real = objective.linear_cross_entropy
    monkeypatch.setattr(objective, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, _ = nll_sum(model, {**enc, "labels": labels})
    assert calls == [1]
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: o)
    plain, _ = nll_sum(model, {**enc, "labels": labels})
    handle.remove()
    assert calls == [1]  # a hooked head takes the plain path
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)


def test_grad_accumulation_normalises_by_all_target_tokens(tmp_path):
    """bs=4 × ga=1, bs=2 × ga=2 and bs=1 × ga=4 see the same examples per step: same weights after 3 steps."""
    weights = []
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        cfg = config_from_dict(cfg_dict(tmp_path / f"{bs}x{ga}", train__batch_size=bs, train__grad_accum=ga,
                                        train__max_steps=3))
        res = train(cfg)
        weights.append(load_file(str(res.run_dir / "adapter.safetensors")))
    for other in weights[1:]:
        for k in weights[0]:
            torch.testing.assert_close(other[k], weights[0][k], atol=2e-5, rtol=1e-4)


def test_run_directory_and_load_back(tmp_path):
    res = train(config_from_dict(cfg_dict(tmp_path, data__eval="synthetic:arith:dev:16")))
    run = res.run_dir
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["method"] == "lora" and meta["base_fingerprint"]
    assert meta["trainable_params"] == res.trainable_params > 0
    assert (run / "config.yaml").is_file() and (run / "peft" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in rows) and res.eval_loss is not None
    model, tok, handle, _ = load_run(run)
    saved = load_file(str(run / "adapter.safetensors"))
    for k, v in handle.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_refuses_a_different_base_model(tmp_path):
    res = train(config_from_dict(cfg_dict(tmp_path)))
    with pytest.raises(RunError, match="fingerprint"):
        load_run(res.run_dir, base="tiny-gpt2")


def test_existing_run_dir_needs_resume(tmp_path):
    train(config_from_dict(cfg_dict(tmp_path)))
    with pytest.raises(RunError, match="--resume"):
        train(config_from_dict(cfg_dict(tmp_path)))


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    model, tok = tiny()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("inf"))
    cfg = config_from_dict(cfg_dict(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: train loss is (nan|inf); last good checkpoint: "
                                               r"none"):
        train(cfg, model=model, tokenizer=tok)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "diverged" and not (tmp_path / "run" / "adapter.safetensors").exists()
    with pytest.raises(RunError, match="did not complete"):
        load_run(tmp_path / "run")


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _write_cfg(tmp_path: Path, name: str, steps: int) -> Path:
    import yaml

    d = cfg_dict(tmp_path, output_dir=str(tmp_path / name), train__max_steps=steps, train__save_every=1,
                 train__threads=1, method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_resume_after_kill_reproduces_uninterrupted_weights(tmp_path):
    steps = 30
    full = _cli(["train", str(_write_cfg(tmp_path, "straight", steps))])
    killed = _cli(["train", str(_write_cfg(tmp_path, "killed", steps))])
    kill_after = random.Random().randint(2, steps - 10)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [p for p in ckpts.glob("step-*")] if ckpts.is_dir() else []
        if any(int(p.name.split("-")[1]) >= kill_after for p in done):
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    resumed = _cli(["train", str(tmp_path / "killed.yaml"), "--resume"])
    out_resumed, _ = resumed.communicate(timeout=300)
    out_full, _ = full.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed after step {kill_after})"
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))


def free_port() -> int:
    """A TCP port nothing listens on now (asked of the OS, not guessed: a guessed one can be taken)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 processes × grad_accum 1 vs 1 process × grad_accum 2 at the same global batch: same loss curve."""
    import yaml

    curves = {}
    for name, nproc, ga in [("one", 1, 2), ("two", 2, 1)]:
        d = cfg_dict(tmp_path, output_dir=str(tmp_path / name), train__max_steps=5, train__grad_accum=ga,
                     train__batch_size=2, train__threads=1)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "tunelab.cli", "train", str(path)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stdout + out.stderr
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r["loss"] for r in rows if "loss" in r]
        assert json.loads((tmp_path / name / "meta.json").read_text())["world_size"] == nproc
    assert len(curves["one"]) == 5
    for a, b in zip(curves["one"], curves["two"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_bf16_run_loads_in_fp32_and_full_tuning_starts_from_fp32_weights(tmp_path):
    """Frozen weights go bf16, trained ones stay fp32 from the fp32 source; the run loads back in fp32."""
    from tunelab.train.loop import Trainer

    cfg = config_from_dict(cfg_dict(tmp_path, model={"name": "tiny-llama", "dtype": "bf16"}, train__max_steps=1))
    trainer = Trainer(cfg)
    trainer.setup()
    dtypes = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16} and {p.dtype for p in trainer.params.values()} == {torch.float32}
    res = train(cfg)
    model, _, _, _ = load_run(res.run_dir, dtype="fp32")
    assert next(model.parameters()).dtype == torch.float32
    full = config_from_dict(cfg_dict(tmp_path / "full", model={"name": "tiny-llama", "dtype": "bf16"},
                                     method={"name": "full"}))
    t = Trainer(full)
    t.setup()
    reference, _ = tiny()
    w = t.model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.float32 and torch.equal(w, reference.model.layers[0].mlp.up_proj.weight)


def test_adamw_is_fused_where_it_can_be_and_gives_foreachs_update():
    from tunelab.train.optimizers import adamw

    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    fused = adamw([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.999))
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW([{"params": copies, "weight_decay": 0.1}], lr=1e-2, foreach=False)
    for _ in range(3):
        for ps, opt in ((params, fused), (copies, plain)):
            for p in ps:
                p.grad = torch.ones_like(p) * 0.5 + p.detach()
            opt.step()
    for a, b in zip(params, copies, strict=True):
        torch.testing.assert_close(a, b)



def test_adamw_falls_back_to_foreach_where_fused_is_refused(monkeypatch):
    from tunelab.train import optimizers

    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = optimizers.adamw([{"params": [torch.zeros(2, requires_grad=True)]}], lr=1e-3)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]


def test_mmap_threshold_option_reaches_mallopt(tmp_path, monkeypatch):
    from tunelab.train import loop

    seen = []
    monkeypatch.setattr(loop, "set_mmap_threshold", lambda n: seen.append(n) or True)
    trainer = loop.Trainer(config_from_dict(cfg_dict(tmp_path, train__mmap_threshold_kib=512)))
    trainer.setup()
    assert seen == [512 * 1024]
    with pytest.raises(ConfigError, match="mmap_threshold_kib"):
        config_from_dict(cfg_dict(tmp_path, train__mmap_threshold_kib=10**6))


def test_keep_freed_memory_is_on_by_default_and_can_be_switched_off(tmp_path, monkeypatch):
    from tunelab.train import loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(loop, "set_mmap_threshold", lambda n: calls.append(n) or True)
    loop.Trainer(config_from_dict(cfg_dict(tmp_path / "a"))).setup()
    assert calls == ["keep"]
    calls.clear()
    loop.Trainer(config_from_dict(cfg_dict(tmp_path / "b", train__keep_freed_memory=False))).setup()
    assert calls == []
    loop.Trainer(config_from_dict(cfg_dict(tmp_path / "c", train__mmap_threshold_kib=1024))).setup()
    assert calls == ["keep", 1024 * 1024]  # the threshold, set after, decides which buffers are mapped


def test_keep_freed_memory_sets_glibc_trim_and_mmap_thresholds(monkeypatch):
    import ctypes

    from tunelab.train import memory

    seen = []
    monkeypatch.setattr(memory, "_mallopt", lambda p, v: seen.append((p, v)) or True)
    assert memory.keep_freed_memory()
    assert seen == [(memory.M_TRIM_THRESHOLD, 2**31 - 1), (memory.M_MMAP_THRESHOLD, 32 << 20)]
    monkeypatch.undo()
    assert memory.keep_freed_memory() == hasattr(ctypes.CDLL(None), "mallopt")  # glibc takes both values


def test_set_mmap_threshold_is_glibc_mallopt():
    import ctypes

    from tunelab.train.memory import set_mmap_threshold

    has_mallopt = hasattr(ctypes.CDLL(None), "mallopt")
    assert set_mmap_threshold(32 * 1024 * 1024) == has_mallopt  # 32 MiB: glibc's own ceiling, harmless here


def test_benchmark_peers_get_the_glibc_setting_of_keep_freed_memory():
    """bench/train_throughput.py (standard library only) repeats the two thresholds for its *-keepmem peers."""
    import importlib.util

    from tunelab.train import memory

    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_train_throughput", bench / "train_throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
        sys.modules.pop("bench_train_throughput", None)
    want = {"MALLOC_TRIM_THRESHOLD_": str(memory.KEEP_TRIM_THRESHOLD),
            "MALLOC_MMAP_THRESHOLD_": str(memory.KEEP_MMAP_THRESHOLD)}
    env = module.KEEP_FREED_MEMORY_ENV
    assert env == want


@pytest.mark.parametrize("method", ["full", "lora", "loreft", *[pytest.param(m, marks=pytest.mark.slow) for m in (
    "direft", "series", "parallel", "prefix", "random-mask")]])
def test_fsdp_two_processes_match_one_process(tmp_path, method):
    """FSDP2 (train.distributed: fsdp) over 2 gloo processes × grad_accum 1 against 1 process × grad_accum 2 at the
    same global batch: the same loss curve and the same trained weights; each process holds about half of the
    sharded part of the trained parameters and optimizer states."""
    import yaml
    from safetensors.torch import load_file

    curves, weights, meta = {}, {}, {}
    for name, nproc, ga, dist in [("one", 1, 2, "ddp"), ("ddp", 2, 1, "ddp"), ("fsdp", 2, 1, "fsdp")]:
        d = cfg_dict(tmp_path, output_dir=str(tmp_path / name), train__max_steps=4, train__grad_accum=ga,
                     train__batch_size=2, train__threads=1, train__distributed=dist, train__lr=1e-3,
                     method={"name": method, **({"fraction": 0.01} if method == "random-mask" else {})})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "tunelab.cli", "train", str(path)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r["loss"] for r in rows if "loss" in r]
        weights[name] = load_file(str(tmp_path / name / "adapter.safetensors"))
        meta[name] = json.loads((tmp_path / name / "meta.json").read_text())
    assert curves["one"] == pytest.approx(curves["fsdp"], rel=1e-5, abs=1e-6)
    assert weights["one"].keys() == weights["fsdp"].keys()
    for k in weights["one"]:
        torch.testing.assert_close(weights["fsdp"][k], weights["one"][k], atol=1e-6, rtol=1e-5)
    assert meta["fsdp"]["distributed"]["mode"] == "fsdp"
    ddp, fsdp = meta["ddp"]["distributed"]["state_bytes_rank0"], meta["fsdp"]["distributed"]["state_bytes_rank0"]
    if method == "full":  # the blocks are sharded; embeddings and the final norm stay replicated
        assert fsdp["optimizer_states"] < 0.8 * ddp["optimizer_states"]
    assert fsdp["optimizer_states"] <= ddp["optimizer_states"]
    for name, nproc in (("one", 1), ("ddp", 2), ("fsdp", 2)):  # every rank's own peak, not rank 0's alone
        ranks = meta[name]["distributed"]["peak_rss_mb_per_rank"]
        assert len(ranks) == nproc and all(r > 50 for r in ranks)


def test_fsdp_refuses_what_it_cannot_shard():
    from tunelab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method 'prompt' does not train sharded"):
        load_config(None, ["method.name=prompt", "train.distributed=fsdp"])


def test_fsdp_resume_after_kill_equals_the_uninterrupted_run(tmp_path):
    """A 2-process FSDP run killed after its checkpoint at step 4 and resumed ends with the weights and the loss
    curve of the same run uninterrupted (checkpoints hold the gathered full tensors; resume re-shards them)."""
    import signal

    import yaml
    from safetensors.torch import load_file

    def cmd(name, *extra):
        d = cfg_dict(tmp_path, output_dir=str(tmp_path / name), train__max_steps=120, train__batch_size=2,
                     train__threads=1, train__distributed="fsdp", train__lr=1e-3, train__save_every=4,
                     method={"name": "full"})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "tunelab.cli", "train", str(tmp_path / f"{name}.yaml"), *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(cmd("whole"), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(cmd("cut"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while not any(ckpts.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pattern = str(tmp_path / "cut.yaml")  # torchrun's workers: kill -9 them too, and wait until they are gone
    subprocess.run(["pkill", "-9", "-f", pattern], check=False)
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert any(ckpts.glob("step-*")), "the run ended before its first checkpoint"
    again = subprocess.run(cmd("cut", "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                       "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    loss = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x] for n in ("whole", "cut")}
    assert loss["cut"] == pytest.approx(loss["whole"], rel=1e-5)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "full"},
                                    {"name": "loreft", "r": 2}])
def test_activation_checkpointing_trains_the_same_run(tmp_path, method):
    """train.activation_checkpointing: the same loss curve and weights as without it (it only trades memory for
    a recomputation), and it does not change the run's config hash, so a run may resume with it switched."""
    from safetensors.torch import load_file

    from tunelab.train.loop import config_hash

    runs = {}
    for on in (False, True):
        cfg = config_from_dict(cfg_dict(tmp_path, output_dir=str(tmp_path / f"ckpt-{on}"), method=method,
                                        train__activation_checkpointing=on))
        model, tok = tiny()
        result = train(cfg, model=model, tokenizer=tok)
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"  # renamed in transformers 5.x
        assert getattr(model, name) == on
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        same_dir = config_from_dict(cfg_dict(tmp_path, method=method, train__activation_checkpointing=on))
        runs[on] = ([r["loss"] for r in rows if "loss" in r], load_file(str(result.run_dir / "adapter.safetensors")),
                    config_hash(same_dir))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, atol=1e-6, rtol=1e-5)
    assert runs[True][2] == runs[False][2]
