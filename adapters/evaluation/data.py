"""Datasets for both upstream trainers: a local ImageNet folder and an offline set of photographs.

Both are plain ``torch.utils.data.Dataset``s that configs name with ``target:``; nothing here ever downloads.

Batch formats (``layout``):
  * ``"hwc"`` (default): latent-diffusion / taming. ``{"image": float32 (H, W, 3) in [-1, 1], ...}``; the model's
    ``get_input`` permutes to (B, 3, H, W).
  * ``"chw"``: enhancing-transformers. ``{"image": float32 (3, H, W) in [0, 1], ...}``.
Every item also carries ``class_label`` (int), ``synset`` / ``file_path_`` (ImageNet) or ``photo`` (photographs).

Preprocessing follows taming's ``ImagePaths``: convert to RGB, resize so the shorter side is ``size`` (bilinear),
then a random (training) or centre crop of ``size`` x ``size``.

ImageNet layout (the usual ``ILSVRC2012`` extraction; what ``torchvision.datasets.ImageFolder`` reads)::

    <root>/train/<wnid>/*.JPEG      e.g. <root>/train/n01440764/n01440764_10026.JPEG
    <root>/val/<wnid>/*.JPEG        validation images sorted into class folders

The root comes from the config (``root:``) or, when that is empty, from ``$IMAGENET_ROOT``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_ROOT_ENV = "IMAGENET_ROOT"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
LAYOUTS = ("hwc", "chw")
# scikit-image photographs bundled in its wheel (no download): (name, loader attribute, index into a tuple result)
SKIMAGE_PHOTOS: tuple[tuple[str, str, Optional[int]], ...] = (
    ("astronaut", "astronaut", None),
    ("chelsea", "chelsea", None),
    ("coffee", "coffee", None),
    ("rocket", "rocket", None),
    ("hubble_deep_field", "hubble_deep_field", None),
    ("immunohistochemistry", "immunohistochemistry", None),
    ("retina", "retina", None),
    ("motorcycle_left", "stereo_motorcycle", 0),
    ("motorcycle_right", "stereo_motorcycle", 1),
)

# Whole photographs that no training run sees, for evaluation (issue 16, item 6). The stereo pair is one scene shot
# twice, so both views are held out together (one view in training would leak the other). Coffee is the one other
# held-out scene: the six left keep every kind of content (people, animals, objects, astronomy, microscopy, medical).
HELD_OUT_PHOTOS: tuple[str, ...] = ("coffee", "motorcycle_left", "motorcycle_right")
TRAIN_PHOTOS: tuple[str, ...] = tuple(k for k, _, _ in SKIMAGE_PHOTOS if k not in HELD_OUT_PHOTOS)
# Names a config can give for ``photos:`` in place of a list.
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(k for k, _, _ in SKIMAGE_PHOTOS), "train": TRAIN_PHOTOS, "held_out": HELD_OUT_PHOTOS,
}


def resolve_photos(photos: Optional[Union[str, Sequence[str]]]) -> list[str]:
    """``photos`` as a list of names: None -> all; a set name (``all``, ``train``, ``held_out``) -> its names."""
    if photos is None:
        return list(PHOTO_SETS["all"])
    if isinstance(photos, str):
        if photos not in PHOTO_SETS:
            raise DataError(f"photos: {photos!r} is neither a list of names nor a set name; sets: "
                            f"{', '.join(PHOTO_SETS)}")
        return list(PHOTO_SETS[photos])
    return list(photos)


class DataError(ValueError):
    """A dataset root or option is unusable; the message says what is wrong and what to do."""


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}: use 'hwc' (latent-diffusion, [-1, 1]) or 'chw' "
                        "(enhancing-transformers, [0, 1])")
    return layout


def resize_and_crop(img: Image.Image, size: int, random_crop: bool, rng: Optional[np.random.Generator] = None
                    ) -> np.ndarray:
    """taming's SmallestMaxSize + Random/CenterCrop. Returns uint8 (size, size, 3).

    The resize is bilinear without antialiasing, like the cv2 INTER_LINEAR that taming's albumentations uses (PIL's
    BILINEAR antialiases when it shrinks, which gives smoother images than the paper's). Random crops draw from
    ``rng`` if given, else from torch's generator, which Lightning's seed_everything seeds.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    h, w = arr.shape[:2]
    scale = size / min(w, h)
    if scale != 1.0:
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        t = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
        t = torch.nn.functional.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                            antialias=False)
        arr = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    h, w = arr.shape[:2]
    if random_crop:
        if rng is not None:
            left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        else:
            left, top = (int(torch.randint(0, n - size + 1, ()).item()) for n in (w, h))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def to_layout(image: np.ndarray, layout: str) -> Union[np.ndarray, torch.Tensor]:
    """uint8 (H, W, 3) -> float32 (H, W, 3) in [-1, 1] ('hwc') or tensor (3, H, W) in [0, 1] ('chw')."""
    if layout == "hwc":
        return (image / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


def resolve_imagenet_root(root: Optional[Union[str, os.PathLike]]) -> Path:
    """The configured root, else $IMAGENET_ROOT; one clear error when neither names an existing folder."""
    value = str(root) if root not in (None, "") else os.environ.get(IMAGENET_ROOT_ENV, "")
    if not value:
        raise DataError(f"no ImageNet root: set data.params.<split>.params.root in the config or the "
                        f"{IMAGENET_ROOT_ENV} environment variable to a folder holding train/<wnid>/*.JPEG and "
                        "val/<wnid>/*.JPEG (this project never downloads ImageNet)")
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    if not path.is_dir():
        raise DataError(f"ImageNet root {str(path)!r} is not a folder; expected <root>/train/<wnid>/*.JPEG and "
                        f"<root>/val/<wnid>/*.JPEG (set root: or {IMAGENET_ROOT_ENV})")
    return path


class ImageNetFolder(Dataset):
    """A local ImageNet split. Item: {"image", "class_label", "synset", "file_path_"} (see module docstring).

    Args:
      root: folder holding ``train/`` and ``val/``; ``None``/empty -> ``$IMAGENET_ROOT``.
      split: ``"train"`` or ``"val"`` (``"validation"`` is accepted).
      size: output side; shorter side resized to it, then cropped.
      random_crop: random crop (default: True for train, False for val, as taming).
      classes: keep only these wnids, or an int N for the first N wnids in sorted order (class labels are then
        0..N-1 in that order).
      max_images: keep at most this many images (the first ones in sorted path order, spread over classes).
      layout: ``"hwc"`` or ``"chw"``.
    """

    def __init__(self, root: Optional[str] = None, split: str = "train", size: int = 256,
                 random_crop: Optional[bool] = None, classes: Optional[Union[int, Sequence[str]]] = None,
                 max_images: Optional[int] = None, layout: str = "hwc") -> None:
        super().__init__()
        split = {"validation": "val"}.get(split, split)
        if split not in ("train", "val"):
            raise DataError(f"unknown ImageNet split {split!r}: use 'train' or 'val'")
        if int(size) <= 0:
            raise DataError(f"size must be a positive number of pixels, got {size}")
        self.layout = _check_layout(layout)
        self.size = int(size)
        self.random_crop = (split == "train") if random_crop is None else bool(random_crop)
        self.root = resolve_imagenet_root(root)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(f"{str(split_dir)!r} does not exist: an ImageNet root must hold {split}/<wnid>/*.JPEG "
                            "(one sub-folder per class, e.g. n01440764)")
        wnids = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not wnids:
            raise DataError(f"{str(split_dir)!r} has no class folders: expected {split}/<wnid>/*.JPEG, e.g. "
                            f"{split}/n01440764/*.JPEG (images loose in {split}/ must be sorted into class folders)")
        if classes is not None:
            if isinstance(classes, int):
                if classes <= 0:
                    raise DataError(f"classes must be a positive count or a list of wnids, got {classes}")
                wnids = wnids[:classes]
            else:
                wanted = [str(c) for c in classes]
                missing = sorted(set(wanted) - set(wnids))
                if missing:
                    raise DataError(f"classes not found under {str(split_dir)!r}: {missing[:5]}"
                                    f"{' ...' if len(missing) > 5 else ''}")
                wnids = sorted(wanted)
        self.synsets = wnids
        self.class_to_label = {w: i for i, w in enumerate(wnids)}
        paths: list[tuple[str, str]] = []
        for w in wnids:
            paths.extend((str(p), w) for p in sorted((split_dir / w).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"no images (*.JPEG, *.jpg, *.png) in the class folders of {str(split_dir)!r}")
        if max_images is not None:
            if int(max_images) <= 0:
                raise DataError(f"max_images must be positive or null, got {max_images}")
            if int(max_images) < len(paths):
                # An even stride keeps every class represented when the limit is smaller than the split.
                keep = np.linspace(0, len(paths) - 1, int(max_images)).round().astype(int)
                paths = [paths[i] for i in keep]
        self.items = paths

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, wnid = self.items[i]
        try:
            with Image.open(path) as img:
                arr = resize_and_crop(img, self.size, self.random_crop)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {str(path)!r}: {err}; remove or replace the file") from err
        return {"image": to_layout(arr, self.layout), "class_label": self.class_to_label[wnid], "synset": wnid,
                "file_path_": str(path)}


class ImageNetTrain(ImageNetFolder):
    """``ImageNetFolder(split="train")``: random crops by default."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class ImageNetValidation(ImageNetFolder):
    """``ImageNetFolder(split="val")``: centre crops by default."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="val", **kwargs)


def load_photo(name: str) -> np.ndarray:
    """One of ``SKIMAGE_PHOTOS`` as uint8 (H, W, 3)."""
    import skimage.data

    for key, attr, index in SKIMAGE_PHOTOS:
        if key == name:
            img = getattr(skimage.data, attr)()
            img = img[index] if index is not None else img
            return np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    raise DataError(f"unknown photograph {name!r}; available: {[k for k, _, _ in SKIMAGE_PHOTOS]}")


class PhotoCrops(Dataset):
    """Random (or fixed) crops of scikit-image's bundled colour photographs: real images, fully offline.

    Args:
      size: crop side (pixels); photos are first resized so their shorter side is ``scale_to`` (default: unchanged).
      length: number of items per epoch.
      photos: names from ``SKIMAGE_PHOTOS``, or a set name: ``all`` (default), ``train`` or ``held_out``
        (``HELD_OUT_PHOTOS``: whole photographs kept out of training, for evaluation).
      random_crop: random crops (training); False gives deterministic crops (item i -> fixed position), for
        validation.
      scale_to: shorter side of each photo before cropping; None keeps the original resolution (>= 300 px).
      seed: seed of the deterministic crop positions.
      layout: ``"hwc"`` or ``"chw"``.
    """

    def __init__(self, size: int = 64, length: int = 256, photos: Optional[Union[str, Sequence[str]]] = None,
                 random_crop: bool = True, scale_to: Optional[int] = None, seed: int = 0, layout: str = "hwc"
                 ) -> None:
        super().__init__()
        self.layout = _check_layout(layout)
        names = resolve_photos(photos)
        if not names:
            raise DataError("photos is empty: name at least one of " + str([k for k, _, _ in SKIMAGE_PHOTOS]))
        if int(length) <= 0 or int(size) <= 0:
            raise DataError(f"size and length must be positive, got size={size}, length={length}")
        self.size, self.length, self.random_crop, self.seed = int(size), int(length), bool(random_crop), int(seed)
        self.names = names
        self.photos: list[Image.Image] = []
        for name in names:
            img = Image.fromarray(load_photo(name))
            if scale_to is not None:
                w, h = img.size
                s = int(scale_to) / min(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            if min(img.size) < self.size:
                raise DataError(f"photo {name!r} is {img.size[0]}x{img.size[1]}, smaller than size={self.size}; "
                                "lower size or raise scale_to")
            self.photos.append(img)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = i % len(self.photos)
        img = self.photos[k]
        w, h = img.size
        # Training crops draw from torch's RNG so Lightning's seed_everything / worker seeding governs them.
        if self.random_crop:
            left = int(torch.randint(0, w - self.size + 1, ()).item())
            top = int(torch.randint(0, h - self.size + 1, ()).item())
        else:
            rng = np.random.default_rng(self.seed * 100003 + i)
            left, top = int(rng.integers(0, w - self.size + 1)), int(rng.integers(0, h - self.size + 1))
        arr = np.asarray(img.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)
        return {"image": to_layout(arr, self.layout), "class_label": k, "photo": self.names[k]}
