"""The trainer end to end: flag errors, NaN stop, resume after SIGKILL, every
config for one step, and the memorization effect on noisy digits."""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import ClassVar

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, checkpointed, jpeg, parsed_flags, run_build, run_main, write_idx

from cg_tf import train
from cg_tf.data import records
from cg_tf.data.reader import InputOptions
from cg_tf.experiments import stages
from cg_tf.measure import report
from cg_tf.measure.monitor import MonitorConfig
from cg_tf.robust import aggregators, tiled
from cg_tf.robust.aggregators import RM3, CutAtC, Mean, MedianOfMeans, Winsorized
from cg_tf.robust.layer_rules import Stacked
from cg_tf.storage import events
from cg_tf.training.trainer import NonFiniteLoss, TrainConfig, Trainer


def config(data_dir, model_dir, **kw):
    kw.setdefault("fc_widths", (16,))
    kw.setdefault("steps", 5)
    kw.setdefault("input", InputOptions(eval_sample_size=50))
    return TrainConfig(data_dir=str(data_dir), model_dir=str(model_dir), **kw)


@pytest.mark.parametrize("overrides,message", [
    ({"aggregator": Winsorized(c=50)}, "--aggregator=winsorized:50: need 0 <= 2c"),
    ({"aggregator": MedianOfMeans(k=7)}, "--aggregator=median_of_means:7: 7 groups do not"),
    ({"aggregator": RM3(), "momentum": 0.9}, "--aggregator=rm3: refuses --momentum=0.9"),
    ({"aggregator": RM3(), "optimizer": "adam"},
     "--aggregator=rm3: refuses --optimizer=adam, whose beta_1=0.9"),
    ({"optimizer": "adam", "momentum": 0.9}, "--momentum applies to --optimizer=sgd, not adam"),
    ({"optimizer": "lion"}, "--optimizer must be one of sgd, adam, got 'lion'"),
    ({"batch_size": 100_000}, "--batch_size must be between 1 and the .* got 100000"),
    ({"aggregator": Winsorized(c=4, layers="hidden"), "fc_widths": ()},
     "^--aggregator=winsorized:4@hidden: the layer filter 'hidden' leaves no layer of"),
    ({"aggregator": Winsorized(c=2), "per_example_chunk": 7, "batch_size": 50},
     "^--per_example_chunk=7 does not divide the per-replica batch of 50"),
])
def test_bad_configurations_fail_before_training(digits_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(config(digits_dir, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"model": "transformer"}, "--model must be one of"),
    ({"lr_schedule": "step"}, "--lr_schedule=step needs --lr_decay_epochs"),
    ({"bn_mode": "magic"}, "--bn_mode must be one of"),
    ({"per_example_chunk": 0}, "--per_example_chunk must be positive"),
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
    ({"learning_rate": float("nan")}, "--learning_rate must be positive, got nan"),
    ({"learning_rate": float("inf")}, "--learning_rate must be positive, got inf"),
    ({"weight_decay": -1.0}, "--weight_decay must be 0 or positive, got -1"),
    ({"lr_decay_factor": 0.0}, "--lr_decay_factor must be positive"),
    ({"steps": 0}, "--steps must be between 1 and 1,000,000,000, got 0"),
    ({"steps": 10 ** 20}, "--steps must be between 1 and 1,000,000,000"),
    ({"epochs": 0}, "--epochs must be between 1"),
    ({"jit_compile": True, "deterministic": True}, "--jit_compile and --deterministic together"),
])
def test_bad_options_fail_when_the_config_is_made(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path / "data", tmp_path / "run", **overrides)
    with pytest.raises(ValueError, match="^eval_every must be positive"):
        MonitorConfig(eval_every=0)


@pytest.mark.parametrize("options,message", [
    ({"image_size": (0, 0)},
     r"^image_size must be HEIGHT,WIDTH \(two positive integers\), got 0,0"),
    ({"image_size": (8, 8, 8)}, "^image_size must be HEIGHT,WIDTH"),
    ({"eval_sample_size": 0}, "^eval_sample_size must be positive, got 0"),
    ({"augment": "mixup"}, "^augment must be one of none, flip"),
])
def test_bad_input_options_fail_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        InputOptions(**options)


def test_a_run_inside_its_dataset_is_refused(tmp_path):
    for model_dir in (tmp_path / "data", tmp_path / "data" / "run"):
        with pytest.raises(ValueError, match=r"--model_dir=.* is inside --data_dir=.*: a run's "
                                             "files would mix with the dataset's"):
            config(tmp_path / "data", model_dir)
    config(tmp_path / "data", tmp_path / "data_runs")  # a sibling with a common prefix is fine


@pytest.mark.parametrize("args,message", [
    (["--aggregator=krum"], "--aggregator=krum: unknown aggregator 'krum'"),
    (["--aggregator=winsorized"], "--aggregator=winsorized: winsorized needs its c"),
    (["--fc_widths=8,x"], "--fc_widths: 8,x is not a list of int"),
    (["--image_size="], None),
])
def test_flags_are_read_into_the_config(args, message):
    if message:
        with pytest.raises(ValueError, match=message):
            with parsed_flags("train", *args):
                train.config_from_flags()
        return
    with parsed_flags("train", "--aggregator=median_of_means:4", "--fc_widths=8,4",
                      "--image_size=", "--eval_every=7", "--seed=3"):
        got = train.config_from_flags()
    assert got.aggregator == MedianOfMeans(k=4) and got.fc_widths == (8, 4)
    assert got.input.image_size is None and got.monitor.eval_every == 7 and got.seed == 3
    assert got.model_dir == "runs/train_demo"  # the default


def test_missing_or_incomplete_dataset(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="--data_dir: dataset directory .* does not exist"):
        Trainer(config(tmp_path / "nothing", tmp_path / "run"))
    partial = tmp_path / "partial"
    shutil.copytree(digits_dir, partial)
    os.remove(partial / records.INFO_FILE)
    with pytest.raises(ValueError, match="--data_dir: .*interrupted or failed"):
        Trainer(config(partial, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_command_line_error_names_the_flag(tmp_path):
    proc = run_main("cg_tf.train", f"--data_dir={tmp_path}/none", f"--model_dir={tmp_path}/run",
                    "--steps=1")
    assert proc.returncode != 0
    assert "--data_dir" in proc.stderr and "does not exist" in proc.stderr
    for arg, message in (("--num_cpu_devices=0", "flag --num_cpu_devices=0: 0 is not a "
                                                 "positive integer"),
                         ("--seed=-1", "error: --seed must be an integer from 0 to 2**32 - 1"),
                         # The Python-facing options (MonitorConfig, InputOptions) word their
                         # fields; the command line names them as flags.
                         ("--eval_every=0", "error: --eval_every must be positive, got 0"),
                         ("--eval_sample_size=0",
                          "error: --eval_sample_size must be positive, got 0")):
        proc = run_main("cg_tf.train", f"--model_dir={tmp_path}/run", arg)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module,own,shared", [
    ("cg_tf.train", "--learning_rate", "--seed"),
    ("pipelines.noisy_labels", "--noise_rate", "--seed"),
    ("pipelines.sweep", "--noise_rates", "--learning_rate"),
    ("pipelines.easy_hard", "--heldout_size", "--output_dir"),
])
def test_help_lists_the_shared_flags_and_exits_0(module, own, shared):
    proc = run_main(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{own}:" in proc.stdout and f"{shared}:" in proc.stdout


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits_dir, tmp_path):
    trainer = Trainer(config(digits_dir, tmp_path, learning_rate=1e25, steps=50,
                             checkpoint_every=1))
    with pytest.raises(NonFiniteLoss, match="loss is nan at step .*last good checkpoint"):
        trainer.run()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


def test_a_dataset_without_pristine_examples_trains(tmp_path):
    data = tmp_path / "all_corrupt"
    run_build(data, mode="uniform_other", rate=1.0)
    summary = Trainer(config(data, tmp_path / "run", steps=3)).run()
    assert summary["pristine_accuracy"] is None  # no pristine examples to measure
    assert 0 <= summary["corrupt_accuracy"] <= 1 and 0 <= summary["test_accuracy"] <= 1


def test_restore_net_gives_the_final_weights_of_a_run(digits_dir, tmp_path):
    cfg = config(digits_dir, tmp_path / "run", model="small_cnn", steps=3)
    reader = stages.evaluation_reader(cfg.data_dir)
    with pytest.raises(ValueError, match="no checkpoint in"):
        stages.restore_net(cfg, reader)
    trainer = Trainer(cfg)
    trainer.run()
    net = stages.restore_net(cfg, reader)
    assert len(net.weights) == len(trainer.model.net.weights)
    for a, b in zip(net.weights, trainer.model.net.weights):  # BatchNorm's moving statistics too
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert not np.array_equal(net.weights[0].numpy(), Trainer(cfg).model.net.weights[0].numpy())


def test_clamp_norms_rescales_each_kernel_to_its_starting_norm(digits_dir, tmp_path):
    """--clamp_norms: after the update, each kernel is the free run's kernel
    rescaled to its starting norm; biases get the free run's update."""
    def one_step(clamp, where):
        trainer = Trainer(config(digits_dir, tmp_path / where, steps=1, clamp_norms=clamp,
                                 aggregator=Winsorized(c=2), fc_widths=(16, 16)))
        start = [v.numpy() for v in trainer.model.net.trainable_variables]
        trainer.run()
        return start, [v.numpy() for v in trainer.model.net.trainable_variables]
    (start, free), (start2, clamped) = one_step(False, "free"), one_step(True, "clamped")
    for s, s2, f, c in zip(start, start2, free, clamped):
        np.testing.assert_array_equal(s, s2)
        assert not np.allclose(f, s)  # it trained
        want = f * np.linalg.norm(s) / np.linalg.norm(f) if f.ndim > 1 else f
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-7)
    # The run's figures say so.
    from cg_tf.measure import report
    caption = {w: report.caption(report.load_runs(str(tmp_path / w))) for w in ("free", "clamped")}
    assert report.CLAMPED in caption["clamped"] and "kernels" not in caption["free"], caption
    both = report.load_runs(str(tmp_path))
    assert "kernels" not in report.caption(both)
    titles = report.panel_titles({r.name: [r] for r in both})
    assert titles == {"clamped": report.CLAMPED, "free": report.FREE}, titles


def test_run_records_name_the_code_that_made_them(digits_dir, tmp_path):
    """config.json: the code that started the run; summary.json: the code that
    finished it (the package version, the checkout's commit and whether its
    tracked files differed). Newer code resumes a run without a refusal."""
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                check=True).stdout.strip())
    want = {"package_version": metadata.version("cg_tf"), "git_commit": head, "git_dirty": dirty}
    run = tmp_path / "run"
    Trainer(config(digits_dir, run, steps=2)).run()
    for name in ("config.json", "summary.json"):
        assert json.loads((run / name).read_text())["provenance"] == want, name
    # The same run, as if started by other code and finished by this one.
    recorded = json.loads((run / "config.json").read_text())
    older = {**want, "git_commit": "0" * 40}
    (run / "config.json").write_text(json.dumps({**recorded, "provenance": older}))
    (run / "summary.json").unlink()
    Trainer(config(digits_dir, run, steps=2)).run()
    assert json.loads((run / "config.json").read_text())["provenance"] == older
    assert json.loads((run / "summary.json").read_text())["provenance"] == want


def test_optimizer_adam_trains_and_checkpoints_its_moments(digits_dir, tmp_path):
    trainer = Trainer(config(digits_dir, tmp_path / "run", optimizer="adam",
                             learning_rate=0.01))
    assert isinstance(trainer.optimizer, keras.optimizers.Adam)
    before = [v.numpy() for v in trainer.model.net.trainable_variables]
    trainer.run()
    assert any(not np.array_equal(a, v.numpy())
               for a, v in zip(before, trainer.model.net.trainable_variables))
    state = final_state(tmp_path / "run")
    # Adam's first and second moments of each variable (SGD without momentum has none).
    slots = [n for n in state if n.startswith("optimizer/_variables/")]
    assert len(slots) == 2 * len(before), sorted(state)


def final_state(model_dir):
    """Every variable of the last checkpoint but the clocks."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{model_dir}/checkpoints"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if not n.startswith(("wall_seconds", "train_seconds", "eval_seconds",
                                 "probe_seconds", "_CHECKPOINTABLE"))}


def test_resume_after_sigkill_matches_an_uninterrupted_run(digits_dir, tmp_path):
    args = ["-m", "cg_tf.train", f"--data_dir={digits_dir}", "--fc_widths=64",
            "--aggregator=rm3", "--steps=400", "--checkpoint_every=100", "--log_every=25",
            "--deterministic", "--eval_sample_size=50", "--batch_size=50"]
    whole = subprocess.run([sys.executable, *args, f"--model_dir={tmp_path}/whole"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, f"--model_dir={killed}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed once it has logged an evaluation past its checkpoint of step 100.
    deadline = time.time() + 300
    while time.time() < deadline and not (
            checkpointed(killed, 100) and _last_step(killed) > 100):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = tf.train.latest_checkpoint(str(killed / "checkpoints"))
    assert latest and not latest.endswith("-400"), "the run was not interrupted"
    resumed = subprocess.run([sys.executable, *args, f"--model_dir={killed}"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert re.search(r"removed \d+ events past step \d+ from the event files", resumed.stderr)
    a, b = final_state(tmp_path / "whole"), final_state(killed)
    # Weights (named by the optimizer's path to them), RM3 buffers, step, iterations.
    assert a.keys() == b.keys()
    assert any("aggregator_state/previous" in n for n in a) and any("trainable_variables" in n for n in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The curves: one history each, that of the uninterrupted run (the killed
    # attempt's events past its checkpoint are gone, the resumed run's replace them).
    whole_curves, killed_curves = (report.load_runs(str(d))[0].scalars
                                   for d in (tmp_path / "whole", killed))
    assert whole_curves.keys() == killed_curves.keys()
    for tag, series in whole_curves.items():
        steps = [s for s, _ in killed_curves[tag]]
        assert steps == sorted(set(steps)) == [s for s, _ in series], tag
        if tag.startswith("cost/"):  # shares of wall time
            continue
        np.testing.assert_allclose([v for _, v in killed_curves[tag]], [v for _, v in series],
                                   rtol=1e-5, atol=1e-6, err_msg=tag)


def test_events_past_the_resumed_step_are_cut(tmp_path):
    """cut_after keeps steps up to the checkpoint's, in every event file."""
    for attempt in range(2):
        writer = tf.summary.create_file_writer(str(tmp_path), filename_suffix=f".{attempt}")
        with writer.as_default():
            for step in range(attempt * 20, 30):
                tf.summary.scalar("loss", float(step + 100 * attempt), step=step)
        writer.close()
    # Attempt 0 logged 0-29; the "resumed" attempt 1 20-29: 20-29 are there twice.
    assert events.cut_after(str(tmp_path), 19) == 20
    assert _scalars(tmp_path)["loss"] == [(s, float(s)) for s in range(20)]
    assert events.cut_after(str(tmp_path), 19) == 0  # nothing more to cut
    assert not list(tmp_path.glob("*.tmp"))


def _last_step(log_dir) -> int:
    """The last step the event files in log_dir hold (-1: none yet)."""
    steps = [-1]
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path).apply(tf.data.experimental.ignore_errors()):
            steps.append(tf.compat.v1.Event.FromString(record.numpy()).step)
    return max(steps)


def _scalars(log_dir):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


@pytest.fixture(scope="module")
def mock_datasets(tmp_path_factory):
    """Tiny datasets in each config family's image format."""
    root = tmp_path_factory.mktemp("mock")
    rng = np.random.default_rng(0)
    idx = root / "idx"
    idx.mkdir()
    write_idx(idx, "train", rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40))
    write_idx(idx, "t10k", rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10))
    cifar = root / "cifar"
    cifar.mkdir()
    for name, n in [(f"data_batch_{i}.bin", 8) for i in range(1, 6)] + [("test_batch.bin", 6)]:
        (cifar / name).write_bytes(b"".join(
            bytes([i % 10]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
            for i in range(n)))
    folder = root / "folder"
    for split, n in (("train", 12), ("val", 2)):
        for cls in ("a", "b", "c"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                (folder / split / cls / f"{i}.jpg").write_bytes(jpeg(rng, 40 + i, 50))
    out = {}
    for name, src in (("idx", f"idx:{idx}"), ("cifar", f"cifar10:{cifar}"),
                      ("folder", f"imagefolder:{folder}")):
        out[name] = str(root / f"{name}_data")
        run_build(out[name], source=src, rate=0.5, num_shards=2)
    return out


# Training configs (the pipelines' sweep_* and easy_hard_* configs are tested
# with their pipelines).
CONFIGS = sorted(c for c in glob.glob(os.path.join(REPO, "configs", "*.flags"))
                 if not os.path.basename(c).startswith(("sweep_", "easy_hard_")))


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"demo.flags", "resnet_imagenet.flags", "inception_imagenet.flags",
            "vgg_imagenet.flags", "resnet18_imagenet.flags", "vgg13_imagenet.flags",
            "cifar10_resnet_m3.flags", "cifar10_resnet_rm3.flags"} <= names
    for ds in ("fashion_mnist", "mnist"):
        assert {f"label_noise_{ds}.flags", f"winsorize_{ds}.flags"} <= names
        assert {f"winsorize_{ds}_c{c}.flags" for c in (0, 1, 2, 4, 8)} <= names


def test_demo_config_is_the_default():
    with parsed_flags("train"):
        default = train.config_from_flags()
    with parsed_flags("train", f"--flagfile={REPO}/configs/demo.flags"):
        demo = train.config_from_flags()
    assert demo == default


def parse_config(path, *overrides):
    with parsed_flags("train", f"--flagfile={path}", *overrides):
        return train.config_from_flags()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_holds_the_papers_settings(path, monkeypatch):
    monkeypatch.chdir(REPO)  # Configs name their base flagfiles relative to the checkout.
    name = os.path.basename(path)
    paper = parse_config(path)
    if "imagenet" in name:
        assert (paper.batch_size, paper.epochs, paper.learning_rate, paper.momentum,
                paper.weight_decay, paper.input.augment, paper.lr_decay_epochs) == (
                    256, 90, 0.1, 0, 0, "none", (30, 60, 80))
        assert paper.model == {"resnet": "resnet50", "inception": "inception_v3",
                               "vgg": "vgg16", "resnet18": "resnet18",
                               "vgg13": "vgg13_bn"}[name.split("_")[0]]
    # Coherent Gradients (ICLR 2020), from the authors' code and the paper:
    # the label-noise study trains 784-2048-10 with plain SGD for 10^5 steps,
    # the winsorization study 784-256-256-256-10 for 60,000 steps (100 epochs
    # of MNIST), c in {0, 1, 2, 4, 8}; both lr 0.1, batch 100, no momentum.
    if name.startswith(("label_noise_", "winsorize_")):
        assert (paper.model, paper.init, paper.batch_size, paper.learning_rate, paper.momentum,
                paper.weight_decay, paper.lr_schedule) == (
                    "fc", "authors", 100, 0.1, 0, 0, "constant")
    if name.startswith("label_noise_"):
        assert paper.aggregator == Mean()
        assert (paper.fc_widths, paper.steps) == ((2048,), 100_000)
        assert "permute50" in paper.data_dir  # the data its comment builds
    if name.startswith("winsorize_"):
        c = int(name.rsplit("_c", 1)[1].split(".")[0]) if "_c" in name else 0
        assert c in (0, 1, 2, 4, 8)
        assert paper.aggregator == (Winsorized(c=c) if c else Mean())  # c = 0: plain SGD
        assert (paper.fc_widths, paper.steps) == ((256, 256, 256), 60_000)
        assert "permute50" in paper.data_dir  # the data its comment builds
    if name == "cifar10_resnet_m3.flags":
        assert paper.aggregator == MedianOfMeans(k=3)
        assert paper.batch_size == 3 * 128 and paper.momentum == 0


FASHION = [c for c in CONFIGS if "fashion_mnist" in os.path.basename(c)]


@pytest.mark.parametrize("path", FASHION, ids=os.path.basename)
def test_fashion_mnist_configs_differ_from_mnist_only_in_the_data(path, monkeypatch):
    """The papers ran MNIST; each Fashion-MNIST config is its MNIST config
    with other data (and its own run directory)."""
    monkeypatch.chdir(REPO)
    mnist_path = path.replace("fashion_mnist", "mnist")
    assert os.path.exists(mnist_path), f"no MNIST counterpart of {os.path.basename(path)}"
    fashion, mnist = parse_config(path), parse_config(mnist_path)
    assert fashion.data_dir != mnist.data_dir and "fashion_mnist" in fashion.data_dir
    assert dataclasses.replace(fashion, data_dir=mnist.data_dir,
                               model_dir=mnist.model_dir) == mnist


# ImageNet and CIFAR models on two replicas take a minute each to trace on a CPU;
# test_models.py runs every model for one step in the default run.
SLOW = ("imagenet", "cifar")


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if any(s in p for s in SLOW) else p
    for p in CONFIGS], ids=os.path.basename)
def test_every_config_runs_one_step(path, mock_datasets, digits_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    name = os.path.basename(path)
    data = (digits_dir if name == "demo.flags" else mock_datasets["cifar"] if "cifar" in name
            else mock_datasets["folder"] if "imagenet" in name else mock_datasets["idx"])
    # Tiny batches and images so that ImageNet models run a step on a CPU.
    overrides = [f"--data_dir={data}", f"--model_dir={tmp_path}", "--steps=1",
                 "--batch_size=18", "--eval_sample_size=8"]
    if "imagenet" in name:
        overrides.append("--image_size=75,75")
    paper, cfg = parse_config(path), parse_config(path, *overrides)
    assert cfg.aggregator == paper.aggregator and cfg.model == paper.model
    summary = Trainer(cfg).run()
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])
    assert os.path.exists(tmp_path / "summary.json")


def test_the_first_command_shows_memorization_and_what_winsorizing_does(tmp_path):
    """The README's first command as printed (cg_tf.demo: it builds its data,
    then trains with its settings and seed): plain SGD fits at least half the
    corrupt examples to their noisy labels, winsorized gradients (c = 4) at
    most a tenth; the end is a table, and the console holds only its lines."""
    import re
    done = subprocess.run([sys.executable, "-m", "cg_tf.demo"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-3000:]
    sgd, wins = (files_json(tmp_path / "runs" / "demo" / name / "summary.json")
                 for name in ("sgd", "winsorized_c4"))
    assert sgd["corrupt_accuracy"] >= 0.5, sgd
    assert wins["corrupt_accuracy"] <= 0.1, wins
    assert wins["test_accuracy"] > sgd["test_accuracy"], (sgd, wins)
    table = done.stdout[done.stdout.index("plain SGD"):]
    assert re.search(r"corrupt ones, against their noisy label +%.3f +%.3f" % (
        sgd["corrupt_accuracy"], wins["corrupt_accuracy"]), table), table
    assert "TensorBoard: tensorboard --logdir runs/demo" in done.stdout
    # Each line of the console is the program's own: no third-party chatter.
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in done.stderr.splitlines()), \
        done.stderr[-3000:]


def files_json(path):
    import json
    with open(path) as f:
        return json.load(f)


def test_a_run_summary_reads_as_a_table():
    summary = {"model": "fc", "aggregator": {"name": "winsorized", "c": 4}, "batch_size": 100,
               "steps": 840, "steps_per_epoch": 14, "wall_seconds": 61.2,
               "data_dir": "data/x", "noise": {"mode": "uniform", "rate": 0.5, "seed": 0},
               "pristine_accuracy": 0.94471, "corrupt_accuracy": 0.0174,
               "corrupt_true_label_accuracy": 0.8954, "test_accuracy": 0.9012,
               "test_top5_accuracy": None, "adjusted_overfit": 0.0594}
    text = report.summary_text(summary, "runs/x")
    assert text.splitlines()[0] == "runs/x: fc with winsorized:4, batch 100, 840 steps (60 " \
        "epochs), 61 s"
    assert "data/x (50% uniform label noise)" in text
    assert "  corrupt ones, against their noisy label   0.017" in text
    assert "top 5" not in text and "None" not in text
    assert "fits 2% of the corrupt training examples to their noisy label" in text
    # An fc net is named by its layer sizes where the run records them.
    text = report.summary_text({**summary, "architecture": "fc 784-256-10"}, "runs/x")
    assert text.startswith("runs/x: fc 784-256-10 with winsorized:4")


def test_text_tables_align_and_round():
    rows = [{"aggregator": "mean", "corrupt": 0.23312, "note": None},
            {"aggregator": "winsorized:4", "corrupt": 0.0104, "note": float("nan")}]
    assert report.text_table(rows).splitlines() == [
        "aggregator    corrupt  note",
        "mean            0.233     -",
        "winsorized:4    0.010     -"]
    assert report.text_table([]) == ""


@pytest.mark.parametrize("argv,verbose", [([], False), (["--verbosity=1"], True),
                                          (["-v", "2"], True), (["--verbosity=0"], False),
                                          (["--verbosity", "1", "--steps=3"], True)])
def test_verbosity_is_read_before_tensorflow_loads(argv, verbose):
    from cg_tf import console
    assert console.verbose(argv) == verbose


def test_what_tensorflow_prints_as_it_loads_is_told_from_what_matters():
    """TensorFlow 2.21 logs absl INFO lines (oneDNN) before its log level
    applies; the console drops those and absl's notice, nothing else."""
    from cg_tf import console
    chatter = ["WARNING: All log messages before absl::InitializeLog() is called are written "
               "to STDERR\n",
               "I0000 00:00:1796180604.680946    5978 port.cc:153] oneDNN custom operations are "
               "on.\n"]
    kept = ["W0000 00:00:1796180604.680946    5978 x.cc:1] a warning\n",
            "E0000 00:00:1796180604.680946    5978 x.cc:1] an error\n",
            "Traceback (most recent call last):\n", "I am not a log line\n"]
    assert all(console.IMPORT_CHATTER.match(line) for line in chatter)
    assert not any(console.IMPORT_CHATTER.match(line) for line in kept)


def test_a_verbose_run_shows_the_libraries_lines(digits_dir, tmp_path):
    quiet = run_main("cg_tf.train", f"--data_dir={digits_dir}", f"--model_dir={tmp_path}/q",
                     "--steps=3", "--fc_widths=8", "--eval_sample_size=50")
    loud = run_main("cg_tf.train", f"--data_dir={digits_dir}", f"--model_dir={tmp_path}/l",
                    "--steps=3", "--fc_widths=8", "--eval_sample_size=50", "--verbosity=1")
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-2000:]
    # The probe reads the cached evaluation subset through: no truncation warning.
    for proc in (quiet, loud):
        assert "cache_dataset_ops" not in proc.stderr, proc.stderr[-2000:]
    assert "Sharding callback" not in quiet.stderr and "Sharding callback" in loud.stderr
    assert len(loud.stderr.splitlines()) > len(quiet.stderr.splitlines())


def free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_match_two_replicas_on_one_worker(digits_dir, tmp_path):
    """MultiWorkerMirroredStrategy with two local worker processes (TF_CONFIG)
    ends with exactly the weights of MirroredStrategy on two logical CPUs. A
    conv net: the two logical CPUs exchange its convolutions' rows, the two
    workers (no all-to-all across workers) gather their factors."""
    import json
    args = ["-m", "cg_tf.train", f"--data_dir={digits_dir}", "--steps=10", "--model=small_cnn",
            "--aggregator=winsorized:2", "--deterministic",
            "--eval_sample_size=50", "--checkpoint_every=10"]
    ports = free_ports(2)
    workers = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": i}}))
        workers.append(subprocess.Popen(
            [sys.executable, *args, "--strategy=multi_worker", f"--model_dir={tmp_path}/w{i}"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    one = subprocess.run([sys.executable, *args, "--strategy=mirrored", "--num_cpu_devices=2",
                          f"--model_dir={tmp_path}/mirrored"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "on 2 replica(s)" in one.stderr
    states = [final_state(tmp_path / d) for d in ("w0", "w1", "mirrored")]
    weights = [n for n in states[0] if "trainable_variables" in n]
    assert len(weights) == 8
    for n in weights:
        np.testing.assert_allclose(states[0][n], states[1][n], rtol=0, atol=1e-6)
        np.testing.assert_allclose(states[0][n], states[2][n], rtol=1e-5, atol=1e-6)


def test_progress_lines_come_at_most_every_ten_seconds(monkeypatch):
    """At a multiple of log_every once 10 s have passed since the last line,
    and at the last step; steps/s over the steps since the last line."""
    import types

    import tensorflow as tf

    from cg_tf.training import trainer
    clock, lines = [100.0], []
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(trainer.logging, "info", lambda fmt, *args: lines.append(args))
    fake = types.SimpleNamespace(config=types.SimpleNamespace(log_every=50), total_steps=420,
                                 step=tf.Variable(0, dtype=tf.int64),
                                 wall=tf.Variable(0.0, dtype=tf.float64), manager=None,
                                 created=90.0)
    counters = trainer.RunCounters(fake, start=20)  # resumed at step 20
    counters.on_train_begin()
    for _ in range(400):  # steps 21..420, 1/8 s each (exact in binary)
        clock[0] += 0.125
        counters.on_train_batch_end(0, {"loss": 1.0, "accuracy": 0.5})
    # First: how long the attempt's first step came after the trainer started.
    assert lines.pop(0) == (21, 10.125)
    steps = [args[0] for args in lines]
    # 50 (the first multiple), then the first multiples >= 10 s later, and the end.
    assert steps == [50, 150, 250, 350, 420]
    rates = [args[-1] for args in lines]
    assert rates == pytest.approx([8.0] * 5)  # 30 steps in 3.75 s, 100 in 12.5 s, ...
    assert int(fake.step) == 420


def test_a_damaged_checkpoint_gives_way_to_the_one_before(digits_dir, tmp_path, caplog):
    """A flipped byte in the newest checkpoint's data: the run resumes from the
    checkpoint before it, says so, and ends where an undamaged run ends."""
    from cg_tf.training import trainer as trainer_module
    run = tmp_path / "run"
    cfg = config(digits_dir, run, steps=20, checkpoint_every=10, deterministic=True)
    Trainer(cfg).run()
    done = Trainer(cfg)
    done.restore()
    want = [v.numpy() for v in done.model.net.trainable_variables]
    (run / trainer_module.SUMMARY_FILE).unlink()  # as if killed after its last checkpoint
    data = next((run / "checkpoints").glob("ckpt-20.data-*"))
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    with caplog.at_level("WARNING"):
        resumed = Trainer(cfg)
        assert resumed.restore() == 10
    assert any("ckpt-20 is damaged" in r.getMessage() for r in caplog.records)
    resumed.run()
    for a, b in zip(want, resumed.model.net.trainable_variables):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("state", ["without timestamps", "missing"])
def test_checkpoints_the_state_file_does_not_list_are_resumed_from(digits_dir, tmp_path, state):
    """A checkpoint state written by hand or another tool (no timestamps: TensorFlow's
    manager then lists nothing), or none at all: the run resumes from its newest
    checkpoint instead of starting over beside it."""
    from cg_tf.training import trainer as trainer_module
    run = tmp_path / "run"
    cfg = config(digits_dir, run, steps=20, checkpoint_every=10)
    Trainer(cfg).run()
    (run / trainer_module.SUMMARY_FILE).unlink()  # as if killed after its last checkpoint
    state_file = run / "checkpoints" / "checkpoint"
    if state == "missing":
        state_file.unlink()
    else:
        state_file.write_text('model_checkpoint_path: "ckpt-20"\n'
                              'all_model_checkpoint_paths: "ckpt-10"\n'
                              'all_model_checkpoint_paths: "ckpt-20"\n')
    resumed = Trainer(cfg)
    assert resumed.restore() == 20
    # The checkpoint is the manager's own again: the latest, deleted in turn.
    assert resumed.manager.latest_checkpoint == str(run / "checkpoints" / "ckpt-20")


def test_a_dataset_rebuilt_under_a_run_stops_it(digits_dir, tmp_path):
    """The dataset changes while the run reads it: the run stops at its next
    checkpoint, naming the directory, and writes no checkpoint or summary of it."""
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    run = tmp_path / "run"
    trainer = Trainer(config(data, run, steps=30, checkpoint_every=10))
    info = data / records.INFO_FILE
    d = json.loads(info.read_text())
    d["noise"] = {**d["noise"], "rate": 0.25}  # what a rebuild with other flags records
    info.write_text(json.dumps(d))
    with pytest.raises(records.DatasetError, match=rf"--data_dir={data} was rebuilt while this "
                                                   r"run read it \(its dataset_info.json changed"
                                                   r"\); the run stops at step 10"):
        trainer.run()
    assert not list(run.glob("checkpoints/ckpt-*"))
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_checkpoints_and_says_how_to_resume(digits_dir, tmp_path, stop):
    """A scheduler's SIGTERM, Ctrl-C's SIGINT, a closed terminal's SIGHUP: a
    checkpoint, one line, the shell's status; the same command resumes, and
    says nothing of TensorFlow's deprecations (a resume printed two)."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "cg_tf.train", f"--data_dir={digits_dir}", "--fc_widths=16",
            "--steps=100000", "--checkpoint_every=50000", "--eval_sample_size=50",
            f"--model_dir={run}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and _last_step(run) < 60:  # training, evaluations logged
        time.sleep(0.2)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + stop and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"{re.escape(str(run))}: stopped by {stop.name} at step (\d+): its "
                     r"checkpoint is saved; rerun the same command to resume", last)
    assert m, last
    step = int(m.group(1))
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith(f"ckpt-{step}")
    assert not (run / "summary.json").exists()
    # The same command resumes from that checkpoint.
    again = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    said = []
    stuck = threading.Timer(300, again.kill)  # no first step in 5 minutes: end it
    stuck.start()
    for line in again.stderr:
        said.append(line)
        if "after the trainer started" in line:  # its first step is done
            break
    stuck.cancel()
    again.send_signal(stop)
    said.append(again.communicate(timeout=300)[1])
    said = "".join(said)
    assert f"ckpt-{step} at step {step}" in said, said[-3000:]
    assert "deprecated" not in said, said[-3000:]


def test_the_shard_layout_is_part_of_a_run(digits_dir, tmp_path):
    """The same examples in other shards train in another order: a run started
    on one layout refuses to go on with the other."""
    from cg_tf.storage import rundir
    other = run_build(tmp_path / "other_layout", num_shards=2)
    assert other.splits["train"].num_shards != records.load_info(digits_dir).splits[
        "train"].num_shards
    run = tmp_path / "run"
    Trainer(config(digits_dir, run)).run()
    with pytest.raises(rundir.RunDirError, match=r"another configuration \(.*shards"):
        Trainer(config(tmp_path / "other_layout", run)).run()


def test_a_run_killed_after_its_last_checkpoint_reports_its_loss_and_time(digits_dir, tmp_path):
    """Killed between the last checkpoint and summary.json: the rerun has no
    step left to train, and reports the loss and time shares of the steps
    before (they were null and 0/0)."""
    from cg_tf.training import trainer as trainer_module
    run = tmp_path / "run"
    cfg = config(digits_dir, run, steps=20, checkpoint_every=10)
    first = Trainer(cfg).run()
    (run / trainer_module.SUMMARY_FILE).unlink()
    again = Trainer(cfg).run()
    assert again["final_loss"] == pytest.approx(first["final_loss"])
    assert again["time_shares"] == pytest.approx(first["time_shares"], rel=0.05)
    assert 0 < again["time_shares"]["eval"] < 1


@dataclasses.dataclass(frozen=True)
class LowTrimmed(CutAtC):
    """A toy order statistic registered by a user: the mean without the c
    smallest values (thresholds at uneven ranks)."""

    name: ClassVar[str] = "low_trimmed"

    def ranks(self, n):
        return self.c, n - 1


def test_a_registered_order_statistic_trains_by_its_name(digits_dir, tmp_path, monkeypatch):
    """The extension point: one subclass and its registration, nothing else,
    on the tiles, alone and side by side (against NumPy), and through the command line's
    flags with and without XLA (the same weights)."""
    monkeypatch.setitem(aggregators.REGISTRY, LowTrimmed.name, LowTrimmed)
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (20, 70, 9)).astype(np.float32)  # ties everywhere
    want = np.sort(x, axis=0)[3:].mean(axis=0)
    for small in (0, 70 * 9):  # by its own tiles, and side by side as a small variable
        monkeypatch.setattr(tiled, "SMALL", small)
        got = tiled.aggregate([Stacked(tf.constant(x))], LowTrimmed(3), [tf.zeros([70, 9])])
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    states = []
    for jit in (False, True):
        run = tmp_path / f"jit{jit}"
        with parsed_flags("train", "--aggregator=low_trimmed:3", f"--jit_compile={jit}",
                          f"--data_dir={digits_dir}", f"--model_dir={run}", "--fc_widths=16",
                          "--steps=3", "--eval_sample_size=50", "--batch_size=20"):
            cfg = train.config_from_flags()
        assert cfg.aggregator == LowTrimmed(3)
        trainer = Trainer(cfg)
        summary = trainer.run()
        assert trainer.model.jit_compile is jit  # Keras may turn XLA off with a warning only
        assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
        assert json.loads((run / "config.json").read_text())["aggregator"] == {
            "name": "low_trimmed", "c": 3}
        states.append(final_state(run))
    for name, value in states[0].items():
        np.testing.assert_allclose(states[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
