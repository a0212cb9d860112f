"""model/ scores Spark DataFrames through mlflow.pyfunc.spark_udf, row by row as /score answers, on each engine
(greedy: both give our engine's tokens)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import pytest
from pyspark.sql import SparkSession
from pyspark.sql.types import ArrayType, LongType, StringType, StructField, StructType

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.serving.service import Scorer

from .conftest import ENGINES

pytestmark = [
    pytest.mark.skipif(shutil.which("java") is None and "JAVA_HOME" not in os.environ,
                       reason="Spark needs a Java 17+ runtime"),
    # PySpark 4.x warns about pandas 3 on import; these tests are the proof that the path we use works.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]

PARAMS = {"max_new_tokens": 6}
PROMPTS = ["Once upon a time", "The capital of France is", "Hi"]  # 3 rows over 2 partitions
CONVERSATIONS = [
    [{"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a story."}],
]

USAGE = StructType([StructField(name, LongType()) for name in ("prompt_tokens", "completion_tokens", "total_tokens")])
TEXT_RESULT = StructType([StructField("0", StringType()), StructField("finish_reason", StringType()),
                          StructField("usage", USAGE)])
CHAT_RESULT = StructType([StructField("output", StringType()), StructField("finish_reason", StringType()),
                          StructField("usage", USAGE)])
# One conversation per row: an array of {role, content} structs reaches predict as a numpy array of dicts.
MESSAGES = ArrayType(StructType([StructField("role", StringType()), StructField("content", StringType())]))


@pytest.fixture(scope="module", params=ENGINES)
def spark(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[SparkSession]:
    """A small local Spark whose Python workers run this interpreter, so they see the venv's packages, and
    load the model on the engine under test."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYSPARK_PYTHON", sys.executable)  # else workers run the first `python3` on PATH
        session = (
            SparkSession.builder.master("local[2]")
            .appName("mixtral-endpoint-tests")
            .config("spark.driver.memory", "1g")
            .config("spark.ui.enabled", "false")
            .config("spark.log.level", "ERROR")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.local.dir", str(tmp_path_factory.mktemp("spark")))
            .config("spark.executorEnv.MIXTRAL_ENGINE", request.param)
            .getOrCreate()
        )
        try:
            yield session
        finally:
            session.stop()


def score_column(spark: SparkSession, mlflow_model: Path, rows: list, column_type: object,
                 result_type: StructType) -> list[dict]:
    frame = spark.createDataFrame([(row,) for row in rows], StructType([StructField("input_string", column_type)]))
    udf = mlflow.pyfunc.spark_udf(spark, str(mlflow_model), result_type=result_type, env_manager="local",
                                  params=PARAMS)
    return [row.result.asDict(recursive=True) for row in frame.select(udf("input_string").alias("result")).collect()]


def test_spark_udf_scores_text_prompts_as_score_does_in_row_order(spark: SparkSession, mlflow_model: Path,
                                                                  scorer: Scorer):
    results = score_column(spark, mlflow_model, PROMPTS, StringType(), TEXT_RESULT)
    assert results == [score_api.score(scorer, {"input_data": {"input_string": [p]}, "parameters": PARAMS})[0]
                       for p in PROMPTS]


def test_spark_udf_scores_one_conversation_per_row_from_an_array_of_structs(spark: SparkSession,
                                                                            mlflow_model: Path, scorer: Scorer):
    results = score_column(spark, mlflow_model, CONVERSATIONS, MESSAGES, CHAT_RESULT)
    assert results == [score_api.score(scorer, {"input_data": {"input_string": c}, "parameters": PARAMS})
                       for c in CONVERSATIONS]
