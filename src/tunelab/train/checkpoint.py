"""Resumable checkpoints, written atomically and without pickle.

A checkpoint is a folder ``checkpoints/step-00000042/`` with

    trainable.safetensors   the method's trainable weights and extra state (fp32)
    optimizer.safetensors   optimizer tensors (per parameter: step, exp_avg, exp_avg_sq, ...) + RNG states
    state.json              step, scheduler state, optimizer param groups, parameter order, counters

It is assembled in a hidden temp folder (each file fsynced) and renamed into place, so every ``step-*`` folder
that exists is complete; the newest one is the one to resume from. One damaged afterwards (a truncated file, a
missing ``state.json``) is named, set aside as ``step-N.damaged`` and the one before it is used
(``load_newest``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import RunError
from tunelab.files import atomic_save_tensors, atomic_write_json, load_tensors, warn
from tunelab.train.optimizers import flatten_state, is_subclass_state, plain_number, unflatten_state

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    counters: dict[str, Any]


def _optimizer_to_flat(opt_state: dict[str, Any], names: list[str]
                       ) -> tuple[dict[str, torch.Tensor], list, dict[str, Any]]:
    """Plain tensors per ``opt/PARAM/FIELD``, the param groups, and the specs of quantized (tensor-subclass)
    states, whose inner tensors are stored as ``opt/PARAM/FIELD#INNER`` (tunelab.train.optimizers)."""
    tensors, subclasses = {}, {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            flat = f"opt/{names[idx]}/{key}"
            if is_subclass_state(t):
                parts, subclasses[flat] = flatten_state(flat, t)
                tensors.update(parts)
            else:
                tensors[flat] = t
    groups = [{k: (list(v) if isinstance(v, tuple) else plain_number(v)) for k, v in g.items()}
              for g in opt_state["param_groups"]]
    return tensors, groups, subclasses


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list, names: list[str],
                         subclasses: dict[str, Any] | None = None, where: str = "optimizer.safetensors"
                         ) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("opt/"):
            continue
        flat, _, inner = key.partition("#")
        if inner:
            parts.setdefault(flat, {})[inner] = t
            continue
        name, _, field = key[4:].rpartition("/")
        state.setdefault(index[name], {})[field] = t
    for flat, spec in (subclasses or {}).items():
        name, _, field = flat[4:].rpartition("/")
        state.setdefault(index[name], {})[field] = unflatten_state(parts.get(flat, {}), spec, f"{where}: {flat}")
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


def save_checkpoint(ckpt_root: Path, state: TrainingState, param_names: list[str], keep: int = 2) -> Path:
    """Write a complete checkpoint folder atomically; keep only the newest ``keep`` checkpoints."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=ckpt_root))
    try:
        opt_tensors, groups, subclasses = _optimizer_to_flat(state.optimizer, param_names)
        atomic_save_tensors(tmp / "trainable.safetensors", state.trainable)
        atomic_save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **state.rng})
        atomic_write_json(tmp / "state.json", {
            "step": state.step, "scheduler": plain_number(state.scheduler), "param_groups": groups,
            "param_names": param_names, "counters": state.counters,
            **({"state_subclasses": subclasses} if subclasses else {}),
        })
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of an interrupted save are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> TrainingState:
    """Read one checkpoint folder; RunError naming the file when it is incomplete or damaged."""
    state_file = path / "state.json"
    try:
        meta = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{state_file}: file missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{state_file}: not valid JSON ({e})") from None
    opt_and_rng = load_tensors(path / "optimizer.safetensors")
    trainable = load_tensors(path / "trainable.safetensors")
    try:
        names = meta["param_names"]
        return TrainingState(
            step=int(meta["step"]), trainable=trainable,
            optimizer=_optimizer_from_flat(opt_and_rng, meta["param_groups"], names, meta.get("state_subclasses"),
                                           str(path / "optimizer.safetensors")),
            scheduler=meta["scheduler"],
            rng={k: v for k, v in opt_and_rng.items() if k.startswith("rng/")},
            counters=meta["counters"] | {"param_names": names},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{state_file}: incomplete or damaged ({type(e).__name__}: {e})") from None


def load_newest(ckpt_root: Path, *, set_aside: bool = True) -> tuple[Path, TrainingState] | None:
    """The newest checkpoint that loads, or None when none does.

    A damaged newer one is named in a warning and, with ``set_aside`` (the main process), renamed to
    ``step-N.damaged``: out of the way of ``keep`` (which would otherwise delete the good ones around it), kept
    for inspection.
    """
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, load_checkpoint(path)
        except RunError as e:
            aside = path.with_name(path.name + ".damaged")
            if set_aside:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            warn(f"checkpoint {path} is damaged ({e}); " + (f"moved to {aside.name}; " if set_aside else "")
                 + "trying the one before it")
    return None


def clean_temp(ckpt_root: Path) -> None:
    """Remove leftovers of a save that was killed half-way."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
