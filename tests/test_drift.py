"""tools.drift: the bias of a robust aggregate against the mean gradient,
measured along a short run, and its independent check of the applied update."""

import csv
import glob
import json
import os
import re

import numpy as np
import pytest
from conftest import REPO, np_trimmed, np_winsorized, run_main

from tools import drift


def test_bias_of_an_aggregate():
    rng = np.random.default_rng(0)
    mean, weights = rng.normal(size=50), rng.normal(size=50)
    radial = -mean @ weights / np.linalg.norm(weights)
    assert drift.bias(mean, mean, weights) == pytest.approx(
        {"cosine": 1, "excess": 0, "norm_mean": np.linalg.norm(mean),
         "norm_robust": np.linalg.norm(mean), "radial_robust": radial, "radial_mean": radial})
    assert drift.bias(2 * mean, mean, weights)["excess"] == pytest.approx(1)
    assert drift.bias(-mean, mean, weights)["cosine"] == pytest.approx(-1)
    # A step against the weights' own direction grows them: radial > 0.
    assert drift.bias(-weights, mean, weights)["radial_robust"] == pytest.approx(
        np.linalg.norm(weights))
    g = rng.standard_t(2, size=(100, 30))  # no ties: the trimmed parts sum to the mean
    for name, aggregate in (("winsorized", np_winsorized), ("trimmed", np_trimmed)):
        np.testing.assert_allclose(drift.NUMPY_PARTS[name](g, 4).sum(0), aggregate(g, 4))


def test_a_panel_of_a_prefix_averages_its_series():
    series = {"dead/dense_0": [(0, 0.0), (10, 0.2)], "dead/dense_1": [(0, 0.5), (10, 0.4)],
              "accuracy/test": [(0, 0.1)]}
    assert drift.panel_series(series, "accuracy/test") == [(0, 0.1)]
    steps, values = zip(*drift.panel_series(series, "dead/"))
    assert steps == (0, 10) and values == pytest.approx((0.25, 0.3))
    assert drift.panel_series(series, "cosine/") == []


def rows(folder):
    with open(os.path.join(folder, "drift.csv")) as f:
        out = {}
        for r in csv.DictReader(f):
            out.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    return out


def test_drift_measures_along_a_run_and_checks_the_update(digits_dir, tmp_path):
    common = [f"--data_dir={digits_dir}", "--fc_widths=32,32", "--steps=20",
              "--measure_every=10", "--batches=3", "--batch_size=50"]
    robust = tmp_path / "winsorized"
    # Winsorized except the output layer: the check covers both kinds of layer.
    done = run_main("tools.drift", *common, f"--output_dir={robust}",
                    "--aggregator=winsorized:4@hidden", "--check_steps=5", "--decompose_batches=3")
    assert done.returncode == 0, done.stderr[-3000:]
    measured = rows(robust)
    assert measured["check/max_relative_error"][5] < 1e-4
    for name in ("cosine/dense_0", "excess/logits", "weight_norm/logits", "dead/dense_1",
                 "radial_robust/logits", "radial_mean/dense_0",
                 "accuracy/test", "accuracy/pristine", "accuracy/corrupt", "logits_std"):
        assert sorted(measured[name]) == [0, 10, 20], name
    assert measured["excess/dense_0"][10] > 1e-3  # winsorized: not the mean
    assert all(0 <= v <= 1 for v in measured["dead/dense_1"].values())
    # The groups' radial parts add up to the whole (all 3 batches decomposed).
    for kind in ("mean", "robust"):
        for layer in ("dense_0", "logits"):
            parts = [measured[f"radial_{kind}_part/{g}/{layer}"][10] for g in ("pristine",
                                                                                "corrupt")]
            assert sum(parts) == pytest.approx(measured[f"radial_{kind}/{layer}"][10],
                                               rel=1e-3, abs=1e-6)
    with open(robust / "config.json") as f:
        recorded = json.load(f)
    from cg_tf import provenance
    assert recorded["provenance"] == provenance.provenance()  # the code that ran
    assert recorded["aggregator"] == "winsorized:4@hidden" and recorded["decompose_batches"] == 3
    figure = tmp_path / "drift.png"
    drift.plot([str(robust)], str(figure))
    assert figure.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "drift.pdf").exists()


def test_the_mean_against_itself_has_no_bias(digits_dir):
    from cg_tf.data.reader import Reader
    from cg_tf.robust.aggregators import Mean
    reader = Reader.open(digits_dir, 50)
    study = drift.Study(reader, Mean(), (32, 32), "authors", 0.1)
    batches = [(b["image"], b["label"], b["is_corrupt"].numpy().astype(bool))
               for b in reader.train_epoch(0).take(2)]
    x, y, _ = batches[0]
    samples = {"pristine": (x.numpy(), y.numpy())}
    measured = study.measure(batches, samples, decompose=1)
    for layer in ("dense_0", "dense_1", "logits"):
        assert measured[f"cosine/{layer}"] == pytest.approx(1, abs=1e-5)
        assert measured[f"excess/{layer}"] < 1e-5
        # The mean's per-example parts are its shares: kept and whole agree.
        for group in ("pristine", "corrupt"):
            assert measured[f"radial_robust_part/{group}/{layer}"] == pytest.approx(
                measured[f"radial_mean_part/{group}/{layer}"], rel=1e-4, abs=1e-7)



# Defines the trainer's flags, then each tool's (after removing the names they
# share), and prints what each defined: its defaults and help text.
FLAG_SOURCES = r"""
import json
from absl import flags
from cg_tf import train_flags  # noqa: F401 (the trainer's flags)
from tools import drift, median_weight

FLAGS = flags.FLAGS
def snapshot(names):
    return {n: [FLAGS[n].default_as_str, FLAGS[n].help] for n in names}

out = {"trainer": snapshot(set(drift.TRAINING) | set(median_weight.TRAINING))}
for tool in (drift, median_weight):
    for name in set(tool.TRAINING) & set(FLAGS):
        delattr(FLAGS, name)
    kept = set(FLAGS)
    tool.define_flags()
    out[tool.__name__] = snapshot(tool.TRAINING)
    for name in set(FLAGS) - kept:
        delattr(FLAGS, name)
print(json.dumps(out))
"""


def test_the_tools_training_flags_are_the_trainers():
    """tools.drift and tools.median_weight define their training flags from
    TrainConfig with the trainer's defaults (--data_dir excepted: they require
    it), so a tool and `python -m cg_tf.train` given the same flags train the
    same net."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FLAG_SOURCES], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    defined = json.loads(done.stdout.strip().splitlines()[-1])
    trainer = defined.pop("trainer")
    assert set(defined) == {"tools.drift", "tools.median_weight"}
    for tool, flags in defined.items():
        for name, (default, help_text) in flags.items():
            assert help_text == trainer[name][1], (tool, name)
            if name == "data_dir":
                assert default is None, tool
            else:
                assert default == trainer[name][0], (tool, name, default, trainer[name][0])


def _flags_of(text: str) -> dict[str, str]:
    return dict(re.findall(r"--(\w+)=(\S+)", text))


def test_the_published_commands_pin_the_recorded_settings():
    """The studies' commands spell out the settings their recorded runs used
    (the tools' defaults are the trainer's, which may change)."""
    results = os.path.join(REPO, "docs", "results")
    study = os.path.join(results, "winsorization_fashion_mnist")
    text = open(os.path.join(study, "README.md")).read()
    variables = dict(re.findall(r'^(\w+)="?([^"\n]+)"?$', text, re.M))  # NET, D, F
    expand = lambda line: re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line)  # noqa: E731
    # Each dataset the commands build: its source and noise, by folder.
    datasets = {}
    for line in re.findall(r"^python -m pipelines\.noisy_labels .*$", text, re.M):
        built = _flags_of(expand(line))
        datasets[built["output_dir"]] = (built["source"], built["noise_mode"],
                                         float(built["noise_rate"]))
    # Each published drift run: a command of exactly its recorded flags, on a
    # dataset of its recorded source and noise (later flags win, as absl's do).
    commands = {}
    for line in re.findall(r"^python -m tools\.drift --data_dir.*$", text, re.M):
        given = _flags_of(expand(line))
        commands[given["output_dir"]] = given
    folders = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(study, "drift", "*",
                                                                         "config.json")))
    assert len(folders) == 10 and sorted(commands) == [
        "drift/" + os.path.basename(f) for f in folders]
    for folder in folders:
        with open(os.path.join(folder, "config.json")) as f:
            recorded = json.load(f)
        given = commands["drift/" + os.path.basename(folder)]
        aggregator = recorded["aggregator"] + ("@hidden" if recorded.get("mean_layers") else "")
        assert given["aggregator"] == aggregator, folder
        assert given["fc_widths"] == ",".join(map(str, recorded["fc_widths"])), folder
        for name in ("init", "batch_size", "steps"):
            assert given[name] == str(recorded[name]), (folder, name)
        assert float(given["learning_rate"]) == recorded["learning_rate"], folder
        for name, default in (("measure_every", 500), ("check_steps", 0),
                              ("decompose_batches", 0)):
            if recorded.get(name) is not None:
                assert int(given.get(name, default)) == recorded[name], (folder, name)
        # Older runs did not record --decompose_batches: their data shows it.
        decomposed = any(r["name"].startswith("radial_mean_part/")
                         for r in csv.DictReader(open(os.path.join(folder, "drift.csv"))))
        assert decomposed == (int(given.get("decompose_batches", 0)) > 0), folder
        noise = recorded["noise"]
        assert datasets[given["data_dir"]] == (recorded["source"], noise["mode"],
                                               noise["rate"]), folder

    text = open(os.path.join(results, "small_cnn_fashion_mnist", "README.md")).read()
    command = re.search(r"^python -m tools\.median_weight (.*?)\n```", text, re.M | re.S)
    published = _flags_of(command.group(1))
    with open(os.path.join(results, "small_cnn_fashion_mnist", "median_weight",
                           "config.json")) as f:
        recorded = json.load(f)
    recorded["batch_size"] = recorded.pop("train_batch")  # its name then
    for name in ("model", "learning_rate", "batch_size", "epochs"):
        value = recorded[name]
        assert published[name] == (f"{value:g}" if isinstance(value, float) else str(value)), name
