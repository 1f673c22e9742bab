"""Pushing a one-shot run's metrics to a Prometheus Pushgateway (the CronJob mode).

The grouping key is `job` and `instance` from `[push]`, both fixed by configuration (never the host name,
which a CronJob's pod changes at every run): each run replaces the one group of its CronJob, so values of
the last run, certificate expiry included, are all the gateway keeps, and no group is left behind.
"""

from __future__ import annotations

import urllib.error

import anyio
from prometheus_client import CollectorRegistry, push_to_gateway

from senderd.errors import PushError


async def push_metrics(
    registry: CollectorRegistry,
    gateway: str,
    *,
    job: str,
    instance: str,
    timeout: float = 10.0,
) -> None:
    """Replace the group `{job, instance}` on the gateway with `registry`'s metrics; PushError if refused."""

    def push() -> None:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key={"instance": instance}, timeout=timeout)

    try:
        await anyio.to_thread.run_sync(push)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PushError(f"push to gateway {gateway} failed ({reason}): check push.gateway / --push-gateway") from None
