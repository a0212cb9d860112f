"""model/ is an MLflow pyfunc model: loaded with MLflow's own loader, it answers as /score does."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from mixtral_endpoint.doors.mlflow_model.packager import package_model
from mixtral_endpoint.doors.mlflow_model.pyfunc import find_mlmodel, load_scorer, signature
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import CheckpointError
from mixtral_endpoint.serving.service import Scorer

CONVERSATION = [{"role": "user", "content": "I am going to Paris, what should I see?"}]


@pytest.fixture(scope="module")
def loaded(mlflow_model: Path) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(str(mlflow_model))


def test_model_folder_holds_no_pickle(mlflow_model: Path):
    assert not [p for p in mlflow_model.rglob("*") if p.suffix in (".pkl", ".pickle", ".bin", ".pt")]
    assert "model_code_path" in (mlflow_model / "MLmodel").read_text()


def test_saved_params_schema_is_the_parameter_table(loaded: mlflow.pyfunc.PyFuncModel):
    saved = {p.name: p.default for p in loaded.metadata.get_params_schema().params}
    assert saved == {p.name: p.default for p in signature().params.params}
    assert saved["max_new_tokens"] is None  # the server's default, not one frozen into the model


# (MIXTRAL_MAX_NEW_TOKENS, MIXTRAL_DEFAULT_MAX_NEW_TOKENS) -> (cap, default); None: unset.
NEW_TOKEN_SETTINGS = [
    (("128", "64"), (128, 64)),  # the report: predict without max_new_tokens was refused
    (("12", None), (12, 12)),  # the cap alone lowers the default with it
    ((None, "7"), (1024, 7)),
    ((None, None), (1024, 256)),
]


@pytest.mark.parametrize(("env", "expected"), NEW_TOKEN_SETTINGS)
def test_predict_takes_the_servers_default_and_cap_for_max_new_tokens(
        mlflow_model: Path, monkeypatch: pytest.MonkeyPatch, env: tuple[str | None, str | None],
        expected: tuple[int, int]):
    for name, value in zip(("MIXTRAL_MAX_NEW_TOKENS", "MIXTRAL_DEFAULT_MAX_NEW_TOKENS"), env, strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cap, default = expected
    model = mlflow.pyfunc.load_model(str(mlflow_model))
    ((row,),) = model.predict({"input_string": ["Once upon a time"]}, params={"ignore_eos": True})
    assert row["usage"]["completion_tokens"] == default
    with pytest.raises(MlflowException, match=f"at most {cap}"):
        model.predict({"input_string": ["Once upon a time"]}, params={"max_new_tokens": cap + 1})


def test_predict_matches_the_core_for_a_conversation(loaded: mlflow.pyfunc.PyFuncModel, scorer: Scorer):
    params = {"max_new_tokens": 10, "return_full_text": True}
    (result,) = loaded.predict({"input_string": CONVERSATION}, params=params)
    assert result == score_api.score(scorer, {"input_data": {"input_string": CONVERSATION}, "parameters": params})


def test_predict_scores_a_dataframe_row_by_row(loaded: mlflow.pyfunc.PyFuncModel, scorer: Scorer):
    frame = pd.DataFrame({"input_string": ["Once upon a time", "The capital of France is"]})
    results = loaded.predict(frame, params={"max_new_tokens": 6})
    expected = [score_api.score(scorer, {"input_data": {"input_string": [p]}, "parameters": {"max_new_tokens": 6}})[0]
                for p in frame["input_string"]]
    assert results == expected


def test_predict_on_a_text_requests_input_data_is_the_score_answer(loaded: mlflow.pyfunc.PyFuncModel,
                                                                   scorer: Scorer):
    request = {"input_data": {"input_string": ["Once upon a time", "x"]}, "parameters": {"max_new_tokens": 5}}
    assert loaded.predict(request["input_data"], params=request["parameters"]) == [score_api.score(scorer, request)]


def test_predict_scores_one_conversation_per_dataframe_row(loaded: mlflow.pyfunc.PyFuncModel, scorer: Scorer):
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    frame = pd.DataFrame({"input_string": [CONVERSATION, second]})
    results = loaded.predict(frame, params={"max_new_tokens": 4})
    assert results == [score_api.score(scorer, {"input_data": {"input_string": c}, "parameters": {"max_new_tokens": 4}})
                       for c in (CONVERSATION, second)]


def test_bad_input_is_an_mlflow_error_with_a_400_code(loaded: mlflow.pyfunc.PyFuncModel):
    with pytest.raises(MlflowException) as caught:
        loaded.predict({"input_string": [{"role": "assistant", "content": "x"}]})
    assert caught.value.get_http_status_code() == 400 and "role" in caught.value.message


def test_find_mlmodel_accepts_the_folder_or_one_level_down(azureml_models: Path, tmp_path: Path):
    assert find_mlmodel(azureml_models) == (azureml_models / "model").resolve()
    assert find_mlmodel(azureml_models / "model") == (azureml_models / "model").resolve()
    with pytest.raises(CheckpointError, match="no MLmodel"):
        find_mlmodel(tmp_path)


def test_predict_submits_a_dataframes_rows_together(loaded: mlflow.pyfunc.PyFuncModel,
                                                    caplog: pytest.LogCaptureFixture):
    frame = pd.DataFrame({"input_string": [f"Prompt number {i}" for i in range(8)]})
    with caplog.at_level(logging.INFO, logger="mixtral_endpoint.serving.service"):
        assert len(loaded.predict(frame, params={"max_new_tokens": 8})) == 8
    batches = [int(b) for b in re.findall(r" batch=(\d+)", caplog.text)]
    assert len(batches) == 8 and max(batches) > 1  # one log line per row, generated together


EXIT_SCRIPT = """
import sys, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict({"input_string": ["a", "b"]}, params={"max_new_tokens": 4}))
"""


def test_a_process_that_predicted_exits_with_status_0(mlflow_model: Path):
    """A batch job reports a non-zero exit as a failure: the engine thread is stopped at exit."""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(mlflow_model)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "finish_reason" in done.stdout
def test_stream_is_refused_by_predict(loaded: mlflow.pyfunc.PyFuncModel):
    with pytest.raises(MlflowException) as caught:
        loaded.predict({"input_string": ["hi"]}, params={"stream": True})
    assert caught.value.get_http_status_code() == 400 and "/score endpoint only" in caught.value.message


def test_load_scorer_hands_the_doors_settings_down(azureml_models: Path, monkeypatch: pytest.MonkeyPatch):
    """score.py and batch_score.py build the settings once; loading the model must not read them again."""
    monkeypatch.setenv("MIXTRAL_MAX_NEW_TOKENS", "lots")  # reading the environment would fail on this
    config = ServerConfig(max_new_tokens=9, default_max_new_tokens=3)
    assert load_scorer(azureml_models, config).config == config


def test_a_model_that_cannot_take_settings_is_refused_before_loading(tiny_checkpoint: Path, tmp_path: Path):
    out = package_model(tiny_checkpoint, tmp_path / "old", reference=True)
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    del mlmodel["flavors"]["python_function"]["config"]  # as packaged before the settings were handed down
    (out / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(CheckpointError, match="package it again"):
        load_scorer(out, ServerConfig())


def test_a_model_packaged_by_another_version_is_refused_before_loading(tiny_checkpoint: Path, tmp_path: Path):
    """Its code may import modules that have moved (the layer folders did that), and its signature would refuse
    the parameters added since: package it again, says the error."""
    out = package_model(tiny_checkpoint, tmp_path / "old", reference=True)
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    params = json.loads(mlmodel["signature"]["params"])
    mlmodel["signature"]["params"] = json.dumps([p for p in params if p["name"] != "n"])  # as before `n` came
    (out / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(CheckpointError, match="another version of mixtral-endpoint.*package it again"):
        load_scorer(out, ServerConfig())


def test_predict_takes_n_and_logprobs_from_params(loaded: mlflow.pyfunc.PyFuncModel):
    params = {"max_new_tokens": 3, "n": 2, "logprobs": 1, "do_sample": True, "seed": 4, "ignore_eos": True}
    text, chat = loaded.predict({"input_string": ["Once upon a time"]}, params=params), loaded.predict(
        {"input_string": [{"role": "user", "content": "Hi"}]}, params=params)
    (rows,) = text  # one input row, its two answers
    assert len(rows) == 2 and all(len(r["logprobs"]) == 3 and len(r["logprobs"][0]["top"]) == 1 for r in rows)
    assert len(chat[0]["choices"]) == 2 and chat[0]["usage"]["completion_tokens"] == 6
