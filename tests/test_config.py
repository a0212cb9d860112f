"""The typed config object: built from MIXTRAL_* variables, defaults otherwise, bad values refused."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mixtral_endpoint.protocol.config import CHOICES, DEFAULT_MAX_NEW_TOKENS, PREFIX, ServerConfig
from mixtral_endpoint.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_environment():
    config = ServerConfig.from_env({})
    assert config == ServerConfig()
    assert (config.dtype, config.max_batch_size, config.max_queue, config.request_timeout_s) == ("auto", 0, 16, 170.0)


def test_values_are_parsed_by_type():
    config = ServerConfig.from_env({"MIXTRAL_MAX_NEW_TOKENS": "64", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "8",
                                    "MIXTRAL_LOG_PROMPTS": "yes", "MIXTRAL_REQUEST_TIMEOUT_S": "2.5",
                                    "MIXTRAL_DTYPE": "bfloat16", "MIXTRAL_MAX_GPU_MEMORY": "70GiB",
                                    "UNRELATED": "ignored"})
    assert config.max_new_tokens == 64 and config.default_max_new_tokens == 8
    assert config.log_prompts is True and config.request_timeout_s == 2.5
    assert config.dtype == "bfloat16" and config.max_gpu_memory == "70GiB"
    assert config.limits.max_new_tokens == 64


@pytest.mark.parametrize(("env", "words"), [
    ({"MIXTRAL_MAX_NEW_TOKENS": "lots"}, "MIXTRAL_MAX_NEW_TOKENS must be a int"),
    ({"MIXTRAL_LOG_PROMPTS": "maybe"}, "MIXTRAL_LOG_PROMPTS must be a bool"),
    ({"MIXTRAL_DTYPE": "int4"}, "MIXTRAL_DTYPE must be one of auto, bfloat16, float16, float32; got 'int4'"),
    ({"MIXTRAL_DEVICE_MAP": "gpu"}, "MIXTRAL_DEVICE_MAP must be one of auto, cpu; got 'gpu'"),
    ({"MIXTRAL_ENGINE": "vLLM"}, "MIXTRAL_ENGINE must be one of auto, transformers, vllm; got 'vLLM'"),
    ({"MIXTRAL_MAX_QUEUE": "0"}, "MIXTRAL_MAX_QUEUE must be >= 1"),
    ({"MIXTRAL_MAX_QUEUE": "4097"}, r"MIXTRAL_MAX_QUEUE \(4097\) is above 4096"),
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "0"}, "MIXTRAL_REQUEST_TIMEOUT_S must be a finite number > 0"),
    ({"MIXTRAL_MAX_PROMPTS": "20"}, "could never be queued"),
    ({"MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "4096"}, "above MIXTRAL_MAX_NEW_TOKENS"),
    ({"MIXTRAL_MAX_NEW_TOKENS": "128", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "129"}, "above MIXTRAL_MAX_NEW_TOKENS"),
    # Non-finite numbers pass a "> 0" check and then break every request (a wait of inf overflows).
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "inf"}, "MIXTRAL_REQUEST_TIMEOUT_S must be a finite number > 0, got inf"),
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "nan"}, "MIXTRAL_REQUEST_TIMEOUT_S must be a finite number > 0, got nan"),
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "-inf"}, "MIXTRAL_REQUEST_TIMEOUT_S must be a finite number > 0"),
    ({"MIXTRAL_STALL_TIMEOUT_S": "-1"}, "MIXTRAL_STALL_TIMEOUT_S must be a finite number >= 0, got -1"),
    ({"MIXTRAL_STALL_TIMEOUT_S": "inf"}, "MIXTRAL_STALL_TIMEOUT_S must be a finite number >= 0, got inf"),
    ({"MIXTRAL_STALL_TIMEOUT_S": "nan"}, "MIXTRAL_STALL_TIMEOUT_S must be a finite number >= 0"),
    ({"MIXTRAL_MAX_TOTAL_TOKENS": "-1"}, "MIXTRAL_MAX_TOTAL_TOKENS must be >= 0"),
    # Limits that contradict each other: every request relying on the default would be a 400.
    ({"MIXTRAL_MAX_TOTAL_TOKENS": "200"}, r"MIXTRAL_MAX_TOTAL_TOKENS \(200\) leaves no room .* \(256\)"),
    ({"MIXTRAL_MAX_TOTAL_TOKENS": "64", "MIXTRAL_MAX_NEW_TOKENS": "64"}, "MIXTRAL_MAX_TOTAL_TOKENS"),
    # vLLM's settings.
    ({"MIXTRAL_GPU_MEMORY_UTILIZATION": "1.5"}, r"MIXTRAL_GPU_MEMORY_UTILIZATION must be in \[0, 1\], got 1.5"),
    ({"MIXTRAL_GPU_MEMORY_UTILIZATION": "nan"}, "MIXTRAL_GPU_MEMORY_UTILIZATION must be in"),
    ({"MIXTRAL_GPU_MEMORY_UTILIZATION": "0.8", "MIXTRAL_MAX_GPU_MEMORY": "70GiB"},
     "set MIXTRAL_GPU_MEMORY_UTILIZATION or MIXTRAL_MAX_GPU_MEMORY, not both"),
    ({"MIXTRAL_MAX_BATCH_SIZE": "256", "MIXTRAL_MAX_NUM_BATCHED_TOKENS": "128"},
     r"MIXTRAL_MAX_NUM_BATCHED_TOKENS \(128\) is below MIXTRAL_MAX_BATCH_SIZE \(256\)"),
    ({"MIXTRAL_KV_CACHE_DTYPE": "int8"}, "MIXTRAL_KV_CACHE_DTYPE must be one of auto, fp8"),
    ({"MIXTRAL_TENSOR_PARALLEL_SIZE": "-2"}, "MIXTRAL_TENSOR_PARALLEL_SIZE must be >= 0"),
    ({"MIXTRAL_ENABLE_PREFIX_CACHING": "sometimes"}, "MIXTRAL_ENABLE_PREFIX_CACHING must be a bool"),
])
def test_bad_values_name_the_variable(env: dict[str, str], words: str):
    with pytest.raises(ConfigError, match=words):
        ServerConfig.from_env(env)


@pytest.mark.parametrize(("env", "limit"), [
    ({}, 200.0),  # the deadline and its grace: by then every row of a step that long has failed anyway
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "60"}, 90.0),
    ({"MIXTRAL_STALL_TIMEOUT_S": "20"}, 20.0),
])
def test_a_step_stalls_after_the_deadline_and_its_grace_unless_set(env: dict[str, str], limit: float):
    assert ServerConfig.from_env(env).stall_limit_s == limit


@pytest.mark.parametrize(("env", "cap", "default"), [
    ({}, 1024, DEFAULT_MAX_NEW_TOKENS),
    ({"MIXTRAL_MAX_NEW_TOKENS": "128"}, 128, 128),  # the cap alone lowers the default, not a start-up error
    ({"MIXTRAL_MAX_NEW_TOKENS": "128", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "64"}, 128, 64),
    ({"MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "7"}, 1024, 7),
])
def test_max_new_tokens_cap_and_default(env: dict[str, str], cap: int, default: int):
    limits = ServerConfig.from_env(env).limits
    assert (limits.max_new_tokens, limits.default_max_new_tokens) == (cap, default)


def test_readme_settings_table_lists_every_setting_with_its_default_and_choices():
    readme = (ROOT / "docs" / "settings.md").read_text()
    section = readme.split("# Settings", 1)[1]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(MIXTRAL_\w+)` \|.*$", section, re.M)}
    fields = {PREFIX + f.name.upper(): f for f in dataclasses.fields(ServerConfig)}
    assert set(rows) == set(fields)
    for name, f in fields.items():
        default_cell = rows[name].split("|")[2]
        if f.default not in ("", 0):  # "" and 0 mean "none" or "derived", described in words
            assert _shown(f.default) in default_cell, (name, default_cell)
        for choice in CHOICES.get(f.name, ()):
            assert f"`{choice}`" in rows[name], (name, choice)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
