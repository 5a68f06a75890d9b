"""Per-frame PSNR and SSIM of generated videos against ground-truth clips (e.g. the synthetic scenes, whose future
frames along the trajectory are known).

Frames are (F, H, W, 3), uint8 or floats in [0, 1]. SSIM follows Wang et al. (2004): 11-tap Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, statistics over the window's valid positions, computed per colour
channel and averaged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sanawm_jax.data import transforms

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (F, H, W, C), got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    return frames.astype(np.float64)


def _pair(generated, reference) -> tuple[np.ndarray, np.ndarray]:
    generated, reference = _unit_frames(generated), _unit_frames(reference)
    if generated.shape != reference.shape:
        raise ValueError(f"generated frames {generated.shape} and reference frames {reference.shape} differ in shape")
    return generated, reference


def psnr_per_frame(generated, reference) -> np.ndarray:
    """(F,) peak signal-to-noise ratio in dB for data range 1 (inf for identical frames)."""
    generated, reference = _pair(generated, reference)
    mse = np.mean((generated - reference) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _filter(images: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over axes 1 and 2 of (F, H, W, C), valid positions only."""
    window = _gaussian_window()
    rows = np.lib.stride_tricks.sliding_window_view(images, SSIM_WINDOW, axis=1) @ window
    return np.lib.stride_tricks.sliding_window_view(rows, SSIM_WINDOW, axis=2) @ window


def ssim_per_frame(generated, reference) -> np.ndarray:
    """(F,) mean structural similarity; frames need at least 11x11 pixels."""
    x, y = _pair(generated, reference)
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape[1:3]}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mean_x, mean_y = _filter(x), _filter(y)
    var_x = _filter(x * x) - mean_x**2
    var_y = _filter(y * y) - mean_y**2
    cov = _filter(x * y) - mean_x * mean_y
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class FrameMetrics:
    """psnr (F,) in dB and ssim (F,), frame 0 being the conditioning frame."""

    psnr: np.ndarray
    ssim: np.ndarray


def ground_truth_frames(source, index: int, num_frames: int, size: tuple[int, int]) -> np.ndarray:
    """The first num_frames frames (uint8) of video clip `index` of a source, resized and centre-cropped to size
    (H, W) as the loader does."""
    record = source[index]
    transforms.check_record(record, num_frames, text_store=None)
    if record.video is None:
        raise ValueError(f"clip {record.key!r} has no video to compare against")
    clip = transforms.read_window(record, index, num_frames, time_stride=1, start=0)
    return transforms.resize_crop(clip, size).frames


def evaluate_against_ground_truth(generated, source, index: int) -> FrameMetrics:
    """Per-frame PSNR / SSIM of a generated video (F, H, W, 3) against the first F frames of clip `index`."""
    generated = np.asarray(generated)
    if generated.ndim != 4:
        raise ValueError(f"generated frames must be (F, H, W, 3), got {generated.shape}")
    reference = ground_truth_frames(source, index, len(generated), generated.shape[1:3])
    return FrameMetrics(psnr_per_frame(generated, reference), ssim_per_frame(generated, reference))
