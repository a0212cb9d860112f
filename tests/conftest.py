"""Shared fixtures: one tiny checkpoint, one MLflow model, and one scorer and one live azmlinfsrv per engine
and test session (vLLM's engine takes 10 to 35 s to start here); and the tiers every test is marked with
(docs/testing.md): `pure` needs no model, `model` runs the tiny model in this process, `e2e` goes through a
door's real runtime (azmlinfsrv, mlflow, Spark, the batch entry and command); `vllm` marks every test that
runs vLLM, `transformers` every other test that runs a model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from mixtral_endpoint.doors.mlflow_model.packager import package_model
from mixtral_endpoint.engines.transformers.stepper import Stepper
from mixtral_endpoint.model.checkpoint import Checkpoint, inspect_checkpoint
from mixtral_endpoint.model.tiny import build_tiny
from mixtral_endpoint.model.tokenizer import PromptTokenizer
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer

# Small limits so the tests can reach every one of them cheaply.
SERVER_ENV = {
    "MIXTRAL_MAX_NEW_TOKENS": "64",
    "MIXTRAL_DEFAULT_MAX_NEW_TOKENS": "16",
    "MIXTRAL_MAX_TOTAL_TOKENS": "512",
    "MIXTRAL_MAX_PROMPTS": "4",
    "MIXTRAL_MAX_BODY_BYTES": "65536",
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("checkpoint") / "tiny-mixtral")


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint: Path) -> PromptTokenizer:
    return PromptTokenizer(tiny_checkpoint / "tokenizer.model")


ENGINES = ["transformers", "vllm"]


@pytest.fixture(scope="session")
def scorer(tiny_checkpoint: Path) -> Iterator[Scorer]:
    """The core on our own engine (the CPU default)."""
    scorer = Scorer.load(tiny_checkpoint, ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_ENGINE": "transformers"}))
    yield scorer
    scorer.close()


@pytest.fixture(scope="session")
def vllm_scorer(tiny_checkpoint: Path) -> Iterator[Scorer]:
    """The core on vLLM's CPU build."""
    scorer = Scorer.load(tiny_checkpoint, ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_ENGINE": "vllm"}))
    yield scorer
    scorer.close()


@pytest.fixture(scope="session", params=ENGINES)
def any_scorer(request: pytest.FixtureRequest) -> Scorer:
    """The core on each engine in turn."""
    return request.getfixturevalue("scorer" if request.param == "transformers" else "vllm_scorer")


@pytest.fixture(scope="session")
def stepper(scorer: Scorer) -> Stepper:
    return scorer.engine.stepper


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint: Path) -> MixtralForCausalLM:
    """transformers' own MixtralForCausalLM in fp32, with none of our engine's prepacked modules: what
    `generate` comparisons are made against."""
    return MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint: Path) -> Checkpoint:
    return inspect_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def azureml_models(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """AZUREML_MODEL_DIR as Azure mounts it: azureml-models/<name>/<version>/<model folder>."""
    version_dir = tmp_path_factory.mktemp("azureml-models") / "mixtral-8x7b" / "1"
    package_model(tiny_checkpoint, version_dir / "model")
    return version_dir


@pytest.fixture(scope="session")
def mlflow_model(azureml_models: Path) -> Path:
    return azureml_models / "model"


def live_server(azureml_models: Path, log: Path, engine: str) -> Iterator[str]:
    """A real azmlinfsrv process serving score.py over the tiny model on a free loopback port."""
    with LocalServer(azureml_models, log, {**SERVER_ENV, "MIXTRAL_ENGINE": engine}, threads=4) as server:
        yield server.url


@pytest.fixture(scope="session")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "azmlinfsrv.log"


@pytest.fixture(scope="session")
def server(azureml_models: Path, server_log: Path) -> Iterator[str]:
    """The live server on our engine."""
    yield from live_server(azureml_models, server_log, "transformers")


@pytest.fixture(scope="session")
def vllm_server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-server") / "azmlinfsrv.log"


@pytest.fixture(scope="session")
def vllm_server(azureml_models: Path, vllm_server_log: Path) -> Iterator[str]:
    """The live server on vLLM."""
    yield from live_server(azureml_models, vllm_server_log, "vllm")


@pytest.fixture(scope="session", params=ENGINES)
def any_server(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(url, log) of the live server on each engine in turn."""
    if request.param == "transformers":
        return request.getfixturevalue("server"), request.getfixturevalue("server_log")
    return request.getfixturevalue("vllm_server"), request.getfixturevalue("vllm_server_log")


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral-8x7B's real config and safetensors headers, without the data (test_sizing.py)."""
    from .test_sizing import MIXTRAL_8X7B_CONFIG, write_header_only_checkpoint

    return write_header_only_checkpoint(tmp_path_factory.mktemp("mixtral") / "Mixtral-8x7B", MIXTRAL_8X7B_CONFIG)


@pytest.fixture(scope="session")
def mixtral_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Its FP8 copy, laid out as neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8 is."""
    from .test_sizing import MIXTRAL_FP8_CONFIG, fp8_tensors, write_header_only_checkpoint

    return write_header_only_checkpoint(tmp_path_factory.mktemp("mixtral-fp8") / "Mixtral-8x7B-FP8",
                                        MIXTRAL_FP8_CONFIG, shards=10, tensors=fp8_tensors(MIXTRAL_FP8_CONFIG))


# Fixtures that bring up a door's real runtime, or the model packaged for one; and those that run a model
# (any_scorer asks for its engine's scorer only when run, so it is named here itself).
_E2E_FIXTURES = {"server", "vllm_server", "any_server", "azureml_models"}
_MODEL_FIXTURES = {"tiny_checkpoint", "any_scorer"}
_VLLM_FIXTURES = {"vllm_scorer", "vllm_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with its tier, read off the fixtures it needs (closure included) and its parameters."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in ("pure", "model", "e2e")):
            continue  # marked by hand: it runs a model or a process no fixture names
        needs = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if needs & _E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        elif needs & _MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        else:
            item.add_marker(pytest.mark.pure)
            continue
        runs_vllm = needs & _VLLM_FIXTURES or "vllm" in params.values()
        item.add_marker(pytest.mark.vllm if runs_vllm else pytest.mark.transformers)
        if needs & _VLLM_FIXTURES or "vllm" in (params.get("any_scorer"), params.get("any_server")):
            # `make test` runs two pytest-xdist workers: every test of the session's vLLM engine and vLLM server
            # on one of them, so neither is started twice (vLLM holds one engine per process).
            item.add_marker(pytest.mark.xdist_group("vllm-session"))
