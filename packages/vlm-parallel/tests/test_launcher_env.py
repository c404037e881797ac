"""The launcher's environment -> :class:`DistContext` (docs/multinode.md relies on it).

Unit tests set the variables with ``monkeypatch`` and never create a process group (every
malformed environment is rejected before one would be).  The 2-process test launches two
processes as two one-GPU "nodes" (``LOCAL_RANK=0`` on both, ``GROUP_RANK`` 0 and 1),
with the variables set by the parent exactly as ``torchrun`` would, and saves / loads one
checkpoint in a folder both see; a save into node-local folders must fail on both.

Run as a script (``python test_launcher_env.py <outdir> <ckpt_dir> <local_dir>``) this
file is that worker; the parent sets the environment.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import vlmp_workers as w

from vlm_config import ParallelConfig
from vlm_parallel import DistContext, init_distributed
from vlm_parallel.dist import _launcher_env

LAUNCHER_VARS = w.LAUNCHER_VARS


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Clear every launcher variable; return a setter for some of them."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


# ---------------------------------------------------------------------- parsing
def test_torchrun_two_nodes_of_four(env: Any) -> None:
    # Second process on the second node of `torchrun --nnodes=2 --nproc_per_node=4`.
    env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, GROUP_RANK=1, GROUP_WORLD_SIZE=2)
    got = _launcher_env()
    assert (got.rank, got.world_size, got.local_rank) == (5, 8, 1)
    assert (got.local_world_size, got.node_rank) == (4, 1)


def test_node_rank_from_group_rank_not_from_arithmetic(env: Any) -> None:
    # GROUP_RANK is what the launcher says; it is not recomputed from RANK.
    env(RANK=1, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, GROUP_RANK=1)
    assert _launcher_env().node_rank == 1
    env(GROUP_RANK=0)
    assert _launcher_env().node_rank == 0


def test_node_rank_without_group_rank(env: Any) -> None:
    env(RANK=6, WORLD_SIZE=8, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4)
    assert _launcher_env().node_rank == 1


def test_single_node_defaults(env: Any) -> None:
    # A launcher that only sets RANK / WORLD_SIZE: one node, LOCAL_RANK = RANK.
    env(RANK=1, WORLD_SIZE=2)
    got = _launcher_env()
    assert (got.local_rank, got.local_world_size, got.node_rank) == (1, 2, 0)


def test_initialised_group_wins_over_rank_and_world(env: Any) -> None:
    env(RANK=0, WORLD_SIZE=1)
    got = _launcher_env((3, 4))
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (3, 4, 3, 4)


def test_no_launcher_is_one_process(env: Any) -> None:
    ctx = init_distributed(ParallelConfig(), device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
    assert (ctx.local_world_size, ctx.node_rank) == (1, 0)
    assert ctx.is_main and not ctx.distributed and ctx.mesh is None


def test_torchrun_single_process(env: Any) -> None:
    env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, GROUP_RANK=0)
    ctx = init_distributed(ParallelConfig(), device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_world_size, ctx.node_rank) == (0, 1, 1, 0)
    assert ctx.is_main and ctx.mesh is None


def test_dist_context_positional_construction_still_works() -> None:
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None, True)
    assert (ctx.local_world_size, ctx.node_rank) == (1, 0)


MALFORMED = [
    ({"RANK": 1}, r"RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": 2}, r"WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": 2, "WORLD_SIZE": 2}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    ({"RANK": -1, "WORLD_SIZE": 2}, r"RANK=-1 is not in"),
    ({"RANK": 0, "WORLD_SIZE": 0}, r"WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "one", "WORLD_SIZE": 2}, r"RANK='one' is not an integer"),
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": "0x"}, r"LOCAL_RANK='0x' is not an integer"),
    (
        {"RANK": 5, "WORLD_SIZE": 8, "LOCAL_RANK": 4, "LOCAL_WORLD_SIZE": 4},
        r"LOCAL_RANK=4 is not in \[0, LOCAL_WORLD_SIZE=4\)",
    ),
    ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": -1}, r"LOCAL_RANK=-1 is not in"),
    # LOCAL_RANK without LOCAL_WORLD_SIZE is checked against the whole world.
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 2}, r"LOCAL_RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    (
        {"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 4},
        r"LOCAL_WORLD_SIZE=4 is not in \[1, WORLD_SIZE=2\]",
    ),
    (
        {"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 0},
        r"LOCAL_WORLD_SIZE=0 is not in",
    ),
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2}, r"LOCAL_WORLD_SIZE=2 is set but"),
    (
        {"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 1, "GROUP_RANK": 2, "GROUP_WORLD_SIZE": 2},
        r"GROUP_RANK=2 is not in \[0, GROUP_WORLD_SIZE=2\)",
    ),
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "GROUP_RANK": -1}, r"GROUP_RANK=-1 is not"),
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "GROUP_WORLD_SIZE": 0}, r"GROUP_WORLD_SIZE=0"),
]


@pytest.mark.parametrize(("values", "message"), MALFORMED)
def test_malformed_environment_is_a_clear_error(
    env: Any, values: dict[str, Any], message: str
) -> None:
    env(MASTER_ADDR="127.0.0.1", MASTER_PORT=w.free_port(), **values)
    with pytest.raises(ValueError, match=message):
        init_distributed(ParallelConfig(), device="cpu")
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"MASTER_PORT": 29500}, r"MASTER_ADDR is not set; launch with torchrun"),
        ({"MASTER_ADDR": "10.0.0.1"}, r"MASTER_PORT is not set"),
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "http"}, r"MASTER_PORT='http' is not an"),
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": 70000}, r"MASTER_PORT=70000 is not a TCP"),
    ],
)
def test_rendezvous_address_checked_before_connecting(
    env: Any, values: dict[str, Any], message: str
) -> None:
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, GROUP_RANK=1, **values)
    with pytest.raises(ValueError, match=message):
        init_distributed(ParallelConfig(), device="cpu")
    assert not dist.is_initialized()


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_device_follows_local_rank_not_global_rank(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Global rank 3 on the second of two 2-GPU nodes computes on cuda:1.  The missing
    # MASTER_ADDR stops init_distributed after the device is chosen, before any group.
    chosen = _fake_cuda(monkeypatch, count=2)
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, GROUP_RANK=1)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_distributed(ParallelConfig())
    assert chosen == [torch.device("cuda:1")]
    chosen.clear()
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_distributed(ParallelConfig(), device="cuda")
    assert chosen == [torch.device("cuda:1")]


def test_more_processes_than_gpus_on_a_node(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = _fake_cuda(monkeypatch, count=2)
    env(RANK=2, WORLD_SIZE=4, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4)
    with pytest.raises(ValueError, match=r"sees 2 CUDA device\(s\).*--nproc_per_node"):
        init_distributed(ParallelConfig())
    assert chosen == []


# ------------------------------------------------------- two one-process "nodes"


def _launch_two_nodes(tmp_path: Path, parallel: dict[str, Any]) -> list[dict[str, Any]]:
    """Start this file as a worker twice, with the environment ``torchrun --nnodes=2
    --nproc_per_node=1`` would give each node's process."""
    shared = tmp_path / "shared" / "checkpoints"
    port = w.free_port()
    base = w.worker_env()
    procs = []
    for node in range(2):
        env = {
            **base,
            "RANK": str(node),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(node),
            "GROUP_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        local = tmp_path / f"node{node}_local" / "checkpoints"
        cmd = [
            sys.executable,
            __file__,
            str(tmp_path),
            str(shared),
            str(local),
            json.dumps(parallel),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    w.wait_all(procs, "two-node worker")
    return [torch.load(tmp_path / f"result_{n}.pt", weights_only=False) for n in range(2)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("two_nodes")
    return tmp, _launch_two_nodes(tmp, {})


@pytest.mark.distributed
def test_two_nodes_dist_context(two_nodes: tuple[Path, list[dict[str, Any]]]) -> None:
    _tmp, results = two_nodes
    for node, result in enumerate(results):
        ctx = result["ctx"]
        assert ctx["rank"] == node  # global ranks differ
        assert ctx["world_size"] == 2
        assert ctx["local_rank"] == 0  # each node's only process
        assert ctx["local_world_size"] == 1
        assert ctx["node_rank"] == node
        assert ctx["is_main"] is (node == 0)  # one writer in the whole job
        assert ctx["device"] == "cpu"
        assert ctx["mesh"] == ["dp_shard"] and ctx["mesh_size"] == 2


@pytest.mark.distributed
def test_two_nodes_one_checkpoint_in_a_shared_folder(
    two_nodes: tuple[Path, list[dict[str, Any]]],
) -> None:
    tmp, results = two_nodes
    shared = tmp / "shared" / "checkpoints"
    assert sorted(p.name for p in shared.iterdir()) == ["step_000001"]
    step = shared / "step_000001"
    names = sorted(p.name for p in step.iterdir())
    # One DCP shard per rank, both ranks' own state, rank 0's trainer state and marker.
    assert [n for n in names if n.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]
    for name in (".metadata", "rank_00000.pt", "rank_00001.pt", "trainer_state.pt", "COMPLETE"):
        assert name in names
    assert json.loads((step / "COMPLETE").read_text())["world_size"] == 2
    for node, result in enumerate(results):
        assert result["saved_at"] == str(step)
        assert result["loaded_from"] == str(step)
        loaded = result["loaded"]
        assert (loaded["step"], loaded["world_size"]) == (1, 2)
        assert loaded["extra"] == {"node": node}  # each rank gets its own extra back
        # The second step changed the parameters; loading restored the saved ones.
        assert result["changed_after_save"]
        assert result["restored"]


@pytest.mark.distributed
def test_two_nodes_node_local_folders_fail_the_save_on_every_rank(
    two_nodes: tuple[Path, list[dict[str, Any]]],
) -> None:
    # What docs/multinode.md warns about: the same output path on node-local disks.
    # Node 1 cannot see the .tmp folder rank 0 created on node 0's disk, so the save
    # fails on both ranks before any shard is written, naming the folder (each rank by
    # its own path for it).
    tmp, results = two_nodes
    node0 = tmp / "node0_local" / "checkpoints"
    node1 = tmp / "node1_local" / "checkpoints"
    for node, result in enumerate(results):
        local = tmp / f"node{node}_local" / "checkpoints"
        error = result["local_error"]
        assert error is not None and error["type"] == "OSError"
        assert error["errno"] == errno.ENOENT
        message = error["message"]
        assert f"saving checkpoint {local / 'step_000002'} failed" in message
        assert f"rank 1 cannot see the folder {local / 'step_000002.tmp'}" in message
        assert "must be on a filesystem shared by all nodes" in error["message"]
        assert result["local_latest"] is None
    assert list(node0.iterdir()) == []  # rank 0 removed its .tmp folder
    assert not node1.exists()  # nothing written on node 1's disk


@pytest.mark.distributed
def test_two_nodes_hsdp_replicates_across_nodes(tmp_path: Path) -> None:
    # parallel.dp_replicate = nodes, dp_shard = processes per node (here 1): the
    # replicate dimension spans the nodes, each node holds a whole copy.
    results = _launch_two_nodes(tmp_path, {"dp_replicate": 2, "dp_shard": 1})
    for node, result in enumerate(results):
        ctx = result["ctx"]
        assert ctx["mesh"] == ["dp_replicate", "dp_shard"]
        assert ctx["mesh_shape"] == [2, 1]
        assert ctx["replicate_ranks"] == [0, 1]  # one replica per node
        assert ctx["shard_ranks"] == [node]  # sharding stays inside the node
        assert result["loaded"]["step"] == 1
        assert result["changed_after_save"] and result["restored"]


# ----------------------------------------------------------------------- worker
def _worker(outdir: Path, shared: Path, local: Path, parallel: dict[str, Any]) -> None:
    from vlm_parallel import CheckpointManager, barrier

    # Nothing but the environment the parent set says which node this is.
    job, ctx, model = w._setup(w.tiny_job_dict(parallel=parallel))
    optimizer = w._optimizer(model)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        pixels, ids = w.make_batch(4, job, gen)
        pixels = w.local_slice(pixels, ctx.rank, ctx.world_size)
        ids = w.local_slice(ids, ctx.rank, ctx.world_size)
        w.train_step(model, optimizer, pixels, ids, ctx)

    result: dict[str, Any] = {
        "ctx": {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "local_rank": ctx.local_rank,
            "local_world_size": ctx.local_world_size,
            "node_rank": ctx.node_rank,
            "is_main": ctx.is_main,
            "device": str(ctx.device),
            "mesh": None if ctx.mesh is None else list(ctx.mesh.mesh_dim_names or ()),
            "mesh_size": None if ctx.mesh is None else ctx.mesh.size(),
        }
    }
    if ctx.mesh is not None and ctx.mesh.ndim == 2:
        result["ctx"]["mesh_shape"] = list(ctx.mesh.shape)
        for dim in ("dp_replicate", "dp_shard"):
            group = ctx.mesh.get_group(dim)
            key = dim.removeprefix("dp_") + "_ranks"
            result["ctx"][key] = dist.get_process_group_ranks(group)
    step()
    manager = CheckpointManager(shared, keep_last=2)
    result["saved_at"] = str(manager.save(1, model, optimizer, extra={"node": ctx.node_rank}))
    at_save = w.full_params(model)
    step()
    after = w.full_params(model)
    result["changed_after_save"] = any(not torch.equal(at_save[k], after[k]) for k in at_save)
    path = manager.latest()
    assert path is not None
    result["loaded_from"] = str(path)
    result["loaded"] = manager.load(path, model, optimizer)
    restored = w.full_params(model)
    result["restored"] = all(torch.equal(at_save[k], restored[k]) for k in at_save)

    # Node-local disks: each process is given a folder only it sees.
    local_manager = CheckpointManager(local, keep_last=2)
    result["local_error"] = None
    try:
        local_manager.save(2, model, optimizer)
    except OSError as exc:
        result["local_error"] = {
            "type": type(exc).__name__,
            "errno": exc.errno,
            "message": str(exc),
        }
    barrier()
    latest = local_manager.latest()
    result["local_latest"] = None if latest is None else str(latest)
    torch.save(result, outdir / f"result_{ctx.rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(*(Path(arg) for arg in sys.argv[1:4]), json.loads(sys.argv[4]))
    from vlm_parallel import destroy_distributed

    destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as vlmp_workers: skip teardown racing gloo's threads
