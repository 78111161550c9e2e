"""Inception-3D (I3D), the video network whose pooled features define FVD.

Carreira & Zisserman, "Quo Vadis, Action Recognition?" (CVPR 2017): Inception-v1 with
every 2-D filter and pool *inflated* to 3-D. RGB stream, in order:

* ``Conv3d_1a_7x7``: 7×7×7 convolution, 64 channels, stride 2 in time and space;
* ``MaxPool3d_2a_3x3``: 1×3×3 max-pool, stride (1, 2, 2) — no temporal pooling this early;
* ``Conv3d_2b_1x1`` (64) and ``Conv3d_2c_3x3`` (192);
* ``MaxPool3d_3a_3x3``: 1×3×3, stride (1, 2, 2); ``Mixed_3b``, ``Mixed_3c``;
* ``MaxPool3d_4a_3x3``: 3×3×3, stride 2; ``Mixed_4b`` … ``Mixed_4f``;
* ``MaxPool3d_5a_2x2``: 2×2×2, stride 2; ``Mixed_5b``, ``Mixed_5c`` (1024 channels);
* average pool → the **1024-d feature** FVD uses → dropout → ``logits`` (1×1×1
  convolution with bias, 400 Kinetics classes).

Every convolution but the logits is conv (no bias) → batch norm (eps 1e-3) → ReLU, with
TensorFlow "SAME" padding (the network was trained in TensorFlow, whose SAME padding puts
the odd pixel at the end, which a symmetric PyTorch padding cannot express). A mixed block
runs four branches on one input and concatenates them: 1×1×1; 1×1×1 → 3×3×3; 1×1×1 →
3×3×3; 3×3×3 max-pool (stride 1) → 1×1×1.

Parameter names follow the widely distributed PyTorch port's state dicts (``pytorch-i3d``:
``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``,
``Mixed_3b.b1a.conv3d.weight``, ``logits.conv3d.bias``, …), so such a file (e.g.
``rgb_imagenet.pt``) loads with a strict key check (:func:`load_i3d`). Weights come only from
a local file; nothing is downloaded.

Input: RGB in [-1, 1], resized to 224×224 and at least :data:`MIN_FRAMES` frames (shorter
clips repeat their last frame): at 16 frames the last block is 2×7×7, which the original
2×7×7 average pool reduces to one vector. This implementation averages over whatever grid
remains, the same at the standard size.

Axis glossary: b = videos, c = channels, t = frames, h, w = height, width, k = classes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

from divot.modeling import CheckpointError, check_state_dict

logger = logging.getLogger(__name__)

FEATURE_DIM = 1024
NUM_CLASSES = 400
INPUT_SIZE = 224
MIN_FRAMES = 9  # 16-frame clips meet it; shorter ones are padded up to it

# name, input channels, outputs of (b0 1×1, b1a 1×1, b1b 3×3, b2a 1×1, b2b 3×3, b3b 1×1)
MIXED_BLOCKS = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)
# Max-pools placed before the named block: (kernel, stride) over (t, h, w).
POOLS_BEFORE = {
    "Conv3d_2b_1x1": ("MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_3b": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}


def same_padding(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                 value: float = 0.0) -> torch.Tensor:
    """Pad (b, c, t, h, w) as TensorFlow's "SAME": output size ceil(n / stride), extra at the end."""
    pads: list[int] = []
    for n, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad lists the last axis first
        total = max(k - (s if n % s == 0 else n % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (SAME padding) → optional batch norm → optional ReLU; ``conv3d`` / ``bn`` names."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride = (kernel,) * 3, (stride,) * 3
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=not batch_norm)
        # TensorFlow's batch-norm defaults; the momentum only matters for training.
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(same_padding(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # -inf padding: a padded cell never wins the max, as in TensorFlow.
        return F.max_pool3d(same_padding(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class MixedBlock(nn.Module):
    """Inflated Inception block: four parallel branches concatenated on channels."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0)
        self.b1a, self.b1b = Unit3D(in_channels, c1a), Unit3D(c1a, c1b, kernel=3)
        self.b2a, self.b2b = Unit3D(in_channels, c2a), Unit3D(c2a, c2b, kernel=3)
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """I3D RGB network: ``features`` (b, 1024) and ``forward`` → logits (b, ``num_classes``)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.5):
        super().__init__()
        stem = (("Conv3d_1a_7x7", Unit3D(3, 64, kernel=7, stride=2)),
                ("Conv3d_2b_1x1", Unit3D(64, 64)),
                ("Conv3d_2c_3x3", Unit3D(64, 192, kernel=3)))
        mixed = tuple((name, MixedBlock(c_in, widths)) for name, c_in, widths in MIXED_BLOCKS)
        self.layer_names: list[str] = []
        for name, module in stem + mixed:
            if name in POOLS_BEFORE:
                pool_name, kernel, stride = POOLS_BEFORE[name]
                self.add_module(pool_name, MaxPoolSame(kernel, stride))
                self.layer_names.append(pool_name)
            self.add_module(name, module)
            self.layer_names.append(name)
        for (_, block), (name, c_in, _) in zip(mixed[:-1], MIXED_BLOCKS[1:]):
            assert block.out_channels == c_in, f"channel table broken before {name}"
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(FEATURE_DIM, num_classes, batch_norm=False, relu=False)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D takes (b, 3, t, h, w) RGB clips in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[2]}; pad with i3d_input()")

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, t, h, w) → (b, 1024, 1, 1, 1): the last mixed block averaged over t, h, w."""
        self._check_input(x)
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3, 4), keepdim=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, t, h, w) in [-1, 1] → (b, 1024) pooled features (the FVD embedding)."""
        return rearrange(self.pooled(x), "b c 1 1 1 -> b c")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, t, h, w) in [-1, 1] → (b, k) class logits."""
        return rearrange(self.logits(self.dropout(self.pooled(x))), "b k 1 1 1 -> b k")


# ------------------------------------------------------------------ weights
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reading failure means "not a weights file"
        raise CheckpointError(f"cannot read I3D weights {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (a TorchScript or full-model file?); "
                              f"save model.state_dict() of a pytorch-i3d InceptionI3d")
    return state


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> I3D:
    """An :class:`I3D` in eval mode with the weights of ``path`` (.pt/.pth/.safetensors state dict
    in the pytorch-i3d naming). Missing, unexpected or misshapen keys raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"I3D weights {path} do not exist (nothing is downloaded; pass a local file)")
    state = _read_state_dict(path)
    model = I3D()
    own = model.state_dict()
    # Files saved before PyTorch 0.4.1 (rgb_imagenet.pt among them) have no batch counters.
    if not any(k.endswith("num_batches_tracked") for k in state):
        state = {**state, **{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}}
    check_state_dict({k: v.shape for k, v in own.items()}, state, str(path), "I3D (pytorch-i3d naming)")
    model.load_state_dict(state, strict=True)
    logger.info("loaded I3D weights from %s", path)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------ videos → features
def i3d_input(video: np.ndarray, size: int = INPUT_SIZE, min_frames: int = MIN_FRAMES) -> torch.Tensor:
    """uint8 (t, h, w, 3) → float (3, t', size, size) in [-1, 1], t' = max(t, min_frames)."""
    x = torch.as_tensor(np.asarray(video))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8 or x.shape[0] == 0:
        raise ValueError(f"a video must be uint8 (frames, h, w, 3), got {x.dtype} {tuple(x.shape)}")
    x = rearrange(x, "t h w c -> t c h w").float().div(127.5).sub(1.0)
    if tuple(x.shape[-2:]) != (size, size):
        # The whole frame, squeezed to a square, as the reference FVD code's bilinear resize.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    if x.shape[0] < min_frames:
        x = torch.cat([x, x[-1:].expand(min_frames - x.shape[0], -1, -1, -1)])
    return rearrange(x, "t c h w -> c t h w")


@torch.no_grad()
def i3d_features(model: I3D, videos: Sequence[np.ndarray], batch_size: int = 4, size: int = INPUT_SIZE) -> np.ndarray:
    """(n, 1024) float64 I3D features of uint8 videos (t, h, w, 3); videos of one batch must
    share their frame count."""
    device = next(model.parameters()).device
    out = [np.zeros((0, FEATURE_DIM))]
    for start in range(0, len(videos), batch_size):
        batch = torch.stack([i3d_input(v, size) for v in videos[start:start + batch_size]])
        out.append(model.features(batch.to(device)).double().cpu().numpy())
    return np.concatenate(out)
