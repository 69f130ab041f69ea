"""Run a decoder-only LLM one layer at a time, straight from its checkpoint.

The model is built on the meta device from its config (no memory); the token embedding is read
and applied, then each decoder layer in turn is materialised from the lazy checkpoint, every batch
is pushed through it, and it is freed. Peak memory is one layer plus the batches' hidden states,
never the model: a base larger than RAM can still give prompt gates and calibration statistics.

    >>> runner = LayerRunner(open_checkpoint("tiny-llama"))                    # doctest: +SKIP
    >>> runner.run([batch], visit=lambda layer, b, hidden: print(layer, hidden.shape))   # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import sys
from typing import Callable

import torch

from ckptforge.errors import UsageError
from ckptforge.families import detect_family
from ckptforge.io.source import DenseCheckpoint

#: visit(layer, batch index, hidden states entering ``layer`` (B × T × d)); layer L = after the last layer.
Visit = Callable[[int, int, torch.Tensor], None]
#: hooks(layer, module) → hook handles, removed once every batch has passed the layer.
Hooks = Callable[[int, torch.nn.Module], list]


#: Blocks at least this large are memory-mapped by glibc's malloc, so freeing them returns the memory.
MMAP_THRESHOLD = 4 << 20


def keep_large_blocks_mapped() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (once per process; no-op elsewhere).

    glibc raises the threshold each time a mapped block is freed (up to 32 MiB); after that, blocks
    of a decoder layer's tensor sizes come from the heap and fragment it, and freed layers are not
    given back: measured +30 MiB of resident memory per TinyLlama-shape layer (1.27 GiB after 22
    layers instead of 0.61 GiB with the threshold fixed)."""
    global _THRESHOLD_SET
    if _THRESHOLD_SET or not sys.platform.startswith("linux"):
        return
    _THRESHOLD_SET = True
    try:
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_THRESHOLD_SET = False


class LayerRunner:
    """Hidden states of a decoder-only model, computed layer by layer from a :class:`DenseCheckpoint`."""

    def __init__(self, ckpt: DenseCheckpoint, dtype: torch.dtype = torch.float32):
        from ckptforge.loading import config_object, model_class

        keep_large_blocks_mapped()
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
        hidden = self.embed([b["input_ids"] for b in batches])
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

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The token embeddings of each batch of ``ids`` (as ``dtype``), reading only the embedding rows
        they use (a 32000-token vocabulary is 131 MB in bf16; a few prompts use a few rows)."""
        used, inverse = torch.unique(torch.cat([i.reshape(-1) for i in ids]), return_inverse=True)
        rows = self.read_rows(self.decoder.embed_tokens, "weight", used).to(self.dtype)
        out, start = [], 0
        for i in ids:
            out.append(rows[inverse[start:start + i.numel()]].reshape(*i.shape, -1))
            start += i.numel()
        return out

    def materialise(self, module: torch.nn.Module) -> torch.nn.Module:
        """Give ``module`` (a part of the meta model) its weights from the checkpoint; ``to_empty(device="meta")`` frees it.

        Each tensor is read and copied (cast) into its parameter in turn, so the layer is in memory once
        plus one stored tensor, not twice."""
        if any(True for _ in module.buffers()):
            raise UsageError(f"{type(module).__name__} keeps buffers the layer-by-layer runner cannot read from the "
                             "checkpoint; this architecture cannot be run layer by layer")
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in module.named_parameters():
                stored = self.read(module, name, cast=False)
                if stored.shape != param.shape:
                    raise UsageError(f"{self.paths[id(module)]}.{name} has shape {tuple(stored.shape)} in the "
                                     f"checkpoint but {tuple(param.shape)} in its config; the config does not match")
                param.copy_(stored if param.dtype == self.dtype else stored.to(self.dtype))  # rounded to ``dtype``
                del stored
        return module.eval()

    def read_rows(self, module: torch.nn.Module, param: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D parameter, read from the checkpoint in its stored dtype:
        each run of consecutive rows with one file read (safetensors), else the whole tensor indexed."""
        stored = self._stored(module, param)
        info = self.ckpt.tensors[stored]
        if info.span is None or len(info.shape) != 2:
            return self.ckpt.read(stored)[rows]
        row_bytes = info.shape[1] * torch.empty((), dtype=info.dtype).element_size()
        out = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
        ids = rows.tolist()
        if ids and not 0 <= ids[0] <= ids[-1] < info.shape[0]:
            raise UsageError(f"token id {ids[-1] if ids[-1] >= info.shape[0] else ids[0]} is outside the embedding's "
                             f"{info.shape[0]} rows; the tokenizer does not match the model")
        with open(info.file, "rb") as f:
            i = 0
            while i < len(ids):
                j = i
                while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                    j += 1
                f.seek(info.span[0] + ids[i] * row_bytes)
                if f.readinto(out[i:j + 1].numpy()) != (j + 1 - i) * row_bytes:
                    raise UsageError(f"'{info.file}' ended while reading tensor '{stored}'; the file is truncated")
                i = j + 1
        return out.view(info.dtype).reshape(len(ids), info.shape[1])

    def read(self, module: torch.nn.Module, param: str, cast: bool = True) -> torch.Tensor:
        """One parameter of ``module`` (named as in the meta model), read from the checkpoint (as ``dtype``
        when ``cast``)."""
        tensor = self.ckpt.read(self._stored(module, param))
        return tensor.to(self.dtype) if cast else tensor

    def _stored(self, module: torch.nn.Module, param: str) -> str:
        """The checkpoint's name of ``module``'s parameter ``param``."""
        name = f"{self.paths[id(module)]}.{param}"
        canon = next(iter(self.family.canonical_names([name])))
        stored = self.canonical.get(canon, name)
        if stored not in self.ckpt.tensors:
            raise UsageError(f"the checkpoint has no tensor {name}; it does not match its config")
        return stored


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
