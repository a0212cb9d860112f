"""vLLM's tokenizer routes on a live azmlinfsrv, on each engine: token-exact with what generation takes
(lm-evaluation-harness and `vllm bench serve` count and decode with them), errors naming the field."""

from __future__ import annotations

import requests

from mixtral_endpoint.doors.openai.protocol import MODEL_NAME

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is so great about Paris?"}]


def post(url: str, path: str, body: object) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60)


def test_tokenize_counts_what_generation_takes_and_detokenize_gives_the_text_back(any_server):
    url, _ = any_server
    chat = post(url, "/tokenize", {"model": MODEL_NAME, "messages": CHAT}).json()
    answer = post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == len(chat["tokens"]) == answer["usage"]["prompt_tokens"] and chat["max_model_len"] == 512
    text = post(url, "/tokenize", {"prompt": "Once upon a time", "return_token_strs": True}).json()
    row = post(url, "/score", {"input_data": {"input_string": ["Once upon a time"]},
                               "parameters": {"max_new_tokens": 1, "return_token_ids": True}}).json()[0]
    assert text["tokens"] == row["prompt_token_ids"] and text["token_strs"][0] == "<s>"
    bare = post(url, "/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False}).json()
    assert bare["tokens"] == text["tokens"][1:]
    assert post(url, "/detokenize", {"tokens": bare["tokens"]}).json() == {"prompt": "Once upon a time"}
    info = requests.get(url + "/tokenizer_info", timeout=30).json()
    assert (info["eos_token"], info["bos_token"], info["eos_token_id"]) == ("</s>", "<s>", 2)
    assert requests.get(url + "/version", timeout=30).json()["version"]


def test_bad_tokenizer_bodies_are_a_400_naming_the_field(server: str):
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
                              ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
                              ("/tokenize", {"prompt": "a", "mystery": 1}, "mystery"),
                              ("/detokenize", {"tokens": [1, 32000]}, "tokens[1]"),
                              ("/detokenize", {"tokens": "12"}, "tokens"),
                              ("/detokenize", [1, 2], None)):
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, body)
