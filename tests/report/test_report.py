"""bn-report on a real run: its plots, its page, what it reads (CSV, TensorBoard, config) and what it says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bn_lightning.report import write_report
from bn_lightning.report.analysis import health_alerts
from bn_lightning.report.plots import HEATMAPS
from bn_lightning.report.runs import load_run
from tests.report.helpers import check_page, check_png

LAYERS = ["net.features.1", "net.features.5"]  # SmallCNN's BN layers, input first
DRAWN = {f"{stem}.png" for stem, _, _ in HEATMAPS.values()} | {"curves.png", "xhat_histograms.png"}


def copy_run(run_dir: Path, tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report", *drop))
    return copy


def test_training_writes_the_report_and_prints_its_path(trained_run):
    run_dir, stdout = trained_run
    page = run_dir / "report" / "index.html"
    assert f"Report written to: {page}" in stdout.splitlines()
    assert {p.name for p in page.parent.glob("*.png")} == DRAWN
    for image in check_page(page):
        check_png(image)
    assert set(check_page(page)) == {page.parent / name for name in DRAWN}


def test_page_shows_alerts_drift_config_and_sources(trained_run):
    run_dir, _ = trained_run
    text = (run_dir / "report" / "index.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert "Health alerts" in text and "Largest drift" in text
    for layer in LAYERS:
        assert f"<td>{layer}</td>" in text
    assert "bn_lightning.module.BatchNormModule" in text  # the composed config
    assert "csv/version_0/metrics.csv" in text and "tensorboard/version_0" in text
    assert "Plots not drawn" not in text


def test_layers_in_network_order_and_events_on_the_epoch_axis(trained_run):
    run_dir, _ = trained_run
    data = load_run(run_dir)
    assert data.layers == LAYERS
    assert data.config["trainer"]["max_epochs"] == 3
    precise = data.scalars["bn/precise_bn/seconds"]
    # before each validation, at the epoch's end; not in epoch 2, where every BN layer is frozen (in eval mode)
    assert data.epoch_at(precise.steps).tolist() == [1.0, 2.0]
    freeze = data.scalars["bn/freeze/frozen_layers"]
    assert data.epoch_at(freeze.steps).tolist() == [2.0] and freeze.values.tolist() == [2.0]
    assert data.epoch_at(data.scalars["val/acc"].steps).tolist() == [1.0, 2.0, 3.0]
    heat = data.layer_series(LAYERS[0], "drift_kl")
    assert heat.steps.size == 18 and np.isfinite(heat.values).all()  # one record per step: 3 x 6
    assert {f"bn/{layer}/x_hat" for layer in LAYERS} <= set(data.histograms)


def test_alerts_use_the_runs_thresholds(trained_run, tmp_path):
    run_dir, _ = trained_run
    copy = copy_run(run_dir, tmp_path)
    config_file = copy / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    assert not health_alerts(load_run(copy))  # batches of 64: nothing to say
    config["callbacks"]["bn_drift"]["min_batch_size"] = 1000
    config_file.write_text(yaml.safe_dump(config))
    alerts = health_alerts(load_run(copy))
    assert [(a.layer, a.check, a.first_step, a.records) for a in alerts] == [
        (layer, "small_batch", 1, 18)
        for layer in LAYERS  # records are logged after the step: 1..18
    ]
    text = write_report(copy).page.read_text()
    assert "per-device batch of 64 is below 1000" in text and "bn=sync" in text


def test_tensorboard_alone_gives_every_plot(trained_run, tmp_path):
    copy = copy_run(trained_run[0], tmp_path, drop=("csv",))
    report = write_report(copy)
    assert {p.name for p in report.page.parent.glob("*.png")} == DRAWN
    assert load_run(copy).sources == ["tensorboard/version_0", ".hydra/config.yaml"]
    for image in check_page(report.page):
        check_png(image)


def test_csv_alone_draws_summary_lines_instead_of_histograms(trained_run, tmp_path):
    copy = copy_run(trained_run[0], tmp_path, drop=("tensorboard",))
    report = write_report(copy)
    names = {p.name for p in report.page.parent.glob("*.png")}
    assert names == (DRAWN - {"xhat_histograms.png"}) | {"layer_summary.png"}
    for image in check_page(report.page):
        check_png(image)


def test_missing_metrics_are_named_not_fatal(trained_run, tmp_path):
    copy = copy_run(trained_run[0], tmp_path, drop=("tensorboard",))
    metrics = next(copy.glob("csv/*/metrics.csv"))
    rows = metrics.read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, key in enumerate(header) if not key.startswith("bn/")]  # no BN callback ran
    metrics.write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in rows) + "\n")
    report = write_report(copy)
    text = report.page.read_text()
    assert "Plots not drawn" in text
    for stat in HEATMAPS:
        assert f"no `bn/&lt;layer&gt;/{stat}` metric was logged" in text
    assert "no BatchNormMonitor metrics" in text
    assert "Not checked: RunningStatDrift" in text
    assert {p.name for p in report.page.parent.glob("*.png")} == {"curves.png"}
    for image in check_page(report.page):
        check_png(image)


def test_a_second_report_leaves_no_stale_picture(trained_run, tmp_path):
    copy = copy_run(trained_run[0], tmp_path)
    write_report(copy)
    shutil.rmtree(copy / "tensorboard")
    shutil.rmtree(copy / "csv")
    (copy / "csv" / "version_0").mkdir(parents=True)
    (copy / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,val/acc\n0,5,0.5\n1,11,0.7\n")
    report = write_report(copy)
    assert {p.name for p in report.page.parent.glob("*.png")} == {"curves.png"}


@pytest.mark.parametrize("layers", [["net.features.5"], ["no.such.layer"]])
def test_chosen_histogram_layers(trained_run, tmp_path, layers):
    report = write_report(trained_run[0], out_dir=tmp_path / "out", layers=layers)
    names = {p.name for p in report.page.parent.glob("*.png")}
    if layers == ["no.such.layer"]:
        expected = "no x_hat histograms for no.such.layer (layers with histograms: net.features.1, net.features.5)"
        assert expected in report.page.read_text()
        assert "xhat_histograms.png" not in names and "layer_summary.png" in names
    else:
        assert "xhat_histograms.png" in names
        check_png(report.page.parent / "xhat_histograms.png")
