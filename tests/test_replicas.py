"""Engine replicas per instance (serving/replicas.py): one gunicorn worker per replica, each on its own GPU group.

The groups, the claim and its failure are unit-tested; then one real azmlinfsrv with WORKER_COUNT=2 over two
simulated GPUs (CUDA_VISIBLE_DEVICES=0,1 on this CPU machine: each worker sees "its" GPU and, finding no CUDA, runs
the tiny model on the CPU) is checked from outside: each worker claims a different group, concurrent requests reach
both replicas, a scrape of /metrics shows both replicas' series summing to what was asked, and when one replica's
engine dies (tests/entry/poisoned_score.py's hook) the other keeps answering while the dead one's worker is replaced
and its replacement claims the freed group."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mixtral_endpoint.engines.engine import Capacity
from mixtral_endpoint.protocol.errors import ConfigError
from mixtral_endpoint.serving import replicas
from mixtral_endpoint.serving.metrics import REFRESH_S
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
CLAIM = re.compile(r"\[(\d+)\] mixtral_endpoint\.score - replica (\d) of 2: GPU\(s\) (\S+)")
BODY = {"input_data": {"input_string": ["The capital of France is"]}, "parameters": {"max_new_tokens": 8}}
# Each replica: 2 rows in its batch, 4 waiting; gunicorn caps each worker at that many connections, and the busier
# worker is the slower to accept (replicas.ReplicaWorker; serving.md).
BATCH, QUEUE = 2, 4


@pytest.mark.parametrize(("gpus", "workers", "tensor_parallel", "size"), [
    (8, 4, 0, 2), (8, 8, 0, 1), (8, 2, 0, 4), (8, 3, 0, 2), (8, 4, 2, 2), (2, 2, 0, 1), (1, 2, 0, 1)])
def test_a_replica_takes_the_largest_power_of_two_that_gives_every_worker_a_group(gpus, workers, tensor_parallel, size):
    assert replicas.group_size(gpus, workers, tensor_parallel) == size


def test_groups_are_consecutive_gpus_and_a_remainder_makes_none():
    assert replicas.gpu_groups(list("01234567"), 2) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert replicas.gpu_groups(["4", "5", "6"], 2) == [("4", "5")]
    assert replicas.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3,"}) == ["2", "3"]
    assert replicas.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_one_worker_claims_nothing_and_more_replicas_than_groups_stop_the_start(tmp_path: Path):
    assert replicas.claim({"CUDA_VISIBLE_DEVICES": "0,1"}, tensor_parallel_size=0, folder=tmp_path) is None
    with pytest.raises(ConfigError, match=r"WORKER_COUNT=4 asks for 4 engine replicas, but 4 GPU\(s\) \(0,1,2,3\) "
                                          r"make 2 group\(s\) of 2 \(MIXTRAL_TENSOR_PARALLEL_SIZE=2\)"):
        replicas.claim({"WORKER_COUNT": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, tensor_parallel_size=2,
                       folder=tmp_path)


def test_each_process_claims_a_free_group_and_a_dead_ones_group_is_free_again(tmp_path: Path):
    """The lock is a process's: three processes over two groups, the third waits for the first to exit."""
    script = ("import sys, time; from pathlib import Path; from mixtral_endpoint.serving import replicas; "
              "r = replicas.claim({'WORKER_COUNT': '2', 'CUDA_VISIBLE_DEVICES': '0,1'}, tensor_parallel_size=0, "
              f"folder=Path({str(tmp_path)!r}), wait_s=float(sys.argv[1])); print(r.index, r.gpus, flush=True); "
              "time.sleep(float(sys.argv[2]))")

    def start(wait_s: float, hold_s: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(wait_s), str(hold_s)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(0, 3)
    first_line = first.stdout.readline()
    second = start(0, 30)
    second_line = second.stdout.readline()
    assert {first_line.strip(), second_line.strip()} == {"0 ('0',)", "1 ('1',)"}
    refused = start(0, 0)  # both groups held, no wait: a start-up error
    assert refused.wait(timeout=60) == 1 and "held by another worker" in refused.communicate()[1]
    third = start(20, 0)  # both groups held: it waits, and takes the first's group once that process is gone
    assert third.communicate(timeout=60)[0].strip() == first_line.strip()
    second.kill()
    second.wait()


class StandInLine:
    """What Metrics reads of a line: its counts, capacity, queue limit and engine."""

    def __init__(self, running: int) -> None:
        self.engine = SimpleNamespace(on_death=[], dead=None)
        self.capacity = Capacity(rows=4)
        self.max_queue = 8
        self.counts = (running, 0, 0)


def ended_rows(count: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(prompt=[1] * 5, submitted_at=0.0, started_at=0.1, first_token_at=0.2, last_token_at=0.5)
            for _ in range(count)]


def test_a_scrape_shows_every_workers_replica_and_azure_gets_only_its_own(tmp_path: Path):
    """Two workers in two processes over one folder: a scrape of either shows both replicas; the dead one's live
    gauges vanish with it and its counts stay; the registry Azure Monitor reads holds only this worker's."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from mixtral_endpoint.serving import azure_monitor
    from mixtral_endpoint.serving.metrics import Metrics

    # The other worker, in a process of its own that has exited by the scrape (light: no test module imported).
    other = f"""
from pathlib import Path
from types import SimpleNamespace
from mixtral_endpoint.engines.engine import Capacity
from mixtral_endpoint.serving.metrics import Metrics
line = SimpleNamespace(engine=SimpleNamespace(on_death=[], dead=None), capacity=Capacity(rows=4), max_queue=8,
                       counts=(3, 0, 0))
rows = [SimpleNamespace(prompt=[1] * 5, submitted_at=0.0, started_at=0.1, first_token_at=0.2, last_token_at=0.5)] * 3
metrics = Metrics(line, model_name="m", max_model_len=64, engine="1", shared=Path({str(tmp_path)!r}))
metrics.exposition()
metrics.record(rows, [4] * 3, ["stop"] * 3, 1.0)
"""
    subprocess.run([sys.executable, "-c", other], cwd=ROOT, check=True, timeout=120)
    mine = Metrics(StandInLine(2), model_name="m", max_model_len=64, engine="0", shared=tmp_path)
    mine.record(ended_rows(2), [4, 4], ["length", "length"], 1.0)
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(mine.exposition().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    assert engines(samples, "vllm:request_success_total") == {"0": 2.0, "1": 3.0}  # the exited worker's counts stay
    assert engines(samples, "vllm:generation_tokens_total") == {"0": 8.0, "1": 12.0}
    assert engines(samples, "vllm:e2e_request_latency_seconds_count") == {"0": 2.0, "1": 3.0}
    assert engines(samples, "vllm:num_requests_running") == {"0": 2.0}  # its live gauges went with it
    assert engines(samples, "mixtral:engine_healthy") == {"0": 1.0}
    reader = InMemoryMetricReader()
    azure_monitor.meter_provider(mine.registry, [reader], instance="host", service="s")
    points = {(m.name, tuple(sorted(p.attributes.items()))): p.value
              for r in reader.get_metrics_data().resource_metrics for sc in r.scope_metrics for m in sc.metrics
              for p in m.data.data_points}
    assert {dict(labels)["engine"] for _, labels in points} == {"0"}
    assert sum(v for (name, _), v in points.items() if name == "vllm:request_success_total") == 2


@pytest.fixture(scope="module")
def two_replicas(azureml_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    hooks = tmp_path_factory.mktemp("replicas")
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": "transformers", "WORKER_COUNT": "2", "CUDA_VISIBLE_DEVICES": "0,1",
           "MIXTRAL_MAX_BATCH_SIZE": str(BATCH), "MIXTRAL_MAX_QUEUE": str(QUEUE), "MIXTRAL_MAX_PROMPTS": "2",
           "GUNICORN_CMD_ARGS": f"--threads {BATCH + QUEUE} --worker-connections {BATCH + QUEUE} "
                                f"--worker-class {replicas.__name__}.ReplicaWorker",
           "POISON_FILE": str(hooks / "poison")}
    with LocalServer(azureml_models, hooks / "azmlinfsrv.log", env,
                     entry_script=ROOT / "tests" / "entry" / "poisoned_score.py") as server:
        deadline = time.monotonic() + 120
        while len(engines(scrape(server.url), "mixtral:engine_healthy")) < 2:  # the second worker still loading
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield server, hooks
    shutil.rmtree(replicas.shared_folder().parent / f"mixtral-endpoint-{server.process.pid}", ignore_errors=True)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """GET /metrics as {sample name: {labels as sorted items: value}}."""
    text = requests.get(url + "/metrics", timeout=30).text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def engines(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> dict[str, float]:
    """{engine label: the sum of its series of `name` with `labels`}."""
    summed: dict[str, float] = {}
    for key, value in samples.get(name, {}).items():
        if labels.items() <= dict(key).items():
            summed[dict(key)["engine"]] = summed.get(dict(key)["engine"], 0.0) + value
    return summed


def claims(log: str) -> list[tuple[int, int, str]]:
    """(worker pid, replica index, its GPUs) of every claim in the log, in order."""
    return [(int(pid), int(index), gpus) for pid, index, gpus in CLAIM.findall(log)]


def score_many(url: str, count: int) -> list[int]:
    statuses: list[int] = []

    def one() -> None:
        try:
            statuses.append(requests.post(url + "/score", json=BODY, timeout=120).status_code)
        except requests.ConnectionError:  # a dying worker's connection
            statuses.append(0)

    callers = [threading.Thread(target=one) for _ in range(count)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    return statuses


def test_each_worker_serves_its_own_group_and_every_scrape_shows_both_replicas(two_replicas):
    server, _ = two_replicas
    claimed = claims(server.log_path.read_text())
    assert sorted((index, gpus) for _, index, gpus in claimed) == [(0, "0"), (1, "1")], claimed
    assert len({pid for pid, _, _ in claimed}) == 2

    before = sum(engines(scrape(server.url), "vllm:request_success_total").values())
    statuses = score_many(server.url, 2 * (BATCH + QUEUE))
    assert statuses.count(200) == len(statuses), statuses
    time.sleep(REFRESH_S + 0.5)  # each worker writes its line's gauges every REFRESH_S (and at its own scrapes)
    for _ in range(6):  # each scrape reaches either worker; every one shows both replicas
        samples = scrape(server.url)
        rows = engines(samples, "vllm:request_success_total")
        assert set(rows) == {"0", "1"} and all(v > 0 for v in rows.values()), rows
        assert sum(rows.values()) - before == len(statuses)
        assert sum(engines(samples, "vllm:e2e_request_latency_seconds_count").values()) - before == len(statuses)
        assert engines(samples, "mixtral:engine_healthy") == {"0": 1.0, "1": 1.0}
        assert engines(samples, "vllm:num_requests_running") == {"0": 0.0, "1": 0.0}
        assert engines(samples, "mixtral:max_num_requests_running") == {"0": BATCH, "1": BATCH}
    print(f"rows per replica: {rows}")


def test_one_replicas_death_leaves_the_other_serving_and_its_replacement_takes_the_freed_group(two_replicas):
    server, hooks = two_replicas
    log_before = server.log_path.read_text()
    counted_before = sum(engines(scrape(server.url), "vllm:request_success_total").values())
    statuses: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            statuses.extend(score_many(server.url, 2))

    asking = threading.Thread(target=keep_asking)
    asking.start()
    time.sleep(1.0)
    (hooks / "poison").touch()  # the next forward pass, in whichever worker, raises for good: that engine dies
    armed_at = time.monotonic()
    deadline = armed_at + 120
    while len(claims(server.log_path.read_text()[len(log_before):])) < 1:
        assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
        time.sleep(0.2)
    replaced_s = time.monotonic() - armed_at
    answered_meanwhile = statuses.count(200)
    stop.set()
    asking.join()

    text = server.log_path.read_text()[len(log_before):]
    died = re.search(r"\[(\d+)\] mixtral_endpoint\.score - the engine died", text)
    assert died and text.count("exited with code 70") == 1, text[-3000:]
    [(new_pid, index, gpus)] = claims(text)
    [(old_pid, old_index, old_gpus)] = [c for c in claims(log_before) if c[0] == int(died.group(1))]
    assert (index, gpus) == (old_index, old_gpus) and new_pid != old_pid
    # The other replica answered while this one was replaced (those it had taken failed: 500s, 503s).
    assert answered_meanwhile >= 4, statuses
    assert set(statuses) <= {200, 500, 503, 0}

    deadline = time.monotonic() + 60
    while True:  # the replacement loads; meanwhile the dead worker's live gauges are gone, its counts stay
        samples = scrape(server.url)
        healthy = engines(samples, "mixtral:engine_healthy")
        assert set(healthy) <= {"0", "1"} and all(v in (0.0, 1.0) for v in healthy.values()), healthy
        if healthy == {"0": 1.0, "1": 1.0}:
            break
        assert time.monotonic() < deadline, healthy
        time.sleep(0.5)
    counted = sum(engines(samples, "vllm:request_success_total").values())
    assert counted - counted_before >= statuses.count(200), (counted, statuses)  # the dead worker's counts stay
    assert score_many(server.url, 4).count(200) == 4
    print(f"replica {index} replaced in {replaced_s:.1f} s; {answered_meanwhile} answers with 200 meanwhile; "
          f"statuses {sorted(set(statuses))}")


def test_the_plan_names_the_worker_class_that_exists():
    from mixtral_endpoint.model.placement import WORKER_CLASS

    assert f"{replicas.__name__}.{replicas.ReplicaWorker.__name__}" == WORKER_CLASS


def test_a_busy_worker_waits_before_it_accepts_and_an_idle_one_does_not(monkeypatch: pytest.MonkeyPatch):
    from gunicorn.workers.gthread import ThreadWorker

    waits: list[float] = []
    monkeypatch.setattr(replicas.time, "sleep", waits.append)
    monkeypatch.setattr(ThreadWorker, "accept", lambda self, listener: None)
    worker = replicas.ReplicaWorker.__new__(replicas.ReplicaWorker)  # gunicorn's set-up is not needed to accept
    worker.nr_conns = 3
    for rows in (0, 2, 4, 100):
        monkeypatch.setattr(replicas, "load", lambda connections, rows=rows: max(rows, connections) / 2)
        replicas.ReplicaWorker.accept(worker, None)
    monkeypatch.setattr(replicas, "load", lambda connections: 0.0)
    worker.nr_conns = 0
    replicas.ReplicaWorker.accept(worker, None)
    assert waits == [0.0075, 0.0075, 0.01, 0.02]  # 5 ms per batch held (3 connections of a batch of 2), 20 ms at most


def test_more_workers_than_groups_stop_the_server_at_start_naming_both(azureml_models: Path, tmp_path: Path):
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": "transformers", "WORKER_COUNT": "3", "CUDA_VISIBLE_DEVICES": "0,1"}
    server = LocalServer(azureml_models, tmp_path / "azmlinfsrv.log", env)
    try:
        assert not server.wait_ready(timeout=120)  # gunicorn halts: a worker's init() failed
    finally:
        server.stop()
    assert "WORKER_COUNT=3 asks for 3 engine replicas, but 2 GPU(s) (0,1) make 2 group(s) of 1" in \
        server.log_path.read_text()
