"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747; MIT licence) read from its idx files.

The files are looked for, in order, in ``$VPEFT_FASHION_MNIST``, an explicit ``root``, Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) and torchvision's download folder under
the vpeft cache. They are read with numpy only, so nothing is downloaded unless :func:`download_fashion_mnist` is
called (the quickstart does so only when the package is absent and the network answers).

An idx file is a big-endian header (two zero bytes, a type code, the number of dimensions, then one uint32 per
dimension) followed by the raw array; Fashion-MNIST uses unsigned bytes (type ``0x08``): images are 3-d (magic
2051) and labels 1-d (magic 2049). Either may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import os
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60000, "test": 10000}

# idx type codes -> numpy big-endian dtypes (the format allows these six)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a numpy array.

    Args:
        path: Path of the file; a ``.gz`` suffix means gzip.

    Returns:
        The array in native byte order, shaped as the header says.

    Raises:
        ValueError: If the header is malformed or the payload size does not match it (names the file).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for a truncated/corrupt stream
        raise ValueError(f"cannot read idx file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the payload has "
                         f"{len(data) - header} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class FashionMNIST:
    """Both splits of Fashion-MNIST as uint8 arrays.

    Attributes:
        train_images: (60000, 28, 28) uint8.
        train_labels: (60000,) int64 in 0..9.
        test_images: (10000, 28, 28) uint8.
        test_labels: (10000,) int64.
        root: Folder the idx files were read from.
        classes: The ten class names, indexed by label.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    root: str
    classes: tuple[str, ...] = CLASSES


def default_cache_dir() -> str:
    """vpeft's cache folder: ``$VPEFT_CACHE``, else ``$XDG_CACHE_HOME/vpeft``, else ``~/.cache/vpeft``."""
    if os.environ.get("VPEFT_CACHE"):
        return os.environ["VPEFT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vpeft")


def _torchvision_dir(cache_dir: Optional[str]) -> str:
    # torchvision.datasets.FashionMNIST(root) stores the raw idx files under <root>/FashionMNIST/raw
    return os.path.join(cache_dir or default_cache_dir(), "FashionMNIST", "raw")


def _find_file(root: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None


def candidate_dirs(root: Optional[str] = None, cache_dir: Optional[str] = None) -> list[str]:
    """Folders searched for the idx files, in order (see the module docstring)."""
    dirs = [os.environ.get("VPEFT_FASHION_MNIST"), root, DEBIAN_DIR, _torchvision_dir(cache_dir)]
    return [d for d in dict.fromkeys(dirs) if d]


def find_fashion_mnist(root: Optional[str] = None, cache_dir: Optional[str] = None) -> Optional[str]:
    """The first candidate folder holding all four idx files, or ``None``."""
    for d in candidate_dirs(root, cache_dir):
        if all(_find_file(d, stem) for pair in FILES.values() for stem in pair):
            return d
    return None


def load_fashion_mnist(root: Optional[str] = None, cache_dir: Optional[str] = None) -> FashionMNIST:
    """Load both splits from the first folder that holds the idx files (no download).

    Args:
        root: An extra folder to search (after ``$VPEFT_FASHION_MNIST``, before Debian's).
        cache_dir: vpeft cache folder holding a previous torchvision download (default :func:`default_cache_dir`).

    Returns:
        The dataset.

    Raises:
        FileNotFoundError: If no candidate folder holds all four files (lists the folders searched).
        ValueError: If a file is corrupt or the split sizes or labels are not Fashion-MNIST's.
    """
    found = find_fashion_mnist(root, cache_dir)
    if found is None:
        raise FileNotFoundError("Fashion-MNIST idx files not found in any of "
                                f"{candidate_dirs(root, cache_dir)} (install Debian's dataset-fashion-mnist)")
    arrays = {}
    for split, (img_stem, lab_stem) in FILES.items():
        img_path, lab_path = _find_file(found, img_stem), _find_file(found, lab_stem)
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.shape != (SIZES[split], 28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected {SIZES[split]} 28x28 uint8 images, got {images.shape} "
                             f"{images.dtype}")
        if labels.shape != (SIZES[split],) or labels.max() > 9:
            raise ValueError(f"{lab_path}: expected {SIZES[split]} labels in 0..9, got shape {labels.shape}")
        arrays[split] = (images, labels.astype(np.int64))
    return FashionMNIST(*arrays["train"], *arrays["test"], root=found)


def network_available(host: str = "fashion-mnist.s3-website.eu-central-1.amazonaws.com", port: int = 80,
                      timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (checked before any download, so an
    offline machine fails fast instead of waiting on torchvision's retries)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_fashion_mnist(cache_dir: Optional[str] = None) -> str:
    """Download Fashion-MNIST with torchvision into the vpeft cache and return the folder of the idx files.

    Args:
        cache_dir: vpeft cache folder (default :func:`default_cache_dir`).

    Returns:
        The folder holding the four idx files (readable by :func:`load_fashion_mnist` with the same ``cache_dir``).

    Raises:
        RuntimeError: If torchvision is missing or the download fails.
    """
    try:
        from torchvision.datasets import FashionMNIST as _TV
    except ImportError as e:
        raise RuntimeError("downloading Fashion-MNIST needs torchvision") from e
    cache = cache_dir or default_cache_dir()
    try:
        _TV(cache, train=True, download=True)
        _TV(cache, train=False, download=True)
    except Exception as e:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, OSError, ...
        raise RuntimeError(f"torchvision could not download Fashion-MNIST into {cache}: {e}") from e
    return _torchvision_dir(cache_dir)
