"""Offline pseudo-labels, as a multi-stage method writes them (CISC-R's stages 2 and 5, like ST++'s): one
paletted PNG per unlabeled image from a network's multi-scale + flip inference, shared among the ranks,
resumable chunk by chunk; and their quality against the masks the unlabeled split happens to list
(util.pseudo_labels' measures), which training never reads.
"""

import logging
import os
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from dataset.classes import palette
from dataset.query import FullImages
from dataset.semi import DataError, check_same_size, load_mask
from util.dist import DistInfo, all_gather_objects, all_reduce_sum, barrier
from util.engine.device import amp_dtype
from util.engine.stop import GracefulStop, ignore_stop_signals
from util.files import write_atomic
from util.metrics import predict
from util.pseudo_labels import pseudo_label_counts, quality_from_counts

logger = logging.getLogger("semiseg")


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
    return [row for part in all_gather_objects(rows) for row in part]


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


class PseudoLabeller:
    """Writes and measures the pseudo-labels of named stages, each in its own folder. `stop_here(where)` is
    the pipeline's: every rank calls it at the same points, and it raises StopRequested when any rank was
    signalled; a chunk in progress is finished first."""

    def __init__(
        self, cfg: dict, dist: DistInfo, stop: GracefulStop, stop_here, folders: dict[str, str], masks: dict
    ):
        self.cfg, self.dist, self.stop, self.stop_here = cfg, dist, stop, stop_here
        self.folders = folders  # {stage: absolute folder of its label files}
        self.masks = masks  # {image: its mask in the unlabeled split, or None}

    def labeled_by(self, stage: str, images: list[str]) -> list[tuple[str, str]]:
        """(image, its pseudo-label file from `stage`) for each image."""
        return [(image, label_file(self.folders[stage], image)) for image in images]

    @torch.no_grad()
    def write(self, model: torch.nn.Module, images: list[str], stage: str) -> dict:
        """Hard labels of `images` from `model`'s multi-scale + flip inference, one PNG each in `stage`'s
        folder; the ranks share the images; those already labeled (by an interrupted run) are skipped.
        Returns the stage's record: how many, and their quality where the split lists masks."""
        cfg, c, folder, device = self.cfg, self.cfg["ciscr"], self.folders[stage], self.dist.device
        if self.dist.is_main:
            for parent, _, names in os.walk(folder):  # temporaries of writes a kill interrupted
                for name in names:
                    if ".tmp." in name:
                        os.remove(os.path.join(parent, name))
        barrier()
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
        logger.info(f"pseudo-labelling {len(todo)} of {len(share)} images for {stage} (this process)")
        dataset = FullImages(cfg["data_root"], [(image, None) for image in images], cfg["nclass"])
        colours, amp = palette(cfg["dataset"], cfg["nclass"]), amp_dtype(cfg["amp"], device)
        for n, items in enumerate(chunks(dataset, todo, size, cfg["num_workers"])):
            for batch, _, positions in by_size(items):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    probs = predict(model, batch.to(device), cfg["nclass"], scales=c["tta_scales"],
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
        return {"images": len(images), "quality": self.quality(stage, images, f"{stage}'s pseudo-labels")}

    def quality(self, stage: str, images: list[str], what: str) -> dict | None:
        """`stage`'s pseudo-labels of `images` against the masks the unlabeled split lists for them, as
        util.pseudo_labels measures any method's (accuracy, mIoU, used), logged as `what`; the ranks share
        the images. None where the split lists no mask (or pseudo_label_quality is off), or a mask cannot be
        read (a warning names it: a measurement never stops the run)."""
        pairs = [(label_file(self.folders[stage], image), self.masks[image]) for image in images]
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
        quality = quality_from_counts(all_reduce_sum(counts.to(self.dist.device)).cpu(), nclass)
        logger.info(f"{what} against the unlabeled split's masks ({len(pairs)} images): {quality}")
        return {"images": len(pairs), **asdict(quality)}
