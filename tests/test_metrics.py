import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataset.classes import CLASS_NAMES, class_names, palette
from util.metrics import (
    ShardSampler,
    center_crop,
    evaluate,
    format_iou_table,
    intersection_and_union,
    miou_from,
    predict,
    window_starts,
)

# ----------------------------------------------------------------------------------------------
# intersection_and_union / miou_from
# ----------------------------------------------------------------------------------------------

# 3 classes, 2x4, pixel (1, 2) ignored (its prediction 0 must not count).
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
# Kept (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2)
#   class 0: I = 1, |pred| = 2, |target| = 2 -> U = 3 -> IoU = 33.33
#   class 1: I = 2, |pred| = 3, |target| = 3 -> U = 4 -> IoU = 50
#   class 2: I = 1, |pred| = 2, |target| = 2 -> U = 3 -> IoU = 33.33
#   mIoU = (100/3 + 50 + 100/3) / 3 = 38.888...


def test_intersection_and_union_hand_made():
    inter, union, area = intersection_and_union(PRED, TARGET, 3)
    assert inter.tolist() == [1, 2, 1]
    assert union.tolist() == [3, 4, 3]
    assert area.tolist() == [2, 3, 2]
    assert inter.dtype == union.dtype == torch.long


def test_intersection_and_union_any_shape():
    # (B, H, W) and flat inputs give the same counts.
    batched = intersection_and_union(PRED[None].expand(2, -1, -1), TARGET[None].expand(2, -1, -1), 3)
    flat = intersection_and_union(PRED.flatten(), TARGET.flatten(), 3)
    assert batched[0].tolist() == [2, 4, 2] and batched[1].tolist() == [6, 8, 6]
    assert flat[0].tolist() == [1, 2, 1] and flat[1].tolist() == [3, 4, 3]


def test_intersection_and_union_other_ignore_index_and_out_of_range():
    target = TARGET.clone()
    target[1, 2] = -1  # a custom ignore value
    inter, union, _ = intersection_and_union(PRED, target, 3, ignore_index=-1)
    assert union.tolist() == [3, 4, 3]
    # A stray label (7 >= nclass) is dropped instead of lengthening the counts.
    target[1, 2] = 7
    inter, union, _ = intersection_and_union(PRED, target, 3)
    assert inter.tolist() == [1, 2, 1] and union.tolist() == [3, 4, 3]


def test_intersection_and_union_in_range_ignore_index():
    # ignore_index=2 drops the pixels whose target is 2 ((1,0) and (1,1)); their predictions 2 and 0 vanish.
    # Kept (target, pred): (0,0) (0,1) (1,1) (1,1) (1,2)
    #   -> I = [1, 2, 0], |pred| = [1, 3, 1], |target| = [2, 3, 0], U = [2, 4, 1]
    inter, union, area = intersection_and_union(PRED, TARGET, 3, ignore_index=2)
    assert inter.tolist() == [1, 2, 0]
    assert union.tolist() == [2, 4, 1]
    assert area.tolist() == [2, 3, 0]


def test_miou_hand_made():
    miou, iou = miou_from(*intersection_and_union(PRED, TARGET, 3)[:2])
    assert iou == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert miou == pytest.approx(38.888888, abs=1e-4)


def test_miou_counts_absent_class_as_zero():
    # Class 3 never occurs: IoU 0, and the plain mean is over all 4 classes -> (116.67) / 4 = 29.1667.
    miou, iou = miou_from(*intersection_and_union(PRED, TARGET, 4)[:2])
    assert iou[3] == 0.0
    assert miou == pytest.approx(29.166666, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------


def pointwise_model(nclass=4, seed=0):
    """A 1x1 conv with fixed random weights: translation-equivariant and flip-equivariant."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, nclass, 1)
    nn.init.normal_(conv.weight, std=2.0)
    nn.init.normal_(conv.bias)
    return conv.eval()


class WindowAwareModel(nn.Module):
    """1x1 conv plus a ramp over the *input's* own columns/rows, so the output depends on window placement."""

    def __init__(self, nclass=4):
        super().__init__()
        self.conv = pointwise_model(nclass)

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.arange(w, dtype=x.dtype)[None, :] - 0.5 * torch.arange(h, dtype=x.dtype)[:, None]
        scale = torch.arange(self.conv.out_channels, dtype=x.dtype)[:, None, None]
        return self.conv(x) + scale * ramp


class ConstantModel(nn.Module):
    """Zero logits: each forward adds 1 to the class-summed probability of every pixel it covers."""

    def __init__(self, nclass=3):
        super().__init__()
        self.nclass = nclass

    def forward(self, x):
        return x.new_zeros(x.shape[0], self.nclass, *x.shape[-2:])


def test_sliding_window_equals_sum_over_windows():
    torch.manual_seed(1)
    img = torch.randn(2, 3, 10, 7)
    model = WindowAwareModel(4)
    with torch.no_grad():
        probs = predict(model, img, 4, mode="sliding_window", crop_size=6)
        # crop 6 -> stride 4; rows start 0, 4, 8 and cols 0, 4; windows cut at the border.
        expected = torch.zeros(2, 4, 10, 7)
        for r0, r1 in [(0, 6), (4, 10), (8, 10)]:
            for c0, c1 in [(0, 6), (4, 7)]:
                expected[:, :, r0:r1, c0:c1] += model(img[:, :, r0:r1, c0:c1]).softmax(1)
        whole = model(img).softmax(1)
    assert probs.shape == (2, 4, 10, 7) and probs.dtype == torch.float32
    assert torch.allclose(probs, expected, atol=1e-6)
    assert not torch.allclose(probs.argmax(1), whole.argmax(1))  # the model really is window-aware


def one_window_per_forward(model, img, nclass, crop_size, flip, scales):
    """The inference before batching: every window (and its flip) in a forward of its own."""
    h, w = img.shape[-2:]
    total = torch.zeros(img.shape[0], nclass, h, w)
    for scale in scales:
        size = (max(round(h * scale), 1), max(round(w * scale), 1))
        image = img if scale == 1.0 else F.interpolate(img, size, mode="bilinear", align_corners=True)
        probs = torch.zeros(img.shape[0], nclass, *size)
        for top in window_starts(size[0], crop_size):
            for left in window_starts(size[1], crop_size):
                window = image[:, :, top : top + crop_size, left : left + crop_size]
                window_probs = model(window).softmax(1)
                if flip:
                    window_probs += model(window.flip(3)).softmax(1).flip(3)
                probs[:, :, top : top + crop_size, left : left + crop_size] += window_probs
        total += probs if scale == 1.0 else F.interpolate(probs, (h, w), mode="bilinear", align_corners=True)
    return total


def test_batched_windows_equal_one_window_per_forward():
    from tests.test_model import randomize_bn, small_model

    torch.manual_seed(0)
    model = small_model(nclass=4, head_channels=16, dilations=(1, 2, 3))
    randomize_bn(model)
    model.eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    img = torch.randn(1, 3, 45, 61)
    scales = (0.75, 1.0, 1.25)
    with torch.no_grad():
        expected = one_window_per_forward(model, img, 4, 32, True, scales)
        calls.clear()
        probs = predict(model, img, 4, "sliding_window", crop_size=32, flip=True, scales=scales, max_batch=8)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-5)
    # 6 + 9 + 12 windows (scales 0.75, 1, 1.25: 34 x 46, 45 x 61, 56 x 76) and their flips, of 14 sizes;
    # windows of one size share forwards of up to 8 images: the 9 full 32 x 32 windows of all scales and
    # their flips in 8 + 8 + 2, every other size in one forward: 16 forwards instead of 54
    assert sum(calls) == 2 * (6 + 9 + 12) and len(calls) == 16 and calls.count(8) == 2


def test_sliding_window_covers_every_pixel():
    img = torch.zeros(1, 3, 10, 7)
    probs = predict(ConstantModel(3), img, 3, mode="sliding_window", crop_size=6)
    count = probs.sum(1)[0]  # number of windows covering each pixel
    rows = torch.tensor([1, 1, 1, 1, 2, 2, 1, 1, 2, 2.0])
    cols = torch.tensor([1, 1, 1, 1, 2, 2, 1.0])
    assert torch.allclose(count, rows[:, None] * cols[None, :])
    # An image smaller than the crop is one window.
    assert torch.allclose(
        predict(ConstantModel(3), img, 3, "sliding_window", crop_size=32).sum(1), torch.ones(1)
    )


def test_sliding_window_argmax_equals_original_for_pointwise_model():
    torch.manual_seed(2)
    img = torch.randn(1, 3, 13, 11)
    model = pointwise_model(5)
    with torch.no_grad():
        slide = predict(model, img, 5, mode="sliding_window", crop_size=5)
        orig = predict(model, img, 5, mode="original")
    assert torch.equal(slide.argmax(1), orig.argmax(1))


def test_flip_doubles_probabilities_for_pointwise_model():
    torch.manual_seed(3)
    img = torch.randn(2, 3, 6, 9)
    model = pointwise_model(4)
    with torch.no_grad():
        single = predict(model, img, 4)
        flipped = predict(model, img, 4, flip=True)
        slide_flipped = predict(model, img, 4, mode="sliding_window", crop_size=4, flip=True)
        slide = predict(model, img, 4, mode="sliding_window", crop_size=4)
    assert torch.allclose(flipped, 2 * single, atol=1e-6)
    assert torch.allclose(slide_flipped, 2 * slide, atol=1e-6)


def test_flip_uses_flipped_back_output():
    # A model that labels the left half of whatever it sees as class 1 and the right half as class 0.
    # Its flipped pass labels the original's *right* half as class 1 once flipped back, so class 1 gets
    # ~1 everywhere; forgetting to flip back would give ~2 on the left and ~0 on the right.
    class LeftHalf(nn.Module):
        def forward(self, x):
            w = x.shape[-1]
            logits = x.new_zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 1, :, : w // 2] = 20.0
            logits[:, 0, :, w // 2 :] = 20.0
            return logits

    img = torch.randn(1, 3, 2, 4)
    plain = predict(LeftHalf(), img, 2)
    assert torch.allclose(plain[0, 1], torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]]), atol=1e-6)
    flipped = predict(LeftHalf(), img, 2, flip=True)
    assert torch.allclose(flipped[0, 1], torch.ones(2, 4), atol=1e-6)


def test_scales_repeat_and_resize():
    torch.manual_seed(4)
    img = torch.randn(1, 3, 8, 12)
    model = pointwise_model(3)
    with torch.no_grad():
        once = predict(model, img, 3)
        twice = predict(model, img, 3, scales=(1.0, 1.0))
        # A spatially constant image stays constant under resizing, so any scale gives the same probs.
        flat = img[:, :, :1, :1].expand(1, 3, 8, 12)
        multi = predict(model, flat, 3, scales=(0.5, 1.0, 1.5))
        ref = predict(model, flat, 3)
    assert torch.allclose(twice, 2 * once, atol=1e-6)
    assert multi.shape == (1, 3, 8, 12)
    assert torch.allclose(multi, 3 * ref, atol=1e-5)


def test_predict_rejects_bad_arguments():
    img = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError):
        predict(ConstantModel(), img, 3, mode="tiles")
    with pytest.raises(ValueError):
        predict(ConstantModel(), img, 3, mode="sliding_window")


def test_center_crop():
    img = torch.arange(5 * 7).reshape(1, 1, 5, 7).expand(1, 3, 5, 7)
    mask = torch.arange(5 * 7).reshape(1, 5, 7)
    cimg, cmask = center_crop(img, mask, 3)
    assert cmask[0].tolist() == [[9, 10, 11], [16, 17, 18], [23, 24, 25]]
    assert torch.equal(cimg[:, 0], cmask)
    # Larger than the image along H (5 < 6): that side is kept whole; W starts at (7 - 6) // 2 = 0.
    _, cmask = center_crop(img, mask, 6)
    assert cmask.shape == (1, 5, 6) and cmask[0, 0].tolist() == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


class OneHotModel(nn.Module):
    """Predicts the class stored in image channel 0 (pointwise, so flip/sliding/scale-1 do not change it)."""

    def __init__(self, nclass):
        super().__init__()
        self.nclass = nclass
        self.dummy = nn.Parameter(torch.zeros(()))  # so evaluate can infer the device

    def forward(self, x):
        return 10.0 * F.one_hot(x[:, 0].round().long(), self.nclass).permute(0, 3, 1, 2).to(x.dtype)


class ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        pred, mask = self.items[i]
        img = pred.float()[None].expand(3, -1, -1).clone()
        return img, mask, f"img_{i}"


# Two images of different sizes: (predicted classes, mask).
EVAL_ITEMS = [
    (torch.tensor([[0, 0, 1], [1, 2, 2]]), torch.tensor([[0, 1, 1], [1, 2, 255]])),
    (torch.tensor([[2, 2], [0, 0], [1, 1]]), torch.tensor([[2, 0], [0, 0], [1, 255]])),
]
# (target, pred) pairs: image 1: (0,0) (1,0) (1,1) (1,1) (2,2); image 2: (2,2) (0,2) (0,0) (0,0) (1,1)
#   class 0: I = 3, |pred| = 4, |target| = 4 -> U = 5 -> 60
#   class 1: I = 3, |pred| = 3, |target| = 4 -> U = 4 -> 75
#   class 2: I = 2, |pred| = 3, |target| = 2 -> U = 3 -> 66.67
#   mIoU = (60 + 75 + 200/3) / 3 = 67.2222


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "sliding_window", "crop_size": 2},
        {"flip": True},
        {"scales": (1.0, 1.0)},
        {"amp_dtype": torch.bfloat16},
    ],
)
def test_evaluate_end_to_end(kwargs):
    dataset = ListDataset(EVAL_ITEMS)
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(dataset))
    model = OneHotModel(3).train()
    result = evaluate(model, loader, 3, **kwargs)
    assert not model.training
    assert result["intersection"].tolist() == [3, 3, 2]
    assert result["union"].tolist() == [5, 4, 3]
    assert result["iou"] == pytest.approx([60.0, 75.0, 200 / 3])
    assert result["miou"] == pytest.approx(67.2222, abs=1e-3)


def test_evaluate_center_crop():
    # Crop size 1 keeps the central pixel: image 1 (2x3) -> (0, 1): target 1, pred 0;
    # image 2 (3x2) -> (1, 0): target 0, pred 0. Class 0: I=1, U=2 -> 50; class 1: I=0, U=1 -> 0; class 2: 0.
    dataset = ListDataset(EVAL_ITEMS)
    loader = DataLoader(dataset, batch_size=1)
    result = evaluate(OneHotModel(3), loader, 3, mode="center_crop", crop_size=1)
    assert result["iou"] == pytest.approx([50.0, 0.0, 0.0])


# ----------------------------------------------------------------------------------------------
# ShardSampler, table, classes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_sampler_partitions(n, world_size):
    data = list(range(n))
    shards = [list(ShardSampler(data, rank=r, world_size=world_size)) for r in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == data  # every index exactly once
    assert [len(ShardSampler(data, rank=r, world_size=world_size)) for r in range(world_size)] == [
        len(s) for s in shards
    ]


def test_shard_sampler_defaults_without_distributed():
    assert list(ShardSampler(range(4))) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        ShardSampler(range(4), rank=2, world_size=2)


def test_format_iou_table():
    table = format_iou_table([50.0, 25.0], ["background", "cat"])
    lines = table.splitlines()
    assert lines[1].split() == ["background", "50.00"]
    assert lines[2].split() == ["cat", "25.00"]
    assert lines[-1].split() == ["mIoU", "37.50"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_class_names_and_palette():
    assert len(CLASS_NAMES["pascal"]) == 21 and CLASS_NAMES["pascal"][0] == "background"
    assert len(CLASS_NAMES["cityscapes"]) == 19
    assert len(CLASS_NAMES["coco"]) == 81 and CLASS_NAMES["coco"][1] == "person"
    assert class_names("pascal", 21)[15] == "person"
    assert class_names("pascal", 3) == ("class_0", "class_1", "class_2")
    assert class_names("unknown", 2) == ("class_0", "class_1")

    voc = palette("pascal", 21)
    assert voc.shape == (256, 3) and voc.dtype.name == "uint8"
    assert voc[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert voc[15].tolist() == [192, 128, 128]  # person
    assert voc[255].tolist() == [255, 255, 255]
    city = palette("cityscapes", 19)
    assert city[0].tolist() == [128, 64, 128] and city[18].tolist() == [119, 11, 32]
    assert city[255].tolist() == [255, 255, 255]
