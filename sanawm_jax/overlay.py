"""The WASD + joystick overlay of output videos: the action keys acting on the camera in each frame and where the
view is being turned, drawn on a translucent panel in the bottom-left corner.

Layout, in key widths u (about 5.5% of the frame height): the W A S D caps as an inverted T, the I J K L caps
beside them, and a joystick whose knob sits at the commanded (yaw right, pitch up) turn. A cap glows amber with its
level (1 while held, fading while the camera coasts after release); the knob's arrow grows with the turn.
The states come from `camera.action_key_states` (an action string) or `camera.c2w_key_states` (a pose path); only
the mp4 gets the overlay, never the .npz outputs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sanawm_jax.camera import ACTION_KEYS

KEY_FRACTION = 0.055  # key width / frame height
MIN_KEY_PX = 3
GAP = 0.15  # between keys, in key widths
PAD = 0.3  # panel border, in key widths
# (column, row) of the up, left, down and right caps of a cluster, in keys; IJKL starts one cluster further right.
_CLUSTER_CELLS = ((1, 0), (0, 1), (1, 1), (2, 1))
_KEY_CELLS = {**dict(zip("wasd", _CLUSTER_CELLS)), **dict(zip("ijkl", _CLUSTER_CELLS))}
_CLUSTER_SPACING = 0.6  # between the clusters and the joystick, in key widths
# Panel width in key widths: two 3-key clusters and a 2-key joystick, their gaps, two spacings, the border.
_PANEL_KEYS_WIDE = 8 + 5 * GAP + 2 * _CLUSTER_SPACING + 2 * PAD

PANEL_RGBA = (0, 0, 0, 90)
CAP_RGBA = (40, 40, 40, 150)
LIT_RGBA = (255, 190, 40, 235)
EDGE_RGBA = (220, 220, 220, 210)
TEXT_RGB = (235, 235, 235)
LIT_TEXT_RGB = (20, 20, 20)


@dataclasses.dataclass(frozen=True)
class OverlayLayout:
    """Pixel geometry of the overlay on a (height, width) frame; boxes are (left, top, right, bottom), right and
    bottom exclusive, in frame pixels."""

    panel: tuple[int, int, int, int]
    keys: dict[str, tuple[int, int, int, int]]
    joystick: tuple[int, int, int, int]
    key_px: int


@functools.lru_cache(maxsize=16)
def overlay_layout(height: int, width: int) -> OverlayLayout:
    """Where the panel, each key cap and the joystick go on a frame of (height, width) pixels."""
    key = min(round(KEY_FRACTION * height), int(width / (_PANEL_KEYS_WIDE + 1)))  # + 1: half-key margins
    if key < MIN_KEY_PX:
        raise ValueError(f"a {height}x{width} frame is too small for the action overlay (keys under {MIN_KEY_PX} px)")
    gap, pad, margin = max(1, round(GAP * key)), max(1, round(PAD * key)), max(1, round(key / 2))
    spacing = round(_CLUSTER_SPACING * key)
    cluster_w = 3 * key + 2 * gap
    panel_h = 2 * key + gap + 2 * pad
    left, top = margin, height - margin - panel_h
    keys = {}
    for name, (column, row) in _KEY_CELLS.items():
        x = left + pad + column * (key + gap) + (cluster_w + spacing if name in "ijkl" else 0)
        y = top + pad + row * (key + gap)
        keys[name] = (x, y, x + key, y + key)
    stick_left = left + pad + 2 * (cluster_w + spacing)
    stick_size = 2 * key + gap
    joystick = (stick_left, top + pad, stick_left + stick_size, top + pad + stick_size)
    panel = (left, top, joystick[2] + pad, top + panel_h)
    if panel[2] > width or panel[1] < 0:
        raise ValueError(f"a {height}x{width} frame is too small for the action overlay (panel {panel})")
    return OverlayLayout(panel=panel, keys=keys, joystick=joystick, key_px=key)


def _blend(low, high, amount: float) -> tuple[int, ...]:
    return tuple(round(a + (b - a) * amount) for a, b in zip(low, high))


@functools.lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _draw_panel(layout: OverlayLayout, key_levels: np.ndarray, look: np.ndarray) -> Image.Image:
    """The overlay panel for one frame as an RGBA image the size of `layout.panel`."""
    left, top, right, bottom = layout.panel
    panel = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    draw = ImageDraw.Draw(panel)
    radius = max(1, layout.key_px // 4)
    draw.rounded_rectangle((0, 0, right - left - 1, bottom - top - 1), radius=radius, fill=PANEL_RGBA)
    font = _font(max(6, round(0.55 * layout.key_px))) if layout.key_px >= 10 else None
    for column, name in enumerate(ACTION_KEYS):
        x0, y0, x1, y1 = layout.keys[name]
        box = (x0 - left, y0 - top, x1 - left - 1, y1 - top - 1)
        level = float(key_levels[column])
        draw.rounded_rectangle(box, radius=radius, fill=_blend(CAP_RGBA, LIT_RGBA, level), outline=EDGE_RGBA)
        if font is not None:
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(centre, name.upper(), fill=_blend(TEXT_RGB, LIT_TEXT_RGB, level), font=font, anchor="mm")
    x0, y0, x1, y1 = (v - offset for v, offset in zip(layout.joystick, (left, top, left, top)))
    centre_x, centre_y, ring = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0 - 1) / 2
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=CAP_RGBA, outline=EDGE_RGBA)
    knob = max(1, round(0.3 * ring))
    look = np.clip(look, -1.0, 1.0)
    # The square of (yaw, pitch) onto the ring's disc: same direction, radius the larger component.
    strength = float(np.abs(look).max())
    yaw, pitch = look * (strength / max(float(np.hypot(*look)), 1e-12))
    # Whole pixels, so the knob does not jitter with rounding-level changes of the look.
    knob_x = round(centre_x + yaw * (ring - knob))
    knob_y = round(centre_y - pitch * (ring - knob))  # pitch up: knob up
    if (knob_x, knob_y) != (round(centre_x), round(centre_y)):
        draw.line((centre_x, centre_y, knob_x, knob_y), fill=LIT_RGBA, width=max(1, layout.key_px // 8))
    draw.ellipse((knob_x - knob, knob_y - knob, knob_x + knob, knob_y + knob),
                 fill=_blend(EDGE_RGBA, LIT_RGBA, strength), outline=EDGE_RGBA)
    return panel


def draw_action_overlay(video: np.ndarray, key_levels: np.ndarray, look: np.ndarray) -> np.ndarray:
    """Draw the WASD + joystick overlay on every frame.

    Args:
        video: (F, H, W, 3) uint8.
        key_levels: (F, 8) in [0, 1], column k for camera.ACTION_KEYS[k] (1 = held).
        look: (F, 2) in [-1, 1], commanded (yaw right, pitch up) turn.

    Returns:
        A new (F, H, W, 3) uint8 video; pixels outside `overlay_layout(H, W).panel` are unchanged.
    """
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (F, H, W, 3), got {video.dtype} {video.shape}")
    frames = video.shape[0]
    key_levels, look = np.asarray(key_levels, np.float64), np.asarray(look, np.float64)
    if key_levels.shape != (frames, len(ACTION_KEYS)) or look.shape != (frames, 2):
        raise ValueError(f"key_levels must be ({frames}, {len(ACTION_KEYS)}) and look ({frames}, 2) for {frames} "
                         f"frames, got {key_levels.shape} and {look.shape}")
    layout = overlay_layout(*video.shape[1:3])
    left, top, right, bottom = layout.panel
    out = video.copy()
    for frame in range(frames):
        panel = np.asarray(_draw_panel(layout, np.clip(key_levels[frame], 0, 1), look[frame]), np.float32)
        alpha = panel[..., 3:] / 255.0
        region = out[frame, top:bottom, left:right].astype(np.float32)
        out[frame, top:bottom, left:right] = np.round(region * (1 - alpha) + panel[..., :3] * alpha).astype(np.uint8)
    return out
