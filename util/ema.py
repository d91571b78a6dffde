"""EMA teachers: a network whose weights are an exponential moving average of a student's."""

import copy
from dataclasses import dataclass

import torch
from torch import nn


def _unzip(pairs: list[tuple]) -> tuple[list, list]:
    """[(ours, theirs), ...] -> ([ours, ...], [theirs, ...])."""
    return [ours for ours, _ in pairs], [theirs for _, theirs in pairs]


@dataclass
class PairedTensors:
    """A teacher's tensors next to its student's (ours first in each pair)."""

    student: nn.Module
    params: tuple[list, list]
    floats: tuple[list, list]  # floating-point buffers (BatchNorm statistics)
    counts: tuple[list, list]  # integer buffers (num_batches_tracked)


class EMATeacher(nn.Module):
    """theta_T <- alpha_t theta_T + (1 - alpha_t) theta_S with alpha_t = min(1 - 1/(t+1), decay), t the number
    of updates so far: the first update copies the student, and early updates follow it closely (the mean-
    teacher warm-up that CTT uses). `teacher(x)` runs the averaged network; `teacher.module` is that network.

    buffers='ema' averages BatchNorm running statistics the same way (integer buffers are copied);
    buffers='own' leaves them to the teacher's own train-mode forwards, as some released code does.

    Why not torch.optim.swa_utils.AveragedModel: its update tests `n_averaged == 0` on a device tensor (a
    host sync per step on a GPU), and without use_buffers it copies the student's BN statistics into the
    teacher, which is neither of the two behaviours above. The update count is plain state here.
    """

    def __init__(self, student: nn.Module, decay: float, buffers: str = "ema"):
        super().__init__()
        if buffers not in ("ema", "own"):
            raise ValueError(f"buffers must be 'ema' or 'own', got {buffers!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.decay = decay
        self.buffers_mode = buffers
        self.updates = 0
        self._pairs: PairedTensors | None = None  # made at the first update

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def alpha(self) -> float:
        return min(1.0 - 1.0 / (self.updates + 1), self.decay)

    def _paired_tensors(self, student: nn.Module) -> "PairedTensors":
        """Our parameters and buffers next to the student's, as lists for the foreach calls. Made once per
        student: walking two networks' modules costs about as much as averaging their weights on a CPU.
        Moving a network (.to, channels-last, SyncBN conversion) keeps its tensor objects, so the lists
        stay valid; they hold the tensors, not copies."""
        if self._pairs is None or self._pairs.student is not student:
            pairs = list(zip(self.module.buffers(), student.buffers()))
            self._pairs = PairedTensors(
                student,
                (list(self.module.parameters()), list(student.parameters())),
                _unzip([pair for pair in pairs if pair[0].is_floating_point()]),
                _unzip([pair for pair in pairs if not pair[0].is_floating_point()]),
            )
        return self._pairs

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        weight = 1.0 - self.alpha()  # lerp: T + w (S - T); w = 1 at the first update gives S exactly
        tensors = self._paired_tensors(student)
        torch._foreach_lerp_(*tensors.params, weight)
        if self.buffers_mode == "ema":
            if tensors.floats[0]:
                torch._foreach_lerp_(*tensors.floats, weight)
            if tensors.counts[0]:
                torch._foreach_copy_(*tensors.counts)
        self.updates += 1

    def get_extra_state(self) -> dict:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates = int(state["updates"])


def ema_teacher(student: nn.Module, decay: float, buffers: str = "ema") -> EMATeacher:
    """An EMA teacher of `student` (the plain module, not its DDP wrapper); call `teacher.update(student)`
    after each optimizer step that was taken (Method.after_optimizer_step)."""
    return EMATeacher(student, decay, buffers)
