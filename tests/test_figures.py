"""The papers' figure from runs built by hand: short panel titles, the caption
of what the runs share, epochs when steps mean other things, ticks on every
panel, and the PNG and PDF files."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from cg_tf.measure import report, tags


def config(aggregator=None, batch=25, steps_per_epoch=40, rate=0.5, **extra):
    return {"aggregator": aggregator or {"name": "mean"}, "batch_size": batch,
            "steps_per_epoch": steps_per_epoch, "noise": {"mode": "uniform", "rate": rate},
            "model": "fc", "learning_rate": 0.1, "source": "idx:/data/fashion-mnist/",
            "data_dir": "out/data/noise_0.5", **extra}


def run(name, cfg, steps=(1, 20, 40)):
    return report.Run(name, cfg, {tag: [(s, 0.5) for s in steps]
                                  for tag in tags.ACCURACY_CURVES.values()})


WINSORIZED = {"name": "winsorized", "c": 4}
# Two aggregators at two batch sizes, on 1,000 examples: 40 and 20 steps per epoch.
RUNS = [run("sweep/runs/mean_b25", config()),
        run("sweep/runs/mean_b50", config(batch=50, steps_per_epoch=20), steps=(1, 10, 20)),
        run("sweep/runs/winsorized_b25", config(WINSORIZED)),
        run("sweep/runs/winsorized_b50", config(WINSORIZED, 50, 20), steps=(1, 10, 20))]


def test_a_config_read_as_phrases():
    described = report.describe({**config(WINSORIZED, rate=0.125), "clamp_norms": True})
    assert described == {"aggregator": "winsorized c=4", "data": "fashion-mnist",
                         "model": "model fc", "noise": "12.5% noise",
                         "noise_mode": "uniform noise", "batch": "batch 25",
                         "learning_rate": "lr 0.1", "clamp": report.CLAMPED}
    assert report.describe({**config(), "clamp_norms": False})["clamp"] == report.FREE
    assert tuple(described) == report.PHRASES  # every phrase in titles and captions
    assert report.describe({"noise": {"mode": "uniform", "rate": 0.0}}) == {"noise": "no noise"}
    # The trainer records the layer sizes of an fc net: figures name them.
    assert report.describe(config(architecture="fc 784-2048-10"))["model"] == (
        "model fc 784-2048-10")


def test_titles_say_what_differs_and_the_caption_what_all_share():
    titles = report.panel_titles({r.name: [r] for r in RUNS})
    assert list(titles.values()) == ["plain SGD, batch 25", "plain SGD, batch 50",
                                     "winsorized c=4, batch 25", "winsorized c=4, batch 50"]
    assert report.caption(RUNS) == "fashion-mnist, model fc, 50% uniform noise, lr 0.1"
    # A shared aggregator is named, last; no noise is said so.
    clean = [run("a", config(rate=0.0)), run("b", config(rate=0.0, batch=50))]
    assert report.caption(clean) == ("fashion-mnist, model fc, no noise, lr 0.1, "
                                     "plain SGD")


def test_panels_of_seeds_are_titled_by_their_setting():
    # The sweep: a panel per setting, its seeds' runs (configs alike) in it.
    panels = {f"{a}_noise{rate:g}": [run(f"{a}_noise{rate:g}_seed{s}",
                                         config(agg, rate=rate)) for s in (0, 1)]
              for a, agg in (("mean", None), ("winsorized_c4", WINSORIZED))
              for rate in (0.0, 0.5)}
    assert list(report.panel_titles(panels).values()) == [
        "plain SGD, no noise", "plain SGD, 50% noise", "winsorized c=4, no noise",
        "winsorized c=4, 50% noise"]
    # The noise's mode is that of every noisy run.
    assert report.caption([r for rs in panels.values() for r in rs]) == (
        "fashion-mnist, model fc, uniform noise, batch 25, lr 0.1")


def test_titles_fall_back_to_the_run_names_where_configs_do_not_tell_panels_apart():
    seeds = {f"runs/mean_seed{s}": [run(f"runs/mean_seed{s}", config())] for s in (0, 1)}
    assert list(report.panel_titles(seeds).values()) == ["mean_seed0", "mean_seed1"]
    same_names = {f"{d}/runs/mean": [run(f"{d}/runs/mean", config())] for d in ("a", "b")}
    assert list(report.panel_titles(same_names).values()) == ["a/runs/mean", "b/runs/mean"]
    # One panel: nothing differs, so its run's name.
    assert report.panel_titles({"runs/x": RUNS[:1]}) == {"runs/x": "x"}


def test_the_dataset_is_named_by_its_source_else_its_directory():
    assert report.dataset_name({"source": "digits", "data_dir": "data/d50"}) == "digits"
    assert report.dataset_name({"source": "tfds:mnist"}) == "mnist"
    assert report.dataset_name({"source": "idx:gs://b/fashion-mnist"}) == "fashion-mnist"
    # Records of another dataset (easy/hard), or an older run without a source.
    assert report.dataset_name({"source": "records:out/data/clean/data:train",
                                "data_dir": "out/split/easy"}) == "easy"
    assert report.dataset_name({"data_dir": "data/digits_noisy50/"}) == "digits_noisy50"
    assert report.dataset_name({}) is None


def test_epochs_on_the_x_axis_when_steps_per_epoch_differ():
    label, scale = report.x_axis(RUNS)
    assert label == "epoch"
    assert scale == {r.name: 1 / r.config["steps_per_epoch"] for r in RUNS}
    # One batch size: steps. Steps per epoch unknown for a run (an older one): steps.
    assert report.x_axis(RUNS[::2]) == ("step", {r.name: 1.0 for r in RUNS[::2]})
    old = run("old", {k: v for k, v in config(batch=50).items() if k != "steps_per_epoch"})
    assert report.x_axis([RUNS[0], old])[0] == "step"


def test_the_figure_has_titles_ticks_caption_and_legend(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.update(fig=fig) or {})
    report.accuracy_figure({r.name: [r] for r in RUNS}, str(tmp_path / "f.png"), columns=3)
    fig = drawn["fig"]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in panels][:2] == ["plain SGD, batch 25", "plain SGD, batch 50"]
    for ax in panels:  # every panel shows its tick labels, though the axes are shared
        assert ax.xaxis.get_major_ticks()[0].label1.get_visible()
        assert ax.yaxis.get_major_ticks()[0].label1.get_visible()
        assert max(line.get_xdata()[-1] for line in ax.get_lines()) == pytest.approx(1.0)
    assert fig.get_supxlabel() == "epoch"
    (legend,) = fig.legends
    assert legend.get_title().get_text() == report.caption(RUNS)
    assert [t.get_text() for t in legend.get_texts()] == [
        label for label, _, _ in report.CURVE_STYLES.values()]


def test_save_figure_writes_a_png_and_a_pdf_beside_it(tmp_path):
    paths = report.accuracy_figure({r.name: [r] for r in RUNS}, str(tmp_path / "fig.png"))
    assert paths == {"figure": str(tmp_path / "fig.png"), "figure_pdf": str(tmp_path / "fig.pdf")}
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob("*.tmp"))
    assert report.figure_paths("gs://b/out/figure.png") == {
        "figure": "gs://b/out/figure.png", "figure_pdf": "gs://b/out/figure.pdf"}


@pytest.mark.parametrize("runs", [2, 3, 5])
def test_band_over_runs_matches_numpy_at_the_steps_all_share(runs):
    rng = np.random.default_rng(runs)
    steps = [1, 2, 4, 8, 600, 1200, 1800]
    series = [[(s, float(v)) for s, v in zip(steps, rng.uniform(size=len(steps)))]
              for _ in range(runs)]
    series[0] = series[0][:-1] + [(1500, 0.3)]  # a step only one run has is left out
    series[-1] = series[-1][1:]  # as is one a run lacks
    spread = report.band(series)
    shared = steps[1:-1]
    values = np.array([[dict(s)[step] for step in shared] for s in series])
    np.testing.assert_array_equal(spread.steps, shared)
    np.testing.assert_allclose(spread.mean, values.mean(0))
    np.testing.assert_allclose(spread.std, values.std(0))
    low, high = ((values.min(0), values.max(0)) if runs <= 3 else
                 (values.mean(0) - values.std(0), values.mean(0) + values.std(0)))
    np.testing.assert_allclose(spread.low, low)
    np.testing.assert_allclose(spread.high, high)
    assert spread.runs == runs
    assert report.band([[(1, 0.5)], [(2, 0.5)]]) is None and report.band([]) is None


def test_a_panel_of_seeds_draws_their_mean_and_band(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.update(fig=fig) or {})
    test = tags.ACCURACY_CURVES["test"]
    seeds = [report.Run(f"runs/mean_seed{i}", config(), {test: [(1, 0.1 * i), (20, 0.2 + i / 10),
                                                                (40, 0.9 - i / 10)]})
             for i in range(3)]
    report.accuracy_figure({"mean": seeds}, str(tmp_path / "f.png"))
    ax = drawn["fig"].axes[0]
    (line,) = ax.get_lines()  # one mean curve, not a line per seed
    np.testing.assert_allclose(line.get_ydata(), [0.1, 0.3, 0.8])
    (fill,) = ax.collections
    ys = fill.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.0) and max(ys) == pytest.approx(0.9)
    (legend,) = drawn["fig"].legends
    assert " ".join(legend.get_title().get_text().split()).endswith(
        "each panel the mean of 3 runs (band: min to max)")


# -- tools.update_shares: f_p and f_c of the probe against their null ------------


def write_probe_run(log_dir, noise, probe_size, shares):
    """An event directory as a run writes it: its configuration at step 0 and
    f_p, f_c at the steps of `shares` ({step: (f_p, f_c or None)})."""
    import tensorflow as tf

    from cg_tf.measure import monitor
    writer = tf.summary.create_file_writer(str(log_dir))
    monitor.write_run_config(writer, {"noise": noise, "probe_size": probe_size,
                                      "batch_size": 4, "source": "digits",
                                      "aggregator": {"name": "mean"}})
    with writer.as_default():
        for step, (f_p, f_c) in shares.items():
            tf.summary.scalar(tags.update_share_tag("mean", "pristine"), f_p, step=step)
            if f_c is not None:
                tf.summary.scalar(tags.update_share_tag("mean", "corrupt"), f_c, step=step)
    writer.close()


def test_update_shares_csv_and_figure_from_event_files(monkeypatch, tmp_path):
    import csv

    from tools import update_shares
    noisy = {"mode": "permute", "rate": 0.5, "seed": 0}
    write_probe_run(tmp_path / "runs" / "noisy", noisy, 4,
                    {1: (0.75, 0.25), 4: (0.5, 0.5), 64: (0.125, 0.875), 128: (0.5, None)})
    write_probe_run(tmp_path / "runs" / "clean", {"mode": "permute", "rate": 0.0}, 4,
                    {1: (1.0, -0.0), 4: (1.0, 0.0)})
    runs = {r.name: r for r in report.load_runs(str(tmp_path / "runs"))}
    assert sorted(runs) == ["clean", "noisy"]
    # The null: 3 of the 4 probe examples pristine (what the source says is
    # checked against the pipeline's records below); no noise: 1, unread.
    read = lambda spec: pytest.fail("a clean run's null needs no data")  # noqa: E731
    assert update_shares.null_share(runs["clean"].config, 3, read) == 1.0
    monkeypatch.setattr(update_shares, "probe_pristine", lambda pairs, noise, c, shards, m: 3)
    pairs = [(str(i), i % 2) for i in range(8)]  # 8 examples, 2 batches of 4
    with pytest.raises(ValueError, match="the run had 5"):
        update_shares.null_share({**runs["noisy"].config, "steps_per_epoch": 5}, 3,
                                 lambda spec: (pairs, 2))
    null = update_shares.null_share(runs["noisy"].config, 3, lambda spec: (pairs, 2))
    assert null == 0.75
    rows = (update_shares.share_rows(runs["clean"], 1.0)
            + update_shares.share_rows(runs["noisy"], null))
    path = tmp_path / update_shares.CSV_FILE
    report.write_table(str(path), rows, update_shares.COLUMNS)
    with open(path) as f:
        got = [(r["run"], float(r["noise_rate"]), int(r["step"]), float(r["f_p"]),
                r["f_c"], float(r["null_f_p"])) for r in csv.DictReader(f)]
    # Step 128 has no f_c: left out; -0.0 written as 0.0.
    assert got == [("clean", 0.0, 1, 1.0, "0.0", 1.0), ("clean", 0.0, 4, 1.0, "0.0", 1.0),
                   ("noisy", 0.5, 1, 0.75, "0.25", 0.75), ("noisy", 0.5, 4, 0.5, "0.5", 0.75),
                   ("noisy", 0.5, 64, 0.125, "0.875", 0.75)]
    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, p: drawn.update(fig=fig) or {})
    update_shares.figure(list(runs.values()), rows, str(tmp_path / "f.png"))
    (ax,) = drawn["fig"].axes  # the clean run is left out
    assert ax.get_title() == "50% noise (null 0.75)" and ax.get_xscale() == "log"
    shares, null_line = ax.get_lines()
    np.testing.assert_array_equal(shares.get_xdata(), [1, 4, 64])
    np.testing.assert_array_equal(shares.get_ydata(), [0.75, 0.5, 0.125])
    assert null_line.get_linestyle() == "--" and null_line.get_color() == shares.get_color()
    np.testing.assert_array_equal(null_line.get_ydata(), [0.75, 0.75])


def test_update_shares_null_counts_the_probe_the_reader_gives(tmp_path):
    """The probe's pristine count rebuilt from the source is that of the first
    examples the reader streams from the pipeline's records."""
    from conftest import run_build

    from cg_tf.data.reader import Reader
    from tools import update_shares
    noise = {"mode": "permute", "rate": 0.5, "seed": 3}
    run_build(tmp_path, mode="permute", rate=0.5, seed=3, num_shards=3)
    mixed = Reader.open(str(tmp_path), 50).eval_subsets(200)["mixed"]
    ids = [i.decode() for b in mixed for i in b["example_id"].numpy()]
    corrupt = [int(c) for b in mixed for c in b["is_corrupt"].numpy()]
    pairs, classes = update_shares.training_examples("digits")
    assert update_shares.file_order([i for i, _ in pairs], 3)[:200] == ids
    assert update_shares.corrupt_ids(pairs, noise, classes) & set(ids) == {
        i for i, c in zip(ids, corrupt) if c}
    for m in (50, 200):
        assert update_shares.probe_pristine(pairs, noise, classes, 3, m) == m - sum(corrupt[:m])
    assert 0 < sum(corrupt[:50]) < 50  # both kinds in the probe


def test_plot_draws_a_figure_per_dataset(tmp_path):
    """A figure compares runs of one dataset: tools.plot draws one per dataset
    of a mixed logdir, named after it, instead of mixing them."""
    from conftest import run_main

    from cg_tf.measure.monitor import write_run_config
    for run, source in (("a", "digits"), ("b", "idx:/data/fashion-mnist"), ("c", "digits")):
        writer = tf.summary.create_file_writer(str(tmp_path / "runs" / run))
        write_run_config(writer, {"aggregator": {"name": "mean"}, "source": source})
        with writer.as_default():
            for step in (1, 2):
                tf.summary.scalar(tags.eval_tag("test", "accuracy"), 0.5, step=step)
        writer.close()
    done = run_main("tools.plot", f"--logdir={tmp_path / 'runs'}", f"--out={tmp_path / 'f.png'}")
    assert done.returncode == 0, done.stderr[-2000:]
    for dataset in ("digits", "fashion-mnist"):
        assert f"figure: {tmp_path / f'f_{dataset}.png'}" in done.stdout, done.stdout
        assert (tmp_path / f"f_{dataset}.png").stat().st_size > 5_000
    assert not (tmp_path / "f.png").exists()


# -- tools.share_figure: the same clipped share against the batch ---------------


def write_study(folder, runs, noise=0.5, clamp=False):
    """A published study as tools.publish_runs writes it: summary.csv and each
    run's config.json. `runs`: (run, aggregator, c, layers, batch, late, fall)."""
    lines = ["run,aggregator,parameter,layers,noise_rate,seed,train_examples,"
             "late_test_accuracy,corrupt_accuracy,fall_step"]
    for seed, (name, aggregator, c, layers, batch, late, fall) in enumerate(runs):
        lines.append(f"{name},{aggregator},{c},{layers},{noise},{seed},6000,{late},0.5,{fall}")
        (folder / "runs" / name).mkdir(parents=True)
        (folder / "runs" / name / "config.json").write_text(json.dumps(
            {"batch_size": batch, "seed": seed, "clamp_norms": clamp, "steps": 600,
             "dataset": {"noise": {"mode": "permute", "rate": noise}}}))
    (folder / "summary.csv").write_text("\n".join(lines) + "\n")


def test_share_figure_binomial_tail():
    from scipy.stats import binom

    from tools import share_figure
    for batch, c in ((100, 4), (200, 8), (400, 16), (50, 2), (10, 10), (8192, 328)):
        assert share_figure.starved(batch, c, 10) == pytest.approx(binom.cdf(c, batch, 0.1),
                                                                   rel=1e-9), (batch, c)
    assert share_figure.one_in(share_figure.starved(100, 4, 10)) == "1 in 42"
    assert share_figure.one_in(share_figure.starved(10 ** 6, 0, 10)) == "under 1e-300"
    assert share_figure.whole_c(0.04, 400) == 16
    with pytest.raises(ValueError, match="--share=0.025 x batch 100 is 2.5, not a whole"):
        share_figure.whole_c(0.025, 100)


def test_share_figure_keeps_plain_sgd_and_the_share_and_draws_each_seed(monkeypatch, tmp_path):
    from tools import share_figure
    write_study(tmp_path / "b100", [("mean_0", "mean", "", "all", 100, 0.6, 22000),
                                    ("w4_0", "winsorized", 4, "all", 100, 0.4, 1200),
                                    ("w4_1", "winsorized", 4, "all", 100, 0.3, ""),
                                    ("w2_0", "winsorized", 2, "all", 100, 0.8, 9000),
                                    ("w4_hidden", "winsorized", 4, "hidden", 100, 0.5, 9000),
                                    ("m3", "median_of_means", 3, "all", 100, 0.5, 9000)])
    write_study(tmp_path / "b200", [("w8_0", "winsorized", 8, "all", 200, 0.2, 1500),
                                    ("w8_1", "winsorized", 8, "all", 200, 0.1, 3000)])
    # The runs not drawn need no config.json.
    (tmp_path / "b100" / "runs" / "m3" / "config.json").unlink()
    drawn = share_figure.read_study(str(tmp_path / "b100"), 0.04)
    drawn += share_figure.read_study(str(tmp_path / "b200"), 0.04)
    # The fall in epochs: step x batch / 6,000 training examples.
    assert [(os.path.basename(p["run"]), p["kind"], p["batch"], p["late_test_accuracy"],
             p["fall_step"], p["fall_epoch"]) for p in drawn] == [
        ("mean_0", "plain SGD", 100, 0.6, 22000.0, 22000 * 100 / 6000),
        ("w4_0", "winsorized", 100, 0.4, 1200.0, 20.0),
        ("w4_1", "winsorized", 100, 0.3, None, None),
        ("w8_0", "winsorized", 200, 0.2, 1500.0, 50.0),
        ("w8_1", "winsorized", 200, 0.1, 3000.0, 100.0)]
    share_figure.comparable(drawn)  # one setting: no error
    table = share_figure.table(drawn, 10)
    assert "| winsorized c = 4 | 100 | 2 | 0.300 | 0.500 | none | none | 1 in 42 |" in table
    assert "| winsorized c = 8 | 200 | 0 | 0.200 | 0.500 | 1,500 | 50.0 | 1 in 720 |" in table
    assert "| plain SGD | 100 | 0 | 0.600 | 0.500 | 22,000 | 366.7 | - |" in table
    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, p: figures.update(fig=fig) or {})
    share_figure.figure(drawn, 0.04, 10, str(tmp_path / "f.png"))
    late, corrupt, fall, starvation = figures["fig"].axes
    dots, mean = late.get_lines()[2:]  # plain SGD's two lines come first
    np.testing.assert_array_equal(dots.get_xdata(), [100, 100, 200, 200])
    np.testing.assert_allclose(mean.get_ydata(), [0.35, 0.15])  # the seeds' mean a batch
    dots, mean = fall.get_lines()[2:]
    np.testing.assert_array_equal(dots.get_ydata(), [20, 50, 100])  # no dot: never fell
    np.testing.assert_array_equal(mean.get_ydata(), [20, 75])  # over the seeds that fell
    (line,) = starvation.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [share_figure.starved(100, 4, 10),
                                                  share_figure.starved(200, 8, 10)])


def test_share_figure_refuses_what_it_cannot_compare(tmp_path):
    from tools import share_figure
    write_study(tmp_path / "b100", [("w4_0", "winsorized", 4, "all", 100, 0.4, 1200)])
    write_study(tmp_path / "clamped", [("w8_0", "winsorized", 8, "all", 200, 0.2, 1500)],
                clamp=True)
    write_study(tmp_path / "clean", [("w8_0", "winsorized", 8, "all", 200, 0.2, 1500)],
                noise=0.0)
    here = share_figure.read_study(str(tmp_path / "b100"), 0.04)
    for other, error in (("clamped", "differ in clamp_norms: False -> True"),
                         ("clean", "differ in dataset.noise.rate: 0.5 -> 0.0")):
        drawn = here + share_figure.read_study(str(tmp_path / other), 0.04)
        with pytest.raises(ValueError, match=re.escape(
                f"runs {tmp_path}/b100/runs/w4_0 and {tmp_path}/{other}/runs/w8_0 {error}")):
            share_figure.comparable(drawn)
    (tmp_path / "clean" / "runs" / "w8_0" / "config.json").unlink()
    with pytest.raises(ValueError, match="w8_0/config.json is missing"):
        share_figure.read_study(str(tmp_path / "clean"), 0.04)
    with pytest.raises(ValueError, match="has no summary.csv"):
        share_figure.read_study(str(tmp_path / "nowhere"), 0.04)
    summary = tmp_path / "b100" / "summary.csv"
    summary.write_text(summary.read_text().replace("winsorized,4,", "winsorized,four,"))
    with pytest.raises(ValueError, match=r"b100/summary.csv, run w4_0: invalid literal"):
        share_figure.read_study(str(tmp_path / "b100"), 0.04)


def test_share_figure_writes_its_points_beside_the_figure_and_refuses_bad_flags(tmp_path):
    import subprocess
    import sys
    write_study(tmp_path / "b100", [("w4_0", "winsorized", 4, "all", 100, 0.4, 1200)])
    command = [sys.executable, "-m", "tools.share_figure", f"--results={tmp_path / 'b100'}",
               "--classes=10", f"--out={tmp_path / 'out' / 'share.png'}"]
    done = subprocess.run(command + ["--share=0.04"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "out" / "share.md").read_text()
    assert written in done.stdout and "| winsorized c = 4 | 100 | 0 | 0.400 |" in written
    assert (tmp_path / "out" / "share.png").stat().st_size > 0
    assert (tmp_path / "out" / "share.pdf").stat().st_size > 0
    for share, error in (("0.6", "--share must be between 0 and 0.5 (a side), got 0.6"),
                         ("0.02", "no run of --results is winsorized on every layer at c = "
                                  "0.02 x batch")):
        done = subprocess.run(command[:-1] + [f"--out={tmp_path / 'none' / 'f.png'}",
                                              f"--share={share}"], capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (1, f"error: {error}\n")
        assert not (tmp_path / "none").exists()  # refused before anything was made
