"""fp32 weights prepacked for oneDNN, for our engine on a CPU.

transformers' linears and experts call torch's default CPU GEMM, which reads a weight slowly when
it is multiplied by the few rows of a decode step. Measured on the 2-core AMD EPYC the benchmarks
run on: [8 x 512] @ [512 x 32768] read its weight at 1.9 GB/s, and at 8.3 GB/s once the weight was
reordered into oneDNN's blocked layout, which is what vLLM's CPU build does to its linears. So in a
model that sits wholly on the CPU in float32, each nn.Linear and experts block with large enough
matrices is swapped for one that holds them packed that way; the plain copies are dropped, so it
costs no memory.

The swap happens once, after loading; outputs equal the plain modules' up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

# oneDNN blocks a packed weight for this many input rows; one layout serves every batch size, and 32
# was the best single choice measured from 1 to 64 rows.
PACK_ROWS = 32
# A packed call costs about 50 us before any work, the plain GEMM about 15 us: below about 1 MiB of
# fp32 weights (the embedded model's experts, say) the plain one is faster, so it stays.
MIN_PACKED = 2**18  # weight elements, of one matrix
_onednn = torch.ops.mkldnn


def prepack(model: nn.Module) -> int:
    """Swaps each large enough linear and experts block of a float32, CPU-only model for a prepacked
    one; returns how many it swapped (0 where oneDNN is missing or the model is not all fp32 on CPU)."""
    if not torch.backends.mkldnn.is_available() or not all(
            p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if (isinstance(child, nn.Linear) and child.weight.numel() >= MIN_PACKED)
             or (isinstance(child, MixtralExperts) and child.gate_up_proj[0].numel() >= MIN_PACKED)]
    # One module at a time, so that the plain copy is dropped before the next one is packed.
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child) if isinstance(child, nn.Linear) else PackedExperts(child))
    return len(swaps)


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
