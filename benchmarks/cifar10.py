"""CIFAR-10 loader for the bnfast benchmarks.

Reads the official "CIFAR-10 python version" layout (``cifar-10-batches-py/``
with ``data_batch_1..5``, ``test_batch`` and ``batches.meta``) either straight
from the ``.tar.gz`` or from an extracted folder, without ever letting a
pickle run code.

Where the data comes from (first hit wins), see :func:`locate`:

1. an explicit path (``--data``): the ``.tar.gz`` or an extracted folder;
2. the cache folder (``$XDG_CACHE_HOME/bnfast/cifar10``, default
   ``~/.cache/bnfast/cifar10``), extracted folder or archive;
3. the project's shared copy, ``<repo>/../shared/cifar10/cifar-10-python.tar.gz``;
4. a download of the official archive into the cache folder, MD5-checked.

When all of them fail, :class:`CifarUnavailable` is raised so callers can fall
back (the training benchmark then times steps on random batches only).

A subset file (``.pt`` or ``.npz``, written by ``python -m benchmarks.cifar10
--export-subset N OUT``) can stand in for the archive anywhere a path is taken:
the first N training images and the test set (or its first M images) as uint8
arrays, e.g. 10,000 + 5,000 images in 46 MB where the archive is 166 MB, so it
fits where the whole archive cannot be carried (a GPU machine without network).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
# The project's shared copy is re-encoded from JPEG (see its README), so its
# checksum differs from the official one; both are known-good.
SHARED_COPY_MD5 = "e58cff6bd1c24335c7dfae1c5f2c8381"
KNOWN_MD5 = {OFFICIAL_MD5: "official", SHARED_COPY_MD5: "shared JPEG-decoded copy"}

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
MEMBERS = TRAIN_BATCHES + (TEST_BATCH, META)
SUBSET_SUFFIXES = (".pt", ".npz")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "cifar10" / ARCHIVE_NAME


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnfast" / "cifar10"


class CifarError(RuntimeError):
    """The data set was found but cannot be used (corrupt, truncated, wrong layout)."""


class CifarUnavailable(CifarError):
    """No data set anywhere and it could not be downloaded."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the CIFAR-10 allow-list."""


# ---------------------------------------------------------------------------
# Restricted unpickling

def _numpy_reconstruct():
    # numpy 2 moved the implementation to numpy._core; importing numpy.core
    # there only works through a deprecation shim, so resolve it directly.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode():
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, "latin1"),
    # so re-saved batches need it; only that codec is let through.
    def encode(text, encoding="utf-8"):
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")
    return encode


# What the CIFAR batch pickles reference (checked with pickletools on the real
# files): ndarray reconstruction and its dtype. Both numpy spellings are
# allowed because files written by numpy 2 name numpy._core; _codecs.encode is
# for batches re-saved by Python 3 (see _latin1_encode).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs."""

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        kwargs.setdefault("encoding", "latin1")  # python-2 str pickles
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self.source}: refused global '{module}.{name}' "
                f"(a CIFAR-10 batch only needs {allowed})")
        return factory()


def restricted_loads(data: bytes, source: str = "<pickle>"):
    import io
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


# ---------------------------------------------------------------------------
# Locating / downloading

def _md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(dest_dir: Path, url: str = URL, md5: str = OFFICIAL_MD5,
             timeout: float = 30.0, progress: bool = True) -> Path:
    """Download the archive into dest_dir, checking its MD5 before keeping it."""
    from tqdm import tqdm

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / ARCHIVE_NAME
    h = hashlib.md5()
    # Write to a temp file first so an interrupted download never looks complete.
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                              desc=f"downloading {ARCHIVE_NAME}") as bar:
                        for block in iter(lambda: resp.read(1 << 20), b""):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise CifarUnavailable(f"could not download CIFAR-10 from {url}: {e}") from e
        got = h.hexdigest()
        if got != md5:
            raise CifarError(f"download from {url} has MD5 {got}, expected {md5}; "
                             "file discarded")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _as_source(path: Path) -> Path | None:
    """The usable source at path (archive or batches folder), or None."""
    if path.is_dir():
        if (path / FOLDER_NAME).is_dir():
            return path / FOLDER_NAME
        if (path / ARCHIVE_NAME).is_file():
            return path / ARCHIVE_NAME
        if any((path / m).is_file() for m in MEMBERS):
            return path
        return None
    if path.is_file():
        return path
    return None


def locate(data: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
           download_missing: bool = True, url: str = URL, progress: bool = True) -> Path:
    """Find the data set (see the module docstring for the order)."""
    if data is not None:
        path = Path(data).expanduser()
        src = _as_source(path)
        if src is None:
            raise CifarError(f"--data {path}: not a CIFAR-10 archive or "
                             f"'{FOLDER_NAME}' folder (does it exist?)")
        return src
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    src = _as_source(cache) if cache.exists() else None
    if src is not None:
        return src
    if SHARED_ARCHIVE.is_file():
        return SHARED_ARCHIVE
    tried = f"cache folder {cache} and {SHARED_ARCHIVE}"
    if not download_missing:
        raise CifarUnavailable(f"CIFAR-10 not found (looked in {tried}; downloading disabled). "
                               "Pass --data PATH to the .tar.gz or the extracted folder.")
    try:
        return download(cache, url=url, progress=progress)
    except CifarUnavailable as e:
        raise CifarUnavailable(f"CIFAR-10 not found (looked in {tried}) and {e}. "
                               "Pass --data PATH to the .tar.gz or the extracted folder.") from e


# ---------------------------------------------------------------------------
# Reading

def _read_archive(path: Path) -> dict[str, bytes]:
    """Raw bytes of the needed members, reading the gzip stream once."""
    raw: dict[str, bytes] = {}
    try:
        # Stream mode: one sequential pass, no backward seeks in the gzip data.
        with tarfile.open(path, mode="r|gz") as tf:
            for member in tf:
                name = member.name.split("/")[-1]
                if name not in MEMBERS or not member.isfile():
                    continue
                f = tf.extractfile(member)
                data = f.read()
                if len(data) != member.size:
                    raise CifarError(f"{path}: member {member.name} is truncated "
                                     f"({len(data)} of {member.size} bytes)")
                raw[name] = data
    except CifarError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        # gzip.BadGzipFile is an OSError; a cut-off file shows up as EOFError
        # or tarfile.ReadError depending on where the cut falls.
        raise CifarError(f"{path}: archive is corrupt or truncated "
                         f"({type(e).__name__}: {e})") from e
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise CifarError(f"{path}: archive lacks {', '.join(missing)} "
                         "(truncated, or not the CIFAR-10 python version)")
    return raw


def _read_folder(path: Path) -> dict[str, bytes]:
    raw = {}
    for m in MEMBERS:
        p = path / m
        if not p.is_file():
            raise CifarError(f"{path}: missing {m} (not a complete '{FOLDER_NAME}' folder)")
        raw[m] = p.read_bytes()
    return raw


def _decode_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = restricted_loads(data, source=source)
    except UnsafePickleError:
        raise  # a security refusal must stay recognisable as such
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, KeyError, MemoryError) as e:
        raise CifarError(f"{source}: not a readable CIFAR-10 batch "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or "data" not in d or "labels" not in d:
        raise CifarError(f"{source}: not a CIFAR-10 batch (expected a dict with "
                         "'data' and 'labels')")
    return _check_split(d["data"], d["labels"], source)


def _check_split(x, y, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32 uint8, labels N int64) from a batch's N x 3072
    rows or a subset file's N x 3 x 32 x 32 array; CifarError when malformed."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim in (2, 4)
            and x.shape[1:] in ((3 * 32 * 32,), (3, 32, 32))):
        raise CifarError(f"{source}: 'data' is {getattr(x, 'dtype', type(x))} "
                         f"{getattr(x, 'shape', '')}, expected uint8 N x 3072 or N x 3 x 32 x 32")
    y = np.asarray(y, dtype=np.int64)
    if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise CifarError(f"{source}: 'labels' must be {x.shape[0]} ints in 0..9")
    # Each row is 1024 R, 1024 G, 1024 B values, each plane row-major: this
    # reshape is exactly N x C x H x W.
    return x.reshape(-1, 3, 32, 32), y


@dataclass
class Cifar10:
    train_images: torch.Tensor  # uint8, 50000 x 3 x 32 x 32
    train_labels: torch.Tensor  # int64, 50000
    test_images: torch.Tensor   # uint8, 10000 x 3 x 32 x 32
    test_labels: torch.Tensor   # int64, 10000
    classes: tuple[str, ...]
    source: str


def read(path: str | os.PathLike) -> Cifar10:
    """Read an archive, an extracted batches folder or a subset file."""
    path = Path(path)
    if not path.exists():
        raise CifarError(f"{path}: no such file or folder")
    if path.suffix in SUBSET_SUFFIXES:
        return read_subset(path)
    raw = _read_folder(path) if path.is_dir() else _read_archive(path)

    def decode(names):
        xs, ys = zip(*(_decode_batch(raw[n], f"{path}:{n}") for n in names))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = decode(TRAIN_BATCHES)
    test_x, test_y = decode((TEST_BATCH,))
    try:
        meta = restricted_loads(raw[META], source=f"{path}:{META}")
        classes = tuple(meta["label_names"])
    except UnsafePickleError:
        raise
    except Exception as e:  # meta is only informative; a broken one is still an error
        raise CifarError(f"{path}:{META}: unreadable ({type(e).__name__}: {e})") from e
    return Cifar10(train_x, train_y, test_x, test_y, classes, str(path))


def export_subset(data: Cifar10, n_train: int, path: str | os.PathLike, n_test: int | None = None) -> Path:
    """Write the first n_train training images and the first n_test test images
    (default all) as uint8 to path: ``.pt`` (torch.save) or ``.npz`` (numpy).
    Both load without pickle (torch.load(weights_only=True), np.load(allow_pickle=False))."""
    path = Path(path)
    if path.suffix not in SUBSET_SUFFIXES:
        raise CifarError(f"{path}: a subset file must end in {' or '.join(SUBSET_SUFFIXES)}")
    if n_train < 1 or (n_test is not None and n_test < 1):
        raise CifarError("a subset needs at least one training and one test image")
    # clone: torch.save writes a view's whole storage, i.e. all 50,000 images.
    tensors = {"train_images": data.train_images[:n_train].clone(),
               "train_labels": data.train_labels[:n_train].clone(),
               "test_images": data.test_images[:n_test].clone(),
               "test_labels": data.test_labels[:n_test].clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        # Uncompressed: zlib saves ~6% on these images and costs seconds per read.
        np.savez(path, classes=np.array(data.classes), source=np.array(str(data.source)),
                 **{k: v.numpy() for k, v in tensors.items()})
    else:
        torch.save(dict(tensors, classes=list(data.classes), source=str(data.source)), path)
    return path


def read_subset(path: str | os.PathLike) -> Cifar10:
    """Read a file written by export_subset, with the same checks as the batches."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
            d["classes"], d["source"] = d["classes"].tolist(), str(d["source"])
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
            d = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zlib.error) as e:
        raise CifarError(f"{path}: not a readable subset file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels", "classes")
               if k not in d]
    if missing:
        raise CifarError(f"{path}: subset file lacks {', '.join(missing)}")
    train_x, train_y = _check_split(d["train_images"], d["train_labels"], f"{path}:train")
    test_x, test_y = _check_split(d["test_images"], d["test_labels"], f"{path}:test")
    return Cifar10(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                   torch.from_numpy(test_y), tuple(d["classes"]), str(path))


def load_cifar10(data: str | os.PathLike | None = None, *, cache_dir=None,
                 download_missing: bool = True, progress: bool = True) -> Cifar10:
    """Locate (and if needed download) then read CIFAR-10."""
    return read(locate(data, cache_dir=cache_dir, download_missing=download_missing,
                       progress=progress))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def describe_source(path: str | os.PathLike) -> dict:
    """Provenance for result files: path and, for an archive, its MD5."""
    p = Path(path)
    info = {"path": str(p)}
    if p.is_file():
        md5 = _md5(p)
        info["md5"] = md5
        info["kind"] = "subset file" if p.suffix in SUBSET_SUFFIXES else KNOWN_MD5.get(md5, "unknown archive")
    else:
        info["kind"] = "extracted folder"
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cifar10",
        description="Locate, read and summarise CIFAR-10. Without --data: the cache folder "
                    f"({default_cache_dir()}), then {SHARED_ARCHIVE}, then a download of "
                    "the official archive (MD5-checked) into the cache.")
    p.add_argument("--data", help="cifar-10-python.tar.gz or an extracted cifar-10-batches-py folder")
    p.add_argument("--cache-dir", help="cache folder (default: %(default)s)", default=None)
    p.add_argument("--no-download", action="store_true", help="never download")
    p.add_argument("--export-subset", nargs=2, metavar=("N", "OUT"),
                   help="write the first N training images and the test set as uint8 to OUT "
                        "(.pt or .npz), a file --data accepts (10,000 images: 31 MB + 31 MB of test set)")
    p.add_argument("--test-subset", type=int, default=None, metavar="M",
                   help="with --export-subset: only the first M test images (default all 10,000)")
    a = p.parse_args(argv)
    try:
        d = load_cifar10(a.data, cache_dir=a.cache_dir, download_missing=not a.no_download)
        if a.export_subset:
            n, out = a.export_subset
            if not n.isdigit():
                raise CifarError(f"--export-subset N OUT: N must be a number of images, got {n!r}")
            d = read(export_subset(d, int(n), out, a.test_subset))
            print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
    except CifarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"source: {d.source}")
    for split, x, y in (("train", d.train_images, d.train_labels),
                        ("test", d.test_images, d.test_labels)):
        mean = to_float(x).mean(dim=(0, 2, 3)).tolist()
        print(f"{split}: {tuple(x.shape)} {x.dtype}, per class "
              f"{torch.bincount(y, minlength=10).tolist()}, channel means "
              + " / ".join(f"{m:.3f}" for m in mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
