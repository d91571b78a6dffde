"""Querying a guiding labeled image (CISC-R): which labeled images show which classes, and, for a training
crop and its (pseudo-)label, a labeled partner that shares a class with it.

Only the labeled split's masks are ever read here. The class lists are built from them once (a class
counts for an image when it covers at least `min_area` of it) and cached as JSON, named by the hash of
the split file's content, so a changed split gets new lists. Unlabeled images reach this module only as
crops of their pseudo-labels, which the caller made.
"""

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import transforms as T
from dataset.semi import DataError, check_paths, check_same_size, load_image, load_mask, read_split
from util.files import write_atomic

logger = logging.getLogger("semiseg")

IGNORE = 255


def area_fractions(mask: np.ndarray, nclass: int) -> np.ndarray:
    """(nclass,) the fraction of the mask's pixels (padding and ignored pixels included) of each class."""
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=nclass)[:nclass]
    return counts / mask.size


def covering(mask: np.ndarray, nclass: int, min_area: float, exclude_background: bool) -> list[int]:
    """The classes that cover at least `min_area` of the mask, class 0 left out with `exclude_background`."""
    classes = np.flatnonzero(area_fractions(mask, nclass) >= min_area).tolist()
    return [c for c in classes if not (exclude_background and c == 0)]


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class LabeledClasses:
    """The labeled split's images and, per class, the images it covers at least `min_area` of.

    images:  [(image path, mask path)] as in the split file (relative to the data root)
    areas:   per image, {class: fraction of its pixels}
    lists:   {class: [image positions]}; CISC-R's stage 3 replaces them with the best-matching half
    """

    def __init__(self, images, areas, min_area: float, exclude_background: bool, lists=None):
        self.images = [tuple(entry) for entry in images]
        self.areas = areas
        self.position = {image: i for i, (image, _) in enumerate(self.images)}
        if lists is None:
            lists = {}
            for i, fractions in enumerate(areas):
                for c, fraction in sorted(fractions.items()):
                    if fraction >= min_area and not (exclude_background and c == 0):
                        lists.setdefault(c, []).append(i)
        self.lists = {int(c): list(members) for c, members in lists.items()}

    @classmethod
    def load(cls, split: str, root: str, nclass: int, cache_dir: str | None, min_area: float,
             exclude_background: bool, allow_outside_root: bool = False) -> "LabeledClasses":  # fmt: skip
        """The class lists of the labeled `split`, from `cache_dir` when it holds them for this split's
        content, else built from its masks (and cached there, atomically)."""
        digest = file_hash(split)
        cache = os.path.join(cache_dir, f"labeled_classes.{digest[:16]}.json") if cache_dir else None
        found = _read_cache(cache, digest, nclass)
        if found is None:
            entries = read_split(split, need_mask=True)
            check_paths(entries, split, root, allow_outside_root)
            images = [(image, mask) for _, image, mask in entries]
            areas = [_mask_areas(root, image, mask, nclass) for image, mask in images]
            found = {"images": images, "areas": areas}
            if cache is not None:
                record = {"split": split, "sha256": digest, "nclass": nclass, **found}
                try:
                    write_atomic(cache, json.dumps(record))
                except OSError as err:
                    logger.warning(f"could not cache the labeled class lists in {cache}: {err}")
        areas = [{int(c): float(a) for c, a in fractions.items()} for fractions in found["areas"]]
        return cls(found["images"], areas, min_area, exclude_background)

    def with_lists(self, lists: dict[int, list[int]]) -> "LabeledClasses":
        """The same images with other class lists (CISC-R's filtered query lists)."""
        return LabeledClasses(self.images, self.areas, 0.0, False, lists=lists)

    def draw(self, classes: list[int], exclude: int | None) -> int:
        """A labeled image from the concatenated lists of `classes` (an image in several lists is that
        much more likely), never the image `exclude`; a uniform draw when the lists are empty. Python's
        `random` draws (the loaders seed it per sample)."""
        pools = [[i for i in self.lists.get(c, ()) if i != exclude] for c in classes]
        total = sum(len(pool) for pool in pools)
        if total == 0:
            anyone = [i for i in range(len(self.images)) if i != exclude]
            if not anyone:
                raise DataError("the labeled split has a single image: there is no other one to query")
            return anyone[random.randrange(len(anyone))]
        k = random.randrange(total)
        for pool in pools:
            if k < len(pool):
                return pool[k]
            k -= len(pool)
        raise AssertionError("unreachable")


def _read_cache(path: str | None, digest: str, nclass: int) -> dict | None:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if record["sha256"] == digest and record["nclass"] == nclass:
            return record
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning(f"ignoring the class-list cache {path} ({err}); rebuilding it")
    return None


def _mask_areas(root: str, image: str, mask: str, nclass: int) -> dict[int, float]:
    fractions = area_fractions(load_mask(os.path.join(root, mask), nclass), nclass)
    return {int(c): float(fractions[c]) for c in np.flatnonzero(fractions)}


@dataclass
class Partner:
    """A guiding labeled image, weakly augmented to the training crop, and the two regions of the class(es)
    it shares with the query crop (empty when it shares none)."""

    image: torch.Tensor  # (3, S, S) normalized
    mask: torch.Tensor  # (S, S) long, 255 on padding
    region: torch.Tensor  # (S, S) bool: the shared class in the query crop (m_u)
    region_partner: torch.Tensor  # (S, S) bool: the shared class in the partner crop (m_q)


class PartnerQuery:
    """Finds a labeled partner for a training crop, as CISC-R's loader does.

    For a crop with (pseudo-)label y: K = the classes covering >= min_area of the crop (background out with
    `exclude_background`); the partner is drawn from the class lists of K, never the crop's own image
    (unless `allow_self_pair`, the release's behaviour); it gets the weak augmentation (resize, flip, crop),
    re-cropped up to `max_recrops` times until a class of K that it shows (>= min_area) is in its crop;
    then up to `shared_classes` classes of K, in random order, that also cover >= min_area of the partner
    crop make the two regions. Randomness: Python's `random`, which the loaders seed per sample.
    """

    def __init__(self, root: str, classes: LabeledClasses, nclass: int, crop_size: int, min_area: float,
                 exclude_background: bool, shared_classes: int = 1, max_recrops: int = 10,
                 allow_self_pair: bool = False):  # fmt: skip
        self.root, self.classes, self.nclass, self.crop_size = root, classes, nclass, crop_size
        self.min_area, self.exclude_background = min_area, exclude_background
        self.shared_classes, self.max_recrops, self.allow_self_pair = (
            shared_classes,
            max_recrops,
            allow_self_pair,
        )

    def _covering(self, mask: np.ndarray) -> list[int]:
        return covering(mask, self.nclass, self.min_area, self.exclude_background)

    def _load(self, index: int):
        image_path, mask_path = (os.path.join(self.root, p) for p in self.classes.images[index])
        image, mask = load_image(image_path), load_mask(mask_path, self.nclass)
        check_same_size(image.size, mask.shape[::-1], image_path, mask_path)
        image, mask = T.random_resize(image, T.as_mask(mask), (0.5, 2.0))
        return T.random_hflip(image, mask, p=0.5)

    def _crop(self, image, mask, wanted: list[int]):
        """Random crops until one shows a wanted class (at most max_recrops tries; the last one is kept)."""
        for _ in range(self.max_recrops):
            image_crop, mask_crop = T.random_crop(image, mask, self.crop_size, mask_fill=IGNORE)
            shown = np.asarray(mask_crop)
            if not wanted or set(wanted) & set(self._covering(shown)):
                break
        return image_crop, shown

    def for_label(self, label: np.ndarray, own_image: str | None = None) -> Partner:
        """A partner for a crop whose (pseudo-)label is `label` (S, S); `own_image` is the crop's image
        path when it is a labeled image (it is never its own partner)."""
        query_classes = self._covering(label)
        own = None if self.allow_self_pair else self.classes.position.get(own_image)
        index = self.classes.draw(query_classes, own)
        image, mask = self._load(index)
        visible = set(self._covering(np.asarray(mask)))
        image, partner_mask = self._crop(image, mask, [c for c in query_classes if c in visible])

        in_partner = set(self._covering(partner_mask))
        order = list(query_classes)
        random.shuffle(order)
        shared = [c for c in order if c in in_partner][: self.shared_classes]
        image, partner_mask = T.normalize(image, partner_mask)
        return Partner(
            image=image,
            mask=partner_mask,
            region=torch.from_numpy(np.isin(label, shared)),
            region_partner=torch.from_numpy(np.isin(partner_mask.numpy(), shared)),
        )

    def any_partner(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly drawn labeled image, weakly augmented and cropped to show a class (>= min_area):
        the online variant's partner, whose shared class is chosen at the step from the live pseudo-label."""
        image, mask = self._load(random.randrange(len(self.classes.images)))
        image, partner_mask = self._crop(image, mask, self._covering(np.asarray(mask)))
        return T.normalize(image, partner_mask)


class PairedLabeled(Dataset):
    """CISC-R's first stage: each labeled crop (train_l augmentation) with a labeled partner.

    Items: (image, mask, partner image, partner mask, region, partner region)."""

    def __init__(self, labeled, query: PartnerQuery):
        self.labeled, self.query = labeled, query

    def __len__(self):
        return len(self.labeled)

    def __getitem__(self, index):
        image, mask = self.labeled[index]
        own_image = self.labeled.samples[index][0]
        partner = self.query.for_label(mask.numpy(), own_image)
        return image, mask, partner.image, partner.mask, partner.region, partner.region_partner


class PseudoLabeled(Dataset):
    """Unlabeled images with their pseudo-labels (files written by the caller, never the split's masks),
    strongly augmented (resize, crop, flip, then colour jitter, grayscale and blur on the image), each with
    a labeled partner queried by its pseudo-label crop.

    Items: (strong image, pseudo-label (255 on padding), partner image, region, partner region)."""

    def __init__(self, root: str, items: list[tuple[str, str]], nclass: int, crop_size: int,
                 query: PartnerQuery):  # fmt: skip
        self.root, self.items, self.nclass, self.crop_size, self.query = root, items, nclass, crop_size, query
        self.strong = T.strong_color_transform()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, label_path = self.items[index]
        full_image_path = os.path.join(self.root, image_path)
        image, label = load_image(full_image_path), load_mask(label_path, self.nclass)
        check_same_size(image.size, label.shape[::-1], full_image_path, label_path)
        image, label = T.random_resize(image, T.as_mask(label), (0.5, 2.0))
        image, label = T.random_crop(image, label, self.crop_size, mask_fill=IGNORE)
        image, label = T.random_hflip(image, label, p=0.5)
        label = np.asarray(label)
        partner = self.query.for_label(label)
        image, label = T.normalize(self.strong(image), label)
        return image, label, partner.image, partner.region, partner.region_partner


class WithPartner(Dataset):
    """Another dataset's items followed by a labeled partner's (image, mask) (online CISC-R)."""

    def __init__(self, dataset, query: PartnerQuery):
        self.dataset, self.query = dataset, query

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], *self.query.any_partner())


class FullImages(Dataset):
    """Whole images, normalized, without augmentation, with a label map when one is given (a labeled mask
    or a pseudo-label): (image (3, H, W), label (H, W) long or an empty tensor, position in `items`)."""

    def __init__(self, root: str, items: list[tuple[str, str | None]], nclass: int):
        self.root, self.items, self.nclass = root, items, nclass

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, label_path = self.items[index]
        image = load_image(os.path.join(self.root, image_path))
        if label_path is None:
            return T.normalize(image), torch.zeros(0, dtype=torch.long), index
        label_path = os.path.join(self.root, label_path)  # an absolute path stays as it is
        label = load_mask(label_path, self.nclass)
        check_same_size(image.size, label.shape[::-1], os.path.join(self.root, image_path), label_path)
        image, label = T.normalize(image, T.as_mask(label))
        return image, label, index
