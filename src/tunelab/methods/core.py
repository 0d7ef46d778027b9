"""The method-agnostic core: target matching, freezing, counting, the handle that saves/loads/merges.

A method is one module with a typed ``Config`` and ``apply(model, config) -> MethodHandle``. This file knows
nothing about any particular method: methods that wrap layers give the handle their wrapper modules (each may
implement ``merge()``, ``unmerge()`` and ``unwrap()``); methods that act through hooks register them with
``handle.add_hook`` so that ``remove()`` takes off exactly the hooks the method added. Methods that act on prompt
positions (ReFT) read the prompt span of each row from ``current_prompt_lengths()``, which the callers that know it
(the training objective, log-likelihood scoring) set with ``prompt_lengths(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tunelab.errors import MethodError as MethodError

# --------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"
ROLES = ("attention", "mlp")  # target presets by module role: the linears inside each block's attention / MLP


def module_role(module: nn.Module) -> str | None:
    """"attention" or "mlp" for a decoder block's attention or MLP module, by the convention every transformers
    family follows in its class names (LlamaAttention, GPTNeoXAttention, Phi3MLP, GPT2MLP, …); None otherwise."""
    name = type(module).__name__
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "mlp"
    return None


def _role_members(model: nn.Module, role: str) -> set[str]:
    """Names of every module inside a module of ``role``."""
    inside = set()
    for prefix, module in model.named_modules():
        if prefix and module_role(module) == role:
            inside.update(f"{prefix}.{n}" if n else prefix for n, _ in module.named_modules())
    return inside


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' GPT-2 style Conv1D (a linear layer stored as [in, out]), or a quantized linear
    layer (``tunelab.quant.QuantLinear``: ``is_quantized``, ``in_features``, ``out_features``)."""
    if isinstance(module, nn.Linear) or getattr(module, "is_quantized", False):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if isinstance(module, nn.Linear) or getattr(module, "is_quantized", False):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: weight is [in, out]
    return int(w.shape[0]), int(w.shape[1])


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output projection (never targeted by 'all-linear')."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def embedding_dtype(emb: nn.Module) -> torch.dtype:
    """The dtype an input-embedding module returns outside autocast: its table's, or a quantized embedding's
    ``dtype`` (``tunelab.quant.QuantEmbedding`` holds codes; its ``weight`` is a full dequantization)."""
    return emb.dtype if getattr(emb, "is_quantized_embedding", False) else emb.weight.dtype


def embedding_device(emb: nn.Module) -> torch.device:
    """The device of an input-embedding module (dense or quantized)."""
    return emb.codes.device if getattr(emb, "is_quantized_embedding", False) else emb.weight.device


def summarize_names(names: Iterable[str], limit: int = 12) -> str:
    """Collapse layer indices: model.layers.0.mlp.up_proj, model.layers.1... -> model.layers.*.mlp.up_proj."""
    patterns: dict[str, None] = {}
    for n in names:
        patterns.setdefault(re.sub(r"\.\d+\.", ".*.", n), None)
    shown = list(patterns)[:limit]
    more = len(patterns) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_is_suffix(name, t) for t in targets)


def _is_suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    predicate: Callable[[nn.Module], bool] = is_linear,
    kind: str = "linear",
    each: bool = True,
) -> list[str]:
    """Names of the modules a method should adapt.

    ``targets`` is ``"all-linear"`` (every linear layer but the output head), ``"attention"`` or ``"mlp"`` (the
    linear layers inside each block's attention or MLP module, found by role: ``module_role``), a regex string
    matched against the
    full module name (``re.fullmatch``), or a list of names/suffixes (``"q_proj"`` matches
    ``model.layers.3.self_attn.q_proj``). Raises MethodError listing the candidate layers when nothing matches, or
    (``each``) when one name of a list matches nothing — a misspelt name is an error, not silently ignored. A
    list of alternatives across architectures (the adapters' ``attention`` placement) passes ``each=False``.
    """
    candidates = [n for n, m in model.named_modules() if n and predicate(m)]
    if targets == ALL_LINEAR:
        heads = output_head_names(model)
        found = [n for n in candidates if n not in heads]
    elif isinstance(targets, str) and targets in ROLES:
        members = _role_members(model, targets)
        found = [n for n in candidates if n in members]
        if not found:
            family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise MethodError(f"target preset {targets!r}: no {targets} module found in {type(model).__name__} "
                              f"(model family {family!r}: no submodule whose class name ends in "
                              f"{'Attention' if targets == 'attention' else 'MLP'}). Its {kind} layers are: "
                              f"{summarize_names(candidates)}; name them (a list of suffixes or a regex) instead")
    elif isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise MethodError(f"target pattern {targets!r} is not a valid regular expression: {e}") from None
        found = [n for n in candidates if _matches(n, targets)]
    else:
        missing = [t for t in targets if not any(_is_suffix(n, t) for n in candidates)]
        if each and 0 < len(missing) < len(targets):
            raise _no_match(model, candidates, kind, f"{', '.join(map(repr, missing))} (in {list(targets)!r})")
        found = [n for n in candidates if _matches(n, targets)]
    if not found:
        raise _no_match(model, candidates, kind, repr(targets))
    return found


def _no_match(model: nn.Module, candidates: list[str], kind: str, what: str) -> MethodError:
    return MethodError(
        f"target {what} matched no {kind} layer of {type(model).__name__}. "
        f"Its {kind} layers are: {summarize_names(candidates)}. Use '{ALL_LINEAR}', a list of suffixes such as "
        f"['q_proj', 'v_proj'], or a regex on the full name."
    )


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


# --------------------------------------------------------------------------------------------------------------
# Freezing and counting
# --------------------------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> None:
    """Make every parameter of the model frozen; methods then create or unfreeze their own."""
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# --------------------------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------------------------


@runtime_checkable
class AdapterLayer(Protocol):
    """What a layer-wrapping method's wrapper provides (merge/unmerge are optional: see ``supports_merge``)."""

    enabled: bool

    def unwrap(self) -> nn.Module: ...


@dataclass
class MethodHandle:
    """What ``apply`` returns: the applied method's state on one model.

    ``layers`` maps module names to wrapper modules the method put in place of the originals (or to modules it
    added, whose ``unwrap()`` returns None: remove() deletes them); ``hooks`` are the removable hook handles the
    method registered. Trainable state is every parameter with ``requires_grad`` plus the method's persistent
    buffers named in ``extra_state_keys``. ``fold``, when set, turns a training-time reparameterisation into its
    inference form in place (outputs unchanged): a finished run saves ``inference_state_dict()``.
    """

    name: str
    model: nn.Module
    config: Any
    layers: dict[str, nn.Module] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    extra_state_keys: list[str] = field(default_factory=list)
    merge_note: str = ""  # why merge is not supported, when it is not
    enabled: bool = True
    merged: bool = False
    on_disable: Callable[[bool], None] | None = None
    fold: Callable[[], None] | None = None

    # -- parameters ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        seen: set[int] = set()
        out = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[n] = p
        return out

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def upcast_trainable(self, dtype: torch.dtype = torch.float32) -> None:
        """Trainable parameters (and so optimizer state) are kept in fp32 whatever the frozen weights' dtype."""
        for p in self.trainable_parameters().values():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's trainable weights and persistent extra state, keyed by full module path."""
        out = {n: p.detach() for n, p in self.trainable_parameters().items()}
        buffers = dict(self.model.named_buffers())
        for key in self.extra_state_keys:
            out[key] = buffers[key].detach()
        return out

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """What a finished run keeps: ``state_dict()`` after ``fold`` (if the method has one) ran in place."""
        if self.fold is not None:
            self.fold()
        return self.state_dict()

    def _own_state(self) -> dict[str, torch.Tensor]:
        return {**self.trainable_parameters(), **{k: v for k, v in self.model.named_buffers() if k in self.extra_state_keys}}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self._own_state()
        if self.fold is not None and set(state) - set(own):  # saved by inference_state_dict(): fold, then load
            self.fold()
            own = self._own_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise MethodError(
                f"saved {self.name} weights do not fit this model: missing {summarize_names(missing) or 'none'}; "
                f"unexpected {summarize_names(unexpected) or 'none'}. Was the run trained with other targets or "
                f"another base model?"
            )
        with torch.no_grad():
            for key, tensor in state.items():
                if key in own:
                    if own[key].shape != tensor.shape:
                        raise MethodError(f"saved tensor {key} has shape {tuple(tensor.shape)}, "
                                          f"the model expects {tuple(own[key].shape)}")
                    own[key].copy_(tensor.to(own[key].dtype))

    # -- merge -----------------------------------------------------------------------------------------------
    @property
    def supports_merge(self) -> bool:
        return not self.merge_note and all(hasattr(m, "merge") for m in self.layers.values())

    def _require_merge(self) -> None:
        if not self.supports_merge:
            raise MethodError(f"method '{self.name}' cannot merge: {self.merge_note or 'its layers have no merge'}")

    def merge(self) -> None:
        """Fold the method into the base weights (outputs unchanged; the method's extra compute disappears)."""
        self._require_merge()
        if not self.merged:
            for layer in self.layers.values():
                layer.merge()
            self.merged = True

    def unmerge(self) -> None:
        self._require_merge()
        if self.merged:
            for layer in self.layers.values():
                layer.unmerge()
            self.merged = False

    def merge_and_unload(self) -> nn.Module:
        """Merge, then put the original (now updated) modules back; returns a plain transformers model."""
        self.merge()
        self._unwrap_all()
        return self.model

    # -- enable / disable / remove -----------------------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = enabled
        if self.on_disable is not None:
            self.on_disable(enabled)
        self.enabled = enabled

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: ``with handle.disabled(): model(...)``."""
        if self.merged:
            raise MethodError(f"'{self.name}' is merged into the weights: unmerge() before disabling it")
        previous = self.enabled
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(previous)

    def _unwrap_all(self) -> None:
        for name, layer in self.layers.items():
            parent, attr = get_submodule_parent(self.model, name)
            original = layer.unwrap()
            if original is None:  # a module the method added rather than wrapped
                delattr(parent, attr)
            else:
                setattr(parent, attr, original)
        self.layers = {}

    def remove(self) -> nn.Module:
        """Take the method off: unmerge if merged, put original modules back, remove the method's hooks only."""
        if self.merged:
            self.unmerge()
        self._unwrap_all()
        for h in self.hooks:
            h.remove()
        self.hooks = []
        return self.model

    def add_hook(self, hook_handle: Any) -> None:
        """Record a hook this method registered, so that remove() takes off exactly it."""
        self.hooks.append(hook_handle)


def replace_modules(model: nn.Module, names: Iterable[str], wrap: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Swap each named module for ``wrap(name, module)``; returns name -> wrapper (for MethodHandle.layers)."""
    wrapped = {}
    for name in names:
        parent, attr = get_submodule_parent(model, name)
        new = wrap(name, getattr(parent, attr))
        setattr(parent, attr, new)
        wrapped[name] = new
    return wrapped


def param_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(iter(module.parameters()))
    return p.dtype, p.device



# --------------------------------------------------------------------------------------------------------------
# Prompt spans (for methods that act on prompt positions)
# --------------------------------------------------------------------------------------------------------------

_PROMPT_LENGTHS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("tunelab_prompt_lengths",
                                                                                      default=None)


@contextlib.contextmanager
def prompt_lengths(lengths: torch.Tensor | None) -> Iterator[None]:
    """Within the block, row b of every model call starts with ``lengths[b]`` prompt tokens (counted from its first
    real token, whatever the padding side); the rest of the row's real tokens are the response.

    Callers that know the prompt/response split set it (``tunelab.train.objective.nll_sum`` from the labels,
    ``tunelab.eval.loglik`` from the context length). Without it a position-aware method takes every real token
    of the input as the prompt, which is exactly the prefill pass of generation.
    """
    token = _PROMPT_LENGTHS.set(lengths)
    try:
        yield
    finally:
        _PROMPT_LENGTHS.reset(token)


def current_prompt_lengths() -> torch.Tensor | None:
    """The per-row prompt lengths set by the innermost ``prompt_lengths`` block (None outside any)."""
    return _PROMPT_LENGTHS.get()


def write_peft_adapter(out_dir: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """A peft adapter folder: adapter_config.json and adapter_model.safetensors (fp32, contiguous), atomically."""
    import json
    from pathlib import Path

    from tunelab.files import atomic_save_tensors, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2))
    atomic_save_tensors(out_dir / "adapter_model.safetensors", {k: v.detach().float() for k, v in tensors.items()})
    return out_dir
