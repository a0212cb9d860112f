"""fp32 weights prepacked for fast CPU kernels, for our engine on a CPU.

transformers' linears and experts call torch's default CPU GEMM, which reads a weight slowly when
it is multiplied by the few rows of a decode step. Measured on the 2-core AMD EPYC the benchmarks
run on: [8 x 512] @ [512 x 32768] read its weight at 1.9 GB/s, and at 8.3 GB/s once the weight was
reordered into oneDNN's blocked layout, which is what vLLM's CPU build does to its linears. So in a
model that sits wholly on the CPU in float32, each nn.Linear and experts block with large enough
matrices is swapped for one that holds them packed that way; the plain copies are dropped, so it
costs no memory.

Experts blocks go one step further where vLLM's CPU build is installed (as `make install` does on
Linux x86-64): its fused MoE kernel runs a whole block, every expert's tokens, as one grouped GEMM
from weights it prepacks itself. Measured there, a decode step's 8 tokens through the ~125 M
benchmark model's 7 experts blocks took 10 ms fused against 21 ms as per-expert oneDNN calls, and the
embedded model's 2 blocks 0.12 ms against 2.4 ms plain. Without it, experts blocks take oneDNN.

The swap happens once, after loading; outputs equal the plain modules' up to float rounding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

# oneDNN blocks a packed weight for this many input rows; one layout serves every batch size, and 32
# was the best single choice measured from 1 to 64 rows.
PACK_ROWS = 32
# A packed call costs about 50 us before any work, the plain GEMM about 15 us: below about 1 MiB of
# fp32 weights (the embedded model's experts, say) the plain one is faster, so it stays.
MIN_PACKED = 2**18  # weight elements, of one matrix
# vLLM's fused kernel tiles both matrices of an expert in blocks of this many rows and columns.
FUSED_ALIGNMENT = 32
_onednn = torch.ops.mkldnn
log = logging.getLogger(__name__)


def prepack(model: nn.Module, *, fused_moe: bool = True) -> int:
    """Swaps each large enough linear and each experts block of a float32, CPU-only model for a
    prepacked one; returns how many it swapped (0 where oneDNN is missing or the model is not all fp32
    on CPU). Experts blocks take vLLM's fused kernel where it is installed, unless `fused_moe` is False."""
    if not torch.backends.mkldnn.is_available() or not all(
            p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return 0
    fused = fused_moe and fused_moe_available()

    def swap(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear) and module.weight.numel() >= MIN_PACKED:
            return PackedLinear(module)
        if isinstance(module, MixtralExperts):
            if fused and FusedExperts.fits(module):
                return FusedExperts(module)
            if module.gate_up_proj[0].numel() >= MIN_PACKED:
                return PackedExperts(module)
        return None

    swapped = 0
    # One module at a time, so that the plain copy is dropped before the next one is packed.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (new := swap(child)) is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped


def fused_moe_available() -> bool:
    """Whether vLLM's CPU fused MoE kernel is there: vLLM's CPU build installed (not its GPU build)."""
    try:
        from vllm.platforms.cpu import CpuPlatform

        # Registers vLLM's CPU kernels as torch.ops._C from the build this CPU runs (AVX-512 with or
        # without bf16, or AVX2): importing `vllm._C` itself is an illegal instruction on an AVX2 CPU.
        CpuPlatform.import_kernels()
        return hasattr(torch.ops._C, "cpu_fused_moe")
    except (ImportError, OSError, RuntimeError) as e:
        log.info("vLLM's CPU fused MoE kernel is not available (%s): experts blocks take oneDNN", e)
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # weight: [out, in], as nn.Linear holds it.
    return _onednn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [rows, in] -> [rows, out]
    return _onednn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return _linear(rows, self.packed, self.bias).reshape(*x.shape[:-1], self.out_features)


class PackedExperts(nn.Module):
    """MixtralExperts' forward: each expert's tokens through its own packed gate/up and down."""

    def __init__(self, experts: MixtralExperts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.gate_up = [_pack(w) for w in experts.gate_up_proj]  # each [2 * intermediate, hidden]
        self.down = [_pack(w) for w in experts.down_proj]  # each [hidden, intermediate]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        # hidden_states: [tokens, hidden]; top_k_index, top_k_weights: [tokens, k]
        chosen = top_k_index.reshape(-1)  # [pairs]: the expert of each (token, choice) pair
        order = torch.argsort(chosen, stable=True)  # the pairs grouped by expert
        tokens = order // top_k_index.shape[-1]
        counts = torch.bincount(chosen, minlength=self.num_experts).tolist()
        grouped = hidden_states[tokens]  # [pairs, hidden]
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                gate, up = _linear(grouped[start:start + count], self.gate_up[expert]).chunk(2, dim=-1)
                outputs.append(_linear(self.act_fn(gate) * up, self.down[expert]))
                start += count
        weighted = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None].to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, tokens, weighted)


class FusedExperts(nn.Module):
    """MixtralExperts' forward as one call of vLLM's CPU fused MoE kernel, from weights it prepacked."""

    def __init__(self, experts: MixtralExperts) -> None:
        super().__init__()
        self.gate_up = _pack_experts(experts.gate_up_proj)  # [experts, 2 * intermediate, hidden]
        self.down = _pack_experts(experts.down_proj)  # [experts, hidden, intermediate]

    @staticmethod
    def fits(experts: MixtralExperts) -> bool:
        return (isinstance(experts.act_fn, (SiLUActivation, nn.SiLU))
                and experts.hidden_dim % FUSED_ALIGNMENT == 0 and experts.intermediate_dim % FUSED_ALIGNMENT == 0)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        # hidden_states: [tokens, hidden]; top_k_index, top_k_weights: [tokens, k]
        out = torch.empty_like(hidden_states)
        # (out, input, w13, w2, w13 bias, w2 bias, weights, ids, skip weighting, activation, instruction set)
        torch.ops._C.cpu_fused_moe(out, hidden_states.contiguous(), self.gate_up, self.down, None, None,
                    top_k_weights.to(hidden_states.dtype), top_k_index.to(torch.int32), False, "silu", "vec")
        return out


def _pack_experts(weights: torch.Tensor) -> torch.Tensor:
    packed = torch.empty_like(weights)
    torch.ops._C.prepack_moe_weight(weights.detach().contiguous(), packed, "vec")
    return packed
