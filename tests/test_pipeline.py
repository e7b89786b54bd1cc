"""The noisy-label Beam pipeline end to end on digits: contents, determinism,
noise statistics, rejects, bad flags and the half-written-output guard."""

import json
import os

import numpy as np
import pytest
from absl import flags
import tensorflow as tf
from conftest import (
    decode_png,
    expected_corrupt_fraction,
    parsed_flags,
    read_split,
    run_build,
    run_main,
    write_idx,
)

from cg_tf.data import build, noise, records
from cg_tf.data.reader import InputConfig, Reader
from cg_tf.data.sources import digits


def shard_bytes(data_dir):
    return {name: open(os.path.join(data_dir, name), "rb").read()
            for name in sorted(os.listdir(data_dir)) if ".tfrecord-" in name}


def test_digits_end_to_end(digits_dir):
    info = records.load_info(digits_dir)
    assert info.num_classes == 10 and tuple(info.image_shape) == (8, 8, 1)
    assert info.noise == {"mode": "uniform", "rate": 0.5, "seed": 0}
    train, test = read_split(digits_dir, "train"), read_split(digits_dir, "test")
    assert len(train) + len(test) == 1797
    assert info.splits["train"].num_examples == len(train)
    assert info.splits["test"].num_examples == len(test)
    assert all(digits.split_of(e) == "test" for e in test)
    assert not any(ex["is_corrupt"] for ex in test.values())
    assert all(ex["label"] == ex["true_label"] for ex in test.values())
    corrupt = sum(int(ex["is_corrupt"]) for ex in train.values())
    assert all(bool(ex["is_corrupt"]) == (ex["label"] != ex["true_label"]) for ex in train.values())
    assert info.splits["train"].num_corrupt == corrupt
    m = np.asarray(info.noise_matrix)
    assert m.sum() == len(train) and m.sum() - np.trace(m) == corrupt
    # Labels are exactly the noise functions of the ids; images are the source pixels.
    spec = noise.NoiseSpec("uniform", 0.5, 0)
    assert all(ex["label"] == noise.pointwise_label(spec, e, ex["true_label"], 10)
               for e, ex in train.items())
    from sklearn.datasets import load_digits
    d = load_digits()
    ex = train["digits-0005"]
    assert ex["true_label"] == d.target[5]
    np.testing.assert_array_equal(decode_png(ex["image"])[..., 0],
                                  np.rint(d.images[5] * 255 / 16).astype(np.uint8))
    with open(os.path.join(digits_dir, "rejected.jsonl")) as f:
        assert f.read() == ""


def test_same_bytes_with_two_workers_and_on_rerun(digits_dir, tmp_path):
    run_build(tmp_path / "two", beam_args=["--direct_num_workers=2",
                                           "--direct_running_mode=multi_processing"])
    run_build(tmp_path / "again")
    reference = shard_bytes(digits_dir)
    assert len(reference) == 6
    assert shard_bytes(tmp_path / "two") == reference
    assert shard_bytes(tmp_path / "again") == reference


@pytest.mark.parametrize("mode", noise.NOISE_MODES)
def test_noise_mode_statistics(mode, tmp_path):
    rate = 0.4
    info = run_build(tmp_path, mode=mode, rate=rate, seed=11)
    train = read_split(tmp_path, "train")
    n = len(train)
    m = np.asarray(info.noise_matrix)
    counts = dict(enumerate(m.sum(axis=1)))
    p = expected_corrupt_fraction(noise.NoiseSpec(mode, rate), 10, counts)
    k = info.splits["train"].num_corrupt
    assert abs(k - n * p) <= 4 * np.sqrt(n * p * (1 - p)), (k, n * p)
    if mode == "permute":
        # Labels only move between examples: the class marginal is unchanged.
        np.testing.assert_array_equal(m.sum(axis=0), m.sum(axis=1))
    for i in range(10):  # Every wrong class gets some of each row (rate/C or rate/(C-1)).
        row_p = rate / 10 if mode != "uniform_other" else rate / 9
        for j in range(10):
            if i != j and mode != "permute":
                assert abs(m[i, j] - m[i].sum() * row_p) <= 4 * np.sqrt(m[i].sum() * row_p) + 1


def test_rejected_records_and_threshold(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    labels = [1, 2, 3, 12, 4, 5]  # 12 is outside the 10 classes.
    write_idx(src, "train", rng.integers(0, 256, (6, 4, 4)), labels, truncate_images=5)
    write_idx(src, "t10k", rng.integers(0, 256, (3, 4, 4)), [0, 1, 2])
    out = tmp_path / "out"
    with pytest.raises(build.BuildError, match="max_reject_fraction"):
        run_build(out, source=f"idx:{src}", rate=0.0)
    assert not (out / records.INFO_FILE).exists()
    with pytest.raises(records.DatasetError, match="interrupted or failed"):
        records.load_info(str(out))
    rejected = [json.loads(line) for line in open(out / "rejected.jsonl")]
    reasons = {r["example_id"]: r["reason"] for r in rejected}
    assert reasons.keys() == {"train-00003", "train-00005"}
    assert reasons["train-00003"].startswith("label outside class range")
    assert reasons["train-00005"].startswith("truncated")
    info = run_build(out, source=f"idx:{src}", rate=0.0, max_reject_fraction=0.25,
                     overwrite=True)
    assert info.rejected == {"count": 2, "by_reason": {"label outside class range": 1,
                                                       "truncated": 1}}
    assert set(read_split(out, "train")) == {"train-00000", "train-00001", "train-00002",
                                             "train-00004"}


class FailingSource(digits.DigitsSource):
    """Digits whose test split fails to read: a worker crash in the middle of a run."""

    def read(self, task):
        if task.split == "test":
            raise RuntimeError("disk on fire")
        yield from super().read(task)


def test_failed_run_never_looks_complete(tmp_path):
    config = build.BuildConfig(output_dir=str(tmp_path), num_shards=2)
    with pytest.raises(Exception, match="disk on fire"):
        build.build_dataset(FailingSource(), config, build.beam_options([]))
    assert not (tmp_path / records.INFO_FILE).exists()
    with pytest.raises(records.DatasetError, match="interrupted or failed"):
        Reader(InputConfig(str(tmp_path), batch_size=8))
    # The leftovers are not clobbered without --overwrite, and are with it.
    with pytest.raises(build.BuildError, match="interrupted or failed earlier run.*--overwrite"):
        run_build(tmp_path)
    run_build(tmp_path, overwrite=True)
    assert records.load_info(str(tmp_path)).splits["test"].num_examples > 0


def test_overwrite_refuses_foreign_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(build.BuildError, match="not part of a dataset.*thesis.tex"):
        run_build(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.fixture
def cli():
    """Calls the pipeline main in-process with fresh flag values."""
    from pipelines import noisy_labels, shared_flags

    def call(*args):
        flags.FLAGS.unparse_flags()
        rest = shared_flags.parse_flags(["noisy_labels", *args])
        noisy_labels.main(rest)
    yield call
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("args,message", [
    (["--source=mnist"], "--source='mnist' is not one of"),
    (["--source=idx:/no/such/dir"], "--source=idx:/no/such/dir: directory '/no/such/dir' does not"),
    (["--noise_rate=1.5"], "noise_rate must be in"),
    (["--num_shards=0"], "--num_shards must be at least 1"),
    (["--max_reject_fraction=2"], "--max_reject_fraction must be in"),
])
def test_bad_flags_fail_before_any_work(cli, tmp_path, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        cli(f"--output_dir={out}", *args)
    assert not out.exists()


def test_unknown_flag_and_existing_output(cli, digits_dir, tmp_path):
    from absl import app
    with pytest.raises(app.UsageError, match="unknown flag.*--noise_rat=0.1"):
        cli(f"--output_dir={tmp_path}", "--noise_rat=0.1")
    before = shard_bytes(digits_dir)
    with pytest.raises(SystemExit, match="already holds a dataset; pass --overwrite"):
        cli(f"--output_dir={digits_dir}")
    assert shard_bytes(digits_dir) == before


@pytest.mark.parametrize("program,arg,message", [
    ("pipelines.sweep", "--noise_mode=foo",
     "flag --noise_mode=foo: value should be one of <uniform|uniform_other|permute>"),
    ("pipelines.easy_hard", "--batch_size=abc",
     "flag --batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ("pipelines.noisy_labels", "--flagfile=no_such.flags",
     "Unable to open flagfile: [Errno 2] No such file or directory: 'no_such.flags'"),
])
def test_a_flag_that_does_not_parse_ends_in_one_line(tmp_path, program, arg, message):
    proc = run_main(program, f"--output_dir={tmp_path / 'out'}", arg)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-2].startswith("FATAL Flags parsing error: ") and message in lines[-2], lines
    assert not (tmp_path / "out").exists()


def test_command_line_prints_summary(tmp_path):
    out = tmp_path / "cli"
    proc = run_main("pipelines.noisy_labels", "--source=digits", f"--output_dir={out}",
                    "--noise_mode=uniform_other", "--noise_rate=0.3", "--num_shards=2",
                    "--direct_num_workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "realized" in proc.stdout and "noise matrix" in proc.stdout
    info = records.load_info(str(out))
    assert info.noise["mode"] == "uniform_other" and info.splits["train"].num_shards == 2


def test_train_examples_keeps_the_lowest_hashing_ids(tmp_path):
    from cg_tf.data import hashing
    info = run_build(tmp_path / "sub", train_examples=300, seed=3)
    train = read_split(tmp_path / "sub", "train")
    assert info.splits["train"].num_examples == len(train) == 300
    run_build(tmp_path / "full", seed=3)
    full = read_split(tmp_path / "full", "train")
    ranked = sorted(full, key=lambda i: hashing.stable_hash64(3, i, "subsample"))
    assert set(train) == set(ranked[:300])
    # The test split is whole, and the kept examples carry the full build's labels.
    assert info.splits["test"].num_examples == len(read_split(tmp_path / "full", "test"))
    assert all(train[i]["label"] == full[i]["label"] for i in train)



def test_what_the_source_cannot_give_is_said(tmp_path):
    """More training examples or shards than the source has: the dataset is
    built with what there is, and the log says so."""
    from cg_tf.data import build
    from cg_tf.data.noise import NoiseSpec
    info = run_build(tmp_path / "d", train_examples=10 ** 6, num_shards=2)
    n = info.splits["train"].num_examples
    config = build.BuildConfig(str(tmp_path / "d"), NoiseSpec(), num_shards=2,
                               train_examples=10 ** 6)
    assert build.size_warnings(info, config) == [(
        f"--train_examples=1,000,000: the source has {n:,} training examples; the dataset "
        "keeps all of them")]
    tiny = run_build(tmp_path / "t", train_examples=3, num_shards=5)
    empty = sum(1 for s in tiny.splits["train"].shards.values() if not s.num_records)
    assert empty >= 2  # 3 examples, 5 shards
    config = build.BuildConfig(str(tmp_path / "t"), NoiseSpec(), num_shards=5, train_examples=3)
    assert build.size_warnings(tiny, config)[0] == (
        f"--num_shards=5: {empty} of the train split's shards are empty (3 examples)")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   tf.errors.PermissionDeniedError(
                                       None, None, "/out/report.png; Read-only file system")])
def test_a_report_the_disk_refuses_ends_in_one_line(error, tmp_path):
    from pipelines import shared_flags

    def write():
        raise error

    with parsed_flags("sweep", f"--output_dir={tmp_path}"):
        with pytest.raises(SystemExit, match=rf"^error: cannot write the report in {tmp_path}: "
                                             r"(No space left on device|Read-only file system)\. "
                                             r"The runs are complete and kept"):
            shared_flags.write_report(write)
        assert shared_flags.write_report(lambda: 7) == 7

        def missing():  # not a refused write: it keeps its traceback
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x"))

        with pytest.raises(FileNotFoundError):
            shared_flags.write_report(missing)
