"""Faults: a broken model fails init fast and the server never answers; a failure inside generation
fails that request only."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import flask
import pytest
import torch

from mixtral_endpoint.doors.mlflow_model.packager import package_model
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.errors import InternalError
from mixtral_endpoint.serving.service import Scorer
from tests.localserver import LocalServer

from .conftest import SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent


def truncate_shard(path: Path) -> None:
    shard = path / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def not_mixtral(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def no_tokenizer(path: Path) -> None:
    (path / "tokenizer.model").unlink()


@pytest.mark.parametrize(("damage", "named"), [(truncate_shard, "model-00001-of-00003.safetensors is truncated"),
                                               (not_mixtral, "config.json"), (no_tokenizer, "tokenizer.model")])
def test_init_fails_fast_naming_the_file_and_the_server_never_answers(tiny_checkpoint: Path, tmp_path: Path,
                                                                      damage: Callable[[Path], None], named: str):
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    model_dir = package_model(checkpoint, tmp_path / "model", reference=True)
    damage(checkpoint)  # after packaging: the model points at a checkpoint that broke since
    server = LocalServer(model_dir, tmp_path / "log.txt", SERVER_ENV)
    try:
        assert server.wait_ready(timeout=90) is False  # the worker exits; nothing serves garbage
        assert named in (tmp_path / "log.txt").read_text()
    finally:
        server.stop()


def load_score_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("score_entry", ROOT / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_request_before_the_model_is_loaded_gets_503():
    score = load_score_py()
    with flask.Flask(__name__).test_request_context("/score", method="POST", json={"input_data": {}}):
        response = score.run(flask.request)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "model_not_ready" and int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize("neighbour_first", [True, False], ids=["neighbour generating", "arriving together"])
def test_a_failure_in_generation_is_a_500_for_that_request_only(scorer: Scorer, neighbour_first: bool):
    model = scorer.engine.stepper.model
    forward = model.forward
    marker = scorer.tokenizer.encode_text("trigger a fault")[1:]

    def faulty(*args: object, input_ids: torch.Tensor, **kwargs: object) -> object:
        if input_ids.shape[1] > 1 and any(row[-len(marker):] == marker for row in input_ids.tolist()):
            raise RuntimeError("a fault in this pass only")
        return forward(*args, input_ids=input_ids, **kwargs)

    long_request = {"input_data": {"input_string": ["Once upon a time"]},
                    "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
    expected = score_api.score(scorer, long_request)
    answers: list[object] = []
    model.forward = faulty
    try:
        neighbour = threading.Thread(target=lambda: answers.append(score_api.score(scorer, long_request)))
        neighbour.start()
        deadline = time.monotonic() + 30
        while neighbour_first and scorer.engine.row_counts[0] == 0:
            assert time.monotonic() < deadline, "the neighbour never started generating"
            time.sleep(0.001)
        with pytest.raises(InternalError) as caught:
            score_api.score(scorer, {"input_data": {"input_string": ["trigger a fault"]}})
        neighbour.join(timeout=120)
    finally:
        model.forward = forward
    assert caught.value.status == 500 and "CUDA" not in caught.value.message
    assert answers == [expected]  # the request generating alongside was not disturbed
    assert score_api.score(scorer, {"input_data": {"input_string": ["trigger a fault"]},
                                    "parameters": {"max_new_tokens": 3}})


def test_a_failed_decode_step_fails_every_request_in_its_batch_and_the_next_ones_are_served(scorer: Scorer):
    """Rows share one KV cache, so a decode step that fails leaves it in an unknown state: every row of
    that batch gets a 500 (as the README says), and the engine goes on with the next requests."""
    model = scorer.engine.stepper.model
    forward = model.forward
    steps = {"decode": 0}

    def faulty(*args: object, input_ids: torch.Tensor, **kwargs: object) -> object:
        if input_ids.shape[1] == 1:  # a decode step, not a prefill
            steps["decode"] += 1
            if steps["decode"] == 5:
                raise RuntimeError("a fault in this pass only")
        return forward(*args, input_ids=input_ids, **kwargs)

    request = {"input_data": {"input_string": ["Once upon a time", "The capital of France is"]},
               "parameters": {"max_new_tokens": 40, "ignore_eos": True}}
    model.forward = faulty
    try:
        with pytest.raises(InternalError) as caught:
            score_api.score(scorer, request)
    finally:
        model.forward = forward
    assert caught.value.status == 500 and "CUDA" not in caught.value.message
    assert scorer.engine.row_counts == (0, 0)  # both rows left the engine
    answer = score_api.score(scorer, request)
    assert [row["usage"]["completion_tokens"] for row in answer] == [40, 40]
