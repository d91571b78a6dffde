"""CISC-R (Wu et al., "Querying Labeled for Unlabeled: Cross-Image Semantic Consistency Guided
Semi-Supervised Semantic Segmentation", TPAMI 2023): pseudo-labels rectified by a guiding labeled image.

    torchrun --nproc_per_node=4 CISCR.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/1_16/labeled.txt \
        --unlabeled-id-path splits/pascal/1_16/unlabeled.txt \
        --save-path runs/ciscr_1_16

For an image and its (pseudo-)label, a labeled image sharing a class is queried; the masked average of its
decoder feature over that class is a prototype, and the cosine of every pixel of the image with it is the
CISC map S. The default, `ciscr.mode: staged`, is the paper's pipeline (ST++'s stages), in one command:

  1 train M1 on labeled crops and their labeled partners: CE + BCE(S, own region of the shared class)
  2 pseudo-label every unlabeled image with M1 (multi-scale + flip inference)
  3 class prototypes from M1's labeled features; keep the best-matching part of each class's query list;
    rank the unlabeled images by how well their pseudo-labels agree with the prototypes
  4 train M2 on labeled + reliable images: CE of each pixel weighted by 1 - |m_u - S|, S from frozen M1
  5 pseudo-label the unreliable images with M2
  6 train M3 on labeled + all unlabeled images the same way, M2 the teacher: its best.pth is the result

Each training stage trains a fresh network for ciscr.stage_epochs (default: epochs) epochs of its own data,
as released. `save_path/stage1`, `stage4`, `stage6` are ordinary training folders (resumed like any run),
`pseudo_labels/stage2`, `stage5` hold one PNG per image, `selection/` the ranked lists, `stages.json` the
stages done (with their seconds, and the pseudo-labels' quality where the unlabeled split lists masks),
and `evals.jsonl` (written at the end) every training stage's evaluations, counted in iterations and
seconds from the start of stage 1, of which stage 6's score the run (tools/compare.py). A stop signal
ends the pipeline after the unit of work it is in (exit 75); running the same command again continues
inside the stage that was interrupted; a finished stage is never redone. `ciscr.mode: online` instead runs
one UniMatch loop in which an EMA teacher's CISC map rectifies the unlabeled losses (a variant that is not
in the paper; README, docs/DIFFERENCES.md).
"""

import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from dataset.classes import palette
from dataset.query import FullImages, LabeledClasses, PairedLabeled, PartnerQuery, PseudoLabeled, WithPartner
from dataset.semi import DataError, SemiDataset, check_same_size, load_mask, read_split
from model import build_model
from unimatch import UniMatch, cutmix, trained_on
from util import checkpoint as ckpt
from util.config import ConfigError, check_paths, load_config
from util.data import TrainingData, _mix, train_loader, validation_loader
from util.dist import all_reduce_sum, barrier, broadcast_object, init_distributed
from util.ema import ema_teacher
from util.engine import Method, Networks, Trainer, parse_args, prepare_demo_data, run
from util.engine.device import amp_dtype
from util.engine.logbook import setup_logging
from util.engine.run import EXIT_BAD_INPUT, build_trainer
from util.engine.saving import lock_save_path, prepare_save_path
from util.engine.stop import StopRequested, ignore_stop_signals, process_stop
from util.files import write_atomic
from util.losses import IGNORE
from util.losses.ciscr import (
    choose_shared_classes,
    cisc_map,
    class_prototypes,
    class_scores,
    cross_image_consistency,
    masked_average,
    rectified_cross_entropy,
    rectify_weight,
    region_of,
    reliability,
)
from util.metrics import predict
from util.pseudo_labels import pseudo_label_counts, quality_from_counts

logger = logging.getLogger("semiseg")


def decoder_output(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, H, W), decoder feature (B, C, H/4, W/4), non-negative): the one place that asks
    the model for its decoder feature."""
    out = model(x, features=True)
    return out.logits, out.decoder


# ---------------------------------------------------------------------------------------------- data
def labeled_classes(cfg: dict, cache_dir: str | None) -> LabeledClasses:
    c = cfg["ciscr"]
    return LabeledClasses.load(
        cfg["labeled_id_path"], cfg["data_root"], cfg["nclass"], cache_dir, c["min_class_area"],
        c["exclude_background"], cfg["allow_outside_data_root"],
    )  # fmt: skip


def partner_query(cfg: dict, classes: LabeledClasses) -> PartnerQuery:
    c = cfg["ciscr"]
    return PartnerQuery(
        cfg["data_root"], classes, cfg["nclass"], cfg["crop_size"], c["min_class_area"],
        c["exclude_background"], c["shared_classes"], c["max_recrops"], c["allow_self_pair"],
    )  # fmt: skip


# As released, stage 1 trains on the labeled list twice over when it holds fewer images than this.
SHORT_LABELED_LIST = 200


def stage1_epoch(labeled: int) -> int:
    """Crops in one epoch of stage 1: the labeled list, doubled when it is short (as released)."""
    return 2 * labeled if labeled < SHORT_LABELED_LIST else labeled


def labeled_crops(cfg: dict, nsample: int | None = None) -> SemiDataset:
    return SemiDataset(
        cfg["data_root"], "train_l", cfg["labeled_id_path"], nclass=cfg["nclass"], crop_size=cfg["crop_size"],
        nsample=nsample, allow_outside_root=cfg["allow_outside_data_root"],
    )  # fmt: skip


class Streams(TrainingData):
    """A stage's training streams, 'labeled' and (stages 4, 6) 'unlabeled', each from its own dataset
    through util.data's seeded loaders (so a resumed stage sees the batches an uninterrupted one would),
    and the validation loader. An epoch is one pass over the shorter stream."""

    def __init__(
        self, cfg: dict, datasets: dict, pin_memory: bool, worker_init=None
    ):  # replaces TrainingData's
        if list(datasets) != ["labeled", "unlabeled"][: len(datasets)]:
            raise ValueError(f"streams must be 'labeled' and then 'unlabeled', got {list(datasets)}")
        seed, batch_size, workers = cfg["seed"], cfg["batch_size"], cfg["num_workers"]
        loaders = [
            train_loader(dataset, batch_size, seed, _mix(seed, name), workers, pin_memory, worker_init)
            for name, dataset in datasets.items()
        ]
        self.loaders = [loader for loader, _ in loaders]
        self.samplers = [sampler for _, sampler in loaders]
        self.iters_per_epoch = min(s.batches_per_epoch for s in self.samplers)
        self.val_loader = validation_loader(cfg, pin_memory, worker_init)


# ---------------------------------------------------------------------------------------------- stage 1
class CrossImageSupervised(Method):
    """Stage 1: labeled crops, each with a labeled partner sharing a class; one forward of both.

    L = CE(x) + CE(x_q) + w [BCE(S(x | x_q, m_q), m) + BCE(S(x_q | x, m), m_q)], BCE over labeled pixels.
    """

    uses_unlabeled = False
    cache_dir: str | None = None  # where the labeled class lists are cached (the pipeline's folder)

    def training_data(self, pin_memory: bool, save_path: str | None, worker_init=None) -> Streams:
        classes = labeled_classes(self.cfg, self.cache_dir)
        crops = labeled_crops(self.cfg, nsample=stage1_epoch(len(classes.images)))
        labeled = PairedLabeled(crops, partner_query(self.cfg, classes))
        return Streams(self.cfg, {"labeled": labeled}, pin_memory, worker_init)

    def step(self, batch: dict) -> tuple[dict, dict]:
        img, mask, img_q, mask_q, region, region_q = batch["labeled"]
        logits, feature = decoder_output(self.model, torch.cat((img, img_q)))
        logits, logits_q = logits.chunk(2)
        feature, feature_q = feature.chunk(2)

        size = mask.shape[-2:]
        cisc = cisc_map(feature, masked_average(feature_q, region_q), size)  # S(x | x_q, m_q)
        cisc_q = cisc_map(feature_q, masked_average(feature, region), size)  # S(x_q | x, m)
        consistency = cross_image_consistency(cisc, region, mask != IGNORE) + cross_image_consistency(
            cisc_q, region_q, mask_q != IGNORE
        )
        losses = {
            "x": self.criterion_l(logits, mask) + self.criterion_l(logits_q, mask_q),
            "cisc": self.cfg["ciscr"]["consistency_weight"] * consistency,
        }
        return losses, {"shared": region.flatten(1).any(dim=1).float().mean()}


# ---------------------------------------------------------------------------------------------- stages 4, 6
def load_teacher(cfg: dict, path: str) -> torch.nn.Module:
    """A DeepLabV3+ with the weights of checkpoint `path` (best.pth or latest.pth), in eval mode."""
    teacher = build_model({**cfg, "pretrained": None})
    ckpt.load_model_weights(teacher, ckpt.model_state(ckpt.load(path)), path)
    return teacher.eval()


class RectifiedSelfTraining(Method):
    """Stages 4 and 6: a fresh network on labeled crops and strongly augmented pseudo-labeled crops; each
    unlabeled pixel's CE is weighted by 1 - |m_u - S|, with S from the frozen previous-stage teacher.

    L = CE(x_l) + mean_p (1 - |m_u - S(x_u | x_q, m_q)|)_p CE(z_u, pseudo-label)_p
    """

    cache_dir: str | None = None
    teacher_path: str = ""  # the previous stage's checkpoint
    items: tuple = ()  # (image path, pseudo-label file) of the unlabeled images trained on
    query_lists: dict | None = None  # {class: [labeled image positions]} from stage 3

    def networks(self) -> Networks:
        model = build_model(self.cfg)
        return Networks(
            trained={"model": model}, frozen={"teacher": load_teacher(self.cfg, self.teacher_path)}
        )

    def training_data(self, pin_memory: bool, save_path: str | None, worker_init=None) -> Streams:
        classes = labeled_classes(self.cfg, self.cache_dir)
        if self.query_lists is not None:
            classes = classes.with_lists(self.query_lists)
        unlabeled = PseudoLabeled(
            self.cfg["data_root"], list(self.items), self.cfg["nclass"], self.cfg["crop_size"],
            partner_query(self.cfg, classes),
        )  # fmt: skip
        labeled = labeled_crops(self.cfg, nsample=len(self.items))
        return Streams(self.cfg, {"labeled": labeled, "unlabeled": unlabeled}, pin_memory, worker_init)

    def step(self, batch: dict) -> tuple[dict, dict]:
        img_x, mask_x = batch["labeled"]
        img_u, pseudo_label, img_q, region_u, region_q = batch["unlabeled"]
        valid = pseudo_label != IGNORE

        with torch.no_grad():
            _, feature = decoder_output(self.teacher, torch.cat((img_u, img_q)))
            feature_u, feature_q = feature.chunk(2)
            cisc = cisc_map(feature_u, masked_average(feature_q, region_q), pseudo_label.shape[-2:])
            weight = rectify_weight(cisc, region_u)

        logits_x, logits_u = self.model(torch.cat((img_x, img_u))).split([img_x.shape[0], img_u.shape[0]])
        count_all = self.cfg["ciscr"]["loss_denominator"] == "all"
        losses = {
            "x": self.criterion_l(logits_x, mask_x),
            "u": rectified_cross_entropy(logits_u, pseudo_label, weight, valid, count_all),
        }
        mean_weight = (weight * valid).sum() / valid.sum().clamp(min=1)
        return losses, {"weight": mean_weight, "shared": region_u.flatten(1).any(dim=1).float().mean()}


# ---------------------------------------------------------------------------------------------- online
class OnlineCISCR(UniMatch):
    """`ciscr.mode: online` (not in the paper): UniMatch's step, each unlabeled pixel's confident CE weighted
    by 1 - |m_u - S|. S comes from an EMA teacher (eval mode) and a labeled partner drawn for each
    unlabeled image; the shared class is drawn at the step among the classes covering >= min_class_area of
    both the weak pseudo-label and the partner crop. Regions pasted from the mix image keep weight 1."""

    def __init__(self, cfg: dict, criterion_l, device: torch.device):
        if cfg["ciscr"]["mode"] != "online":
            raise ConfigError(
                "OnlineCISCR is the variant of ciscr.mode=online; the staged method runs from CISCR.py's "
                "command line (give ciscr.mode=online to benchmark or train the online variant)"
            )
        super().__init__(cfg, criterion_l, device)

    def networks(self) -> Networks:
        model = build_model(self.cfg)
        teacher = ema_teacher(model, self.cfg["ciscr"]["ema_decay"])
        teacher.eval()
        return Networks(trained={"model": model}, frozen={"teacher": teacher})

    def training_data(self, pin_memory: bool, save_path: str | None, worker_init=None) -> TrainingData:
        query = partner_query(self.cfg, labeled_classes(self.cfg, save_path))
        return TrainingData(
            self.cfg,
            True,
            pin_memory,
            worker_init,
            wrap_unlabeled=lambda dataset: WithPartner(dataset, query),
        )

    def rectifying_weight(self, img_u_w, pseudo_label, img_q, mask_q) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W) pixel weights 1 - |m_u - S(x_u | x_q, m_q)| and whether each pair shares a class."""
        c, nclass = self.cfg["ciscr"], self.cfg["nclass"]
        with torch.no_grad():
            _, feature = decoder_output(self.teacher, torch.cat((img_u_w, img_q)))
            feature_u, feature_q = feature.chunk(2)
            noise = torch.rand(img_u_w.shape[0], nclass, device=img_u_w.device)
            chosen = choose_shared_classes(
                pseudo_label, mask_q, nclass, c["min_class_area"], c["exclude_background"], noise,
                c["shared_classes"],
            )  # fmt: skip
            prototype = masked_average(feature_q, region_of(mask_q, chosen))
            cisc = cisc_map(feature_u, prototype, pseudo_label.shape[-2:])
            return rectify_weight(cisc, region_of(pseudo_label, chosen)), chosen.any(dim=1)

    def step(self, batch: dict) -> tuple[dict, dict]:
        *unlabeled, img_q, mask_q = batch["unlabeled"]
        img_u_w, _, _, ignore_mask, box1, box2 = unlabeled
        p = self.predict({**batch, "unlabeled": tuple(unlabeled)})
        pseudo_label = p.weak.pseudo_label.masked_fill(ignore_mask == IGNORE, IGNORE)
        weight, shared = self.rectifying_weight(img_u_w, pseudo_label, img_q, mask_q)
        unrectified = torch.ones_like(weight)

        def rectified(logits, view, pixel_weight, stream):
            confident = (view.confidence >= self.cfg["conf_thresh"]).float()
            self.pseudo_labels.add(
                stream, view.pseudo_label, pixel_weight * trained_on(view, thresh), view.truth
            )
            return rectified_cross_entropy(
                logits, view.pseudo_label, pixel_weight * confident, view.ignore_mask != IGNORE
            )

        # each strong view's box comes from the mix image, whose pixels have no partner: weight 1 there
        thresh = self.cfg["conf_thresh"]
        loss_s1, loss_s2 = (
            rectified(view.logits, view, cutmix(weight, unrectified, box), "s")
            for view, box in zip(p.strong_views, (box1, box2))
        )
        loss_fp = rectified(p.weak.logits_fp, p.weak, weight, "fp")
        losses = {
            "x": self.criterion_l(p.labeled_logits, p.labeled_mask) / 2,
            "s1": loss_s1 * 0.25 / 2,
            "s2": loss_s2 * 0.25 / 2,
            "fp": loss_fp * 0.5 / 2,
        }
        valid = ignore_mask != IGNORE
        mean_weight = (weight * valid).sum() / valid.sum().clamp(min=1)
        return losses, {"weight": mean_weight, "shared": shared.float().mean()}

    def after_optimizer_step(self) -> None:
        self.teacher.update(self.unwrapped("model"))


# ------------------------------------------------------------------------------------------- stages 2, 3, 5
def label_file(folder: str, image: str) -> str:
    """Where the pseudo-label of `image` (its path in the split file) goes: the same path inside `folder`,
    with '.png' (an absolute path or '..' cannot lead outside `folder`)."""
    parts = [p for p in os.path.normpath(image).split(os.sep) if p not in ("", ".", "..")]
    return os.path.join(folder, os.path.splitext(os.path.join(*parts))[0] + ".png")


def write_label(path: str, label: np.ndarray, colours: np.ndarray) -> None:
    """A paletted PNG of class indices, written atomically (a killed run leaves no half file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture = Image.fromarray(label.astype(np.uint8), mode="P")
    picture.putpalette(colours.flatten().tolist())
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def chunks(dataset, positions, size: int, workers: int) -> DataLoader:
    """The items of `dataset` at `positions`, in order, as lists of `size` (the last may be shorter). The
    workers leave stop signals to the process (a Ctrl-C reaches them too)."""
    return DataLoader(
        Subset(dataset, list(positions)), batch_size=size, collate_fn=list, num_workers=min(workers, 2),
        generator=torch.Generator(), worker_init_fn=ignore_stop_signals,
    )  # fmt: skip


def by_size(items: list):
    """(images (B, 3, H, W), labels, positions) for each image size among `items`, a list of (image, label,
    position): a chunk's images of one size go through the network as one batch."""
    groups = {}
    for item in items:
        groups.setdefault(tuple(item[0].shape[-2:]), []).append(item)
    for group in groups.values():
        images, labels, positions = zip(*group)
        yield torch.stack(images), torch.stack(labels), list(positions)


def all_gather(rows: list) -> list:
    """Every rank's rows, concatenated in rank order (all ranks get all of them)."""
    if not torch.distributed.is_initialized():
        return rows
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


TRAINING_STAGES = ("stage1", "stage4", "stage6")


def stage_epochs(cfg: dict) -> list[int]:
    """Epochs of stages 1, 4 and 6, each of the stage's own data (stage 1: the labeled list, doubled when
    short; 4: the reliable images; 6: every unlabeled image): ciscr.stage_epochs, else `epochs` each."""
    return cfg["ciscr"]["stage_epochs"] or [cfg["epochs"]] * len(TRAINING_STAGES)


STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")


def combined_evals(stage_records: dict[str, list[dict]], seconds: dict[str, float]) -> list[dict]:
    """The training stages' evaluations (`stage_records`: each stage's evals.jsonl records, in stage order)
    as one run's: iterations counted from the start of stage 1, `total_iters` the three stages' sum,
    `train_seconds` summed over the training stages before, `wall_seconds` counted from the start of
    stage 1, with every stage before (pseudo-labelling and ranking too) at its duration in `seconds`.
    Keys a stage's records lack stay out. Only the last stage's network is the run's result: only its
    records are `deploy` candidates."""
    total = sum(records[-1]["total_iters"] for records in stage_records.values())
    iterations, train_seconds, combined = 0, 0.0, []
    for stage, records in stage_records.items():
        wall_before = sum(seconds.get(earlier, 0.0) for earlier in STAGES[: STAGES.index(stage)])
        for record in records:
            row = {**record, "iteration": iterations + record["iteration"], "total_iters": total}
            row.update(network=f"{stage}/{record['network']}", stage=stage)
            row["deploy"] = stage == TRAINING_STAGES[-1] and record.get("deploy", True)
            if "train_seconds" in record:
                row["train_seconds"] = train_seconds + record["train_seconds"]
            if "wall_seconds" in record:
                row["wall_seconds"] = wall_before + record["wall_seconds"]
            combined.append(row)
        iterations += records[-1]["total_iters"]
        train_seconds += records[-1].get("train_seconds", 0.0)
    return combined


def combine_stage_evals(root: str, seconds: dict[str, float]) -> str:
    """root/evals.jsonl from the training stages' own (combined_evals), so that the staged run reads like
    any other (tools/compare.py); `seconds`: each stage's duration. Returns the path."""
    stage_records = {}
    for stage in TRAINING_STAGES:
        with open(os.path.join(root, stage, "evals.jsonl")) as f:
            stage_records[stage] = [json.loads(line) for line in f if line.strip()]
    path = os.path.join(root, "evals.jsonl")
    lines = combined_evals(stage_records, seconds)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in lines))
    return path


def measurable_masks(unlabeled: list, root: str) -> dict[str, str | None]:
    """{image: its mask in the unlabeled split (read_split's entries) or None}, for measuring pseudo-labels
    only (training never sees these masks). All None, with a warning, when some listed mask is missing."""
    masks = {image: mask for _, image, mask in unlabeled}
    missing = [mask for mask in masks.values() if mask and not os.path.isfile(os.path.join(root, mask))]
    if missing:
        logger.warning(
            f"{len(missing)} of the masks the unlabeled split lists are missing (e.g. "
            f"{os.path.join(root, missing[0])}): the pseudo-labels' quality is not measured"
        )
        return dict.fromkeys(masks)
    return masks


class StagedPipeline:
    """The six stages, each skipped when `stages.json` says it finished. `fit()` runs what is left and
    returns the final network's best val mIoU; util.engine.run turns its faults into exit statuses.

    A stop signal, whenever it comes, ends the unit of work the pipeline is in (a training step, an
    evaluation, a chunk of pseudo-labels, a chunk of the ranking) and then every rank where they meet
    (stop_here): what is written is kept and the same command continues from it."""

    def __init__(self, cfg: dict, save_path: str, source: str):
        self.cfg, self.root, self.source = cfg, save_path, source
        self.dist = init_distributed()
        self.device = self.dist.device
        self.stop = process_stop()
        self.lock = None  # rank 0's lock on save_path/.lock, held until this process ends
        self.manifest_path = os.path.join(save_path, "stages.json")
        # Absolute: the label files are opened beside images that are relative to the data root.
        folder = os.path.abspath(os.path.join(save_path, "pseudo_labels"))
        self.labels = {name: os.path.join(folder, name) for name in ("stage2", "stage5")}
        self.selection = os.path.join(save_path, "selection")

    # -------------------------------------------------------------- bookkeeping
    def read_manifest(self) -> dict:
        """stages.json: the config it was started with, the finished stages' records ("done") and the
        seconds spent in stages that were stopped before they finished ("spent")."""
        if not os.path.isfile(self.manifest_path):
            return {"config": self.cfg, "done": {}, "spent": {}}
        with open(self.manifest_path) as f:
            manifest = json.load(f)
        manifest.setdefault("spent", {})
        changed = sorted(k for k in self.cfg if manifest["config"].get(k, self.cfg[k]) != self.cfg[k])
        if changed:
            logger.warning(
                f"the config differs from the one {self.manifest_path} was started with, in "
                f"{', '.join(changed)}: finished stages are kept as they are"
            )
        return manifest

    def write_manifest(self) -> None:
        if self.dist.is_main:
            write_atomic(self.manifest_path, json.dumps(self.manifest, indent=1))

    def stage(self, name: str, work) -> None:
        """Run `work()` unless stages.json says stage `name` finished; then record it there (rank 0 writes,
        atomically, once every rank is through it) with the seconds it took, over the runs it took. `work`
        returns what to record."""
        if name in self.manifest["done"]:
            return
        self.stop_here(lambda: f"before {name}")
        started, spent = time.monotonic(), self.manifest["spent"].get(name, 0.0)
        try:
            record = work()
        except StopRequested:
            self.manifest["spent"][name] = round(spent + time.monotonic() - started, 1)
            self.write_manifest()
            raise
        barrier()
        record["seconds"] = round(spent + time.monotonic() - started, 1)
        self.manifest["spent"].pop(name, None)
        self.manifest["done"][name] = record
        self.write_manifest()
        logger.info(f"{name} done: {record}")

    def stop_here(self, where) -> None:
        """Called by every rank at the same point: stop every rank (StopRequested) when any was asked to.
        `where()` says where, for the message."""
        if self.stop.agree(self.device):
            raise StopRequested(
                f"stopped by {self.stop.describe()} {where()}; run the same command to continue"
            )

    def stage_config(self, index: int) -> dict:
        """The config of training stage `index` (0, 1, 2 = stages 1, 4, 6): ciscr.stage_epochs[index]
        (default: `epochs`) epochs of the stage's own data, as released. `max_iters`, the single-loop
        methods' budget, is not read."""
        cfg = copy.deepcopy(self.cfg)
        cfg["epochs"] = stage_epochs(cfg)[index]
        cfg["max_iters"] = None
        return cfg

    def teacher_path(self, stage: str) -> str:
        name = "best.pth" if self.cfg["ciscr"]["teacher_checkpoint"] == "best" else "latest.pth"
        return os.path.join(self.root, stage, name)

    # -------------------------------------------------------------- stages
    def train(self, stage: str, method_cls: type, index: int, **context) -> dict:
        """A training stage: an ordinary Trainer in save_path/<stage>, which resumes from its latest.pth."""
        bound = type(method_cls.__name__, (method_cls,), {"cache_dir": self.root, **context})
        try:
            trainer = Trainer(bound, self.stage_config(index), os.path.join(self.root, stage), self.source)
        except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{stage}: {err}") from err
        try:
            best = trainer.fit()
        finally:
            setup_logging(self.root, self.dist.is_main)
        return {"best_miou": best}

    def retrain(self, stage: str, teacher_stage: str, index: int, items: list, query_lists: dict) -> dict:
        """Stage 4 or 6: a fresh network on labeled + `items` (image, pseudo-label file), rectified by the
        frozen network of `teacher_stage`, partners queried from the filtered lists."""
        return self.train(
            stage, RectifiedSelfTraining, index, teacher_path=self.teacher_path(teacher_stage),
            items=tuple(items), query_lists=query_lists,
        )  # fmt: skip

    def labeled_by(self, stage: str, images: list[str]) -> list[tuple[str, str]]:
        """(image, its pseudo-label file from `stage`) for each image."""
        return [(image, label_file(self.labels[stage], image)) for image in images]

    @torch.no_grad()
    def pseudo_label(self, teacher_stage: str, images: list[str], stage: str) -> dict:
        """Hard labels of `images` from multi-scale + flip inference by the network of `teacher_stage`, one
        PNG each in pseudo_labels/<stage>; the ranks share the images; those already labeled (by an
        interrupted run) are skipped. Their quality is measured where the split lists masks."""
        cfg, c, folder = self.cfg, self.cfg["ciscr"], self.labels[stage]
        if self.dist.is_main:
            for parent, _, names in os.walk(folder):  # temporaries of writes a kill interrupted
                for name in names:
                    if ".tmp." in name:
                        os.remove(os.path.join(parent, name))
        barrier()
        model = load_teacher(cfg, self.teacher_path(teacher_stage)).to(self.device)
        # Each rank labels every world_size-th image, c["label_batch_size"] at a time. A chunk is labeled
        # whole or again (an interrupted run batches the same images together, so its labels are the same);
        # chunks whose labels are all on disk are skipped.
        share = range(self.dist.rank, len(images), self.dist.world_size)
        size = c["label_batch_size"]
        todo = [
            i
            for start in range(0, len(share), size)
            if not all(os.path.isfile(label_file(folder, images[j])) for j in share[start : start + size])
            for i in share[start : start + size]
        ]
        logger.info(
            f"pseudo-labelling {len(todo)} of {len(share)} images with {teacher_stage} (this process)"
        )
        dataset = FullImages(cfg["data_root"], [(image, None) for image in images], cfg["nclass"])
        colours, amp = palette(cfg["dataset"], cfg["nclass"]), amp_dtype(cfg["amp"], self.device)
        for n, items in enumerate(chunks(dataset, todo, size, cfg["num_workers"])):
            for batch, _, positions in by_size(items):
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    probs = predict(model, batch.to(self.device), cfg["nclass"], scales=c["tta_scales"],
                                    flip=c["tta_flip"])  # fmt: skip
                for label, i in zip(probs.argmax(dim=1).cpu().numpy(), positions):
                    write_label(label_file(folder, images[i]), label, colours)
            if (n + 1) % 100 == 0:
                logger.info(f"  {(n + 1) * size} images labelled by this process")
            if self.stop.requested:
                break

        def written() -> str:
            count = sum(os.path.isfile(label_file(folder, image)) for image in images)
            return f"in {stage} with {count} of {len(images)} pseudo-labels written"

        self.stop_here(written)
        missing = [image for image in images if not os.path.isfile(label_file(folder, image))]
        if missing:
            raise DataError(f"{len(missing)} pseudo-labels were not written to {folder}, e.g. {missing[0]}")
        quality = self.label_quality(stage, images, f"{stage}'s pseudo-labels")
        return {"images": len(images), "quality": quality}

    def label_quality(self, stage: str, images: list[str], what: str) -> dict | None:
        """`stage`'s pseudo-labels of `images` against the masks the unlabeled split lists for them, as
        util.pseudo_labels measures any method's (accuracy, mIoU, used), logged as `what`; the ranks share
        the images. None where the split lists no mask (or pseudo_label_quality is off), or a mask cannot be
        read (a warning names it: a measurement never stops the run)."""
        pairs = [(label_file(self.labels[stage], image), self.masks[image]) for image in images]
        pairs = [(label, mask) for label, mask in pairs if mask is not None]
        if not pairs:
            return None
        nclass, root = self.cfg["nclass"], self.cfg["data_root"]
        counts, problem = torch.zeros(nclass * nclass + 2, dtype=torch.float64), None
        for label_path, mask_path in pairs[self.dist.rank :: self.dist.world_size]:
            if self.stop.requested:
                break
            mask_path = os.path.join(root, mask_path)
            try:
                label, mask = load_mask(label_path, nclass), load_mask(mask_path, nclass)
                check_same_size(label.shape[::-1], mask.shape[::-1], label_path, mask_path)
            except DataError as err:
                problem = str(err)
                break
            label, mask = (torch.from_numpy(m.astype(np.int64)) for m in (label, mask))
            counts += pseudo_label_counts(label, 1.0, mask, nclass)
        self.stop_here(lambda: f"in {stage} while measuring the pseudo-labels against the masks")
        problems = [problem for problem in all_gather([problem]) if problem]
        if problems:
            logger.warning(f"{what}: quality not measured: {problems[0]}")
            return None
        quality = quality_from_counts(all_reduce_sum(counts.to(self.device)).cpu(), nclass)
        logger.info(f"{what} against the unlabeled split's masks ({len(pairs)} images): {quality}")
        return {"images": len(pairs), **asdict(quality)}

    @torch.no_grad()
    def select(self, teacher_stage: str, images: list[str]) -> dict:
        """Stage 3: class prototypes from the labeled images' features (M1); each class's query list cut to
        the images that match the prototypes best; the unlabeled images ranked by how well their stage-2
        pseudo-labels match them, the best ciscr.reliable_fraction reliable. Written to selection/."""
        cfg, c, nclass = self.cfg, self.cfg["ciscr"], self.cfg["nclass"]

        model = load_teacher(cfg, self.teacher_path(teacher_stage)).to(self.device)
        classes = labeled_classes(cfg, self.root)

        def features(dataset):
            """(decoder feature, label, positions) of this rank's share (every world_size-th image), until
            a stop signal comes (then the ranks stop together at the next stop_here)."""
            share = range(self.dist.rank, len(dataset), self.dist.world_size)
            for items in chunks(dataset, share, c["label_batch_size"], cfg["num_workers"]):
                for images, labels, positions in by_size(items):
                    feature = decoder_output(model, images.to(self.device))[1]
                    yield feature, labels.to(self.device), positions
                if self.stop.requested:
                    return

        def in_stage3() -> str:
            return "in stage3 (its ranking starts over when the same command is run again)"

        labeled = FullImages(cfg["data_root"], classes.images, nclass)
        prototypes = torch.zeros(nclass, cfg["head_channels"], device=self.device)
        for feature, label, _ in features(labeled):
            prototypes += class_prototypes(feature, label, nclass)
        self.stop_here(in_stage3)
        all_reduce_sum(prototypes)

        rows = []
        for feature, label, positions in features(labeled):
            rows += zip(positions, class_scores(feature, prototypes, label).tolist())
        self.stop_here(in_stage3)
        labeled_scores = dict(all_gather(rows))
        keep = c["query_keep_fraction"]
        query_lists = {}
        for cls, members in classes.lists.items():
            ranked = sorted(members, key=lambda i, cls=cls: (labeled_scores[i][cls], i))
            query_lists[cls] = ranked[: max(1, int(len(members) * keep))]

        pseudo = FullImages(cfg["data_root"], self.labeled_by("stage2", images), nclass)
        rows = []
        for feature, label, positions in features(pseudo):
            rows += zip(positions, reliability(class_scores(feature, prototypes, label), label).tolist())
        self.stop_here(in_stage3)
        score = dict(all_gather(rows))
        order = sorted(range(len(images)), key=lambda i: (score[i], i))
        cut = max(1, int(len(images) * c["reliable_fraction"]))
        reliable, unreliable = [images[i] for i in order[:cut]], [images[i] for i in order[cut:]]
        if self.dist.is_main:
            os.makedirs(self.selection, exist_ok=True)
            for name, part in (("reliable.txt", reliable), ("unreliable.txt", unreliable)):
                write_atomic(os.path.join(self.selection, name), "".join(f"{image}\n" for image in part))
            lists = {cls: [classes.images[i][0] for i in members] for cls, members in query_lists.items()}
            write_atomic(
                os.path.join(self.selection, "query_lists.json"), json.dumps(lists, indent=1, sort_keys=True)
            )
            scores = {images[i]: score[i] for i in order}
            write_atomic(os.path.join(self.selection, "scores.json"), json.dumps(scores, indent=1))
        quality = {
            name: self.label_quality("stage2", part, f"stage2's pseudo-labels of the {name} images")
            for name, part in (("reliable", reliable), ("unreliable", unreliable))
        }
        return {"reliable": cut, "unreliable": len(images) - cut, "quality": quality}

    def read_selection(self) -> tuple[list[str], list[str], dict]:
        """Stage 3's reliable and unreliable images, and its query lists as labeled image positions."""

        def lines(name):
            with open(os.path.join(self.selection, name)) as f:
                return [line.strip() for line in f if line.strip()]

        with open(os.path.join(self.selection, "query_lists.json")) as f:
            lists = json.load(f)
        position = labeled_classes(self.cfg, self.root).position
        query_lists = {int(c): [position[image] for image in members] for c, members in lists.items()}
        return lines("reliable.txt"), lines("unreliable.txt"), query_lists

    # -------------------------------------------------------------- the pipeline
    def prepare(self) -> None:
        """The output folder, locked for the whole pipeline, and the demo data (rank 0, the others wait),
        then the paths the stages read."""
        error = None
        if self.dist.is_main:
            try:
                prepare_save_path(self.root)
                self.lock = lock_save_path(self.root)
                prepare_demo_data(self.cfg)
            except (ConfigError, OSError, ValueError) as err:
                error = str(err)
        error = broadcast_object(error)
        if error:
            raise ConfigError(error)
        check_paths(self.cfg, self.source, need_unlabeled=True)
        unlabeled = read_split(self.cfg["unlabeled_id_path"], need_mask=False)
        self.unlabeled_images = [image for _, image, _ in unlabeled]
        self.masks = (
            measurable_masks(unlabeled, self.cfg["data_root"])
            if self.cfg["pseudo_label_quality"]
            else dict.fromkeys(self.unlabeled_images)
        )

    def fit(self) -> float:
        with self.stop.installed():  # a signal from here on stops the pipeline after its unit of work
            return self._fit()

    def _fit(self) -> float:
        self.prepare()
        setup_logging(self.root, self.dist.is_main)
        self.manifest = self.read_manifest()
        left = [stage for stage in STAGES if stage not in self.manifest["done"]]
        logger.info(
            f"CISC-R, staged: {'stages to run: ' + ', '.join(left) if left else 'all stages done'}; "
            f"stages 1, 4, 6 train {stage_epochs(self.cfg)} epochs of their own data"
        )
        images = self.unlabeled_images

        self.stage("stage1", lambda: self.train("stage1", CrossImageSupervised, 0))
        self.stage("stage2", lambda: self.pseudo_label("stage1", images, "stage2"))
        self.stage("stage3", lambda: self.select("stage1", images))
        reliable, unreliable, query_lists = self.read_selection()
        trained_on = self.labeled_by("stage2", reliable)
        self.stage("stage4", lambda: self.retrain("stage4", "stage1", 1, trained_on, query_lists))
        self.stage("stage5", lambda: self.pseudo_label("stage4", unreliable, "stage5"))
        trained_on += self.labeled_by("stage5", unreliable)
        self.stage("stage6", lambda: self.retrain("stage6", "stage4", 2, trained_on, query_lists))

        done = self.manifest["done"]
        if self.dist.is_main:  # the result and its evaluations where eval.py and compare.py look
            with open(os.path.join(self.root, "stage6", "best.pth"), "rb") as f:
                write_atomic(os.path.join(self.root, "best.pth"), f.read())
            combine_stage_evals(self.root, {stage: done[stage].get("seconds", 0.0) for stage in done})
        summary = ", ".join(f"{s} {done[s]['best_miou']:.2f}" for s in TRAINING_STAGES)
        seconds = sum(record.get("seconds", 0.0) for record in done.values())
        logger.info(
            f"CISC-R done in {seconds:.0f}s: best val mIoU {summary}; result in "
            f"{os.path.join(self.root, 'best.pth')}"
        )
        return done["stage6"]["best_miou"]


METHOD = OnlineCISCR  # what tools/benchmark.py and tests/run_training.py build: the single-loop variant


def main(argv=None) -> float:
    args = parse_args(argv, description=__doc__)
    overrides = list(args.overrides)
    if args.labeled_id_path:
        overrides.append(f"labeled_id_path={args.labeled_id_path}")
    if args.unlabeled_id_path:
        overrides.append(f"unlabeled_id_path={args.unlabeled_id_path}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if cfg["ciscr"]["mode"] == "online":
        return run(build_trainer(OnlineCISCR, args.config, args.save_path, overrides))
    return run(StagedPipeline(cfg, args.save_path, args.config))


if __name__ == "__main__":
    main()
