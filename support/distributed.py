"""
Many processes under torchrun: data parallelism, in a few named helpers.

    torchrun --standalone --nproc_per_node 2 train_sft.py ...      # 2 processes: 2 GPUs (NCCL) or a CPU (gloo)

Each process (a rank) holds the whole model and takes its share of every global batch; after the backward
pass the ranks add up their gradients (an all-reduce), so that every rank takes the same optimizer step
and the weights stay the same everywhere. This is what DistributedDataParallel does, written out as one
call after backward: every path to the weights is covered, the fused log-prob head's too, and DDP's
overlap of the all-reduce with the backward pass is what it gives up. Rank 0 alone prints and writes.

A loss that is a mean over the global batch stays one: each rank divides its sum by the global count
(share_weight), and the all-reduce adds the ranks' parts. Without torchrun there is one rank, and every
helper here returns its input or does nothing.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

from support.errors import UsageError

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
_device = torch.device("cpu")  # where the collectives' tensors live: this rank's GPU under NCCL


def is_main():
    """True on the rank that prints and writes (the only one without torchrun)."""
    return RANK == 0


def check_splits(cfg, *flags):
    """Every flag named (a global batch) splits evenly across the ranks: checked with the other flags,
    before any work, identically on every rank (each exits with the same one-line error)."""
    for name in flags:
        value = getattr(cfg, name)
        if value % WORLD:
            raise UsageError(f"--{name} {value} does not split across {WORLD} processes; use a multiple of {WORLD}, "
                             "or another --nproc_per_node")


def setup(device):
    """Join the other ranks (NCCL on GPUs, gloo on a CPU) and return this rank's device; on the ranks that
    do not write, silence stdout and warnings (rank 0 says everything once)."""
    global _device
    if WORLD == 1:
        return device
    if device.type == "cuda":
        device = _device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                            else None)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    return device


def finish(code):
    """End a run under torchrun: on success, wait for every rank and leave the group; then end the process
    at once with code. Python's own teardown would come after the group's threads, and sometimes abort
    on them (exit -6); after an error the other ranks may be inside a collective, so this rank leaves
    without waiting, and torchrun stops them."""
    if not dist.is_initialized():
        return
    if code == 0:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def share(items):
    """This rank's share of a global batch (a list, or a tensor's rows): every WORLD-th item from RANK."""
    return items[RANK::WORLD]


def sync_gradients(model, bucket_bytes=25 * 2**20):
    """Add every rank's gradient into every rank's (a parameter without one counts as zeros): after this,
    each rank holds the gradient of the global batch's loss. The gradients travel flattened into buckets
    of about 25 MB, as DDP's do: one all-reduce per tensor would pay a network round trip for each."""
    if WORLD == 1:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    buckets = [[]]
    for g in grads:
        if buckets[-1] and sum(x.nbytes for x in buckets[-1]) + g.nbytes > bucket_bytes:
            buckets.append([])
        buckets[-1].append(g)
    for bucket in buckets:
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def sum_over_ranks(x):
    """A tensor summed over the ranks (a copy; the same tensor without torchrun)."""
    if WORLD == 1:
        return x
    y = x.to(_device, copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def mean_over_ranks(value):
    """The mean of a number over the ranks, each rank's counting the same (the number itself alone)."""
    if WORLD == 1:
        return value
    return sum_over_ranks(torch.tensor(value, dtype=torch.float64)).item() / WORLD


def share_weight(n_local):
    """n_local / (n summed over the ranks): the weight of this rank's mean in the global mean (1.0 alone)."""
    if WORLD == 1:
        return 1.0
    n = torch.as_tensor(n_local, dtype=torch.float64)
    return (n / sum_over_ranks(n)).item()


def masked_mean(x, mask):
    """The mean of x over the masked entries of every rank's x: their sum over their count."""
    total = sum_over_ranks(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1]


def gather(parts):
    """The results of share(items) from every rank, back in the order of items (a list on every rank)."""
    if WORLD == 1:
        return list(parts)
    every = [None] * WORLD
    dist.all_gather_object(every, list(parts))
    return [every[i % WORLD][i // WORLD] for i in range(sum(map(len, every)))]


def smallest(n):
    """The smallest of an integer over the ranks (e.g. rows that fit in every GPU's memory)."""
    if WORLD == 1:
        return n
    x = torch.tensor(n, dtype=torch.float64, device=_device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())
