"""Experts stored as stacked tensors, computed on one sorted batch of token copies.

How the experts compute is ``experts_implementation`` (transformers' name for the same choice):
``eager`` runs one GEMM pair per expert in a Python loop; ``grouped_mm`` runs two grouped GEMMs
(``torch.nn.functional.grouped_mm``) over all experts at once; ``auto`` (default) takes grouped_mm
where torch has it for the device and dtype — fp32 / bf16 on CPU (measured never slower than the
loop on the 2-core dev VM: 0.53× vs 0.52× of the dense MLP in one run, 1.9× faster fwd+bwd at
ViT-B shape in another, under load), bf16 on CUDA GPUs of compute capability ≥ 8.0 (the kernel's
target; torchtitan reported ~4× over a per-expert loop; not yet measured here) — and the loop
elsewhere (fp16, fp32 on CUDA, older GPUs, a torch without grouped_mm).
"""

from __future__ import annotations

import torch
from torch import nn

#: The ways experts can compute (``config.experts_implementation``).
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm")


def check_experts_implementation(name: str) -> str:
    """``name`` if it is an experts implementation, else a ValueError naming the choices."""
    if name not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation {name!r} is not one of {', '.join(EXPERTS_IMPLEMENTATIONS)}")
    if name == "grouped_mm" and not hasattr(nn.functional, "grouped_mm"):
        raise ValueError(f"experts_implementation 'grouped_mm' needs a torch with torch.nn.functional.grouped_mm "
                         f"(this is {torch.__version__}); use 'eager' or 'auto'")
    return name


def set_experts_implementation(module: nn.Module, name: str) -> None:
    """Make every :class:`StackedExperts` inside ``module`` compute with ``name`` (auto | eager | grouped_mm)."""
    check_experts_implementation(name)
    for m in module.modules():
        if isinstance(m, StackedExperts):
            m.implementation = name


def grouped_mm_compute_dtype(x: torch.Tensor, *widths: int) -> torch.dtype | None:
    """The dtype ``auto`` runs grouped_mm in for input ``x`` (autocast's, when it is on), or None
    where the loop is used: CPU in fp32 / bf16; CUDA in bf16 with compute capability ≥ 8.0; and
    every GEMM dimension in ``widths`` a whole number of 16 bytes (the kernel's stride alignment)."""
    kind = x.device.type
    if not hasattr(nn.functional, "grouped_mm") or kind not in ("cpu", "cuda"):
        return None
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    if kind == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        return None
    if kind == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return None
    return dtype if _aligned(dtype, widths) else None


def _aligned(dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    return all(w * dtype.itemsize % 16 == 0 for w in widths)


class StackedExperts(nn.Module):
    """E two-layer FFN experts (d → S → d) with weights stacked along a leading expert axis.

    Parameter names are part of the checkpoint format: ``w1`` (E, S, d), ``b1`` (E, S),
    ``w2`` (E, d, S), ``b2`` (E, d). ``dispatched`` counts the tokens (token-expert assignments)
    the experts have processed since it was last set to 0, so the compute a router actually spent
    can be measured (``dispatched · flops_per_token``); it is not part of the state dict.

        >>> experts = StackedExperts(num_experts=4, hidden_size=8, expert_width=16, activation="gelu")
        >>> experts.expert_forward(0, torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_width: int, activation: str, bias: bool = True,
                 implementation: str = "auto"):
        # imported here, not at module level: importing ckptforge.moe must not import transformers (whose
        # first import registers ckptforge's Auto classes, which need ckptforge.moe fully imported)
        from transformers.activations import ACT2FN

        super().__init__()
        self.num_experts = num_experts
        self.dispatched = 0
        self.implementation = check_experts_implementation(implementation)
        self.w1 = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, expert_width))
        self.b1 = nn.Parameter(torch.zeros(num_experts, expert_width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.act = ACT2FN[activation]
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    @property
    def flops_per_token(self) -> int:
        """Multiply-add FLOPs of one expert on one token: two matmuls d·S, 2 FLOPs per multiply-add."""
        _, width, hidden = self.w1.shape
        return 4 * width * hidden

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``expert`` on the tokens ``x`` (n, d) it was given."""
        self.dispatched += x.shape[0]
        h = x @ self.w1[expert].T
        if self.b1 is not None:
            h = h + self.b1[expert]
        h = self.act(h) @ self.w2[expert].T
        if self.b2 is not None:
            h = h + self.b2[expert]
        return h

    def batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own equal-size batch: ``x`` (E, n, d) → (E, n, d), two batched matmuls.

            >>> StackedExperts(2, 8, 16, "gelu").batched_forward(torch.randn(2, 5, 8)).shape
            torch.Size([2, 5, 8])
        """
        self.dispatched += x.shape[0] * x.shape[1]
        h = torch.bmm(x, self.w1.transpose(1, 2))
        if self.b1 is not None:
            h = h + self.b1[:, None]
        h = torch.bmm(self.act(h), self.w2.transpose(1, 2))
        if self.b2 is not None:
            h = h + self.b2[:, None]
        return h

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine the experts' outputs: token t gets Σ_j weights[t, j] · expert[expert_index[t, j]](x_t).

        ``x`` (T, d); ``expert_index`` and ``weights`` (T, k). Entries with index −1 are skipped
        (dropped by capacity, or not chosen by an expert). The assignments are sorted by expert
        once; the experts then run on contiguous groups of that batch (see the module docstring
        for how). No loop over tokens.
        """
        out = torch.zeros_like(x)
        flat_index = expert_index.reshape(-1)
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(expert_index.shape[1])
        live = (flat_index >= 0).nonzero(as_tuple=True)[0]
        if live.numel() == 0:
            return out
        order = live[torch.argsort(flat_index[live], stable=True)]
        self.dispatched += order.numel()  # token-expert assignments computed (eval's FLOPs count)
        experts_of = flat_index[order]
        tokens = token_of[order]
        gathered = x[tokens]
        flat_weight = weights.reshape(-1)[order, None].to(x.dtype)
        grouped_dtype = self._grouped_mm_dtype(x)
        if grouped_dtype is not None:
            y = self._grouped(gathered, experts_of, grouped_dtype).to(x.dtype)
        else:
            y = self._loop(gathered, torch.bincount(experts_of, minlength=self.num_experts).tolist())
        out.index_add_(0, tokens, y * flat_weight)
        return out

    def _grouped_mm_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype to run grouped_mm in, or None for the loop."""
        if self.implementation == "eager":
            return None
        widths = (x.shape[-1], self.w1.shape[1])
        auto = grouped_mm_compute_dtype(x, *widths)
        if self.implementation == "auto":
            return auto
        dtype = auto or x.dtype
        if not _aligned(dtype, widths):
            raise ValueError(f"experts_implementation 'grouped_mm' needs rows of whole 16-byte units; hidden size "
                             f"{widths[0]} and expert width {widths[1]} in {dtype} are not; use 'auto' or 'eager'")
        return dtype

    def _loop(self, gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``eager``: one GEMM pair per expert on its contiguous group of rows."""
        # unbind once: indexing w1[e] per expert would give every expert a full-size (E, S, d) gradient
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        b1 = self.b1.unbind(0) if self.b1 is not None else [None] * self.num_experts
        b2 = self.b2.unbind(0) if self.b2 is not None else [None] * self.num_experts
        ys = []
        for e, part in enumerate(gathered.split(counts)):
            if part.shape[0]:
                h = self.act(nn.functional.linear(part, w1[e], b1[e]))
                ys.append(nn.functional.linear(h, w2[e], b2[e]))
        return torch.cat(ys)

    def _grouped(self, gathered: torch.Tensor, experts_of: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``grouped_mm``: two grouped GEMMs over all experts; rows are sorted by expert, ``offs`` ends each group.
        No host sync: the group sizes stay on the device."""
        offs = torch.cumsum(torch.bincount(experts_of, minlength=self.num_experts), 0, dtype=torch.int32)
        x = gathered.to(dtype)
        h = nn.functional.grouped_mm(x, self.w1.to(dtype).transpose(1, 2), offs=offs)
        if self.b1 is not None:  # grouped_mm takes no per-group bias
            h = h + self.b1.to(dtype)[experts_of]
        h = self.act(h)
        y = nn.functional.grouped_mm(h, self.w2.to(dtype).transpose(1, 2), offs=offs)
        if self.b2 is not None:
            y = y + self.b2.to(dtype)[experts_of]
        return y
