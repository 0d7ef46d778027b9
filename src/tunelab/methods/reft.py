"""Representation fine-tuning (ReFT; Wu et al., 2024, https://arxiv.org/abs/2404.03592): shared machinery of
LoReFT and DiReFT (the methods themselves are ``tunelab.methods.loreft`` and ``tunelab.methods.direft``).

The base model is frozen; at chosen layers and prompt positions the hidden state h ∈ ℝ^d of the residual stream
(the output of a decoder layer) is replaced by Φ(h):

    LoReFT:  Φ(h) = h + Rᵀ(a(W h + b) − R h),   R ∈ ℝ^{r×d} with orthonormal rows (R Rᵀ = I_r)
    DiReFT:  Φ(h) = h + W₂ᵀ a(W₁ h + b),          W₂ ∈ ℝ^{r×d} unconstrained

with W, W₁ ∈ ℝ^{r×d}, b ∈ ℝ^r and a the activation (identity by default): 2rd + r parameters per intervention.
As in pyreft, dropout acts on Φ(h) (``Dropout(Φ(h))``), R and W₂ start with orthonormal rows and W, b with
nn.Linear's initialisation, so neither method is the identity at initialisation.

Positions: the first n and last m tokens of each example's prompt ("f7+l7"). With both spans each is clamped to
⌊L/2⌋ for a prompt of L tokens (pyreft's rule: the spans never overlap), a single span to L. Tied weights share one
intervention per layer for all positions; untied ones have a prefix and a suffix intervention per layer.

Where positions come from (per example, either padding side): the real tokens of a row are those of the attention
mask; the prompt is the first ``current_prompt_lengths()[b]`` of them when a caller set the span
(``tunelab.methods.core.prompt_lengths``: training and evaluation losses derive it from the labels,
log-likelihood scoring from the context), else all of them — the prefill pass of generation, whose prompt is the
whole input. Edited prompt states reach later tokens through the keys/values cached in the prefill; decode steps
(a non-empty cache) are not touched and cost one cache-length check per forward.

Orthonormal R at low cost: the stored parameter is an unconstrained R̃ and the forward uses
R = rows(QR(R̃ᵀ).Q) with the signs fixed so that diag(QR(R̃ᵀ).R) > 0 — one reduced QR of a d×r matrix (O(d r²)) per
intervention per forward, shared by all positions and both uses of R in Φ; its backward is exact. On orthonormal
rows the map is the identity, so ``fold()`` writes R into R̃ when a run is saved and the saved R has R Rᵀ = I to
float precision. (pyreft's ``parametrizations.orthogonal`` recomputes a Householder product on every access of the
weight, twice per intervention per forward, and differentiates through it.)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.bottleneck import ACTIVATIONS, map_first
from tunelab.methods.core import MethodError, MethodHandle, current_prompt_lengths, embedding_device, freeze

MODULE_NAME = "reft"
NO_MERGE = ("ReFT edits hidden states at a few prompt positions chosen per example, not a weight applied to every "
            "token: no weight update equals it")
POSITIONS = re.compile(r"^(?:f(\d+))?(?:\+)?(?:l(\d+))?$")
Spans = dict[str, tuple[torch.Tensor, torch.Tensor]]  # span name -> (row indices, column indices)


@dataclass(frozen=True)
class ReftConfig:
    """Options shared by LoReFT and DiReFT (each method's ``Config`` subclasses this)."""

    r: int = 4  # rank of the intervention (pyreft's low_rank_dimension)
    layers: str | list[int] = "all"  # "all" or decoder-layer indices, e.g. [2, 10, 18, 26]
    positions: str = "f7+l7"  # first n and last m prompt tokens: "f7+l7", "f5", "l1"
    tied: bool = True  # one intervention per layer for all positions (pyreft's share_weights); else prefix/suffix
    dropout: float = 0.0  # on Φ(h), as pyreft
    activation: Literal["linear", "relu", "gelu", "silu", "tanh"] = "linear"  # a(·); linear = identity

    method: ClassVar[str] = "reft"
    orthogonal: ClassVar[bool] = True  # R has orthonormal rows and Φ subtracts R h (LoReFT)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"{self.method}: r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"{self.method}: layers must be 'all' or a list of layer indices, got {self.layers!r}")
        parse_positions(self.positions, self.method)

    @property
    def spans(self) -> tuple[int, int]:
        """(n, m): the first n and last m prompt tokens."""
        return parse_positions(self.positions, self.method)


def parse_positions(text: str, method: str = "reft") -> tuple[int, int]:
    """'f7+l7' -> (7, 7), 'f3' -> (3, 0), 'l1' -> (0, 1) (the paper's notation)."""
    match = POSITIONS.match(text.replace(" ", ""))
    if not text or match is None:
        raise ConfigError(f"{method}: positions {text!r} is not of the form 'f<n>+l<m>' (e.g. 'f7+l7', 'f5', 'l1')")
    n, m = (int(g) if g else 0 for g in match.groups())
    if n + m == 0:
        raise ConfigError(f"{method}: positions {text!r} selects no token; use e.g. 'f7+l7'")
    return n, m


# --------------------------------------------------------------------------------------------------------------
# The equations (the one place they are computed)
# --------------------------------------------------------------------------------------------------------------


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """R with orthonormal rows spanning the rows of ``a`` [r, d] (r ≤ d), in fp32.

    R = Qᵀ where Q R_qr = aᵀ is the reduced QR with diag(R_qr) > 0 (Gram-Schmidt of the rows of ``a``): unique,
    differentiable, and the identity on matrices whose rows are already orthonormal.
    """
    with torch.autocast(a.device.type, enabled=False):
        q, r = torch.linalg.qr(a.float().T)
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
        return (q * sign).T


def reft_phi(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, proj: torch.Tensor,
             act: Callable[[torch.Tensor], torch.Tensor], *, subtract: bool) -> torch.Tensor:
    """Φ(h) for rows h [N, d]: LoReFT h + projᵀ(a(W h + b) − proj h) (``subtract``), DiReFT h + projᵀ a(W h + b).

    ``w`` [r, d], ``b`` [r], ``proj`` [r, d] (R or W₂). Computed in the parameters' dtype (or autocast's), returned
    in h's dtype.
    """
    x = h.to(w.dtype)
    z = act(F.linear(x, w, b))
    if subtract:
        z = z - F.linear(x, proj)
    return (x + z @ proj).to(h.dtype)


class Intervention(nn.Module):
    """One intervention: ``source`` (W, b) and ``project`` (R̃ for LoReFT, W₂ for DiReFT), both [r, d]."""

    def __init__(self, d: int, r: int, *, orthogonal: bool, activation: str, dropout: float,
                 device: torch.device) -> None:
        super().__init__()
        self.orthogonal, self.activation = orthogonal, activation
        self.project = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d, device=device)))
        self.source = nn.Linear(d, r, device=device)  # W, b: nn.Linear's init, as pyreft's learned_source
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = ACTIVATIONS.get(activation, _identity)

    def projection(self) -> torch.Tensor:
        """R (orthonormal rows, from R̃) for LoReFT; W₂ for DiReFT."""
        return orthonormal_rows(self.project) if self.orthogonal else self.project

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Φ(h) of rows h [N, d], then dropout."""
        proj = self.projection().to(self.source.weight.dtype)
        return self.dropout(reft_phi(h, self.source.weight, self.source.bias, proj, self.act,
                                     subtract=self.orthogonal))

    @torch.no_grad()
    def fold(self) -> None:
        """Store R itself (outputs unchanged: the parametrisation is the identity on orthonormal rows)."""
        if self.orthogonal:
            self.project.copy_(orthonormal_rows(self.project).to(self.project.dtype))

    def extra_repr(self) -> str:
        return f"r={self.project.shape[0]}, d={self.project.shape[1]}, orthogonal={self.orthogonal}, " \
               f"activation={self.activation}"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# --------------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------------


def clamp_spans(length: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_b, m_b) per row for prompts of ``length`` [B] tokens: each ⌊L/2⌋ at most when both spans are used
    (pyreft's rule, so that they never overlap), L at most for a single span."""
    cap = length // 2 if n and m else length
    return torch.clamp(cap, max=n), torch.clamp(cap, max=m)


def prompt_spans(mask: torch.Tensor, prompt_len: torch.Tensor | None, n: int, m: int, tied: bool) -> Spans:
    """Indices (rows, columns) of the intervened positions of a batch.

    ``mask`` [B, T] marks the real tokens (one contiguous run per row: right or left padding); the prompt is the
    first ``prompt_len[b]`` real tokens of row b (all of them when None). Spans: {"all"} when tied, else
    {"first", "last"} (the ones with n > 0 / m > 0).
    """
    real = mask.bool()
    start = real.int().argmax(dim=1)
    length = real.sum(dim=1)
    if prompt_len is not None:
        length = torch.minimum(length, prompt_len.to(length.device))
    n_b, m_b = clamp_spans(length, n, m)
    spans = {"first": _span(start, n_b, n), "last": _span(start + length - m_b, m_b, m)}
    spans = {k: v for k, v in spans.items() if (n if k == "first" else m) > 0}
    if tied:
        rows, cols = zip(*spans.values(), strict=True)
        return {"all": (torch.cat(rows), torch.cat(cols))}
    return spans


def _span(begin: torch.Tensor, count: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of positions begin[b] + j for j < count[b] (width = max count)."""
    j = torch.arange(width, device=begin.device)
    keep = j[None, :] < count[:, None]
    rows = torch.arange(len(begin), device=begin.device)[:, None].expand(-1, width)
    return rows[keep], (begin[:, None] + j[None, :])[keep]


class PositionTracker:
    """Forward pre-hook on the decoder body: computes the intervened positions of each call once, for all layers.

    A call with a non-empty cache is a decode step: no positions (the layers' hooks then do nothing).
    """

    def __init__(self, body: nn.Module, container: ReftInterventions, n: int, m: int, tied: bool) -> None:
        self.body, self.container = body, container
        self.n, self.m, self.tied = n, m, tied
        self.signature = inspect.signature(body.forward)
        self.var_kwargs = next((k for k, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), "")
        self.spans: Spans | None = None

    def __call__(self, body: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.spans = None
        if not self.container.enabled:
            return
        kw = self.signature.bind_partial(*args, **kwargs).arguments
        kw = {**kw, **kw.get(self.var_kwargs, {})}
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return
        inputs = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        mask = self._mask(kw.get("attention_mask"), kw.get("position_ids"), inputs)
        self.spans = prompt_spans(mask, self._prompt_lengths(len(mask)), self.n, self.m, self.tied)

    def _mask(self, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
              inputs: torch.Tensor) -> torch.Tensor:
        if mask is None:
            if position_ids is not None and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any()):
                raise MethodError(f"{self.container.method}: packed rows (position_ids restarting) hold several "
                                  f"prompts per row; ReFT needs one example per row: set data.packing: false")
            return torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
        if mask.ndim != 2:
            raise MethodError(f"{self.container.method}: needs a 2-D attention mask [batch, tokens] to find each "
                              f"row's tokens (got {mask.ndim}-D); call the model with a 2-D padding mask")
        return mask

    def _prompt_lengths(self, batch: int) -> torch.Tensor | None:
        lengths = current_prompt_lengths()
        if lengths is not None and len(lengths) != batch:
            raise MethodError(f"{self.container.method}: prompt_lengths(...) gives {len(lengths)} rows but the "
                              f"model was called with {batch}; set it for the batch being run")
        return lengths


class LayerEdit:
    """Forward hook on one decoder layer: replaces h at the tracked positions by Φ(h) (per span)."""

    def __init__(self, tracker: PositionTracker, interventions: dict[str, Intervention]) -> None:
        self.tracker, self.interventions = tracker, interventions

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        spans = self.tracker.spans
        if spans is None:
            return None
        return map_first(output, lambda h: self.edit(h, spans), f"{self.tracker.container.method} layer hook")

    def edit(self, h: torch.Tensor, spans: Spans) -> torch.Tensor:
        for span, intervention in self.interventions.items():
            rows, cols = spans[span]
            if len(rows):
                h = h.index_put((rows, cols), intervention(h[rows, cols]))
        return h


# --------------------------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------------------------


class ReftInterventions(nn.ModuleDict):
    """All interventions of one model, keyed ``layer{i}`` (tied) or ``layer{i}_first`` / ``layer{i}_last``."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method, self.enabled = method, True

    def fold(self) -> None:
        for intervention in self.values():
            intervention.fold()

    def unwrap(self) -> None:
        return None  # added to the model, not wrapping a module: remove() deletes it


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (Llama ``layers``, GPT-2 ``h``, ...): the ModuleList of num_hidden_layers."""
    body = model.base_model
    count = model.config.get_text_config(decoder=True).num_hidden_layers
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        raise MethodError(f"reft: cannot find the decoder layers of {type(body).__name__} (expected one ModuleList "
                          f"of {count} layers among its children {[n for n, _ in body.named_children()]})")
    return lists[0]


def chosen_layers(config: ReftConfig, count: int) -> list[int]:
    if config.layers == "all":
        return list(range(count))
    bad = [i for i in config.layers if not 0 <= i < count]
    if bad or len(set(config.layers)) != len(config.layers) or not config.layers:
        raise MethodError(f"{config.method}: layers {config.layers} must be distinct indices in 0..{count - 1} "
                          f"(the model has {count} decoder layers), or 'all'")
    return sorted(config.layers)


def span_names(config: ReftConfig) -> list[str]:
    n, m = config.spans
    if config.tied:
        return ["all"]
    return [s for s, k in (("first", n), ("last", m)) if k > 0]


def apply_reft(model: nn.Module, config: ReftConfig) -> MethodHandle:
    """Freeze ``model``, add the interventions as ``model.reft`` and hook them into the decoder layers."""
    layers = decoder_layers(model)
    indices = chosen_layers(config, len(layers))
    d = model.config.get_text_config(decoder=True).hidden_size
    if config.r > d:
        raise MethodError(f"{config.method}: r={config.r} is larger than the hidden width {d}; use r <= {d}")
    freeze(model)
    device = embedding_device(model.get_input_embeddings())
    container = ReftInterventions(config.method)
    for i in indices:
        for span in span_names(config):
            container[f"layer{i}" + ("" if span == "all" else f"_{span}")] = Intervention(
                d, config.r, orthogonal=config.orthogonal, activation=config.activation, dropout=config.dropout,
                device=device)
    model.add_module(MODULE_NAME, container)
    handle = MethodHandle(name=config.method, model=model, config=config, layers={MODULE_NAME: container},
                          merge_note=NO_MERGE, fold=container.fold)
    tracker = PositionTracker(model.base_model, container, *config.spans, config.tied)
    handle.add_hook(model.base_model.register_forward_pre_hook(tracker, with_kwargs=True))
    for i in indices:
        own = {s: container[f"layer{i}" + ("" if s == "all" else f"_{s}")] for s in span_names(config)}
        handle.add_hook(layers[i].register_forward_hook(LayerEdit(tracker, own)))
    return handle


def count_reft(model: nn.Module, config: ReftConfig) -> int:
    """Closed form: (2rd + r) per intervention × chosen layers × (1 tied, else the number of spans used)."""
    d = model.config.get_text_config(decoder=True).hidden_size
    n_layers = len(chosen_layers(config, model.config.get_text_config(decoder=True).num_hidden_layers))
    return (2 * config.r * d + config.r) * n_layers * len(span_names(config))
