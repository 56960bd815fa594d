"""Datasets as uint8 tensors, decoded once; seeded splits; batches built on the device.

A data source returns the whole training and test sets as ``uint8`` tensors of shape
``[N, 3, H, W]``. Training batches are drawn by permuting indices and normalised as
whole batches on the device, so the hot loop has no per-sample Python work, no PIL
and no DataLoader workers. Decoded arrays of on-disk datasets are cached in
``cache_dir`` (never inside the data folder, which may be read-only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kd.errors import DataError
from kd.identity import content_digest, files_digest
from kd.storage import build_once, decoded_fits, write_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A loaded dataset: full train and test sets plus the seeded train/val split."""

    name: str
    classes: list[str]
    train: ImageSet  # every training example; train_idx / val_idx select from it
    test: ImageSet
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    fingerprint: str  # content hash of all pixels and labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)


TRUST_MANIFESTS = True  # False: hash every pixel on every load (benchmarks/bench_job_overhead.py)


class ImageData:
    """Common part of every data source: validation split and preprocessing settings."""

    name = "data"
    cuts_while_listing = False  # True: the source decodes only its subset's files (see _cut)

    def __init__(
        self,
        val_size: int = 0,
        split_seed: int = 0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = False,
        cache_dir: str | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
    ) -> None:
        # A seeded, class-balanced subset of each set (None: all of it), for runs in minutes.
        self.subset_sizes = {"train": train_size, "test": test_size}
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _load_sets(self) -> tuple[ImageSet, ImageSet, list[str]]:
        raise NotImplementedError

    def _source_key(self) -> str | None:
        """What identifies the source files as read (paths, sizes, mtimes), once loaded;
        None where there are none worth a manifest (synthetic data)."""
        return None

    def _fingerprint(self, train: ImageSet, test: ImageSet) -> str:
        """The content hash of every pixel and label, computed once per source and kept
        in a manifest beside the cache: a job does not hash the whole dataset again
        while its files are unchanged (their size and mtime are in the key)."""
        key = self._source_key()
        manifest = self.cache_dir / "manifests" / f"{self.name}-{key}.json" if key and self.cache_dir else None
        if manifest is not None and TRUST_MANIFESTS and manifest.exists():
            with contextlib.suppress(OSError, ValueError, KeyError):
                return str(json.loads(manifest.read_text())["fingerprint"])
        fingerprint = content_digest((train.images, train.labels, test.images, test.labels))
        if manifest is not None:
            with contextlib.suppress(OSError):
                write_json(manifest, {"fingerprint": fingerprint, "train": len(train), "test": len(test)})
        return fingerprint

    def _cut(self, split: str, labels: torch.Tensor) -> torch.Tensor | None:
        """The indices ``data.<split>_size`` keeps of a set with these labels (None: all)."""
        size = self.subset_sizes[split]
        if size is None:
            return None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= len(labels):
            raise DataError(
                f"data.{split}_size={size!r} must be a whole number from 1 to the {len(labels)} images of the {split} "
                "set (null: all of them)"
            )
        return balanced_subset(labels, size, self.split_seed)

    def _subset(self, sets: dict[str, ImageSet]) -> tuple[tuple[ImageSet, ImageSet], str]:
        """Each set cut to its ``data.<set>_size`` and what identifies the cut ('' for none)."""
        cuts = []
        for split, size in self.subset_sizes.items():
            keep = None if self.cuts_while_listing else self._cut(split, sets[split].labels)
            if keep is not None:
                sets[split] = ImageSet(sets[split].images[keep], sets[split].labels[keep])
            if size is not None:
                cuts.append(f"{split}_size={size}")
        return (sets["train"], sets["test"]), (f":subset:{','.join(cuts)}:split_seed={self.split_seed}" if cuts else "")

    def load(self) -> Dataset:
        train, test, classes = self._load_sets()
        fingerprint = self._fingerprint(train, test)  # of the source as loaded: its manifest is shared
        (train, test), cut = self._subset({"train": train, "test": test})
        fingerprint = files_digest([fingerprint + cut]) if cut else fingerprint
        if not 0 <= self.val_size < len(train):
            raise DataError(
                f"data.val_size={self.val_size} must be >= 0 and smaller than the {len(train)} training examples; "
                "lower data.val_size (or raise data.train_size)"
            )
        # The split depends on split_seed only, so runs with different training seeds
        # are selected on the same validation examples.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[: self.val_size].sort().values, order[self.val_size :].sort().values
        return Dataset(
            name=self.name,
            classes=classes,
            train=train,
            test=test,
            train_idx=train_idx,
            val_idx=val_idx,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            fingerprint=fingerprint,
        )


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices (sorted) of ``size`` examples drawn with ``seed``, as even over the classes
    as their counts allow: each class in turn gives one more until ``size`` are taken."""
    gen = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True)]
    by_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in by_class]
    level = 0  # the most any class gives: the smallest that reaches size
    while sum(min(len(idx), level) for idx in by_class) < size:
        level += 1
    counts = [min(len(idx), level - 1) for idx in by_class]
    for c in [c for c, idx in enumerate(by_class) if len(idx) >= level][: size - sum(counts)]:
        counts[c] += 1  # the last round: the first classes that still have one
    return torch.cat([idx[:n] for idx, n in zip(by_class, counts, strict=True)]).sort().values


class SyntheticData(ImageData):
    """CIFAR-shaped images made in code: a smooth colour pattern per class plus noise."""

    name = "synthetic"

    def __init__(
        self,
        train_size: int = 512,
        test_size: int = 256,
        num_classes: int = 10,
        image_size: int = 32,
        noise: float = 48.0,
        contrast: float = 1.0,
        seed: int = 0,
        **common,
    ) -> None:
        super().__init__(**common)
        self.sizes = (int(train_size), int(test_size))
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.noise = float(noise)
        self.contrast = float(contrast)  # how far the class patterns lie from plain grey
        self.seed = int(seed)

    def _load_sets(self) -> tuple[ImageSet, ImageSet, list[str]]:
        gen = torch.Generator().manual_seed(self.seed)
        coarse = 127.5 + (torch.rand(self.num_classes, 3, 4, 4, generator=gen) - 0.5) * 255 * self.contrast
        prototypes = F.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)
        sets = []
        for size in self.sizes:
            labels = torch.arange(size) % self.num_classes
            labels = labels[torch.randperm(size, generator=gen)]
            noise = torch.randn(size, 3, self.image_size, self.image_size, generator=gen) * self.noise
            images = (prototypes[labels] + noise).clamp(0, 255).round().to(torch.uint8)
            sets.append(ImageSet(images, labels))
        return sets[0], sets[1], [f"class{i}" for i in range(self.num_classes)]


def _half_of_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2e9
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 16.0


class ImageFolderData(ImageData):
    """Any ``root/{train,test}/<class>/<image>`` tree, decoded once and cached."""

    name = "folder"
    cuts_while_listing = True

    def __init__(
        self,
        root: str,
        skip_bad_images: bool = False,
        image_size: int | None = None,
        max_memory_gb: float | None = None,
        **common,
    ) -> None:
        super().__init__(**common)
        self.root = Path(root).expanduser()
        self.skip_bad_images = bool(skip_bad_images)
        # Images of any size: shorter side resized to image_size, then the centre square.
        self.image_size = None if image_size is None else int(image_size)
        # The decoded tensors live in memory: refuse above this (null: half the machine's RAM).
        self.max_memory_gb = float(max_memory_gb) if max_memory_gb is not None else _half_of_ram_gb()
        self.split_keys: dict[str, str] = {}  # split -> hash of its files' paths, sizes, mtimes

    def _source_key(self) -> str | None:
        if set(self.split_keys) != {"train", "test"}:
            return None  # not cached: nothing to key a manifest on
        return files_digest([f"{self.split_keys['train']}:{self.split_keys['test']}"])

    def _check_layout(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist; point data.root at a folder that "
                "holds train/<class>/*.jpg and test/<class>/*.jpg"
            )
        for split in ("train", "test"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise DataError(f"data.root={self.root} has no {split}/ folder; expected train/ and test/")
            class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
            if not class_dirs:
                raise DataError(f"{split_dir} holds no class folders")
            for d in class_dirs:
                if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()):
                    raise DataError(f"class folder {d} holds no images; remove it or add images")

    def _listing(self, split: str) -> list[tuple[str, int, os.stat_result]]:
        """(path, class index, stat) of every image file, in a fixed order. One scandir
        and one stat per file: every job lists the tree (60,000 files for CIFAR-10)."""
        split_dir = self.root / split
        files = []
        for class_index, class_dir in enumerate(sorted(d for d in split_dir.iterdir() if d.is_dir())):
            with os.scandir(class_dir) as entries:
                images = sorted((e for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS),
                                key=lambda e: e.name)  # fmt: skip
            for entry in images:
                try:
                    st = entry.stat()  # follows a link to its target
                except OSError:  # a dangling link or a link loop
                    st = None
                if st is None or not stat.S_ISREG(st.st_mode):
                    what = "a broken symbolic link (dangling or a loop)" if entry.is_symlink() else "not a file"
                    self._bad(entry.path, what, "fix or remove it")
                    continue
                files.append((entry.path, class_index, st))
        return files

    def _bad(self, path: Path | str, what: str, fix: str) -> None:
        """Skip (and count) a bad file when data.skip_bad_images is on; else stop in one line."""
        if not self.skip_bad_images:
            raise DataError(f"{path} is {what}; {fix}, or set data.skip_bad_images=true to skip such files")
        self.skipped.append(f"{path}: {what}")

    def _decode(self, files: list[tuple[str, int]]) -> dict:
        """Decode every image file once into uint8 arrays (the cache's contents)."""
        log.info("decoding %d images under %s (once; cached afterwards)", len(files), self.root)
        arrays, labels = [], []
        for path, label, _ in files:
            try:
                with Image.open(path) as im:
                    arrays.append(np.asarray(self._sized(im.convert("RGB"))))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                self._bad(path, f"not a readable image ({reason})", "replace or delete it")
                continue
            labels.append(label)
        if not arrays:
            raise DataError(f"no readable images under {self.root}")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"images under {self.root} differ in size ({sorted(shapes)[:3]}); set data.image_size=N to "
                "resize each (shorter side to N, then the centre N x N)"
            )
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return {"images": images, "labels": torch.tensor(labels, dtype=torch.int64), "skipped": list(self.skipped)}

    def _sized(self, image: Image.Image) -> Image.Image:
        if self.image_size is None:
            return image
        n, (width, height) = self.image_size, image.size
        scale = n / min(width, height)
        image = image.resize((max(n, round(width * scale)), max(n, round(height * scale))), Image.BILINEAR)
        left, top = (image.width - n) // 2, (image.height - n) // 2
        return image.crop((left, top, left + n, top + n))

    def _check_memory(self, files: list[tuple[str, int, os.stat_result]], split: str) -> None:
        """Refuse, before decoding, a split whose decoded uint8 tensor exceeds the limit."""
        if not files:
            return
        if self.image_size is not None:
            width = height = self.image_size
        else:
            try:
                with Image.open(files[0][0]) as first:  # reads the header only
                    width, height = first.size
            except (OSError, SyntaxError, ValueError):
                return  # the decoder names the bad file
        need = len(files) * 3 * width * height / 1e9
        if need > self.max_memory_gb:
            raise DataError(
                f"{split}/ decoded would take {need:.1f} GB ({len(files):,} images of 3x{height}x{width}), above "
                f"data.max_memory_gb={self.max_memory_gb:g}: set data.image_size smaller or raise data.max_memory_gb"
            )

    def _load_split(self, split: str) -> ImageSet:
        self.skipped: list[str] = []
        files = self._listing(split)
        keep = self._cut(split, torch.tensor([label for _, label, _ in files], dtype=torch.int64))
        files = files if keep is None else [files[i] for i in keep.tolist()]  # only these are decoded
        self._check_memory(files, split)
        if self.cache_dir is None:
            decoded = self._decode(files)
        else:
            # Keyed by every file's path, size and mtime: an edited tree is decoded anew.
            lines = [f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n" for path, label, st in files]
            sized = [] if self.image_size is None else [f"image_size={self.image_size}"]
            key = files_digest([*lines, f"skip_bad_images={self.skip_bad_images}", *sized])
            self.split_keys[split] = key
            cache_file = self.cache_dir / "decoded" / f"folder-{split}-{key}.pt"
            decoded, _ = build_once(cache_file, lambda: self._decode(files), decoded_fits(len(files)))
        skipped = decoded.get("skipped") or self.skipped
        if skipped:
            log.warning(
                "%s/: skipped %d bad file(s) (data.skip_bad_images=true), e.g. %s", split, len(skipped), skipped[0]
            )
        return ImageSet(decoded["images"], decoded["labels"])

    def _load_sets(self) -> tuple[ImageSet, ImageSet, list[str]]:
        self._check_layout()
        classes = [[d.name for d in sorted((self.root / s).iterdir()) if d.is_dir()] for s in ("train", "test")]
        if classes[0] != classes[1]:
            raise DataError(f"train/ and test/ under {self.root} hold different class folders")
        return self._load_split("train"), self._load_split("test"), classes[0]


class CIFAR10(ImageData):
    """torchvision's CIFAR-10 (the original release), downloaded when allowed."""

    name = "cifar10"
    title, folder, files = "CIFAR-10", "cifar-10-batches-py", "*_batch*"
    torchvision_class = "CIFAR10"

    def __init__(self, root: str, download: bool = True, **common) -> None:
        super().__init__(**common)
        self.root = Path(root).expanduser()
        self.download = bool(download)

    def _source_key(self) -> str | None:
        folder = self.root / self.folder
        files = sorted(folder.glob(self.files)) if folder.is_dir() else []
        if not files:
            return None
        return files_digest(f"{f.resolve()}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}\n" for f in files)

    def _load_sets(self) -> tuple[ImageSet, ImageSet, list[str]]:
        # Imported here: torchvision adds about a second to every job's start, and
        # only this source needs it.
        try:
            import torchvision.datasets
        except Exception as err:  # a torchvision built for another torch fails as it loads its operators
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"torchvision cannot be imported with torch {torch.__version__} ({first}); install the matching "
                "pair (pip install torch==X torchvision==Y, see pytorch.org/get-started/previous-versions) "
                "or use data=folder"
            ) from None

        sets = []
        for train in (True, False):
            try:
                torch_class = getattr(torchvision.datasets, self.torchvision_class)
                ds = torch_class(str(self.root), train=train, download=self.download)
            except Exception as exc:  # offline download, or files missing / corrupt
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                for folder in (self.root, self.root.parent):  # leave no empty folders behind
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only succeeds when empty
                raise DataError(
                    f"{self.title} not found under data.root={self.root} "
                    f"({'download failed: ' if self.download else ''}{reason}); point data.root at a "
                    f"folder holding {self.folder}, or use data=folder data.root=<ImageFolder tree>"
                ) from None
            # torchvision already keeps CIFAR as one decoded uint8 array; no cache needed.
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            sets.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64)))
        return sets[0], sets[1], list(ds.classes)


class CIFAR100(CIFAR10):
    """torchvision's CIFAR-100 (100 fine classes), downloaded when allowed."""

    name = "cifar100"
    title, folder, files = "CIFAR-100", "cifar-100-python", "[tm]*"  # train, test, meta
    torchvision_class = "CIFAR100"
