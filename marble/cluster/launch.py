"""How the pipeline's train task starts training, decided from the config's `pipeline:` section.

- one process (`pipeline.gpus <= 1`, one node): `marble.stages.train` inside the task;
- one node, N GPUs: the task runs `accelerate launch --multi_gpu --num_processes N` of the same
  `marble train`, inside its own container;
- several nodes: the task creates a PyTorchJob (`marble.cluster.pytorchjob`) whose every replica runs
  `torchrun` of the same `marble train` (the training operator sets the PET_* rendezvous variables).

The plan is compiled into the pipeline as the train task's `launch` parameter, so the compiled spec
shows the distributed launch; the task re-checks the process count against the run's config before
anything starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from marble.cluster.layout import layout_problem, valid_process_counts
from marble.errors import MarbleError

LaunchKind = Literal["process", "accelerate", "pytorchjob"]


class LaunchError(MarbleError):
    """Training cannot be launched as planned (layout, missing PVC, a failed launcher)."""


@dataclass(frozen=True)
class LaunchPlan:
    kind: LaunchKind
    nodes: int
    procs_per_node: int
    command: list[str]
    """The launcher argv that precedes `-m marble.cli train ...` (empty: in-process)."""
    image: str = ""
    """Image of the PyTorchJob replicas (the pipeline's CUDA image); only for kind=pytorchjob."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchPlan:
        """From the task parameter (protobuf Struct numbers arrive as floats)."""
        return cls(
            kind=data["kind"],
            nodes=int(data["nodes"]),
            procs_per_node=int(data["procs_per_node"]),
            command=[str(c) for c in data["command"]],
            image=str(data.get("image", "")),
        )

    def train_argv(
        self,
        config: str,
        prompts: str,
        reward_cache: str | None,
        out: str,
        reward_cache_sha256: str | None = None,
    ) -> list[str]:
        """The full command of one launch of `marble train` (for kind=process: the plain CLI)."""
        args = ["-m", "marble.cli", "train", "--config", config, "--prompts", prompts, "--out", out]
        if reward_cache:
            args += ["--reward-cache", reward_cache]
        if reward_cache_sha256:
            args += ["--reward-cache-sha256", reward_cache_sha256]
        return [*(self.command or ["python3"]), *args]


def accelerate_command(procs: int, mixed_precision: str) -> list[str]:
    """Single-node multi-GPU launch: one process per GPU, NCCL, no dynamo."""
    return [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
    ]  # fmt: skip


def torchrun_command(rendezvous_timeout_s: int) -> list[str]:
    """Per-replica launch in a PyTorchJob: torchrun reads PET_NNODES / PET_NPROC_PER_NODE /
    PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT from the training operator; the static rendezvous
    waits up to `rendezvous_timeout_s` for every node (slow image pulls, GPU nodes scaling up)."""
    return ["torchrun", "--rdzv-conf", f"timeout={rendezvous_timeout_s}"]


def plan_launch(cfg: Any, image: str = "") -> LaunchPlan:
    """The launch of `cfg` (a MarbleConfig); refuses a process count that cannot split the epoch."""
    p = cfg.pipeline
    check_world_size(cfg, p.nodes, p.procs_per_node)
    if p.nodes > 1:
        return LaunchPlan(
            "pytorchjob", p.nodes, p.procs_per_node, torchrun_command(p.rendezvous_timeout_s), image
        )
    if p.procs_per_node > 1:
        command = accelerate_command(p.procs_per_node, cfg.train.mixed_precision)
        return LaunchPlan("accelerate", 1, p.procs_per_node, command)
    return LaunchPlan("process", 1, 1, [])


def check_world_size(cfg: Any, nodes: int, procs_per_node: int) -> None:
    world = nodes * procs_per_node
    problem = layout_problem(cfg, world)
    if problem:
        raise LaunchError(
            f"{nodes} node(s) x {procs_per_node} process(es) = {world} training processes cannot split an "
            f"epoch: {problem}. Valid process counts: {', '.join(map(str, valid_process_counts(cfg)))}"
        )
