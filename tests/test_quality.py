"""The temporal quality figures on constructed sequences whose answers are known."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from livediff import quality


def texture(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (blurred noise): something optical flow can follow."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    return smooth.astype(np.uint8)


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`image` moved right by dx and down by dy (content enters at the far edge: a camera pan)."""
    return np.roll(image, (dy, dx), axis=(0, 1))


def test_identical_frames_score_zero() -> None:
    frame = texture()
    figures = quality.measure([frame] * 4, [frame] * 4)
    assert figures.warp_error == 0.0
    assert figures.flicker == 0.0
    assert figures.ssim == pytest.approx(1.0)
    assert figures.pairs == 3


def test_translation_followed_by_its_output_scores_near_zero() -> None:
    base = texture(seed=1)
    frames = [shifted(base, 3 * i, 2 * i) for i in range(4)]
    figures = quality.measure(frames, frames)
    assert figures.warp_error < 1.0  # bilinear resampling of sub-pixel flow errors, on a 0-255 scale


def test_output_that_does_not_follow_the_motion_scores_high() -> None:
    base = texture(seed=2)
    inputs = [shifted(base, 4 * i, 0) for i in range(4)]
    still = [inputs[0]] * 4  # the output ignores the motion
    moving = quality.measure(inputs, inputs).warp_error
    frozen = quality.measure(inputs, still).warp_error
    assert frozen > 5 * max(moving, 1.0)


def test_random_frames_score_high() -> None:
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(4)]
    outputs = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(4)]
    figures = quality.measure(frames, outputs)
    assert figures.warp_error > 60  # independent uniform levels differ by 85 on average
    assert figures.ssim < 0.1


def test_flicker_counts_only_where_the_input_stood_still() -> None:
    still = texture(seed=4)
    inputs = [still.copy() for _ in range(3)]
    inputs[1][:, 64:] = texture(seed=5)[:, 64:]  # the right half changes, the left half stays
    inputs[2][:, 64:] = texture(seed=6)[:, 64:]
    outputs = [frame.copy() for frame in inputs]
    for i, out in enumerate(outputs):  # the output's left half moves by 10 levels each frame
        out[:, :64] = np.clip(out[:, :64].astype(np.int16) + 10 * i, 0, 255).astype(np.uint8)
    flicker = quality.pair_flicker(inputs[:2], outputs[:2])
    # static pixels: the left half away from the blurred seam, where the output changed by ~10
    assert 9.0 < flicker <= 10.0
    assert quality.pair_flicker(inputs[:2], inputs[:2]) == 0.0


def test_camera_noise_is_not_taken_for_motion() -> None:
    rng = np.random.default_rng(7)
    base = texture(seed=8).astype(np.float32)
    noisy = [np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8) for _ in range(2)]
    flicker = quality.pair_flicker(noisy, noisy)
    assert not math.isnan(flicker)  # the still scene counts as still despite the noise
    assert flicker == pytest.approx(np.abs(noisy[1].astype(float) - noisy[0].astype(float)).mean(), rel=0.05)


def test_trusted_motion_excludes_what_entered_the_frame() -> None:
    base = texture(seed=9)
    first, second = base, shifted(base, 6, 0)
    forward = quality.optical_flow(first, second)
    backward = quality.optical_flow(second, first)
    trusted = quality.trusted_motion(forward, backward)
    assert trusted[:, 20:-20].mean() > 0.9
    assert trusted[:, :5].mean() < 0.5  # the left edge came from outside the frame (np.roll wrapped it in)


def test_measure_refuses_mismatched_runs() -> None:
    frame = texture()
    with pytest.raises(ValueError, match="at least 2"):
        quality.measure([frame], [frame])
    with pytest.raises(ValueError, match="uint8"):
        quality.measure([frame, frame], [frame, frame.astype(np.float32)])


def test_downscale_keeps_aspect_and_leaves_small_frames() -> None:
    frame = texture(96, 128)
    assert quality.downscale(frame, 64).shape == (48, 64, 3)
    assert quality.downscale(frame, 256) is frame


def test_synthetic_camera_has_still_and_moving_regions() -> None:
    from livediff.synthetic import SyntheticCamera

    quiet = SyntheticCamera(128, 128, still_background=True).frames(2)
    changed = (quiet[0] != quiet[1]).any(axis=2).mean()
    assert 0.0 < changed < 0.2  # the shapes moved, the background did not
    noisy = SyntheticCamera(128, 128, still_background=True, noise=2.0).frames(2)
    assert quality.pair_flicker(noisy, noisy) == pytest.approx(2.26, abs=0.3)  # E|n1 - n2| for sigma 2
    assert np.array_equal(SyntheticCamera(64, 64, noise=2.0).frame(3), SyntheticCamera(64, 64, noise=2.0).frame(3))


def test_live_sampler_measures_a_pair_per_interval_off_the_caller() -> None:
    import threading
    import time

    import torch

    from livediff.config import StreamParams
    from livediff.server.quality import LiveQuality, QualitySampler
    from livediff.session import Session

    seen: list[dict[str, float]] = []
    measured = threading.Event()

    def observe(figures: dict[str, float]) -> None:
        seen.append(figures)
        assert threading.current_thread() is not threading.main_thread()  # on the sampler's own thread
        measured.set()

    sampler = QualitySampler(observe=observe, interval_s=10.0)
    session = Session(params=StreamParams())
    frame = torch.from_numpy(texture(256, 256))
    try:
        sampler.offer(session, (frame, frame), now=100.0)  # the first pair: nothing to compare yet
        assert session.quality.samples == 0 and not measured.is_set()
        sampler.offer(session, (frame, frame), now=100.5)  # a pair, and a sample due: measured
        # a bound, not a measurement: the first sample also loads OpenCV's and scikit-image's kernels,
        # which took over 10 s on a 2-core machine kept at a load of 18
        assert measured.wait(120)
        deadline = time.monotonic() + 60
        while session.quality.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        sampler.offer(session, (frame, frame), now=101.0)  # within the interval: no new sample
        assert not session.quality.busy  # (offer starts a sample, if at all, before it returns)
    finally:
        sampler.close()
    assert len(seen) == 1 and seen[0]["warp_error"] == 0.0 and seen[0]["flicker"] == 0.0
    assert session.quality.as_dict() == {"warp_error": 0.0, "flicker": 0.0, "ssim": 1.0, "samples": 1}
    live = LiveQuality()
    live.add({"warp_error": 10.0, "flicker": math.nan, "ssim": 0.5})
    live.add({"warp_error": 20.0, "flicker": 4.0, "ssim": 0.5})
    assert live.warp_error == pytest.approx(13.0) and live.flicker == 4.0 and live.samples == 2
