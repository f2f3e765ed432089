"""adapters.evaluation.data: local ImageNet folders (layout, preprocessing, subsets, errors), offline photographs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.evaluation.data import (DataError, ImageNetFolder, ImageNetTrain, ImageNetValidation, PhotoCrops,
                           resize_and_crop)


def _write_jpeg(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture()
def imagenet(tmp_path: Path) -> Path:
    """A miniature ImageNet: 3 classes x 3 images in train/, 3 x 1 in val/, non-square sizes."""
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for i in range(3):
            _write_jpeg(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG", 48 + 8 * i, 40, seed=10 * c + i)
        _write_jpeg(tmp_path / "val" / wnid / f"ILSVRC2012_val_{c:08d}.JPEG", 40, 56, seed=100 + c)
    return tmp_path


def test_train_items_follow_taming_format(imagenet: Path) -> None:
    ds = ImageNetTrain(root=str(imagenet), size=32)
    assert len(ds) == 9
    item = ds[4]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["synset"] == "n01443537" and item["class_label"] == 1
    assert item["file_path_"].endswith(".JPEG")


def test_val_center_crop_is_deterministic_and_matches_manual_preprocessing(imagenet: Path) -> None:
    ds = ImageNetValidation(root=str(imagenet), size=32)
    a, b = ds[0]["image"], ds[0]["image"]
    np.testing.assert_array_equal(a, b)
    with Image.open(ds.items[0][0]) as img:
        expect = resize_and_crop(img, 32, random_crop=False)
    np.testing.assert_allclose(a, expect / 127.5 - 1.0, atol=1e-6)


def test_shorter_side_resize_then_crop() -> None:
    img = Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))  # h=40, w=80
    out = resize_and_crop(img, 20, random_crop=True, rng=np.random.default_rng(0))
    assert out.shape == (20, 20, 3)


def test_chw_layout_for_enhancing(imagenet: Path) -> None:
    ds = ImageNetFolder(root=str(imagenet), split="val", size=24, layout="chw")
    x = ds[1]["image"]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 24, 24)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_class_subset_and_size_limit(imagenet: Path) -> None:
    two = ImageNetTrain(root=str(imagenet), size=16, classes=2)
    assert two.synsets == ["n01440764", "n01443537"] and len(two) == 6
    named = ImageNetTrain(root=str(imagenet), size=16, classes=["n01484850"])
    assert len(named) == 3 and named[0]["class_label"] == 0
    limited = ImageNetTrain(root=str(imagenet), size=16, max_images=3)
    assert len(limited) == 3
    assert {s for _, s in limited.items} == {"n01440764", "n01443537", "n01484850"}  # spread over classes


def test_root_from_environment(imagenet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGENET_ROOT", str(imagenet))
    assert len(ImageNetValidation(size=16)) == 3


@pytest.mark.parametrize("case, message", [
    ("unset", "IMAGENET_ROOT"),
    ("not_a_folder", "is not a folder"),
    ("no_split", "does not exist"),
    ("no_classes", "no class folders"),
    ("no_images", "no images"),
    ("unknown_class", "classes not found"),
])
def test_bad_roots_give_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, imagenet: Path,
                                        case: str, message: str) -> None:
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    kwargs: dict = {"size": 16}
    if case == "not_a_folder":
        kwargs["root"] = str(tmp_path / "nowhere")
    elif case == "no_split":
        (tmp_path / "empty_root").mkdir()
        kwargs["root"] = str(tmp_path / "empty_root")
    elif case == "no_classes":
        _write_jpeg(tmp_path / "flat" / "train" / "loose.JPEG", 20, 20, 0)
        kwargs["root"] = str(tmp_path / "flat")
    elif case == "no_images":
        (tmp_path / "hollow" / "train" / "n00000001").mkdir(parents=True)
        kwargs["root"] = str(tmp_path / "hollow")
    elif case == "unknown_class":
        kwargs.update(root=str(imagenet), classes=["n99999999"])
    with pytest.raises(DataError, match=message):
        ImageNetTrain(**kwargs)


def test_unreadable_image_names_the_file(imagenet: Path) -> None:
    bad = imagenet / "val" / "n01440764" / "ILSVRC2012_val_00000000.JPEG"
    bad.write_bytes(b"not a jpeg")
    ds = ImageNetValidation(root=str(imagenet), size=16)
    with pytest.raises(DataError, match="cannot read image .*ILSVRC2012_val_00000000"):
        ds[0]


def test_bad_options() -> None:
    with pytest.raises(DataError, match="unknown layout"):
        PhotoCrops(size=16, length=2, layout="nhwc")
    with pytest.raises(DataError, match="unknown photograph"):
        PhotoCrops(size=16, length=2, photos=["lena"])
    with pytest.raises(DataError, match="smaller than size"):
        PhotoCrops(size=2048, length=2, photos=["chelsea"])


def test_photo_crops_are_real_varied_images() -> None:
    ds = PhotoCrops(size=32, length=6, photos=["astronaut", "coffee", "rocket"], scale_to=128)
    xs = np.stack([ds[i]["image"] for i in range(6)])
    assert xs.shape == (6, 32, 32, 3) and -1.0 <= xs.min() and xs.max() <= 1.0
    assert xs.std() > 0.1  # photographs, not constants
    assert not np.array_equal(xs[0], xs[3])  # same photo, different random crop (almost surely)
    val = PhotoCrops(size=32, length=4, photos=["chelsea"], random_crop=False, scale_to=128)
    np.testing.assert_array_equal(val[2]["image"], val[2]["image"])
    chw = PhotoCrops(size=32, length=1, photos=["coffee"], layout="chw")[0]["image"]
    assert chw.shape == (3, 32, 32) and 0.0 <= float(chw.min()) and float(chw.max()) <= 1.0


def test_resize_is_bilinear_without_antialias_like_taming_cv2() -> None:
    """Halving with cv2's INTER_LINEAR (taming's SmallestMaxSize) averages 2x2 blocks; PIL's antialiased BILINEAR
    would blur over a wider window."""
    from PIL import Image

    from adapters.evaluation.data import resize_and_crop

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = resize_and_crop(Image.fromarray(arr), 32, random_crop=False)
    blocks = arr.astype(np.float64).reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    expect = np.round(blocks[:, 8:40])  # centre crop of the 32x48 result
    assert np.abs(out.astype(np.float64) - expect).max() <= 1


def test_random_crops_follow_torch_seed() -> None:
    import torch
    from PIL import Image

    from adapters.evaluation.data import resize_and_crop

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    torch.manual_seed(3)
    a = resize_and_crop(img, 64, random_crop=True)
    torch.manual_seed(3)
    b = resize_and_crop(img, 64, random_crop=True)
    assert np.array_equal(a, b)
