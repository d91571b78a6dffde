"""The non-finite guard: a step whose loss or gradient holds a NaN or an Inf is skipped on every rank alike.

Before each step it keeps a copy of every network's buffers (BatchNorm running statistics) and of the
method's state; a skipped step puts both back and leaves weights and optimizer state untouched. Checking
costs one fused norm over the gradients and one all-reduce of a few flags, read in the step's one host sync.
The same all-reduce carries each rank's request to stop (a signal, util.engine.stop), so that the ranks agree
on stopping at no extra cost.
"""

import logging

import torch

from util.dist import is_dist

logger = logging.getLogger("semiseg")


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def clone_tensors(state):
    """A copy of a (nested) state dict whose tensors do not share memory with the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: clone_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_tensors(v) for v in state)
    return state


class NonFiniteGuard:
    def __init__(self, params: list, buffers: list, rank: int, world_size: int):
        self.params = params  # what the gradient check looks at
        self.buffers = buffers
        self.buffer_backup = [b.detach().clone() for b in buffers]
        self.method_backup = None
        self.rank, self.world_size = rank, world_size
        self.steps = 0  # skipped steps in all
        self.streak = 0  # skipped steps in a row
        self.first = 0  # the first iteration of the current streak
        self.last = ""  # what was non-finite in the last skipped step

    def before_step(self, method) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffer_backup, self.buffers)
        # What the method carries may change inside its step: keep a copy to put back on a skip.
        self.method_backup = clone_tensors((method.state_dict(), method.rank_state_dict()))

    def flags(self, values: torch.Tensor, stop_requested: bool = False) -> torch.Tensor:
        """(world_size, 2 + len(values)) 0/1 flags: gradients, each loss value, a stop request, per rank.

        The L2 norms of all gradients in one fused kernel (NaN and Inf make them non-finite; so does a
        norm beyond float32's range, which gradients_nonfinite then tells apart), and one all_reduce
        so that every rank sees every rank's flags and they all take the same decision.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_bad = torch.zeros((), device=values.device)
        if grads:
            norms = torch.stack(torch._foreach_norm(grads, 2))
            grad_bad = (~torch.isfinite(norms)).any().float()
        stop = torch.full((1,), float(stop_requested), device=values.device)
        own = torch.cat((grad_bad.reshape(1), (~torch.isfinite(values)).float(), stop))
        flags = torch.zeros(self.world_size, own.numel(), device=values.device)
        flags[self.rank] = own
        if is_dist():
            torch.distributed.all_reduce(flags)
        return flags

    def gradients_nonfinite(self) -> bool:
        """The exact test, run only when the norms overflowed: does any gradient hold a NaN or an Inf?

        Gradients are identical on every rank after DDP's all-reduce, so every rank gets the same answer
        without talking to the others. (The inf-norm would be exact at once, but on CPUs it is ten times
        slower than the L2 norm.)
        """
        return any(not torch.isfinite(p.grad).all() for p in self.params if p.grad is not None)

    def verdict(self, names: list[str], flags: list[float]) -> tuple[bool, dict, bool]:
        """(gradients non-finite, {term: ranks where it is non-finite}, some rank asked to stop) from the
        flags as numbers."""
        width = len(names)
        rows = [flags[r * (width + 2) : (r + 1) * (width + 2)] for r in range(self.world_size)]
        grad_bad = any(row[0] for row in rows) and self.gradients_nonfinite()
        bad_terms = {
            names[j]: [r for r, row in enumerate(rows) if row[1 + j]]
            for j in range(width)
            if any(row[1 + j] for row in rows)
        }
        if len(bad_terms) > 1:  # the sum is non-finite because a term is: name the term
            bad_terms.pop("total", None)
        return grad_bad, bad_terms, any(row[-1] for row in rows)

    def passed(self) -> None:
        self.streak = 0

    def skip(self, iteration: int, method, grad_bad: bool, bad_terms: dict, is_main: bool) -> None:
        """Put buffers and method state back; count and report the skipped step."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.buffer_backup)
        shared, own = self.method_backup
        method.load_state_dict(shared)
        method.load_rank_state_dict(own)
        parts = [
            f"loss term '{name}' on rank {', '.join(map(str, ranks))}" for name, ranks in bad_terms.items()
        ]
        if grad_bad:
            parts.append("gradients")
        self.last = " and ".join(parts)
        if self.streak == 0:
            self.first = iteration
        self.streak += 1
        self.steps += 1
        if is_main:  # every rank knows the same: one message
            logger.warning(
                f"iteration {iteration}: non-finite {self.last}; optimizer step skipped "
                f"({self.streak} in a row, {self.steps} in all)"
            )

    def message(self, iteration: int, latest: str | None, saved_iteration: int | None, limit: int) -> str:
        kept = ""
        if latest and saved_iteration is not None:
            kept = f" {latest} (iteration {saved_iteration}) holds the last good state and was kept."
        return (
            f"stopped: {self.streak} optimizer steps in a row had non-finite values "
            f"(iterations {self.first} to {iteration - 1}; at iteration {iteration - 1}: {self.last}). "
            f"The weights are those from before iteration {self.first}.{kept} Lower lr, try amp=none or "
            f"check the data; max_nonfinite_steps (now {limit}) sets how many in a row are tolerated."
        )
