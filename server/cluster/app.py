"""The Ray Serve application: an ingress in front of N replicas.

`build(settings)` for `python -m server.cluster`; `app_builder(args)` for `serve run` and KubeRay's
serveConfigV2 (`import_path: server.cluster.app:app_builder`, `args`: ClusterSettings fields).
"""
from __future__ import annotations

from ray import serve
from ray.serve import Application

from server.cluster.config import ClusterSettings
from server.cluster.ingress import Ingress
from server.cluster.replica import replica_class


def build(settings: ClusterSettings) -> Application:
    replica = serve.deployment(
        replica_class(settings.max_resident_adapters),
        name="Replica",
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        max_ongoing_requests=settings.max_waiting + settings.max_batch_size,
        health_check_period_s=2,
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
    ).bind(settings.replica_settings(), settings.metrics_port)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(replica)


def app_builder(args: dict) -> Application:
    return build(ClusterSettings(**args))
