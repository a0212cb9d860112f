"""Azure ML batch-endpoint entry script: init() loads model/ once, run(mini_batch) scores JSONL files.

Each file holds one request per line (optionally with an `id`). run() returns one JSON row per
input line, {"file", "line", "id", "response" | "error"}, which `output_action: append_row`
writes to the job's output file; a bad line is an error row and never fails the mini-batch. A failure
that is the server's (the engine died or stalled, any 5xx) raises out of run(), so Azure ML retries the
mini-batch (batch-deployment.yml's retry_settings); the retry finds a fresh engine loaded in its place.
"""

import json
import logging
import os
from pathlib import Path

from mixtral_endpoint.doors.batch import default_workers, read_lines, score_lines
from mixtral_endpoint.doors.mlflow_model.pyfunc import load_scorer
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger("mixtral_endpoint.batch_score")
scorer: Scorer | None = None


def init() -> None:
    global scorer
    # The one place this door reads the environment; the settings are handed down from here.
    config = ServerConfig.from_env(os.environ)
    scorer = load_scorer(Path(os.environ.get("AZUREML_MODEL_DIR", "model")), config)


def run(mini_batch: list[str]) -> list[str]:
    assert scorer is not None, "init() has not run"
    if scorer.engine.dead is not None:
        log.warning("the engine died while scoring an earlier mini-batch; loading a fresh one")
        scorer.close()
        init()
    scored = score_lines(scorer, read_lines(mini_batch), workers=default_workers(scorer))
    rows = [json.dumps(row, ensure_ascii=False) for row in scored]
    log.info("scored %d rows from %d files", len(rows), len(mini_batch))
    return rows
