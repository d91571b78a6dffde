"""A toy two-network method for the engine's tests: two students, each with an EMA teacher, each student
learning from the other student's teacher on the weak unlabeled view (no augmentation games), plus a bit of
method state (a per-class count of the pseudo-labels) to check that the engine saves and restores it."""

import torch

from model import build_model
from util.ema import ema_teacher
from util.engine import Method, Networks
from util.losses import cross_entropy


class TwoStudents(Method):
    def networks(self) -> Networks:
        student_a, student_b = build_model(self.cfg), build_model(self.cfg)
        teacher_a, teacher_b = ema_teacher(student_a, 0.9), ema_teacher(student_b, 0.9)
        teacher_a.eval(), teacher_b.eval()
        self.label_counts = torch.zeros(self.cfg["nclass"], dtype=torch.long, device=self.device)
        return Networks(
            trained={"student_a": student_a, "student_b": student_b},
            frozen={"teacher_a": teacher_a, "teacher_b": teacher_b},
            evaluate=("student_a", "student_b", "teacher_a", "teacher_b"),
            deploy=("teacher_a", "teacher_b"),
        )

    def step(self, batch):
        img_x, mask_x = batch["labeled"]
        img_u = batch["unlabeled"][0]
        with torch.no_grad():
            label_from_a = self.teacher_a(img_u).argmax(dim=1)
            label_from_b = self.teacher_b(img_u).argmax(dim=1)
        self.label_counts += torch.bincount(label_from_a.flatten(), minlength=self.cfg["nclass"])
        losses = {}
        for name, student, pseudo_label in (
            ("a", self.student_a, label_from_b),
            ("b", self.student_b, label_from_a),
        ):
            pred = student(torch.cat((img_x, img_u)))
            pred_x, pred_u = pred.split([img_x.shape[0], img_u.shape[0]])
            losses[f"x_{name}"] = cross_entropy(pred_x, mask_x)
            losses[f"u_{name}"] = 0.5 * cross_entropy(pred_u, pseudo_label)
        return losses, {"labels_seen": self.label_counts.sum().float()}

    def after_optimizer_step(self):
        self.teacher_a.update(self.unwrapped("student_a"))
        self.teacher_b.update(self.unwrapped("student_b"))

    def state_dict(self):
        return {"label_counts": self.label_counts}

    def load_state_dict(self, state):
        self.label_counts = state["label_counts"].to(self.device).clone()


METHOD = TwoStudents
