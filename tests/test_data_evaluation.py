"""Per-frame PSNR / SSIM, and evaluation of generated frames against synthetic ground truth.

Tolerances: closed forms are evaluated in float64, so 1e-9; the separable SSIM filter against a direct 2-D window sum
differs only by summation order, 1e-12. The stored synthetic video is H.264 (crf 10, yuv444p) of the rendered frames,
so re-rendered frames match it to > 35 dB, not exactly.
"""

import numpy as np
import pytest

from sanawm_jax.data import evaluation, synthetic
from sanawm_jax.data.sources import ClipDirectorySource


def test_psnr_of_a_constant_offset_is_minus_twenty_log10_of_the_offset():
    reference = np.full((3, 16, 16, 3), 0.5)
    offsets = np.array([0.1, 0.01, 0.001])
    generated = reference + offsets[:, None, None, None]
    np.testing.assert_allclose(evaluation.psnr_per_frame(generated, reference), -20 * np.log10(offsets), atol=1e-9)


def test_uint8_frames_are_read_as_fractions_of_255():
    reference = np.full((1, 16, 16, 3), 100, np.uint8)
    generated = reference + np.uint8(1)
    np.testing.assert_allclose(evaluation.psnr_per_frame(generated, reference), 20 * np.log10(255.0), atol=1e-9)


def test_ssim_of_constant_frames_is_the_luminance_term():
    a, b = 0.2, 0.7
    c1 = (evaluation.SSIM_K1) ** 2
    ssim = evaluation.ssim_per_frame(np.full((1, 16, 20, 3), a), np.full((1, 16, 20, 3), b))
    np.testing.assert_allclose(ssim, (2 * a * b + c1) / (a * a + b * b + c1), atol=1e-9)


def test_identical_frames_score_infinite_psnr_and_unit_ssim():
    frames = np.random.default_rng(0).uniform(size=(2, 24, 24, 3))
    assert np.all(np.isinf(evaluation.psnr_per_frame(frames, frames)))
    np.testing.assert_allclose(evaluation.ssim_per_frame(frames, frames), 1.0, atol=1e-12)


def test_ssim_equals_a_direct_windowed_computation():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(1, 14, 15, 1))
    y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    offsets = np.arange(11) - 5.0
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for top in range(14 - 10):
        for left in range(15 - 10):
            px, py = x[0, top : top + 11, left : left + 11, 0], y[0, top : top + 11, left : left + 11, 0]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * px * px).sum() - mx * mx, (window * py * py).sum() - my * my
            cov = (window * px * py).sum() - mx * my
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(evaluation.ssim_per_frame(y, x), [np.mean(values)], atol=1e-12)


def test_small_or_mismatched_frames_are_rejected():
    with pytest.raises(ValueError, match="at least 11x11"):
        evaluation.ssim_per_frame(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        evaluation.psnr_per_frame(np.zeros((2, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_rendering_the_trajectory_again_reproduces_the_ground_truth(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path, 1, 17, 64, 96, seed=8)
    source = ClipDirectorySource(tmp_path)
    rerendered = synthetic.to_uint8(synthetic.generate_clip(8, 0, 17, 64, 96).render().rgb)
    metrics = evaluation.evaluate_against_ground_truth(rerendered, source, 0)
    assert metrics.psnr.shape == metrics.ssim.shape == (17,)
    assert metrics.psnr.min() > 35 and metrics.ssim.min() > 0.97
    frozen = np.repeat(rerendered[:1], 17, axis=0)  # a "model" that never moves the camera
    still = evaluation.evaluate_against_ground_truth(frozen, source, 0)
    assert still.psnr[0] > 35 and still.psnr[-1] < 25 and still.ssim[-1] < metrics.ssim[-1]


def test_ground_truth_is_cropped_to_the_generated_size(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path, 1, 9, 64, 96, seed=2)
    source = ClipDirectorySource(tmp_path)
    full = evaluation.ground_truth_frames(source, 0, 9, (64, 96))
    cropped = evaluation.ground_truth_frames(source, 0, 9, (64, 64))
    np.testing.assert_array_equal(cropped, full[:, :, 16:80])
