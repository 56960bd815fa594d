from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.batches import BatchStream, Preprocess
from kd.data import CIFAR10, ImageFolderData, SyntheticData
from kd.errors import DataError


def make_folder(root: Path, per_class: int = 3, classes=("cat", "dog"), size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_synthetic_is_deterministic_and_class_balanced():
    a, b = SyntheticData(train_size=100, test_size=50).load(), SyntheticData(train_size=100, test_size=50).load()
    assert torch.equal(a.train.images, b.train.images) and a.fingerprint == b.fingerprint
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (100, 3, 32, 32)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10
    assert SyntheticData(train_size=100, test_size=50, seed=1).load().fingerprint != a.fingerprint


def test_validation_split_is_seeded_disjoint_and_complete():
    data = SyntheticData(train_size=200, val_size=30, split_seed=3).load()
    assert len(data.val_idx) == 30 and len(data.train_idx) == 170
    assert set(data.val_idx.tolist()).isdisjoint(data.train_idx.tolist())
    assert sorted(data.val_idx.tolist() + data.train_idx.tolist()) == list(range(200))
    again = SyntheticData(train_size=200, val_size=30, split_seed=3).load()
    other = SyntheticData(train_size=200, val_size=30, split_seed=4).load()
    assert torch.equal(data.val_idx, again.val_idx) and not torch.equal(data.val_idx, other.val_idx)


@pytest.mark.parametrize("val_size", [200, 500])
def test_val_size_not_smaller_than_train_is_refused(val_size):
    with pytest.raises(DataError, match="data.val_size"):
        SyntheticData(train_size=200, val_size=val_size).load()


def test_folder_decodes_once_then_reads_cache(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "tree")
    source = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "cache"), val_size=1)
    data = source.load()
    assert data.classes == ["cat", "dog"] and data.train.images.shape == (6, 3, 32, 32)
    first = np.asarray(Image.open(root / "train" / "cat" / "0.png"))
    assert torch.equal(data.train.images[0], torch.from_numpy(first.copy()).permute(2, 0, 1))
    monkeypatch.setattr(ImageFolderData, "_decode", lambda *a: pytest.fail("decoded twice"))
    again = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "cache"), val_size=1).load()
    assert again.fingerprint == data.fingerprint


def test_folder_cache_notices_a_changed_file(tmp_path):
    root = make_folder(tmp_path / "tree")
    before = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "cache")).load()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "train" / "dog" / "extra.png")
    after = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "cache")).load()
    assert len(after.train) == len(before.train) + 1 and after.fingerprint != before.fingerprint


@pytest.mark.parametrize(
    ("breakage", "message"),
    [("missing_root", "does not exist"), ("no_test", "has no test/ folder"), ("empty_class", "holds no images")],
)
def test_folder_layout_errors(tmp_path, breakage, message):
    root = make_folder(tmp_path / "tree")
    if breakage == "missing_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "test").iterdir()):
            d.rmdir()
        (root / "test").rmdir()
    else:
        (root / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=message):
        ImageFolderData(root=str(root)).load()


def test_missing_cifar10_offline_names_the_root(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found under data.root=.*nothing-here.*data=folder"):
        CIFAR10(root=str(tmp_path / "nothing-here"), download=False).load()


def test_preprocess_normalises_with_the_seed_statistics():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(Preprocess(mean, std, torch.device("cpu"))(images), expected)


def test_batch_stream_covers_its_indices_once_per_epoch_in_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.arange(10)
    stream = BatchStream(images, labels, torch.tensor([0, 2, 3, 5, 7, 9]), batch_size=4, seed=1)
    epoch1 = [idx for idx, _, _ in stream.epoch(1)]
    seen = torch.cat(epoch1).tolist()
    assert len(stream) == 2 and sorted(seen) == [0, 2, 3, 5, 7, 9]
    for idx, x, y in stream.epoch(1):
        assert torch.equal(y, idx) and torch.equal(x[:, 0, 0, 0].long(), idx)
    assert seen == torch.cat([idx for idx, _, _ in stream.epoch(1)]).tolist()
    assert seen != torch.cat([idx for idx, _, _ in stream.epoch(2)]).tolist()


def test_a_torchvision_that_does_not_load_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # import fails, as a mismatched build does
    with pytest.raises(DataError) as err:
        CIFAR10(root=str(tmp_path), download=False).load()
    message = str(err.value)
    assert "\n" not in message and "torchvision cannot be imported with torch" in message
    assert "install the matching pair" in message


def _mixed_sizes(root: Path) -> Path:
    """Two classes of photos of different sizes; each image's centre is a marked square."""
    for split in ("train", "test"):
        for c, (w, h) in (("wide", (60, 30)), ("tall", (24, 48))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            pixels = np.zeros((h, w, 3), dtype=np.uint8)
            pixels[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3] = 255
            Image.fromarray(pixels).save(root / split / c / "0.png")
    return root


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    root = _mixed_sizes(tmp_path / "tree")
    with pytest.raises(DataError, match=r"differ in size .* set data.image_size=N"):
        ImageFolderData(root=str(root)).load()


def test_image_size_resizes_the_shorter_side_and_keeps_the_centre(tmp_path):
    root = _mixed_sizes(tmp_path / "tree")
    data = ImageFolderData(root=str(root), image_size=12, cache_dir=str(tmp_path / "cache")).load()
    assert data.train.images.shape == (2, 3, 12, 12) and data.test.images.shape == (2, 3, 12, 12)
    for image in data.train.images:  # the marked centre is in the middle, the corners stay dark
        assert image[:, 5:7, 5:7].float().mean() > 100 and image[:, 0, 0].max() == 0
    other = ImageFolderData(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache")).load()
    assert other.train.images.shape[-1] == 16  # another size is decoded anew, not read from the cache


def test_a_decoded_set_above_the_memory_limit_is_refused_with_its_size(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "tree", per_class=3, size=32)
    monkeypatch.setattr(ImageFolderData, "_decode", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(DataError) as err:
        ImageFolderData(root=str(root), max_memory_gb=1e-6).load()
    assert str(err.value).startswith("train/ decoded would take 0.0 GB (6 images of 3x32x32), above data.max_memory_gb")
    with pytest.raises(DataError, match=r"\(6 images of 3x224x224\)"):
        ImageFolderData(root=str(root), image_size=224, max_memory_gb=1e-6).load()


def test_cifar100_without_its_files_is_one_line_naming_its_folder(tmp_path):
    from kd.data import CIFAR100

    with pytest.raises(DataError) as err:
        CIFAR100(root=str(tmp_path / "c100"), download=False).load()
    assert str(err.value).startswith(f"CIFAR-100 not found under data.root={tmp_path / 'c100'}")
    assert "cifar-100-python" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_model_that_cannot_take_the_image_size_is_refused_before_training(workdir):
    from tests.conftest import FAST, run_py

    proc = run_py([*FAST, "+data.image_size=48", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("kd: error: LightNN cannot take the data's 3x48x48 images")
    ok = run_py([*FAST, "+data.image_size=48", "model=resnet8", "hydra.run.dir=ok"], cwd=workdir)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_folder_subset_is_seeded_class_balanced_and_its_own_identity(tmp_path):
    root = make_folder(tmp_path / "tree", per_class=6, classes=("cat", "dog", "eel"))
    cache = str(tmp_path / "cache")
    whole = ImageFolderData(root=str(root), cache_dir=cache, val_size=1).load()

    def subset(**sizes) -> object:
        return ImageFolderData(root=str(root), cache_dir=cache, val_size=1, **sizes).load()

    cut = subset(train_size=7, test_size=4)
    assert len(cut.train) == 7 and len(cut.test) == 4
    assert sorted(torch.bincount(cut.train.labels).tolist()) == [2, 2, 3]  # as even as 7 over 3 allows
    rows = {tuple(img.flatten().tolist()) for img in whole.train.images}
    assert all(tuple(img.flatten().tolist()) in rows for img in cut.train.images)  # drawn from the set
    again, other = subset(train_size=7, test_size=4), subset(train_size=7, test_size=4, split_seed=1)
    assert torch.equal(cut.train.images, again.train.images) and cut.fingerprint == again.fingerprint
    assert not torch.equal(cut.train.images, other.train.images) and other.fingerprint != cut.fingerprint
    assert len({whole.fingerprint, cut.fingerprint, subset(train_size=7).fingerprint}) == 3
    assert subset(train_size=18).fingerprint != whole.fingerprint  # every image, but a recorded cut
    assert torch.equal(subset(test_size=4).train.images, whole.train.images)  # the other set is untouched


@pytest.mark.parametrize("size", [0, 19, 2.5, True])
def test_a_subset_size_outside_the_set_is_refused_naming_the_key(tmp_path, size):
    root = make_folder(tmp_path / "tree", per_class=6, classes=("cat", "dog", "eel"))
    with pytest.raises(DataError, match=r"data.train_size=.* must be a whole number from 1 to the 18 images"):
        ImageFolderData(root=str(root), cache_dir=str(tmp_path / "c"), val_size=1, train_size=size).load()


def test_a_balanced_subset_takes_evenly_until_a_class_runs_out():
    from kd.data import balanced_subset

    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 50)
    for size, counts in [(25, [11, 3, 11]), (103, [50, 3, 50]), (1, [1, 0, 0]), (6, [2, 2, 2]), (8, [3, 3, 2])]:
        keep = balanced_subset(labels, size, seed=0)
        assert len(keep) == size and torch.bincount(labels[keep], minlength=3).tolist() == counts
        assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == size
    assert not torch.equal(balanced_subset(labels, 20, 0), balanced_subset(labels, 20, 1))
    assert torch.equal(balanced_subset(labels, 20, 5), balanced_subset(labels, 20, 5))
