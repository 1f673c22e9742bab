"""Scheduled flows across replicas: static shards by a stable hash, and tick claims in PostgreSQL so that
two replicas x 100 flows fire each tick once, and the survivor carries on when one replica dies."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from senderd.clock import SystemClock
from senderd.cluster import TickGate, gate_for, in_shard, mine, shard_hash, tick_number
from senderd.config import ClusterConfig, FlowConfig, load_config
from senderd.errors import ConfigError
from senderd.metrics import Metrics
from senderd.pool import Job, Verdict
from senderd.relay.pgstore import PgStore
from senderd.relay.spool import Spool
from senderd.scheduler import Scheduler
from tests.pgserver import PostgresServer, postgres_server

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as running:
        yield running


def test_the_shard_hash_is_prometheus_hashmod() -> None:
    # hashmod: md5 of the value, its bytes 8..16 as a big-endian uint64, modulo N
    digest = hashlib.md5(b"orders.v2", usedforsecurity=False).digest()
    assert shard_hash("orders.v2") == int.from_bytes(digest[8:16], "big")
    names = [f"flow-{n}" for n in range(300)]
    shards = [[name for name in names if in_shard(name, (index, 3))] for index in range(3)]
    assert sorted(itertools.chain(*shards)) == sorted(names)  # every flow in exactly one shard
    assert all(60 < len(shard) < 140 for shard in shards), [len(s) for s in shards]
    assert all(in_shard(name, None) for name in names)


def test_mine_keeps_the_shards_flows() -> None:
    flows = [FlowConfig(name=f"f{n}", path="/http/x", every=60) for n in range(20)]
    together = mine(flows, (0, 2)) + mine(flows, (1, 2))
    assert sorted(f.name for f in together) == sorted(f.name for f in flows)


def test_tick_numbers_agree_across_replicas_whatever_their_phase() -> None:
    every = FlowConfig(name="f", path="/http/x", every=10)
    assert tick_number(every, 1000.0) == tick_number(every, 1009.999) == 100
    assert tick_number(every, 1010.0) == 101
    cron = FlowConfig(name="c", path="/http/x", cron="*/5 * * * *")
    assert tick_number(cron, 600.2) == tick_number(cron, 599.8) == 10


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"shard": "3/3"}, 'cluster: shard: use "I/N" with 0 <= I < N, e.g. "0/3", found \'3/3\''),
        ({"shard": "a/b"}, 'cluster: shard: use "I/N" with 0 <= I < N, e.g. "0/3", found \'a/b\''),
        ({"shard": "0/2", "shards": 2}, "cluster: shard: give either shard, or shards with shard_index_env, not both"),
        ({"shards": 2}, "cluster: shards and shard_index_env go together: give both, or neither"),
    ],
)
def test_bad_cluster_sections_are_refused_with_their_reason(
    tmp_path: Path, section: dict[str, object], error: str
) -> None:
    lines = "\n".join(f"{key} = {value!r}".replace("'", '"') for key, value in section.items())
    path = tmp_path / "senderd.toml"
    path.write_text(f"[cluster]\n{lines}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: {error}"


def test_the_shard_index_comes_from_a_statefulset_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ClusterConfig(shards=3, shard_index_env="POD_NAME")
    monkeypatch.setenv("POD_NAME", "senderd-2")
    assert config.shard_of() == (2, 3)
    monkeypatch.setenv("POD_NAME", "1")
    assert config.shard_of() == (1, 3)
    monkeypatch.setenv("POD_NAME", "senderd-3")
    with pytest.raises(ConfigError) as refused:
        config.shard_of()
    assert str(refused.value) == (
        "cluster.shard_index_env: POD_NAME='senderd-3' is not a shard index below cluster.shards (3) "
        "nor a pod name ending in one"
    )
    assert ClusterConfig(shard="1/4").shard_of() == (1, 4)
    assert ClusterConfig().shard_of() is None


def test_only_a_store_that_claims_ticks_gates_them(tmp_path: Path) -> None:
    clock, metrics = SystemClock(), Metrics()
    assert gate_for(None, clock, metrics) is None
    assert gate_for(Spool(tmp_path), clock, metrics) is None
    assert isinstance(gate_for(PgStore("host=127.0.0.1"), clock, metrics), TickGate)


RUN_S = float(os.environ.get("SENDERD_CLUSTER_TEST_S", "9"))
"""The issue names 30 s; 9 s (SENDERD_CLUSTER_TEST_S=30 for the full run) keeps the suite fast and still
leaves three ticks after replica a's death."""


@pytest.mark.slow
@pytest.mark.timeout(RUN_S * 3 + 30)
async def test_two_replicas_fire_each_tick_of_100_flows_once(server: PostgresServer) -> None:
    """Two replicas x 100 flows every 1 s for RUN_S seconds, each with its own store on one database. Replica b
    starts half a second after a (out of phase); a is killed two thirds in: b carries on without a gap."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f"CREATE DATABASE {name}")
    dsn = server.dsn.replace("dbname=senderd", f"dbname={name}")
    flows = [FlowConfig(name=f"flow-{n:03}", path="/http/x", every=1) for n in range(100)]
    clock = SystemClock()
    sends: list[tuple[str, str, int]] = []  # (replica, flow, tick)
    replicas = {"a": Metrics(), "b": Metrics()}

    async def replica(label: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        store = PgStore(dsn, pool_size=4, timeout=5)
        await store.open()
        gate = TickGate(store, clock, replicas[label])
        try:
            async with anyio.create_task_group() as group:

                def make_job(flow: FlowConfig, scheduled_at: float) -> Job:
                    async def job() -> None:
                        if await gate.admit(flow, scheduled_at):
                            wall = scheduled_at + clock.time() - clock.monotonic()
                            sends.append((label, flow.name, tick_number(flow, wall)))

                    return job

                async def run_job(job: Job) -> None:
                    await job()

                def offer(_flow: FlowConfig, job: Job) -> Verdict:
                    group.start_soon(run_job, job)
                    return "queued"

                scheduler = Scheduler(offer, make_job, clock=clock, on_skip=lambda *_: None)
                await group.start(scheduler.run, flows)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()

    started = clock.time()
    async with anyio.create_task_group() as run:
        a_scope = anyio.CancelScope()

        async def replica_a() -> None:
            with a_scope:
                await replica("a")

        run.start_soon(replica_a)
        await anyio.sleep(0.5)
        await run.start(replica, "b")
        await anyio.sleep(RUN_S * 2 / 3)
        killed_at = clock.time()
        a_scope.cancel()  # replica a is gone: no more claims from it
        await anyio.sleep(RUN_S / 3)
        run.cancel_scope.cancel()

    per_tick = Counter((flow, tick) for _, flow, tick in sends)
    assert max(per_tick.values()) == 1, [k for k, v in per_tick.items() if v > 1][:5]  # each tick sent once
    by_replica = Counter(label for label, _, _ in sends)
    assert by_replica["a"] > 0 and by_replica["b"] > 0
    skipped = sum(
        replicas[label].skipped_ticks.labels(f.name, "claimed_elsewhere")._value.get() for label in "ab" for f in flows
    )
    assert skipped > 50 * RUN_S  # both fired every tick of the first two thirds; one of each pair lost
    # No gap: every whole second from b's start to the end has its tick, for every flow.
    first, last = math.ceil(started + 1.5), math.floor(clock.time()) - 2
    for flow in flows:
        ticks = {tick for _, name, tick in sends if name == flow.name}
        # the tick a replica claimed as it was killed may be lost: "no gap beyond one tick" (issue 15)
        missing = [t for t in range(first, last) if t not in ticks and abs(t - killed_at) > 1]
        assert not missing, (flow.name, missing, killed_at)
