"""Batch scoring: the Azure batch entry script and the resumable local command, on real JSONL files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixtral_endpoint.doors.batch import read_lines, score_lines
from mixtral_endpoint.doors.score import serving as score_api

from .conftest import ENGINES, SERVER_ENV

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def request(i: int, **parameters: object) -> dict:
    return {"id": f"req-{i}", "input_data": {"input_string": [f"Prompt number {i}"]},
            "parameters": {"max_new_tokens": 6, **parameters}}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    good = write_jsonl(tmp_path / "good.jsonl", [request(i) for i in range(5)])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        request(10), "{not json", "", {"input_data": {"input_string": [{"role": "assistant", "content": "x"}]}},
        request(11, max_new_tokens=10_000),
        {"id": 7, "input_data": {"input_string": [{"role": "user", "content": "Hi"}]}},
    ])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return [good, mixed, empty, tmp_path / "missing.jsonl"]


def test_every_line_gets_one_row_and_bad_lines_are_error_rows(any_scorer, inputs: list[Path]):
    scorer = any_scorer
    rows = list(score_lines(scorer, read_lines(map(str, inputs)), workers=4))
    by_key = {(Path(r["file"]).name, r["line"]): r for r in rows}
    assert len(by_key) == len(rows) == 5 + 5 + 1 + 1
    for i in range(5):
        row = by_key[("good.jsonl", i + 1)]
        assert row["id"] == f"req-{i}"
        payload = request(i)
        del payload["id"]
        assert row["response"] == score_api.score(scorer, payload)
    assert by_key[("mixed.jsonl", 2)]["error"]["message"].startswith("the request body is not valid JSON")
    assert by_key[("mixed.jsonl", 4)]["error"]["param"] == "input_data.input_string[0].role"
    assert by_key[("mixed.jsonl", 5)]["error"]["param"] == "parameters.max_new_tokens"
    assert by_key[("mixed.jsonl", 6)]["id"] == 7 and "output" in by_key[("mixed.jsonl", 6)]["response"]
    assert "empty" in by_key[("empty.jsonl", 0)]["error"]["message"]
    assert "cannot read" in by_key[("missing.jsonl", 0)]["error"]["message"]
    assert ("mixed.jsonl", 3) not in by_key  # blank lines are not requests


ENTRY = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("batch_score", sys.argv[1])
entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entry)
entry.init()
first = entry.scorer
rows = entry.run(sys.argv[3:])
# Then a test hook from outside the product: while `poisoned`, every forward pass raises, as a GPU after an
# "illegal memory access" does until its process ends.
from transformers.models.mixtral import modeling_mixtral
classes = [modeling_mixtral.MixtralForCausalLM]
if entry.scorer.engine.name == "vllm":
    from vllm.model_executor.models import mixtral
    classes.append(mixtral.MixtralForCausalLM)
poisoned = [True]
def poisonable(forward):
    def maybe_poisoned(*args, **kwargs):
        if poisoned[0]:
            raise RuntimeError("the device is poisoned (a test hook)")
        return forward(*args, **kwargs)
    return maybe_poisoned
for cls in classes:
    cls.forward = poisonable(cls.forward)
try:
    entry.run([sys.argv[2]])
    raised = None
except Exception as exc:
    raised = type(exc).__name__
poisoned[0] = False  # the retry runs where the device is healthy again
retried = entry.run([sys.argv[2]])
print(json.dumps({"engine": first.engine.name, "rows": rows, "raised": raised, "dead": first.engine.dead is not None,
                  "fresh": entry.scorer is not first, "retried": retried}))
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_azure_batch_entry_script_returns_one_row_per_line_and_raises_on_a_dead_engine(
        azureml_models: Path, inputs: list[Path], engine: str):
    """In its own process, as Azure runs it (and as vLLM needs: one engine per process). A bad line is an error
    row; a dead engine makes run() raise, since Azure ML retries a mini-batch only then (its 503s used to become
    error rows, and run() returned normally), and the retry scores every line on a fresh engine."""
    defaults = write_jsonl(inputs[0].parent / "defaults.jsonl", [
        {"input_data": {"input_string": ["Once upon a time"]}, "parameters": {"ignore_eos": True}},
        {"input_data": {"input_string": ["hi"]}, "parameters": {"max_new_tokens": 65}},
        {"input_data": {"input_string": ["hi"]}, "parameters": {"stream": True}},
    ])
    retried = write_jsonl(inputs[0].parent / "retried.jsonl", [request(i) for i in range(12)])
    env = {**os.environ, **SERVER_ENV, "AZUREML_MODEL_DIR": str(azureml_models), "MIXTRAL_ENGINE": engine}
    done = subprocess.run([sys.executable, "-c", ENTRY, str(ROOT / "batch_score.py"), str(retried),
                           *map(str, [*inputs, defaults])], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(r) for r in answer["rows"]]
    assert answer["engine"] == engine and len(rows) == 15
    assert sum("error" in r for r in rows) == 7 and sum("response" in r for r in rows) == 8
    by_line = {r["line"]: r for r in rows if r["file"] == str(defaults)}
    # The server's default and cap for max_new_tokens (SERVER_ENV: 16 and 64), as on /score and MLflow.
    assert by_line[1]["response"][0]["usage"]["completion_tokens"] == int(SERVER_ENV["MIXTRAL_DEFAULT_MAX_NEW_TOKENS"])
    assert "at most 64" in by_line[2]["error"]["message"]
    assert by_line[3]["error"]["param"] == "parameters.stream" and by_line[3]["error"]["status"] == 400
    assert answer["raised"] is not None and answer["dead"] and answer["fresh"]
    rows = [json.loads(r) for r in answer["retried"]]
    assert sorted(r["line"] for r in rows) == list(range(1, 13)) and all("response" in r for r in rows)


def run_batch(args: list[str], engine: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mixtral-endpoint"), "batch", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MIXTRAL_ENGINE": engine})


def test_killed_and_restarted_the_output_has_every_line_exactly_once(mlflow_model: Path, tmp_path: Path):
    engine = "transformers"  # resuming is the command's own logic; vLLM runs the command below
    source = write_jsonl(tmp_path / "in.jsonl", [request(i, max_new_tokens=24) for i in range(60)])
    output = tmp_path / "out.jsonl"
    args = [str(source), "--output", str(output), "--model", str(mlflow_model), "--workers", "4"]
    first = run_batch(args, engine)
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 8) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = output.read_text().count("\n")
    assert 8 <= done_before < 60
    with output.open("a") as f:
        f.write('{"file": "half a row cut by the ki')  # a kill in the middle of a write
    second = run_batch(args, engine)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["skipped"] == done_before and summary["rows"] == 60 - done_before
    assert summary["rows_per_s"] > 0 and summary["tokens_per_s"] > 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == list(range(1, 61))
    assert all(r["response"][0]["usage"]["completion_tokens"] == 24 for r in rows)
    again = run_batch(args, engine)
    out, _ = again.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["rows"] == 0


def test_the_batch_command_on_vllm_gives_our_engines_greedy_answers(mlflow_model: Path, tmp_path: Path, scorer):
    source = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in range(6)])
    output = tmp_path / "out.jsonl"
    done = run_batch([str(source), "--output", str(output), "--model", str(mlflow_model)], "vllm")
    out, err = done.communicate(timeout=240)
    assert done.returncode == 0, err[-3000:]
    assert "engine: vllm" in err
    rows = sorted((json.loads(line) for line in output.read_text().splitlines()), key=lambda r: r["line"])
    assert [r["response"] for r in rows] == [score_api.score(scorer, {k: v for k, v in request(i).items() if k != "id"})
                                             for i in range(6)]
