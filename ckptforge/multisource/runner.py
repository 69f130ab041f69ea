"""Run a decoder-only LLM one layer at a time, straight from its checkpoint.

The model is built on the meta device from its config (no memory); the token embedding is read
and applied, then each decoder layer in turn is materialised from the lazy checkpoint, every batch
is pushed through it, and it is freed. Peak memory is one layer plus the batches' hidden states,
never the model: a base larger than RAM can still give prompt gates and calibration statistics.

    >>> runner = LayerRunner(open_checkpoint("tiny-llama"))                    # doctest: +SKIP
    >>> runner.run([batch], visit=lambda layer, b, hidden: print(layer, hidden.shape))   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch

from ckptforge.errors import UsageError
from ckptforge.families import detect_family
from ckptforge.io.source import DenseCheckpoint

#: visit(layer, batch index, hidden states entering ``layer`` (B × T × d)); layer L = after the last layer.
Visit = Callable[[int, int, torch.Tensor], None]
#: hooks(layer, module) → hook handles, removed once every batch has passed the layer.
Hooks = Callable[[int, torch.nn.Module], list]


class LayerRunner:
    """Hidden states of a decoder-only model, computed layer by layer from a :class:`DenseCheckpoint`."""

    def __init__(self, ckpt: DenseCheckpoint, dtype: torch.dtype = torch.float32):
        from ckptforge.loading import config_object, model_class

        self.ckpt, self.dtype = ckpt, dtype
        self.family = detect_family(ckpt.config)
        self.config = config_object(ckpt.config)
        with torch.device("meta"):
            model = model_class(ckpt.config)(self.config)
        self.decoder = model.get_decoder()
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.canonical = self.family.canonical_names(list(ckpt.tensors))
        with torch.device("cpu"):
            self.rotary = type(self.decoder.rotary_emb)(self.config)
        self.layers = list(self.decoder.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run(self, batches: list[dict[str, torch.Tensor]], *, visit: Visit | None = None,
            hooks: Hooks | None = None, last_layer: int | None = None) -> None:
        """Push every batch (``input_ids``, ``attention_mask``) through layers ``0 … last_layer``.

        ``visit`` sees the hidden states entering each layer (and, at index L, leaving the last one), just
        before that batch goes through the layer, so ``hooks`` know which batch they see."""
        stop = self.num_layers - 1 if last_layer is None else last_layer
        embed = self.read(self.decoder.embed_tokens, "weight", cast=False)  # vocab × d: keep it in its stored dtype
        hidden = [torch.nn.functional.embedding(b["input_ids"], embed).to(self.dtype) for b in batches]
        del embed
        positions = [torch.arange(h.shape[1]).unsqueeze(0) for h in hidden]
        rotary = [self.rotary(h, p) for h, p in zip(hidden, positions)]
        masks = [self._masks(h, b.get("attention_mask"), p) for h, b, p in zip(hidden, batches, positions)]
        with torch.no_grad():
            for i in range(stop + 1):
                layer = self.materialise(self.layers[i])
                handles = hooks(i, layer) if hooks is not None else []
                try:
                    for b in range(len(hidden)):
                        if visit is not None:
                            visit(i, b, hidden[b])
                        out = layer(hidden[b], attention_mask=masks[b][self._layer_type(i)],
                                    position_embeddings=rotary[b], position_ids=positions[b])
                        hidden[b] = out[0] if isinstance(out, tuple) else out
                finally:
                    for h in handles:
                        h.remove()
                    layer.to_empty(device="meta")
            if visit is not None and stop == self.num_layers - 1:
                for b, h in enumerate(hidden):
                    visit(self.num_layers, b, h)

    def _layer_type(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[layer]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def _masks(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=positions)
        kinds = {self._layer_type(i) for i in range(self.num_layers)}
        out = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in kinds:
            out["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return out

    def materialise(self, module: torch.nn.Module) -> torch.nn.Module:
        """Give ``module`` (a part of the meta model) its weights from the checkpoint; ``to_empty(device="meta")`` frees it."""
        if any(True for _ in module.buffers()):
            raise UsageError(f"{type(module).__name__} keeps buffers the layer-by-layer runner cannot read from the "
                             "checkpoint; this architecture cannot be run layer by layer")
        module.to_empty(device="cpu")
        state = {name: self.read(module, name) for name, _ in module.named_parameters()}
        module.load_state_dict(state, strict=True)
        return module.eval()

    def read(self, module: torch.nn.Module, param: str, cast: bool = True) -> torch.Tensor:
        """One parameter of ``module`` (named as in the meta model), read from the checkpoint (as ``dtype``
        when ``cast``)."""
        name = f"{self.paths[id(module)]}.{param}"
        canon = next(iter(self.family.canonical_names([name])))
        stored = self.canonical.get(canon, name)
        if stored not in self.ckpt.tensors:
            raise UsageError(f"the checkpoint has no tensor {name}; it does not match its config")
        tensor = self.ckpt.read(stored)
        return tensor.to(self.dtype) if cast else tensor


def collect_stats_layerwise(ckpt: DenseCheckpoint, data, layers: list[int], *, threshold: str = "zero",
                            needs: set[str] | None = None, stop: int | None = None):
    """:func:`ckptforge.calibration.collect_stats`, produced by the layer-by-layer runner instead of a
    whole-model forward: the same :class:`~ckptforge.calibration.LayerStats`, without the model in RAM.

        >>> stats = collect_stats_layerwise(ckpt, data, [1], needs={"scores"})    # doctest: +SKIP
    """
    from ckptforge.calibration import ActivationStats, LayerStats

    needs = set(needs or {"scores"})
    runner = LayerRunner(ckpt)
    dims = runner.family.dims(ckpt.config)
    result = {i: LayerStats(dims.intermediate_size, dims.hidden_size, threshold, needs) for i in layers}
    batches = list(data.batches(0, stop))
    rel = {role: runner.family.ffn[role].removesuffix(".weight") for role in ("up", "down")}
    current: dict[str, torch.Tensor | None] = {"mask": None, "inputs": None}

    def rows(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        mask = current["mask"]
        return flat[mask.reshape(-1).bool()] if mask is not None else flat

    def hooks(layer: int, module: torch.nn.Module) -> list:
        if layer not in result:
            return []
        prefix = "layers.{layer}.".format(layer=layer)
        up, down = (module.get_submodule(rel[r].format(layer=layer).removeprefix(prefix)) for r in ("up", "down"))
        handles = [down.register_forward_pre_hook(
            lambda m, args: result[layer].update(rows(args[0]), current.pop("inputs", None)))]
        if needs & {"centroids", "channels"}:
            handles.append(up.register_forward_pre_hook(lambda m, args: current.__setitem__("inputs", rows(args[0]))))
        return handles

    def visit(layer: int, b: int, hidden: torch.Tensor) -> None:
        current["mask"] = batches[b].get("attention_mask")

    runner.run(batches, visit=visit, hooks=hooks, last_layer=max(layers))
    samples = min(stop or data.num_samples, data.num_samples)
    return ActivationStats(result, {**data.describe(), "samples": samples, "device": "cpu", "runner": "layer-by-layer"})
