"""`tunelab export RUN --format merged|peft --out DIR`: a finished run in a format other tools load.

* ``merged`` — a transformers ``save_pretrained`` folder (safetensors) of the base with the run's update folded in,
  for every method whose update is a weight change: full tuning (the trained weights), and the methods whose
  ``CAPABILITIES.mergeable`` says so (LoRA, random masking; on a quantized base the merged model is the dequantized
  base plus the update, in fp32). Load it with ``AutoModelForCausalLM.from_pretrained(DIR)``: no tunelab needed.
* ``gguf`` — the merged model as one GGUF file (``OUT/model.gguf``, fp32 tensors, the tokenizer's vocabulary
  and merges), for llama.cpp and for transformers' GGUF loader; Llama-architecture models (SmolLM2, Llama,
  Mistral).
* ``peft`` — the peer format of the methods that write one (``CAPABILITIES.exports``: LoRA, prompt tuning, prefix
  tuning — peft's LORA, PROMPT_TUNING and PREFIX_TUNING).

Methods whose update is not a weight change (prompt and prefix tuning, ReFT, bottleneck adapters) have no merged
form; the error says so and names the formats that exist (peft for prompt and prefix tuning; none for ReFT and the
bottleneck adapters, which no other tool loads — use the run with tunelab).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import RunError
from tunelab.files import atomic_write_text
from tunelab.loading import load_run
from tunelab.methods import get_method
from tunelab.rundir import read_meta

FORMATS = ("merged", "peft", "gguf")
EXPORT_FILE = "tunelab-export.json"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "merged") -> Path:
    """Write run ``run_dir`` to ``out`` in format ``fmt``; returns ``out``."""
    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    model, tokenizer, handle, cfg = load_run(run_dir, dtype="fp32")
    method = get_method(cfg.method_name())
    caps = method.CAPABILITIES
    if fmt == "peft":
        if "peft" not in caps.exports:
            raise RunError(f"{run_dir}: method '{cfg.method_name()}' has no peft format here (methods with one: "
                           f"lora, prompt, prefix); {_other_formats(caps)}")
        method.export(handle, out, read_meta(run_dir).get("base_model", ""))
        return out
    if caps.trains_base_weights:
        merged = model
    elif caps.mergeable:
        merged = handle.merge_and_unload()
    else:
        raise RunError(f"{run_dir}: method '{cfg.method_name()}' cannot be merged into the weights: "
                       f"{handle.merge_note or 'its update is not a weight change'}. {_other_formats(caps)}")
    densify(merged)
    if fmt == "gguf":
        write_gguf(merged, tokenizer, out / "model.gguf", name=f"{cfg.method_name()} run {run_dir.name}")
    else:
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    meta = read_meta(run_dir)
    atomic_write_text(out / EXPORT_FILE, json.dumps({
        "format": fmt, "run": str(run_dir.resolve()), "method": cfg.method_name(),
        "base_model": meta.get("base_model"), "base_fingerprint": meta.get("base_fingerprint"),
        "quantized_base": cfg.quantize is not None or "quantize" in str(meta.get("base_model", "")),
    }, indent=1) + "\n")
    return out


def _other_formats(caps: Any) -> str:
    if caps.exports:
        return f"Formats for it: {', '.join(caps.exports)} (--format {caps.exports[0]})."
    return ("No other tool loads this method's update: use the run with tunelab (tunelab eval / generate, "
            "tunelab.loading.load_run).")


def densify(model: nn.Module) -> None:
    """Replace tunelab's quantized modules by dense ones and give every layer back the module class the
    architecture defines (a quantized or merged GPT-2 ``Conv1D`` came back as ``nn.Linear``), so that
    ``save_pretrained`` writes the checkpoint transformers expects."""
    from tunelab.quant.model import dequantize_modules

    dequantize_modules(model)
    _restore_architecture_modules(model)


def _restore_architecture_modules(model: nn.Module) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear):
            continue
        try:
            expected = skeleton.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(expected, Conv1D):
            conv = Conv1D(module.out_features, module.in_features)
            with torch.no_grad():
                conv.weight.copy_(module.weight.detach().T)
                if module.bias is not None:
                    conv.bias.copy_(module.bias.detach())
                else:
                    conv.bias.zero_()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)


# --------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's layout, read back by transformers' GGUF loader)
# --------------------------------------------------------------------------------------------------------------

GGUF_ARCHS = ("llama", "mistral")  # written as llama.cpp's "llama" architecture
_LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's name of a Llama checkpoint tensor (None for one it does not store)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        key = ".".join(parts[3:-1])
        if key in _LAYER_TENSORS:
            return f"blk.{parts[2]}.{_LAYER_TENSORS[key]}.{parts[-1]}"
    return None


def _rope_permute(w: Any, heads: int) -> Any:
    """llama.cpp's layout of q/k rows for its rotary kernel (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, name: str = "tunelab export") -> Path:
    """One GGUF file of ``model`` (a dense Llama-architecture model) and its tokenizer."""
    import gguf

    cfg = model.config
    if cfg.model_type not in GGUF_ARCHS:
        raise RunError(f"--format gguf writes Llama-architecture models ({', '.join(GGUF_ARCHS)}); this is "
                       f"{cfg.model_type!r}: export --format merged and convert it with llama.cpp's "
                       f"convert_hf_to_gguf.py")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        target = gguf_tensor_name(key)
        if target is None:
            continue
        w = tensor.detach().float().cpu().numpy()
        if ".attn_q." in target:
            w = _rope_permute(w, heads)
        elif ".attn_k." in target:
            w = _rope_permute(w, kv_heads)
        writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _add_tokenizer(writer: Any, tokenizer: Any, cfg: Any) -> None:
    """The vocabulary, merges and special tokens of a byte-level BPE tokenizer (llama.cpp's "gpt2" model)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise RunError(f"--format gguf: the tokenizer is a {model.get('type')} model; only byte-level BPE "
                       f"tokenizers (SmolLM2's, Llama 3's) are written")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [""] * max(cfg.vocab_size, max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
