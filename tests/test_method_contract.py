"""Every registered method keeps the typed contract (tunelab.methods.contract), its capability flags tell the truth,
and no central code branches on a method's name or probes a method's attributes."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest
import torch

from test_invariants import ROWS
from tunelab.methods import REGISTRY, build_method_config, get_method
from tunelab.methods.contract import Capabilities, Exporter, LowRank, LowRankInit, MethodModule

from conftest import tiny

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def contract_problems(module: types.ModuleType) -> list[str]:
    """What a module lacks of the method contract (empty when it keeps it)."""
    problems = []
    if not isinstance(module, MethodModule):
        missing = [n for n in ("Config", "DESCRIPTION", "PAPER", "CAPABILITIES", "apply", "num_parameters")
                   if not hasattr(module, n)]
        return [f"missing {', '.join(missing)}"]
    caps = module.CAPABILITIES
    if not isinstance(caps, Capabilities):
        problems.append(f"CAPABILITIES is a {type(caps).__name__}, not a Capabilities")
        return problems
    params = list(inspect.signature(module.apply).parameters.values())
    shape = [(p.name, p.kind) for p in params]
    want = [("model", inspect.Parameter.POSITIONAL_OR_KEYWORD), ("config", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            ("tokenizer", inspect.Parameter.KEYWORD_ONLY)]
    if shape != want or params[2].default is not None:
        problems.append(f"apply{inspect.signature(module.apply)} is not apply(model, config, *, tokenizer=None)")
    if bool(caps.exports) != isinstance(module, Exporter):
        problems.append("CAPABILITIES.exports and an export function go together")
    if caps.loftq_init != isinstance(module, LowRankInit):
        problems.append("CAPABILITIES.loftq_init and low_rank / init_low_rank go together")
    if caps.trains_base_weights and caps.loftq_init:
        problems.append("a method that trains the base weights cannot sit on a quantized base")
    return problems


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_keeps_the_contract(name):
    assert contract_problems(get_method(name)) == []


def test_the_contract_check_can_fail():
    good = get_method("lora")
    broken = types.ModuleType("broken")
    for attr in ("Config", "DESCRIPTION", "PAPER", "num_parameters", "CAPABILITIES", "export", "low_rank",
                 "init_low_rank"):
        setattr(broken, attr, getattr(good, attr))

    def apply(model, config, tokenizer=None):  # the tokenizer positional: not the contract
        return good.apply(model, config, tokenizer=tokenizer)

    broken.apply = apply
    assert any("is not apply(model, config, *, tokenizer=None)" in p for p in contract_problems(broken))
    del broken.CAPABILITIES
    assert contract_problems(broken) == ["missing CAPABILITIES"]
    broken.CAPABILITIES = Capabilities(mergeable=True)  # says nothing of its export and LoftQ functions
    broken.apply = good.apply
    assert len(contract_problems(broken)) == 2


@pytest.mark.parametrize("row", [r for r in ROWS if r.quantize is None], ids=lambda r: r.id)
def test_capabilities_tell_the_truth(row):
    """On every row of the invariants matrix: mergeable — the handle merges (and the row says so);
    trains_base_weights — the model's own weights train; loftq_init — the low-rank update the method describes is
    the one its layers compute, and init_low_rank starts them from given factors."""
    module = get_method(row.method)
    caps = module.CAPABILITIES
    model, tok = tiny(row.archs[0])
    base = {id(p) for p in model.parameters()}
    cfg = build_method_config({"name": row.method, **row.options})
    handle = module.apply(model, cfg, tokenizer=tok)
    assert handle.supports_merge == caps.mergeable == row.mergeable
    base_trained = any(p.requires_grad for p in model.parameters() if id(p) in base)
    assert base_trained == caps.trains_base_weights
    if caps.loftq_init:
        spec = module.low_rank(cfg)
        assert isinstance(spec, LowRank)
        assert handle.layers and all(m.r == spec.r and m.scaling == pytest.approx(spec.scaling)
                                     for m in handle.layers.values())
        factors = {n: (torch.full_like(m.lora_A, 0.5), torch.full_like(m.lora_B, 0.25))
                   for n, m in handle.layers.items()}
        module.init_low_rank(handle, factors, spec.info())
        assert all(torch.equal(m.lora_A, factors[n][0]) and torch.equal(m.lora_B, factors[n][1])
                   for n, m in handle.layers.items())


# ---------------------------------------------------------------------------------------------------- no branching

# Folders whose modules are the methods themselves, or write configurations as data (a literal {"name": "full"}
# is a choice of method, not a branch on one).
_EXEMPT = ("methods/",)


def method_branches(root: Path) -> list[str]:
    """`x == "lora"`, `name in ("full", ...)` and `hasattr(x, "<attribute of one method>")` outside the methods."""
    names = set(REGISTRY)
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = []
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant):
                        consts.append(side.value)
                    elif isinstance(side, ast.Tuple | ast.List | ast.Set):
                        consts += [e.value for e in side.elts if isinstance(e, ast.Constant)]
                hit = sorted(str(c) for c in consts if isinstance(c, str) and c in names)
                if hit:
                    found.append(f"{rel}:{node.lineno}: compares with method name {', '.join(hit)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                  and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                  and node.args[1].value in {"scaling", "export", "lora_A", "merge", "low_rank"}):
                found.append(f"{rel}:{node.lineno}: hasattr(..., {node.args[1].value!r}) probes a method")
    return found


def test_no_central_code_branches_on_a_method():
    assert method_branches(SRC) == []


def test_the_branch_check_can_fail(tmp_path: Path):
    (tmp_path / "central.py").write_text(
        'def f(cfg, x):\n    if cfg.method_name() == "full":\n        return 1\n'
        '    if cfg.name in ("prompt", "other"):\n        return 2\n    return hasattr(x, "scaling")\n')
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "own.py").write_text('NAME = "lora"\nOK = NAME == "lora"\n')
    found = method_branches(tmp_path)
    assert len(found) == 3 and all(f.startswith("central.py:") for f in found)
