"""The OpenAI API as evaluation and benchmark tools speak it, on each engine: log-probabilities (of new tokens
and, with echo, of the prompt) equal to a direct float32 transformers forward, token-id prompts, n answers,
OpenAI's penalties, logit bias, min-p, min_tokens and stop token ids; and the real SDK and LangChain."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from langchain_openai import ChatOpenAI
from openai import BadRequestError, OpenAI
from transformers import MixtralForCausalLM

from mixtral_endpoint.doors.openai import protocol as openai
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import MODEL_NAME
from mixtral_endpoint.protocol.errors import InvalidRequest
from mixtral_endpoint.serving.service import Scorer

CHAT = [{"role": "user", "content": "What is so great about Paris?"}]


def ask(scorer: Scorer, body: dict[str, Any], route: openai.Route = "completions") -> dict[str, Any]:
    parsed = openai.parse({"model": MODEL_NAME, **body}, route, scorer.config.limits, extra_parameters=None)
    return openai.render(parsed, scorer.complete(parsed.request, "test"), "test")


def direct_logprobs(model: MixtralForCausalLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: each position's next-token log-probabilities, float32, transformers' own model."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def test_echo_scores_a_token_id_prompt_as_the_model_does(any_scorer: Scorer, reference_model: MixtralForCausalLM):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, one new token."""
    ids = any_scorer.tokenizer.encode_text("The capital of France is Paris")
    body = {"prompt": [ids, ids[:4]], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    answer = ask(any_scorer, body)
    direct = direct_logprobs(reference_model, ids)
    (first, second) = answer["choices"]
    logprobs = first["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    for j in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][j] - direct[j - 1, ids[j]].item()) < 1e-3, j
    # The new token: greedy, so the most likely, and its log-probability the distribution's top.
    assert abs(logprobs["token_logprobs"][-1] - direct[-1].max().item()) < 1e-3
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    assert first["text"].startswith("The capital of France is Paris") and logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and len(logprobs["tokens"]) == len(ids) + 1
    assert second["logprobs"]["token_logprobs"][1:4] == logprobs["token_logprobs"][1:4]
    assert answer["usage"]["prompt_tokens"] == len(ids) + 4 and answer["usage"]["completion_tokens"] == 2


def test_echo_with_max_tokens_0_scores_the_prompt_alone(any_scorer: Scorer):
    ids = any_scorer.tokenizer.encode_text("Once upon a time")
    answer = ask(any_scorer, {"prompt": ids, "max_tokens": 0, "logprobs": 0, "echo": True})
    (choice,) = answer["choices"]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and choice["text"] == "Once upon a time"
    assert answer["usage"]["completion_tokens"] == 0


def test_chat_logprobs_have_openais_shape_and_greedy_answers_do_not_change(any_scorer: Scorer):
    plain = ask(any_scorer, {"messages": CHAT, "max_tokens": 8, "temperature": 0}, "chat")
    answer = ask(any_scorer, {"messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True,
                              "top_logprobs": 3}, "chat")
    (choice,) = answer["choices"]
    assert choice["message"] == plain["choices"][0]["message"]
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 8
    for entry in content:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and entry["logprob"] == top[0]  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
    # The tokens' bytes are the answer (a conversation's answer is decoded without its first token's leading space).
    assert bytes(b for entry in content for b in entry["bytes"]).decode().lstrip() == choice["message"]["content"]


def test_n_answers_each_prompt_and_a_seed_makes_them_reproducible(any_scorer: Scorer):
    body = {"prompt": ["Once upon a time", "In 1969, the first"], "max_tokens": 6, "n": 3, "temperature": 1.0,
            "seed": 11}
    answer = ask(any_scorer, body)
    texts = [c["text"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == list(range(6)) and len(set(texts[:3])) > 1
    assert texts == [c["text"] for c in ask(any_scorer, body)["choices"]]
    alone = ask(any_scorer, {**body, "prompt": "Once upon a time", "n": 1})  # answer 0 is the seeded request's
    assert alone["choices"][0]["text"] == texts[0]
    prompt = len(any_scorer.tokenizer.encode_text("Once upon a time"))
    assert answer["usage"]["prompt_tokens"] == prompt + len(any_scorer.tokenizer.encode_text("In 1969, the first"))


def test_logit_bias_min_tokens_and_stop_token_ids_steer_the_answer(any_scorer: Scorer):
    base = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    greedy = ask(any_scorer, base)["choices"][0]
    (row,) = score_api.score(any_scorer, {"input_data": {"input_string": [base["prompt"]]}, "parameters": {
        "max_new_tokens": 6, "ignore_eos": True, "return_token_ids": True}})
    banned = ask(any_scorer, {**base, "logit_bias": {str(row["token_ids"][0]): -100}})["choices"][0]["text"]
    forced = ask(any_scorer, {**base, "logit_bias": {"415": 100}})["choices"][0]["text"]  # 415: "▁The"
    assert row["0"] == greedy["text"] and banned != greedy["text"] and forced == " The" * 6
    stopped = ask(any_scorer, {**base, "logit_bias": {"415": 100}, "stop_token_ids": [415]})["choices"][0]
    assert stopped["text"] == " The" and stopped["finish_reason"] == "stop"
    # min_tokens bars end-of-sequence (pushed to the top here by its bias) until that many tokens are out.
    eos = {**base, "ignore_eos": False, "logit_bias": {"2": 100}}
    assert ask(any_scorer, eos)["usage"]["completion_tokens"] == 1
    assert ask(any_scorer, {**eos, "min_tokens": 4})["usage"]["completion_tokens"] == 5


def test_penalties_and_min_p_change_what_is_sampled(any_scorer: Scorer):
    base = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    greedy = ask(any_scorer, base)["choices"][0]["text"]
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert ask(any_scorer, {**base, **extra})["choices"][0]["text"] != greedy, extra
    sampled = {**base, "temperature": 1.0, "seed": 3}
    assert ask(any_scorer, {**sampled, "min_p": 1.0})["choices"][0]["text"] == greedy  # only the top token is left


def test_score_takes_the_same_parameters_and_shapes_n_and_logprobs(any_scorer: Scorer):
    chat = {"input_data": {"input_string": CHAT}, "parameters": {"max_new_tokens": 4, "n": 2, "logprobs": 2,
                                                                 "do_sample": True, "seed": 5, "ignore_eos": True}}
    body = score_api.score(any_scorer, chat)
    assert [c["output"] for c in body["choices"]][0] == body["output"] and len(body["choices"]) == 2
    assert len(body["logprobs"]) == 4 and len(body["logprobs"][0]["top"]) == 2
    assert body["usage"]["completion_tokens"] == 8
    rows = score_api.score(any_scorer, {"input_data": {"input_string": ["a", "b"]},
                                        "parameters": {"max_new_tokens": 2, "n": 2, "prompt_logprobs": 0}})
    assert len(rows) == 4 and rows[0]["prompt_logprobs"][0]["logprob"] is None


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": CHAT, "top_logprobs": 2}, "logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": "yes"}, "logprobs"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "logprobs": 1, "echo": "yes"}, "echo"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[1, 2], [1, -3]]}, "prompt[1][1]"),
    ({"prompt": [[1, 2], []]}, "prompt[1]"),
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "a", "stop_token_ids": [1, -1]}, "stop_token_ids[1]"),
    ({"prompt": "a", "best_of": 2}, "best_of"),
])
def test_bad_logprobs_and_sampling_fields_are_a_400_naming_them(scorer: Scorer, body: dict, param: str):
    with pytest.raises(InvalidRequest) as caught:
        ask(scorer, body, "chat" if "messages" in body else "completions")
    assert caught.value.param == param, caught.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [[1, 32000]]}, "prompt[0][1]"),
    ({"prompt": "a", "logit_bias": {"32000": 1}}, "logit_bias"),
    ({"prompt": "a", "stop_token_ids": [32000]}, "stop_token_ids"),
])
def test_token_ids_past_the_vocabulary_are_a_400_naming_them(any_scorer: Scorer, body: dict, param: str):
    with pytest.raises(InvalidRequest) as caught:
        ask(any_scorer, body)
    assert caught.value.param == param and "32000" in caught.value.message


def test_the_openai_sdk_and_langchain_read_logprobs_n_and_echo(any_server):
    url, _ = any_server
    client = OpenAI(base_url=url + "/v1", api_key="unused-locally", max_retries=0)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0.7, seed=1,
                                          n=2, logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 2 and all(len(c.logprobs.content) == 5 for c in chat.choices)
    assert all(math.isfinite(t.logprob) and len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    echoed = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=2, temperature=0,
                                       logprobs=1, echo=True)
    (echo,) = echoed.choices
    assert echo.text.startswith("Once upon a time") and echo.logprobs.token_logprobs[0] is None
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, top_logprobs=2)
    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL_NAME, max_tokens=4, temperature=0,
                     logprobs=True)
    message = llm.invoke("Hi")
    assert len(message.response_metadata["logprobs"]["content"]) == 4
