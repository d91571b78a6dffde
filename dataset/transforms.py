"""Augmentations used by UniMatch, written with torchvision.transforms.v2.

Images are PIL images while they are being augmented (PIL's colour ops are fast on
the CPU) and masks are ``tv_tensors.Mask``, so that every v2 functional op picks
nearest-neighbour interpolation for the mask on its own. ``normalize`` turns both
into plain tensors at the end.

Randomness comes from Python's ``random`` (geometry, CutMix boxes) and torch's
generator (the v2 colour transforms); the training engine seeds both per worker.
"""

import math
import random

import torch
from PIL import Image, ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resize(img, mask, ratio_range=(0.5, 2.0)):
    """Rescale so that the long side becomes a random length in ``ratio_range`` x its current length."""
    h, w = F.get_size(img)
    long_side = random.randint(int(ratio_range[0] * max(h, w)), int(ratio_range[1] * max(h, w)))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        oh, ow = int(h * long_side / w + 0.5), long_side
    img = F.resize(img, [oh, ow], interpolation=v2.InterpolationMode.BILINEAR)
    # NEAREST_EXACT samples pixel centres like the bilinear image resize does, so the
    # mask does not drift by half a pixel against the image. Older torchvision versions
    # ignore the argument for masks and use NEAREST.
    mask = F.resize(mask, [oh, ow], interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return img, mask


def random_crop(img, mask, size, mask_fill=255):
    """Pad on the right/bottom up to ``size``, then cut a random ``size`` x ``size`` window.

    The image is padded with 0 and the mask with ``mask_fill`` so that the padding is
    ignored by the loss.
    """
    h, w = F.get_size(img)
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        img = F.pad(img, [0, 0, pad_w, pad_h], fill=0)
        mask = F.pad(mask, [0, 0, pad_w, pad_h], fill=mask_fill)
        h, w = h + pad_h, w + pad_w
    top = random.randint(0, h - size)
    left = random.randint(0, w - size)
    img = F.crop(img, top, left, size, size)
    mask = F.crop(mask, top, left, size, size)
    return img, mask


def random_hflip(img, mask, p=0.5):
    if random.random() < p:
        img = F.horizontal_flip(img)
        mask = F.horizontal_flip(mask)
    return img, mask


def strong_color_transform():
    """The photometric part of UniMatch's strong view: jitter, grayscale, blur."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            RandomGaussianBlur(p=0.5, sigma=(0.1, 2.0)),
        ]
    )


class RandomGaussianBlur:
    """Gaussian blur with probability ``p`` and sigma ~ U(sigma), by PIL's ``ImageFilter.GaussianBlur``
    (UniMatch's choice): on uint8 images it is 2-4x faster than torchvision's float kernel on a CPU
    (0.15 vs 0.57 ms at 64x64, 2.6 vs 5.2 ms at 321x321), and it never computes on float denormals.
    The draws come from torch's RNG, which the loaders seed per sample.
    """

    def __init__(self, p=0.5, sigma=(0.1, 2.0)):
        self.p = p
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def cutmix_box(size, p=0.5, size_min=0.02, size_max=0.4, ratio_min=0.3, ratio_max=1 / 0.3):
    """A (size, size) LongTensor with a random rectangle of ones, or all zeros with prob 1 - p."""
    box = torch.zeros(size, size, dtype=torch.long)
    if random.random() > p:
        return box

    area = random.uniform(size_min, size_max) * size * size
    # Rejection sampling: draw a shape and a corner until the rectangle fits in the crop.
    while True:
        ratio = random.uniform(ratio_min, ratio_max)
        cut_w = int(math.sqrt(area / ratio))
        cut_h = int(math.sqrt(area * ratio))
        x = random.randint(0, size - 1)
        y = random.randint(0, size - 1)
        if x + cut_w <= size and y + cut_h <= size:
            break

    box[y : y + cut_h, x : x + cut_w] = 1
    return box


def three_boxes(size, num_boxes=3, area_range=(0.25, 0.5)):
    """A (size, size) LongTensor of CutMix regions as CPS and its descendants (CPCL, DUEB) draw them, on
    every image: `num_boxes` rectangles, each of area a / num_boxes of the crop with a ~ U(area_range) and a
    random aspect ratio (height share a^u, u ~ U(0, 1)), inside the crop; where boxes overlap they cancel
    (each box flips the region it covers), so 25-50% of the crop before overlaps."""
    box = torch.zeros(size, size, dtype=torch.long)
    shrink = math.sqrt(1.0 / num_boxes)
    for _ in range(num_boxes):
        area = random.uniform(*area_range)
        height_share = math.exp(random.uniform(0.0, 1.0) * math.log(area))
        cut_h = round(height_share * shrink * size)
        cut_w = round(area / height_share * shrink * size)
        y = round((size - cut_h) * random.uniform(0.0, 1.0))
        x = round((size - cut_w) * random.uniform(0.0, 1.0))
        box[y : y + cut_h, x : x + cut_w] ^= 1
    return box


def normalize(img, mask=None):
    """PIL image -> float tensor (3, H, W) normalized with ImageNet statistics; mask -> LongTensor (H, W)."""
    img = F.to_dtype(F.to_image(img), torch.float32, scale=True)
    img = F.normalize(img, IMAGENET_MEAN, IMAGENET_STD).as_subclass(torch.Tensor)
    if mask is None:
        return img
    mask = torch.as_tensor(mask).as_subclass(torch.Tensor).long()
    return img, mask


def as_mask(array):
    """Wrap a (H, W) numpy array of class indices so that v2 ops treat it as a mask."""
    return tv_tensors.Mask(torch.from_numpy(array))
