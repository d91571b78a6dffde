"""The engine with methods that declare several networks: a toy two-student, two-EMA-teacher method
(tests/two_students.py) trained, killed, resumed and evaluated; EMA teachers; the Networks declaration."""

import json
import sys

import pytest
import torch
from torch import nn

from tests.test_training import run
from tests.two_students import TwoStudents
from util.config import load_config
from util.ema import ema_teacher
from util.engine import Networks, Trainer

SCRIPT = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "tests/run_training.py",
]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def weights_of(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if k != "_extra_state"}


def test_two_students_under_torchrun_resume_bit_identically_and_evaluate_each(tiny_config, tmp_path):
    straight, killed, dump = tmp_path / "straight", tmp_path / "killed", tmp_path / "dump"
    method = ["tests.two_students", "--config", tiny_config]
    run([*SCRIPT, *method, "--save-path", str(straight), "--dump-weights", str(dump)])
    # rank 1 is SIGKILLed before iteration 5 (the last checkpoint is iteration 4); the same command resumes
    run([*SCRIPT, *method, "--save-path", str(killed), "--kill-at", "5", "--kill-rank", "1"], expect=1)
    assert load(killed / "latest.pth")["iteration"] == 4
    log = run([*SCRIPT, *method, "--save-path", str(killed)])
    assert "at iteration 4/6" in log

    a, b = load(straight / "latest.pth"), load(killed / "latest.pth")
    assert sorted(a["networks"]) == ["student_a", "student_b", "teacher_a", "teacher_b"]
    assert same(a["networks"], b["networks"]), "the resumed run ended with other weights"
    assert same(a["method"], b["method"]) and int(a["method"]["label_counts"].sum()) > 0
    assert a["networks"]["teacher_a"]["_extra_state"] == {"updates": 6}
    # the two ranks hold the same four networks
    r0, r1 = load(dump / "rank0.pt"), load(dump / "rank1.pt")
    assert len(r0) == sum(len(v) for v in a["networks"].values()) and same(r0, r1)
    # the students learned differently, and each teacher follows its own student
    sa, sb = a["networks"]["student_a"], a["networks"]["student_b"]
    assert not torch.equal(sa["classifier.weight"], sb["classifier.weight"])
    assert not torch.equal(a["networks"]["teacher_a"]["module.classifier.weight"], sa["classifier.weight"])

    # every network is evaluated; best.pth holds the better teacher, loadable by eval.py as a plain model
    rows = [json.loads(line) for line in (straight / "evals.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["network"]) for r in rows] == [
        (it, name) for it in (3, 6) for name in ("student_a", "student_b", "teacher_a", "teacher_b")
    ]
    best = load(straight / "best.pth")
    teachers = {r["network"]: r["miou"] for r in rows if r["network"].startswith("teacher")}
    assert best["network"] in ("teacher_a", "teacher_b")
    assert best["miou"] == max(teachers.values())
    assert "classifier.weight" in best["model"]
    out = run(
        [sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(straight / "best.pth")]
    )
    assert f"network '{best['network']}'" in out and f"{best['miou']:.2f}" in out


def test_a_skipped_step_leaves_both_teachers_and_the_method_state_untouched(tiny_config):
    trainer = Trainer(TwoStudents, load_config(tiny_config, ["max_iters=3"]), None)
    batches = trainer.batches(0, 0)
    trainer.train_step(next(batches))  # a good step: the teachers take their first update
    teachers = {name: weights_of(trainer.networks.all[name]) for name in ("teacher_a", "teacher_b")}
    counts = trainer.method.label_counts.clone()
    step = trainer.method.step

    def poisoned(batch):
        losses, stats = step(batch)
        losses["u_b"] = losses["u_b"] * float("nan")
        return losses, stats

    trainer.method.step = poisoned
    trainer.train_step(next(batches))
    assert trainer.guard.steps == 1 and "u_b" in trainer.guard.last
    for name, before in teachers.items():
        teacher = trainer.networks.all[name]
        assert teacher.updates == 1, "a skipped step must not update an EMA teacher"
        assert same(before, weights_of(teacher))
    assert torch.equal(trainer.method.label_counts, counts), "the method state must be put back"
    trainer.method.step = step
    trainer.train_step(next(batches))
    assert trainer.networks.all["teacher_a"].updates == 2
    assert not torch.equal(trainer.method.label_counts, counts)


def test_teachers_get_no_gradient_and_students_their_own():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = ema_teacher(student, 0.99)
    loss = student(torch.randn(2, 3, 4, 4)).sum() + teacher(torch.randn(2, 3, 4, 4)).sum()
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_ema_teacher_follows_the_warm_up_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    teacher = ema_teacher(student, decay=0.6)
    with torch.no_grad():
        student[0].weight.fill_(1.0)
    teacher.update(student)  # t = 0: alpha = 0, a copy
    assert torch.equal(teacher.module[0].weight, student[0].weight)
    expected = student[0].weight.clone()
    for t, alpha in ((1, 0.5), (2, 0.6), (3, 0.6)):  # alpha_t = min(1 - 1/(t+1), 0.6)
        with torch.no_grad():
            student[0].weight.fill_(float(t + 1))
        teacher.update(student)
        expected = alpha * expected + (1 - alpha) * student[0].weight
        torch.testing.assert_close(teacher.module[0].weight, expected, rtol=0, atol=1e-6)
    assert teacher.updates == 4


def test_ema_teacher_keeps_following_after_the_networks_are_moved_or_loaded():
    """The teacher pairs its tensors with the student's once; moving either network to channels-last,
    loading weights into it, or handing it another student must not leave it averaging stale tensors."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = ema_teacher(student, decay=0.5)
    teacher.update(student)  # pairs the tensors
    student.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    student.load_state_dict(other.state_dict())
    expected = 0.5 * teacher.module[0].weight + 0.5 * student[0].weight  # t = 1: alpha = 0.5
    teacher.update(student)
    torch.testing.assert_close(teacher.module[0].weight, expected, rtol=0, atol=1e-6)
    replacement = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    expected = 0.5 * teacher.module[0].weight + 0.5 * replacement[0].weight  # t = 2: alpha = min(2/3, 0.5)
    teacher.update(replacement)
    torch.testing.assert_close(teacher.module[0].weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("buffers", ["ema", "own"])
def test_ema_teacher_buffers_and_state_round_trip(buffers):
    """buffers='ema' averages the BatchNorm running statistics like the weights (the first update copies,
    the second at alpha = 0.5 halves the way) and copies the batch count; 'own' leaves them alone."""
    student = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    teacher = ema_teacher(student, decay=0.5, buffers=buffers)
    bn, own_mean = teacher.module[1], teacher.module[1].running_mean.clone()
    student(torch.randn(4, 3, 5, 5) + 3.0)  # moves the student's running statistics
    teacher.update(student)  # t = 0: a copy
    first = student[1].running_mean.clone()
    student(torch.randn(4, 3, 5, 5) - 3.0)  # and again
    teacher.update(student)  # t = 1: alpha = min(1/2, 0.5)
    if buffers == "ema":
        torch.testing.assert_close(bn.running_mean, 0.5 * first + 0.5 * student[1].running_mean)
        assert int(bn.num_batches_tracked) == int(student[1].num_batches_tracked) == 2
    else:
        assert torch.equal(bn.running_mean, own_mean) and int(bn.num_batches_tracked) == 0
    copy = ema_teacher(student, decay=0.5, buffers=buffers)
    copy.load_state_dict(teacher.state_dict())
    assert copy.updates == 2 and copy.alpha() == teacher.alpha() == 0.5


def test_networks_declaration_is_checked():
    net = nn.Linear(1, 1)
    assert Networks(trained={"a": net}).evaluate == ("a",)
    assert Networks(trained={"a": net}, frozen={"t": net}, evaluate=("a", "t")).deploy == ("a",)
    with pytest.raises(ValueError, match="at least one"):
        Networks(trained={})
    with pytest.raises(ValueError, match="'x' is evaluated or deployed but not declared"):
        Networks(trained={"a": net}, evaluate=("x",))
    with pytest.raises(ValueError, match="deployed but not evaluated"):
        Networks(trained={"a": net}, frozen={"t": net}, evaluate=("a",), deploy=("t",))


def test_tensorboard_gets_pictures_histograms_and_the_config(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = tmp_path / "tb"
    run(
        [
            sys.executable,
            "unimatch.py",
            "--config",
            tiny_config,
            "--save-path",
            str(save),
            "max_iters=3",
            "tb_images=2",
        ]
    )
    events = EventAccumulator(str(save), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["images"]) == ["eval_images/0", "eval_images/1"]
    picture = events.Images("eval_images/0")[0]
    assert (picture.width, picture.height) == (
        3 * 32,
        32,
    )  # image | ground truth | prediction of a 32x32 image
    assert "train/confidence" in tags["histograms"] and "train/mask_ratio" in tags["scalars"]
    assert [e.step for e in events.Histograms("train/confidence")] == [1, 2, 3]
    assert "config/text_summary" in tags["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "tb_images: 2" in text and "dataset: demo" in text
