"""How many chains of a component run at once, from a memory budget.

Chains are independent, so they can be advanced in chunks: a chunk runs all its steps, then
the next chunk starts. Each chain's batch order and noise are fixed before any chunk runs
(:func:`~slt_callbacks.core.chains.run_chains`), so chunking changes the memory, never the
numbers.

A chunk's chains exist only while it runs (what survives is their loss traces), so the peak is
the largest chunk's, on top of the shared w* and the pool. Per chain, a chunk holds its
coordinates, its gradient buffer and autograd's gradients (3·d_k numbers), the rebuilt
copies of partly-owned parameters and their gradients, and the activations of its forward
pass, measured once by counting the tensors autograd saves for one chain's forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .backends import SamplingProblem, autocast_context
from .space import ComponentSpace

AUTO_FRACTION = 0.8
"""Share of the free memory that ``max_memory="auto"`` lets the chains use."""

Chunk = tuple[int, int, int]
"""``(component, first chain, last chain + 1)``."""


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the CUDA allocator's view, or ``MemAvailable`` of
    ``/proc/meminfo`` on a CPU (0 where neither can be read, which means one chain per
    chunk)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def activation_bytes(problem: SamplingProblem, space: ComponentSpace) -> int:
    """Bytes autograd keeps for one chain's forward on the pool's largest batch, doubled
    for the gradients of those activations during the backward."""
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    pool = problem.pool
    sizes = [sum(leaf[0].numel() for leaf in g.leaves) for g in pool.groups]
    largest = pool.groups[sizes.index(max(sizes))].members[0]
    leaves = space.leaves(space.theta0.clone())
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        autocast_context(space.theta0.device, problem.autocast),
    ):
        problem.loss(space.tensors(leaves), pool.tensor_leaves(largest))
    return 2 * sum(saved.values())


def plan_chunks(
    problem: SamplingProblem,
    spaces: Sequence[ComponentSpace],
    num_chains: int,
    max_memory: int | str | None,
) -> list[Chunk]:
    """Chunks of chains per component, each within ``max_memory`` bytes (None: one chunk
    per component; ``"auto"``: a share of the free memory)."""
    if max_memory is None:
        return [(k, 0, num_chains) for k in range(len(spaces))]
    itemsize = spaces[0].theta0.element_size()
    if max_memory == "auto":
        budget = int(AUTO_FRACTION * free_memory(spaces[0].theta0.device))
    else:
        budget = int(max_memory)
    activations = activation_bytes(problem, spaces[0])  # the whole model: an upper bound
    chunks: list[Chunk] = []
    too_small = False
    for k, space in enumerate(spaces):
        per_chain = itemsize * (3 * space.size + 2 * space.scattered_numel) + activations
        size = min(num_chains, max(1, budget // per_chain))
        too_small |= budget < per_chain
        chunks += [(k, a, min(a + size, num_chains)) for a in range(0, num_chains, size)]
    if too_small:
        warnings.warn(
            f"SGLDConfig(max_memory={max_memory!r}): one chain of the whole model needs "
            f"about {(itemsize * 3 * spaces[0].size + activations) / 2**20:.0f} MiB, which "
            "does not fit; running one chain at a time anyway.",
            stacklevel=4,
        )
    return chunks
