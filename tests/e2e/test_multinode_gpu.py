"""GPU placement and multi-node serving, end to end, on a simulated multi-node Ray cluster.

A CPU head plus three worker nodes that declare GPUs like real ones ("A10G 24 GB x1", "A100 80 GB x2",
"L4 24 GB x1": `GPU`, the `ray.io/accelerator-type` label and the `accelerator_type:<T>` resource; see
tests/support/multinode.py), all on this machine. Services run CPU programs but ask for GPUs; the `ray-dstack`
console script deploys them through the head's dashboard. Each replica's commands write the
`CUDA_VISIBLE_DEVICES` they were started with into a file that `python -m http.server` serves, so a
request through Serve's HTTP address shows which GPUs Ray gave that replica's child process.

Run under the machine-wide lock: `flock /tmp/ray-e2e.lock python -m pytest tests/e2e/test_multinode_gpu.py`.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from conftest import assert_holds
from tests.support.multinode import (
    ACCEL_LABEL,
    GPU_NODES,
    AddressFileGuard,
    RequestLoop,
    SimCluster,
    free_port,
    info_service_yaml,
    start_sim_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    import ray

    # A driver left connected by an earlier test in this process would join the wrong cluster.
    if ray.is_initialized():
        ray.shutdown()
    guard = AddressFileGuard()
    cluster = None
    try:
        cluster = start_sim_cluster(tmp_path_factory.mktemp("ray-dstack-home"))
        yield cluster
    finally:
        if cluster is not None:
            cluster.cluster.shutdown()
            leaked = cluster.reap_children()
            if leaked:
                print(f"\nservice processes left running after the cluster was shut down (killed now): {leaked}")
        guard.restore()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode-services")


def service_yaml(name: str, workdir, *, gpu: str, replicas: int = 1, fixed_port: int | None = None) -> str:
    return info_service_yaml(name, workdir, gpu=gpu, replicas=replicas, port=fixed_port)


def write(workdir, name: str, text: str):
    path = workdir / f"{name}.dstack.yml"
    path.write_text(text)
    return path


def info(sim: SimCluster, name: str, timeout: float = 5.0) -> dict:
    resp = httpx.get(f"{sim.http}/{name}/info.json", timeout=timeout)
    resp.raise_for_status()
    data = resp.json()
    sim.children.add(data["pid"])
    return data


def replica_infos(sim: SimCluster, name: str, expected: int, tries: int = 40) -> dict[int, str]:
    """pid -> CUDA_VISIBLE_DEVICES of the children answering behind Serve's one HTTP address."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        data = info(sim, name)
        seen[data["pid"]] = data["cuda"]
        if len(seen) == expected:
            break
    return seen


def running(status: dict) -> list[dict]:
    return [r for r in status["replicas"]["items"] if r["state"] == "RUNNING"]


def test_gpu_nodes_look_like_real_ones(sim):
    from ray_dstack.deploy.dashboard import DashboardClient

    with DashboardClient(sim.dashboard) as client:
        nodes = {n["node_id"]: n for n in client.nodes() if n["state"] == "ALIVE"}
    assert len(nodes) == 4
    head = nodes[sim.node_id("head")]
    # Ray adds no accelerator label or resource by itself where NVML finds no GPU.
    assert ACCEL_LABEL not in head["labels"] and "GPU" not in head["resources_total"]
    for name, (accel, gpus) in GPU_NODES.items():
        node = nodes[sim.node_id(name)]
        assert node["labels"][ACCEL_LABEL] == accel
        assert node["resources_total"]["GPU"] == gpus
        assert node["resources_total"][f"accelerator_type:{accel}"] == 1


def test_a100_spec_never_lands_on_l4_or_a10g(sim, workdir):
    """`gpu: A100:1`, 3 replicas: two fill the A100 x2 node (one GPU id each); the third stays pending
    although the A10G and L4 nodes each have a free GPU."""
    path = write(workdir, "a100-one", service_yaml("a100-one", workdir, gpu="A100:1", replicas=3))
    sim.run("deploy", str(path), "--detach", check=True)
    try:
        status = sim.wait_until(
            lambda: (s := sim.status("a100-one")) and len(running(s)) == 2 and s,
            timeout=90,
            what="two replicas running",
        )
        assert {sim.kind_of(r["node_id"]) for r in running(status)} == {"a100"}
        assert {r["node_accelerator_type"] for r in running(status)} == {"A100-80G"}
        assert sorted(replica_infos(sim, "a100-one", 2).values()) == ["0", "1"]
        def third_waits() -> bool:  # the third replica keeps waiting for an A100 GPU
            status = sim.status("a100-one")
            return (status["replicas"]["running"] == 2 and status["replicas"]["target"] == 3
                    and all(sim.kind_of(r["node_id"]) in ("a100", None) for r in status["replicas"]["items"]))

        assert_holds(third_waits, seconds=3, interval=1, what="two A100 replicas running, the third waiting")
    finally:
        sim.delete("a100-one")


def test_80gb_x2_gets_both_a100_gpus(sim, workdir):
    """`gpu: 80GB:2` deploys (the CLI waits until ready) onto the A100 x2 node, and the child process
    sees both GPUs in CUDA_VISIBLE_DEVICES (Ray sets it in the replica; the child inherits it)."""
    path = write(workdir, "a100-two", service_yaml("a100-two", workdir, gpu="80GB:2"))
    proc = sim.run("deploy", str(path))
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "is ready" in proc.stdout
        status = sim.status("a100-two")
        [replica] = running(status)
        assert sim.kind_of(replica["node_id"]) == "a100"
        assert replica["node_accelerator_type"] == "A100-80G" and replica["node_gpus"] == 2
        assert replica["node_ip"]
        cuda = info(sim, "a100-two")["cuda"]
        assert sorted(cuda.split(",")) == ["0", "1"]
    finally:
        sim.delete("a100-two")


def test_fixed_port_puts_at_most_one_replica_per_node(sim, workdir):
    """A fixed port (commands without $RAY_DSTACK_PORT) means `max_replicas_per_node: 1`: the A100 x2 node
    has GPUs for two `gpu: A100:1` replicas but takes one; the other waits for a second A100 node."""
    port = free_port()
    path = write(workdir, "a100-fixed", service_yaml("a100-fixed", workdir, gpu="A100:1", replicas=2, fixed_port=port))
    sim.run("deploy", str(path), "--detach", check=True)
    try:
        status = sim.wait_until(
            lambda: (s := sim.status("a100-fixed")) and len(running(s)) == 1 and s, timeout=90, what="one replica"
        )
        assert sim.kind_of(running(status)[0]["node_id"]) == "a100"
        assert_holds(
            lambda: (s := sim.status("a100-fixed"))["replicas"]["running"] == 1 and s["replicas"]["target"] == 2,
            seconds=3, interval=1, what="one fixed-port replica on the one A100 node, the second waiting")
        assert info(sim, "a100-fixed")["cuda"] in ("0", "1")
    finally:
        sim.delete("a100-fixed")


def test_h100_cannot_be_placed_and_deploy_says_why(sim, workdir):
    path = write(workdir, "h100", service_yaml("h100", workdir, gpu="H100"))
    started = time.monotonic()
    proc = sim.run("deploy", str(path), "--timeout", "70")
    elapsed = time.monotonic() - started
    text = proc.stdout + proc.stderr
    print(f"\ndeploy of gpu: H100 ended in {elapsed:.1f}s with:\n{proc.stderr}")
    assert proc.returncode == 1, text
    # No autoscaler can add an H100 node here: deploy gives up after ~30 s, not after --timeout.
    assert elapsed < 60, f"took {elapsed:.0f}s: {text}"
    assert "did not become ready" in text and "Nothing was left deployed" in text
    assert "H100" in text  # the unmet requirement
    for accel, _ in GPU_NODES.values():  # and the GPU types the cluster has
        assert accel in text
    assert "Traceback" not in text
    assert "h100" not in sim.services()


def test_24gb_lands_on_a10g_and_l4_one_gpu_each(sim, workdir):
    path = write(workdir, "gpu24", service_yaml("gpu24", workdir, gpu="24GB", replicas=2))
    proc = sim.run("deploy", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = sim.status("gpu24")
    assert status["replicas"]["running"] == 2
    assert sorted(sim.kind_of(r["node_id"]) for r in running(status)) == ["a10g", "l4"]
    assert sorted(r["node_accelerator_type"] for r in running(status)) == ["A10G", "L4"]
    assert list(replica_infos(sim, "gpu24", 2).values()) == ["0", "0"]
    # `status` (human form) names the GPU type of each replica's node.
    text = sim.run("status", "gpu24", check=True).stdout
    assert "A10G" in text and "L4" in text


def test_losing_a_node_moves_the_replica_and_the_service_keeps_answering(sim, workdir):
    """Kill the L4 node under load: the A10G replica keeps serving; the lost replica waits (the A100 node
    does not match `gpu: 24GB`) until a new L4 node joins, then runs there."""
    if "gpu24" not in sim.services():
        sim.run("deploy", str(write(workdir, "gpu24", service_yaml("gpu24", workdir, gpu="24GB", replicas=2))), check=True)
    status = sim.status("gpu24")
    by_kind = {sim.kind_of(r["node_id"]): r for r in running(status)}
    assert set(by_kind) == {"a10g", "l4"}
    pids = replica_infos(sim, "gpu24", 2)
    assert len(pids) == 2

    with RequestLoop(f"{sim.http}/gpu24/info.json", lambda resp: str(resp.json()["pid"])) as loop:
        loop.wait_for_results(10)
        killed_at = len(loop.results)
        l4_node = sim.node_id("l4")
        sim.kill_node("l4")
        # Serve notices the lost replica and wants a new one; only a 24 GB GPU node may take it.
        sim.wait_until(
            lambda: not any(r["node_id"] == l4_node and r["state"] == "RUNNING" for r in sim.status("gpu24")["replicas"]["items"]),
            timeout=60,
            what="the replica on the lost node to be gone",
        )
        loop.wait_for_results(10)
        status = sim.status("gpu24")
        assert [sim.kind_of(r["node_id"]) for r in running(status)] == ["a10g"]
        assert not any(sim.kind_of(r["node_id"]) == "a100" for r in status["replicas"]["items"])

        sim.add_gpu_node("l4b", "L4", 1)  # what the autoscaler does on a real cluster
        status = sim.wait_until(
            lambda: (s := sim.status("gpu24")) and len(running(s)) == 2 and s, timeout=90, what="the replica to move"
        )
        assert sorted(sim.kind_of(r["node_id"]) for r in running(status)) == ["a10g", "l4b"]
        new_pids = sim.wait_until(lambda: len(p := replica_infos(sim, "gpu24", 2)) == 2 and p, timeout=30)
        loop.wait_for_results(10)  # the last ten checked below ran after the move

    results = loop.results
    during = results[killed_at:]  # from the kill until the replica has moved
    failed = loop.failed(since=killed_at)
    slowest = max(t for t, _, _ in results)
    print(
        f"\nduring the node loss: {len(during) - len(failed)} ok, {len(failed)} failed of {len(during)}, "
        f"slowest {slowest:.2f}s; errors: {sorted({w for _, _, w in failed})[:5]}"
    )
    assert not loop.hung(), "a request hung until the client timeout"
    assert len(failed) <= 0.2 * len(during), f"{len(failed)} of {len(during)} requests failed: {failed[:5]}"
    # After the move every request succeeds again.
    assert all(ok for _, ok, _ in results[-10:])

    lost = set(pids) - set(new_pids)
    assert len(lost) == 1
    sim.lost_children = lost
    sim.delete("gpu24")


def test_a_lost_nodes_service_processes_do_not_outlive_it(sim):
    lost = getattr(sim, "lost_children", None)
    assert lost, "the node-loss test runs first and records the lost replica's processes"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in lost):
        time.sleep(0.5)
    assert not any(alive(pid) for pid in lost), f"still running: {sorted(lost)}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
