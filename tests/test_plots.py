"""finetune/reporting/plots.py: the training curves (loss, accuracy with the exported epoch marked, the LR
per group) and the image grid's layout, checked on the figures' data and on the PNGs written."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from finetune.reporting import plots

# Four epochs as the loop records them: the model improves at epoch 1, its weight average at 3 (exported
# last), nothing after; the body's LR ends the cosine at 0, which a log axis cannot show.
RECORDS = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_acc": acc, "ema_val_acc": ema,
            "val_balanced_acc": acc - 0.01, "exported": exported, "lr": {"body": body, "head": 10 * body}}
           for e, acc, ema, exported, body in [(1, 0.50, 0.40, "model", 1e-4), (2, 0.45, 0.48, None, 1e-3),
                                                (3, 0.60, 0.70, "ema", 5e-4), (4, 0.62, 0.69, None, 0.0)]]


def axis_titled(fig, title: str):
    [ax] = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def line_labelled(ax, start: str):
    [line] = [line for line in ax.get_lines() if line.get_label().startswith(start)]
    return line


def test_curves_mark_the_exported_epoch_and_plot_the_weight_average():
    """The export on disk is the last improvement's (epoch 3, the average), not the highest val_acc (4)."""
    fig = plots.curves_figure(RECORDS)
    acc = axis_titled(fig, "val accuracy")
    best = line_labelled(acc, "exported")
    assert list(best.get_xdata()) == [3] and list(best.get_ydata()) == [pytest.approx(70.0)]
    assert "epoch 3 (ema, 70.0%)" in best.get_label()
    assert list(line_labelled(acc, "top-1, weight average").get_ydata()) == pytest.approx([40, 48, 70, 69])


def test_curves_plot_each_groups_lr_on_a_log_scale_leaving_zero_out():
    lr = axis_titled(plots.curves_figure(RECORDS), "learning rate per group (0 left out)")
    assert lr.get_yscale() == "log"
    assert sorted(line.get_label() for line in lr.get_lines()) == ["body", "head"]
    body, head = (list(line_labelled(lr, name).get_ydata()) for name in ("body", "head"))
    assert body[:3] == [1e-4, 1e-3, 5e-4] and head[:3] == pytest.approx([1e-3, 1e-2, 5e-3])
    assert math.isnan(body[3]) and math.isnan(head[3])


def test_curves_of_records_without_lr_ema_or_export_still_draw(tmp_path):
    """Records of an older run (or a run without EMA) have none of the new keys."""
    old = [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")} for r in RECORDS]
    fig = plots.curves_figure(old)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "val accuracy"]
    assert [line.get_label() for line in axis_titled(fig, "val accuracy").get_lines()] == ["top-1"]
    plots.save_curves(old, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").is_file()


def test_curves_png_has_three_panels(tmp_path):
    plots.save_curves(RECORDS, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size == (1500, 400)
        assert np.asarray(png.convert("L"), dtype=np.float64).std() > 5  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_grid_title_sits_above_the_first_row_of_captions(tmp_path, monkeypatch):
    """The figure's title and the first row's two-line captions do not overlap in the PNG. 48 images, as
    the default 24 hard examples of train and of val: tight_layout let them overlap from about 8 rows."""
    drawn, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), save(fig, path)))
    captions = [f"✗ train {i}: given cat\npredicted dog (90%)" for i in range(48)]
    plots.save_image_grid([Image.new("RGB", (8, 8), (90, 90, 90))] * 48, captions, tmp_path / "grid.png",
                          title="highest loss first, train then val: review these labels")
    [fig] = drawn
    canvas = FigureCanvasAgg(fig)  # the closed figure's layout, drawn again as it was saved
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    first_row = [ax.title.get_window_extent(renderer) for ax in fig.axes[:6]]
    assert title.y0 >= max(box.y1 for box in first_row)
    assert title.y1 <= fig.bbox.y1 + 0.5  # and still inside the image


def test_grid_captions_take_their_colours(tmp_path):
    fig = plots.image_grid_figure([Image.new("RGB", (8, 8))] * 3, ["a", "b", "c"], columns=3,
                                  colors=["green", "red", "green"])
    assert [ax.title.get_color() for ax in fig.axes] == ["green", "red", "green"]
    assert [ax.title.get_color() for ax in plots.image_grid_figure([Image.new("RGB", (8, 8))], ["a"]).axes[:1]] \
        == ["black"]
