"""A three-node RabbitMQ cluster: quorum queues replicated on every node, three workers
spread over the nodes (each ``AMQP_URL`` lists the three, starting at a different one), the
publisher library given every node, confirming throughout; one kind of node fault each,
then the total-queue check of harness.py.

Each scenario publishes at a slow pace, and a few hundred events at most, while its
faults run, so that publishing and consuming go on through every fault (each checks that
confirms and commits went on while a node was down) whatever the speed of the machine; then
the rest of the stream at full speed. These scenarios run only with ``make faults``: the
cluster alone takes half a minute to form.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiormq
import pytest

from tests.faults.conftest import TEMPLATE_DATABASE, Servers, _delete_queues, _unavailable
from tests.faults.harness import (
    EVENTS_PER_SCENARIO,
    POISON_PER_SCENARIO,
    SLOW,
    ClusterPublisher,
    Message,
    Scenario,
    WorkerProcess,
    declare,
    grep,
    interleave,
    poison_messages,
    topology_settings,
    wait_for,
)
from tests.faults.servers import PrivateRabbit, RabbitCluster, ServerError
from worker.amqp import broker

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420), *SLOW]

#: Events per cluster scenario. The faults are spent on a few hundred of them (each window
#: with a node down gets its own share, see below); the rest, at full speed, is there for
#: batches in flight through the quorum queues with every node back. The 20,000 of the
#: one-node scenarios would add a minute each and prove nothing more.
CLUSTER_EVENTS = min(EVENTS_PER_SCENARIO, 5000)
#: Heartbeat of every client (seconds): a frozen node is given up after about twice this.
HEARTBEAT = 3
#: While the faults run, the publisher goes at this pace (events per second) and sends at
#: most ``START`` events, plus ``2 * THROUGH`` for each window with a node down; then the
#: rest at full speed.
PACE = 100
START = 500
#: Events confirmed, and rows committed, while a node is down: proof that both went on.
THROUGH = 100


@pytest.fixture(scope="module")
def cluster(servers: Servers) -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes joined into one cluster, for the whole module."""
    c = RabbitCluster(servers.base / f"cluster-{uuid.uuid4().hex[:8]}", servers.certs)
    try:
        try:
            c.start()
        except (ServerError, OSError) as exc:
            _unavailable(f"a three-node RabbitMQ cluster: {exc}")
        yield c
    finally:
        c.stop()


ClusterScenario = Callable[[str], Awaitable[Scenario]]
_PUBLISHING: list[asyncio.Task[None]] = []


@pytest.fixture
async def cluster_scenario(
    servers: Servers, cluster: RabbitCluster, good_stream: list[Message]
) -> AsyncIterator[ClusterScenario]:
    """A scenario whose broker is the cluster: its own database, queues and stream; at the
    end its workers are killed, its database dropped, and every node runs again."""
    made: list[Scenario] = []

    async def make(name: str) -> Scenario:
        rng = random.Random(name)
        database = f"faults_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        s = Scenario(
            name=name,
            pg=servers.pg,
            mq=cluster,  # type: ignore[arg-type]  # answers as one node does (a running one)
            database=database,
            role=servers.role,
            messages=interleave(
                good_stream[:CLUSTER_EVENTS],
                poison_messages(servers.templates, rng, POISON_PER_SCENARIO),
                rng,
            ),
            logs=servers.logs,
        )
        made.append(s)
        await servers.pg.execute(f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE_DATABASE}"')
        return s

    yield make
    for task in _PUBLISHING:
        task.cancel()
    _PUBLISHING.clear()
    for s in made:
        for w in s.workers:
            if w.alive:
                await w.kill()
        await servers.pg.execute(f'DROP DATABASE IF EXISTS "{s.database}" WITH (FORCE)')
        await asyncio.to_thread(cluster.restore)
        await _delete_queues(s)


# --- helpers --------------------------------------------------------------------------------


async def _start(
    s: Scenario, cluster: RabbitCluster
) -> tuple[list[WorkerProcess], ClusterPublisher, asyncio.Task[None]]:
    """Declare the topology (quorum queues: a member on every node), start a worker per
    node, and the publishers at the slow pace."""
    await declare(s)
    for key in ("queue", "replay_queue", "dead_letter_queue"):
        _, members, online = await asyncio.to_thread(cluster.quorum, s.names[key])
        assert sorted(members) == sorted(n.node for n in cluster.nodes), (key, members)
        assert sorted(online) == sorted(members), (key, online)
    workers = [
        await s.worker(amqp_url=cluster.urls(i, query=f"heartbeat={HEARTBEAT}")).start()
        for i in range(len(cluster.nodes))
    ]
    for w in workers:
        await w.ready()
    publisher = s.cluster_publisher(cluster.urls(0, query=f"heartbeat={HEARTBEAT}"))
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=PACE, limit=START))
    _PUBLISHING.append(publishing)  # cancelled at teardown if the test left it running
    return workers, publisher, publishing


async def _goes_on(s: Scenario, publisher: ClusterPublisher, what: str) -> None:
    """Publishing and consuming go on: ``THROUGH`` more events confirmed and stored."""
    confirmed, rows = len(publisher.confirmed), await s.rows()
    publisher.library.allow(2 * THROUGH)

    async def more() -> bool:
        return len(publisher.confirmed) >= confirmed + THROUGH and await s.rows() >= rows + THROUGH

    try:
        await wait_for(more, within=120, message=f"{THROUGH} events confirmed and stored {what}")
    except AssertionError as exc:
        state = (
            f"confirmed {confirmed} -> {len(publisher.confirmed)}, rows {rows} -> "
            f"{await s.rows()}, library attempts {publisher.library.attempts} failures "
            f"{publisher.library.failures} {dict(publisher.library.reasons)}, "
            f"queues {await asyncio.to_thread(s.queues)}"
        )
        raise AssertionError(f"{exc}: {state}") from None


async def _reconnected(w: WorkerProcess, times: int) -> bool:
    return len(grep(w.log, "reconnected to the broker")) >= times


async def _consumers(s: Scenario, n: int) -> bool:
    live, replay, _ = await asyncio.to_thread(s.queues)
    return live[2] == n and replay[2] == n


async def _finish(s: Scenario, publisher: ClusterPublisher, publishing: asyncio.Task[None]) -> None:
    publisher.library.unlimited()
    await publishing
    await s.account(publisher, consumers=3)
    library = publisher.library
    print(
        f"{s.name}: the library sent {library.attempts} publishes for {library.sent} events,"
        f" {library.failures} failed and were sent again {dict(library.reasons)};"
        f" the raw publisher reconnected {publisher.raw.reconnects} times"
    )
    await s.stop_workers()


# --- scenarios --------------------------------------------------------------------------------


async def test_node_of_a_worker_stopped_then_killed(
    cluster_scenario: ClusterScenario, cluster: RabbitCluster
) -> None:
    """`rabbitmqctl stop_app` on the node worker 1 consumes from, later SIGKILL of the node
    worker 2 consumes from, while publishing: each worker reconnects to a surviving node and
    consumes again (three consumers while the node is down), confirms and commits go on;
    every confirmed event stored once."""
    s = await cluster_scenario("cluster-node-stopped")
    workers, publisher, publishing = await _start(s, cluster)
    await s.wait_rows(THROUGH)

    await asyncio.to_thread(cluster.stop_app, 1)
    await wait_for(lambda: _reconnected(workers[1], 1), message="worker 1 on another node")
    await wait_for(lambda: _consumers(s, 3), message="three consumers without node 1")
    await _goes_on(s, publisher, "while node 1's app is stopped")
    await asyncio.to_thread(cluster.start_app, 1)

    await asyncio.to_thread(cluster.kill, 2)
    await wait_for(lambda: _reconnected(workers[2], 1), message="worker 2 on another node")
    await wait_for(lambda: _consumers(s, 3), message="three consumers without node 2")
    await _goes_on(s, publisher, "while node 2 is dead")
    await asyncio.to_thread(cluster.boot, 2)
    await asyncio.to_thread(cluster.wait_running, 3)
    await _finish(s, publisher, publishing)


async def test_quorum_leader_killed(
    cluster_scenario: ClusterScenario, cluster: RabbitCluster
) -> None:
    """SIGKILL of the node leading the ingest queue, while publishing and consuming: a new
    leader is elected among the survivors, confirms and commits go on, the killed node
    rejoins; every confirmed event stored once."""
    s = await cluster_scenario("cluster-leader-killed")
    workers, publisher, publishing = await _start(s, cluster)
    await s.wait_rows(THROUGH)
    queue = s.names["queue"]
    leader, _, _ = await asyncio.to_thread(cluster.quorum, queue)
    victim = cluster.index(leader)

    await asyncio.to_thread(cluster.kill, victim)

    async def new_leader() -> bool:
        now, _, _ = await asyncio.to_thread(cluster.quorum, queue)
        return now not in (leader, "")

    await wait_for(new_leader, within=60, message="a new leader of the ingest queue")
    await wait_for(lambda: _reconnected(workers[victim], 1), message="its worker elsewhere")
    await wait_for(lambda: _consumers(s, 3), message="three consumers without the leader")
    await _goes_on(s, publisher, "after the leader was killed")
    await asyncio.to_thread(cluster.boot, victim)
    await asyncio.to_thread(cluster.wait_running, 3)
    await _finish(s, publisher, publishing)


async def test_node_frozen_past_heartbeat_and_net_tick(
    cluster_scenario: ClusterScenario, cluster: RabbitCluster
) -> None:
    """SIGSTOP of the node leading the queues (the first node of the publishers' list and
    of worker 0's) until its peers declared it down (net tick) and its clients gave up on it
    (heartbeat): a partition, as the others see it. Confirms and commits go on through the
    other two; SIGCONT, the partition heals (autoheal); every confirmed event stored
    once."""
    s = await cluster_scenario("cluster-node-frozen")
    workers, publisher, publishing = await _start(s, cluster)
    await s.wait_rows(THROUGH)
    leader, _, _ = await asyncio.to_thread(cluster.quorum, s.names["queue"])
    victim = cluster.index(leader)
    frozen_at = time.monotonic()

    await asyncio.to_thread(cluster.freeze, victim)
    try:

        async def partitioned() -> bool:
            return len(await asyncio.to_thread(cluster.running)) == len(cluster.nodes) - 1

        await wait_for(partitioned, within=60, message="the frozen node declared down")
        await wait_for(lambda: _reconnected(workers[victim], 1), message="its worker elsewhere")
        await wait_for(lambda: _consumers(s, 3), message="three consumers without it")
        await _goes_on(s, publisher, "while a node is frozen")
        frozen_for = time.monotonic() - frozen_at
    finally:
        await asyncio.to_thread(cluster.thaw, victim)
    await asyncio.to_thread(cluster.wait_running, 3)
    print(f"cluster-node-frozen: node {victim} frozen for {frozen_for:.1f}s")
    assert frozen_for > 2 * HEARTBEAT
    assert frozen_for > cluster.net_ticktime
    await _finish(s, publisher, publishing)


async def test_rolling_restart(cluster_scenario: ClusterScenario, cluster: RabbitCluster) -> None:
    """Each node in turn, once none of its quorum queues depends on it
    (`check_if_node_is_quorum_critical`): `rabbitmqctl stop`, confirms and commits go on
    without it, started again, rejoined; every confirmed event stored once."""
    s = await cluster_scenario("cluster-rolling-restart")
    workers, publisher, publishing = await _start(s, cluster)
    await s.wait_rows(THROUGH)
    for i in range(len(cluster.nodes)):
        await asyncio.to_thread(cluster.wait_quorum_safe, i)
        await asyncio.to_thread(cluster.stop_node, i)
        await _goes_on(s, publisher, f"while node {i} is stopped")
        await asyncio.to_thread(cluster.boot, i)
        await asyncio.to_thread(cluster.wait_running, 3)
    for i, w in enumerate(workers):
        assert await _reconnected(w, 1), f"worker {i} never moved"
    await _finish(s, publisher, publishing)


async def test_first_dead_letters_after_their_leader_was_killed(
    cluster_scenario: ClusterScenario, cluster: RabbitCluster
) -> None:
    """The node leading the dead-letter queue (and no ingest queue) is killed before any
    poison came: the workers' first dead-letter copies go out right after, while the queue
    record may still name the dead leader (RabbitMQ 3.10 then nacks every later publish on
    that channel, until the dead node is back). Each poison message is dead-lettered all
    the same, and every good event stored, before the node comes back; once it is back,
    nothing lost or doubled, nothing left unacked."""
    s = await cluster_scenario("cluster-dead-letter-leader-killed")
    good = [m for m in s.messages if m.good]
    poison = [m for m in s.messages if not m.good]
    await declare(s)  # from node 0: it leads every queue
    await _lead_ingest_queues_from(s, cluster.nodes[1])
    workers = [
        await s.worker(amqp_url=cluster.urls(i, query=f"heartbeat={HEARTBEAT}")).start()
        for i in range(len(cluster.nodes))
    ]
    for w in workers:
        await w.ready()
    publisher = s.cluster_publisher(cluster.urls(1, query=f"heartbeat={HEARTBEAT}"))
    await publisher.library.publish(good[:1000])
    await s.wait_rows(1000)
    assert (await asyncio.to_thread(s.queues))[2][0] == 0, "no dead letter before the kill"
    leader, _, _ = await asyncio.to_thread(cluster.quorum, s.names["dead_letter_queue"])
    ingest_leader, _, _ = await asyncio.to_thread(cluster.quorum, s.names["queue"])
    assert leader != ingest_leader
    await asyncio.to_thread(cluster.kill, cluster.index(leader))
    await asyncio.gather(publisher.raw.publish(poison), publisher.library.publish(good[1000:]))

    async def dead_lettered() -> bool:
        return (await asyncio.to_thread(s.queues))[2][0] >= len(poison)

    # On the two surviving nodes: a node may stay lost for hours.
    await wait_for(dead_lettered, within=90, message="every poison dead-lettered, node down")
    await s.wait_rows(len(good))
    await asyncio.to_thread(cluster.boot, cluster.index(leader))
    await asyncio.to_thread(cluster.wait_running, 3)
    await s.account(publisher, consumers=3)
    renewed = sum(len(grep(w.log, "dead-lettering failed")) for w in workers)
    print(f"{s.name}: {renewed} dead-letter copies nacked or unconfirmed, sent again")
    await s.stop_workers()


async def _lead_ingest_queues_from(s: Scenario, node: PrivateRabbit) -> None:
    """Declare the two ingest queues again from ``node``, which then leads them (RabbitMQ
    places a new quorum queue's leader on the node the declaring client is connected to)."""
    topology = broker.Topology.from_settings(topology_settings(s))
    connection = await aiormq.connect(node.amqp_url)
    try:
        channel = await connection.channel()
        for key in ("queue", "replay_queue"):
            await channel.queue_delete(s.names[key])
        await broker.open_topology(connection, topology, passive=False)
    finally:
        await connection.close()
