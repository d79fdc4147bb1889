"""Tests for benchmarks/cifar10.py: real-archive contents, pixel layout, safe
unpickling and clear errors on broken input."""

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import cifar10
from benchmarks.cifar10 import CifarError, CifarUnavailable, UnsafePickleError

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "cifar10" / "cifar-10-python.tar.gz"
needs_archive = pytest.mark.skipif(
    not ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not found at {ARCHIVE} (CI provides it)")


@pytest.fixture(scope="module")
def data():
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE} (CI provides it)")
    return cifar10.read(ARCHIVE)


@pytest.fixture(scope="module")
def raw_test_batch():
    """test_batch decoded independently of the loader (plain pickle on a trusted file)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE} (CI provides it)")
    with tarfile.open(ARCHIVE, "r|gz") as tf:
        for m in tf:
            if m.name.endswith("/test_batch"):
                return pickle.load(tf.extractfile(m), encoding="latin1")
    raise AssertionError("test_batch not in archive")


# ---------------------------------------------------------------------------
# Real data

@pytest.mark.data
def test_sizes_dtypes_and_class_balance(data):
    assert data.train_images.shape == (50000, 3, 32, 32)
    assert data.test_images.shape == (10000, 3, 32, 32)
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == data.test_labels.dtype == torch.int64
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10
    assert data.classes == cifar10.CLASSES


@pytest.mark.data
def test_pixel_layout_matches_raw_rows(data, raw_test_batch):
    raw = raw_test_batch["data"]
    for k in (0, 1, 4321, 9999):
        row = raw[k]
        # Decode by hand: 1024 R, then 1024 G, then 1024 B, each 32x32 row-major.
        for c in range(3):
            plane = row[c * 1024:(c + 1) * 1024].reshape(32, 32)
            assert np.array_equal(data.test_images[k, c].numpy(), plane), (k, c)
        assert data.test_labels[k].item() == raw_test_batch["labels"][k]


@pytest.mark.data
def test_recorded_facts(data):
    # Recorded from the shared archive (MD5 e58cff6b...) with a plain pickle
    # load: test image 0 is automobile_0049.png, label 1, and these are its
    # per-channel pixel sums and the pixel at row 5, column 7.
    img = data.test_images[0].to(torch.int64)
    assert data.test_labels[0].item() == 1
    assert img.sum(dim=(1, 2)).tolist() == [92571, 82351, 75106]
    assert img[:, 5, 7].tolist() == [8, 9, 4]
    assert img.double().mean().item() == pytest.approx(81.38932291666667)
    # Test-set channel statistics published in the archive's README (3 decimals).
    x = cifar10.to_float(data.test_images)
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert x.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0.494, 0.485, 0.450], abs=6e-4)
    assert x.std(dim=(0, 2, 3)).tolist() == pytest.approx([0.245, 0.242, 0.261], abs=6e-4)


@pytest.mark.data
@needs_archive
def test_extracted_folder_reads_the_same(data, tmp_path):
    with tarfile.open(ARCHIVE, "r|gz") as tf:
        tf.extractall(tmp_path, filter="data")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        d = cifar10.read(cifar10.locate(path))
        assert torch.equal(d.test_images, data.test_images)
        assert torch.equal(d.train_labels, data.train_labels)
        assert torch.equal(d.train_images[-1], data.train_images[-1])


# ---------------------------------------------------------------------------
# Restricted unpickler

class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _evil_payloads(marker: Path):
    cmd = f"touch {marker}"
    yield "os.system", _Evil(os.system, cmd)
    yield "builtins.eval", _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    yield "builtins.exec", _Evil(exec, f"open({str(marker)!r}, 'w').close()")


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refuses_code_execution(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for name, payload in _evil_payloads(marker):
        blob = pickle.dumps({"data": payload, "labels": [0]}, protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match="refused global") as exc:
            cifar10.restricted_loads(blob, source="evil.pkl")
        msg = str(exc.value)
        assert name.split(".")[1] in msg and "evil.pkl" in msg
        assert isinstance(exc.value, UnsafePickleError)
        assert not marker.exists(), f"{name} payload ran"
    # Control: the same kind of blob does run code under a plain pickle load,
    # so the refusal above is what prevented it.
    pickle.loads(pickle.dumps(_Evil(eval, f"open({str(marker)!r}, 'w').close()"), protocol=protocol))
    assert marker.exists()


def test_accepts_numpy_array_pickles():
    arr = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 4):
        d = cifar10.restricted_loads(pickle.dumps({"data": arr, "labels": [1, 2]}, protocol=protocol))
        assert np.array_equal(d["data"], arr) and d["labels"] == [1, 2]


def test_malicious_batch_in_folder_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10}, protocol=2)
    for m in cifar10.MEMBERS:
        (folder / m).write_bytes(good)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"data_batch_3: refused global '(posix|os)\.system'"):
        cifar10.read(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Broken archives give a CifarError naming the file

@pytest.mark.data
@needs_archive
@pytest.mark.parametrize("keep", [100, 1 << 20, 100 << 20])
def test_truncated_archive(tmp_path, keep):
    bad = tmp_path / "cifar-10-python.tar.gz"
    with open(ARCHIVE, "rb") as f:
        bad.write_bytes(f.read(keep))
    with pytest.raises(CifarError, match="truncated") as exc:
        cifar10.read(bad)
    assert str(bad) in str(exc.value)


@pytest.mark.data
@needs_archive
def test_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    shutil.copyfile(ARCHIVE, bad)
    with open(bad, "r+b") as f:  # overwrite 64 KiB in the middle of the gzip stream
        f.seek(50 << 20)
        f.write(bytes(range(256)) * 256)
    with pytest.raises(CifarError, match="corrupt|not a readable") as exc:
        cifar10.read(bad)
    assert str(bad) in str(exc.value)


def test_not_an_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_text("this is not a gzip file\n" * 100)
    with pytest.raises(CifarError, match="corrupt or truncated") as exc:
        cifar10.read(bad)
    assert str(bad) in str(exc.value)


def test_archive_without_cifar_members(tmp_path):
    bad = tmp_path / "other.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        info = tarfile.TarInfo("readme.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(CifarError, match="lacks data_batch_1"):
        cifar10.read(bad)


# ---------------------------------------------------------------------------
# Locating and downloading

def test_missing_explicit_path_is_an_error(tmp_path):
    with pytest.raises(CifarError, match="does it exist"):
        cifar10.locate(tmp_path / "nope.tar.gz")


def test_no_data_and_no_download_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "SHARED_ARCHIVE", tmp_path / "absent.tar.gz")
    with pytest.raises(CifarUnavailable, match="--data"):
        cifar10.locate(cache_dir=tmp_path / "cache", download_missing=False)


def test_lookup_order_cache_then_shared(tmp_path, monkeypatch):
    shared = tmp_path / "shared.tar.gz"
    shared.write_bytes(b"x")
    monkeypatch.setattr(cifar10, "SHARED_ARCHIVE", shared)
    cache = tmp_path / "cache"
    assert cifar10.locate(cache_dir=cache, download_missing=False) == shared
    (cache / "cifar-10-batches-py").mkdir(parents=True)
    assert cifar10.locate(cache_dir=cache, download_missing=False) == cache / "cifar-10-batches-py"


def test_download_checks_md5(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"pretend archive")
    cache = tmp_path / "cache"
    url = src.as_uri()
    with pytest.raises(CifarError, match="MD5"):
        cifar10.download(cache, url=url, progress=False)  # official MD5: mismatch
    assert not any(cache.iterdir()), "a failed download must leave nothing behind"
    import hashlib
    good = hashlib.md5(b"pretend archive").hexdigest()
    dest = cifar10.download(cache, url=url, md5=good, progress=False)
    assert dest == cache / "cifar-10-python.tar.gz" and dest.read_bytes() == b"pretend archive"


def test_download_failure_is_unavailable(tmp_path):
    with pytest.raises(CifarUnavailable, match="could not download"):
        cifar10.download(tmp_path, url=(tmp_path / "missing").as_uri(), progress=False)
