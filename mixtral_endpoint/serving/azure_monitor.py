"""The core's metrics (metrics.py), also sent to Azure Monitor through OpenTelemetry, where nobody can scrape
one instance of a managed online endpoint.

Each series `GET /metrics` shows goes out under the same name every export interval (OpenTelemetry's
OTEL_METRIC_EXPORT_INTERVAL, 60 s by default), read from the Prometheus registry when the reader collects:
nothing is added to a request's path. Counters go out as counters (Azure Monitor takes each interval's
increase), gauges as gauges, and a histogram as its `_sum` and `_count` counters: Application Insights keeps
a metric's sum and count, never its buckets (percentiles come from the per-request lines' fields). Every point
carries its Prometheus labels, and the resource names the instance (`service.instance.id`, which Application
Insights shows as cloud_RoleInstance), so one instance or the sum of all can be charted. With several engine
replicas per instance (serving/replicas.py) each worker sends its own registry: its replica's series under its
`engine` label, never the summed view its GET /metrics shows, so Azure sums the replicas without counting any twice.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

SCOPE = "mixtral_endpoint"
DEFAULT_EXPORT_INTERVAL_MS = 60_000.0
# OpenTelemetry's instrument names allow no ':'; vLLM's all have one. An instrument is named with '.' in its
# place, and a view gives its stream (what the exporter sends) the Prometheus name back.
_OTEL_SAFE = str.maketrans(":", ".")


def instance_name(environ: Mapping[str, str]) -> str:
    """The instance's name: its host name, which differs per instance of a deployment (azmlinfsrv's
    `Container Id` in Application Insights is the same HOSTNAME)."""
    return environ.get("HOSTNAME") or socket.gethostname()


def connection_string(environ: Mapping[str, str], instrumentation_key: str) -> str:
    """Application Insights' connection string if the deployment sets one (it names the region's ingestion
    endpoint), else the instrumentation key azmlinfsrv was given, as azmlinfsrv itself sends with."""
    return environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING") or f"InstrumentationKey={instrumentation_key}"


def meter_provider(registry: CollectorRegistry, readers: Sequence[MetricReader], *, instance: str,
                   service: str) -> MeterProvider:
    """A MeterProvider (not the global one) whose instruments read `registry` whenever a reader collects."""
    names = list(_exported(registry))
    provider = MeterProvider(
        metric_readers=list(readers),
        resource=Resource.create({"service.name": service, "service.instance.id": instance, "host.name": instance}),
        views=[View(instrument_name=name.translate(_OTEL_SAFE), name=name) for name, _, _ in names],
    )
    meter = provider.get_meter(SCOPE)
    for name, kind, documentation in names:
        create = meter.create_observable_gauge if kind == "gauge" else meter.create_observable_counter
        create(name.translate(_OTEL_SAFE), callbacks=[_reader(registry, name)], description=documentation)
    return provider


def start(registry: CollectorRegistry, connection: str, *, instance: str, service: str) -> MeterProvider | None:
    """Sends `registry` to Application Insights every interval until the process exits (a last export then).
    A failed export is the exporter's to log and retry (its own files, under the temp folder): it never
    reaches a request. Nor does a failure to set the export up: it is logged, and the server serves without."""
    from azure.monitor.opentelemetry.exporter import AzureMonitorMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    interval_ms = export_interval_ms(os.environ)
    reader = None
    try:
        reader = PeriodicExportingMetricReader(AzureMonitorMetricExporter(connection_string=connection),
                                               export_interval_millis=interval_ms)
        provider = meter_provider(registry, [reader], instance=instance, service=service)
    except Exception:
        log.exception("the metrics cannot be sent to Azure Monitor; GET /metrics still serves them")
        if reader is not None:
            reader.shutdown()  # its thread started with it
        return None
    log.info("metrics go to Azure Monitor every %g s as instance %s", interval_ms / 1000, instance)
    return provider


def export_interval_ms(environ: Mapping[str, str]) -> float:
    """OpenTelemetry's own setting, OTEL_METRIC_EXPORT_INTERVAL (milliseconds); 60 s, Azure Monitor's grain,
    when unset or not a positive number."""
    value = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "")
    try:
        interval = float(value)
    except ValueError:
        interval = 0.0
    if not interval > 0:
        if value:
            log.warning("OTEL_METRIC_EXPORT_INTERVAL=%r is not a positive number of milliseconds; 60000 it is", value)
        interval = DEFAULT_EXPORT_INTERVAL_MS
    return interval


def _exported(registry: CollectorRegistry) -> Iterable[tuple[str, str, str]]:
    """(series name as Prometheus shows it, "gauge" or "counter", documentation) for each series sent."""
    for family in registry.collect():
        if family.type == "gauge":
            yield family.name, "gauge", family.documentation
        elif family.type == "counter":
            yield f"{family.name}_total", "counter", family.documentation
        elif family.type == "histogram":
            yield f"{family.name}_sum", "counter", family.documentation
            yield f"{family.name}_count", "counter", family.documentation
        else:
            log.warning("metric %s (%s) is not sent to Azure Monitor", family.name, family.type)


def _reader(registry: CollectorRegistry, name: str):
    """The callback that observes every labelled series of `name`, as the registry holds it now."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sample.value, dict(sample.labels))
                for family in registry.collect() for sample in family.samples if sample.name == name]

    return observe
