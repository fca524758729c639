"""Muon across processes: each process orthogonalizes its share of the matrices, and the results are exchanged.

torch.optim.Muon has no distributed mode: under DDP every process orthogonalizes every matrix (the same Newton-Schulz
work N times), and under FSDP each process holds only a shard of each matrix it must orthogonalize whole.
DistributedMuon is torch.optim.Muon (a subclass: the same param groups, hyperparameters and state, "momentum_buffer"
per matrix) with one change, where the orthogonalization runs:

- Every process updates every momentum buffer (elementwise on the all-reduced gradient, or on its shard of it under
  FSDP): cheap, and it keeps the optimizer state what torch.optim.Muon's is, so accelerate's save_state/load_state
  and a resume with another process count (or with torch.optim.Muon itself) work unchanged.
- Each matrix has one owner process (`assign_owners`: largest first to the least-loaded process, from the shapes
  alone, so every process computes the same assignment), which orthogonalizes it with PyTorch's own function
  (`torch.optim._muon._zeropower_via_newtonschulz`, looked up at each call: optim.orthogonalize_in_fp32_on_cpu
  replaces it on CPUs).
- Plain tensors (DDP: the same matrix in every process): the owner broadcasts the orthogonalized update, and every
  process applies every update (weight decay, then the step) to its copy: the same operations on the same values.
- DTensors sharded along one mesh dimension (FSDP2's fully_shard, HSDP's shard dimension): the owner gathers the
  shards of the momentum-mixed update, orthogonalizes the whole matrix, and scatters the result; each process applies
  its shard of it to its shard of the weight. Gloo's gather and scatter need the same size from every process, so
  uneven shards (torch.chunk's split: FSDP2's) travel zero-padded.
- DTensors not sharded across processes (FSDP with one process) hold the whole matrix: orthogonalized in place.

The arithmetic per matrix is torch.optim.Muon's (_single_tensor_muon), operation for operation: with one process the
result is bit for bit torch.optim.Muon's, and with N processes each matrix gets exactly the update one process would
compute from the same gradient.

Written here because neither PyTorch (2.13) nor accelerate distributes Muon; the distributed Muons elsewhere (Dion's,
modded-nanogpt's) change the arithmetic (their own Newton-Schulz, learning-rate scaling and state layout).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr  # torch.optim.Muon's own, so the arithmetic stays its
from torch.optim.optimizer import _to_scalar

from ..base.errors import ConfigError

IN_FLIGHT = 4  # exchanges started before the oldest is waited for: overlap without holding every update at once


class _Matrix(NamedTuple):
    """One matrix of this step: its parameter, group, and this process's part of the update to orthogonalize."""

    param: torch.Tensor  # (rows, cols), or a DTensor of that global shape
    group: dict  # its param group: lr, weight_decay, ns_* ...
    update: torch.Tensor  # the momentum-mixed gradient: whole (rows, cols), or this process's shard of it
    layout: tuple  # ("whole",) | ("replicated", process group) | ("sharded", process group, tensor dim)


class _Pending(NamedTuple):
    """A matrix whose orthogonalized update is on its way to this process."""

    matrix: _Matrix
    result: torch.Tensor  # this process's part of the orthogonalized update (a shard: padded to the longest)
    works: list  # the collectives to wait for
    keep: list  # buffers the collectives still read
    shard: tuple | None = None  # (tensor dim, this process's length along it) under FSDP


class DistributedMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz work is split among the processes of `process_group` (default: the
    whole default group) for plain tensors, or of the mesh dimension DTensor parameters are sharded along."""

    def __init__(self, params, *, process_group=None, **muon_kwargs):
        super().__init__(params, **muon_kwargs)
        self.process_group = process_group
        self._ns_dtypes: dict = {}  # (dtype, device) -> the dtype the Newton-Schulz function returns

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = []
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)  # torch's: creates the momentum buffers, checks
            momentum = group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                if grad.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")
                grad, buffer = _local(grad), _local(buffer)  # elementwise: a shard's part is the whole's part
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                matrices.append(_Matrix(param, group, update, self._layout(param)))
        plan = exchange_plan(matrices)
        # Every gather first (FSDP): an owner then waits only for its own matrices' shards, and the processes
        # orthogonalize at the same time. Each process starts the same collectives in the same order.
        gathers = [self._gather(matrix, owner) for matrix, owner in plan]
        in_flight = deque()
        for (matrix, owner), gathered in zip(plan, gathers, strict=True):
            in_flight.append(self._start(matrix, owner, gathered))
            if len(in_flight) > IN_FLIGHT:
                _finish(in_flight.popleft())
        while in_flight:
            _finish(in_flight.popleft())
        return loss

    def _layout(self, param) -> tuple:
        """How `param` is laid out across processes (see _Matrix.layout)."""
        from torch.distributed.tensor import DTensor

        if not isinstance(param, DTensor):
            group = self.process_group
            if group is None and dist.is_initialized():
                group = dist.group.WORLD
            return ("replicated", group) if group is not None and dist.get_world_size(group) > 1 else ("whole",)
        mesh = param.device_mesh
        shards = [(i, p.dim) for i, p in enumerate(param.placements) if p.is_shard() and mesh.size(i) > 1]
        if len(shards) > 1 or any(p.is_partial() for p in param.placements):
            raise ConfigError(
                f"optimizer=muon: a weight is laid out as {param.placements} over a {tuple(mesh.shape)} device "
                "mesh; Muon orthogonalizes weights sharded along one mesh dimension only (FSDP2, HSDP). "
                "Use that layout, or --optimizer adamw."
            )
        if not shards:
            return ("whole",)
        mesh_dim, tensor_dim = shards[0]
        return ("sharded", mesh.get_group(mesh_dim), tensor_dim)

    def _gather(self, matrix: _Matrix, owner: int):
        """Start gathering a sharded matrix's update in its owner: (work, the owner's [shard of each process], the
        shard sent: kept until the work is done); else None. Shards travel padded to the first (the longest)."""
        if matrix.layout[0] != "sharded":
            return None
        _, pg, dim = matrix.layout
        sizes = shard_sizes(matrix.param.shape[dim], dist.get_world_size(pg))
        me = dist.get_rank(pg)
        if matrix.update.size(dim) != sizes[me]:  # not torch.chunk's split: a layout this code does not know
            raise RuntimeError(f"a shard of {matrix.update.size(dim)} along dim {dim}; expected {sizes[me]} ({sizes})")
        shard = _pad(matrix.update, dim, sizes[0])
        pieces = [torch.empty_like(shard) for _ in sizes] if me == owner else None
        return dist.gather(shard, pieces, group_dst=owner, group=pg, async_op=True), pieces, shard

    def _start(self, matrix: _Matrix, owner: int, gathered) -> _Pending:
        """Orthogonalize `matrix` if this process owns it, and start sending the result to the others."""
        group = matrix.group
        orthogonalize = torch.optim._muon._zeropower_via_newtonschulz  # at call time: the CPU may have replaced it
        args = group["ns_coefficients"], group["ns_steps"], group["eps"]
        kind, *where = matrix.layout
        if kind == "whole":
            return _Pending(matrix, orthogonalize(matrix.update, *args), [], [])
        pg, me = where[0], dist.get_rank(where[0])
        out_dtype = self._ns_dtype(matrix.update)
        if kind == "replicated":  # (rows, cols) in every process: the owner's result to all
            if me == owner:
                result = orthogonalize(matrix.update, *args).contiguous()
            else:
                result = torch.empty(matrix.param.shape, dtype=out_dtype, device=matrix.update.device)
            return _Pending(matrix, result, [dist.broadcast(result, group_src=owner, group=pg, async_op=True)], [])
        dim = where[1]
        sizes = shard_sizes(matrix.param.shape[dim], dist.get_world_size(pg))
        gather, pieces, sent = gathered
        out_pieces = None
        if me == owner:
            gather.wait()
            whole = torch.cat([p.narrow(dim, 0, size) for p, size in zip(pieces, sizes, strict=True)], dim)
            result = orthogonalize(whole, *args)  # (rows, cols)
            out_pieces = [_pad(part, dim, sizes[0]) for part in result.split(sizes, dim)]
        shape = list(matrix.param.shape)
        shape[dim] = sizes[0]
        received = torch.empty(shape, dtype=out_dtype, device=matrix.update.device)
        scatter = dist.scatter(received, out_pieces, group_src=owner, group=pg, async_op=True)
        return _Pending(matrix, received, [gather, scatter], [sent, out_pieces], (dim, sizes[me]))

    def _ns_dtype(self, update: torch.Tensor) -> torch.dtype:
        """The dtype the Newton-Schulz function returns for `update`'s (PyTorch's: bfloat16; the CPU's fp32 one: the
        input's): what non-owners receive. Asked of the function itself on a 2 x 2 matrix, once per dtype."""
        key = (update.dtype, update.device)
        if key not in self._ns_dtypes:
            probe = torch.eye(2, dtype=update.dtype, device=update.device)
            self._ns_dtypes[key] = torch.optim._muon._zeropower_via_newtonschulz(probe, (1.0, 0.0, 0.0), 1, 1e-7).dtype
        return self._ns_dtypes[key]


def _finish(pending: _Pending) -> None:
    """Wait for this process's part of the orthogonalized update and apply it as torch.optim.Muon does: decoupled
    weight decay, then the step at the LR adjusted for the whole matrix's shape."""
    for work in pending.works:
        work.wait()
    matrix, result = pending.matrix, pending.result
    if pending.shard is not None:
        dim, size = pending.shard
        result = result.narrow(dim, 0, size)  # the padding off
    group = matrix.group
    lr = _to_scalar(group["lr"])
    adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], matrix.param.shape)
    param = _local(matrix.param)
    param.mul_(1 - lr * group["weight_decay"])
    param.add_(result, alpha=-adjusted_lr)


def exchange_plan(matrices: list) -> list[tuple]:
    """[(matrix, its owner's rank in its process group)] in the order every process exchanges them: largest first
    (the longest orthogonalizations start first), list order among equals. Shapes and order are the same in every
    process, and so is the plan."""
    cost = [newton_schulz_cost(m.param.shape) for m in matrices]
    order = sorted(range(len(matrices)), key=lambda i: (-cost[i], i))
    by_group: dict = {}  # process group -> the indices of its matrices, in exchange order
    for i in order:
        if matrices[i].layout[0] != "whole":
            by_group.setdefault(matrices[i].layout[1], []).append(i)
    owners = {}
    for pg, indices in by_group.items():
        owners.update(zip(indices, assign_owners([cost[i] for i in indices], dist.get_world_size(pg)), strict=True))
    return [(matrices[i], owners.get(i, 0)) for i in order]


def assign_owners(costs: list[int], world: int) -> list[int]:
    """The owner (0 .. world - 1) of each matrix, given its cost: largest first, each to the least-loaded process so
    far (ties: the lowest rank). Greedy largest-first is within 4/3 of the best balance."""
    loads, owners = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(world), key=lambda rank: (loads[rank], rank))
        loads[owners[i]] += costs[i]
    return owners


def newton_schulz_cost(shape) -> int:
    """Multiply-adds of one Newton-Schulz iteration on a (rows, cols) matrix X, short side s, long side l: the Gram
    matrix X X^T (s^2 l), its square (s^3), and the product with X (s^2 l)."""
    short, long = sorted(shape)
    return 2 * short * short * long + short**3


def shard_sizes(length: int, n: int) -> list[int]:
    """How DTensor's Shard splits `length` rows among `n` processes (torch.chunk: ceil(length / n) each, the last
    ones shorter or empty)."""
    chunk = -(-length // n)
    return [max(0, min(chunk, length - rank * chunk)) for rank in range(n)]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (the same storage: in-place changes reach the DTensor), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`tensor` contiguous, zero-padded along `dim` to `size`."""
    if tensor.size(dim) == size:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = size
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, tensor.size(dim)).copy_(tensor)
    return out
