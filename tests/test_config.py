"""The typed config object: built from MIXTRAL_* variables, defaults otherwise, bad values refused."""

from __future__ import annotations

import pytest

from mixtral_endpoint.config import ServerConfig


def test_defaults_without_environment():
    config = ServerConfig.from_env({})
    assert config == ServerConfig()
    assert (config.dtype, config.max_batch_size, config.max_queue, config.request_timeout_s) == ("auto", 8, 16, 170.0)


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
    ({"MIXTRAL_DTYPE": "int4"}, "MIXTRAL_DTYPE must be"),
    ({"MIXTRAL_MAX_QUEUE": "0"}, "MIXTRAL_MAX_QUEUE must be >= 1"),
    ({"MIXTRAL_REQUEST_TIMEOUT_S": "0"}, "MIXTRAL_REQUEST_TIMEOUT_S must be > 0"),
    ({"MIXTRAL_MAX_PROMPTS": "20"}, "could never be queued"),
    ({"MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "4096"}, "above MIXTRAL_MAX_NEW_TOKENS"),
])
def test_bad_values_name_the_variable(env: dict[str, str], words: str):
    with pytest.raises(ValueError, match=words):
        ServerConfig.from_env(env)
