"""A job's fixed cost: verified files are not hashed again, nor is a dataset's every
pixel, while nothing changed; any change sends them through the full check."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from kd import data as data_module
from kd import storage
from kd.data import ImageFolderData
from kd.storage import load_checked, save_checked
from tests.test_faults import make_image_folder


def _no_hashing(*_args, **_kwargs):
    raise AssertionError("hashed again")


def test_a_verified_file_loads_without_hashing_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "entry.pt"
    save_checked({"w": torch.arange(4)}, path)
    assert torch.equal(load_checked(path)["w"], torch.arange(4))  # the full check, which stamps it
    assert (tmp_path / "entry.pt.verified").exists()
    with monkeypatch.context() as m:
        m.setattr(storage, "file_digest", _no_hashing)
        assert torch.equal(load_checked(path)["w"], torch.arange(4))
    data = bytearray(path.read_bytes())  # damaged in place, same size: a new mtime
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert load_checked(path) is None  # the stamp no longer matches: hashed, and refused


def test_without_trusted_stamps_every_load_hashes(tmp_path, monkeypatch):
    path = tmp_path / "entry.pt"
    save_checked({"w": torch.zeros(2)}, path)
    load_checked(path)
    monkeypatch.setattr(storage, "TRUST_STAMPS", False)
    monkeypatch.setattr(storage, "file_digest", _no_hashing)
    with pytest.raises(AssertionError, match="hashed again"):
        load_checked(path)


def test_a_dataset_fingerprint_comes_from_its_manifest_until_a_file_changes(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs")
    first = ImageFolderData(str(root), cache_dir=str(tmp_path / "cache")).load()
    assert list((tmp_path / "cache" / "manifests").glob("folder-*.json"))
    with monkeypatch.context() as m:
        m.setattr(data_module, "content_digest", _no_hashing)
        again = ImageFolderData(str(root), cache_dir=str(tmp_path / "cache")).load()
    assert again.fingerprint == first.fingerprint
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "train" / "class0" / "0.jpg")  # new pixels, new mtime
    changed = ImageFolderData(str(root), cache_dir=str(tmp_path / "cache")).load()
    assert changed.fingerprint != first.fingerprint
    uncached = ImageFolderData(str(root)).load()  # no cache dir: computed, the same value
    assert uncached.fingerprint == changed.fingerprint
