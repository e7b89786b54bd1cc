"""The reproduction pipelines end to end on digits with tiny settings: the
noise sweep and the easy/hard experiment, killed between and inside stages
and re-run, with manifests and the refusal of other parameters."""

import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, checkpointed, parsed_flags, read_split, run_main

from cg_tf.data import records
from cg_tf.experiments import runner

TINY = ["--source=digits", "--fc_widths=32", "--batch_size=25", "--learning_rate=0.5",
        "--eval_sample_size=100", "--probe_size=10", "--checkpoint_every=10", "--num_shards=2"]
# The robust setting with a layer filter: the command line carries it to the run's record.
SWEEP = [*TINY, "--aggregators=mean,winsorized:2@hidden", "--noise_rates=0.5", "--seeds=0,1",
         "--steps=60"]
RUNS = [f"{s}_noise0.5_seed{seed}" for s in ("mean", "winsorized_c2_hidden") for seed in (0, 1)]


def manifest(root, stage):
    return runner.read_manifest(os.path.join(root, stage))


def stage_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("[")]


def kill_when(args, ready, timeout=300):
    """Starts `python -m args`, SIGKILLs it once `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# A dataset whose Beam build lasts long enough (60,000 images) to be signalled inside.
FASHION = "--source=idx:/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION.split(":", 1)[1]),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_dataset_build_ends_in_one_line(tmp_path, signum):
    """Outside a training stage's steps (here the Beam build of its dataset),
    a stop signal ends the sweep in one line with the shell's status; the
    interrupted stage starts again on the next run."""
    out = str(tmp_path / "sweep")
    sweep = ["pipelines.sweep", f"--output_dir={out}", *SWEEP, FASHION]
    proc = subprocess.Popen([sys.executable, "-m", *sweep], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    building = os.path.join(out, "data", "noise_0.5", "data", "_build_tmp")
    deadline = time.time() + 120
    while not os.path.exists(building):  # Beam has started writing
        assert proc.poll() is None and time.time() < deadline, "the build never started"
        time.sleep(0.05)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"{out}: stopped by {signal.Signals(signum).name}; the complete stages are kept and the "
        "one it interrupted starts again (a run from its last checkpoint): rerun the same "
        "command to go on"), stderr[-3000:]
    assert "Traceback" not in stderr
    # Stopped inside the build; or, where Python swallowed the handler's
    # exception (it ran inside a garbage collector's callback), at the next
    # stage's start: the build then completed, and nothing trained.
    status = manifest(out, "data/noise_0.5")["status"]
    assert status in ("running", "complete") and not os.path.exists(os.path.join(out, "runs"))
    if signum == signal.SIGTERM:  # the rerun goes on (once: a 60,000-image build)
        done = run_main(*sweep, "--only=data/*")
        assert done.returncode == 0, done.stderr[-3000:]
        assert any(line.endswith("data/noise_0.5: " + (
            "restarting" if status == "running" else "complete, skipped"))
                   for line in stage_lines(done.stdout))
        assert manifest(out, "data/noise_0.5")["status"] == "complete"


def test_sweep_killed_inside_and_between_stages_then_completed(tmp_path):
    out = str(tmp_path / "sweep")
    args = ["pipelines.sweep", f"--output_dir={out}", *SWEEP]
    # Inside the second run: it has checkpointed, but is not complete.
    second = os.path.join(out, "runs", RUNS[1])
    kill_when(args, lambda: checkpointed(second, 20))
    assert manifest(out, "runs/" + RUNS[0])["status"] == "complete"
    assert manifest(out, "runs/" + RUNS[1])["status"] == "running"
    first_done = manifest(out, "runs/" + RUNS[0])
    # Between stages: right after the third run completes.
    kill_when(args, lambda: (manifest(out, "runs/" + RUNS[2]) or {}).get("status") == "complete")
    done = run_main(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = stage_lines(done.stdout)
    assert "[1/5] data/noise_0.5: complete, skipped" in lines
    for run in RUNS[:3]:  # no completed stage runs twice
        assert any(line.endswith(f"runs/{run}: complete, skipped") for line in lines), lines
    assert manifest(out, "runs/" + RUNS[0]) == first_done
    # The report: a row per run, mean and spread per setting, the figure.
    with open(os.path.join(out, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == RUNS
    assert {r["aggregator"] for r in rows} == {"mean", "winsorized"}
    for r in rows:
        assert r["steps"] == "60" and 0 <= float(r["test_accuracy"]) <= 1
        # The peak of the run's test evaluations (the last one is the final value).
        # (event files hold float32: the peak may round below the final float64 value)
        assert float(r["test_accuracy"]) <= float(r["peak_test_accuracy"]) + 1e-7 <= 1 + 1e-7
        assert 1 <= int(r["peak_test_step"]) <= 60
        assert r["parameter"] == ("2" if r["aggregator"] == "winsorized" else "")
        assert r["layers"] == ("hidden" if r["aggregator"] == "winsorized" else "all")
        # The code that made the run: this checkout's commit, as its manifest says.
        assert r["commit"] == manifest(out, f"runs/{r['run']}")["provenance"]["git_commit"]
        assert re.fullmatch("[0-9a-f]{40}", r["commit"]) and r["dirty"] in ("True", "False")
    data = records.load_info(os.path.join(out, "data", "noise_0.5", "data"))
    assert {r["train_examples"] for r in rows} == {str(data.splits["train"].num_examples)}
    # A row per setting over its two seeds; its curves at every evaluation.
    with open(os.path.join(out, "settings.csv")) as f:
        settings = {r["setting"]: r for r in csv.DictReader(f)}
    assert list(settings) == ["mean_noise0.5", "winsorized_c2_hidden_noise0.5"]
    for setting, r in settings.items():
        tests = [float(row["test_accuracy"]) for row in rows if row["setting"] == setting]
        assert r["seeds"] == "2"
        assert float(r["test_accuracy"]) == pytest.approx(np.mean(tests))
        assert float(r["test_accuracy_min"]) == pytest.approx(min(tests))
    with open(os.path.join(out, "curves.csv")) as f:
        curve_rows = list(csv.DictReader(f))
    last_test = [r for r in curve_rows if r["curve"] == "test" and r["step"] == "60"]
    assert [r["setting"] for r in last_test] == list(settings)
    assert float(last_test[0]["mean"]) == pytest.approx(
        float(settings["mean_noise0.5"]["test_accuracy"]), abs=1e-6)
    md = open(os.path.join(out, "summary.md")).read()
    assert "| winsorized_c2_hidden_noise0.5 | 2 |" in md and "±" in md and "| peak_test |" in md
    assert "| late_test |" in md and {"late_test_accuracy", "fall_step"} <= set(rows[0])
    assert os.path.getsize(os.path.join(out, "figure.png")) > 20_000
    assert open(os.path.join(out, "figure.pdf"), "rb").read(5) == b"%PDF-"
    assert f"figure_pdf: {out}/figure.pdf" in done.stdout
    # The printed summary: what the runs share, a row per setting, what it says.
    assert "Noise sweep: digits, model fc " in done.stdout and "| " not in done.stdout
    by_setting = {}
    for r in rows:
        by_setting.setdefault(r["aggregator"], []).append(float(r["corrupt_accuracy"]))
    mean_row = next(line for line in done.stdout.splitlines() if line.startswith("plain SGD "))
    assert mean_row.split()[2] == "50%"
    mean, spread = np.mean(by_setting["mean"]), np.std(by_setting["mean"])
    assert f"{mean:.3f}" + (f" ± {spread:.3f}" if spread else "") in mean_row
    assert re.search(r"At 50% noise, the corrupt training examples fit to their noisy label: "
                     r"plain SGD \d+% \(test 0\.\d{3}\), winsorized:2@hidden \d+%", done.stdout)
    m = manifest(out, "runs/" + RUNS[3])
    assert m["params"]["aggregator"] == {"name": "winsorized", "c": 2, "layers": "hidden"}
    assert (m["params"]["per_example_chunk"], m["params"]["bn_mode"]) == (None, "batch_stats")
    assert m["params"]["seed"] == 1 and m["inputs"] == {
        "data/noise_0.5": manifest(out, "data/noise_0.5")["fingerprint"]}
    # Other parameters are refused, naming the difference; nothing changes.
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{out}/**/manifest.json", recursive=True)}
    refused = run_main(*args[:-1], "--steps=61")
    assert refused.returncode != 0
    assert "was made with other parameters (params.steps: 60 -> 61)" in refused.stderr
    assert before == {p: os.path.getmtime(p) for p in before}


def test_summary_rows_give_the_step_and_value_of_peak_test_accuracy():
    from cg_tf.experiments import noise_grid
    from cg_tf.measure import report, tags
    from cg_tf.robust.aggregators import Mean
    points = noise_grid.grid([Mean()], [0.5], [0, 1, 2])
    manifests = {f"runs/{p.name}": {"outputs": {"test_accuracy": 0.5 + p.seed / 10, "steps": 30}}
                 for p in points[:2]}  # the third run has not finished
    manifests["data/noise_0.5"] = {"outputs": {"splits": {"train": 1200, "test": 300}}}
    test = tags.ACCURACY_CURVES["test"]
    runs = {points[0].name: report.Run(points[0].name, {}, {
        test: [(1, 0.2), (10, 0.8), (20, 0.8), (30, 0.5)],
        tags.ACCURACY_CURVES["pristine"]: [(30, 0.9)]})}
    rows = noise_grid.rows(points, manifests, runs)
    assert [r["run"] for r in rows] == [p.name for p in points[:2]]
    # The earliest step of the highest value; none for a run without evaluations.
    assert (rows[0]["peak_test_step"], rows[0]["peak_test_accuracy"]) == (10, 0.8)
    assert (rows[1]["peak_test_step"], rows[1]["peak_test_accuracy"]) == (None, None)
    assert rows[0]["test_accuracy"] == 0.5 and rows[0]["train_examples"] == 1200
    (means,) = noise_grid.over_seeds(rows)
    assert means["peak_test_accuracy"] == 0.8 and means["seeds"] == 2
    assert (means["train_examples"], means["steps"]) == (1200, 30)
    assert means["test_accuracy"] == pytest.approx(0.55)
    assert means["test_accuracy_std"] == pytest.approx(0.05)
    assert (means["test_accuracy_min"], means["test_accuracy_max"]) == (0.5, 0.6)
    assert means["corrupt_accuracy"] is None  # no run recorded it


def test_curves_give_each_settings_spread_at_every_shared_step():
    from cg_tf.experiments import noise_grid
    from cg_tf.measure import report, tags
    test, pristine = tags.ACCURACY_CURVES["test"], tags.ACCURACY_CURVES["pristine"]
    runs = [report.Run(f"s{i}", {}, {test: [(1, 0.1 * i), (10, 0.5), (20, 0.2 * i)],
                                     pristine: [(20, 0.9)] if i else []}) for i in range(3)]
    rows = noise_grid.curves({"mean_noise0.5": runs})
    assert [(r["curve"], r["step"]) for r in rows] == [
        ("pristine", 20), ("test", 1), ("test", 10), ("test", 20)]
    last = rows[-1]
    assert (last["runs"], last["min"], last["max"]) == (3, 0.0, 0.4)
    assert last["mean"] == pytest.approx(0.2)
    assert last["std"] == pytest.approx(np.std([0, 0.2, 0.4]))
    assert rows[0]["runs"] == 2  # a run without the curve is left out of its rows


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_stops_a_sweeps_training_stage_in_one_line(tmp_path, stop):
    """Every signal that asks a run to stop ends a sweep as it ends the trainer:
    a checkpoint, one line that says how to go on, the shell's exit status."""
    out = tmp_path / "sweep"
    run = out / "runs" / "mean_noise0.5_seed0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.sweep", f"--output_dir={out}", *TINY,
         "--aggregators=mean", "--noise_rates=0.5", "--seeds=0", "--steps=100000",
         "--noreport"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not checkpointed(run, 10):
        time.sleep(0.1)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + stop and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(rf"{re.escape(str(out))}: a training stage stopped by {stop.name} at step "
                     r"(\d+): its checkpoint is saved; rerun the same command to resume",
                     err.strip().splitlines()[-1])
    assert m, err[-3000:]
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith(f"ckpt-{m.group(1)}")
    assert manifest(out, "runs/mean_noise0.5_seed0")["status"] == "running"


@pytest.mark.parametrize("args,message", [
    (["--aggregators=winsorized"], "--aggregators=winsorized: winsorized needs its c"),
    (["--aggregators=mean:3"], "--aggregators=mean:3: mean takes no parameter"),
    (["--aggregators=winsorized:x"], "--aggregators=winsorized:x: c must be an integer"),
    (["--aggregators=winsorized:60"], "--aggregators=winsorized:60: need 0 <= 2c < "
     "--batch_size="),
    (["--aggregators=krum"], "--aggregators=krum: unknown aggregator 'krum'"),
    (["--noise_rates=1.5"], "noise_rate must be in"),
    (["--learning_rate=-1"], "--learning_rate must be positive"),
    (["--aggregators="], "--aggregators is empty: give at least one aggregator"),
    (["--seeds="], "--seeds is empty: give at least a seed"),
    (["--noise_rates=abc"], "--noise_rates=abc: 'abc' is not a number"),
    (["--seeds=0,x"], "--seeds=0,x: 'x' is not a seed"),
    (["--seeds=-1"], "--seeds=-1: '-1' is not a seed (seeds are integers from 0 to 2**32 - 1)"),
    (["--noise_rates=0.1234567,0.1234568"], "two runs of the grid would share the stage "
     "runs/mean_noise0.123457_seed0 (noise rates 0.1234567 and 0.1234568"),
    (["--seeds=0,0"], "would share the stage runs/mean_noise0.5_seed0"),
    (["--seed=-1"], "--seed must be an integer from 0 to 2**32 - 1, got -1"),
    (["--aggregators=winsorized:4@hidden", "--fc_widths="], "--aggregators=winsorized:4@hidden: "
     "the layer filter 'hidden' leaves no layer of fc to aggregate robustly"),
])
def test_sweep_bad_flags_are_named(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(os.path.join(REPO, "configs", "sweep_demo.flags"), tmp_path / "x", *args)


def test_bad_flags_fail_before_any_work(tmp_path):
    for main, arg, message in (
            ("pipelines.sweep", "--aggregators=winsorized:60", "--aggregators=winsorized:60: "),
            ("pipelines.sweep", "--seeds=-1", "--seeds=-1: '-1' is not a seed"),
            ("pipelines.easy_hard", "--heldout_size=0", "--heldout_size must be positive"),
            ("pipelines.easy_hard", "--aggregator=trimmed:60", "--aggregator=trimmed:60: ")):
        done = run_main(main, f"--output_dir={tmp_path / 'x'}", *TINY, "--steps=5", arg)
        assert done.returncode != 0 and f"error: {message}" in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "x").exists()
    # A layer filter the model cannot take: refused before the dataset is built.
    for main, flag in (("pipelines.sweep", "--aggregators"), ("pipelines.easy_hard",
                                                             "--aggregator")):
        done = run_main(main, f"--output_dir={tmp_path / 'x'}", *TINY, "--steps=5",
                        f"{flag}=winsorized:4@hidden", "--fc_widths=")
        assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
            f"error: {flag}=winsorized:4@hidden: the layer filter 'hidden' leaves no layer of fc "
            "to aggregate robustly"), done.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_a_sweep_refuses_its_dataset_rebuilt_behind_it(tmp_path):
    """After a finished sweep its 50% dataset is rebuilt in place without noise
    (pipelines.noisy_labels --overwrite): new seeds would train on clean data
    reported as 50% noise. The sweep refuses, naming the stage, before any
    work; --overwrite rebuilds the dataset as the sweep asks, and the finished
    run, which read exactly that, is kept."""
    out = tmp_path / "sweep"
    args = [f"--output_dir={out}", *TINY, "--steps=5", "--aggregators=mean", "--noise_rates=0.5"]
    done = run_main("pipelines.sweep", *args, "--seeds=0")
    assert done.returncode == 0, done.stderr[-3000:]
    data = out / "data" / "noise_0.5" / "data"
    done = run_main("pipelines.noisy_labels", "--source=digits", f"--output_dir={data}",
                    "--noise_rate=0.0", "--num_shards=2", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_main("pipelines.sweep", *args, "--seeds=0,1")
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'data' / 'noise_0.5'} changed since its stage completed "
        "(data/dataset_info.json changed); use --overwrite to rebuild it and everything after "
        "it"), done.stderr[-2000:]
    assert not (out / "runs" / "mean_noise0.5_seed1").exists()
    done = run_main("pipelines.sweep", *args, "--seeds=0,1", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = stage_lines(done.stdout)
    assert any(line.endswith("data/noise_0.5: rebuilding (it changed since it completed)")
               for line in lines), lines
    assert any(line.endswith("runs/mean_noise0.5_seed0: complete, skipped") for line in lines)
    assert records.load_info(str(data)).noise["rate"] == 0.5


def test_a_sweep_never_replaces_a_report_file_it_did_not_write(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.csv").write_text("my own table\n")
    done = run_main("pipelines.sweep", f"--output_dir={out}", *TINY, "--steps=5",
                    "--aggregators=mean")
    assert done.returncode != 0 and (
        f"error: --output_dir={out} holds a summary.csv that this program did not write (or "
        "that was changed since)") in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]
    assert (out / "summary.csv").read_text() == "my own table\n"
    (out / "summary.csv").rename(out / "summary.md")
    done = run_main("pipelines.easy_hard", f"--output_dir={out}", *TINY, "--steps=5")
    assert done.returncode != 0 and "holds a summary.md that this program did not write" \
        in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


def test_report_files_record_what_the_sweep_wrote(tmp_path):
    from cg_tf.experiments import noise_grid
    (tmp_path / "summary.md").write_text("x")
    (tmp_path / runner.REPORT_RECORD).write_text(
        json.dumps({"summary.md": "writing", "summary.csv": "0" * 64}))
    noise_grid.check_report_files(str(tmp_path))  # written (or being written) by the sweep
    (tmp_path / "summary.csv").write_text("edited")
    with pytest.raises(ValueError, match="holds a summary.csv that this program did not write"):
        noise_grid.check_report_files(str(tmp_path))


def test_easy_hard_end_to_end(tmp_path):
    out = str(tmp_path / "eh")
    args = ["pipelines.easy_hard", f"--output_dir={out}", *TINY, "--first_epochs=1",
            "--learning_rate=0.02", "--epochs=3", "--heldout_size=50"]
    # Killed inside the split (Beam) stage: it restarts from an emptied directory.
    kill_when(args, lambda: (manifest(out, "split") or {}).get("status") == "running")
    done = run_main(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = stage_lines(done.stdout)
    assert "[1/6] data/clean: complete, skipped" in lines
    assert "[2/6] first_training: complete, skipped" in lines
    assert "[3/6] split: restarting" in lines
    split = manifest(out, "split")["outputs"]
    first = manifest(out, "first_training")["outputs"]["model_dir"]
    learned = set(open(os.path.join(first, "learned_ids.txt")).read().split())
    not_learned = set(open(os.path.join(first, "not_learned_ids.txt")).read().split())
    assert split["available"] == {"easy": len(learned), "hard": len(not_learned)}
    assert split["heldout_size"] == 50
    assert split["train_size"] == min(len(learned), len(not_learned)) // 2
    clean = read_split(manifest(out, "data/clean")["outputs"]["data_dir"], "train")
    for name, ids in (("easy", learned), ("hard", not_learned)):
        data = split[f"{name}_data_dir"]
        info = records.load_info(data)
        assert info.eval_split == "heldout" and info.splits["train"].num_corrupt == 0
        train, heldout = read_split(data, "train"), read_split(data, "heldout")
        assert len(train) == split["train_size"] and len(heldout) == 50
        assert not set(train) & set(heldout) and set(train) | set(heldout) <= ids
        for i in train:  # the same images and labels as the clean dataset
            assert train[i]["image"] == clean[i]["image"]
            assert train[i]["label"] == clean[i]["true_label"]
    with open(os.path.join(out, "summary.csv")) as f:
        rows = {r["trained_on"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"easy", "hard"}
    for r in rows.values():
        for column in ("easy heldout", "hard heldout", "clean test"):
            assert 0 <= float(r[column]) <= 1
    accuracy = manifest(out, "cross_eval")["outputs"]["accuracy"]
    assert accuracy["easy"]["easy/heldout"]["count"] == 50
    assert accuracy["hard"]["clean/test"]["count"] == len(read_split(
        manifest(out, "data/clean")["outputs"]["data_dir"], "test"))
    assert os.path.getsize(os.path.join(out, "figure.png")) > 20_000
    assert open(os.path.join(out, "figure.pdf"), "rb").read(5) == b"%PDF-"
    assert f"figure_pdf: {out}/figure.pdf" in done.stdout
    assert "Easy and hard examples: digits, " in done.stdout
    easy_row = next(line for line in done.stdout.splitlines() if line.startswith("easy "))
    assert easy_row.split()[1:] == [f"{float(rows['easy'][c]):.3f}" for c in
                                    ("easy heldout", "hard heldout", "clean test")]
    assert (f"Trained on easy examples, a model scores {float(rows['easy']['clean test']):.3f} "
            "on the test set") in done.stdout
    again = run_main(*args)
    assert all(line.endswith("complete, skipped") for line in stage_lines(again.stdout))


PIPELINE_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "sweep_*.flags"))
                          + glob.glob(os.path.join(REPO, "configs", "easy_hard_*.flags")))


def plan(path, tmp_path, *overrides):
    """The stages a pipeline config asks for (source replaced by digits)."""
    from pipelines import easy_hard, sweep
    main = sweep if os.path.basename(path).startswith("sweep_") else easy_hard
    with parsed_flags("pipeline", f"--flagfile={path}", "--source=digits",
                      f"--output_dir={tmp_path}", *overrides):
        return main.make_stages([])


@pytest.mark.parametrize("path", [p for p in PIPELINE_CONFIGS if "fashion_mnist" in p and
                                  os.path.basename(p).startswith(("sweep_label_noise_",
                                                                  "sweep_winsorize_"))],
                         ids=os.path.basename)
def test_fashion_mnist_sweeps_differ_from_mnist_only_in_the_data(path, tmp_path, monkeypatch):
    """Coherent Gradients ran MNIST; each Fashion-MNIST sweep of its two
    studies is the MNIST sweep with another --source: the same stages with the same parameters."""
    from pipelines import shared_flags, sweep  # noqa: F401 (sweep defines the trainer's flags)
    monkeypatch.chdir(REPO)
    mnist_path = path.replace("fashion_mnist", "mnist")
    assert os.path.exists(mnist_path), f"no MNIST counterpart of {os.path.basename(path)}"
    sources = []
    for p in (path, mnist_path):
        with parsed_flags("pipeline", f"--flagfile={p}"):
            sources.append(shared_flags.SOURCE.value)
    assert sources == ["idx:/usr/share/datasets/fashion-mnist", "idx:data/mnist"]
    fashion, mnist = ({s.name: (s.params, s.inputs) for s in plan(p, tmp_path)}
                      for p in (path, mnist_path))
    assert fashion == mnist


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=os.path.basename)
def test_pipeline_configs_hold_the_papers_settings(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    name = os.path.basename(path)
    stages = {s.name: s for s in plan(path, tmp_path)}
    trains = [s for s in stages.values() if s.kind == "train"]
    assert trains and all(s.inputs[0] in stages for s in stages.values() if s.inputs)
    # Coherent Gradients (ICLR 2020), from the authors' code and the paper.
    if name.startswith(("sweep_winsorize_", "sweep_label_noise_")):
        batch = int(name.removesuffix(".flags").rpartition("_batch")[2] or 100) \
            if "_batch" in name else 100  # the count-against-share experiments vary it
        for s in trains:
            p = s.params
            assert (p["model"], p["init"], p["learning_rate"], p["batch_size"], p["momentum"],
                    p["lr_schedule"]) == ("fc", "authors", 0.1, batch, 0.0, "constant")
    if name.startswith("sweep_winsorize_"):
        # 784-256-256-256-10, 60,000 steps (100 epochs of MNIST), c in {0, 1, 2, 4, 8},
        # 50% of the labels permuted (the authors' randomize_labels); plain SGD
        # through the mean; and the experiments on why c >= 4 collapses.
        experiment = name.removesuffix(".flags").rsplit("_", 1)[-1]
        rate, settings, seeds, clamp = {
            "clean": ("0", ("mean", "winsorized_c2", "winsorized_c4"), 2, False),
            "clamp": ("0.5", ("mean", "winsorized_c4"), 2, True),
            # c = 4% of the batch, as c = 4 at batch 100
            "batch50": ("0.5", ("mean", "winsorized_c2"), 2, False),
            "batch200": ("0.5", ("mean", "winsorized_c8"), 2, False),
            "batch400": ("0.5", ("mean", "winsorized_c16"), 2, False),
        }.get(experiment, ("0.5", ("mean", "winsorized_c1", "winsorized_c2", "winsorized_c4",
                                   "winsorized_c8", "winsorized_c4_hidden",
                                   "winsorized_c4_output"), 3, False))
        assert sorted(stages) == [f"data/noise_{rate}", *sorted(
            f"runs/{s}_noise{rate}_seed{seed}" for s in settings for seed in range(seeds))]
        assert stages[f"data/noise_{rate}"].params["noise"]["mode"] == "permute"
        for s in trains:
            assert (s.params["fc_widths"], s.params["steps"], s.params["clamp_norms"]) == (
                [256, 256, 256], 60_000, clamp)
    if name.startswith("sweep_label_noise_"):
        # 784-2048-10, plain SGD, 10^5 steps, noise 0/25/50/75/100%, labels permuted.
        rates = ("0", "0.25", "0.5", "0.75", "1")
        assert sorted(stages) == sorted([*(f"data/noise_{r}" for r in rates),
                                         *(f"runs/mean_noise{r}_seed0" for r in rates)])
        for r in rates:
            assert stages[f"data/noise_{r}"].params["noise"]["mode"] == "permute"
            assert stages[f"data/noise_{r}"].params["noise"]["rate"] == float(r)
        for s in trains:
            assert s.params["aggregator"]["name"] == "mean"
            assert (s.params["fc_widths"], s.params["steps"]) == ([2048], 100_000)
    if "small_cnn" in name:
        # Weak and Strong Gradient Directions: lr 0.1, no momentum (M3 and RM3
        # refuse it; plain SGD the same), weight decay 0, step schedule, 50% noise.
        assert stages["data/noise_0.5"].params["noise"] == {
            "rate": 0.5, "mode": "uniform", "seed": 0}
        for s in trains:
            p = s.params
            assert (p["model"], p["learning_rate"], p["momentum"], p["weight_decay"],
                    p["lr_schedule"], p["lr_decay_epochs"], p["epochs"], p["input"]["augment"]) == (
                        "small_cnn", 0.1, 0.0, 0.0, "step", [50, 75], 100, "none")
    if name == "sweep_rm3_small_cnn_fashion_mnist.flags":
        assert sorted(stages) == ["data/noise_0.5", *sorted(
            f"runs/{s}_noise0.5_seed{seed}" for s in ("mean", "rm3", "ra3") for seed in range(3))]
        assert all(s.params["batch_size"] == 128 for s in trains)
    if name == "sweep_m3_small_cnn_fashion_mnist.flags":
        # The authors' M3: three batches of 128 at the same weights, one update.
        # Plain SGD on the same batches: the control for the number of updates.
        assert sorted(stages) == ["data/noise_0.5", *sorted(
            f"runs/{s}_noise0.5_seed{seed}" for s in ("mean", "median_of_means_k3")
            for seed in range(3))]
        assert stages["runs/median_of_means_k3_noise0.5_seed0"].params["aggregator"] == {
            "name": "median_of_means", "k": 3}
        assert all(s.params["batch_size"] == 3 * 128 for s in trains)
    if name.startswith(("sweep_rm3_imagenet_", "sweep_m3_imagenet_")):
        # Weak and Strong Gradient Directions v2: the authors' ImageNet nets,
        # 90 epochs, lr 0.1 decayed x0.1 at 30, 60, 80, no momentum, 50% noise.
        model = {"resnet18.flags": "resnet18", "vgg13.flags": "vgg13_bn"}[name.split("_")[-1]]
        assert stages["data/noise_0.5"].params["noise"]["mode"] == "uniform"
        for s in trains:
            p = s.params
            assert (p["model"], p["input"]["image_size"], p["learning_rate"], p["momentum"],
                    p["weight_decay"], p["lr_schedule"], p["lr_decay_epochs"], p["lr_decay_factor"],
                    p["epochs"]) == (model, [224, 224], 0.1, 0.0, 0.0, "step", [30, 60, 80], 0.1,
                                     90)
        settings = sorted(n.split("/")[1].removesuffix("_noise0.5_seed0")
                          for n in stages if n.startswith("runs/"))
        if name.startswith("sweep_rm3_"):
            assert settings == ["mean", "ra3", "rm3"]
            assert all(s.params["batch_size"] == 256 for s in trains)
        else:  # M3 over three batches of 256, and plain SGD on the same 768
            assert settings == ["mean", "median_of_means_k3"]
            assert all(s.params["batch_size"] == 3 * 256 for s in trains)
    if name == "easy_hard_imagenet.flags":
        assert stages["first_training"].params["epochs"] == 2
        assert stages["first_training"].params["aggregator"]["name"] == "mean"
        assert (stages["split"].params["train_size"], stages["split"].params["heldout_size"]) \
            == (500_000, 100_000)
        assert stages["runs/easy"].params["model"] == "resnet50"
        assert stages["runs/hard"].params["epochs"] == 90
    if name.startswith("easy_hard_"):
        assert list(stages) == ["data/clean", "first_training", "split", "runs/easy",
                                "runs/hard", "cross_eval"]
        assert stages["data/clean"].params["noise"]["rate"] == 0.0
    if "cifar10" in name:
        assert all(s.params["model"] == "cifar_resnet18" for s in trains)


def test_readme_names_only_configs_and_figures_that_exist():
    readme = open(os.path.join(REPO, "README.md")).read()
    named = set(re.findall(r"configs/([\w.]+\.flags)", readme))
    assert "sweep_winsorize_fashion_mnist.flags" in named
    missing = sorted(n for n in named if not os.path.exists(os.path.join(REPO, "configs", n)))
    assert not missing, f"README names configs that do not exist: {missing}"
    figures = re.findall(r"\]\((docs/[^)]+\.png)\)", readme)
    assert figures and all(os.path.exists(os.path.join(REPO, f)) for f in figures), figures


def test_the_figure_draws_finished_runs_only(tmp_path, monkeypatch):
    """A run killed as it started (a run config, no curve) or still running (a
    partial curve) gets no panel: the figure shows results, TensorBoard progress."""
    import tensorflow as tf

    from cg_tf.experiments import noise_grid
    from cg_tf.measure import monitor, report, tags
    from cg_tf.robust.aggregators import Mean, Winsorized
    points = noise_grid.grid([Mean(), Winsorized(c=1), Winsorized(c=2)], [0.5], [0])
    for p, evaluated in zip(points, (True, True, False)):
        writer = tf.summary.create_file_writer(str(tmp_path / "runs" / p.name))
        monitor.write_run_config(writer, {"aggregator": p.aggregator.to_json()})
        if evaluated:
            with writer.as_default():
                tf.summary.scalar(tags.ACCURACY_CURVES["test"], 0.5, step=1)
        writer.flush()
    drawn = {}
    monkeypatch.setattr(report, "accuracy_figure",
                        lambda panels, path, columns: drawn.update(panels) or {})
    # No run finished: no figure, and the tables are there, empty (a GFile
    # written nothing to made no file).
    noise_grid.write_report(str(tmp_path), points, {})
    assert not drawn
    assert (tmp_path / "summary.csv").read_text() == "" == (tmp_path / "settings.csv").read_text()
    # The first finished; the second is still running.
    finished = {f"runs/{points[0].name}": {"outputs": {"test_accuracy": 0.5, "steps": 1}}}
    noise_grid.write_report(str(tmp_path), points, finished)
    assert list(drawn) == [points[0].setting]


def test_late_accuracy_and_fall_step_of_a_run():
    """Late: the mean test accuracy over the last sixth of the steps; fall:
    the first evaluation after the peak 0.1 or more below it."""
    from cg_tf.experiments import noise_grid
    series = [(1, 0.1), (100, 0.8), (200, 0.75), (300, 0.69), (400, 0.85), (500, 0.74),
              (600, 0.5)]
    assert noise_grid.late_mean(series, 600) == pytest.approx(0.5)
    assert noise_grid.late_mean(series, 420) == pytest.approx(np.mean([0.85, 0.74, 0.5]))
    assert noise_grid.fall_step(series) == 500  # after the peak at 400; 300's dip came before it
    assert noise_grid.fall_step(series[:5]) is None and noise_grid.late_mean(None, 600) is None


def test_a_published_sweep_goes_on_from_its_copy(tmp_path):
    """tools.publish_runs mid-sweep: the finished runs' records and the
    unfinished run's last checkpoint; copied under another output directory,
    the sweep skips the finished runs and resumes the other from the copy."""
    out, pub, elsewhere = (str(tmp_path / d) for d in ("sweep", "pub", "elsewhere"))
    args = ["pipelines.sweep", f"--output_dir={out}", *SWEEP]
    second = os.path.join(out, "runs", RUNS[1])
    state = os.path.join(second, "checkpoints", "checkpoint")
    # Killed once the run records ckpt-30 as its latest (its files come before
    # the state that names it).
    kill_when(args, lambda: os.path.exists(state) and re.search(
        r'^model_checkpoint_path: "ckpt-(30|40|50)"', open(state).read(), re.M))
    done = run_main("tools.publish_runs", f"--sweep_dir={out}", f"--out={pub}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{RUNS[0]}: complete" in done.stdout
    assert re.search(rf"{RUNS[1]}: resumable from ckpt-(30|40|50)", done.stdout), done.stdout
    published = os.path.join(pub, "runs", RUNS[1])
    assert not os.path.exists(os.path.join(pub, "runs", RUNS[0], "checkpoints"))
    assert sorted(os.listdir(os.path.join(published, "checkpoints")))[0] == "checkpoint"
    shutil.copytree(os.path.join(pub, "runs"), os.path.join(elsewhere, "runs"))
    done = run_main("pipelines.sweep", f"--output_dir={elsewhere}", *SWEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = stage_lines(done.stdout)
    assert any(line.endswith(f"runs/{RUNS[0]}: complete, skipped") for line in lines), lines
    assert any(line.endswith(f"runs/{RUNS[1]}: resuming") for line in lines), lines
    assert re.search(r"resumed from \S*ckpt-(30|40|50) at step (30|40|50)\b",
                     done.stdout + done.stderr), done.stderr[-3000:]
    resumed = manifest(elsewhere, f"runs/{RUNS[1]}")
    assert resumed["status"] == "complete" and resumed["outputs"]["steps"] == 60
    # --report writes the report from the published runs alone: the sweep's own.
    again = str(tmp_path / "again")
    shutil.copytree(os.path.join(elsewhere, "runs"), os.path.join(again, "runs"))
    done = run_main("tools.publish_runs", f"--out={again}", "--report")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("summary.csv", "settings.csv", "curves.csv", "summary.md"):
        with open(os.path.join(elsewhere, name)) as a, open(os.path.join(again, name)) as b:
            assert a.read() == b.read(), name
