"""What a multi-source MoE is made of: mergekit-moe's YAML schema, read unchanged, or the native flags.

    >>> spec = MoESpec.from_dict({"base_model": "base", "gate_mode": "random",
    ...                           "experts": [{"source_model": "a"}, {"source_model": "b"}]})
    >>> spec.num_experts, spec.experts_per_token
    (2, 2)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptforge.errors import PlanError, UsageError

#: mergekit-moe's gate modes; the first is its default.
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
#: Gate modes that read the experts' prompts.
PROMPT_GATES = ("hidden", "hidden_avg", "cheap_embed")
#: mergekit-moe's ``dtype`` values → ckptforge's ``--dtype``.
DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
               "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts", "architecture")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert (or shared expert): its source model and the prompts its router row is made from.

    ``residual_scale`` multiplies its down projection; ``noise_scale`` adds N(0, σ²) noise to its
    weights (mergekit's semantics, seeded here)."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompts_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.positive_prompts, self.negative_prompts


@dataclass(frozen=True)
class MoESpec:
    """A multi-source MoE: base model (attention, norms, embeddings, head) and one source per expert."""

    base_model: str
    experts: tuple[ExpertSpec, ...]
    gate_mode: str = GATE_MODES[0]
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSpec, ...] = ()
    architecture: str | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "the config") -> MoESpec:
        """Read mergekit-moe's schema; every unsupported key and malformed field is reported together."""
        if not isinstance(data, dict):
            raise UsageError(f"{origin} is not a mapping of mergekit-moe keys (base_model, experts, …); fix the YAML")
        unknown = [k for k in data if k not in _TOP_KEYS]
        problems: list[str] = []
        experts, shared = [], []
        for field_name, into in (("experts", experts), ("shared_experts", shared)):
            items = data.get(field_name) or []
            if not isinstance(items, list):
                problems.append(f"{field_name} must be a list of {{source_model: …}} entries")
                continue
            for i, item in enumerate(items):
                entry = item if isinstance(item, dict) else {"source_model": item}
                unknown += [f"{field_name}[{i}].{k}" for k in entry if k not in _EXPERT_KEYS]
                expert = _expert(entry, f"{field_name}[{i}]", problems)
                if expert is not None:
                    into.append(expert)
        if unknown:
            problems.insert(0, f"{origin} has keys ckptforge does not support: {', '.join(map(str, unknown))}; "
                               f"remove them (supported: {', '.join(_TOP_KEYS)}; per expert: {', '.join(_EXPERT_KEYS)})")
        base = data.get("base_model")
        if not isinstance(base, str) or not base:
            problems.append("base_model is missing; name the model whose attention, norms and embeddings the MoE keeps")
        k = data.get("experts_per_token", 2)
        if not isinstance(k, int) or isinstance(k, bool):
            problems.append(f"experts_per_token {k!r} is not an integer")
            k = 2
        if problems:
            raise PlanError(problems)
        return cls(base, tuple(experts), str(data.get("gate_mode", GATE_MODES[0])),
                   None if data.get("dtype") is None else str(data["dtype"]), k, tuple(shared),
                   None if data.get("architecture") is None else str(data["architecture"]))

    def problems(self) -> list[str]:
        """Problems that need no checkpoint to find (mergekit's own checks among them)."""
        out = []
        if self.gate_mode not in GATE_MODES:
            out.append(f"gate_mode {self.gate_mode!r} is not one of {', '.join(GATE_MODES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            out.append(f"dtype {self.dtype!r} is not one of float32, float16, bfloat16")
        if self.num_experts < 2:
            out.append(f"{self.num_experts} expert(s) make no mixture; list 2 or more experts")
        if self.experts_per_token < 1:
            out.append(f"experts_per_token {self.experts_per_token} must be at least 1")
        elif self.experts_per_token > self.num_experts >= 1:
            out.append(f"experts_per_token {self.experts_per_token} is larger than the {self.num_experts} experts; "
                       f"use experts_per_token ≤ {self.num_experts}")
        if self.gate_mode in PROMPT_GATES:
            out += [f"experts[{i}] ({e.source_model}) has no positive_prompts; gate_mode {self.gate_mode} routes by "
                    "prompts: add some, or use gate_mode random" for i, e in enumerate(self.experts)
                    if not e.positive_prompts]
            with_prompts = [bool(e.positive_prompts) for e in self.shared_experts]
            if any(with_prompts) and not all(with_prompts):
                out.append("give positive_prompts to every shared expert or to none")
            if self.num_experts >= 2 and len({e.prompts_key() for e in self.experts}) == 1 and self.experts[0].positive_prompts:
                out.append("every expert has the same prompts, so every router row would be the same; give each "
                           "expert prompts that show what it is good at")
        return out

    def prompts(self) -> list[str]:
        """Every distinct prompt, in first-seen order (each runs through the base once)."""
        seen: dict[str, None] = {}
        for e in (*self.experts, *self.shared_experts):
            seen.update(dict.fromkeys((*e.positive_prompts, *e.negative_prompts)))
        return list(seen)

    def sources(self) -> list[str]:
        """Every distinct model reference: the base first (each is resolved once)."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in (*self.experts, *self.shared_experts))]))

    def to_dict(self, prompts: bool = True) -> dict[str, Any]:
        """The spec as recorded in ckptforge.json; ``prompts=False`` replaces prompts by their sha256."""
        d = asdict(self)
        if not prompts:
            for group in ("experts", "shared_experts"):
                for e in d[group]:
                    for key in ("positive_prompts", "negative_prompts"):
                        e[key] = {"count": len(e[key]), "sha256": prompts_hash(e[key])}
        return d


def prompts_hash(prompts: Any) -> str:
    """sha256 of a list of prompts (their JSON); what the card shows with --no-prompts-in-card."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def load_moe_config(path: str | Path) -> MoESpec:
    """Read a mergekit-moe YAML file (``mergekit-moe config.yml out``'s first argument), unchanged.

        >>> spec = load_moe_config("moe.yml")     # doctest: +SKIP
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config '{path}' not found; pass a mergekit-moe YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config '{path}' is not valid YAML ({type(exc).__name__}); fix the file") from None
    return MoESpec.from_dict(data, f"--config '{path.name}'")


def native_spec(base: str, sources: list[str], *, gate_mode: str | None, top_k: int, dtype: str | None,
                architecture: str | None) -> MoESpec:
    """The spec of ``ckptforge upcycle BASE --expert-source A --expert-source B …`` (no prompts: random gates)."""
    return MoESpec(base, tuple(ExpertSpec(s) for s in sources), gate_mode or "random", dtype, top_k, (), architecture)


def _expert(entry: dict[str, Any], where: str, problems: list[str]) -> ExpertSpec | None:
    source = entry.get("source_model")
    if not isinstance(source, str) or not source:
        problems.append(f"{where} has no source_model; name the model its FFN comes from")
        return None
    if "+" in source:
        problems.append(f"{where}.source_model {source!r}: LoRA references (model+lora) are not supported; merge the "
                        "adapter into the model first")
    lists = {}
    for key in ("positive_prompts", "negative_prompts"):
        value = entry.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            problems.append(f"{where}.{key} must be a list of strings")
            value = []
        lists[key] = tuple(value)
    scales = {}
    for key in ("noise_scale", "residual_scale"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{where}.{key} {value!r} is not a number")
            value = None
        scales[key] = None if value is None else float(value)
    return ExpertSpec(source, lists["positive_prompts"], lists["negative_prompts"], **scales)
