"""Azure ML entry script, served by azmlinfsrv: init() loads model/ once, run() is a thin door.

The /score API (parsing, rendering, server-sent events) lives in mixtral_endpoint/doors/score.py, which
the MLflow and batch doors share, and generation in the core (serving/service.py) under every door.
"""

import logging
import os
import threading
from pathlib import Path

import flask
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from mixtral_endpoint.doors.mlflow_model.pyfunc import load_scorer
from mixtral_endpoint.doors.openai import routes as openai_routes
from mixtral_endpoint.doors.openai import tokenization
from mixtral_endpoint.doors.responses import routes as responses_routes
from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import MODEL_NAME, ServerConfig
from mixtral_endpoint.protocol.errors import InvalidRequest, ModelNotReady, ScoringError, as_scoring_error
from mixtral_endpoint.serving import azure_monitor, replicas
from mixtral_endpoint.serving.metrics import Metrics
from mixtral_endpoint.serving.service import Scorer

log = logging.getLogger("mixtral_endpoint.score")
scorer: Scorer | None = None
metrics_export: MeterProvider | None = None  # the MeterProvider sending the metrics to Azure Monitor, when on
replica: replicas.Replica | None = None  # this worker's engine replica with several workers; it holds its group's lock
# The worker's exit status when its engine dies. gunicorn halts the whole server on 3 (WORKER_BOOT_ERROR)
# and 4 (APP_LOAD_ERROR), and answers any other status with a fresh worker, which runs init() again.
ENGINE_DIED = 70  # EX_SOFTWARE


def init() -> None:
    global scorer, metrics_export, replica
    from azureml_inference_server_http.server import routes

    _log_to_stderr(logging.getLogger("mixtral_endpoint"))
    _log_to_app_insights(logging.getLogger("mixtral_endpoint"), routes.main_blueprint)
    # The one place this door reads the environment; the settings are handed down from here.
    config = ServerConfig.from_env(os.environ)
    # With WORKER_COUNT > 1 each worker serves one engine replica on its own GPU group (serving/replicas.py),
    # chosen before anything starts CUDA.
    replica = replicas.claim(os.environ, tensor_parallel_size=config.tensor_parallel_size)
    if replica is not None:
        log.info("replica %d of %d: GPU(s) %s (worker %d)", replica.index, replica.count,
                 ",".join(replica.gpus) or "none, on the CPU", os.getpid())
        if replica.gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(replica.gpus)
    scorer = load_scorer(Path(os.environ.get("AZUREML_MODEL_DIR", "model")), config)
    if replica is not None:
        # GET /metrics reaches any worker: each keeps its replica's values where every worker's scrape reads them.
        scorer.metrics = Metrics(scorer.line, model_name=MODEL_NAME, max_model_len=scorer.max_total_tokens,
                                 engine=str(replica.index), shared=replica.metrics_folder)
        line = scorer.line
        replicas.load = lambda connections: max(sum(line.counts[:2]), connections) / line.capacity.rows
    # azmlinfsrv's health route cannot report a dead engine: end the worker, and gunicorn starts a fresh one.
    scorer.engine.on_death.append(_exit_worker)
    metrics_export = _metrics_to_azure_monitor(routes.main_blueprint, scorer.metrics.registry)
    # The OpenAI / Azure AI Model Inference routes: azmlinfsrv registers its blueprint after init().
    openai_routes.register(routes.main_blueprint, lambda: scorer)
    tokenization.register(routes.main_blueprint, lambda: scorer)
    responses_routes.register(routes.main_blueprint, lambda: scorer)


def _exit_worker(error: BaseException) -> None:
    log.critical("the engine died (%s); this worker exits with status %d so that gunicorn starts a fresh one",
                 error, ENGINE_DIED)
    threading.Timer(1.0, os._exit, args=(ENGINE_DIED,)).start()  # a moment for the in-flight 500s to go out


@rawhttp
def run(request: flask.Request) -> flask.Response:
    try:
        if scorer is None:
            raise ModelNotReady("the model is still loading; try again shortly", retry_after=30)
        if request.method != "POST":
            raise InvalidRequest("POST a JSON request to /score; see sample-request.json")
        request_id = flask.g.get("request_id") or request.headers.get("x-request-id")
        payload = scorer.read_json(request.stream, declared_length=request.content_length)
        result = score_api.score(scorer, payload, request_id=request_id, stream_ok=True)
        if isinstance(result, dict | list):
            return AMLResponse(result, 200, json_str=True)
        # Server-sent events; X-Accel-Buffering asks proxies that honour it not to buffer the stream.
        return flask.Response(result, status=200, mimetype="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except Exception as exc:
        return _error(as_scoring_error(exc, log))


def _log_to_stderr(logger: logging.Logger) -> None:
    # azmlinfsrv configures only its own loggers; the per-request lines need a handler of their own.
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s [%(process)d] %(name)s - %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # something in the stack configures the root logger too


def _log_to_app_insights(logger: logging.Logger, blueprint: object) -> None:
    """With the deployment's app_insights_enabled, azmlinfsrv sends its own loggers to Application Insights
    through an OpenTelemetry handler; ours joins them, so each per-request line arrives with its fields as
    customDimensions (service.py)."""
    handler = getattr(getattr(blueprint, "appinsights_client", None), "azureLogHandler", None)
    if handler is not None and handler not in logger.handlers:
        logger.addHandler(handler)
        log.info("per-request lines go to Application Insights, with their fields as customDimensions")


def _metrics_to_azure_monitor(blueprint: object, registry: CollectorRegistry) -> MeterProvider | None:
    """With the deployment's app_insights_enabled (azmlinfsrv's Application Insights client is on), the metrics
    GET /metrics shows also go to Application Insights every interval, each instance under its own name
    (serving/azure_monitor.py). Off, nothing is started."""
    if not getattr(getattr(blueprint, "appinsights_client", None), "enabled", False):
        return None
    from azureml_inference_server_http.server.config import config as server_config

    key = server_config.app_insights_key.get_secret_value()
    return azure_monitor.start(registry, azure_monitor.connection_string(os.environ, key),
                               instance=azure_monitor.instance_name(os.environ), service=server_config.service_name)


def _error(exc: ScoringError) -> AMLResponse:
    return AMLResponse(exc.body(), exc.status, exc.headers(), json_str=True, run_function_failed=exc.status >= 500)
