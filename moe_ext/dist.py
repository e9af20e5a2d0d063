"""torch.distributed setup from values the launcher passes in (modules never read os.environ),
and this process's peak memory, which every launcher and benchmark reports per rank."""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError


class DistEnvError(MoeExtError):
    """Inconsistent launcher variables or devices; the message names the fix."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: Optional[int] = None  # ranks on this node; None: all (one node)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.local_world_size is None:
            object.__setattr__(self, "local_world_size", self.world_size)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "DistEnv":
        """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT) from the mapping the launcher passes (os.environ);
        without them: one process."""

        def get_int(name: str, default: int) -> int:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError as err:
                raise DistEnvError(
                    f"{name}={raw!r} is not an integer; launch with torchrun "
                    f"or set {name} to an integer"
                ) from err

        world = get_int("WORLD_SIZE", 1)
        rank = get_int("RANK", 0)
        local_rank = get_int("LOCAL_RANK", rank)
        local_world = get_int("LOCAL_WORLD_SIZE", world)
        env = cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=environ.get("MASTER_ADDR") or cls.master_addr,
            master_port=get_int("MASTER_PORT", cls.master_port),
        )
        if world < 1 or not 0 <= rank < world:
            raise DistEnvError(
                f"RANK={rank} is outside WORLD_SIZE={world}; launch with "
                f"torchrun --nproc-per-node N"
            )
        if local_world < 1 or not 0 <= local_rank < local_world or local_world > world:
            raise DistEnvError(
                f"LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world} do "
                f"not fit WORLD_SIZE={world}; launch with torchrun"
            )
        return env

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(env: DistEnv, device_type: str, timeout_s: float) -> torch.device:
    """Initialise the default process group (gloo on CPU, NCCL on CUDA bound to
    ``cuda:local_rank``) and return this rank's device. A single process gets a process
    group too, so code paths are the same at every world size."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type={device_type!r}; use 'cpu' or 'cuda'")  # a caller's bug
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DistEnvError("device=cuda but CUDA is not available; use device=cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise DistEnvError(
                f"LOCAL_RANK={env.local_rank} but only "
                f"{torch.cuda.device_count()} GPUs are visible; launch at most "
                f"{torch.cuda.device_count()} processes per node"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(
                f"torch.distributed already initialised as rank "
                f"{dist.get_rank()}/{dist.get_world_size()}, not "
                f"{env.rank}/{env.world_size}; call destroy() first"
            )
        return device
    timeout = timedelta(seconds=timeout_s)
    if env.world_size == 1:
        # one process needs no rendezvous; an in-memory store cannot collide on a port
        rendezvous = dict(store=dist.HashStore())
    else:
        rendezvous = dict(init_method=f"tcp://{env.master_addr}:{env.master_port}")
    extra = dict(device_id=device) if device_type == "cuda" else {}
    dist.init_process_group(
        backend_for(device_type),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        **rendezvous,
        **extra,
    )
    return device


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def destroy() -> None:
    """Tear the default process group (and every subgroup) down; a no-op when not set up."""
    if dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory on ``device``: bytes the CUDA allocator held at most, or on
    CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)  # sync: reads the allocator
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
