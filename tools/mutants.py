"""Mutation check: deliberate mistakes in the methods' steps, their loss functions, the EMA teacher and the
non-finite guard, each made in a copy of the tree, and the tests that must then fail.

    python tools/mutants.py                  # every mutant, one after the other
    python tools/mutants.py --list           # the mutants and the tests each one runs
    python tools/mutants.py --only CTT DUEB  # the mutants whose name contains one of these words
    python tools/mutants.py --jobs 2         # two at a time, each in its own copy of the tree

The tree (the files git tracks or would track) is copied once into a temporary folder per job; each mutant
replaces one snippet of one file there, runs its tests (`python -m pytest -x`, OMP_NUM_THREADS=1, no
bytecode written) and puts the file back. A mutant is *killed* when its tests fail, *survives* when they
pass, and is *not applicable* when its snippet does not occur exactly once in the file: the code changed
since the mutant was written (rewrite the snippet, or drop the mutant if the mistake cannot be made any
more). Before the mutants, the tests they name run once on the unchanged copy: if those fail, no result
would mean anything and the check stops. Exit status 0 when no mutant survived, 1 when one did, 2 when the
unchanged tests fail. Not run by CI: the whole list took 23 minutes with --jobs 2 on a busy two-core
machine (7 minutes of CPU time).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str  # "<method or part>: <the mistake>"
    path: str  # the file, relative to the repository root
    find: str  # the code to replace: it must occur exactly once in the file
    replace: str
    tests: tuple  # pytest node ids (or files) that must fail


# ------------------------------------------------------------------------------------------- the tests
T_UNIMATCH = ("tests/test_unimatch_step.py",)
T_SUPERVISED = ("tests/test_unimatch_step.py::test_supervised_step_is_the_labeled_cross_entropy_and_reads_no_"
                "unlabeled_batch",)  # fmt: skip
T_UCCL = ("tests/test_uccl.py::test_step_terms_equal_the_loop_reference_on_both_strong_views",)
T_MLCL = (
    "tests/test_mlcl.py::test_step_terms_and_memory_update_equal_the_loop_reference",
    "tests/test_mlcl.py::test_mlcl_step_terms_and_gradient_reach",
)
CTT_STEP = "tests/test_ctt.py::test_step_terms_of_both_students_equal_the_loop_reference_and_teachers_follow_"
T_CTT = (
    CTT_STEP + "their_own_student",
    "tests/test_ctt.py::test_train_mode_teachers_feed_their_own_banks_from_a_forward_of_the_labeled_batch_alone",
    "tests/test_ctt.py::test_banks_fed_in_the_next_teacher_pass_equal_a_forward_of_their_own",
    "tests/test_ctt.py::test_classmix_mask_takes_half_the_classes_of_each_image",
    "tests/test_ctt.py::test_classmix_pastes_image_i_onto_image_i_plus_one_and_mixes_the_teacher_the_same_way",
)
T_DUEB = (
    "tests/test_dueb.py::test_step_terms_of_both_branches_equal_the_loop_reference",
    "tests/test_dueb.py::test_each_branch_runs_one_teacher_and_one_student_forward",
    "tests/test_dueb.py::test_intersection_union_match_loop_reference_with_a_class_absent_from_one_branch",
)
T_CISCR = (
    "tests/test_ciscr.py::test_stage1_step_equals_the_loop_reference",
    "tests/test_ciscr.py::test_rectified_step_equals_the_loop_reference_and_trains_only_the_student",
    "tests/test_ciscr.py::test_rectified_weights_and_loss_match_loops",
)
T_CISCR_ONLINE = (
    "tests/test_ciscr.py::test_online_step_equals_the_loop_reference",
    "tests/test_ciscr.py::test_online_teacher_is_an_eval_mode_ema_of_the_student_at_the_configured_decay",
)
T_CISCR_STAGES = ("tests/test_ciscr.py::test_one_command_runs_every_stage",)  # runs the six stages (~1 min)
T_EMA = (
    "tests/test_engine_networks.py::test_ema_teacher_follows_the_warm_up_formula",
    "tests/test_engine_networks.py::test_ema_teacher_buffers_and_state_round_trip",
    "tests/test_engine_networks.py::test_ema_teacher_keeps_following_after_the_networks_are_moved_or_loaded",
)
T_GUARD = (
    "tests/test_guard.py",
    "tests/test_engine_networks.py::test_a_skipped_step_leaves_both_teachers_and_the_method_state_untouched",
)

# ----------------------------------------------------------------------------------------- the mutants
MUTANTS = [
    # supervised.py
    Mutant(
        "supervised: the labeled loss halved",
        "supervised.py",
        'return {"x": self.criterion_l(pred_x, mask_x)}, {}',
        'return {"x": self.criterion_l(pred_x, mask_x) / 2}, {}',
        T_SUPERVISED,
    ),
    Mutant(
        "supervised: flipped images against unflipped masks",
        "supervised.py",
        "pred_x = self.model(img_x)",
        "pred_x = self.model(img_x.flip(-1))",
        T_SUPERVISED,
    ),
    # unimatch.py and its confident cross-entropy
    Mutant(
        "unimatch: strong targets pasted the wrong way round",
        "unimatch.py",
        "pseudo_label=cutmix(weak.pseudo_label, mix.pseudo_label, box),",
        "pseudo_label=cutmix(mix.pseudo_label, weak.pseudo_label, box),",
        T_UNIMATCH,
    ),
    Mutant(
        "unimatch: the two strong views' boxes swapped",
        "unimatch.py",
        "zip(out_s, (cutmix_box1, cutmix_box2))",
        "zip(out_s, (cutmix_box2, cutmix_box1))",
        T_UNIMATCH,
    ),
    Mutant(
        "unimatch: strong view 2 mixed with strong view 1's mix image",
        "unimatch.py",
        "img_u_s2 = cutmix(img_u_s2, img_u_s2_mix, cutmix_box2)",
        "img_u_s2 = cutmix(img_u_s2, img_u_s1_mix, cutmix_box2)",
        T_UNIMATCH,
    ),
    Mutant(
        "unimatch: strong targets' confidence from the weak view only",
        "unimatch.py",
        "confidence=cutmix(weak.confidence, mix.confidence, box),",
        "confidence=weak.confidence,",
        T_UNIMATCH,
    ),
    Mutant(
        "unimatch: strong targets' padding from the weak view only",
        "unimatch.py",
        "ignore_mask=cutmix(weak.ignore_mask, mix.ignore_mask, box),",
        "ignore_mask=weak.ignore_mask,",
        T_UNIMATCH,
    ),
    Mutant(
        "unimatch: feature-perturbation weight 0.25 instead of 0.5",
        "unimatch.py",
        'losses["fp"] = loss_fp * 0.5 / 2',
        'losses["fp"] = loss_fp * 0.25 / 2',
        T_UNIMATCH,
    ),
    Mutant(
        "losses: confident cross-entropy on the unsure pixels",
        "util/losses/__init__.py",
        "loss = loss * ((confidence >= thresh) & valid)",
        "loss = loss * ((confidence < thresh) & valid)",
        T_UNIMATCH,
    ),
    # UCCL.py
    Mutant(
        "UCCL: SBU weighted by the CKR weight",
        "UCCL.py",
        'losses["sbu"] = cfg["sbu_weight"] * sum(loss_sbu)',
        'losses["sbu"] = cfg["ckr_weight"] * sum(loss_sbu)',
        T_UCCL,
    ),
    Mutant(
        "UCCL: SBU thresholds of paper and release swapped",
        "UCCL.py",
        'thresh = self.cfg["conf_thresh"] if sbu_released else cfg["uncertain_thresh"]',
        'thresh = cfg["uncertain_thresh"] if sbu_released else self.cfg["conf_thresh"]',
        T_UCCL,
    ),
    Mutant(
        "UCCL: weak feature without the mix image's box",
        "UCCL.py",
        'return p.weak_cutmixed(strong, level, grid), p.weak_cutmixed(strong, "logits_low")',
        'return resize_feature(p.weak.feature(level), grid), p.weak_cutmixed(strong, "logits_low")',
        T_UCCL,
    ),
    Mutant(
        "UCCL: padding of the weak view instead of the strong view's content",
        "UCCL.py",
        "valid = sample_to_grid(strong.ignore_mask, grid) != IGNORE",
        "valid = sample_to_grid(p.weak.ignore_mask, grid) != IGNORE",
        T_UCCL,
    ),
    Mutant(
        "UCCL: CKR regions from the strong prediction",
        "UCCL.py",
        "ckr_loss(feat_weak, feat_strong, logits_weak, valid, ckr_released)",
        "ckr_loss(feat_weak, feat_strong, strong.logits_low, valid, ckr_released)",
        T_UCCL,
    ),
    # MLCL.py
    Mutant(
        "MLCL: point-to-point summed over the two views, not averaged",
        "MLCL.py",
        "for pair in pairs) / 2",
        "for pair in pairs)",
        T_MLCL,
    ),
    Mutant(
        "MLCL: prototype pixels labelled by the weak view without the box",
        "MLCL.py",
        "labels=sample_to_grid(view.pseudo_label, grid),",
        "labels=sample_to_grid(p.weak.pseudo_label, grid),",
        T_MLCL,
    ),
    Mutant(
        "MLCL: SAI target pasted the wrong way round",
        "MLCL.py",
        "cutmix(prob_w, prob_mix, view.cutmix_box)",
        "cutmix(prob_mix, prob_w, view.cutmix_box)",
        T_MLCL,
    ),
    Mutant(
        "MLCL: prototype memory follows a strong view",
        "MLCL.py",
        "weak = p.weak.feature(level)",
        "weak = p.strong_views[0].feature(level)",
        T_MLCL,
    ),
    Mutant(
        "MLCL: SAI only before its warm-up",
        "MLCL.py",
        'self.iteration < c["sai_warm_up"]',
        'self.iteration >= c["sai_warm_up"]',
        T_MLCL,
    ),
    # CTT.py and util/losses/ctt.py
    Mutant(
        "CTT: each teacher follows the other student",
        "CTT.py",
        'self.teacher_a.update(self.unwrapped("student_a"))\n'
        '        self.teacher_b.update(self.unwrapped("student_b"))',
        'self.teacher_a.update(self.unwrapped("student_b"))\n'
        '        self.teacher_b.update(self.unwrapped("student_a"))',
        T_CTT,
    ),
    Mutant(
        "CTT: student A learns from its own teacher",
        "CTT.py",
        "view_a = self.mixed_view(img_u_s1, valid_u, teacher_b, truth)",
        "view_a = self.mixed_view(img_u_s1, valid_u, teacher_a, truth)",
        T_CTT,
    ),
    Mutant(
        "CTT: student A sees strong view 2",
        "CTT.py",
        "view_a = self.mixed_view(img_u_s1, valid_u, teacher_b, truth)",
        "view_a = self.mixed_view(img_u_s2, valid_u, teacher_b, truth)",
        T_CTT,
    ),
    Mutant(
        "CTT: the pseudo-label mixed the other way than the image",
        "CTT.py",
        "classmix(pseudo_label, paste),",
        "classmix(pseudo_label, ~paste),",
        T_CTT,
    ),
    Mutant(
        "CTT: ClassMix pastes from image i - 1",
        "util/losses/ctt.py",
        "return torch.where(keep, image, image.roll(-1, dims=0))",
        "return torch.where(keep, image, image.roll(1, dims=0))",
        T_CTT,
    ),
    Mutant(
        "CTT: student B's CT weight from student A's view",
        "CTT.py",
        "view_b.pseudo_label, view_b.valid, counts[1])",
        "view_b.pseudo_label, view_b.valid, counts[0])",
        T_CTT,
    ),
    Mutant(
        "CTT: HC anchors below gamma",
        "CTT.py",
        "(sample_to_grid(view.confidence, grid) >= thresh)",
        "(sample_to_grid(view.confidence, grid) < thresh)",
        T_CTT,
    ),
    Mutant(
        "CTT: LC anchors above gamma",
        "CTT.py",
        'paired & (view.confidence < c["contrast_thresh"])',
        'paired & (view.confidence >= c["contrast_thresh"])',
        T_CTT,
    ),
    Mutant(
        "CTT: student A's HC anchors against bank B",
        "CTT.py",
        "hc_anchors(mask_x, view_a, student_a, *hc), hc_anchors(mask_x, view_b, student_b, *hc)",
        "hc_anchors(mask_x, view_b, student_b, *hc), hc_anchors(mask_x, view_a, student_a, *hc)",
        T_CTT,
    ),
    Mutant(
        "CTT: HC and negative weights swapped",
        "CTT.py",
        'weights = {"hc": c["hc_weight"], "lc": c["lc_weight"], "neg": c["neg_weight"]}',
        'weights = {"hc": c["neg_weight"], "lc": c["lc_weight"], "neg": c["hc_weight"]}',
        T_CTT,
    ),
    Mutant(
        "CTT: the negative queues swapped",
        "util/losses/ctt.py",
        "for i, name in enumerate(self.TEACHERS):\n            self.queues[name]",
        "for i, name in enumerate(self.TEACHERS[::-1]):\n            self.queues[name]",
        T_CTT,
    ),
    Mutant(
        "CTT: train-mode teachers fold their bank forward into the weak-view pass",
        "CTT.py",
        'self.fold_bank_forward = c["teacher_mode"] == "eval"',
        "self.fold_bank_forward = True",
        T_CTT,
    ),
    # DUEB.py and util/losses/dueb.py
    Mutant(
        "DUEB: branch 1 gets the union labels, branch 2 the intersection",
        "DUEB.py",
        "out_1, out_2 = self.forward_branch(1, inputs), self.forward_branch(2, inputs)",
        "out_2, out_1 = self.forward_branch(1, inputs), self.forward_branch(2, inputs)",
        T_DUEB,
    ),
    Mutant(
        "DUEB: the teachers' logits pasted with the box inverted",
        "DUEB.py",
        "cutmix(logits, logits_mix, box)",
        "cutmix(logits_mix, logits, box)",
        T_DUEB,
    ),
    Mutant(
        "DUEB: padding read from the unmixed image",
        "DUEB.py",
        "valid = cutmix(ignore_mask, ignore_mask_mix, cutmix_box) != IGNORE",
        "valid = ignore_mask != IGNORE",
        T_DUEB,
    ),
    Mutant(
        "DUEB: energy weights of labeled and unlabeled images swapped",
        "DUEB.py",
        'losses["energy"] = w_x * energy_x + w_u * energy_u',
        'losses["energy"] = w_u * energy_x + w_x * energy_u',
        T_DUEB,
    ),
    Mutant(
        "DUEB: aleatoric term of the unlabeled images at the labeled weight",
        "DUEB.py",
        'losses["aleatoric"] = w_x * aleatoric_x + w_u * aleatoric_u',
        'losses["aleatoric"] = w_x * aleatoric_x + w_x * aleatoric_u',
        T_DUEB,
    ),
    Mutant(
        "DUEB: lambda_u dropped",
        "DUEB.py",
        '"u": cfg["lambda_u"] * weighted_cross_entropy(',
        '"u": weighted_cross_entropy(',
        T_DUEB,
    ),
    Mutant(
        "DUEB: union disagreements go to the smaller conflict rate",
        "util/losses/dueb.py",
        "take_1 = rate[pred_1] > rate[pred_2]",
        "take_1 = rate[pred_1] < rate[pred_2]",
        T_DUEB,
    ),
    # CISCR.py and util/losses/ciscr.py
    Mutant(
        "CISC-R: rectified by the partner's region instead of the crop's",
        "CISCR.py",
        "weight = rectify_weight(cisc, region_u)",
        "weight = rectify_weight(cisc, region_q)",
        T_CISCR,
    ),
    Mutant(
        "CISC-R: weight |m_u - S| instead of 1 - |m_u - S| (S and 1 - S swapped)",
        "util/losses/ciscr.py",
        "return 1 - (region_u.float() - cisc.float()).abs()",
        "return (region_u.float() - cisc.float()).abs()",
        T_CISCR,
    ),
    Mutant(
        "CISC-R: the unlabeled and queried features swapped",
        "CISCR.py",
        "feature_u, feature_q = feature.chunk(2)\n            cisc = cisc_map(",
        "feature_q, feature_u = feature.chunk(2)\n            cisc = cisc_map(",
        T_CISCR,
    ),
    Mutant(
        "CISC-R: the labeled term of stages 4 and 6 halved",
        "CISCR.py",
        '"x": self.criterion_l(logits_x, mask_x),',
        '"x": self.criterion_l(logits_x, mask_x) / 2,',
        T_CISCR,
    ),
    Mutant(
        "CISC-R: stage 1's map of x from the partner's prototype of x's own region",
        "CISCR.py",
        "cisc = cisc_map(feature, masked_average(feature_q, region_q), size)",
        "cisc = cisc_map(feature, masked_average(feature_q, region), size)",
        T_CISCR,
    ),
    Mutant(
        "CISC-R: stage 5 labelled by M1",
        "CISCR.py",
        'labeller.write(self.teacher("stage4"), unreliable, "stage5")',
        'labeller.write(self.teacher("stage1"), unreliable, "stage5")',
        T_CISCR_STAGES,
    ),
    Mutant(
        "CISC-R: stage 6 rectified by M1",
        "CISCR.py",
        'self.retrain("stage6", "stage4", 2,',
        'self.retrain("stage6", "stage1", 2,',
        T_CISCR_STAGES,
    ),
    Mutant(
        "CISC-R online: the mix image's box rectified, the crop's pixels not",
        "CISCR.py",
        "cutmix(weight, unrectified, box)",
        "cutmix(unrectified, weight, box)",
        T_CISCR_ONLINE,
    ),
    Mutant(
        "CISC-R online: rectified by the student's features",
        "CISCR.py",
        "_, feature = decoder_output(self.teacher, torch.cat((img_u_w, img_q)))",
        "_, feature = decoder_output(self.model, torch.cat((img_u_w, img_q)))",
        T_CISCR_ONLINE,
    ),
    Mutant(
        "CISC-R online: the teacher's decay ignored",
        "CISCR.py",
        'teacher = ema_teacher(model, self.cfg["ciscr"]["ema_decay"])',
        "teacher = ema_teacher(model, 0.99)",
        T_CISCR_ONLINE,
    ),
    # util/ema.py
    Mutant(
        "EMA: the student's share and the teacher's swapped",
        "util/ema.py",
        "weight = 1.0 - self.alpha()",
        "weight = self.alpha()",
        T_EMA + (CTT_STEP + "their_own_student",),
    ),
    Mutant(
        "EMA: the decay a floor, not a cap",
        "util/ema.py",
        "return min(1.0 - 1.0 / (self.updates + 1), self.decay)",
        "return max(1.0 - 1.0 / (self.updates + 1), self.decay)",
        T_EMA,
    ),
    Mutant(
        "EMA: BatchNorm statistics copied, not averaged",
        "util/ema.py",
        "torch._foreach_lerp_(*tensors.floats, weight)",
        "torch._foreach_copy_(*tensors.floats)",
        T_EMA,
    ),
    Mutant(
        "EMA: the update count stuck at one", "util/ema.py", "self.updates += 1", "self.updates = 1", T_EMA
    ),
    Mutant(
        "EMA: paired with the first student for good",
        "util/ema.py",
        "if self._pairs is None or self._pairs.student is not student:",
        "if self._pairs is None:",
        T_EMA,
    ),
    # util/engine/guard.py
    Mutant(
        "guard: finite gradients flagged, non-finite ones not",
        "util/engine/guard.py",
        "grad_bad = (~torch.isfinite(norms)).any().float()",
        "grad_bad = torch.isfinite(norms).any().float()",
        T_GUARD,
    ),
    Mutant(
        "guard: finite loss values flagged",
        "util/engine/guard.py",
        "(~torch.isfinite(values)).float()",
        "torch.isfinite(values).float()",
        T_GUARD,
    ),
    Mutant(
        "guard: each rank's row read one flag short",
        "util/engine/guard.py",
        "rows = [flags[r * (width + 2) : (r + 1) * (width + 2)]",
        "rows = [flags[r * (width + 1) : (r + 1) * (width + 1)]",
        T_GUARD,
    ),
    Mutant(
        "guard: no exact check when the fast norm overflows",
        "util/engine/guard.py",
        "grad_bad = any(row[0] for row in rows) and self.gradients_nonfinite()",
        "grad_bad = any(row[0] for row in rows)",
        T_GUARD,
    ),
    Mutant(
        "guard: BatchNorm statistics not put back",
        "util/engine/guard.py",
        "torch._foreach_copy_(self.buffers, self.buffer_backup)",
        "pass",
        T_GUARD,
    ),
    Mutant(
        "guard: the method's state not put back",
        "util/engine/guard.py",
        "method.load_state_dict(shared)",
        "pass",
        T_GUARD,
    ),
    Mutant(
        "guard: a good step does not end the streak",
        "util/engine/guard.py",
        "def passed(self) -> None:\n        self.streak = 0",
        "def passed(self) -> None:\n        pass",
        T_GUARD,
    ),
    Mutant(
        "guard: every skipped step starts a new streak",
        "util/engine/guard.py",
        "if self.streak == 0:\n            self.first = iteration",
        "if True:\n            self.first = iteration",
        T_GUARD,
    ),
]


# ------------------------------------------------------------------------------------------ running them
def tracked_files() -> list[str]:
    """The files of the tree, relative to the root: what git tracks, and what it would track."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    return [path for path in out.decode().split("\0") if path and os.path.isfile(os.path.join(ROOT, path))]


def copy_tree(destination: str) -> str:
    for path in tracked_files():
        target = os.path.join(destination, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), target)
    return destination


def run_tests(tree: str, tests, timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, the first failure or the output's end)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, f"no result within {timeout:.0f} s"
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", seconds, ""
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    if proc.returncode == 1 and failed:
        return "failed", seconds, failed[0]
    # 2: interrupted or a collection error, 4: bad usage, 5: no test collected
    return (
        "error",
        seconds,
        f"pytest exited {proc.returncode}: " + " | ".join(output.strip().splitlines()[-3:]),
    )


def occurrences(tree: str, mutant: Mutant) -> int:
    path = os.path.join(tree, mutant.path)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return f.read().count(mutant.find)


def apply(tree: str, mutant: Mutant) -> str | None:
    """Make the mutant's change in `tree`; returns the original text, or None when the snippet does not
    occur exactly once (the mutant is not applicable)."""
    if occurrences(tree, mutant) != 1:
        return None
    path = os.path.join(tree, mutant.path)
    with open(path) as f:
        original = f.read()
    with open(path, "w") as f:
        f.write(original.replace(mutant.find, mutant.replace))
    return original


def restore(tree: str, mutant: Mutant, original: str) -> None:
    with open(os.path.join(tree, mutant.path), "w") as f:
        f.write(original)


def check(tree: str, mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(verdict, seconds, detail): 'killed', 'survived', 'not applicable' or 'error'."""
    original = apply(tree, mutant)
    if original is None:
        return "not applicable", 0.0, f"snippet found {occurrences(tree, mutant)} times in {mutant.path}"
    try:
        outcome, seconds, detail = run_tests(tree, mutant.tests, timeout)
    finally:
        restore(tree, mutant, original)
    verdict = {"passed": "survived", "failed": "killed", "timeout": "killed", "error": "error"}[outcome]
    return verdict, seconds, detail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="mutants whose name contains one of these")
    parser.add_argument("--jobs", type=int, default=1, help="mutants checked at a time (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a mutant's tests may take")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests on the unchanged tree"
    )
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or any(w.lower() in m.name.lower() for w in args.only)]
    if args.list:
        for m in mutants:
            found = occurrences(ROOT, m)
            state = "" if found == 1 else f"  [NOT APPLICABLE: snippet found {found} times]"
            print(
                f"{m.name}{state}\n    {m.path}: {m.find!r} -> {m.replace!r}\n    tests: {' '.join(m.tests)}"
            )
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        print("no mutant matches", args.only)
        return 0

    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        trees = Queue()
        for job in range(max(1, args.jobs)):
            trees.put(copy_tree(os.path.join(scratch, f"tree{job}")))
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            tree = trees.get()
            outcome, seconds, detail = run_tests(tree, tests, args.timeout * 2)
            trees.put(tree)
            print(
                f"baseline: the {len(tests)} tests on the unchanged tree {outcome} ({seconds:.0f} s)",
                flush=True,
            )
            if outcome != "passed":
                print(f"  {detail}\nstopped: the mutants' tests must pass on the unchanged tree first")
                return 2

        def one(mutant):
            tree = trees.get()
            try:
                result = check(tree, mutant, args.timeout)
            finally:
                trees.put(tree)
            verdict, seconds, detail = result
            print(f"{verdict.upper():15} {mutant.name} ({seconds:.0f} s){': ' + detail if detail else ''}",
                  flush=True)  # fmt: skip
            return mutant, result

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, mutants))

    by_verdict = {}
    for mutant, (verdict, _, detail) in results:
        by_verdict.setdefault(verdict, []).append((mutant, detail))
    applicable = len(results) - len(by_verdict.get("not applicable", []))
    killed = len(by_verdict.get("killed", []))
    print(
        "\nsummary:", ", ".join(f"{len(v)} {k}" for k, v in sorted(by_verdict.items())), f"of {len(results)}"
    )
    if applicable:
        print(f"killed {killed} of {applicable} applicable mutants ({100 * killed / applicable:.0f}%)")
    for verdict in ("survived", "error", "not applicable"):
        for mutant, detail in by_verdict.get(verdict, []):
            print(f"  {verdict}: {mutant.name} [{mutant.path}]{' - ' + detail if detail else ''}")
    return 1 if by_verdict.get("survived") else 0


if __name__ == "__main__":
    sys.exit(main())
