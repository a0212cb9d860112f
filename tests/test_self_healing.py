"""A replica that heals itself, end to end under a real azmlinfsrv on each engine: with every forward pass
of the model made to raise (by a hook from outside the product, tests/entry/poisoned_score.py) while
requests are in flight, every caller gets an answer, and the server answers sample-request.json with 200
again without anyone restarting it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.localserver import LocalServer

from .conftest import ENGINES, SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
HEALED_WITHIN_S = 180
LONG = {"max_new_tokens": 400, "ignore_eos": True}


def stream_until_done(url: str, answers: dict[str, object], name: str, started: threading.Event) -> None:
    body = {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {**LONG, "stream": True}}
    with requests.post(url + "/score", json=body, stream=True, timeout=60) as response:
        events = []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                started.set()
        answers[name] = (response.status_code, events)


def post(url: str, answers: dict[str, object], name: str) -> None:
    body = {"input_data": {"input_string": ["The capital of France is"]}, "parameters": LONG}
    response = requests.post(url + "/score", json=body, timeout=60)
    answers[name] = (response.status_code, response.json())


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_whose_every_pass_fails_is_replaced_by_a_fresh_worker(azureml_models: Path, tmp_path: Path,
                                                                        engine: str):
    poison = tmp_path / "poison"
    env = {**SERVER_ENV, "MIXTRAL_ENGINE": engine, "MIXTRAL_MAX_NEW_TOKENS": "400", "POISON_FILE": str(poison)}
    log = tmp_path / "azmlinfsrv.log"
    sample = json.loads((ROOT / "sample-request.json").read_text())
    with LocalServer(azureml_models, log, env, threads=8,
                     entry_script=ROOT / "tests" / "entry" / "poisoned_score.py") as server:
        assert requests.post(server.url + "/score", json=sample, timeout=60).status_code == 200
        answers: dict[str, object] = {}
        started = [threading.Event(), threading.Event()]
        callers = [threading.Thread(target=stream_until_done, args=(server.url, answers, f"stream{i}", started[i]))
                   for i in range(2)]
        callers += [threading.Thread(target=post, args=(server.url, answers, f"plain{i}")) for i in range(2)]
        for caller in callers:
            caller.start()
        assert all(event.wait(60) for event in started), "the streams never started"
        time.sleep(0.2)  # the plain requests are generating beside the streams
        poison.touch()
        armed_at = time.monotonic()
        for caller in callers:
            caller.join(timeout=60)
        answered_s = time.monotonic() - armed_at
        assert not poison.exists(), "the hook never armed"

        # Every caller in flight got an answer at once: a 500, or an error event ending its stream.
        assert sorted(answers) == ["plain0", "plain1", "stream0", "stream1"] and answered_s < 30
        for name in ("plain0", "plain1"):
            status, body = answers[name]
            assert status == 500 and body["error"]["code"] == "internal_error", answers[name]
        for name in ("stream0", "stream1"):
            status, events = answers[name]
            assert status == 200 and events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "internal_error", events[-3:]

        # Then the server heals: 503 with Retry-After while the dead worker goes, a wait while a fresh
        # one loads, then 200; never a 500 and never a hang.
        deadline = time.monotonic() + HEALED_WITHIN_S
        seen: list[object] = []
        while True:
            assert time.monotonic() < deadline, f"not healed within {HEALED_WITHIN_S} s: {seen[-5:]}"
            try:
                response = requests.post(server.url + "/score", json=sample, timeout=HEALED_WITHIN_S)
            except requests.ConnectionError as exc:  # the dying worker's connection closed under us
                seen.append(type(exc).__name__)
                time.sleep(0.2)
                continue
            seen.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
            time.sleep(0.2)
        healed_s = time.monotonic() - armed_at
        assert server.process.poll() is None  # gunicorn's master never halted
        text = log.read_text()
        assert "exited with code 70" in text and text.count("Booting worker") == 2
        print(f"{engine}: callers answered in {answered_s:.1f} s, 200 again {healed_s:.1f} s after the fault; "
              f"meanwhile {seen[:-1]}")
