"""The tf.data reader: checks, batches, reproducible epochs, resume, evaluation
subsets, and distribution over two replicas."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, read_split, two_replicas

from cg_tf.data import records
from cg_tf.data.reader import InputConfig, InputOptions, Reader, distribute

B = 32


def ids_of(ds):
    """The string ids of the batches (of a train_dataset with keep_ids)."""
    return [[e.decode() for e in b["example_id"].numpy()] for b in ds]


def test_batches(digits_dir):
    reader = Reader(InputConfig(digits_dir, batch_size=B))
    n = records.load_info(digits_dir).splits["train"].num_examples
    assert reader.steps_per_epoch == n // B
    assert "example_id" not in next(iter(reader.train_dataset(0, 1)))  # no strings for XLA
    batch = next(iter(reader.train_dataset(0, 1, keep_ids=True)))
    assert batch["image"].shape == (B, 8, 8, 1) and batch["image"].dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(batch["image"])) and float(tf.reduce_max(batch["image"])) <= 1.0
    assert float(tf.reduce_max(batch["image"])) == 1.0
    assert batch["label"].dtype == tf.int32
    np.testing.assert_array_equal(batch["is_corrupt"].numpy(),
                                  (batch["label"] != batch["true_label"]).numpy())
    # The features agree with the records on disk.
    train = read_split(digits_dir, "train")
    for eid, label in zip(batch["example_id"].numpy(), batch["label"].numpy()):
        assert train[eid.decode()]["label"] == label


def test_epochs_are_reproducible_permutations(digits_dir):
    spe = Reader(InputConfig(digits_dir, batch_size=B)).steps_per_epoch
    def ids(seed, steps):
        reader = Reader(InputConfig(digits_dir, batch_size=B, seed=seed))
        return ids_of(reader.train_dataset(0, steps, keep_ids=True))
    a, b, c = ids(0, 2 * spe), ids(0, 2 * spe), ids(1, spe)
    assert a == b  # Same seed, fresh reader: same order.
    assert a[:spe] != c  # Another seed: another order.
    epoch0, epoch1 = sum(a[:spe], []), sum(a[spe:], [])
    assert epoch0 != epoch1  # Each epoch is reshuffled...
    assert len(set(epoch0)) == len(epoch0) == spe * B  # ...and holds each example once.
    assert len(set(epoch0) & set(epoch1)) > 0.9 * len(epoch0)


@pytest.mark.parametrize("cache_max_examples", [200_000, 0])  # In memory; streamed from files.
def test_resume_sees_the_same_batches(digits_dir, cache_max_examples):
    def cfg():
        return InputConfig(digits_dir, batch_size=B, cache_max_examples=cache_max_examples)
    reader = Reader(cfg())
    spe = reader.steps_per_epoch
    full = ids_of(reader.train_dataset(0, 3 * spe, keep_ids=True))
    assert full[:spe] != full[spe:2 * spe]
    for start in (5, spe, spe + 7):
        again = Reader(cfg()).train_dataset(start, 10, keep_ids=True)
        assert ids_of(again) == full[start:start + 10]


def test_augmentation_keeps_shape_and_changes_pixels(digits_dir):
    plain = next(iter(Reader(InputConfig(digits_dir, batch_size=B)).train_dataset(0, 1)))
    aug = next(iter(Reader.open(digits_dir, B, augment="flip_crop")
                    .train_dataset(0, 1)))
    assert aug["image"].shape == plain["image"].shape
    np.testing.assert_array_equal(aug["label"], plain["label"])
    assert not np.allclose(aug["image"], plain["image"])


def test_eval_subsets(digits_dir):
    info = records.load_info(digits_dir)
    subsets = Reader.open(digits_dir, B, eval_sample_size=200).eval_subsets()
    got = {k: [ex for b in ds for ex in zip(b["example_id"].numpy(), b["is_corrupt"].numpy())]
           for k, ds in subsets.items()}
    assert {k: len(v) for k, v in got.items()} == {
        "pristine": 200, "corrupt": 200, "mixed": 200,
        "test": info.splits["test"].num_examples}
    assert all(c == 0 for _, c in got["pristine"]) and all(c == 1 for _, c in got["corrupt"])
    assert 0 < sum(c for _, c in got["mixed"]) < 200
    again = Reader.open(digits_dir, B, eval_sample_size=200).eval_subsets()
    assert [e for b in again["corrupt"] for e in b["example_id"].numpy()] == \
        [e for e, _ in got["corrupt"]]


@pytest.mark.parametrize("cache_max_examples", [200_000, 0])  # In memory; streamed from files.
def test_parts_of_the_global_batches_read_alone_make_them_up(digits_dir, cache_max_examples):
    # What each worker reads: its slice of every global batch, chosen before
    # decoding, the same examples in the same order as the slice of the whole.
    reader = Reader(InputConfig(digits_dir, batch_size=B, cache_max_examples=cache_max_examples))
    spe = reader.steps_per_epoch
    whole = ids_of(reader.train_dataset(spe - 2, 4, keep_ids=True))  # across an epoch's end
    parts = [ids_of(reader.train_dataset(spe - 2, 4, keep_ids=True, part=(start, size)))
             for start, size in ((0, 8), (8, B - 8))]
    assert [a + b for a, b in zip(*parts)] == whole
    batch = next(iter(reader.train_dataset(0, 1, part=(8, 4))))
    assert batch["image"].shape[0] == 4 and batch["image"].dtype == tf.float32


def test_two_replicas_split_the_global_batch(digits_dir):
    assert len(tf.config.list_logical_devices("CPU")) >= 2
    strategy = two_replicas()
    reader = Reader(InputConfig(digits_dir, batch_size=B))
    global_batches = ids_of(reader.train_dataset(0, 3, keep_ids=True))
    dist = distribute(lambda part: reader.train_dataset(0, 3, keep_ids=True, part=part),
                      strategy, B)
    for step, batch in enumerate(dist):
        parts = strategy.experimental_local_results(batch["example_id"])
        assert [len(p) for p in parts] == [B // 2, B // 2]
        assert [e.decode() for p in parts for e in p.numpy()] == global_batches[step]


def test_reader_errors(digits_dir, tmp_path):
    with pytest.raises(records.DatasetError, match="does not exist"):
        Reader(InputConfig(str(tmp_path / "nope"), batch_size=B))
    for bad in (5000, 0):
        with pytest.raises(ValueError, match=f"--batch_size must be between 1 and the .* "
                                             f"training examples .*, got {bad}"):
            Reader(InputConfig(digits_dir, batch_size=bad))
    with pytest.raises(ValueError, match="^augment must be one of"):
        InputOptions(augment="mixup9000")
    copy = tmp_path / "copy"
    shutil.copytree(digits_dir, copy)
    os.remove(copy / records.shard_name("train", 1, 3))
    with pytest.raises(records.DatasetError, match="1 shard.*'train' are missing.*00001-of-00003"):
        Reader(InputConfig(str(copy), batch_size=B))


def test_reading_the_evaluation_subsets_throws_no_cache_away(digits_dir):
    # The training split is cached in memory once read whole; the subsets, read
    # first (as the monitor does, before training), take a part of it, and a
    # cache read in part is discarded with a warning on stderr (each subset
    # caches its own examples instead). The tests hide TensorFlow's warnings:
    # a process of its own shows them.
    code = ("import sys\nfrom cg_tf.data.reader import Reader\n"
            "reader = Reader.open(sys.argv[1], 50, eval_sample_size=50)\n"
            "for _ in range(2):\n"
            "    print(sum(int(b['label'].shape[0]) for ds in reader.eval_subsets().values()"
            " for b in ds))\n")
    done = subprocess.run([sys.executable, "-c", code, digits_dir], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    first, again = done.stdout.split()
    assert first == again and int(first) > 150
    assert "did not fully read the dataset being cached" not in done.stderr, done.stderr
