"""Where the routers send each patch or token: top expert per token per MoE layer, and expert load.

    >>> report = route_input("out/vit-moe", "cat.png")                 # doctest: +SKIP
    >>> report.layers[1].dead_experts                                  # doctest: +SKIP
    [5]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptforge.errors import SourceError, UsageError
from ckptforge.families.formats import modality_of
from ckptforge.io.inputs import IMAGE_SUFFIXES, is_image_file, load_image_processor, load_tokenizer, read_utf8
from ckptforge.io.paths import check_figure_file
from ckptforge.loading import load_model


@dataclass
class LayerRoutes:
    """One MoE layer: each token's top expert (core experts first, then universal ones) and the load."""

    top_expert: list[int]
    load: list[int]
    dead_experts: list[int]


@dataclass
class RoutesReport:
    model: str
    input: str
    modality: str
    router: str
    tokens: list[str]
    grid: int | None
    layers: dict[int, LayerRoutes]
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def top_experts(block: torch.nn.Module, num_tokens: int) -> tuple[torch.Tensor, int]:
    """(top expert of each of the first ``num_tokens`` tokens, number of experts) from a block's last forward.

    Token/expert choice: the expert with the largest weight; MH-MoE: largest summed weight over
    the token's sub-tokens; soft/sphero: the expert owning the slot with the largest combine weight.
    """
    if getattr(block, "last_combine", None) is not None:
        slot = block.last_combine[0].argmax(-1)
        total = block.experts.num_experts + (block.universal_experts.num_experts if block.universal_experts is not None else 0)
        return (slot // block.slots_per_expert)[:num_tokens], total
    routing = block.last_routing
    e = block.experts.num_experts
    index, weights = routing.expert_index, routing.weights
    per_token = torch.zeros(index.shape[0], e + 1).scatter_add_(1, (index % (e + 1)).long(), weights.float())[:, :e]
    per_token = per_token.reshape(-1, getattr(block, "heads", 1), e).sum(1)
    best = per_token.argmax(-1)
    best[per_token.max(-1).values <= 0] = -1  # dropped by capacity / chosen by no expert
    return best[:num_tokens], e


def route_input(model_dir: str | Path, input_path: str | Path) -> RoutesReport:
    """Run one image or text through an MoE model and report each MoE layer's routing of it."""
    model_dir, input_path = Path(model_dir), Path(input_path)
    if not input_path.is_file():
        raise SourceError(f"input '{input_path}' does not exist; pass an image or a text file")
    model = load_model(model_dir)
    config = model.config
    if not getattr(config, "moe_layers", None):
        raise UsageError(f"'{model_dir}' has no ckptforge MoE layers (vit_moe / bert_moe); convert it with upcycle first")
    inputs, tokens, grid, modality = _inputs(model_dir, config, input_path)
    with torch.no_grad():
        model(**inputs)
    layers = {}
    for i, layer in enumerate(model.base_model.encoder.layer):
        if hasattr(layer, "moe"):
            top, n = top_experts(layer.moe, len(tokens))
            load = torch.bincount(top[top >= 0], minlength=n).tolist()
            layers[i] = LayerRoutes(top.tolist(), load, [e for e, c in enumerate(load) if c == 0])
    return RoutesReport(str(model_dir), str(input_path), modality, config.moe_router.get("type", "topk"),
                        tokens, grid, layers)


def _inputs(model_dir: Path, config: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str], int | None, str]:
    if modality_of(config.to_dict()) == "image":
        if not is_image_file(path):
            raise UsageError(f"'{path}' is not an image ({', '.join(IMAGE_SUFFIXES)}); a ViT-MoE model routes image patches")
        images = load_image_processor(model_dir, config.to_dict())
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        grid = images.size // patch
        tokens = ["[CLS]"] + [f"p{r},{c}" for r in range(grid) for c in range(grid)]
        return {"pixel_values": images.pixels([path])}, tokens, grid, "image"
    text = read_utf8(path).strip()
    tokenizer = load_tokenizer(model_dir, "routing text")
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=config.max_position_embeddings)
    return {"input_ids": enc["input_ids"]}, tokenizer.convert_ids_to_tokens(enc["input_ids"][0]), None, "text"


def save_expert_maps(report: RoutesReport, out: str | Path) -> list[str]:
    """One PNG per MoE layer: patches coloured by top expert (images) and the expert load histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = {layer: out.with_name(f"{out.stem}-layer{layer}{out.suffix or '.png'}") for layer in report.layers}
    for path in paths.values():  # issue 11: never over the model or the input
        check_figure_file("--out", path, reads=[report.model, report.input])
    files = []
    for layer, routes in report.layers.items():
        fig, axes = plt.subplots(1, 2 if report.grid else 1, figsize=(9 if report.grid else 5, 4), squeeze=False)
        if report.grid:
            patches = torch.tensor(routes.top_expert[1:], dtype=torch.float32).reshape(report.grid, report.grid)
            im = axes[0][0].imshow(patches, cmap="tab20", vmin=-0.5, vmax=max(len(routes.load), 20) - 0.5)
            axes[0][0].set_title(f"layer {layer}: top expert per patch")
            fig.colorbar(im, ax=axes[0][0])
        hist = axes[0][-1]
        hist.bar(range(len(routes.load)), routes.load, color=["red" if c == 0 else "steelblue" for c in routes.load])
        hist.set_title(f"layer {layer}: expert load ({len(routes.dead_experts)} dead)")
        hist.set_xlabel("expert")
        path = paths[layer]
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(str(path))
    report.files = files
    return files


def routes_json(report: RoutesReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
