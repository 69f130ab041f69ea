"""Router rows of a multi-source MoE, as mergekit-moe defines its gate modes.

- ``random``: N(0, 1) rows; ``uniform_random``: U(−1/√d, 1/√d) (torch.nn.Linear's default init).
- ``cheap_embed``: the L2-normalised sum of the prompts' token embeddings, the same for every layer.
- ``hidden`` / ``hidden_avg``: for layer i, the hidden state entering layer i (transformers'
  ``hidden_states[i]``) at each prompt's last *real* token (``hidden_avg``: the mean over its real
  tokens), averaged over the expert's positive prompts, minus the same over its negative prompts,
  L2-normalised — computed by :class:`~ckptforge.multisource.runner.LayerRunner`, never the whole model.

Prompts are tokenized as mergekit does (BOS text prepended, no other special tokens); padding is
masked, so it never moves "the last token".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ckptforge.errors import UsageError
from ckptforge.io.inputs import load_tokenizer
from ckptforge.io.source import DenseCheckpoint

from .spec import ExpertSpec, MoESpec

#: A layer whose router rows have a condition number above this is degenerate (mergekit's threshold).
DEGENERATE_CONDITION = 5.0


class DegenerateGatesWarning(UserWarning):
    """Router rows so alike that some experts will rarely be chosen (e.g. identical prompts)."""


@dataclass
class Gates:
    """Router rows per MoE layer: ``experts[layer]`` (E × d), ``shared[layer]`` (S × d, maybe empty)."""

    experts: dict[int, torch.Tensor]
    shared: dict[int, torch.Tensor]
    condition: dict[int, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def compute_gates(spec: MoESpec, base: DenseCheckpoint, layers: list[int], generator: torch.Generator) -> Gates:
    """Router rows of ``layers`` for the experts and shared experts of ``spec``, from the base's weights."""
    groups = [*spec.experts, *spec.shared_experts]
    num_layers, d = int(base.config["num_hidden_layers"]), int(base.config["hidden_size"])
    if spec.gate_mode == "random":
        rows = torch.randn((num_layers, len(groups), d), generator=generator)
    elif spec.gate_mode == "uniform_random":
        scale = (1.0 / d) ** 0.5
        rows = torch.rand((num_layers, len(groups), d), generator=generator) * 2 * scale - scale
    else:
        rows = _prompt_rows(spec, base, groups, layers)
    e = spec.num_experts
    gates = Gates({i: rows[i, :e].contiguous() for i in layers}, {i: rows[i, e:].contiguous() for i in layers})
    _check_degenerate(gates, spec)
    return gates


def _prompt_rows(spec: MoESpec, base: DenseCheckpoint, groups: list[ExpertSpec], layers: list[int]) -> torch.Tensor:
    prompts = spec.prompts()
    batch = tokenize_prompts(prompts, base)
    index = {p: i for i, p in enumerate(prompts)}
    num_layers, d = int(base.config["num_hidden_layers"]), int(base.config["hidden_size"])
    if spec.gate_mode == "cheap_embed":
        per_prompt = _embedding_sums(base, batch)  # P × d (sums, not means)
        rows = torch.stack([_combine(g, index, per_prompt, reduce="sum") for g in groups])
        return rows.unsqueeze(0).expand(num_layers, -1, -1)
    per_prompt = prompt_states(base, batch, layers, average=spec.gate_mode == "hidden_avg")
    rows = torch.zeros(num_layers, len(groups), d)
    for layer, states in per_prompt.items():
        rows[layer] = torch.stack([_combine(g, index, states, reduce="mean") for g in groups])
    return rows


def _combine(expert: ExpertSpec, index: dict[str, int], states: torch.Tensor, reduce: str) -> torch.Tensor:
    """Positive minus negative (mean over prompts; ``sum`` for cheap_embed, each side normalised), normalised."""
    def side(prompts: tuple[str, ...]) -> torch.Tensor:
        x = states[[index[p] for p in prompts]]
        if reduce == "sum":
            v = x.sum(0)
            return v / v.norm().clamp(min=1e-8)
        return x.mean(0)

    if not expert.positive_prompts:
        return torch.zeros(states.shape[1])
    v = side(expert.positive_prompts)
    if expert.negative_prompts:
        v = v - side(expert.negative_prompts)
    return v / v.norm().clamp(min=1e-8)


def tokenize_prompts(prompts: list[str], base: DenseCheckpoint) -> dict[str, torch.Tensor]:
    """Token ids and attention mask of ``prompts`` with the base's tokenizer (BOS text first, padded)."""
    tokenizer = load_tokenizer(base.root, "prompt gates (gate_mode random needs no tokenizer)")
    tokenizer.padding_side = "right"
    enc = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    if (enc["attention_mask"].sum(1) == 0).any():
        empty = prompts[int((enc["attention_mask"].sum(1) == 0).nonzero()[0])]
        raise UsageError(f"prompt {empty!r} has no tokens; remove it or write some text")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def prompt_states(base: DenseCheckpoint, batch: dict[str, torch.Tensor], layers: list[int],
                  average: bool = False) -> dict[int, torch.Tensor]:
    """Per layer in ``layers``: P × d, the hidden state entering it at each prompt's last real token
    (``average``: the mean over the prompt's real tokens), computed layer by layer."""
    from .runner import LayerRunner

    mask = batch["attention_mask"].bool()
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # each row's last real position
    wanted, out = set(layers), {}

    def visit(layer: int, _: int, hidden: torch.Tensor) -> None:
        if layer not in wanted:
            return
        if average:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out[layer] = (hidden * m).sum(1) / m.sum(1)
        else:
            out[layer] = hidden[torch.arange(hidden.shape[0]), last]

    LayerRunner(base).run([batch], visit=visit, last_layer=max(layers))
    return out


def _embedding_sums(base: DenseCheckpoint, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from .runner import LayerRunner

    h = LayerRunner(base).embed([batch["input_ids"]])[0].float()  # only the prompts' embedding rows
    return (h * batch["attention_mask"].unsqueeze(-1)).sum(1)


def _check_degenerate(gates: Gates, spec: MoESpec) -> None:
    for layer, rows in gates.experts.items():
        gates.condition[layer] = float(torch.linalg.cond(rows.float()))
    bad = [layer for layer, c in gates.condition.items() if c > DEGENERATE_CONDITION]
    if not bad:
        return
    same = _duplicates(spec)
    worst = max(gates.condition[i] for i in bad)
    text = (f"layer{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {len(gates.condition)} ha"
            f"{'ve' if len(bad) > 1 else 's'} degenerate router rows (condition number up to {worst:.3g} > "
            f"{DEGENERATE_CONDITION:g})" + (f": {same}" if same else "")
            + "; some experts will rarely be chosen: give each expert prompts that tell it apart")
    gates.warnings.append(text)
    warnings.warn(text, DegenerateGatesWarning, stacklevel=3)


def _duplicates(spec: MoESpec) -> str:
    seen: dict[tuple, int] = {}
    pairs = []
    for i, e in enumerate(spec.experts):
        key = (e.source_model, e.prompts_key())
        if key in seen:
            pairs.append(f"experts {seen[key]} and {i} have the same source and prompts")
        seen.setdefault(key, i)
    return ", ".join(pairs)
