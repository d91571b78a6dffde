"""SemiDataset and its augmentations, on tiny images written to tmp_path."""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dataset import transforms as T
from dataset.semi import SemiDataset

MEAN = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
# What a black (padded) pixel becomes after normalisation.
PAD_VALUE = (0 - MEAN) / STD

NCLASS = 5
STEP = 40  # red channel = STEP * (class + 1): never black, classes far apart


def block_mask(h, w, seed=0, block=6):
    """Random classes in blocks, so that most pixels are far from a class boundary."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, NCLASS, (h // block + 1, w // block + 1))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def image_for(mask):
    """An RGB image that encodes the mask: red = STEP * (class + 1); green, blue vary with position."""
    h, w = mask.shape
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = STEP * (mask.astype(np.int64) + 1)
    img[..., 1] = 100 + np.arange(w)[None, :] % 50
    img[..., 2] = 100 + np.arange(h)[:, None] % 50
    return img


def write_sample(root, name, img, mask=None, img_ext="png"):
    os.makedirs(root / "img", exist_ok=True)
    os.makedirs(root / "mask", exist_ok=True)
    img_rel = f"img/{name}.{img_ext}"
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(root / img_rel)
    if mask is None:
        return img_rel
    mask_rel = f"mask/{name}.png"
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(root / mask_rel)
    return f"{img_rel} {mask_rel}"


def write_split(root, lines, name="split.txt"):
    path = root / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def one_sample_split(root, img, mask, img_ext="png"):
    return write_split(root, [write_sample(root, "a", img, mask, img_ext)])


def unnormalize_red(img):
    """Red channel of a normalized image back in 0..255."""
    return (img * STD + MEAN)[0] * 255


def eroded(mask):
    """Pixels whose 3x3 neighbourhood has a single class: bilinear blending cannot reach them.

    Pixels on the border of the crop are left out, their neighbours outside it are unknown.
    """
    m = mask.numpy()
    padded = np.pad(m, 1, constant_values=-1)
    same = np.ones_like(m, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy : dy + m.shape[0], dx : dx + m.shape[1]] == m
    return torch.from_numpy(same)


def check_padding_layout(pad):
    """Padding must be whole bottom rows plus whole columns on one side (left only after a flip)."""
    valid = ~pad
    rows = valid.any(dim=1)
    cols = valid.any(dim=0)
    assert rows.any() and cols.any(), "the crop holds no image at all"
    h0 = int(rows.sum())
    assert rows[:h0].all(), "padding rows must be at the bottom"
    col_idx = torch.nonzero(cols).flatten()
    left, right = int(col_idx.min()), int(col_idx.max())
    assert cols[left : right + 1].all(), "padding columns must be a band at one side"
    assert left == 0 or right == pad.shape[1] - 1, "padding columns on both sides"
    expected = torch.ones_like(pad)
    expected[:h0, left : right + 1] = False
    assert torch.equal(pad, expected)


# ---------------------------------------------------------------------------
# Augmentations


@pytest.mark.parametrize("size", [(30, 40), (70, 52)])
def test_train_l_keeps_image_and_mask_aligned(tmp_path, size):
    mask = block_mask(*size)
    split = one_sample_split(tmp_path, image_for(mask), mask)
    ds = SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=48)
    checked = padded_crops = 0
    for seed in range(60):
        random.seed(seed)
        torch.manual_seed(seed)
        img, out_mask = ds[0]
        assert img.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        assert img.dtype == torch.float32 and out_mask.dtype == torch.int64

        pad = out_mask == 255
        assert set(out_mask[~pad].unique().tolist()) <= set(range(NCLASS))
        if pad.any():
            padded_crops += 1
            check_padding_layout(pad)
            assert torch.allclose(img[:, pad], PAD_VALUE.view(3, 1).expand(3, int(pad.sum())), atol=1e-6)

        inside = eroded(out_mask) & ~pad
        red = unnormalize_red(img)
        expected = STEP * (out_mask.float() + 1)
        assert torch.all((red[inside] - expected[inside]).abs() < STEP / 2)
        checked += int(inside.sum())
    assert checked > 1000
    if size == (30, 40):
        assert padded_crops > 10  # a long side of 20..48 px never fills a 48 px crop


def test_hflip_flips_image_and_mask_together():
    img = Image.fromarray(image_for(block_mask(10, 16)))
    mask = T.as_mask(block_mask(10, 16))
    flipped_img, flipped_mask = T.random_hflip(img, mask, p=1.0)
    assert np.array_equal(np.array(flipped_img), np.array(img)[:, ::-1])
    assert torch.equal(flipped_mask, mask.flip(-1))
    same_img, same_mask = T.random_hflip(img, mask, p=0.0)
    assert np.array_equal(np.array(same_img), np.array(img)) and torch.equal(same_mask, mask)


def test_random_resize_long_side_range():
    img = Image.new("RGB", (40, 30))
    mask = T.as_mask(np.zeros((30, 40), dtype=np.uint8))
    random.seed(0)
    long_sides = set()
    for _ in range(300):
        out_img, out_mask = T.random_resize(img, mask)
        assert out_img.size == (out_mask.shape[1], out_mask.shape[0])
        w, h = out_img.size
        assert 20 <= w <= 80 and h == int(30 * w / 40 + 0.5)
        long_sides.add(w)
    assert min(long_sides) <= 22 and max(long_sides) >= 78


def test_train_u_ignore_mask_is_exactly_the_padding(tmp_path):
    mask = block_mask(10, 12)
    img = image_for(mask)  # no black pixels, so black in the weak view means padding
    split = write_split(tmp_path, [write_sample(tmp_path, "u", img)])
    ds = SemiDataset(str(tmp_path), "train_u", split, NCLASS, crop_size=48)
    for seed in range(40):
        random.seed(seed)
        torch.manual_seed(seed)
        weak, strong1, strong2, ignore_mask, box1, box2 = ds[0]
        for view in (weak, strong1, strong2):
            assert view.shape == (3, 48, 48) and view.dtype == torch.float32
        for t in (ignore_mask, box1, box2):
            assert t.shape == (48, 48) and t.dtype == torch.int64
        assert set(ignore_mask.unique().tolist()) == {0, 255}  # a 24 px long side always needs padding
        pad = ignore_mask == 255
        black = torch.isclose(weak, PAD_VALUE, atol=1e-6).all(dim=0)
        assert torch.equal(pad, black)
        check_padding_layout(pad)
    assert not torch.equal(strong1, strong2) or not torch.equal(strong1, weak)


def test_train_u_strong_views_differ_from_weak(tmp_path):
    img = image_for(block_mask(60, 60))
    split = write_split(tmp_path, [write_sample(tmp_path, "u", img)])
    ds = SemiDataset(str(tmp_path), "train_u", split, NCLASS, crop_size=32)
    torch.manual_seed(0)
    random.seed(0)
    differs = 0
    for _ in range(20):
        weak, strong1, strong2, *_ = ds[0]
        differs += int(not torch.allclose(weak, strong1)) + int(not torch.allclose(strong1, strong2))
    assert differs >= 25  # each strong view is left unchanged with probability 0.2 * 0.8 * 0.5 = 0.08


def test_cutmix_boxes_are_rectangles_of_ones():
    random.seed(0)
    empty = 0
    n = 400
    for _ in range(n):
        box = T.cutmix_box(32, p=0.5)
        assert box.shape == (32, 32) and box.dtype == torch.int64
        assert set(box.unique().tolist()) <= {0, 1}
        if box.sum() == 0:
            empty += 1
            continue
        ys, xs = torch.nonzero(box, as_tuple=True)
        rect = box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert bool(rect.all()), "the ones must form one filled rectangle"
        assert rect.numel() == box.sum()
        assert rect.numel() <= 0.4 * 32 * 32 + 1
    assert 0.4 * n < empty < 0.6 * n


def test_normalize():
    img = Image.fromarray(np.full((4, 5, 3), 255, dtype=np.uint8))
    out, mask = T.normalize(img, T.as_mask(np.ones((4, 5), dtype=np.uint8)))
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32
    assert torch.allclose(out, ((1 - MEAN) / STD).expand(3, 4, 5))
    assert mask.dtype == torch.int64 and type(mask) is torch.Tensor and type(out) is torch.Tensor


def test_blur_is_pils_gaussian_blur_with_a_torch_drawn_sigma():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8))
    blur = T.RandomGaussianBlur(p=1.0, sigma=(0.1, 2.0))
    torch.manual_seed(3)
    out = blur(img)
    torch.manual_seed(3)
    torch.rand(1)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    assert isinstance(out, Image.Image) and out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    assert T.RandomGaussianBlur(p=0.0)(img) is img


# ---------------------------------------------------------------------------
# Modes


def test_val_returns_full_image_mask_and_id(tmp_path):
    mask = block_mask(30, 41)
    line = write_sample(tmp_path, "v", image_for(mask), mask)
    ds = SemiDataset(str(tmp_path), "val", write_split(tmp_path, [line]), NCLASS)
    img, out_mask, sample_id = ds[0]
    assert img.shape == (3, 30, 41) and out_mask.shape == (30, 41)
    assert torch.equal(out_mask, torch.from_numpy(mask).long())
    assert torch.allclose(unnormalize_red(img), STEP * (out_mask.float() + 1), atol=0.01)
    assert sample_id == "img/v.png"


def test_nsample_lengthens_labeled_list(tmp_path):
    mask = block_mask(8, 8)
    lines = [write_sample(tmp_path, f"s{i}", image_for(mask), mask) for i in range(3)]
    split = write_split(tmp_path, lines)
    ds = SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=8, nsample=10)
    assert len(ds) == 10
    assert [s[0] for s in ds.samples] == [f"img/s{i % 3}.png" for i in range(10)]
    # nsample below the list length keeps every labeled image.
    assert len(SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=8, nsample=2)) == 3
    assert len(SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=8)) == 3
    # nsample only concerns the labeled set.
    assert len(SemiDataset(str(tmp_path), "train_u", split, NCLASS, crop_size=8, nsample=10)) == 3


def test_unlabeled_lines_need_no_mask_and_blank_lines_are_skipped(tmp_path):
    img = image_for(block_mask(20, 20))
    lines = ["", write_sample(tmp_path, "a", img), "   ", write_sample(tmp_path, "b", img), ""]
    split = write_split(tmp_path, lines)
    ds = SemiDataset(str(tmp_path), "train_u", split, NCLASS, crop_size=16)
    assert len(ds) == 2
    assert len(ds[1]) == 6
    # A listed but missing mask is ignored for unlabeled images: we never read it.
    split2 = write_split(tmp_path, ["img/a.png mask/does_not_exist.png"], name="u2.txt")
    assert len(SemiDataset(str(tmp_path), "train_u", split2, NCLASS, crop_size=16)) == 1
    # Labeled and validation images do need the mask column.
    for mode in ("train_l", "val"):
        with pytest.raises(ValueError, match=r"split\.txt:2: missing mask column"):
            SemiDataset(str(tmp_path), mode, split, NCLASS, crop_size=16)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_load_as_three_channels(tmp_path, mode):
    mask = block_mask(12, 14)
    img = Image.fromarray(image_for(mask)).convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    split = one_sample_split(tmp_path, img, mask, img_ext=ext)
    img_out, mask_out, _ = SemiDataset(str(tmp_path), "val", split, NCLASS)[0]
    assert img_out.shape == (3, 12, 14) and mask_out.shape == (12, 14)
    if mode != "CMYK":  # lossless: the red channel survives
        red = unnormalize_red(img_out)
        expected = np.array(Image.fromarray(image_for(mask)).convert(mode).convert("RGB"))[..., 0]
        assert torch.allclose(red, torch.from_numpy(expected).float(), atol=0.01)


def test_16_bit_grayscale_image_is_scaled_not_clipped(tmp_path):
    gray = (np.arange(12 * 14).reshape(12, 14) * 390).astype(np.uint16)
    split = one_sample_split(tmp_path, Image.fromarray(gray), block_mask(12, 14))
    img_out, _, _ = SemiDataset(str(tmp_path), "val", split, NCLASS)[0]
    assert img_out.shape == (3, 12, 14)
    expected = torch.from_numpy(np.round(gray / 257.0)).float()
    assert torch.allclose(unnormalize_red(img_out), expected, atol=0.01)


def test_16_bit_masks_are_accepted(tmp_path):
    mask = block_mask(12, 14).astype(np.uint16)
    mask[0, 0] = 255
    mask16 = Image.fromarray(mask)
    assert mask16.mode.startswith("I;16")
    split = one_sample_split(tmp_path, image_for(block_mask(12, 14)), mask16)
    _, mask_out, _ = SemiDataset(str(tmp_path), "val", split, NCLASS)[0]
    assert torch.equal(mask_out, torch.from_numpy(mask.astype(np.int64)))


# ---------------------------------------------------------------------------
# Bad inputs: every error names the file


def test_missing_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        SemiDataset(str(tmp_path), "val", str(tmp_path / "nope.txt"), NCLASS)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_split_file(tmp_path, content):
    split = tmp_path / "empty.txt"
    split.write_text(content)
    with pytest.raises(ValueError, match="empty.*empty.txt"):
        SemiDataset(str(tmp_path), "val", str(split), NCLASS)


@pytest.mark.parametrize("missing", ["image", "mask"])
def test_missing_files_are_reported_with_line_numbers(tmp_path, missing):
    mask = block_mask(8, 8)
    good = write_sample(tmp_path, "good", image_for(mask), mask)
    bad = write_sample(tmp_path, "bad", image_for(mask), mask)
    os.remove(tmp_path / bad.split()[0 if missing == "image" else 1])
    split = write_split(tmp_path, [good, "", bad])
    missing_path = os.path.join(str(tmp_path), bad.split()[0 if missing == "image" else 1])
    with pytest.raises(FileNotFoundError) as err:
        SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=8)
    assert f"{split}:3" in str(err.value) and missing_path in str(err.value)


def test_zero_byte_image(tmp_path):
    mask = block_mask(8, 8)
    split = one_sample_split(tmp_path, image_for(mask), mask)
    (tmp_path / "img" / "a.png").write_bytes(b"")
    ds = SemiDataset(str(tmp_path), "val", split, NCLASS)  # existence is all __init__ checks
    with pytest.raises(ValueError, match=r"img[/\\]a\.png"):
        ds[0]


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image(tmp_path, ext):
    mask = block_mask(64, 64)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    split = one_sample_split(tmp_path, noisy, mask, img_ext=ext)
    path = tmp_path / "img" / f"a.{ext}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = SemiDataset(str(tmp_path), "val", split, NCLASS)
    with pytest.raises(ValueError, match=rf"cannot read image .*a\.{ext}"):
        ds[0]


def test_not_an_image(tmp_path):
    mask = block_mask(8, 8)
    split = one_sample_split(tmp_path, image_for(mask), mask)
    (tmp_path / "mask" / "a.png").write_text("this is not a png")
    with pytest.raises(ValueError, match=r"cannot read mask .*a\.png"):
        SemiDataset(str(tmp_path), "val", split, NCLASS)[0]


def test_rgb_mask_is_rejected(tmp_path):
    mask = block_mask(8, 8)
    rgb_mask = Image.fromarray(mask).convert("RGB")
    split = one_sample_split(tmp_path, image_for(mask), rgb_mask)
    with pytest.raises(
        ValueError, match=r"mask must be single-channel class indices, got RGB: .*mask[/\\]a\.png"
    ):
        SemiDataset(str(tmp_path), "train_l", split, NCLASS, crop_size=8)[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_mask_value_out_of_range(tmp_path, dtype):
    mask = block_mask(8, 8)
    bad = mask.astype(dtype)
    bad[2, 3] = 7
    bad[0, 0] = 255  # the ignore index is fine
    split = one_sample_split(tmp_path, image_for(mask), bad)
    with pytest.raises(ValueError, match=r"mask .*a\.png has values \[7\]"):
        SemiDataset(str(tmp_path), "val", split, NCLASS)[0]
    # The same mask is valid with 8 classes.
    SemiDataset(str(tmp_path), "val", split, 8)[0]


def test_size_mismatch(tmp_path):
    split = one_sample_split(tmp_path, image_for(block_mask(8, 10)), block_mask(8, 9))
    with pytest.raises(ValueError, match=r"img[/\\]a\.png is 10x8.*mask[/\\]a\.png is 9x8"):
        SemiDataset(str(tmp_path), "val", split, NCLASS)[0]


def test_paths_outside_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    mask = block_mask(8, 8)
    line = write_sample(tmp_path, "outside", image_for(mask), mask)  # next to root, not in it
    img_rel, mask_rel = line.split()
    escaping = write_split(root, [f"../{img_rel} ../{mask_rel}"], name="escaping.txt")
    with pytest.raises(ValueError, match=r"\.\./img/outside\.png"):
        SemiDataset(str(root), "val", escaping, NCLASS)
    assert len(SemiDataset(str(root), "val", escaping, NCLASS, allow_outside_root=True)[0]) == 3

    absolute = write_split(root, [f"{tmp_path / img_rel} {tmp_path / mask_rel}"], name="absolute.txt")
    with pytest.raises(ValueError, match="absolute"):
        SemiDataset(str(root), "val", absolute, NCLASS)
    assert len(SemiDataset(str(root), "val", absolute, NCLASS, allow_outside_root=True)[0]) == 3

    # '..' that stays inside the root is fine.
    inside = write_sample(root, "in", image_for(mask), mask)
    detour = " ".join(f"img/../{p}" for p in inside.split())
    assert len(SemiDataset(str(root), "val", write_split(root, [detour], name="ok.txt"), NCLASS)) == 1


def test_bad_arguments(tmp_path):
    mask = block_mask(8, 8)
    split = one_sample_split(tmp_path, image_for(mask), mask)
    with pytest.raises(ValueError, match="mode"):
        SemiDataset(str(tmp_path), "train", split, NCLASS)
    with pytest.raises(ValueError, match="crop_size"):
        SemiDataset(str(tmp_path), "train_l", split, NCLASS)
    three_columns = write_split(tmp_path, ["img/a.png mask/a.png extra"], name="three.txt")
    with pytest.raises(ValueError, match=r"three\.txt:1"):
        SemiDataset(str(tmp_path), "val", three_columns, NCLASS)
