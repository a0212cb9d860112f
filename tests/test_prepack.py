"""Prepacked weights on CPU: the same model, the same outputs, only fp32 matrices swapped.

Experts blocks are run two ways, both checked: by vLLM's fused MoE kernel (installed with the test
environment, so its absence fails here) and, as where vLLM's CPU build is not installed, by oneDNN.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from mixtral_endpoint.engines.transformers.prepack import (
    FusedExperts,
    PackedExperts,
    PackedLinear,
    fused_moe_available,
    prepack,
)
from mixtral_endpoint.model.tiny import tiny_config

# Wide enough that lm_head, q_proj, o_proj and the experts are over prepack's size floor; k_proj and v_proj
# (one key/value head: 128 x 512) and the router are not. One layer keeps it quick.
WIDE = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 128}
PROMPTS = torch.tensor([[1, 851, 2215, 302, 5611], [1, 1014, 5565, 28723, 349]])


pytestmark = [pytest.mark.model, pytest.mark.transformers]  # a small Mixtral of its own, prepacked and run


@pytest.fixture(scope="module")
def wide() -> MixtralForCausalLM:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**{**tiny_config().to_dict(), **WIDE})).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # wide logit gaps, as the embedded model has
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "onednn"])
def packed(request: pytest.FixtureRequest, wide: MixtralForCausalLM) -> MixtralForCausalLM:
    model = copy.deepcopy(wide)
    assert prepack(model, fused_moe=request.param) == 4
    return model


def test_vllms_fused_moe_kernel_is_installed():
    assert fused_moe_available()


def test_the_large_linears_and_experts_blocks_are_swapped(packed: MixtralForCausalLM):
    attention, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert all(isinstance(m, PackedLinear) for m in (packed.lm_head, attention.q_proj, attention.o_proj))
    assert not isinstance(mlp.experts, MixtralExperts)
    assert isinstance(attention.k_proj, torch.nn.Linear) and isinstance(attention.v_proj, torch.nn.Linear)


def test_experts_blocks_take_the_fused_kernel_unless_told_not_to(wide: MixtralForCausalLM):
    fused, onednn = copy.deepcopy(wide), copy.deepcopy(wide)
    prepack(fused), prepack(onednn, fused_moe=False)
    assert isinstance(fused.model.layers[0].mlp.experts, FusedExperts)
    assert isinstance(onednn.model.layers[0].mlp.experts, PackedExperts)


def test_prepacked_logits_equal_the_plain_models(wide: MixtralForCausalLM, packed: MixtralForCausalLM):
    with torch.inference_mode():
        plain, swapped = wide(input_ids=PROMPTS).logits, packed(input_ids=PROMPTS).logits
    torch.testing.assert_close(swapped, plain, rtol=1e-4, atol=1e-4)


def test_prepacked_greedy_tokens_equal_the_plain_models(wide: MixtralForCausalLM, packed: MixtralForCausalLM):
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=2)
    mask = torch.ones_like(PROMPTS)
    with torch.inference_mode():
        expected = wide.generate(input_ids=PROMPTS, attention_mask=mask, generation_config=config)
        assert packed.generate(input_ids=PROMPTS, attention_mask=mask, generation_config=config).equal(expected)


def test_the_embedded_models_small_linears_stay_plain():
    """Under prepack's floor a oneDNN call's fixed cost outweighs its faster reads: of the linears only
    lm_head is swapped; the experts blocks take the fused kernel, whose calls cost little at any size."""
    torch.manual_seed(0)
    model, onednn = MixtralForCausalLM(tiny_config()), MixtralForCausalLM(tiny_config())
    assert prepack(model) == 3 and isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.model.layers[0].mlp.experts, FusedExperts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert prepack(onednn, fused_moe=False) == 1 and isinstance(onednn.model.layers[0].mlp.experts, MixtralExperts)


def test_models_not_wholly_fp32_on_cpu_are_left_alone():
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config()).to(torch.bfloat16)
    assert prepack(model) == 0 and isinstance(model.lm_head, torch.nn.Linear)
