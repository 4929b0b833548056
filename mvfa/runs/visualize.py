"""Anomaly-map pictures: the legacy blended panel, and a readable figure with a colour bar and a caption.

`overlay(image, map, mask, value_range)` returns the legacy panel (a jet heatmap blended over the
whole image, the ground-truth contour in green), the size of the displayed image; the demo uses it.
`overlay(..., figure=True, name=..., score=..., label=..., threshold=..., pixel_threshold=..., scale=...)`
returns the figure:

    +------------------------------------------------------------+
    | image name                                                 |
    | score 0.83 >= threshold 0.61: abnormal; label abnormal     |
    | [ image ]  [ map over the image ]  [colour bar] ticks      |
    | colour: <what the scale is>                                |
    | green: ground truth; magenta: map >= 0.61 (predicted ...)  |
    +------------------------------------------------------------+

The left panel is the image untouched (with the ground-truth contour when a mask is known); the right
panel shows the heatmap with an opacity that grows with the map value (ALPHA_EXPONENT), so normal
areas keep the image's own grey values instead of a blue tint. The colour bar carries the map's value range and its
footer line says what that range is (e.g. "map (min-max over the test set)"). The predicted region
(map >= pixel_threshold) is outlined in magenta when a pixel threshold is known.

Drawing uses OpenCV's Hershey fonts, which have ASCII glyphs only: other characters of a name are
shown as '?'.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path

from PIL import Image
import numpy as np

from mvfa.runtime.files import atomic_target

HEATMAP_WEIGHT = 0.5  # legacy panel: share of the heatmap in the blend
CONTOUR_COLOUR = (0, 255, 0)  # RGB: green ground-truth outline
CONTOUR_THICKNESS = 1
MIN_DISPLAY_SIZE = 224  # small inputs are enlarged by a whole factor so that overlays stay readable

# The figure (figure=True)
PREDICTED_COLOUR = (255, 0, 255)  # RGB: magenta outline of map >= pixel threshold (jet has no magenta)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
MAX_HEAT_ALPHA = 0.75  # opacity of the heatmap at the top of the scale; 0 at the bottom
# Opacity = MAX_HEAT_ALPHA * (scaled value) ** ALPHA_EXPONENT: squared, so that the middle of the scale
# (where normal tissue lies under statistics fitted on normal images) stays mostly transparent (0.19
# at 0.5) while high values show (0.75 at 1).
ALPHA_EXPONENT = 2
MARGIN = 8  # pixels around the figure's content
PANEL_GAP = 8  # between the two panels
BAR_GAP = 12  # between the map panel and the colour bar
BAR_WIDTH = 16
TICK_LENGTH = 4  # tick marks right of the bar
TICK_LABEL_WIDTH = 60  # room for a tick label such as "-1.23e-05"
FONT_SCALE = 0.42
LINE_HEIGHT = 16  # pixels per text line
TITLE_LINES = 2  # image name; score, decision and label
FOOTER_LINES = 2  # what the colour scale is; what the contours are
MIN_DIGITS, MAX_DIGITS = 2, 8  # significant digits of scores and thresholds in the caption
ELLIPSIS = "..."


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


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


# ------------------------------------------------------------------------------------------------
# Caption text


def _pair(a: float, b: float) -> tuple[str, str]:
    """`a` and `b` with the fewest significant digits (at least MIN_DIGITS) that tell them apart.

    Rounding is monotone, so two different strings keep the order of the values: the caption never
    shows "0.61 < 0.61". Values that agree to MAX_DIGITS digits are written in full (repr)."""
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1] or a == b:
            return shown
    return repr(float(a)), repr(float(b))


def decision_text(score: float, threshold: float) -> str:
    """'score 0.83 >= threshold 0.61: abnormal' or 'score 0.42 < threshold 0.61: normal' (predict's words)."""
    shown_score, shown_threshold = _pair(float(score), float(threshold))
    if score >= threshold:
        return f"score {shown_score} >= threshold {shown_threshold}: abnormal"
    return f"score {shown_score} < threshold {shown_threshold}: normal"


def title_lines(
    name: str | None = None, score: float | None = None, label: int | None = None, threshold: float | None = None
) -> list[str]:
    """The figure's two title lines: the image name; the score (with the decision when a threshold is
    known) and the label when known. Missing facts are left out; an unknown line is empty."""
    facts = []
    if score is not None:
        facts.append(decision_text(score, threshold) if threshold is not None else f"score {float(score):.4g}")
    if label is not None:
        facts.append(f"label {'abnormal' if int(label) else 'normal'}")
    return [name or "", "; ".join(facts)]


def footer_lines(scale: str, has_mask: bool, pixel_threshold: float | None) -> list[str]:
    """What the colour scale is, and what the contours are."""
    marks = []
    if has_mask:
        marks.append("green: ground truth")
    if pixel_threshold is not None:
        marks.append(f"magenta: map >= {float(pixel_threshold):.4g} (predicted region)")
    return [f"colour: {scale}", "; ".join(marks) if marks else "no mask or pixel threshold: no contours"]


# ------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class FigureLayout:
    """Where things are in a figure (pixels; boxes are (x0, y0, x1, y1), end-exclusive)."""

    width: int
    height: int
    panel: int  # side of each square panel
    title: tuple[int, int, int, int]
    image_panel: tuple[int, int, int, int]
    map_panel: tuple[int, int, int, int]
    bar: tuple[int, int, int, int]
    footer: tuple[int, int, int, int]


def figure_layout(image_size: int) -> FigureLayout:
    """The figure's layout for a model input of `image_size` pixels (its panels are display_size wide)."""
    panel = display_size(image_size)
    title_height = TITLE_LINES * LINE_HEIGHT
    top = MARGIN + title_height + MARGIN // 2
    image_x = MARGIN
    map_x = image_x + panel + PANEL_GAP
    bar_x = map_x + panel + BAR_GAP
    width = bar_x + BAR_WIDTH + TICK_LENGTH + TICK_LABEL_WIDTH + MARGIN
    footer_y = top + panel + MARGIN // 2
    height = footer_y + FOOTER_LINES * LINE_HEIGHT + MARGIN
    return FigureLayout(
        width=width, height=height, panel=panel,
        title=(MARGIN, MARGIN, width - MARGIN, MARGIN + title_height),
        image_panel=(image_x, top, image_x + panel, top + panel),
        map_panel=(map_x, top, map_x + panel, top + panel),
        bar=(bar_x, top, bar_x + BAR_WIDTH, top + panel),
        footer=(MARGIN, footer_y, width - MARGIN, footer_y + FOOTER_LINES * LINE_HEIGHT),
    )


# ------------------------------------------------------------------------------------------------
# Drawing


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _text_width(cv2, text: str) -> int:
    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, 1)[0][0]


def fit_text(text: str, width: int) -> str:
    """`text` in ASCII, shortened in the middle with '...' to fit `width` pixels (keeps a name's extension)."""
    import cv2

    text = _ascii(text)
    if _text_width(cv2, text) <= width:
        return text
    keep = len(text)
    while keep > 0:
        keep -= 1
        head = text[: (keep + 1) // 2]
        tail = text[len(text) - keep // 2 :] if keep // 2 else ""
        candidate = head + ELLIPSIS + tail
        if _text_width(cv2, candidate) <= width:
            return candidate
    return ELLIPSIS


def _put_text(cv2, canvas: np.ndarray, text: str, x: int, baseline_y: int, width: int) -> None:
    cv2.putText(canvas, fit_text(text, width), (x, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, TEXT_COLOUR, 1,
                cv2.LINE_AA)


def _jet(cv2, values_0_1: np.ndarray) -> np.ndarray:
    """Jet colours (RGB uint8) of values in [0, 1]."""
    return cv2.applyColorMap((values_0_1 * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def _scaled(cv2, anomaly_map, value_range: tuple[float, float], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(map resized to `shape`, float32; the same mapped from value_range to [0, 1], clipped)."""
    values = _numpy(anomaly_map).astype(np.float32)
    values = values.reshape(values.shape[-2:])
    if values.shape != shape:
        values = cv2.resize(values, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    low, high = value_range
    return values, np.clip((values - low) / max(high - low, 1e-12), 0, 1)


def _contours(cv2, binary: np.ndarray, shape: tuple[int, int]):
    binary = binary.reshape(binary.shape[-2:]).astype(np.uint8)
    if binary.shape != shape:
        binary = cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return contours


def _tick_label(value: float) -> str:
    return f"{value:.3g}"


def overlay(
    image,
    anomaly_map,
    mask=None,
    value_range: tuple[float, float] = (0.0, 1.0),
    *,
    figure: bool = False,
    name: str | None = None,
    score: float | None = None,
    label: int | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    scale: str = "anomaly map",
) -> np.ndarray:
    """An RGB uint8 picture of `anomaly_map` over `image` ([3, S, S] in [0, 1], or SxSx3 uint8).

    figure False (default): the legacy panel, a jet heatmap (value_range mapped to the colours)
    blended over the whole image, `mask`'s contour in green; display_size(S) square.
    figure True: the readable figure (module docstring; `figure_layout(S)` gives its size), with a
    title from name, score, label and threshold (the image-level decision threshold), the predicted
    region's contour where the map >= pixel_threshold (a threshold on the map's own values), and
    `scale` saying what the colour bar's values are (e.g. "map (checkpoint normalisation)").
    The caption keywords need figure=True: the legacy panel has no room for them.
    """
    if not figure:
        if any(v is not None for v in (name, score, label, threshold, pixel_threshold)):
            raise TypeError("overlay(): name, score, label, threshold and pixel_threshold are drawn only with figure=True")
        return _legacy_panel(image, anomaly_map, mask, value_range)
    return _figure(image, anomaly_map, mask, value_range, name, score, label, threshold, pixel_threshold, scale)


def _legacy_panel(image, anomaly_map, mask, value_range: tuple[float, float]) -> np.ndarray:
    """Blend a jet heatmap of `anomaly_map` (scaled from value_range to 0..255) over `image`; draw `mask`'s contour."""
    import cv2  # here, not at the top: OpenCV adds 26 MB to every process, and most runs draw no overlay

    rgb = to_uint8_image(image)
    side = display_size(rgb.shape[0])
    if side != rgb.shape[0]:
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
    _, scaled = _scaled(cv2, anomaly_map, value_range, rgb.shape[:2])
    heat = _jet(cv2, scaled)
    blended = cv2.addWeighted(rgb, 1 - HEATMAP_WEIGHT, np.ascontiguousarray(heat), HEATMAP_WEIGHT, 0)
    if mask is not None:
        cv2.drawContours(blended, _contours(cv2, _numpy(mask) > 0.5, blended.shape[:2]), -1, CONTOUR_COLOUR,
                         CONTOUR_THICKNESS)
    return blended


def _figure(image, anomaly_map, mask, value_range, name, score, label, threshold, pixel_threshold, scale) -> np.ndarray:
    import cv2

    rgb = to_uint8_image(image)
    layout = figure_layout(rgb.shape[0])
    side = layout.panel
    if rgb.shape[:2] != (side, side):
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
    values, scaled = _scaled(cv2, anomaly_map, value_range, (side, side))
    alpha = (MAX_HEAT_ALPHA * scaled**ALPHA_EXPONENT)[..., None]
    heat_panel = np.round(rgb * (1 - alpha) + _jet(cv2, scaled) * alpha).astype(np.uint8)
    image_panel = rgb.copy()
    if mask is not None:
        truth = _contours(cv2, _numpy(mask) > 0.5, (side, side))
        for panel in (image_panel, heat_panel):
            cv2.drawContours(panel, truth, -1, CONTOUR_COLOUR, CONTOUR_THICKNESS)
    if pixel_threshold is not None:
        predicted = _contours(cv2, values >= pixel_threshold, (side, side))
        cv2.drawContours(heat_panel, predicted, -1, PREDICTED_COLOUR, CONTOUR_THICKNESS)

    canvas = np.full((layout.height, layout.width, 3), BACKGROUND, dtype=np.uint8)
    for box, panel in ((layout.image_panel, image_panel), (layout.map_panel, heat_panel)):
        x0, y0, x1, y1 = box
        canvas[y0:y1, x0:x1] = panel
    _draw_bar(cv2, canvas, layout, value_range, pixel_threshold)
    text_width = layout.title[2] - layout.title[0]
    for index, line in enumerate(title_lines(name, score, label, threshold)):
        _put_text(cv2, canvas, line, layout.title[0], layout.title[1] + (index + 1) * LINE_HEIGHT - 4, text_width)
    for index, line in enumerate(footer_lines(scale, mask is not None, pixel_threshold)):
        _put_text(cv2, canvas, line, layout.footer[0], layout.footer[1] + (index + 1) * LINE_HEIGHT - 4, text_width)
    return canvas


def _draw_bar(cv2, canvas: np.ndarray, layout: FigureLayout, value_range, pixel_threshold: float | None) -> None:
    """The colour bar (top: value_range's high end), ticks at both ends and the middle, and the pixel threshold."""
    x0, y0, x1, y1 = layout.bar
    height = y1 - y0
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(x1 - x0, axis=1)
    canvas[y0:y1, x0:x1] = _jet(cv2, ramp)
    low, high = (float(v) for v in value_range)
    label_x = x1 + TICK_LENGTH + 2
    ticks = [(0.0, high), (0.5, (low + high) / 2), (1.0, low)]  # (fraction from the top, value)
    for fraction, value in ticks:
        y = y0 + round(fraction * (height - 1))
        cv2.line(canvas, (x1, y), (x1 + TICK_LENGTH - 1, y), TEXT_COLOUR, 1)
        baseline = min(max(y + 4, y0 + 8), y1)
        _put_text(cv2, canvas, _tick_label(value), label_x, baseline, TICK_LABEL_WIDTH)
    if pixel_threshold is not None and high > low and low <= pixel_threshold <= high and math.isfinite(pixel_threshold):
        y = y0 + round((high - pixel_threshold) / (high - low) * (height - 1))
        cv2.line(canvas, (x0, y), (x1 + TICK_LENGTH - 1, y), PREDICTED_COLOUR, 1)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG through a temporary file and a rename (usual file mode)."""
    with atomic_target(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
