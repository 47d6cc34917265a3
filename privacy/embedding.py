"""A copy-detection embedding trained contrastively on the training images (DESIGN.md §4).

No downloaded weights: :func:`train_embedder` trains a small CNN (about 0.4 M parameters) on the
reference images themselves with InfoNCE, pairing each clean image with a copy of it made by the
transforms a memorizing generator (or a careless curator) produces: flips, shifts, rotations,
crops, intensity changes, gamma, noise, blur and blends with another image. Images are resized to
``EMBED_SIZE`` pixels and standardized per image (so brightness/contrast changes vanish), and the
output is an L2-normalized ``dim``-vector: cosine similarity in ``[-1, 1]``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from privacy._files import current_umask

#: Side of the images the embedder sees.
EMBED_SIZE = 32


#: Images per forward pass of :meth:`CopyEmbedder.embed` (fixed, for batch-invariant embeddings).
EMBED_BLOCK = 64


@dataclass(frozen=True)
class EmbedderConfig:
    """Training and architecture settings of :class:`CopyEmbedder` (stored beside the weights).

    Attributes:
        dim: Output embedding size.
        width: Channels of the first convolution (doubled twice).
        steps: Optimizer steps (200: on PneumoniaMNIST the detection table at 200 steps is within
            0.01 of 400 steps per transform, at half the training time; 100 loses 0.03 on crops).
        batch_size: Images per step (two views each).
        lr: AdamW learning rate (cosine decay).
        temperature: InfoNCE temperature.
        seed: Seed for initialisation, batches and augmentations.
        bf16: Train under bfloat16 autocast when the CPU supports AVX-512 (about 2x faster here);
            embeddings are always computed in float32.
    """

    dim: int = 128
    width: int = 16
    steps: int = 200
    batch_size: int = 256
    lr: float = 3e-3
    temperature: float = 0.07
    seed: int = 0
    bf16: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "width", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CopyEmbedder(nn.Module):
    """Small CNN mapping ``(B, 1, 32, 32)`` standardized images to unit ``dim``-vectors."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        super().__init__()
        self.config = config or EmbedderConfig()
        w = self.config.width
        self.features = nn.Sequential(
            _block(1, w),
            nn.MaxPool2d(2),  # 16
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 8
            _block(2 * w, 4 * w),
            _block(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 16, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, self.config.dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``(B, 1, 32, 32)`` images (any range; standardized here) to ``(B, dim)`` unit rows."""
        x = _standardize(x)
        return F.normalize(self.head(self.features(x)), dim=1)

    @torch.no_grad()
    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """Embed ``(N, H, W)`` float images in ``[0, 1]``.

        Images go through the network in blocks of exactly :data:`EMBED_BLOCK` (the last one padded
        with blank images), so an image's embedding does not depend on which other images share the call
        (oneDNN/MKL pick their kernels by batch shape): a split audit or a privacy gate under several
        processes gives the same values as one process.

        Args:
            images: ``(N, H, W)`` float images in ``[0, 1]``.
            progress: Show a tqdm bar.

        Returns:
            ``(N, dim)`` float32 unit rows.
        """
        was_training = self.training
        self.eval()
        out = []
        for start in tqdm(
            range(0, len(images), EMBED_BLOCK), desc="embed", disable=not progress, leave=False
        ):
            x = _to_tensor(images[start : start + EMBED_BLOCK])
            n = x.shape[0]
            if n < EMBED_BLOCK:
                x = torch.cat([x, x.new_zeros((EMBED_BLOCK - n, *x.shape[1:]))])
            out.append(self(x.contiguous(memory_format=torch.channels_last))[:n].numpy())
        self.train(was_training)
        if not out:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write weights (safetensors) with the config in the metadata.

        Args:
            path: File to write (written to a temporary name, then renamed).
            metadata: Extra JSON-able provenance stored beside the config (read it back with
                :meth:`read_metadata`), e.g. what the embedder was trained on.
        """
        import json
        import os

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        meta = {"config": json.dumps(asdict(self.config))}
        if metadata:
            meta["provenance"] = json.dumps(dict(metadata), sort_keys=True)
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates files private (0o600)
        os.replace(tmp, path)

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, Any]:
        """The ``metadata`` given to :meth:`save` (``{}`` when none).

        Raises:
            ValueError: the file is not a safetensors file or its provenance is not JSON.
        """
        import json

        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return dict(json.loads(meta.get("provenance", "{}")))
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable embedder file: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "CopyEmbedder":
        """Inverse of :meth:`save` (no pickle involved)."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config = EmbedderConfig(**json.loads(meta.get("config", "{}")))
        model = cls(config)
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model.to(memory_format=torch.channels_last)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-4)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(images, dtype=np.float32)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())[:, None]
    if t.shape[-1] != EMBED_SIZE or t.shape[-2] != EMBED_SIZE:
        t = F.interpolate(t, size=(EMBED_SIZE, EMBED_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return t


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur; ``sigma`` is ``(B,)`` in pixels (0 = unchanged)."""
    radius = 4
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (grid[None] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, K)
    b = x.shape[0]
    xp = F.pad(x, (radius, radius, radius, radius), mode="replicate").transpose(0, 1)  # (1, B, H', W')
    out = F.conv2d(xp, k[:, None, None, :], groups=b)
    out = F.conv2d(out, k[:, None, :, None], groups=b)
    out = out.transpose(0, 1)
    return torch.where((sigma > 0)[:, None, None, None], out, x)


def copy_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random copy transforms of a batch (training-time augmentation).

    Args:
        x: ``(B, 1, S, S)`` images in ``[0, 1]``.
        generator: Source of randomness.

    Returns:
        ``(B, 1, S, S)`` transformed copies, clamped to ``[0, 1]``.
    """
    b, _, s, _ = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    def p(prob: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) < prob

    # blend with another image of the batch
    blend = p(0.2)
    alpha = torch.where(blend, u(0.6, 0.9), torch.ones(b))[:, None, None, None]
    other = x[torch.randperm(b, generator=generator)]
    x = alpha * x + (1 - alpha) * other
    # geometry: flip, rotation, zoom (crop + resize), shift
    geo = p(0.7)
    angle = torch.where(geo, u(-18, 18), torch.zeros(b)) * math.pi / 180
    zoom = torch.where(geo & p(0.5), u(1.0, 1.2), torch.ones(b))
    shift = 2 * 4.0 / s
    tx = torch.where(geo, u(-shift, shift), torch.zeros(b))
    ty = torch.where(geo, u(-shift, shift), torch.zeros(b))
    flip = torch.where(p(0.5), -torch.ones(b), torch.ones(b))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # intensity: brightness/contrast, gamma
    gain = torch.where(p(0.4), u(0.7, 1.45), torch.ones(b))[:, None, None, None]
    bias = torch.where(p(0.4), u(-0.15, 0.15), torch.zeros(b))[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * gain + mean + bias).clamp(0, 1)
    gamma = torch.where(p(0.3), torch.exp(u(math.log(0.6), math.log(1.7))), torch.ones(b))
    x = x.clamp(min=1e-6) ** gamma[:, None, None, None]
    # blur, noise
    sigma = torch.where(p(0.3), u(0.4, 1.7), torch.zeros(b))
    x = _gaussian_blur(x, sigma)
    noise = torch.where(p(0.3), u(0.0, 0.12), torch.zeros(b))[:, None, None, None]
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


# Copied from generator._utils.torch_threads (privacy imports no other RadSynth package)
@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: unchanged).

    Raises:
        ValueError: ``n`` is smaller than 1.
    """
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bf16_supported() -> bool:
    """Whether bfloat16 autocast is worth using on this CPU (AVX-512 or better detected)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return False
    return "AVX512" in str(cap).upper()


def train_embedder(
    images: np.ndarray, config: EmbedderConfig | None = None, progress: bool = True
) -> CopyEmbedder:
    """Train a :class:`CopyEmbedder` on reference images with InfoNCE over copy transforms.

    Each step draws ``batch_size`` images; the anchor is the clean image (as references are
    stored), the positive a random copy transform of it, and all other images of the batch (and
    their copies) are negatives.

    Args:
        images: ``(N, H, W)`` float images in ``[0, 1]``, ``N >= 2``.
        config: Settings; defaults to :class:`EmbedderConfig`.
        progress: Show a tqdm bar.

    Returns:
        The trained model in eval mode.

    Raises:
        ValueError: fewer than two images.
    """
    config = config or EmbedderConfig()
    if len(images) < 2:
        raise ValueError(f"images must hold at least 2 images to train the embedder, got {len(images)}")
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's RNG is left alone
        torch.manual_seed(config.seed)
        model = CopyEmbedder(config)
    # channels-last: 1.3-1.7x faster convolutions on CPU (oneDNN), same arithmetic up to rounding
    model = model.to(memory_format=torch.channels_last)
    data = _to_tensor(images)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    bs = min(config.batch_size, len(data))
    use_bf16 = bool(config.bf16) and bf16_supported()
    model.train()
    bar = tqdm(range(config.steps), desc="train embedder", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randperm(len(data), generator=gen)[:bs]
        clean = data[idx]
        copy = copy_augment(clean, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            z = model(torch.cat([clean, copy]).contiguous(memory_format=torch.channels_last))
        z = z.float()
        za, zb = z[:bs], z[bs:]
        logits = za @ zb.T / config.temperature
        target = torch.arange(bs)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def config_dict(config: EmbedderConfig) -> dict[str, Any]:
    """JSON form of an :class:`EmbedderConfig`."""
    return asdict(config)
