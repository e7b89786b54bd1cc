"""The ImageNet path at toy size: an ImageNet-shaped folder
(tools.make_image_folder), its Beam build, and `configs/resnet18_imagenet.flags`
as a user runs it, on two replicas (logical CPUs), with evaluation, probe and
checkpoints, stopped by SIGTERM and resumed. docs/measurements/imagenet_shaped/
runs the same at a larger size, with the VGG-13-BN config and the RM3/M3 sweeps."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, checkpointed, run_build
from cg_tf.data.reader import Reader
from cg_tf.measure import report
from tools.make_image_folder import class_names, make_image_folder


def small(rng):
    return int(rng.integers(36, 72)), int(rng.integers(36, 72))


def image_means(paths):
    return np.array([tf.io.decode_jpeg(tf.io.read_file(p)).numpy().mean(axis=(0, 1))
                     for p in paths])


def test_the_folder_is_laid_out_as_imagenet_ships_it(tmp_path):
    made = make_image_folder(str(tmp_path / "a"), num_classes=5, train_per_class=4,
                             validation_per_class=3, size=small)
    assert made["train"] == 20 and made["validation"] == 15
    names = class_names(5)
    assert sorted(os.listdir(tmp_path / "a" / "train")) == names
    assert all(len(os.listdir(tmp_path / "a" / "train" / n)) == 4 for n in names)
    lines = (tmp_path / "a" / "validation_labels.txt").read_text().splitlines()
    files = sorted(os.listdir(tmp_path / "a" / "validation"))
    assert [line.split()[0] for line in lines] == files  # flat, every file labelled
    labels = [line.split()[1] for line in lines]
    assert sorted(labels) == sorted(names * 3)
    # The same seed makes the same bytes.
    make_image_folder(str(tmp_path / "b"), num_classes=5, train_per_class=4,
                      validation_per_class=3, size=small)
    for path in glob.glob(str(tmp_path / "a" / "**" / "*.JPEG"), recursive=True):
        assert open(path, "rb").read() == open(path.replace("/a/", "/b/"), "rb").read()
    # Learnable: a nearest-class-mean colour classifier names most validation images.
    centroids = np.stack([image_means(glob.glob(str(tmp_path / "a" / "train" / n / "*")))
                          .mean(axis=0) for n in names])
    means = image_means([str(tmp_path / "a" / "validation" / f) for f in files])
    guess = np.argmin(((means[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(guess == [names.index(k) for k in labels]) >= 0.8
    with pytest.raises(FileExistsError, match="is not empty"):
        make_image_folder(str(tmp_path / "a"))


def test_the_resnet18_config_trains_on_it_stops_and_resumes(tmp_path):
    folder, data, run = tmp_path / "folder", tmp_path / "data", tmp_path / "run"
    make_image_folder(str(folder), num_classes=4, train_per_class=8, validation_per_class=2,
                      size=small)
    info = run_build(data, source=f"imagefolder:{folder}", rate=0.5, num_shards=2)
    assert info.splits["train"].num_examples == 32 and info.eval_split == "validation"
    assert Reader.open(str(data), 8, image_size=(32, 32)).num_classes == 4
    command = [sys.executable, "-m", "cg_tf.train", "--flagfile=configs/resnet18_imagenet.flags",
               f"--data_dir={data}", f"--model_dir={run}", "--num_cpu_devices=2",
               "--image_size=32,32", "--batch_size=8", "--steps=8", "--eval_every=2",
               "--checkpoint_every=2", "--log_every=1", "--eval_sample_size=8"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not checkpointed(run, 2):
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=600)
    assert "on 2 replica(s)" in err and "after the trainer started" in err, err[-3000:]
    stopped = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert first.returncode == 143 and not stopped.endswith("-8"), err[-3000:]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {stopped}" in again.stderr, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["model"] == "resnet18"
    curves = report.load_runs(str(run))[0].scalars
    test = [s for s, _ in curves["eval/test/accuracy"]]
    assert test == sorted(set(test)) and test[-1] == 8  # one history across the stop
    assert any(tag.startswith("coherence/") for tag in curves), sorted(curves)
