"""What a family adapter and an output format describe, as data.

A :class:`Family` knows a dense architecture: the FFN tensor names of layer ``{layer}`` (relative
to the model's base prefix), the legacy ↔ transformers-5 renames, and its dimensions. An
:class:`OutputFormat` knows an MoE checkpoint layout: the config it writes and the names of its
router and expert tensors (``{layer}`` / ``{expert}`` templates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: Shape of an expert tensor by role, for expert width S and hidden size d.
ROLE_SHAPES = {
    "gate": lambda s, d: (s, d),
    "up": lambda s, d: (s, d),
    "up_bias": lambda s, d: (s,),
    "down": lambda s, d: (d, s),
    "down_bias": lambda s, d: (d,),
}


#: The largest size a config key may state: far above any real model, low enough that a typo
#: (``num_hidden_layers: 1e9``) is refused up front instead of exhausting memory while planning.
CONFIG_SIZE_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 1 << 20, "intermediate_size": 1 << 22}


def config_size(config: dict[str, Any], key: str) -> int:
    """``config[key]`` as a positive integer within :data:`CONFIG_SIZE_LIMITS`, else :class:`UsageError`.

        >>> config_size({"hidden_size": 32}, "hidden_size")
        32
    """
    from ckptforge.errors import UsageError

    value, limit = config.get(key), CONFIG_SIZE_LIMITS[key]
    if value is None:
        raise UsageError(f"config.json has no {key}; add it (the model's {key.replace('_', ' ')})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= limit or value != int(value):
        raise UsageError(f"config.json: {key} {value!r} is not an integer from 1 to {limit}; fix config.json")
    return int(value)


@dataclass(frozen=True)
class Dims:
    """The sizes a plan needs: layers, hidden size d, FFN width d_ff, activation, gated or not."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool


@dataclass(frozen=True)
class MoELayout:
    """The MoE shape a plan chose, handed to an output format to write its config."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_width: int
    router: dict[str, Any]
    output_scale: float = 1.0
    extra_config: dict[str, Any] = field(default_factory=dict)


def stock_router_config(layout: MoELayout) -> dict[str, Any]:
    """The load-balancing weight a stock transformers MoE config stores (``router_aux_loss_coef``),
    from the router settings, so that ``finetune`` trains a Mixtral / Qwen-MoE output with the same
    default weight (0.01) as ckptforge's own routers instead of transformers' config default."""
    from ckptforge.moe.settings import router_settings

    settings = router_settings(layout.router)
    return {"router_aux_loss_coef": settings.aux_loss_weight} if hasattr(settings, "aux_loss_weight") else {}


def listed_moe_layers(config: dict[str, Any]) -> list[int]:
    """MoE layers of a ckptforge output: listed in ``moe_layers``."""
    return list(config.get("moe_layers") or [])


def sparse_step_moe_layers(config: dict[str, Any]) -> list[int]:
    """MoE layers of a Qwen-MoE / Mixtral config, by transformers' rule: every layer not in
    ``mlp_only_layers`` whose index + 1 is a multiple of ``decoder_sparse_step`` (default 1: all)."""
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [i for i in range(int(config.get("num_hidden_layers", 0))) if i not in dense and (i + 1) % step == 0]


def sparse_layers_config(moe_layers: list[int], num_layers: int) -> dict[str, Any]:
    """How a stock Qwen-MoE config names its MoE layers: ``decoder_sparse_step`` N when they are
    exactly every N-th layer (``--layers every-N``: layers N-1, 2N-1, …, transformers' own rule),
    else step 1 with the dense layers listed in ``mlp_only_layers``.

        >>> sparse_layers_config([1, 3], 4)
        {'decoder_sparse_step': 2, 'mlp_only_layers': []}
        >>> sparse_layers_config([0, 3], 4)
        {'decoder_sparse_step': 1, 'mlp_only_layers': [1, 2]}
    """
    layers = sorted(moe_layers)
    for step in range(1, num_layers + 1):
        if layers == list(range(step - 1, num_layers, step)):
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(num_layers) if i not in set(layers)]}


@dataclass(frozen=True)
class OutputFormat:
    """An MoE checkpoint layout, registered by its output ``model_type`` (``name``; see
    :data:`ckptforge.families.OUTPUT_FORMATS`). Templates are full tensor names with ``{layer}`` / ``{expert}``.

    ``experts`` maps each expert tensor template to its role (gate, up, up_bias, down, down_bias).
    When ``packed`` the templates have no ``{expert}`` and hold all experts stacked on axis 0.
    ``zeros`` are extra tensors (template → shape as a function of d) written as zeros in every
    MoE layer (e.g. a zero shared expert that keeps the dense function).
    """

    name: str
    router: str
    experts: dict[str, str]
    packed: bool
    zeros: dict[str, Any] = field(default_factory=dict)
    remote_module: str | None = None
    #: Prefix template (``{layer}``) of the MoE block's tensors when the block is ckptforge's own
    #: runtime layer; its router type then decides the tensors (``ckptforge.moe.moe_tensor_layout``).
    moe_module: str | None = None
    #: The dense family the format is written from (whose ``modality`` its inputs have).
    family: str = ""
    #: Output architecture → the Hub pipeline tag of that head.
    pipelines: dict[str, str] = field(default_factory=dict)
    #: Config class name in ``ckptforge.modeling`` (ckptforge's own formats); None: transformers' own.
    config_class: str | None = None
    #: Auto class → model class name, for the ``auto_map`` of ckptforge's own formats.
    auto_classes: dict[str, str] = field(default_factory=dict)
    #: Which layers of a config of this format are MoE.
    moe_layer_rule: Any = sparse_step_moe_layers
    #: ckptforge's own formats: config.json → the tensor names its modeling class saves, without torch
    #: (:mod:`ckptforge.families.state_names`); None: not known without building the class.
    state_names: Any = None

    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """The MoE layers of ``config`` (a config.json of this format).

            >>> OutputFormat("x", "", {}, False).moe_layers({"num_hidden_layers": 3, "mlp_only_layers": [0]})
            [1, 2]
        """
        return self.moe_layer_rule(config)

    def expert_names(self, layer: int, num_experts: int) -> list[tuple[str, str, int | None]]:
        """(name, role, expert or None when packed) for every expert tensor of ``layer``."""
        if self.packed:
            return [(t.format(layer=layer), role, None) for t, role in self.experts.items()]
        return [
            (t.format(layer=layer, expert=e), role, e)
            for e in range(num_experts)
            for t, role in self.experts.items()
        ]


class Family:
    """Base class of family adapters; subclasses set the class attributes and ``output_format``."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    modality: str = "text"
    #: Decoder-only LLMs that ckptforge.multisource.runner can run one layer at a time (calibration of a
    #: model larger than RAM, prompt gates).
    layer_runner: bool = False
    #: FFN role → tensor name template relative to the base prefix, with ``{layer}``.
    ffn: dict[str, str] = {}
    #: Regex renames from transformers-5 in-memory names to the canonical (on-disk) names.
    renames: tuple[tuple[str, str], ...] = ()
    #: Base prefixes a checkpoint of this family may carry, longest first (e.g. "vit.", "").
    base_prefixes: tuple[str, ...] = ("",)
    #: A tensor (relative to the base prefix) every checkpoint of the family has.
    anchor: str = ""
    #: Router types (``--router``) the family's output format can hold.
    routers: tuple[str, ...] = ("topk",)
    #: Output formats a user may ask for by name (mergekit-moe's ``architecture``), and those
    #: refused, with the reason (``{model_type}`` is filled in).
    offered_formats: dict[str, OutputFormat] = {}
    refused_formats: dict[str, str] = {}

    def why_not(self, config: dict[str, Any]) -> str | None:
        """None when this family handles ``config``, else the reason it does not."""
        model_type = config.get("model_type")
        if model_type not in self.model_types:
            return f"model_type {model_type!r} is not one of {', '.join(self.model_types)}"
        return None

    def dims(self, config: dict[str, Any]) -> Dims:
        """The sizes in ``config``; a missing, non-integer or implausible size raises :class:`UsageError`."""
        return Dims(
            num_layers=config_size(config, "num_hidden_layers"),
            hidden_size=config_size(config, "hidden_size"),
            intermediate_size=config_size(config, "intermediate_size"),
            activation=str(config.get("hidden_act", "gelu")),
            gated="gate" in self.ffn,
        )

    def canonical_names(self, names: list[str]) -> dict[str, str]:
        """Map canonical (legacy on-disk) name → name as stored in the checkpoint."""
        out: dict[str, str] = {}
        for name in names:
            canon = name
            for pattern, repl in self.renames:
                canon = re.sub(pattern, repl, canon)
            out[canon] = name
        return out

    def base_prefix(self, canonical: set[str]) -> str | None:
        for prefix in self.base_prefixes:
            if prefix + self.anchor in canonical:
                return prefix
        return None

    def ffn_names(self, prefix: str, layer: int) -> dict[str, str]:
        """FFN role → canonical tensor name of ``layer``."""
        return {role: prefix + t.format(layer=layer) for role, t in self.ffn.items()}

    def check(self, config: dict[str, Any]) -> list[str]:
        """Problems with a config this family matched (unsupported options); empty when fine."""
        return []

    def extra_config(self, config: dict[str, Any], prefix: str, names: set[str]) -> dict[str, Any]:
        """Output config keys that depend on which tensors the source has."""
        return {}

    def output_formats(self) -> tuple[OutputFormat, ...]:
        """Every output format this family writes (registered by model type in ``OUTPUT_FORMATS``)."""
        return tuple(self.offered_formats.values())

    def output_format(self, config: dict[str, Any], moe_layers: list[int]) -> OutputFormat:
        raise NotImplementedError

    def output_config(self, config: dict[str, Any], fmt: OutputFormat, layout: MoELayout) -> dict[str, Any]:
        raise NotImplementedError

    def output_prefix(self, config: dict[str, Any], output_config: dict[str, Any]) -> str:
        """The base prefix of the output model's tensor names."""
        return self.base_prefixes[0]
