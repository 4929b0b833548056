"""Anomaly-map overlays: a heatmap blended over the image, the ground-truth contour drawn on top."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_target

HEATMAP_WEIGHT = 0.5  # share of the heatmap in the blend
CONTOUR_COLOUR = (0, 255, 0)  # RGB: green ground-truth outline
CONTOUR_THICKNESS = 1
MIN_DISPLAY_SIZE = 224  # small inputs are enlarged by a whole factor so that overlays stay readable


def display_size(size: int) -> int:
    """The overlay's side for a model input of `size` pixels: size times the smallest factor reaching 224."""
    return size * max(1, -(-MIN_DISPLAY_SIZE // size))


def to_uint8_image(image) -> np.ndarray:
    """[3, H, W] float in [0, 1] (tensor or array) or HxWx3 uint8 -> HxWx3 uint8."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def overlay(image, anomaly_map, mask=None, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Blend a jet heatmap of `anomaly_map` (scaled from value_range to 0..255) over `image`; draw `mask`'s contour."""
    import cv2  # here, not at the top: OpenCV adds 26 MB to every process, and most runs draw no overlay

    rgb = to_uint8_image(image)
    side = display_size(rgb.shape[0])
    if side != rgb.shape[0]:
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
    values = anomaly_map.detach().cpu().numpy() if hasattr(anomaly_map, "detach") else np.asarray(anomaly_map)
    low, high = value_range
    scaled = np.clip((values.astype(np.float32) - low) / max(high - low, 1e-12), 0, 1)
    if scaled.shape != rgb.shape[:2]:
        scaled = cv2.resize(scaled, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    blended = cv2.addWeighted(rgb, 1 - HEATMAP_WEIGHT, np.ascontiguousarray(heat), HEATMAP_WEIGHT, 0)
    if mask is not None:
        binary = (mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)) > 0.5
        binary = binary.reshape(binary.shape[-2:]).astype(np.uint8)
        if binary.shape != blended.shape[:2]:
            binary = cv2.resize(binary, (blended.shape[1], blended.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blended, contours, -1, CONTOUR_COLOUR, CONTOUR_THICKNESS)
    return blended


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG through a temporary file and a rename."""
    with atomic_target(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
