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
as released, at ciscr.stage_lr (default: lr). `save_path/stage1`, `stage4`, `stage6` are ordinary training
folders (resumed like any run), `pseudo_labels/stage2`, `stage5` hold one PNG per image, `selection/` the
ranked lists, `stages.json` the stages done (with their seconds, and the pseudo-labels' quality where the
unlabeled split lists masks), and `evals.jsonl` (written at the end) every training stage's evaluations,
counted in iterations and seconds from the start of stage 1, of which stage 6's score the run
(tools/compare.py). A stop signal ends the pipeline after the unit of work it is in (exit 75); running the
same command again continues inside the stage that was interrupted; a finished stage is never redone.
`ciscr.mode: online` instead runs one UniMatch loop in which an EMA teacher's CISC map rectifies the
unlabeled losses (a variant that is not in the paper; README, docs/DIFFERENCES.md).
"""

import copy
import json
import logging
import os
import sys

import torch

from dataset.query import FullImages, LabeledClasses, PairedLabeled, PartnerQuery, PseudoLabeled, WithPartner
from dataset.semi import SemiDataset, read_split
from model import build_model
from unimatch import UniMatch, cutmix, trained_on
from util import checkpoint as ckpt
from util.config import ConfigError, check_paths, load_config
from util.data import TrainingData, _mix, train_loader, validation_loader
from util.dist import all_reduce_sum, broadcast_object, init_distributed
from util.ema import ema_teacher
from util.engine import Method, Networks, Trainer, parse_args, prepare_demo_data, run
from util.engine.logbook import setup_logging
from util.engine.run import EXIT_BAD_INPUT, build_trainer
from util.engine.saving import lock_save_path, prepare_save_path
from util.engine.stages import StageBook, combine_stage_evals
from util.engine.stop import process_stop
from util.files import write_atomic
from util.labelling import PseudoLabeller, all_gather, by_size, chunks, measurable_masks
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


# ---------------------------------------------------------------------------------------------- stages
STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
TRAINING_STAGES = ("stage1", "stage4", "stage6")


def stage_epochs(cfg: dict) -> list[int]:
    """Epochs of stages 1, 4 and 6, each of the stage's own data (stage 1: the labeled list, doubled when
    short; 4: the reliable images; 6: every unlabeled image): ciscr.stage_epochs, else `epochs` each."""
    return cfg["ciscr"]["stage_epochs"] or [cfg["epochs"]] * len(TRAINING_STAGES)


def stage_lrs(cfg: dict) -> list[float]:
    """Learning rates of stages 1, 4 and 6: ciscr.stage_lr, else `lr` each (as released)."""
    return cfg["ciscr"]["stage_lr"] or [cfg["lr"]] * len(TRAINING_STAGES)


def stage_config(cfg: dict, index: int) -> dict:
    """The config of training stage `index` (0, 1, 2 = stages 1, 4, 6): ciscr.stage_epochs[index]
    (default: `epochs`) epochs of the stage's own data, as released, at ciscr.stage_lr[index] (default:
    `lr`). `max_iters`, the single-loop methods' budget, is not read."""
    cfg = copy.deepcopy(cfg)
    cfg["epochs"] = stage_epochs(cfg)[index]
    cfg["lr"] = stage_lrs(cfg)[index]
    cfg["max_iters"] = None
    return cfg


class StagedPipeline:
    """The six stages, each skipped when `stages.json` says it finished. `fit()` runs what is left and
    returns the final network's best val mIoU; util.engine.run turns its faults into exit statuses.

    A stop signal, whenever it comes, ends the unit of work the pipeline is in (a training step, an
    evaluation, a chunk of pseudo-labels, a chunk of the ranking) and then every rank where they meet
    (StageBook.stop_here): what is written is kept and the same command continues from it. The bookkeeping
    is util.engine.stages.StageBook's, the pseudo-label files util.labelling.PseudoLabeller's."""

    def __init__(self, cfg: dict, save_path: str, source: str):
        self.cfg, self.root, self.source = cfg, save_path, source
        self.dist = init_distributed()
        self.device = self.dist.device
        self.stop = process_stop()
        self.lock = None  # rank 0's lock on save_path/.lock, held until this process ends
        self.book = StageBook(save_path, cfg, self.dist, self.stop)
        self.selection = os.path.join(save_path, "selection")

    def teacher_path(self, stage: str) -> str:
        name = "best.pth" if self.cfg["ciscr"]["teacher_checkpoint"] == "best" else "latest.pth"
        return os.path.join(self.root, stage, name)

    def teacher(self, stage: str) -> torch.nn.Module:
        """The network `stage` trained (its teacher_checkpoint), on the device, for inference."""
        return load_teacher(self.cfg, self.teacher_path(stage)).to(self.device)

    # -------------------------------------------------------------- stages
    def train(self, stage: str, method_cls: type, index: int, **context) -> dict:
        """A training stage: an ordinary Trainer in save_path/<stage>, which resumes from its latest.pth."""
        bound = type(method_cls.__name__, (method_cls,), {"cache_dir": self.root, **context})
        try:
            trainer = Trainer(
                bound, stage_config(self.cfg, index), os.path.join(self.root, stage), self.source
            )
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

    @torch.no_grad()
    def select(self, teacher_stage: str, images: list[str]) -> dict:
        """Stage 3: class prototypes from the labeled images' features (M1); each class's query list cut to
        the images that match the prototypes best; the unlabeled images ranked by how well their stage-2
        pseudo-labels match them, the best ciscr.reliable_fraction reliable. Written to selection/."""
        cfg, c, nclass = self.cfg, self.cfg["ciscr"], self.cfg["nclass"]

        model = self.teacher(teacher_stage)
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
        self.book.stop_here(in_stage3)
        all_reduce_sum(prototypes)

        rows = []
        for feature, label, positions in features(labeled):
            rows += zip(positions, class_scores(feature, prototypes, label).tolist())
        self.book.stop_here(in_stage3)
        labeled_scores = dict(all_gather(rows))
        keep = c["query_keep_fraction"]
        query_lists = {}
        for cls, members in classes.lists.items():
            ranked = sorted(members, key=lambda i, cls=cls: (labeled_scores[i][cls], i))
            query_lists[cls] = ranked[: max(1, int(len(members) * keep))]

        pseudo = FullImages(cfg["data_root"], self.labeller.labeled_by("stage2", images), nclass)
        rows = []
        for feature, label, positions in features(pseudo):
            rows += zip(positions, reliability(class_scores(feature, prototypes, label), label).tolist())
        self.book.stop_here(in_stage3)
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
            name: self.labeller.quality("stage2", part, f"stage2's pseudo-labels of the {name} images")
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
        masks = (
            measurable_masks(unlabeled, self.cfg["data_root"])
            if self.cfg["pseudo_label_quality"]
            else dict.fromkeys(self.unlabeled_images)
        )
        # Absolute: the label files are opened beside images that are relative to the data root.
        folder = os.path.abspath(os.path.join(self.root, "pseudo_labels"))
        folders = {stage: os.path.join(folder, stage) for stage in ("stage2", "stage5")}
        self.labeller = PseudoLabeller(self.cfg, self.dist, self.stop, self.book.stop_here, folders, masks)

    def fit(self) -> float:
        with self.stop.installed():  # a signal from here on stops the pipeline after its unit of work
            return self._fit()

    def _fit(self) -> float:
        self.prepare()
        setup_logging(self.root, self.dist.is_main)
        self.book.read()
        left = [stage for stage in STAGES if stage not in self.book.done]
        logger.info(
            f"CISC-R, staged: {'stages to run: ' + ', '.join(left) if left else 'all stages done'}; "
            f"stages 1, 4, 6 train {stage_epochs(self.cfg)} epochs of their own data at lr "
            f"{stage_lrs(self.cfg)}"
        )
        images = self.unlabeled_images

        stage, labeller = self.book.run, self.labeller
        stage("stage1", lambda: self.train("stage1", CrossImageSupervised, 0))
        stage("stage2", lambda: labeller.write(self.teacher("stage1"), images, "stage2"))
        stage("stage3", lambda: self.select("stage1", images))
        reliable, unreliable, query_lists = self.read_selection()
        trained_on = labeller.labeled_by("stage2", reliable)
        stage("stage4", lambda: self.retrain("stage4", "stage1", 1, trained_on, query_lists))
        stage("stage5", lambda: labeller.write(self.teacher("stage4"), unreliable, "stage5"))
        trained_on += labeller.labeled_by("stage5", unreliable)
        stage("stage6", lambda: self.retrain("stage6", "stage4", 2, trained_on, query_lists))

        done = self.book.done
        if self.dist.is_main:  # the result and its evaluations where eval.py and compare.py look
            with open(os.path.join(self.root, "stage6", "best.pth"), "rb") as f:
                write_atomic(os.path.join(self.root, "best.pth"), f.read())
            seconds = {stage: done[stage].get("seconds", 0.0) for stage in STAGES}
            # Each retraining stage's newest written pseudo-labels, as a single run's records carry theirs.
            written = {"stage4": done["stage2"].get("quality"), "stage6": done["stage5"].get("quality")}
            pseudo_labels = {stage: {"written": quality} for stage, quality in written.items() if quality}
            combine_stage_evals(self.root, TRAINING_STAGES, seconds, pseudo_labels)
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
