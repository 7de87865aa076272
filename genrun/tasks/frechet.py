"""Fréchet distances between real and generated images, in two feature spaces.

The number is the Fréchet (2-Wasserstein) distance between Gaussians fitted to the features of
two image sets, |mu_a - mu_b|^2 + tr(A + B - 2 (A^1/2 B A^1/2)^1/2), in float64.

- FID (`inception`): the 2048 pool features of the TensorFlow Inception-v3 that FID is defined
  with (torch-fidelity's port, loaded through torchmetrics), from the images quantized to 8-bit
  pixels as a saved image would be. Its weights come from the internet once.
- Digits (`classifier`): not FID. Inception's features of ImageNet-scale images mean little on
  32-px digits, so here the features are the last hidden layer (64 numbers) of a small CNN trained
  once, seeded, on the real mnist5k train digits. It compares runs of this code base with one
  another, never with published FIDs.

The classifier is kept on disk under a name that hashes everything it depends on (the training
images and labels, the architecture, epochs, seed, format), written whole (genrun.atomic) under a
file lock, so parallel jobs of a sweep train it once between them; a file that cannot be read back
is trained again and replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genrun import atomic
from genrun.errors import DataMissing, UserError

FORMAT = 1  # bump when the stored layout or the training recipe changes
BATCH = 64
LR = 1e-3


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of `a` and of `b` (n x d each, n >= 2).

    Eigen-based: with A symmetric PSD, tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), and the inner
    matrix is symmetric PSD, so both roots come from `eigh` (no complex parts, unlike sqrtm of A B)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two n x d feature sets with n >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


class DigitFeatures(nn.Module):
    """conv(w, 5, /2)-conv(2w, 5, /2)-pool 4x4-fc(64)-fc(10); `features` is the 64-wide hidden layer.
    Small on purpose: it trains in seconds on the CPU, and any input side >= 4 works."""

    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fingerprint(images: torch.Tensor, labels: torch.Tensor, width: int, epochs: int, seed: int) -> str:
    """A hash of what the trained classifier depends on: a changed input is a new name, never a stale hit."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "width": width, "epochs": epochs, "seed": seed, "batch": BATCH,
                                   "lr": LR, "shape": list(images.shape)}).encode())
    h.update(images.contiguous().float().numpy().tobytes())
    h.update(labels.contiguous().long().numpy().tobytes())
    return h.hexdigest()[:32]


def train(images: torch.Tensor, labels: torch.Tensor, width: int, epochs: int, seed: int) -> DigitFeatures:
    """Adam on cross-entropy, seeded (init and shuffling), on the CPU with one thread: the same
    weights on every machine that runs this torch, whatever its core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        with _seeded(seed):
            net = DigitFeatures(width, images.shape[1])
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), BATCH):
                index = order[start:start + BATCH]
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(images[index]), labels[index]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's global stream seeded for the classifier's init, then put back: the run's own draws
    (the GAN's init and noise) do not depend on whether the classifier came from the cache."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def classifier(images: torch.Tensor, labels: torch.Tensor, cache_dir: str | os.PathLike | None, width: int = 16,
               epochs: int = 5, seed: int = 0) -> DigitFeatures:
    """The feature classifier for these training digits: read from `cache_dir` when it was trained
    before (None: trained every time, nothing kept)."""
    if cache_dir is None:
        return train(images, labels, width, epochs, seed)
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"digit-features-{fingerprint(images, labels, width, epochs, seed)}.pt"
    with _locked(path.with_name(path.name + ".lock")):  # one job trains; the others wait and read it
        net = _load(path, width, images.shape[1])
        if net is None:
            net = train(images, labels, width, epochs, seed)
            buffer = io.BytesIO()
            torch.save({"format": FORMAT, "width": width, "state": net.state_dict()}, buffer)
            atomic.replace(path, lambda f: f.write(buffer.getvalue()))
    return net


def _load(path: Path, width: int, channels: int) -> DigitFeatures | None:
    """The stored classifier, or None when absent or unreadable (truncated, foreign, another layout)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        net = DigitFeatures(width, channels)
        net.load_state_dict(stored["state"])
        if stored["format"] != FORMAT:
            return None
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, training again replaces it
        return None
    return net.eval().requires_grad_(False)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released on close, and by the system if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


def inception_weights() -> Path:
    """Where torch-fidelity keeps FID's Inception weights when it downloads them (torch hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


class InceptionFeatures(nn.Module):
    """FID's feature space; `features` takes images in [-1, 1] (1 or 3 channels, any side)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.net(pixels)  # the network resizes to 299 px itself, as FID does


def inception(weights: str | os.PathLike | None = None, download: bool = False) -> InceptionFeatures:
    """FID's Inception-v3 from `weights` (None: torch hub's cache), fetched there first when absent
    and `download` is set."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as err:
        raise UserError(f"task.fid=true needs torchmetrics ({err}); pip install torchmetrics torch-fidelity, "
                        "or task.fid=false") from err
    if not _TORCH_FIDELITY_AVAILABLE:
        raise UserError("task.fid=true needs torch-fidelity: pip install torch-fidelity, or task.fid=false")
    path = Path(weights).expanduser() if weights else inception_weights()
    if not path.is_file() and download:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except OSError as err:  # URLError and HTTPError are OSErrors
            raise UserError(f"task.download=true: could not fetch FID's Inception weights into {path} "
                            f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from err
    if not path.is_file():
        raise DataMissing(f"task.fid_weights: no Inception weights at {path}; run once with task.download=true "
                          f"(needs internet), save {INCEPTION_URL} there, or set task.fid=false")
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which, whatever torch raised
        raise UserError(f"task.fid_weights: {path} is not torch-fidelity's Inception weights "
                        f"({type(err).__name__}); delete it and run with task.download=true") from err
    return InceptionFeatures(net).eval().requires_grad_(False)
