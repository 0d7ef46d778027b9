"""Models saved with ``save_pretrained``: a local directory, or a Hub model already in the local Hugging Face cache
(tunelab never downloads). Weights are read as tensors only: a pickle is refused and named, never unpickled."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import ModelError
from tunelab.files import looks_like_pickle


def with_sdpa(factory: Callable[..., PreTrainedModel], *args: Any, **kwargs: Any) -> PreTrainedModel:
    """Call ``factory`` asking for SDPA attention, falling back to eager attention where it is unsupported (named
    explicitly: the refused attempt has already written "sdpa" into a config object passed in, e.g. Gemma 2's)."""
    try:
        return factory(*args, attn_implementation="sdpa", **kwargs)
    except ValueError as err:
        if not any(word in str(err) for word in ("sdpa", "scaled_dot_product_attention")):
            raise
        return factory(*args, attn_implementation="eager", **kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_pretrained(
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
            f"could not load a tokenizer from {str(folder)!r} ({first_line(err)}); save one "
            "there with tokenizer.save_pretrained(dir) (tokenizer.json + tokenizer_config.json)."
        ) from err
    try:
        with warnings.catch_warnings():  # torch's note on the protocol of a pickle that is refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = with_sdpa(AutoModelForCausalLM.from_pretrained, folder, dtype=dtype, **options)
    except OSError as err:
        raise ModelError(f"could not load model weights from {str(folder)!r}: {first_line(err)}") from err
    except (pickle.UnpicklingError, SafetensorError) as err:
        raise _unreadable_weights(folder, err) from None
    return model, tokenizer


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
                      f"({', '.join(p.name for p in files) or 'no weights file'}): {first_line(err)}")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, spec: str) -> None:
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


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a cached Hub model, or ModelError: tunelab never downloads.

    Loading from the snapshot folder (not the id) keeps transformers off the network entirely; with an id
    it still probes the Hub for adapter files even under ``local_files_only=True``.
    """
    config = cached_hub_file(repo_id, "config.json")
    if config is None:
        raise ModelError(_offline_message(repo_id))
    return Path(config).parent


def cached_hub_file(repo_id: str, filename: str) -> str | None:
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
