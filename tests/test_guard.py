"""The non-finite guard on its own (util/engine/guard.py): the flags one rank raises, the verdict read from
every rank's row, and what a skipped step puts back and counts. The engine's use of it, in real runs, is
in test_faults.py and test_engine_networks.py."""

import pytest
import torch

from util.engine.guard import NonFiniteGuard

NAMES = ["x", "u", "total"]  # the step's terms, then their sum, as the engine names them


def parameters(*gradients):
    """Parameters holding the given gradients (None: no gradient)."""
    params = []
    for grad in gradients:
        p = torch.zeros(2, requires_grad=True)
        p.grad = None if grad is None else torch.tensor(grad)
        params.append(p)
    return params


def test_flags_mark_nonfinite_gradients_loss_values_and_a_stop_request():
    params = parameters([1.0, 2.0], None, [3.0, 4.0])
    guard = NonFiniteGuard(params, [], rank=0, world_size=1)
    finite = torch.tensor([0.5, 1.5, 2.0])
    assert guard.flags(finite).tolist() == [[0, 0, 0, 0, 0]]  # gradients, x, u, total, stop
    params[2].grad = torch.tensor([1.0, float("inf")])
    values = torch.tensor([0.5, float("nan"), float("nan")])
    assert guard.flags(values, stop_requested=True).tolist() == [[1, 0, 1, 1, 1]]
    params[2].grad = torch.tensor([float("nan"), 1.0])
    assert guard.flags(finite).tolist() == [[1, 0, 0, 0, 0]]


def test_flags_fill_the_row_of_their_own_rank():
    guard = NonFiniteGuard(parameters([1.0, 1.0]), [], rank=1, world_size=3)
    flags = guard.flags(torch.tensor([float("inf"), 1.0, float("inf")]))
    assert flags.tolist() == [[0] * 5, [0, 1, 0, 1, 0], [0] * 5]


def test_verdict_reads_every_ranks_row_and_names_the_term_not_the_sum():
    guard = NonFiniteGuard(parameters([1.0, 1.0]), [], rank=0, world_size=2)
    # rank 0: 'u' and the total are NaN; rank 1: only the total (finite terms whose sum overflowed), and
    # rank 1 asks to stop
    flags = [0, 0, 1, 1, 0] + [0, 0, 0, 1, 1]
    grad_bad, bad_terms, stop = guard.verdict(NAMES, flags)
    assert (grad_bad, bad_terms, stop) == (False, {"u": [0]}, True)
    grad_bad, bad_terms, stop = guard.verdict(NAMES, [0, 0, 0, 1, 0] + [0, 0, 0, 1, 0])
    assert (grad_bad, bad_terms, stop) == (False, {"total": [0, 1]}, False)
    assert guard.verdict(NAMES, [0] * 10) == (False, {}, False)


def test_gradient_verdict_takes_the_exact_check_when_the_fast_norm_overflows():
    """The L2 norm of huge but finite gradients overflows float32: the flag is raised, and the exact
    per-tensor check then lets the step through. A real Inf stays a fault."""
    params = parameters([1e30, 1e30])
    guard = NonFiniteGuard(params, [], rank=0, world_size=2)
    flags = guard.flags(torch.tensor([1.0, 1.0, 2.0]))
    assert flags[0, 0] == 1
    assert guard.verdict(NAMES, flags.flatten().tolist())[0] is False
    params[0].grad = torch.tensor([1.0, float("inf")])
    flags = guard.flags(torch.tensor([1.0, 1.0, 2.0]))
    assert guard.verdict(NAMES, flags.flatten().tolist())[0] is True
    # a flag raised on another rank (gradients are the same on every rank after DDP's all-reduce)
    assert guard.verdict(NAMES, [0] * 5 + [1, 0, 0, 0, 0])[0] is True


class Stateful:
    """A method's state as the guard sees it: shared state and this process's own."""

    def __init__(self):
        self.shared, self.own = torch.zeros(3), torch.zeros(2)

    def state_dict(self):
        return {"memory": self.shared}

    def load_state_dict(self, state):
        self.shared = state["memory"]

    def rank_state_dict(self):
        return {"batch": self.own}

    def load_rank_state_dict(self, state):
        self.own = state["batch"]


def test_a_skipped_step_puts_buffers_and_method_state_back_and_counts_the_streak():
    running_mean = torch.zeros(4)
    method = Stateful()
    guard = NonFiniteGuard([], [running_mean], rank=0, world_size=1)

    guard.before_step(method)
    running_mean.add_(1.0)  # the step's forward moves the statistics, its state moves in place
    method.shared.add_(2.0)
    method.own.add_(3.0)
    guard.skip(7, method, grad_bad=False, bad_terms={"u": [0, 1]}, is_main=True)
    assert torch.equal(running_mean, torch.zeros(4)), "BatchNorm statistics not put back"
    assert torch.equal(method.shared, torch.zeros(3)) and torch.equal(method.own, torch.zeros(2))
    assert (guard.streak, guard.steps, guard.first) == (1, 1, 7)
    assert guard.last == "loss term 'u' on rank 0, 1"

    guard.before_step(method)
    running_mean.add_(1.0)
    guard.skip(8, method, grad_bad=True, bad_terms={}, is_main=False)
    assert torch.equal(running_mean, torch.zeros(4))
    assert (guard.streak, guard.steps, guard.first, guard.last) == (2, 2, 7, "gradients")
    message = guard.message(9, "latest.pth", 6, limit=2)
    assert "2 optimizer steps in a row" in message and "iterations 7 to 8" in message
    assert "latest.pth (iteration 6)" in message

    # a good step keeps what it changed and ends the streak, not the count
    guard.before_step(method)
    running_mean.add_(1.0)
    method.shared.add_(2.0)
    guard.passed()
    assert (guard.streak, guard.steps) == (0, 2)
    assert torch.equal(running_mean, torch.ones(4)) and torch.equal(method.shared, torch.full((3,), 2.0))
    guard.before_step(method)
    guard.skip(12, method, grad_bad=True, bad_terms={}, is_main=False)
    assert (guard.streak, guard.steps, guard.first) == (1, 3, 12)
    assert torch.equal(running_mean, torch.ones(4)), "put back to the state before this step"


@pytest.mark.parametrize("world_size", [1, 2])
def test_flags_and_verdict_agree_on_the_layout(world_size):
    """What flags() writes, verdict() reads: each term's flag lands on its own name."""
    guard = NonFiniteGuard(parameters([1.0, 1.0]), [], rank=world_size - 1, world_size=world_size)
    for bad in range(len(NAMES) - 1):
        values = torch.ones(len(NAMES))
        values[bad] = float("nan")
        flags = guard.flags(values).flatten().tolist()
        assert guard.verdict(NAMES, flags) == (False, {NAMES[bad]: [world_size - 1]}, False)
