"""Verify a multi-source output: in every MoE layer, expert e computes exactly source e's FFN (both
fed the same hidden states, the ones that reach that layer on the experts' prompts), the shared
expert its sources' FFNs; and how often each expert's own prompts are routed to it.

    >>> report = verify_multisource("out/moe")          # doctest: +SKIP
    >>> report.passed, report.routing["1"]               # doctest: +SKIP
    (True, [0.83, 0.5, 1.0])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptforge.io.source import open_checkpoint
from ckptforge.loading import load_model
from ckptforge.verify import Error, VerifyReport, _error, _moe_layers, make_inputs

from .gates import tokenize_prompts
from .runner import LayerRunner


@dataclass
class MultiSourceReport(VerifyReport):
    """Per MoE layer: each expert's error against its source's FFN (``experts``), the shared expert's
    (``shared``), and the share of each expert's prompt tokens its router sends to it (``routing``)."""

    experts: dict[int, list[Error]] = field(default_factory=dict)
    shared: dict[int, Error] = field(default_factory=dict)
    routing: dict[int, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for key in ("experts", "shared", "routing"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d


def is_multisource(moe_dir: str | Path) -> bool:
    """Whether ``moe_dir`` holds a multi-source output (its ckptforge.json has a ``multisource`` record)."""
    path = Path(moe_dir) / "ckptforge.json"
    return path.is_file() and "multisource" in json.loads(path.read_text())


def verify_multisource(moe_dir: str | Path, *, tol: float = 1e-5, seed: int = 0) -> MultiSourceReport:
    """Check every expert of ``moe_dir`` against its source's FFN through the real transformers class."""
    moe_dir = Path(moe_dir)
    record = json.loads((moe_dir / "ckptforge.json").read_text())["multisource"]
    config = json.loads((moe_dir / "config.json").read_text())
    base = open_checkpoint(record["base_model"]["source"])
    prompts = list(dict.fromkeys(p for e in record["experts"] for p in _texts(e["positive_prompts"])))
    if prompts:
        batch, what = tokenize_prompts(prompts, base), f"{len(prompts)} expert prompts"
    else:
        batch, what = make_inputs(config, 2, 16, seed)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    model = load_model(moe_dir, config)
    layers = _moe_layers(config)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    handles = []
    for i in layers:
        block = model.model.layers[i].mlp
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__("x", a[0])))
        handles.append(block.gate.register_forward_hook(lambda m, a, out, i=i: seen[i].__setitem__("top", out[2])))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    real = batch["attention_mask"].bool().reshape(-1)
    runners: dict[str, LayerRunner] = {}
    dtype = _stored_dtype(moe_dir)
    report = MultiSourceReport(str(moe_dir), record["base_model"]["source"], tol, {}, Error(0.0, 0.0), what, True)
    for i in layers:
        block, x = model.model.layers[i].mlp, seen[i]["x"].reshape(-1, seen[i]["x"].shape[-1])[real]
        report.experts[i] = [_expert_error(block, e, x, _source_out(runners, spec, i, x, dtype))
                             for e, spec in enumerate(record["experts"])]
        if record["shared_experts"]:
            want = sum(_source_out(runners, spec, i, x, dtype) for spec in record["shared_experts"])
            with torch.no_grad():
                report.shared[i] = _error(want, block.shared_expert(x))
        report.routing[i] = _routing(record, prompts, batch, seen[i]["top"])
    exact = [err for i in layers for err, spec in zip(report.experts[i], record["experts"]) if "noise_scale" not in spec]
    exact += list(report.shared.values())
    report.layers = {i: max(report.experts[i] + ([report.shared[i]] if i in report.shared else []), key=_rel)
                     for i in layers}
    report.final = max(exact, key=_rel) if exact else Error(0.0, 0.0)
    report.__post_init__()
    return report


def _rel(e: Error) -> float:
    return e.relative


def _texts(value: Any) -> list[str]:
    return list(value) if isinstance(value, list) else []  # hashed prompts (a count + sha256) cannot be replayed


def _stored_dtype(moe_dir: Path) -> torch.dtype:
    """The dtype the experts were written in (the sources' weights are rounded to it before comparing)."""
    ckpt = open_checkpoint(moe_dir)
    dtype = next((t.dtype for n, t in ckpt.tensors.items() if ".experts." in n), torch.float32)
    ckpt.close()
    return dtype


def _expert_error(block: torch.nn.Module, expert: int, x: torch.Tensor, want: torch.Tensor) -> Error:
    """Expert ``expert`` alone (weight 1 for every token), through the class's own experts module."""
    n = x.shape[0]
    with torch.no_grad():
        got = block.experts(x, torch.full((n, 1), expert), torch.ones(n, 1, dtype=x.dtype))
    return _error(want, got)


def _source_out(runners: dict[str, LayerRunner], spec: dict[str, Any], layer: int, x: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Source FFN of ``layer`` on ``x`` (weights rounded to the output dtype), times its residual scale."""
    ref = spec["source"]
    if ref not in runners:
        runners[ref] = LayerRunner(open_checkpoint(ref), dtype=dtype)
    mlp = runners[ref].materialise(runners[ref].layers[layer].mlp).float()
    with torch.no_grad():
        out = mlp(x) * spec.get("residual_scale", 1.0)
    mlp.to_empty(device="meta")
    return out


def _routing(record: dict[str, Any], prompts: list[str], batch: dict[str, torch.Tensor],
             top: torch.Tensor) -> list[float | None]:
    """Per expert: the share of its positive prompts' real tokens whose top-k includes it."""
    if not prompts:
        return [None] * len(record["experts"])
    top = top.reshape(*batch["input_ids"].shape, -1)
    mask = batch["attention_mask"].bool()
    row = {p: i for i, p in enumerate(prompts)}
    shares = []
    for e, spec in enumerate(record["experts"]):
        rows = [row[p] for p in _texts(spec["positive_prompts"])]
        hits = (top[rows] == e).any(-1)[mask[rows]]
        shares.append(round(hits.float().mean().item(), 4) if hits.numel() else None)
    return shares
