"""The overlay figure (mvfa.runs.visualize, figure=True): size, colour bar, caption text, contours, no tint."""
from __future__ import annotations

from PIL import Image
import cv2
import numpy as np
import pytest

from mvfa.runs.visualize import (
    BACKGROUND,
    CONTOUR_COLOUR,
    PREDICTED_COLOUR,
    decision_text,
    display_size,
    figure_layout,
    fit_text,
    footer_lines,
    overlay,
    save_png,
    title_lines,
)

SIZE = 56  # a tiny model's input: panels are enlarged 4x to 224


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey gradient image, a map that is 0 except for a bump at (row 20, column 35), and its mask."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    image = np.stack([0.3 + 0.4 * cols / SIZE] * 3).astype(np.float32)
    bump = np.exp(-((cols - 35) ** 2 + (rows - 20) ** 2) / 30.0).astype(np.float32)
    anomaly_map = np.where(bump > 0.01, bump, 0).astype(np.float32)
    mask = ((cols - 35) ** 2 + (rows - 20) ** 2 < 40).astype(np.float32)
    return image, anomaly_map, mask


def crop(picture: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return picture[y0:y1, x0:x1]


def jet_index(colours: np.ndarray) -> np.ndarray:
    """For each RGB colour, the index (0..255) of the nearest entry of OpenCV's jet colormap."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1].astype(int)
    distance = ((colours.astype(int)[:, None, :] - lut[None, :, :]) ** 2).sum(-1)
    return distance.argmin(axis=1)


# ------------------------------------------------------------------------------------------------
# Caption text


@pytest.mark.parametrize("score, threshold, expected", [
    (0.83, 0.61, "score 0.83 >= threshold 0.61: abnormal"),
    (0.42, 0.61, "score 0.42 < threshold 0.61: normal"),
    (0.61, 0.61, "score 0.61 >= threshold 0.61: abnormal"),  # the decision rule is score >= threshold
    (0.6149, 0.6151, "score 0.61 < threshold 0.62: normal"),  # rounding keeps the order
    (0.6149, 0.615, "score 0.6149 < threshold 0.615: normal"),  # digits until the two differ
    (0.61000001, 0.61, "score 0.61000001 >= threshold 0.61: abnormal"),
    (1.5, 0.25, "score 1.5 >= threshold 0.25: abnormal"),  # raw scores above 1
])
def test_decision_text(score, threshold, expected):
    assert decision_text(score, threshold) == expected


def test_decision_text_never_shows_equal_numbers_for_different_values():
    rng = np.random.default_rng(0)
    for score, threshold in rng.random((200, 2)) * 2:
        text = decision_text(score, threshold)
        shown = text.split(":")[0].split()
        assert (shown[1] == shown[-1]) == (score == threshold), text
        assert text.endswith("abnormal" if score >= threshold else ": normal")


def test_title_and_footer_lines():
    assert title_lines("a.png", 0.83, 1, 0.61) == ["a.png", "score 0.83 >= threshold 0.61: abnormal; label abnormal"]
    assert title_lines("a.png", 0.4, 0) == ["a.png", "score 0.4; label normal"]  # no threshold: no decision
    assert title_lines(None, None, 1, 0.61) == ["", "label abnormal"]  # no score: no decision either
    assert title_lines() == ["", ""]
    assert footer_lines("map (min-max over test set)", True, 0.61) == [
        "colour: map (min-max over test set)", "green: ground truth; magenta: map >= 0.61 (predicted region)"]
    assert footer_lines("x", False, None)[1] == "no mask or pixel threshold: no contours"


def test_long_names_are_shortened_in_the_middle():
    name = "patient_" + "x" * 200 + "_slice_0042.png"
    short = fit_text(name, 300)
    assert short.startswith("patient_") and short.endswith(".png") and "..." in short
    assert cv2.getTextSize(short, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1)[0][0] <= 300
    assert fit_text("a.png", 300) == "a.png"
    assert fit_text("\u00e9.png", 300) == "?.png"  # Hershey fonts are ASCII only


# ------------------------------------------------------------------------------------------------
# The figure


def test_figure_size_colour_bar_and_title(tmp_path):
    image, anomaly_map, mask = scene()
    picture = overlay(image, anomaly_map, mask, figure=True, name="Ungood_0003.png", score=0.83, label=1,
                      threshold=0.61, scale="map (min-max over test set)")
    path = save_png(picture, tmp_path / "figure.png")
    with Image.open(path) as saved:
        layout = figure_layout(SIZE)
        assert saved.size == (layout.width, layout.height) and saved.mode == "RGB"
        saved = np.asarray(saved)
    assert layout.panel == display_size(SIZE) == 224 and layout.width > 2 * layout.panel
    np.testing.assert_array_equal(saved, picture)

    # The colour bar: every column the same, a jet ramp from the top (high) to the bottom (low).
    bar = crop(saved, layout.bar)
    assert (bar == bar[:, :1]).all()
    index = jet_index(bar[:, 0])
    assert index[0] >= 250 and index[-1] <= 5 and (np.diff(index) <= 0).all()
    # Tick labels beside it, and text in the title and footer bands.
    x0, y0, x1, y1 = layout.bar
    labels = saved[y0:y1, x1 : layout.width - 1]
    assert (labels != BACKGROUND).any(axis=-1).sum() > 20
    for band in (layout.title, layout.footer):
        dark = (crop(saved, band) < 128).all(axis=-1)
        assert dark.sum() > 100, band
    # Without a name or score the title band stays empty.
    plain = overlay(image, anomaly_map, figure=True)
    assert (crop(plain, layout.title) == BACKGROUND).all()


def test_figure_has_no_tint_where_the_map_is_zero():
    image, anomaly_map, _ = scene()
    layout = figure_layout(SIZE)
    picture = overlay(image, anomaly_map, figure=True, name="a.png")
    left, right = crop(picture, layout.image_panel), crop(picture, layout.map_panel)
    cold = cv2.resize(anomaly_map, (layout.panel, layout.panel), interpolation=cv2.INTER_LINEAR) == 0
    assert cold.mean() > 0.5
    np.testing.assert_array_equal(right[cold], left[cold])  # normal areas keep the image's own pixels
    assert (np.abs(right.astype(int) - left.astype(int)).sum(-1)[~cold] > 0).any()  # the bump is coloured
    grey = left[..., 0].astype(int)
    assert (left[..., 0] == left[..., 1]).all() and grey[:, -1].mean() > grey[:, 0].mean()  # the image, untouched


def test_figure_contours():
    image, anomaly_map, mask = scene()
    layout = figure_layout(SIZE)

    def has(picture, box, colour):
        return (crop(picture, box) == colour).all(axis=-1).any()

    both = overlay(image, anomaly_map, mask, figure=True, score=0.9, threshold=0.5, pixel_threshold=0.5)
    assert has(both, layout.image_panel, CONTOUR_COLOUR) and has(both, layout.map_panel, CONTOUR_COLOUR)
    assert has(both, layout.map_panel, PREDICTED_COLOUR) and not has(both, layout.image_panel, PREDICTED_COLOUR)
    none = overlay(image, anomaly_map, None, figure=True, score=0.9, threshold=0.5)
    assert not has(none, layout.map_panel, CONTOUR_COLOUR) and not has(none, layout.map_panel, PREDICTED_COLOUR)
    # A pixel threshold above the map's values: no predicted region.
    high = overlay(image, anomaly_map, None, figure=True, pixel_threshold=2.0)
    assert not has(high, layout.map_panel, PREDICTED_COLOUR)


def test_legacy_panel_is_unchanged_and_refuses_caption_keywords():
    image, anomaly_map, mask = scene()
    assert overlay(image, anomaly_map, mask).shape == (display_size(SIZE), display_size(SIZE), 3)
    with pytest.raises(TypeError, match="figure=True"):
        overlay(image, anomaly_map, mask, score=0.5)
