"""A Hugging Face Mixtral checkpoint directory: what it must hold, and how big it is.

Sizes come from the config and the safetensors headers alone, so checking a 93 GB checkpoint
reads a few kilobytes. Safetensors only: nothing here loads pickle or remote code.

A pre-quantized checkpoint (config.json's `quantization_config`, e.g. compressed-tensors FP8 with
F8_E4M3 weights and F32 `weight_scale` / `input_scale` tensors) is sized at the bytes it stores:
vLLM serves it as stored, it is never re-cast to bf16 first.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_endpoint.protocol.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"

# mistralai/Mixtral-8x7B-v0.1 config.json: every decision about real scale starts here.
MIXTRAL_8X7B_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "sliding_window": None,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8's quantization_config, as compressed-tensors writes it (FP8 weights
# with a scale per output channel, static per-tensor FP8 activations; the router and lm_head stay BF16): the
# layout the one-GPU deployments name, for sizing tests and benchmarks.
MIXTRAL_FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                              "dynamic": False},
    }},
}

# Every dtype name safetensors writes in a header (safetensors.torch._TYPES), and its width.
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1}
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")  # what an unquantized checkpoint stores; re-cast to the serving dtype
FP8_DTYPES = ("F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ")  # only ever read through a quantization_config
TARGET_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Tensors a quantized checkpoint adds beside its weights; not parameters of the model.
QUANT_SUFFIXES = ("_scale", "_zero_point", "_g_idx")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    shards: tuple[Path, ...]
    parameters: int  # total number of weights (a quantized checkpoint's scales not counted)
    bytes_by_dtype: dict[str, int]  # stored bytes per safetensors dtype, scales included

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data in the shards."""
        return sum(self.bytes_by_dtype.values())

    @property
    def context_window(self) -> int:
        return int(self.config["max_position_embeddings"])

    @property
    def quantization(self) -> str | None:
        """config.json's quantization_config.quant_method ("compressed-tensors", "fp8", ...); None: unquantized."""
        method = (self.config.get("quantization_config") or {}).get("quant_method")
        return str(method) if method else None

    def bytes_as(self, dtype: str) -> int:
        """The weights' bytes once loaded in `dtype`.

        Unquantized: every parameter in `dtype`. Quantized: the quantized tensors and their scales as
        stored, and only the 16-bit float tensors left unquantized (embeddings, norms, router, lm_head)
        in `dtype`.
        """
        if self.quantization is None:
            return self.parameters * TARGET_BYTES[dtype]
        return sum(n * TARGET_BYTES[dtype] // DTYPE_BYTES[d] if d in ("BF16", "F16") else n
                   for d, n in self.bytes_by_dtype.items())


def require_unquantized(checkpoint: Checkpoint, engine_name: str) -> None:
    """Refuses a quantized checkpoint for an engine that can only load float weights, naming both."""
    if checkpoint.quantization is None:
        return
    stored = ", ".join(sorted(d for d in checkpoint.bytes_by_dtype if d not in FLOAT_DTYPES))
    what = checkpoint.quantization + (f", {stored} tensors" if stored else "")
    raise CheckpointError(
        f"{checkpoint.path} is quantized ({what}); the {engine_name} engine "
        "serves only unquantized bfloat16/float16/float32 checkpoints: serve it on vLLM (MIXTRAL_ENGINE=vllm)")


def inspect_checkpoint(path: Path) -> Checkpoint:
    """Checks a checkpoint directory without loading weights; each problem names its file."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = _read_json(path / "config.json")
    if config.get("model_type") != "mixtral":
        raise CheckpointError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, not 'mixtral'")
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(f"{path / pickles[0]} is a pickle file; only safetensors are loaded, never pickle")
    index = _read_json(path / INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
    shards = tuple(path / name for name in sorted(set(weight_map.values())))
    parameters = 0
    by_dtype: dict[str, int] = {}
    dtypes: dict[str, tuple[str, Path]] = {}  # tensor -> (dtype, shard)
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard} is named in {INDEX_FILE} but does not exist")
        for name, (count, nbytes, dtype) in _tensor_sizes(shard).items():
            if weight_map.get(name) != shard.name:
                raise CheckpointError(f"{shard}: tensor {name} is not mapped to this shard in {INDEX_FILE}")
            parameters += 0 if name.endswith(QUANT_SUFFIXES) else count
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
            dtypes[name] = (dtype, shard)
    _check_quantization(path, config, dtypes)
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{path / TOKENIZER_FILE} is missing (Mixtral's SentencePiece tokenizer)")
    return Checkpoint(path=path, config=config, shards=shards, parameters=parameters, bytes_by_dtype=by_dtype)


def _check_quantization(path: Path, config: dict[str, Any], dtypes: dict[str, tuple[str, Path]]) -> None:
    """FP8 tensors need a quantization_config that names its method, and each its scale."""
    quantization = config.get("quantization_config")
    if quantization is not None and not (isinstance(quantization, dict)
                                         and isinstance(quantization.get("quant_method"), str)):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config has no quant_method")
    for name, (dtype, shard) in dtypes.items():
        if dtype not in FP8_DTYPES:
            continue
        if quantization is None:
            raise CheckpointError(f"{shard}: tensor {name} is {dtype}, but {path / 'config.json'} has no "
                                  "quantization_config saying how to read it")
        if f"{name}_scale" not in dtypes:
            raise CheckpointError(f"{shard}: tensor {name} is {dtype} without its {name}_scale")


def _tensor_sizes(shard: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (element count, byte count, dtype), from the safetensors header; checks the file's length."""
    size = shard.stat().st_size
    with shard.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{shard} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{shard} is truncated or not safetensors: header of {header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CheckpointError(f"{shard}: the safetensors header is not valid JSON") from None
    sizes: dict[str, tuple[int, int, str]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        if info["dtype"] not in DTYPE_BYTES:
            raise CheckpointError(f"{shard}: tensor {name} has dtype {info['dtype']}, which safetensors does not name")
        begin, stop = info["data_offsets"]
        if stop - begin != count * DTYPE_BYTES[info["dtype"]]:
            raise CheckpointError(f"{shard}: tensor {name} has a {info['dtype']} size that does not match its shape")
        sizes[name] = (count, stop - begin, info["dtype"])
        end = max(end, stop)
    if size < 8 + header_len + end:
        raise CheckpointError(f"{shard} is truncated: {size} bytes, the header says {8 + header_len + end}")
    return sizes


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data
