"""Content screening against a local server that speaks Azure AI Content Safety's REST shape (the real
service cannot be reached from here), through the real azure-ai-contentsafety client; and Mistral's
guardrail prompt, token-exact through mistral-common."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import ContentFiltered, ModelNotReady, Overloaded
from mixtral_endpoint.protocol.request import Message
from mixtral_endpoint.serving.safety import GUARDRAIL, STREAM_WINDOW_CHARS, Screen, ScreeningFailed
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer

from .conftest import SERVER_ENV
from .fake_content_safety import FakeContentSafety

USER = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeContentSafety]:
    fake = FakeContentSafety()
    yield fake
    fake.close()


def screened_scorer(scorer: Scorer, fake: FakeContentSafety, **settings: str) -> Scorer:
    """A second core on the session's engine, with screening; it must not close that engine when let go."""
    env = {**SERVER_ENV, "MIXTRAL_MAX_NEW_TOKENS": "200", "CONTENT_SAFETY_ENDPOINT": fake.url,
           "CONTENT_SAFETY_KEY": "test-key", **settings}
    core = Scorer(scorer.engine, scorer.tokenizer, ServerConfig.from_env(env))
    core._close.detach()
    return core


@pytest.fixture
def core(scorer: Scorer, fake: FakeContentSafety) -> Scorer:
    fake.reset()
    return screened_scorer(scorer, fake)


def chat(content: str, **parameters: object) -> dict:
    return {"input_data": {"input_string": [{"role": "user", "content": content}]},
            "parameters": {"max_new_tokens": 8, **parameters}}


def test_a_flagged_prompt_is_a_400_content_filter_naming_the_category(core: Scorer, fake: FakeContentSafety):
    with pytest.raises(ContentFiltered) as caught:
        score_api.score(core, chat("something FLAG-Violence here"))
    assert caught.value.status == 400 and caught.value.code == "content_filter"
    assert "Violence" in caught.value.message and caught.value.param == "input_data.input_string"
    assert fake.calls[0]["key"] == "test-key" and fake.calls[0]["path"].startswith("/contentsafety/text:analyze")
    assert set(fake.calls[0]["categories"]) == {"Hate", "SelfHarm", "Sexual", "Violence"}


def test_a_severity_at_the_threshold_passes_and_every_answer_is_screened(core: Scorer, fake: FakeContentSafety):
    body = score_api.score(core, chat("LOW-Hate is only low", max_new_tokens=4))
    assert body["finish_reason"] == "length"
    assert len(fake.calls) == 2 and fake.calls[1]["text"] == body["output"]  # the prompt, then the answer


def test_long_texts_are_screened_in_chunks_of_1000_characters(core: Scorer, fake: FakeContentSafety):
    with pytest.raises(ContentFiltered):
        score_api.score(core, chat("word " * 300 + " FLAG-Sexual"))  # 1512 characters
    assert sorted(len(c["text"]) for c in fake.calls) == [512, 1000]  # screened at once


def test_a_flagged_answer_is_withheld_with_finish_reason_content_filter(core: Scorer, fake: FakeContentSafety):
    fake.flag_after = 1  # the prompt passes; the answer does not
    body = score_api.score(core, chat("Tell me a story.", return_token_ids=True, logprobs=1))
    assert body["finish_reason"] == "content_filter" and body["output"] == "" and body["token_ids"] == []
    assert body["logprobs"] == []  # their tokens would spell the withheld answer


def test_a_stream_flagged_midway_keeps_only_what_was_screened(core: Scorer, fake: FakeContentSafety):
    fake.flag_after = 2  # the prompt and the first window pass; the second window is flagged
    events = "".join(score_api.score(core, chat("Tell me a story.", max_new_tokens=200, ignore_eos=True,
                                                stream=True), stream_ok=True))
    datas = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
    text = "".join(d.get("delta", "") for d in datas)
    assert datas[-1]["finish_reason"] == "content_filter"
    assert text == fake.calls[1]["text"] and len(text) >= STREAM_WINDOW_CHARS  # one screened window, no more
    assert len(fake.calls) == 3


def admitted_rows(core: Scorer, monkeypatch: pytest.MonkeyPatch) -> list:
    """The rows the core puts in the line, recorded by wrapping its admission from outside."""
    rows: list = []
    submit = core._submit

    def recording(*args: object) -> tuple:
        admitted = submit(*args)
        rows.extend(admitted[0])
        return admitted

    monkeypatch.setattr(core, "_submit", recording)
    return rows


def test_the_prompt_is_screened_while_the_engine_works_on_it(core: Scorer, fake: FakeContentSafety,
                                                              monkeypatch: pytest.MonkeyPatch):
    rows = admitted_rows(core, monkeypatch)
    fake.delay_s = 0.5  # each verdict takes this long
    start = time.monotonic()
    events = list(score_api.score(core, chat("Tell me a story.", max_new_tokens=4, ignore_eos=True, stream=True),
                                  stream_ok=True))
    assert rows[0].first_token_at - start < fake.delay_s  # the engine did not wait for the verdict
    assert fake.calls[0]["text"] == "Tell me a story." and len(events) >= 2


def test_a_flagged_prompts_rows_are_cancelled_and_nothing_of_them_is_answered(core: Scorer, fake: FakeContentSafety,
                                                                               monkeypatch: pytest.MonkeyPatch):
    rows = admitted_rows(core, monkeypatch)
    fake.delay_s = 0.3
    text_request = {"input_data": {"input_string": ["fine", "FLAG-Hate here"]},
                    "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    for body in (chat("FLAG-Hate", max_new_tokens=200, ignore_eos=True, stream=True), text_request):
        rows.clear()
        with pytest.raises(ContentFiltered):
            score_api.score(core, body, stream_ok=True)
        assert rows and all(row.done.wait(5) for row in rows)
        assert {row.finish_reason for row in rows} == {"cancelled"}
        assert all(len(row.tokens) < 200 for row in rows)


def test_a_request_the_line_refuses_screens_nothing_and_a_patient_retry_screens_once(
        core: Scorer, fake: FakeContentSafety, monkeypatch: pytest.MonkeyPatch):
    """Screening follows admission: a 429 sent nothing to Content Safety, and score_patiently (MLflow, batch
    jobs) retrying a full line screens the prompt once, not once per 50 ms retry."""
    take, refusals = core.line.take, [3]

    def full_then_free(rows):
        if refusals[0]:
            refusals[0] -= 1
            raise Overloaded("the server is at capacity", retry_after=2)
        take(rows)

    monkeypatch.setattr(core.line, "take", full_then_free)
    with pytest.raises(Overloaded):
        score_api.score(core, chat("hi"))
    assert fake.calls == []
    body = score_api.score_patiently(core, chat("hi", max_new_tokens=4))
    assert refusals == [0] and [c["text"] for c in fake.calls] == ["hi", body["output"]]


def test_a_screening_backlog_sheds_new_prompts_with_a_429_even_failing_open(fake: FakeContentSafety):
    """A flood would otherwise time every verdict out, and fail-open would serve every prompt unscreened."""
    fake.reset()
    fake.delay_s = 1.0
    screen = Screen(fake.url, threshold=2, fail_open=True, key="k", max_backlog=2)
    try:
        held = [screen.start_prompt("first"), screen.start_prompt("second")]
        with pytest.raises(Overloaded) as refused:
            screen.start_prompt("third")
        assert refused.value.status == 429 and refused.value.retry_after
        assert [v.category() for v in held] == [None, None]
        assert screen.start_prompt("fourth").category() is None  # the backlog drained: taken again
    finally:
        screen.close()


def test_screening_that_fails_closed_is_a_503_and_open_is_served(scorer: Scorer, fake: FakeContentSafety):
    fake.reset()
    fake.fail = True
    with pytest.raises(ModelNotReady) as caught:
        score_api.score(screened_scorer(scorer, fake), chat("hi"))
    assert caught.value.status == 503 and caught.value.retry_after
    opened = screened_scorer(scorer, fake, MIXTRAL_CONTENT_SAFETY_FAIL_OPEN="true")
    assert score_api.score(opened, chat("hi"))["finish_reason"] in ("stop", "length")


def test_a_killed_screening_process_fails_its_calls_and_is_replaced(fake: FakeContentSafety):
    fake.reset()
    screen = Screen(fake.url, threshold=2, fail_open=False, key="k")
    try:
        assert screen.flagged("FLAG-Hate") == "Hate"
        fake.delay_s = 2.0  # the next call is in the child when it dies
        held = ThreadPoolExecutor(1).submit(screen.flagged, "held")
        time.sleep(0.5)
        os.kill(screen._process.pid, signal.SIGKILL)
        with pytest.raises(ScreeningFailed):  # fail closed: the call it held fails, at once
            held.result(timeout=5)
        fake.delay_s = 0.0
        deadline = time.monotonic() + 60
        while screen._process.exitcode is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert screen.flagged("FLAG-Violence") == "Violence" and screen.flagged("fine") is None
    finally:
        screen.close()
    assert screen._process.exitcode == 0


def test_a_hung_screening_process_fails_its_calls_in_time_and_forgets_them(fake: FakeContentSafety):
    fake.reset()
    screen = Screen(fake.url, threshold=2, fail_open=False, key="k", timeout_s=0.25)
    try:
        os.kill(screen._process.pid, signal.SIGSTOP)  # hung, not dead: no answer, no end of the pipe
        start = time.monotonic()
        with pytest.raises(ScreeningFailed):
            screen.flagged("x" * 2500)  # three chunks
        assert time.monotonic() - start < screen.wait_s + 1 and not screen._waiting
        os.kill(screen._process.pid, signal.SIGCONT)
        assert screen.flagged("FLAG-Hate") == "Hate"  # the late answers went nowhere; new calls are answered
    finally:
        os.kill(screen._process.pid, signal.SIGCONT)
        screen.close()


def test_the_environments_proxy_settings_hold_for_the_screening_client(fake: FakeContentSafety,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """The client reads them once, at start: through the proxy the environment names, and past it for a host
    in no_proxy (lower case: it wins over upper)."""
    fake.reset()
    for endpoint, env in (("http://content-safety.invalid", {"http_proxy": fake.url}),  # only the proxy answers
                          (fake.url, {"http_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1"})):
        with monkeypatch.context() as patched:
            for name, value in env.items():
                patched.setenv(name, value)
            screen = Screen(endpoint, threshold=2, fail_open=False, key="k")
        try:
            assert screen.flagged("FLAG-Hate") == "Hate"
        finally:
            screen.close()
    assert fake.calls[0]["path"].startswith("http://content-safety.invalid/contentsafety/text:analyze")


def test_safe_prompt_puts_mistrals_guardrail_first_token_exact(scorer: Scorer, tokenizer):
    asked = score_api.score(scorer, chat("Tell me a story.", safe_prompt=True, return_token_ids=True))
    assert asked["prompt_token_ids"] == tokenizer.encode_chat(
        [Message("system", GUARDRAIL), Message("user", "Tell me a story.")])
    with_system = {"input_data": {"input_string": [{"role": "system", "content": "Be brief."}, *USER]},
                   "parameters": {"max_new_tokens": 2, "safe_prompt": True, "return_token_ids": True}}
    assert score_api.score(scorer, with_system)["prompt_token_ids"] == tokenizer.encode_chat(
        [Message("system", GUARDRAIL + "\n\nBe brief."), Message("user", "Tell me a story.")])
    plain = score_api.score(scorer, chat("Tell me a story.", return_token_ids=True))
    assert plain["prompt_token_ids"] == tokenizer.encode_chat([Message("user", "Tell me a story.")])


def test_the_servers_safe_prompt_default_and_a_request_that_declines_it(scorer: Scorer, tokenizer):
    core = Scorer(scorer.engine, scorer.tokenizer, ServerConfig.from_env({**SERVER_ENV, "MIXTRAL_SAFE_PROMPT": "1"}))
    core._close.detach()
    guarded = score_api.score(core, chat("Hi", return_token_ids=True))["prompt_token_ids"]
    assert guarded == tokenizer.encode_chat([Message("system", GUARDRAIL), Message("user", "Hi")])
    declined = score_api.score(core, chat("Hi", return_token_ids=True, safe_prompt=False))["prompt_token_ids"]
    assert declined == tokenizer.encode_chat([Message("user", "Hi")])


def test_a_live_server_with_the_catalogs_variables_screens_every_door(azureml_models: Path, tmp_path: Path,
                                                                      fake: FakeContentSafety):
    fake.reset()
    env = {**SERVER_ENV, "CONTENT_SAFETY_ENDPOINT": fake.url, "CONTENT_SAFETY_KEY": "k",
           "CONTENT_SAFETY_THRESHOLD": "2"}
    with LocalServer(azureml_models, tmp_path / "server.log", env, threads=4) as server:
        flagged = [{"role": "user", "content": "FLAG-SelfHarm"}]
        score = requests.post(server.url + "/score", json={"input_data": {"input_string": flagged}}, timeout=60)
        assert score.status_code == 400 and score.json()["error"]["code"] == "content_filter", score.text
        openai = requests.post(server.url + "/v1/chat/completions", json={"messages": flagged, "max_tokens": 4},
                               timeout=60)
        assert openai.status_code == 400 and openai.json()["error"]["code"] == "content_filter", openai.text
        assert "SelfHarm" in openai.json()["error"]["message"]
        fine = requests.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4},
                             timeout=60)
        assert fine.status_code == 200 and len(fake.calls) == 4  # two prompts refused, one prompt and its answer
