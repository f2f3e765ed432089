"""Which images an evaluation runs on: a local ImageNet split, crops of the offline photographs, or the validation set
the training config names, each in the model's batch format, with a description for the record."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from adapters.evaluation.model_loading import LoadedModel, build_from_config


def model_image_size(cfg: DictConfig) -> Optional[int]:
    """Training resolution named by a model config (latent-diffusion ddconfig.resolution, enhancing image_size)."""
    params = cfg.model.get("params", {}) or {}
    if "image_size" in params:
        return int(params["image_size"])
    dd = params.get("ddconfig", None)
    return int(dd["resolution"]) if dd is not None and "resolution" in dd else None


def config_validation_dataset(cfg: DictConfig) -> Dataset:
    """The validation dataset a training config names (latent-diffusion ``data:``, enhancing ``dataset:``)."""
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is not None and node.get("params", None) is not None and "validation" in node.params:
            return build_from_config(node.params.validation, f"{section}.params.validation")
    raise ValueError("the config names no validation dataset (data.params.validation or dataset.params.validation); "
                     "pass --data-root (ImageNet folder) or --offline-photos")


def build_dataset(loaded: LoadedModel, source: str = "config", root: Optional[str] = None, split: str = "val",
                  size: Optional[int] = None, limit: Optional[int] = None, photos_length: int = 64,
                  seed: int = 0) -> tuple[Dataset, dict[str, Any]]:
    """The evaluation dataset in the model's batch format, and a description for the record.

    source: ``imagenet`` (``adapters.evaluation.data.ImageNetFolder`` at ``root``, centre crops, ``limit`` images spread
    over the classes), ``photos`` (deterministic crops of scikit-image's bundled photographs: offline smoke tests), or
    ``config`` (the config's own validation dataset).
    """
    from adapters.evaluation import data as D

    layout = "chw" if loaded.family == "enhancing" else "hwc"
    size = size or model_image_size(loaded.config) or 256
    if source == "imagenet" and loaded.family == "enhancing":
        # Table 4: enhancing's own validation transform (PIL Resize of the whole image to size x size, antialiased,
        # aspect not kept; CenterCrop a no-op), so valid loss is upstream's val/rec_loss and r-FID sees its inputs.
        from adapters.integrations import vitvqgan as V

        split = {"validation": "val"}.get(split, split)
        if split == "val":
            ds = V.ImageNetValidation(root=root, resolution=size, max_images=limit)
        else:  # evaluating on train images: the same (validation) transform, no random crop or flip
            from torchvision import transforms as T

            val_transform = T.Compose([T.Resize((size, size)), T.CenterCrop((size, size)), T.ToTensor()])
            ds = V._EnhancingImageNet(split, root, size, val_transform, max_images=limit)
        return ds, {"source": "imagenet", "root": str(ds.root), "split": split, "size": size, "layout": layout,
                    "transform": "enhancing ImageNetValidation: Resize((size, size)) + CenterCrop + ToTensor"}
    if source == "imagenet":
        ds = D.ImageNetFolder(root=root, split=split, size=size, random_crop=False, max_images=limit, layout=layout)
        return ds, {"source": "imagenet", "root": str(ds.root), "split": split, "size": size, "layout": layout,
                    "transform": "taming: shorter side to size (bilinear) + centre crop"}
    if source == "photos":
        n = limit or photos_length
        # Crop the photographs at the scale the config's own PhotoCrops validation set uses (tiny configs shrink
        # them first), so evaluation images look like training images; only the number of crops changes.
        like = _config_photo_params(loaded.config)
        scale_to, photos = like.get("scale_to"), like.get("photos")
        ds = D.PhotoCrops(size=size, length=n, photos=photos, random_crop=False, scale_to=scale_to, seed=seed,
                          layout=layout)
        # Whether any evaluated photograph was also a training photograph (issue 16, item 6): the report states it.
        trained_on = _config_photo_params(loaded.config, splits=("train",))
        train_photos = D.resolve_photos(trained_on.get("photos")) if trained_on else None
        disjoint = None if train_photos is None else not set(ds.names) & set(train_photos)
        return ds, {"source": "offline-photos", "photos": ds.names, "size": size, "scale_to": scale_to,
                    "seed": seed, "layout": layout, "train_photos": train_photos, "held_out": disjoint}
    if source == "config":
        ds = config_validation_dataset(loaded.config)
        return ds, {"source": "config", "target": str(_validation_target(loaded.config)), "layout": layout}
    raise ValueError(f"unknown data source {source!r}: use 'imagenet', 'photos' or 'config'")


def _config_photo_params(cfg: DictConfig, splits: Sequence[str] = ("validation", "train")) -> dict[str, Any]:
    """params of the config's first PhotoCrops dataset among ``splits`` (default: validation, else train), or {}."""
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is None or node.get("params", None) is None:
            continue
        for split in splits:
            ds = node.params.get(split, None)
            if ds is not None and str(ds.get("target", "")).endswith("PhotoCrops"):
                return dict(OmegaConf.to_container(ds.get("params", {}) or {}, resolve=True))
    return {}


def _validation_target(cfg: DictConfig) -> Optional[str]:
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is not None and node.get("params", None) is not None and "validation" in node.params:
            return node.params.validation.get("target")
    return None
