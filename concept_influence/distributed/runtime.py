"""The sharded model: ``fully_shard`` each decoder block, then the root (FSDP2, parameters become ``DTensor``s
sharded over ``torch.distributed``'s default group), and what keeps the ranks' collectives in step.

Under FSDP every forward and backward is a collective: every rank must run the same number of them, in the same
order. Drivers that split rows between ranks therefore pad their share with extra batches whose results they
drop (``max_over_ranks`` gives the count to reach).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

SHARD_CHOICES = ("none", "fsdp")
Shard = Literal["none", "fsdp"]


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of ``torch.distributed`` (``(0, 1)`` when it is not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (the model was wrapped with ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def sharded_world(model: nn.Module) -> int:
    """The number of processes the model's parameters are sharded over (1: not sharded)."""
    if not is_sharded(model):
        return 1
    return dist_info()[1]


def shard_model(model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
    """Wrap ``model`` with FSDP2: ``fully_shard`` on each of ``blocks`` (the decoder blocks), then on the root.
    Needs ``torch.distributed`` initialised (``torchrun``); a model already sharded is returned as is. Each block's
    parameters are gathered for its forward and backward only (``reshard_after_forward``); the capture hooks then
    see its full inputs and output gradients. Returns the model (wrapped in place)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "shard='fsdp' (--fsdp) needs torch.distributed: run the command under torchrun "
            "(torchrun --nproc_per_node N -m concept_influence.cli ...)"
        )
    if is_sharded(model):
        return model
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over the ranks (``value`` itself in one process): how many batches every rank runs."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def n_batches(n_rows: int, batch_size: int) -> int:
    return (int(n_rows) + batch_size - 1) // batch_size


def local_shard(param: Any) -> torch.Tensor:
    """A parameter's own rows on this rank (a ``DTensor``'s local shard, else the tensor itself)."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def ensure_process_group() -> None:
    """Initialise ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
    when it is not yet: NCCL with one GPU per local rank where CUDA is available, else gloo. Outside torchrun (no
    ``WORLD_SIZE``) an error naming torchrun."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(
            "shard='fsdp' (--fsdp) needs several processes: run under torchrun "
            "(torchrun --nproc_per_node N -m concept_influence.cli ...) or initialise torch.distributed first"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shard_device() -> str | None:
    """Where a model sharded here should live: this process's GPU under torchrun with CUDA, else ``None``."""
    import os

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; ``obj`` itself in one process)."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def in_step(model: nn.Module) -> bool:
    """Whether ``model`` is sharded over several processes: then every rank must run the same forwards (one reads
    or writes a shared file, the others get what it read)."""
    return dist_info()[1] > 1 and is_sharded(model)


_GROUPS: dict[str, Any] = {}


def side_group() -> Any:
    """A process group of its own for the library's collectives inside the model's backward (the owners' bases, the
    query vectors): FSDP's own all-gathers and reduce-scatters run on the default group then, and two streams of
    collectives on one group could be matched in different orders on different ranks. Created once, collectively:
    call it on every rank before the first backward that uses it."""
    import torch.distributed as dist

    if "side" not in _GROUPS:
        _GROUPS["side"] = dist.new_group(backend=dist.get_backend())
    return _GROUPS["side"]
