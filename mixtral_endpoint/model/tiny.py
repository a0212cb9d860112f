"""The embedded default: a tiny, randomly initialised Mixtral with the real architecture.

Same layer types, 8 experts with top-2 routing, grouped-query attention (4 query heads per
key/value head, as in Mixtral), rope theta, context window and the real 32000-token tokenizer;
only the widths and depth are small. Its text is gibberish by design.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

from mixtral_endpoint.model.checkpoint import MIXTRAL_8X7B_CONFIG, TOKENIZER_FILE
from mixtral_endpoint.model.tokenizer import reference_tokenizer_file

SEED = 20231211  # Mixtral's release date
TINY_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,  # Mixtral's own; vLLM's CPU attention takes head sizes 32 to 512 only
}
SHARD_SIZE = "8MB"  # gives several shards, as a real checkpoint has
LOGIT_SCALE = 1.0  # std of lm_head weights: wide logit gaps make greedy decoding batch-invariant


def tiny_config() -> MixtralConfig:
    real = {k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return MixtralConfig(**{**real, **TINY_SIZES}, architectures=["MixtralForCausalLM"])


def tiny_model() -> MixtralForCausalLM:
    """The tiny Mixtral's weights, deterministically, in bfloat16 as a real checkpoint stores them."""
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(tiny_config())
    with torch.no_grad():
        # Default init (std 0.02) gives near-tied logits, so padding noise could flip greedy picks.
        model.lm_head.weight.normal_(0.0, LOGIT_SCALE)
    return model.to(torch.bfloat16)


def build_tiny(out: Path) -> Path:
    """Writes the tiny checkpoint to `out`, deterministically, and returns `out`."""
    model = tiny_model()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    shutil.copyfile(reference_tokenizer_file(), out / TOKENIZER_FILE)
    return out
