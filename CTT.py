"""CTT (Xiao et al., "Semi-Supervised Semantic Segmentation with Cross Teacher Training", Neurocomputing
2022): two students, each with an EMA teacher; each student learns from the OTHER student's teacher.

    torchrun --nproc_per_node=4 CTT.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/ctt_366

One step, for student S_A (S_B the same with A and B swapped):
    1. teacher T_B labels the weak unlabeled view; ClassMix pastes half of each image's predicted classes
       onto the next image, in the strong view and in T_B's pseudo-label alike
    2. S_A sees the labeled batch and its mixed view
    3. L_A = CE(labeled) + w CE(mixed view, T_B's mixed pseudo-label)      w = fraction of confident pixels
             + HC: S_A's features against memory bank A (T_A's features of confidently-correct labeled pixels)
             + LC: S_A's unsure pixels against S_B's features of the same content
             + unreliable T_A pixels as negatives of the classes they rank lowest (a queue per class)
    4. after the optimizer step: T_A <- EMA(S_A), then bank A and queue A take T_A's new candidates
       (bank A's from T_A's forward of the labeled batch, which runs inside the next step's teacher pass:
       the same updated teacher, one forward instead of two)
`ctt.preset` picks the terms (docs/DIFFERENCES.md): default = all, paper = CT + HC + LC, released = CT.
"""

from dataclasses import dataclass

import torch

from model import build_model
from model.weights import pretrained_problem
from util.config import ConfigError
from util.dist import all_reduce_sum, get_world_size
from util.ema import ema_teacher
from util.engine import Method, Networks, main
from util.losses import IGNORE
from util.losses.ctt import (
    ContrastMemory,
    classmix,
    classmix_mask,
    confident_counts,
    ct_loss,
    hc_loss,
    lc_loss,
    negative_queue_loss,
    of_class,
    per_class_sample,
    round_robin,
    unreliable_fraction,
)
from util.losses.pixels import pixels, sample_to_grid

NETWORKS = ("student_a", "student_b", "teacher_a", "teacher_b")


def stacked(*per_network: tuple) -> list[torch.Tensor]:
    """The same tuple of tensors from each network -> each tensor stacked over the networks (dim 0)."""
    return [torch.stack(parts) for parts in zip(*per_network)]


@dataclass
class TeacherView:
    """A teacher's prediction of the weak unlabeled view (no gradient)."""

    prob: torch.Tensor  # (B, K, H, W) softmax
    feature: torch.Tensor | None = None  # (B, D, h, w) decoder feature, for the negative queue
    logits_low: torch.Tensor | None = None  # (B, K, h, w)


@dataclass
class MixedView:
    """One student's ClassMixed strong view and the cross teacher's targets, mixed the same way."""

    image: torch.Tensor  # (B, 3, H, W)
    pseudo_label: torch.Tensor  # (B, H, W) argmax of the mixed teacher softmax
    confidence: torch.Tensor  # (B, H, W) its maximum
    valid: torch.Tensor  # (B, H, W) bool, not crop padding
    paste: torch.Tensor  # (B, H, W) bool: the image's own pixels (elsewhere: the next image's)
    truth: torch.Tensor | None = None  # (B, H, W) the images' masks mixed the same way (measuring only)


@dataclass
class StudentOutput:
    logits_x: torch.Tensor  # (B, K, H, W) labeled batch
    logits_u: torch.Tensor  # (B, K, H, W) mixed view
    feature_x: torch.Tensor | None = None  # (B, D, h, w) decoder features, when a contrast term runs
    feature_u: torch.Tensor | None = None
    logits_low_u: torch.Tensor | None = None  # (B, K, h, w)


@dataclass
class BankInput:
    """The labeled batch of the last step taken, whose pixels the updated teachers have yet to give the
    banks."""

    image: torch.Tensor  # (B, 3, H, W)
    mask: torch.Tensor  # (B, H, W)


@dataclass
class Pending:
    """What after_optimizer_step feeds the banks and queues from."""

    img_x: torch.Tensor
    mask_x: torch.Tensor
    teachers: dict  # name -> TeacherView of the weak view (for the negative queues)
    valid_u: torch.Tensor
    unreliable: float  # share of unreliable pixels at this step


def random_anchors(candidates: torch.Tensor, budget: int) -> tuple[torch.Tensor, ...]:
    """At most `budget` of the candidates (K, N), drawn at random within each class (global torch RNG) and
    shared evenly among the classes present: index (M,), label (M,), chosen (M,)."""
    uniform = torch.rand(candidates.shape[-1], device=candidates.device)
    return round_robin(*per_class_sample(candidates, uniform, budget), budget)


def hc_anchors(mask_x, view: MixedView, student: StudentOutput, thresh: float, nclass: int, budget: int):
    """A random sample of the student's labeled pixels (ground truth) and of its mixed pixels whose
    pseudo-label is at least `thresh` (gamma) confident: features (M, D), label (M,), chosen (M,)."""
    grid = tuple(student.feature_u.shape[-2:])
    label_x = sample_to_grid(mask_x, grid).flatten()
    label_u = sample_to_grid(view.pseudo_label, grid).flatten()
    valid = sample_to_grid(view.valid, grid)
    confident = valid & (sample_to_grid(view.confidence, grid) >= thresh)
    labels = torch.cat([label_x, label_u])
    candidate = torch.cat([label_x != IGNORE, confident.flatten()])
    features = torch.cat([pixels(student.feature_x), pixels(student.feature_u)])
    index, label, chosen = random_anchors(of_class(labels, nclass) & candidate, budget)
    return features[index], label, chosen


def lc_anchors(
    view: MixedView, student: StudentOutput, peer_view: MixedView, peer: StudentOutput, c: dict, nclass: int
):
    """Pixels whose cross-teacher pseudo-label is below gamma (c: the ctt section), labelled by the peer
    student's prediction; with lc_peer_confident only where the peer is at least gamma sure and surer than
    the student. Returns the student's and the peer's features of a random sample (M, D), its label and
    chosen mask (M,)."""
    grid = tuple(student.feature_u.shape[-2:])
    paired = view.valid & peer_view.valid
    if c["lc_pairing"] == "same_content":  # both mixed images show the same source pixel here
        paired = paired & (view.paste == peer_view.paste)
    candidate = sample_to_grid(paired & (view.confidence < c["contrast_thresh"]), grid)
    own_conf = student.logits_low_u.detach().float().softmax(dim=1).amax(dim=1)
    peer_conf, peer_label = peer.logits_low_u.detach().float().softmax(dim=1).max(dim=1)
    if c["lc_peer_confident"]:
        candidate = candidate & (peer_conf >= c["contrast_thresh"]) & (peer_conf > own_conf)
    candidates = of_class(peer_label.flatten(), nclass) & candidate.flatten()
    index, label, chosen = random_anchors(candidates, c["anchors"])
    return pixels(student.feature_u)[index], pixels(peer.feature_u)[index], label, chosen


def check_config(cfg: dict, world_size: int) -> None:
    """CTT's keys that the schema alone cannot check: the deployed networks, student B's weights, and
    new bank and queue entries per step (from every process) that fit in the bank and the queue."""
    c = cfg["ctt"]
    for name in c["deploy"]:
        if name not in NETWORKS:
            raise ConfigError(f"key 'ctt.deploy' names {name!r}; choose from {list(NETWORKS)}")
    if not c["deploy"]:
        raise ConfigError("key 'ctt.deploy' must name at least one network")
    problem = pretrained_problem(c["pretrained_b"], cfg["backbone"], cfg["deep_stem"])
    if problem:
        raise ConfigError(f"key 'ctt.pretrained_b': {problem}")
    for per_step, size, keys in (
        (
            c["bank_per_step"] or cfg["batch_size"],
            c["bank_size"],
            "'ctt.bank_per_step' (or batch_size) and 'ctt.bank_size'",
        ),
        (c["neg_per_step"], c["neg_queue_size"], "'ctt.neg_per_step' and 'ctt.neg_queue_size'"),
    ):
        if per_step * world_size > size:
            raise ConfigError(
                f"keys {keys}: {world_size} process(es) x {per_step} new entries per class and step do not "
                f"fit in a queue of {size}"
            )


class CTT(Method):
    """CTT: cross teacher training with high- and low-level contrast and unreliable pixels as negatives."""

    uses_mix = False  # ClassMix pairs the images of the unlabeled batch itself

    def __init__(self, cfg: dict, criterion_l, device: torch.device):
        super().__init__(cfg, criterion_l, device)
        c = self.ccfg = cfg["ctt"]
        self.nclass = cfg["nclass"]
        self.contrast = c["preset"] != "released"  # HC and LC (paper and default)
        self.negatives = c["preset"] == "default"
        check_config(cfg, get_world_size())
        self.bank_per_step = c["bank_per_step"] or cfg["batch_size"]
        self.memory = ContrastMemory(
            self.nclass, cfg["head_channels"], c["bank_size"], c["neg_queue_size"], device
        )
        self.pending = None
        # Eval-mode teachers normalise each image alone, so the labeled batch for the banks can join the
        # next step's weak-view forward (the teacher has not changed in between) with the same result and
        # one forward per teacher and step. Train-mode teachers would mix the two batches' statistics.
        self.fold_bank_forward = c["teacher_mode"] == "eval"
        self.bank_input: BankInput | None = None

    def networks(self) -> Networks:
        c = self.ccfg
        # Built from the run's seed on every rank alike (teachers included); student B's head (and its
        # backbone, without pretrained weights) comes from later draws of the same stream than A's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg["seed"])
            student_a = build_model(self.cfg)
            student_b = build_model({**self.cfg, "pretrained": c["pretrained_b"] or self.cfg["pretrained"]})
        buffers = "own" if c["teacher_mode"] == "train" else "ema"
        return Networks(
            trained={"student_a": student_a, "student_b": student_b},
            frozen={
                "teacher_a": ema_teacher(student_a, c["ema_decay"], buffers),
                "teacher_b": ema_teacher(student_b, c["ema_decay"], buffers),
            },
            evaluate=NETWORKS,
            deploy=tuple(c["deploy"]),
        )

    # --------------------------------------------------------------------------------------- the step
    def step(self, batch: dict) -> tuple[dict, dict]:
        img_x, mask_x = batch["labeled"]
        img_u_w, img_u_s1, img_u_s2, ignore_mask, _, _ = batch["unlabeled"]
        valid_u = ignore_mask != IGNORE

        # 1. Each teacher labels the weak view; ClassMix mixes each student's strong view by the OTHER
        #    teacher's pseudo-label (S_A sees strong view 1, S_B strong view 2).
        #    The teachers also give the banks the last step's labeled pixels (when it left any).
        bank_input, self.bank_input = self.bank_input, None
        teacher_a, teacher_b = self.teach("a", img_u_w, bank_input), self.teach("b", img_u_w, bank_input)
        truth = batch.get("truth", {}).get("unlabeled")  # the unlabeled masks, to measure pseudo-labels only
        view_a = self.mixed_view(img_u_s1, valid_u, teacher_b, truth)
        view_b = self.mixed_view(img_u_s2, valid_u, teacher_a, truth)

        # 2. Each student on the labeled batch and its own mixed view.
        student_a = self.learn(self.student_a, img_x, view_a.image)
        student_b = self.learn(self.student_b, img_x, view_b.image)

        # 3. Supervised + cross-teacher terms; the CT weight is the confident share of every rank's pixels.
        thresh = self.ccfg["ct_thresh"]
        counts = all_reduce_sum(
            torch.stack([confident_counts(v.confidence, v.valid, thresh) for v in (view_a, view_b)])
        )
        losses = {
            "sup_a": self.criterion_l(student_a.logits_x, mask_x),
            "ct_a": ct_loss(student_a.logits_u, view_a.pseudo_label, view_a.valid, counts[0]),
            "sup_b": self.criterion_l(student_b.logits_x, mask_x),
            "ct_b": ct_loss(student_b.logits_u, view_b.pseudo_label, view_b.valid, counts[1]),
        }
        stats = {"ct_weight_a": counts[0, 0] / counts[0, 1].clamp(min=1),
                 "ct_weight_b": counts[1, 0] / counts[1, 1].clamp(min=1)}  # fmt: skip
        for name, view in (("a", view_a), ("b", view_b)):  # CT trains on every valid pixel, one weight
            self.pseudo_labels.add(
                name, view.pseudo_label, view.valid * stats[f"ct_weight_{name}"], view.truth
            )
        if self.contrast:
            losses.update(self.contrast_losses(mask_x, view_a, view_b, student_a, student_b))
            stats["bank_filled"] = self.memory.bank_filled_share()
            fraction = unreliable_fraction(self.ccfg["unreliable_start"], self.iteration, self.total_iters)
            teachers = {"a": teacher_a, "b": teacher_b}
            self.pending = Pending(img_x, mask_x, teachers, valid_u, fraction)
        return losses, stats

    @torch.no_grad()
    def teach(self, name: str, image: torch.Tensor, bank_input: BankInput | None = None) -> TeacherView:
        """Teacher `name`'s view of the weak images; with `bank_input`, the same forward also feeds its
        bank from those labeled images."""
        teacher = self.teacher(name)
        if not self.negatives and bank_input is None:
            return TeacherView(teacher(image).float().softmax(dim=1))
        if bank_input is None:
            out = teacher(image, features=True)
        else:
            both = teacher(torch.cat((image, bank_input.image)), features=True)
            out, labeled = both.split([image.shape[0], bank_input.image.shape[0]])
            self.push_bank(name, labeled, bank_input.mask)
        prob = out.logits.float().softmax(dim=1)
        return TeacherView(prob, out.decoder, out.logits_low) if self.negatives else TeacherView(prob)

    def teacher(self, name: str):
        """Teacher `name` ('a' or 'b') in the mode its forwards run in (ctt.teacher_mode)."""
        teacher = getattr(self, f"teacher_{name}")
        train = self.ccfg["teacher_mode"] == "train"
        if teacher.training != train:  # .train() walks every module: only when an evaluation changed it
            teacher.train(train)
        return teacher

    def mixed_view(
        self,
        image: torch.Tensor,
        valid: torch.Tensor,
        teacher: TeacherView,
        truth: torch.Tensor | None = None,
    ) -> MixedView:
        """Mixing the teacher's pseudo-label and confidence equals taking them from its mixed softmax."""
        confidence, pseudo_label = teacher.prob.max(dim=1)
        if self.ccfg["mix"] == "classmix":
            uniform = torch.rand(image.shape[0], self.nclass, device=image.device)
            paste = classmix_mask(pseudo_label, valid, uniform)
        else:
            paste = torch.ones_like(valid)
        return MixedView(
            classmix(image, paste),
            classmix(pseudo_label, paste),
            classmix(confidence, paste),
            classmix(valid, paste),
            paste,
            None if truth is None else classmix(truth, paste),
        )

    def learn(self, student, img_x: torch.Tensor, img_u: torch.Tensor) -> StudentOutput:
        num_x = img_x.shape[0]
        if not self.contrast:
            logits_x, logits_u = student(torch.cat((img_x, img_u))).split([num_x, img_u.shape[0]])
            return StudentOutput(logits_x, logits_u)
        x, u = student(torch.cat((img_x, img_u)), features=True).split([num_x, img_u.shape[0]])
        return StudentOutput(x.logits, u.logits, x.decoder, u.decoder, u.logits_low)

    # ------------------------------------------------------------------------------ contrastive terms
    def contrast_losses(self, mask_x, view_a, view_b, student_a, student_b) -> dict:
        """HC, LC and the negative term, each computed for both students at once: A's and B's anchors,
        banks and queues stacked on a leading dimension of 2 (one call instead of two halves the small
        operations, which dominate at these sizes)."""
        c = self.ccfg
        weights = {"hc": c["hc_weight"], "lc": c["lc_weight"], "neg": c["neg_weight"]}
        if c["contrast_start"] == "banks_full":  # the release waits until every class of both banks is full
            full = self.memory.banks_full()
            weights = {k: w * full for k, w in weights.items()}
        bank, filled = self.memory.stacked_banks()  # (2, K, N, D) and (2, K, N): bank A, bank B
        hc = (c["contrast_thresh"], self.nclass, c["anchors"])
        anchors, label, chosen = stacked(
            hc_anchors(mask_x, view_a, student_a, *hc), hc_anchors(mask_x, view_b, student_b, *hc)
        )
        terms = {"hc": hc_loss(anchors, label, chosen, bank, filled, c["hc_temperature"])}
        if self.negatives:
            queue, queue_filled = self.memory.stacked_queues()
            terms["neg"] = negative_queue_loss(
                anchors, label, chosen, bank, filled, queue, queue_filled, c["neg_temperature"]
            )
        anchors, peers, label, chosen = stacked(
            lc_anchors(view_a, student_a, view_b, student_b, c, self.nclass),
            lc_anchors(view_b, student_b, view_a, student_a, c, self.nclass),
        )
        both_banks = torch.cat(tuple(bank), dim=1)  # (K, 2N, D): the negatives of either student's LC
        both_filled = torch.cat(tuple(filled), dim=1)
        terms["lc"] = lc_loss(anchors, label, chosen, peers, both_banks, both_filled, c["lc_temperature"])
        losses = {}
        for term, values in terms.items():  # values (2,): students A and B
            losses[f"{term}_a"], losses[f"{term}_b"] = weights[term] * values
        return losses

    # ---------------------------------------------------------------------- after the optimizer step
    def after_optimizer_step(self) -> None:
        """4. Each teacher follows its own student; then its bank (and queue) take its new candidates."""
        self.teacher_a.update(self.unwrapped("student_a"))
        self.teacher_b.update(self.unwrapped("student_b"))
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        with torch.no_grad():  # under the engine's autocast, as step()
            if self.negatives:
                self.push_negatives(p)
            if not self.fold_bank_forward:
                for name in "ab":
                    self.push_bank(name, self.teacher(name)(p.img_x, features=True), p.mask_x)
        if self.fold_bank_forward:  # the next step's teacher pass feeds the banks
            self.bank_input = BankInput(p.img_x, p.mask_x)

    def push_bank(self, name: str, out, mask_x: torch.Tensor) -> None:
        """Bank: the updated teacher's features (its SegmentationOutput `out` of the labeled images) of
        the pixels it gets right with confidence, the most confident bank_per_step per class and process,
        from every process."""
        c = self.ccfg
        label = sample_to_grid(mask_x, tuple(out.decoder.shape[-2:]))
        self.memory.push_bank(
            name, out.logits_low, out.decoder, label, c["bank_thresh"], c["bank_confidence"] == "logit",
            self.bank_per_step,
        )  # fmt: skip

    def push_negatives(self, p: Pending) -> None:
        """Queues: a random sample of each teacher's unreliable weak-view pixels, for each class they rank
        below their neg_skip_top most probable ones. Both teachers at once, stacked on a leading 2."""
        views = [p.teachers[name] for name in "ab"]
        logits_low = torch.stack([v.logits_low for v in views])  # (2, B, K, h, w): teacher A, teacher B
        valid = sample_to_grid(p.valid_u, tuple(logits_low.shape[-2:]))
        uniform = torch.rand(2, valid.numel(), device=valid.device)  # the sample's draws (global torch RNG)
        features = torch.stack([v.feature for v in views])  # (2, B, D, h, w)
        self.memory.push_negatives(
            logits_low, features, valid, p.unreliable, self.ccfg["neg_skip_top"], uniform,
            self.ccfg["neg_per_step"],
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)

    def rank_state_dict(self) -> dict:
        """This process's labeled batch that the banks have yet to take (each process its own)."""
        if self.bank_input is None:
            return {}
        return {"bank_input": {"image": self.bank_input.image, "mask": self.bank_input.mask}}

    def load_rank_state_dict(self, state: dict) -> None:
        """{} (a checkpoint of another number of processes): the banks miss that one labeled batch."""
        if set(state) - {"bank_input"}:
            raise ValueError(f"CTT's per-process state is its bank input; the checkpoint has {sorted(state)}")
        self.bank_input = None
        if "bank_input" in state:
            device = self.memory.banks["a"].features.device
            pending = state["bank_input"]
            self.bank_input = BankInput(pending["image"].to(device), pending["mask"].to(device))


METHOD = CTT

if __name__ == "__main__":
    main(CTT)
