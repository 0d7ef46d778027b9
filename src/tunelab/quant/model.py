"""Quantize a model's linear layers (QLoRA) or quantize and initialise LoRA (LoftQ); save and load the codes.

``quantize_model(model, section, lora)`` swaps every targeted linear layer for a ``QuantLinear`` and returns a
``QuantState``: the quantized layers, the LoftQ factors (when ``init: loftq``) and a per-layer error report.
After the LoRA method is applied, ``state.init_adapters(handle)`` copies the LoftQ factors into its A/B.
Quantized layers are saved as safetensors (codes uint8, scales fp32) with their specs in the metadata.

With ``section.embeddings`` the token embedding becomes a ``QuantEmbedding`` and the output head a ``QuantHead``
(``tunelab.quant.embedding``): a tied head shares the embedding's codes, an untied head gets its own.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.config import QuantizeSection
from tunelab.errors import QuantError as QuantError
from tunelab.methods.contract import LowRank
from tunelab.methods.core import find_targets, get_submodule_parent, linear_shape
from tunelab.quant.embedding import QuantEmbedding, QuantHead, QuantTable, quantize_table
from tunelab.quant.linear import QuantLinear, dense_weight
from tunelab.quant.loftq import loftq, relative_error
from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, dequantize, quantize

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer index of a module name (model.layers.3.mlp.up_proj -> 3; transformer.h.0.attn -> 0)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def embedding_spec(section: QuantizeSection) -> QuantSpec:
    """The QuantSpec of the embedding table (and an untied head): ``embedding_bits`` (0: ``bits``)."""
    return QuantSpec(section.quant, section.embedding_bits or section.bits, section.block, section.double_quant)


def spec_for(name: str, section: QuantizeSection) -> QuantSpec:
    """The QuantSpec of layer ``name``: ``mixed_bits`` in the first ``mixed`` decoder layers, else ``bits``."""
    index = layer_index(name)
    bits = section.mixed_bits if section.mixed and index is not None and index < section.mixed else section.bits
    return QuantSpec(section.quant, bits, section.block, section.double_quant)


@dataclass
class LayerReport:
    """One quantized layer: shape, bits, relative errors and bytes."""

    name: str
    shape: tuple[int, int]
    bits: int
    qlora_error: float  # ‖W − q_N(W)‖_F / ‖W‖_F
    loftq_error: float | None  # ‖W − Q − s·B·A‖_F / ‖W‖_F (LoftQ only)
    bytes: int  # codes + scales
    bf16_bytes: int
    kind: str = "linear"  # "linear", "embedding", "head" (untied, own codes) or "tied head" (no bytes of its own)


@dataclass
class QuantState:
    """What quantizing a model produced (see module docstring)."""

    section: QuantizeSection | None
    layers: dict[str, QuantLinear] = field(default_factory=dict)
    tables: dict[str, nn.Module] = field(default_factory=dict)  # name -> QuantEmbedding / QuantHead
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    report: list[LayerReport] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # r, alpha, rslora, scaling of the update the factors were computed for
    seconds: float = 0.0
    save_with_run: bool = True  # False when the model came from a quantized base directory

    def init_adapters(self, handle: Any, method: Any) -> None:
        """Start the method's update from the LoftQ factors (``method.init_low_rank``); a no-op without factors
        (QLoRA: the update starts at zero already)."""
        if not self.factors:
            return
        if not method.CAPABILITIES.loftq_init:
            raise QuantError(f"the quantized base carries LoftQ factors (r={self.lora['r'] if self.lora else '?'}) "
                             f"but method '{handle.name}' cannot start from them: use a method with LoftQ init "
                             f"(method: lora) on it, or quantize with init: qlora")
        method.init_low_rank(handle, self.factors, self.lora or {})

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """The quantized layers as safetensors: ``{name}.{codes,absmax,...}`` + specs and shapes in metadata."""
        save_quantized_layers(self.layers, path, extra, self.tables)


# --------------------------------------------------------------------------------------------------------------
# Quantizing a model
# --------------------------------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, section: QuantizeSection, low_rank: LowRank | None = None) -> QuantState:
    """Replace the ``section.targets`` linear layers of ``model`` with QuantLinear (QLoRA: Q = q_N(W)).

    With ``section.init == 'loftq'``, ``low_rank`` (the method's ``low_rank(config)``) gives r and the scaling s, and
    the layers LoRA will wrap get Q_T and factors from ``tunelab.quant.loftq`` (T = ``section.iters``).
    """
    t0 = time.perf_counter()
    names = find_targets(model, section.targets, kind="linear (to quantize)")
    loftq_names = _loftq_targets(model, section, low_rank)
    state = QuantState(section, lora=low_rank.info() if low_rank and loftq_names else None)
    for name in names:
        parent, attr = get_submodule_parent(model, name)
        module = getattr(parent, attr)
        layer, report, ab = _quantize_layer(name, module, spec_for(name, section), section, low_rank,
                                            name in loftq_names)
        setattr(parent, attr, layer)
        state.layers[name], state.report = layer, [*state.report, report]
        if ab is not None:
            state.factors[name] = ab
    if section.embeddings:
        state.tables, reports = quantize_embeddings(model, embedding_spec(section))
        state.report = [*state.report, *reports]
    state.seconds = time.perf_counter() - t0
    return state


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, module)


def dequantize_modules(model: nn.Module) -> int:
    """Replace every QuantLinear, QuantEmbedding and QuantHead of ``model`` by the dense nn.Linear / nn.Embedding
    holding its dequantized weights (fp32); a tied head becomes a head tied to the dense embedding. Returns how many
    modules were replaced (for ``tunelab export --format merged``)."""
    replaced = 0
    heads = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            _replace(model, name, module.to_linear(torch.float32))
            replaced += 1
        elif isinstance(module, QuantEmbedding):
            _replace(model, name, module.to_embedding(torch.float32))
            replaced += 1
        elif isinstance(module, QuantHead):
            heads.append((name, module))
    for name, head in heads:
        dense = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        with torch.no_grad():
            if head.tied:
                dense.weight = model.get_input_embeddings().weight
            else:
                dense.weight.copy_(head.source.dequantize(torch.float32))
            if head.bias is not None:
                dense.bias.copy_(head.bias)
        _replace(model, name, dense)
        replaced += 1
    return replaced


def quantize_embeddings(model: nn.Module, spec: QuantSpec) -> tuple[dict[str, nn.Module], list[LayerReport]]:
    """Swap the input embedding for a QuantEmbedding and the output head (an nn.Linear) for a QuantHead: over the
    same codes when the head is tied to the embedding (``head.weight is embedding.weight``), else its own."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in is not None else None
    if not isinstance(emb, nn.Embedding):
        raise QuantError(f"quantize.embeddings: {type(model).__name__} has no nn.Embedding input table "
                         f"(get_input_embeddings() is {type(emb).__name__}); set quantize.embeddings: false")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_name = _module_name(model, emb)
    w = emb.weight.detach().float()
    qemb = QuantEmbedding.from_embedding(emb, spec)
    err = relative_error(w, qemb.dequantize())
    tables: dict[str, nn.Module] = {emb_name: qemb}
    reports = [LayerReport(emb_name, tuple(w.shape), spec.bits, err, None, qemb.nbytes(), 2 * w.numel(), "embedding")]
    _replace(model, emb_name, qemb)
    if isinstance(head, nn.Linear):  # a head already quantized as a linear layer (explicit targets) is left alone
        head_name = _module_name(model, head)
        bias = head.bias
        if head.weight is emb.weight:
            qhead = QuantHead(qemb, tied=True, bias=bias)
            reports.append(LayerReport(head_name, tuple(w.shape), spec.bits, err, None, 0, 0, "tied head"))
        else:
            hw = head.weight.detach().float()
            table = QuantTable(quantize_table(hw, spec), hw.shape[1]).to(hw.device)
            qhead = QuantHead(table, tied=False, bias=bias)
            reports.append(LayerReport(head_name, tuple(hw.shape), spec.bits, relative_error(hw, table.dequantize()),
                                       None, table.nbytes(), 2 * hw.numel(), "head"))
        tables[head_name] = qhead
        _replace(model, head_name, qhead)
    return tables, reports


def _loftq_targets(model: nn.Module, section: QuantizeSection, low_rank: LowRank | None) -> set[str]:
    if section.init != "loftq":
        return set()
    if low_rank is None:
        raise QuantError("quantize.init: loftq initialises the factors of a low-rank update: it needs a method that "
                         "starts from them (method: lora), or use quantize.init: qlora with any other method")
    return set(find_targets(model, low_rank.targets))


def _quantize_layer(name: str, module: nn.Module, spec: QuantSpec, section: QuantizeSection, low_rank: Any,
                    use_loftq: bool) -> tuple[QuantLinear, LayerReport, tuple[torch.Tensor, torch.Tensor] | None]:
    w = dense_weight(module)
    d_in, d_out = linear_shape(module)
    ab = None
    if use_loftq:
        res = loftq(w, spec, low_rank.r, low_rank.scaling, section.iters)
        qt, qlora_err, loftq_err, ab = res.qweight, res.qlora_error, res.error, (res.A, res.B)
    else:
        qt = quantize(w, spec)
        qlora_err, loftq_err = relative_error(w, dequantize(qt)), None
    layer = QuantLinear(qt, getattr(module, "bias", None))
    report = LayerReport(name, (d_out, d_in), spec.bits, qlora_err, loftq_err, qt.nbytes(), 2 * d_in * d_out)
    return layer, report, ab


# --------------------------------------------------------------------------------------------------------------
# Saving and loading quantized layers
# --------------------------------------------------------------------------------------------------------------

FORMAT = "tunelab-quantized-layers/1"
FORMAT_TABLES = "tunelab-quantized-layers/2"  # /1 plus quantized embedding / head entries ("kind" in the specs)


def save_quantized_layers(layers: dict[str, QuantLinear], path: str | Path, extra: dict[str, Any] | None = None,
                          tables: dict[str, nn.Module] | None = None) -> None:
    """safetensors with every layer's codes and scales; metadata: format, per-layer spec and shape, ``extra``.

    ``tables`` (QuantEmbedding / QuantHead by module name) add entries of kind ``embedding`` and ``head``; a tied
    head stores no tensors, only ``tied_to``: the embedding's name. Files without tables keep format /1."""
    from tunelab.files import atomic_save_tensors

    tensors, specs = {}, {}
    for name, layer in layers.items():
        for key, t in layer.qweight().tensors().items():
            tensors[f"{name}.{key}"] = t
        specs[name] = {"shape": [layer.out_features, layer.in_features], **asdict(layer.spec)}
    tables = tables or {}
    names = {id(m): n for n, m in tables.items()}
    for name, module in tables.items():
        if isinstance(module, QuantHead) and module.tied:
            if id(module.source) not in names:
                raise QuantError(f"tied head {name}: its embedding is not among the saved tables")
            specs[name] = {"kind": "head", "tied_to": names[id(module.source)]}
            continue
        table = module.source if isinstance(module, QuantHead) else module
        for key, t in table.qweight().tensors().items():
            tensors[f"{name}.{key}"] = t
        info = {"kind": "head" if isinstance(module, QuantHead) else "embedding",
                "shape": [table.num_embeddings, table.padded_dim], "embedding_dim": table.embedding_dim,
                **asdict(table.spec)}
        if isinstance(module, QuantEmbedding):
            info |= {"embed_scale": module.embed_scale, "padding_idx": module.padding_idx}
        specs[name] = info
    meta = {"format": FORMAT_TABLES if tables else FORMAT, "layers": json.dumps(specs),
            "extra": json.dumps(extra or {})}
    atomic_save_tensors(path, tensors, metadata=meta)


def read_quantized_entries(path: str | Path) -> tuple[dict[str, tuple[dict[str, Any], QuantizedTensor | None]],
                                                         dict[str, Any]]:
    """Every saved entry as (info, QuantizedTensor or None for a tied head), and the ``extra`` metadata. ``info``
    holds ``kind`` ("linear", "embedding", "head") and, for tables, ``embedding_dim`` (and ``tied_to``)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in (FORMAT, FORMAT_TABLES):
            raise QuantError(f"{path} is not a tunelab quantized-layers file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r} or {FORMAT_TABLES!r}); write one with `tunelab quantize`")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    out: dict[str, tuple[dict[str, Any], QuantizedTensor | None]] = {}
    spec_keys = set(QuantSpec.__dataclass_fields__)
    for name, info in json.loads(meta["layers"]).items():
        info.setdefault("kind", "linear")
        if "tied_to" in info:
            out[name] = (info, None)
            continue
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and "." not in
               k[len(name) + 1:]}
        spec = QuantSpec(**{k: v for k, v in info.items() if k in spec_keys})
        out[name] = (info, QuantizedTensor.from_tensors(own, tuple(info["shape"]), spec))
    return out, json.loads(meta.get("extra", "{}"))


def read_quantized_layers(path: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """The QuantizedTensors of the linear layers saved by ``save_quantized_layers`` and its ``extra`` metadata."""
    entries, extra = read_quantized_entries(path)
    return {n: qt for n, (info, qt) in entries.items() if info["kind"] == "linear" and qt is not None}, extra


def install_quantized_layers(model: nn.Module, path: str | Path) -> QuantState:
    """Swap the saved layers into ``model`` (biases come from the model's own layers); shapes are checked."""
    entries, _ = read_quantized_entries(path)
    saved = {n: qt for n, (info, qt) in entries.items() if info["kind"] == "linear" and qt is not None}
    state = QuantState(None, save_with_run=False)
    for name, qt in saved.items():
        try:
            parent, attr = get_submodule_parent(model, name)
            module = getattr(parent, attr)
        except AttributeError:
            raise QuantError(f"{path}: layer {name} does not exist in {type(model).__name__}; was it quantized "
                             f"from another base model?") from None
        d_in, d_out = linear_shape(module)
        if (d_out, d_in) != qt.shape:
            raise QuantError(f"{path}: layer {name} was saved with shape {qt.shape}, the model has {(d_out, d_in)}")
        state.layers[name] = QuantLinear(qt, getattr(module, "bias", None))
        setattr(parent, attr, state.layers[name])
    _install_tables(model, path, entries, state)
    return state


def _install_tables(model: nn.Module, path: str | Path, entries: dict[str, Any], state: QuantState) -> None:
    """Embeddings first, then heads (a tied head points at its installed embedding)."""
    def module_at(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"{path}: {name} does not exist in {type(model).__name__}; was it quantized from "
                             f"another base model?") from None

    for kind in ("embedding", "head"):
        for name, (info, qt) in entries.items():
            if info["kind"] != kind:
                continue
            module = module_at(name)
            if qt is None:  # tied head
                source = state.tables.get(info["tied_to"])
                if not isinstance(source, QuantEmbedding):
                    raise QuantError(f"{path}: head {name} is tied to {info['tied_to']}, which was not installed")
                if tuple(module.weight.shape) != (source.num_embeddings, source.embedding_dim):
                    raise QuantError(f"{path}: head {name} has shape {tuple(module.weight.shape)}, its tied "
                                     f"embedding {(source.num_embeddings, source.embedding_dim)}")
                table: QuantTable = source
            else:
                dense = module.weight
                if (int(dense.shape[0]), int(dense.shape[1])) != (qt.shape[0], info["embedding_dim"]):
                    raise QuantError(f"{path}: {name} was saved with shape {(qt.shape[0], info['embedding_dim'])}, "
                                     f"the model has {tuple(dense.shape)}")
                if kind == "embedding":
                    table = QuantEmbedding(qt, info["embedding_dim"], info.get("embed_scale"), info.get("padding_idx"))
                    table.out_dtype = dense.dtype
                else:
                    table = QuantTable(qt, info["embedding_dim"])
                table = table.to(dense.device)
            new = table if kind == "embedding" else QuantHead(table, tied=qt is None, bias=getattr(module, "bias", None))
            state.tables[name] = new
            _replace(model, name, new)


# --------------------------------------------------------------------------------------------------------------
# Memory and reports
# --------------------------------------------------------------------------------------------------------------


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of the model's weights as held (quantized layers and tables: codes + scales) against everything in
    bf16. ``quantized_*`` covers every quantized weight, ``linear_*`` / ``embedding_*`` split it (embedding: the
    token table and an untied head's own table; a tied head shares the embedding's codes and adds nothing);
    every remaining parameter (norms, biases, an unquantized embedding, adapters) counts 2 bytes in both."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    tables = [m for m in model.modules() if isinstance(m, QuantTable)]  # a tied head's table is not registered
    lin_bytes = sum(m.nbytes() for m in quant)
    lin_bf16 = sum(2 * m.in_features * m.out_features for m in quant)
    emb_bytes = sum(m.nbytes() for m in tables)
    emb_bf16 = sum(2 * m.num_embeddings * m.embedding_dim for m in tables)
    q_bytes, q_bf16 = lin_bytes + emb_bytes, lin_bf16 + emb_bf16
    params = {id(p): p for p in model.parameters()}.values()
    other = sum(p.numel() * 2 for p in params)  # every parameter (embeddings, norms, biases, adapters) in bf16
    return {"quantized_layers": len(quant), "quantized_tables": len(tables),
            "quantized_bytes": q_bytes, "quantized_bf16_bytes": q_bf16,
            "quantized_ratio": q_bytes / q_bf16 if q_bf16 else None,
            "linear_bytes": lin_bytes, "linear_bf16_bytes": lin_bf16,
            "linear_ratio": lin_bytes / lin_bf16 if lin_bf16 else None,
            "embedding_bytes": emb_bytes, "embedding_bf16_bytes": emb_bf16,
            "embedding_ratio": emb_bytes / emb_bf16 if emb_bf16 else None,
            "other_bf16_bytes": other, "embeddings_quantized": bool(tables),
            "model_bytes": q_bytes + other, "model_bf16_bytes": q_bf16 + other,
            "model_ratio": (q_bytes + other) / (q_bf16 + other) if q_bf16 + other else None}


def format_report(report: list[LayerReport], memory: dict[str, Any] | None = None) -> str:
    """A plain-text table: layer, shape, bits, QLoRA ‖W − Q‖/‖W‖, LoftQ ‖W − Q − sBA‖/‖W‖, KiB."""
    head = f"{'layer':<44} {'shape':>11} {'bits':>4} {'QLoRA err':>10} {'LoftQ err':>10} {'KiB':>8} {'bf16 KiB':>9}"
    lines = [head, "-" * len(head)]
    for r in report:
        loftq_cell = f"{r.loftq_error:.4f}" if r.loftq_error is not None else "–"
        name = r.name if r.kind == "linear" else f"{r.name} ({r.kind})"
        size = ("(shared)", "") if r.kind == "tied head" else (f"{r.bytes / 1024:.1f}", f"{r.bf16_bytes / 1024:.1f}")
        lines.append(f"{name:<44} {'x'.join(map(str, r.shape)):>11} {r.bits:>4} {r.qlora_error:>10.4f} "
                     f"{loftq_cell:>10} {size[0]:>8} {size[1]:>9}")
    linears = [r for r in report if r.kind == "linear"]
    if linears:
        mean_q = sum(r.qlora_error for r in linears) / len(linears)
        lofts = [r.loftq_error for r in linears if r.loftq_error is not None]
        mean_l = f"{sum(lofts) / len(lofts):.4f}" if lofts else "–"
        lines.append(f"{'mean (linear layers)':<44} {'':>11} {'':>4} {mean_q:>10.4f} {mean_l:>10}")
    if memory:
        lines.append(_memory_line(memory))
    return "\n".join(lines)


def _ratio(r: float | None) -> str:
    return f"{r:.3f}x" if r is not None else "–"


def _memory_line(m: dict[str, Any]) -> str:
    mib = 2**20
    ratio = _ratio
    linear = m.get("linear_bytes", m["quantized_bytes"])
    linear_bf16 = m.get("linear_bf16_bytes", m["quantized_bf16_bytes"])
    parts = [f"memory: quantized linear layers {linear / mib:.1f} MiB vs {linear_bf16 / mib:.1f} MiB bf16 "
             f"({ratio(m.get('linear_ratio', m['quantized_ratio']))})"]
    if m.get("embeddings_quantized"):
        parts.append(f"embedding table(s) {m['embedding_bytes'] / mib:.1f} MiB vs "
                     f"{m['embedding_bf16_bytes'] / mib:.1f} MiB bf16 ({ratio(m['embedding_ratio'])})")
        rest = "norms, biases stay bf16"
    else:
        rest = "embeddings, norms stay bf16"
    parts.append(f"whole model {m['model_bytes'] / mib:.1f} MiB vs {m['model_bf16_bytes'] / mib:.1f} MiB bf16 "
                 f"({ratio(m['model_ratio'])}; {rest})")
    return "; ".join(parts)
