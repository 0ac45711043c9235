"""The RayService's application on a multi-node Ray cluster (tests/cluster/conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
from support import bearer, user_with_key

from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import HalldyllError, Unavailable
from halldyll_ray.serve import local_cluster

APP = "halldyll"  # the application's name in serve_config.yaml


def _deployments(cluster: Any) -> dict[str, dict[str, object]]:
    (app,) = cluster.config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_embedding_replicas_land_on_the_gpu_node_and_only_there(ray_cluster: Any) -> None:
    placed = local_cluster.replica_nodes(APP)
    deployments = _deployments(ray_cluster)
    assert set(placed) == set(deployments)
    gpu = ray_cluster.gpu_node.node_id
    cpu = {node.node_id for node in ray_cluster.cpu_nodes}
    for name, nodes in placed.items():
        minimum = deployments[name]["autoscaling_config"]["min_replicas"]  # type: ignore[index]
        assert len(nodes) >= minimum, (name, nodes)
        if name == "Embedding":
            assert set(nodes) == {gpu}, "Embedding replicas must run on the embedding_gpu node"
        else:
            assert set(nodes) <= cpu, f"{name} replicas must run on CPU nodes: {nodes}"
    # Nothing on the head (it offers no CPU), and the CPU replicas spread over the CPU nodes.
    everywhere = Counter(n for nodes in placed.values() for n in nodes)
    assert ray_cluster.head_node_id not in everywhere
    assert len({n for name, ns in placed.items() if name != "Embedding" for n in ns}) >= 2


async def test_store_and_search_across_nodes(
    ray_cluster: Any, http: httpx.AsyncClient, admin_key: str
) -> None:
    """The config embeds every text in the Embedding deployment (local_embedding_max_texts 0),
    whose replicas run on another node than Search's and Ingestion's: a store and a search
    each cross nodes."""
    (app,) = ray_cluster.config["applications"]
    assert app["args"]["local_embedding_max_texts"] == 0
    placed = local_cluster.replica_nodes(APP)
    assert set(placed["Embedding"]).isdisjoint(placed["Search"] + placed["Ingestion"])
    _, key = await user_with_key(http, admin_key)
    h = bearer(key)
    stored = await http.post(
        "/v1/users/me/memories",
        headers=h,
        json={"type": "fact", "statement": "Ada keeps bees on her roof in Lyon"},
    )
    assert stored.status_code == 201, stored.text
    found = await http.post(
        "/v1/users/me/search", headers=h, json={"query": "who is a beekeeper?", "limit": 3}
    )
    assert found.status_code == 200, found.text
    results = found.json()["results"]
    assert results and results[0]["memory"]["id"] == stored.json()["id"]
    ready = (await http.get("/v1/admin/health", headers=bearer(admin_key))).json()
    assert ready["database"]["ok"] and ready["model"]["dimension"] == 384


async def test_search_scales_up_within_its_bounds_and_back(
    ray_cluster: Any, http: httpx.AsyncClient, admin_key: str
) -> None:
    """A load step of uncached searches: Serve adds Search replicas, never past max_replicas,
    and removes them once the load ends (Serve's own replica counts)."""
    scaling = _deployments(ray_cluster)["Search"]["autoscaling_config"]
    low, high = scaling["min_replicas"], scaling["max_replicas"]  # type: ignore[index]
    _, key = await user_with_key(http, admin_key)
    stop = asyncio.Event()
    answered = 0

    async def client(c: int) -> None:
        nonlocal answered
        i = 0
        while not stop.is_set():
            i += 1
            query = f"what did client {c} say about bees the {i}th time?"
            r = await http.post(
                "/v1/users/me/search", headers=bearer(key), json={"query": query, "limit": 3}
            )
            assert r.status_code == 200, r.text
            answered += 1

    seen: list[dict[str, int]] = []

    async def until(predicate: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = (await asyncio.to_thread(local_cluster.replica_counts, APP))["Search"]
            seen.append(counts)
            if predicate(counts):
                return True
            await asyncio.sleep(0.5)
        return False

    clients = [asyncio.create_task(client(c)) for c in range(32)]
    try:
        scaled = await until(lambda c: c.get("RUNNING", 0) > low, 120)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert scaled, f"Search never scaled past {low}: {seen[-3:]}"
    back = await until(lambda c: c == {"RUNNING": low}, 120)
    assert back, f"Search did not come back to {low}: {seen[-3:]}"
    peak = max(sum(c.values()) for c in seen)
    assert low < peak <= high, (peak, seen)
    print(f"Search {low} -> {peak} (max {high}) and back; {answered} searches")


async def test_a_lost_node_costs_503s_never_acknowledged_writes(
    ray_cluster: Any, http: httpx.AsyncClient, admin_key: str
) -> None:
    """Kill (SIGKILL) the CPU node that runs the Ingestion replica while clients write.

    The clients are the product's own (``AsyncHalldyllClient``). Every write acknowledged is
    stored afterwards. Every failure is ``Unavailable``: the app's 503 with Retry-After, or,
    for a request in flight on a replica lost with the node, what the proxy answers for the
    app (a bare 500, or a connection it closes), which the client maps to ``Unavailable``.
    Serve starts the lost replicas on the other nodes and writes succeed again.
    """
    _, key = await user_with_key(http, admin_key)
    placed = local_cluster.replica_nodes(APP)
    (victim_id,) = set(placed["Ingestion"])  # min_replicas 1: one replica, one node
    victim = next(n for n in ray_cluster.cpu_nodes if n.node_id == victim_id)
    lost = sorted(name for name, nodes in placed.items() if victim_id in nodes)

    acknowledged: dict[str, str] = {}  # title -> memory id
    failures: list[HalldyllError] = []
    successes_after_loss = 0
    started, removed, recovered, stop = (asyncio.Event() for _ in range(4))

    async def writer(w: int) -> None:
        nonlocal successes_after_loss
        async with AsyncHalldyllClient(ray_cluster.url, key, timeout=30) as client:
            i = 0
            while not stop.is_set():
                statement = f"writer {w} note {i}: the hive count is {i * 7 + w}"
                i += 1
                try:
                    # Conversations: facts this alike would merge into one (FACT_MERGE_SIMILARITY).
                    stored = await client.store_memory(
                        {
                            "type": "conversation",
                            "title": statement,
                            "messages": [{"role": "user", "content": statement}],
                        }
                    )
                except HalldyllError as exc:
                    failures.append(exc)
                    await asyncio.sleep(0.2)
                    continue
                acknowledged[statement] = str(stored.id)
                if len(acknowledged) >= 10:
                    started.set()
                if removed.is_set():
                    successes_after_loss += 1
                    if successes_after_loss >= 20:
                        recovered.set()

    writers = [asyncio.create_task(writer(w)) for w in range(3)]
    try:
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.to_thread(ray_cluster.cluster.remove_node, victim, False)
        ray_cluster.cpu_nodes.remove(victim)
        removed.set()
        try:
            await asyncio.wait_for(recovered.wait(), 120)
        except TimeoutError:
            raise AssertionError(f"writes did not recover: {failures[-3:]}") from None
    finally:
        stop.set()
        await asyncio.gather(*writers)

    kinds = Counter(
        (type(f).__name__, f.fields.get("status_code"), f.fields.get("retry_after"))
        for f in failures
    )
    print(f"lost {lost}: {len(acknowledged)} writes acknowledged; failures {dict(kinds)}")
    for failure in failures:
        assert isinstance(failure, Unavailable), repr(failure)
        # Unavailable and not the proxy's (a closed connection, a bare 500): the app's 503.
        if failure.fields.get("status_code") not in (None, 500):
            assert failure.fields["status_code"] == 503, failure.fields
            assert failure.fields["retry_after"] >= 1, failure.fields
    # Serve brought back what ran on the lost node, elsewhere.
    minimums = {
        name: d["autoscaling_config"]["min_replicas"]  # type: ignore[index]
        for name, d in _deployments(ray_cluster).items()
    }
    deadline = time.monotonic() + 60
    while True:
        placed = local_cluster.replica_nodes(APP)
        back = all(len(placed.get(name, [])) >= n for name, n in minimums.items())
        if back and not any(victim_id in nodes for nodes in placed.values()):
            break
        assert time.monotonic() < deadline, (lost, placed)
        await asyncio.sleep(0.5)
    # Every acknowledged write is stored. Reads are retried on Unavailable, as the client's
    # contract says: while Serve replaces the lost Ingress replica, HAProxy reloads and closes
    # idle keep-alive connections (a read sent on one as it closes gets no answer).
    async with AsyncHalldyllClient(ray_cluster.url, key, timeout=30) as client:
        for statement, memory_id in acknowledged.items():
            for attempt in range(10):
                try:
                    got = await client.get_memory(memory_id)
                    break
                except Unavailable:
                    assert attempt < 9, f"{memory_id} unreadable"
                    await asyncio.sleep(0.5)
            assert got.memory.title == statement  # type: ignore[union-attr]
