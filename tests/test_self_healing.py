"""A replica that heals itself, end to end under a real azmlinfsrv on each engine, with hooks from outside the
product (tests/entry/poisoned_score.py): every forward pass of the model made to raise, or one made to block
for good, while requests are in flight. Every caller gets an answer at once (a stall: once a step has run
past MIXTRAL_STALL_TIMEOUT_S), `/health` says 503, and the server answers sample-request.json with 200 again
without anyone restarting it. One server per engine serves both tests: each breaks its worker and leaves it
healed. With vLLM's engine core in a process of its own (as with GPUs), that process is killed from outside, and
so is the worker above it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.localserver import LocalServer

from .conftest import ENGINES, SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
HEALED_WITHIN_S = 180
STALL_LIMIT_S = 5.0  # well past a step of the tiny model, even on a busy machine
LONG = {"max_new_tokens": 400, "ignore_eos": True}
LONGER = {"max_new_tokens": 4000, "ignore_eos": True}  # vLLM's engine core is killed from outside: no hook waits
SAMPLE = json.loads((ROOT / "sample-request.json").read_text())


@pytest.fixture(scope="module", params=ENGINES)
def healing_server(request: pytest.FixtureRequest, azureml_models: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    """(server, folder of the hooks' files and the log) on the engine named by the parameter."""
    hooks = tmp_path_factory.mktemp(f"healing-{request.param}")
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": request.param, "MIXTRAL_MAX_NEW_TOKENS": "400",
           "MIXTRAL_STALL_TIMEOUT_S": str(STALL_LIMIT_S),
           "POISON_FILE": str(hooks / "poison"), "STALL_FILE": str(hooks / "stall")}
    with LocalServer(azureml_models, hooks / "azmlinfsrv.log", env, threads=8,
                     entry_script=ROOT / "tests" / "entry" / "poisoned_score.py") as server:
        yield server, hooks


def stream_until_done(url: str, answers: dict[str, object], name: str, started: threading.Event,
                      parameters: dict[str, object]) -> None:
    body = {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {**parameters, "stream": True}}
    with requests.post(url + "/score", json=body, stream=True, timeout=60) as response:
        events = []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                started.set()
        answers[name] = (response.status_code, events)


def post(url: str, answers: dict[str, object], name: str, parameters: dict[str, object] = LONG) -> None:
    body = {"input_data": {"input_string": ["The capital of France is"]}, "parameters": parameters}
    response = requests.post(url + "/score", json=body, timeout=60)
    answers[name] = (response.status_code, response.json())


def break_under_load(url: str, arm: Callable[[], None], *, late: bool = False,
                     parameters: dict[str, object] = LONG) -> tuple[dict[str, object], float]:
    """Two streams and two plain requests generating, then `arm()`; with `late`, one more request half a second
    after. Returns each caller's answer, once all were answered, and when it armed (time.monotonic())."""
    answers: dict[str, object] = {}
    started = [threading.Event(), threading.Event()]
    callers = [threading.Thread(target=stream_until_done, args=(url, answers, f"stream{i}", started[i], parameters))
               for i in range(2)]
    callers += [threading.Thread(target=post, args=(url, answers, f"plain{i}", parameters)) for i in range(2)]
    for caller in callers:
        caller.start()
    assert all(event.wait(60) for event in started), "the streams never started"
    deadline = time.monotonic() + 30
    while rows_in_the_engine(url) < len(callers):  # the plain requests too (one arriving after the fault gets a 503)
        assert time.monotonic() < deadline, "the plain requests never reached the engine"
        time.sleep(0.01)
    arm()
    armed_at = time.monotonic()
    if late:
        time.sleep(0.5)  # the engine's thread is blocked by now: this row waits in its inbox
        callers.append(threading.Thread(target=post, args=(url, answers, "late")))
        callers[-1].start()
    for caller in callers:
        caller.join(timeout=60)
    return answers, armed_at


def rows_in_the_engine(url: str) -> float:
    """What the server's /metrics says it is generating (vllm:num_requests_running, read when scraped)."""
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


def assert_every_caller_got_a_500(answers: dict[str, object], names: list[str]) -> None:
    """A 500, or an error event ending a stream."""
    assert sorted(answers) == sorted(names), answers.keys()
    for name in names:
        status, body = answers[name]
        if name.startswith("stream"):
            assert status == 200 and body[-1] == "[DONE]"
            assert json.loads(body[-2])["error"]["code"] == "internal_error", body[-3:]
        else:
            assert status == 500 and body["error"]["code"] == "internal_error", answers[name]


def wait_until_healed(url: str) -> list[object]:
    """503 with Retry-After while the dead worker goes, a wait while a fresh one loads, then 200; never a 500
    and never a hang. Returns what was seen before the 200."""
    deadline = time.monotonic() + HEALED_WITHIN_S
    seen: list[object] = []
    while True:
        assert time.monotonic() < deadline, f"not healed within {HEALED_WITHIN_S} s: {seen[-5:]}"
        try:
            response = requests.post(url + "/score", json=SAMPLE, timeout=HEALED_WITHIN_S)
        except requests.ConnectionError as exc:  # the dying worker's connection closed under us
            seen.append(type(exc).__name__)
            time.sleep(0.2)
            continue
        if response.status_code == 200:
            return seen
        seen.append(response.status_code)
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
        time.sleep(0.2)


def assert_one_worker_replaced(server: LocalServer, log_before: str) -> str:
    assert server.process.poll() is None  # gunicorn's master never halted
    text = server.log_path.read_text()[len(log_before):]
    assert text.count("exited with code 70") == 1 and text.count("Booting worker") == 1, text[-3000:]
    return text


def test_an_engine_whose_every_pass_fails_is_replaced_by_a_fresh_worker(healing_server: tuple[LocalServer, Path]):
    server, hooks = healing_server
    wait_until_healed(server.url)  # a test before this one may have left a worker loading
    log_before = server.log_path.read_text()

    answers, armed_at = break_under_load(server.url, (hooks / "poison").touch)
    answered_s = time.monotonic() - armed_at
    assert not (hooks / "poison").exists(), "the hook never armed"
    assert_every_caller_got_a_500(answers, ["plain0", "plain1", "stream0", "stream1"])
    assert answered_s < 30

    seen = wait_until_healed(server.url)
    healed_s = time.monotonic() - armed_at
    assert_one_worker_replaced(server, log_before)
    print(f"poison: callers answered in {answered_s:.1f} s, 200 again {healed_s:.1f} s after the fault; "
          f"meanwhile {seen}")


def test_a_step_that_stalls_past_the_limit_ends_the_worker_and_a_fresh_one_serves(
        healing_server: tuple[LocalServer, Path]):
    """Before, every request answered 500 "generation stalled" only after its deadline + 30 s, for ever, while
    the worker stayed up."""
    server, hooks = healing_server
    wait_until_healed(server.url)
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    log_before = server.log_path.read_text()

    answers, armed_at = break_under_load(server.url, (hooks / "stall").touch, late=True)
    answered_s = time.monotonic() - armed_at
    assert not (hooks / "stall").exists(), "the hook never armed"
    # At the stall limit, not at the requests' deadline (170 s): the rows in the engine and the one in its inbox.
    assert_every_caller_got_a_500(answers, ["late", "plain0", "plain1", "stream0", "stream1"])
    assert STALL_LIMIT_S - 0.5 < answered_s < STALL_LIMIT_S + 10, answered_s
    health = requests.get(server.url + "/health", timeout=30)  # the worker exits a second after its engine died
    assert health.status_code == 503 and int(health.headers["Retry-After"]) > 0, health.text
    assert health.json()["error"]["code"] == "model_not_ready"

    seen = wait_until_healed(server.url)
    healed_s = time.monotonic() - armed_at
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    text = assert_one_worker_replaced(server, log_before)
    assert "past its stall limit" in text and "maybe_broken" in text  # the log shows where the thread blocked
    print(f"stall: callers answered in {answered_s:.1f} s (limit {STALL_LIMIT_S:g} s), 200 again {healed_s:.1f} s "
          f"after the stall; meanwhile {seen}")


def engine_processes(server: LocalServer) -> tuple[psutil.Process, list[psutil.Process]]:
    """The server's worker, and vLLM's processes under it (its engine core, and the executor's worker that vLLM's
    CPU build adds)."""
    worker, = psutil.Process(server.process.pid).children()
    return worker, [p for p in worker.children(recursive=True) if p.name().startswith("VLLM::")]


@pytest.mark.e2e
@pytest.mark.vllm
def test_vllms_engine_core_process_killed_or_its_worker_killed_the_server_heals(azureml_models: Path,
                                                                                tmp_path: Path):
    """vLLM's engine core in a process of its own, as it runs with GPUs, on one server:

    - the core killed (the OOM killer, a crash) under load: every caller answered at once and the worker replaced.
      Before, a step already waiting for its tokens waited until the stall limit (200 s): vLLM's sync client puts
      no error in their queue;
    - then the worker killed outright (gunicorn's timeout and the OOM killer send SIGKILL, which runs none of its
      clean-up): its vLLM processes go with it, rather than live on holding the GPUs the fresh worker claims."""
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": "vllm", "MIXTRAL_ENGINE_PROCESS": "true",
           "MIXTRAL_MAX_NEW_TOKENS": str(LONGER["max_new_tokens"]), "MIXTRAL_MAX_TOTAL_TOKENS": "4096"}
    with LocalServer(azureml_models, tmp_path / "azmlinfsrv.log", env, threads=8) as server:
        log_before = server.log_path.read_text()
        _, vllm = engine_processes(server)
        core, = (p for p in vllm if p.name() == "VLLM::EngineCore")
        answers, armed_at = break_under_load(server.url, core.kill, parameters=LONGER)
        answered_s = time.monotonic() - armed_at
        assert_every_caller_got_a_500(answers, ["plain0", "plain1", "stream0", "stream1"])
        assert answered_s < 10, answered_s
        seen = wait_until_healed(server.url)
        healed_s = time.monotonic() - armed_at
        assert_one_worker_replaced(server, log_before)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in vllm), "vLLM's processes lingered"

        worker, vllm = engine_processes(server)
        assert vllm and core.pid not in {p.pid for p in vllm}
        worker.kill()
        _, alive = psutil.wait_procs(vllm, timeout=15)
        assert not alive, f"vLLM's processes outlived their worker: {alive}"
        wait_until_healed(server.url)
    print(f"engine core killed: callers answered in {answered_s:.1f} s, 200 again {healed_s:.1f} s after; "
          f"meanwhile {seen}")
