"""ERNIE 4.5's mixture-of-experts block (spec §2): modality-routed expert groups plus shared experts.

Each group (text, vision, ...) has its own fp32 router, its own correction-bias row (used for expert
*selection* only) and its own stacked experts ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``.
A token is routed by the group that lists its modality id; the shared SwiGLU sees every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Ernie45Config
from . import cpu_gemv
from .layers import RMSNorm, SwiGLU, decode_weight

GATHER_MAX_ROWS = 16  # up to this many (token, expert) pairs, gather the experts' weights instead of sorting
GROUPED_MM = hasattr(torch, "_grouped_mm")


class Router(nn.Module):
    """fp32 softmax router with an aux-loss-free correction bias that only steers top-k selection."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
        self.top_k = top_k
        self.norm_min = norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (logits [N, E] fp32, weights [N, k] in x's dtype, expert ids [N, k])."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
            probs = logits.softmax(dim=-1)
            ids = torch.topk(probs + self.e_score_correction_bias.float(), self.top_k, dim=-1).indices
            weights = probs.gather(-1, ids)
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return logits, weights.to(x.dtype), ids


class ExpertGroup(nn.Module):
    """One routed group: its router and its experts, stored stacked so a grouped kernel can run them."""

    def __init__(self, hidden: int, num_experts: int, width: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.gate = Router(hidden, num_experts, top_k, norm_min)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.num_experts = num_experts

    def experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_k · Expert_{ids_k}(x).

        Decode rows of bf16 on CPU: tokens sorted by expert, each expert hit through the bf16 matvec kernel (its
        weights read once for all its rows; `MoEBlock.decode_block` runs the same as one call). Other few
        tokens: each token's k experts' weights gathered and applied as one batched matmul, so a step touches
        only the experts it uses. Many tokens without autograd (prefill): tokens sorted by expert, one grouped
        matmul over the stacked weights. Training: the same sorted order, one matmul pair per expert hit
        (torch's grouped matmul has no CPU backward yet).
        """
        n, k = ids.shape
        if n <= cpu_gemv.MAX_ROWS and self.kernel_reads(x):
            return self.sorted_experts(x, ids, weights)
        half_cpu = x.device.type == "cpu" and self.gate_up_proj.dtype in (torch.bfloat16, torch.float16)
        # (on CPU the gathered bf16 einsum is ~35x slower than one matmul per expert hit: 271 vs 7.4 ms, 21B shapes)
        if n * k <= GATHER_MAX_ROWS and not cpu_gemv.needs_grad(x, self.gate_up_proj) and not half_cpu:
            h = torch.einsum("nh,nkih->nki", x, self.gate_up_proj[ids].to(x.dtype))
            gate, up = h.chunk(2, dim=-1)
            y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down_proj[ids].to(x.dtype))
            return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)
        grouped = GROUPED_MM and not cpu_gemv.needs_grad(x, self.gate_up_proj) and x.dtype == self.gate_up_proj.dtype
        return self.sorted_experts(x, ids, weights, grouped)

    def kernel_reads(self, x: torch.Tensor) -> bool:
        """Whether the bf16 matvec kernel runs the experts for these (few) bf16 rows here and now."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if x.dtype != torch.bfloat16 or w1.dtype != torch.bfloat16 or cpu_gemv.needs_grad(x, w1):
            return False
        return cpu_gemv.usable(w1[0]) and cpu_gemv.usable(w2[0]) and cpu_gemv.ready()

    def decode_experts(self, x: torch.Tensor) -> cpu_gemv.Experts | None:
        """Every expert's (gate_up, down) as `cpu_gemv.moe_block` reads them for decode rows x, or None where
        `expert` would not run them through the kernels (then the module path runs)."""
        if not self.kernel_reads(x):
            return None
        key = (self.gate_up_proj.data_ptr(), self.down_proj.data_ptr())
        if getattr(self, "_decode_key", None) != key:  # views made once, not 2 x 64 per layer and step
            self._decode_experts = (list(self.gate_up_proj.unbind(0)), [], list(self.down_proj.unbind(0)), [], 0)
            self._decode_key = key
        return self._decode_experts

    def sorted_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       grouped: bool = False) -> torch.Tensor:  # fmt: skip
        """The same sum with tokens sorted by expert: one grouped matmul, or one `expert` call per expert hit."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        xs = x[token]
        if grouped:
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            ys = torch._grouped_mm((F.silu(gate) * up).contiguous(), self.down_proj.transpose(1, 2), offs=offs)
        else:
            ys = torch.empty_like(xs)
            start = 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    ys[start : start + c] = self.expert(e, xs[start : start + c]).to(ys.dtype)
                    start += c
        ys = ys.to(x.dtype) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` (SwiGLU) on its rows (a few bf16 rows on CPU: the decode kernel, as the dense linears)."""
        w1, w2 = self.gate_up_proj[e], self.down_proj[e]
        rows_fit = x.shape[0] <= cpu_gemv.MAX_ROWS and cpu_gemv.usable(w1) and cpu_gemv.usable(w2)
        if rows_fit and not cpu_gemv.needs_grad(x, w1) and cpu_gemv.ready():
            return cpu_gemv.gemv(cpu_gemv.silu_mul(cpu_gemv.gemv(x, w1)), w2, x.dtype == torch.bfloat16).to(x.dtype)
        gate, up = F.linear(x, w1).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (output [N, H], router logits [N, E] fp32, chosen experts [N, k])."""
        logits, weights, ids = self.gate(x)
        return self.experts(x, ids, weights), logits, ids


class MoEBlock(nn.Module):
    """Shared experts for every token + each token's modality group (top-k of that group's experts)."""

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__()
        h = config.hidden_size
        self.groups = nn.ModuleDict(
            {
                g["name"]: ExpertGroup(h, g["num_experts"], g["intermediate_size"], config.moe_k, config.moe_norm_min)
                for g in config.expert_groups
            }
        )
        self.group_modalities = {g["name"]: tuple(g["modalities"]) for g in config.expert_groups}
        self.shared_experts = (
            SwiGLU(h, config.moe_shared_intermediate_size, config.use_bias) if config.moe_num_shared_experts else None
        )

    def forward(
        self, x: torch.Tensor, modality: torch.Tensor | None = None, router_out: list | None = None
    ) -> torch.Tensor:
        """x [B, S, H]; modality [B, S] ids (None: all text).

        router_out: a list to append ``(group, router logits, chosen experts, token rows)`` to, for the
        training losses and the correction-bias update; None (inference) keeps nothing.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        if len(self.groups) == 1:
            (name, group), rows = next(iter(self.groups.items())), None
            y, logits, ids = group(x)
            out = out + y
            if router_out is not None:
                router_out.append((name, logits, ids, rows))
            return out.reshape(shape)
        modality = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if modality is None else modality
        modality = modality.reshape(-1)
        for name, group in self.groups.items():
            rows = torch.isin(modality, torch.tensor(self.group_modalities[name], device=x.device)).nonzero()[:, 0]
            if rows.numel():
                y, logits, ids = group(x[rows])
                out = out.index_add(0, rows, y.to(out.dtype))  # (autocast may give the shared path another dtype)
                if router_out is not None:
                    router_out.append((name, logits, ids, rows))
        return out.reshape(shape)

    def decode_block(self, h: torch.Tensor, norm: RMSNorm, modality: torch.Tensor | None = None) -> torch.Tensor | None:
        """h + self(norm(h), modality) for decode rows (h [B <= 8, 1, H]) as one `cpu_gemv` call, the same numbers,
        or None where it does not apply: every row routed by one group (text decode), the kernels reading that
        group's experts (`decode_experts`) and the shared experts (`decode_weight`), and nothing for autograd."""
        if h.shape[1] != 1 or h.shape[0] > cpu_gemv.MAX_ROWS or norm.weight.dtype != h.dtype:
            return None
        group = self._group_of_all(modality)
        experts = None if group is None else group.decode_experts(h.reshape(h.shape[0], -1))
        if experts is None or not cpu_gemv.fused(h, norm.weight):
            return None
        shared = None
        if self.shared_experts is not None:
            up, down = self.shared_experts.gate_up_proj, self.shared_experts.down_proj
            shared = None if up is None else (decode_weight(up, h.dtype), decode_weight(down, h.dtype))
            if shared is None or None in shared:
                return None
        return cpu_gemv.moe_block(h, norm.weight, norm.eps, group.gate, experts, shared)

    def _group_of_all(self, modality: torch.Tensor | None) -> ExpertGroup | None:
        """The group every row is routed by when that is one group: the only one, or the text group for text rows."""
        if len(self.groups) == 1:
            return next(iter(self.groups.values()))
        if modality is not None and bool(modality.any()):
            return None
        return next((self.groups[n] for n, mods in self.group_modalities.items() if 0 in mods), None)
