"""Pushing a one-shot run's metrics to a Prometheus Pushgateway (the CronJob mode)."""

from __future__ import annotations

import socket
import urllib.error

import anyio
from prometheus_client import CollectorRegistry, push_to_gateway

from senderd.errors import PushError


async def push_metrics(
    registry: CollectorRegistry,
    gateway: str,
    *,
    job: str = "senderd",
    instance: str | None = None,
    timeout: float = 10.0,
) -> str:
    """Replace this job/instance group on the gateway with `registry`'s metrics; returns the instance."""
    instance = instance or socket.gethostname()

    def push() -> None:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key={"instance": instance}, timeout=timeout)

    try:
        await anyio.to_thread.run_sync(push)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PushError(f"push to gateway {gateway} failed ({reason}): check push.gateway / --push-gateway") from None
    return instance
