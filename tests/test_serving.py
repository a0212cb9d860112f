"""Serving one model copy to many callers, through a real azmlinfsrv on each engine: batching,
backpressure, deadlines and streaming."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from tests.localserver import LocalServer

from .conftest import ENGINES, SERVER_ENV

CHAT = [{"role": "user", "content": "What is so great about the Eiffel Tower?"}]


def chat(**parameters: object) -> dict:
    return {"input_data": {"input_string": CHAT}, "parameters": parameters}


def text(prompt: str, **parameters: object) -> dict:
    return {"input_data": {"input_string": [prompt]}, "parameters": parameters}


def post(url: str, payload: dict, **kwargs: object) -> requests.Response:
    return requests.post(url + "/score", json=payload, timeout=120, **kwargs)


def events(response: requests.Response) -> list[object]:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module", params=ENGINES)
def tight_server(azureml_models: Path, tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A server with room for 2 rows generating and 2 waiting, a 0.3 s deadline, and 16 threads."""
    log = tmp_path_factory.mktemp("tight") / "azmlinfsrv.log"
    env = {**SERVER_ENV, "MIXTRAL_MAX_BATCH_SIZE": "2", "MIXTRAL_MAX_QUEUE": "2", "MIXTRAL_MAX_PROMPTS": "2",
           "MIXTRAL_REQUEST_TIMEOUT_S": "0.3", "MIXTRAL_MAX_NEW_TOKENS": "400", "MIXTRAL_ENGINE": request.param}
    with LocalServer(azureml_models, log, env, threads=16) as server:
        yield server.url, server.process.pid


REQUESTS = [
    chat(max_new_tokens=24),
    chat(do_sample=True, temperature=0.8, top_p=0.9, seed=1, max_new_tokens=20),
    chat(do_sample=True, temperature=1.3, top_k=40, seed=2, max_new_tokens=16),
    text("Once upon a time", max_new_tokens=30, repetition_penalty=1.3),
    text("The capital of France is", max_new_tokens=12, return_token_ids=True),
    text("x", max_new_tokens=40, do_sample=True, seed=7),
]


def test_concurrent_requests_are_batched_and_keep_their_own_settings(any_server: tuple[str, Path]):
    server, server_log = any_server
    alone = [post(server, payload).json() for payload in REQUESTS]
    with ThreadPoolExecutor(len(REQUESTS) * 2) as pool:
        crowd = list(pool.map(lambda p: post(server, p, headers={"x-request-id": "crowd"}).json(),
                              REQUESTS * 2))
    assert crowd == alone * 2
    batches = [int(m) for m in re.findall(r"request=crowd .* batch=(\d+)", server_log.read_text())]
    assert len(batches) == len(crowd) and max(batches) > 1


def test_stop_string_in_one_request_leaves_the_others_alone(any_server: tuple[str, Path]):
    server, _ = any_server
    free = post(server, text("Once upon a time", max_new_tokens=24)).json()[0]["0"]
    stop = free.split()[1]
    payloads = [text("Once upon a time", max_new_tokens=24, stop=stop), *REQUESTS[:3]]
    with ThreadPoolExecutor(4) as pool:
        first, *others = pool.map(lambda p: post(server, p).json(), payloads)
    assert first[0]["0"] == free[: free.find(stop)] and first[0]["finish_reason"] == "stop"
    assert others == [post(server, p).json() for p in REQUESTS[:3]]


def test_bad_requests_among_good_ones_do_not_disturb_them(any_server: tuple[str, Path]):
    server, _ = any_server
    garbage = [{"input_data": {"input_string": [{"role": "assistant", "content": "x"}]}}, {"nope": 1},
               text("hi", temperature=-1), text("hi", max_new_tokens=10_000)]
    payloads = [REQUESTS[0], *garbage, REQUESTS[1]]
    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(lambda p: post(server, p), payloads))
    assert [r.status_code for r in responses] == [200, 400, 400, 400, 400, 200]
    assert responses[0].json() == post(server, REQUESTS[0]).json()


def test_stream_sends_chunks_then_finish_reason_and_usage(any_server: tuple[str, Path]):
    server, _ = any_server
    whole = post(server, chat(max_new_tokens=24, return_token_ids=True)).json()
    streamed = events(post(server, chat(max_new_tokens=24, return_token_ids=True, stream=True), stream=True))
    *deltas, end = streamed
    assert len(deltas) > 1
    assert "".join(d["delta"] for d in deltas) == whole["output"]
    assert end == {"finish_reason": whole["finish_reason"], "usage": whole["usage"],
                   "prompt_token_ids": whole["prompt_token_ids"], "token_ids": whole["token_ids"]}


def test_stream_never_sends_the_stop_string(any_server: tuple[str, Path]):
    server, _ = any_server
    free = post(server, text("Once upon a time", max_new_tokens=24)).json()[0]["0"]
    stop = free.split()[2]
    *deltas, end = events(post(server, text("Once upon a time", max_new_tokens=24, stop=stop, stream=True)))
    assert "".join(d["delta"] for d in deltas) == free[: free.find(stop)]
    assert end["finish_reason"] == "stop"


def test_stream_takes_one_prompt(any_server: tuple[str, Path]):
    server, _ = any_server
    response = post(server, {"input_data": {"input_string": ["a", "b"]}, "parameters": {"stream": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "parameters.stream"


def test_a_caller_that_disconnects_mid_stream_stops_its_generation(any_server: tuple[str, Path]):
    server, server_log = any_server
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps(text("Once upon a time", max_new_tokens=64, ignore_eos=True, stream=True)).encode()
    # Gone as soon as the request is sent: waiting to read the status line first let the tiny model finish all
    # 64 tokens (0.2 s on vLLM) while this process was off the CPU, so nothing was left to cancel.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-request-id: gone\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    cancelled = re.compile(r"request=gone engine=\S+ cancelled: .* after (\d+) tokens")
    while not (stopped := cancelled.findall(server_log.read_text())):
        assert time.monotonic() < deadline, "the abandoned generation was never cancelled"
        time.sleep(0.1)
    assert int(stopped[-1]) < 64  # it stopped early, not at max_new_tokens
    assert post(server, REQUESTS[0]).json() == post(server, REQUESTS[0]).json()


def test_deadline_returns_what_was_generated_with_time_limit(tight_server: tuple[str, int]):
    url, _ = tight_server
    # 400 tokens take seconds on any CPU; the deadline is 0.3 s.
    response = post(url, text("Once upon a time", max_new_tokens=400, ignore_eos=True))
    assert response.status_code == 200
    row = response.json()[0]
    assert row["finish_reason"] == "time_limit"
    assert 0 < row["usage"]["completion_tokens"] < 400


def test_past_the_queue_callers_get_429_with_retry_after(tight_server: tuple[str, int]):
    url, _ = tight_server
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post(url, text("Once upon a time", max_new_tokens=64)), range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 2
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "overloaded"


def test_a_flood_of_100_callers_gets_only_200_or_429_and_the_server_recovers(tight_server: tuple[str, int]):
    url, pid = tight_server
    worker = psutil.Process(pid).children()[0]
    post(url, text("warm up", max_new_tokens=4))
    before = worker.memory_info().rss
    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(lambda i: post(url, text(f"caller {i}", max_new_tokens=8)).status_code, range(100)))
    assert set(statuses) <= {200, 429}, statuses
    after_flood = post(url, text("after", max_new_tokens=4))
    assert after_flood.status_code == 200
    assert worker.memory_info().rss - before < 64 * 1024**2
