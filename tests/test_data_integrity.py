"""What the reader refuses before training, and what a build may delete:
per-shard record counts and digests, labels within num_classes, num_classes
agreeing with the class space the pipeline built, declared image shapes,
corrupt records named by file and offset, truncated gzipped IDX sources, and
--overwrite deleting only what a build made."""

import gzip
import json
import os
import re
import shutil
import struct
import threading

import numpy as np
import pytest
import tensorflow as tf
from conftest import read_split, run_build, run_main, write_idx

from cg_tf.data import build, records, verify
from cg_tf.data.reader import InputConfig, Reader
from cg_tf.storage import lock

SHARD = records.shard_name("train", 1, 3)
# What a reader says of a shard whose size is right but whose ends changed.
ENDS_CHANGED = "{}: its first and last bytes do not match the ends_sha256"


def copy_of(data_dir, tmp_path, **info_changes):
    """A copy of a dataset directory with some dataset_info.json fields replaced."""
    out = tmp_path / "copy"
    shutil.copytree(data_dir, out)
    path = out / records.INFO_FILE
    info = json.loads(path.read_text())
    info.update(info_changes)
    path.write_text(json.dumps(info))
    return out


def read(data_dir, **kwargs):
    """Opens a reader: the check of every shard's size and ends."""
    return Reader(InputConfig(str(data_dir), batch_size=32, **kwargs))


def full_check(data_dir):
    """The check of every record (python -m cg_tf.data.verify; the build runs it)."""
    verify.verify_dataset(str(data_dir), records.load_info(str(data_dir)))


def record_spans(path):
    """(start offset, end offset) of each record of an uncompressed TFRecord file."""
    data, spans, at = open(path, "rb").read(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        spans.append((at, at + length + 16))
        at += length + 16
    return spans


def rewrite_shard(path, edit):
    """Writes `edit(list of serialized records)` back to an uncompressed shard."""
    recs = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in edit(recs):
            w.write(r)


# -- what the pipeline records ------------------------------------------------

def test_info_holds_a_count_and_digest_per_shard(digits_dir):
    info = records.load_info(digits_dir)
    for split, s in info.splits.items():
        paths = info.shard_paths(digits_dir, split)
        assert sorted(s.shards) == sorted(os.path.basename(p) for p in paths)
        for p in paths:
            digest = records.RecordDigest()
            for r in tf.data.TFRecordDataset(p):
                digest.update(r.numpy())
            assert s.shards[os.path.basename(p)] == records.ShardInfo(
                digest.count, digest.hexdigest(), os.path.getsize(p), records.file_ends_sha256(p))
        assert sum(x.num_records for x in s.shards.values()) == s.num_examples


def test_gzip_shards_have_the_digests_of_their_records(digits_dir, tmp_path):
    info = run_build(tmp_path, gzip=True)
    plain = records.load_info(digits_dir)
    def digests(split_info):
        return [(v.num_records, v.records_sha256) for _, v in sorted(split_info.shards.items())]

    for split, s in info.splits.items():  # The same records, gzipped: the same digests.
        assert digests(s) == digests(plain.splits[split])
    read(tmp_path)  # Verifies.


# -- num_classes, labels and image shape --------------------------------------

def test_num_classes_too_small_is_refused_before_training(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path, num_classes=5)
    with pytest.raises(records.DatasetError,
                       match=r"num_classes is 5, but it lists 10 class_names"):
        read(copy)


def test_num_classes_too_large_is_refused(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path, num_classes=12)
    with pytest.raises(records.DatasetError,
                       match=r"num_classes is 12, but it lists 10 class_names"):
        read(copy)


def test_a_damaged_info_file_is_named(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path)
    path = copy / records.INFO_FILE
    info = json.loads(path.read_text())
    text = path.read_text()
    path.write_text(text[:99])  # cut short
    with pytest.raises(records.DatasetError, match=rf"{re.escape(str(path))} is damaged \(not "
                                                   r"JSON: .*\); it may have been cut short"):
        read(copy)
    path.write_text(json.dumps({k: v for k, v in info.items() if k != "num_classes"}))
    with pytest.raises(records.DatasetError, match=rf"{re.escape(str(path))} is damaged: it "
                                                   "lacks num_classes"):
        read(copy)
    path.write_text(json.dumps({**info, "num_classes": "10"}))
    with pytest.raises(records.DatasetError,
                       match=r"num_classes must be an integer, got '10'"):
        read(copy)
    path.write_text(json.dumps({**info, "splits": {"train": 3}}))
    with pytest.raises(records.DatasetError, match=rf"{re.escape(str(path))} is damaged: "):
        read(copy)


def test_damaged_run_records_are_named(tmp_path):
    from cg_tf.storage import files
    path = tmp_path / "config.json"
    path.write_text('{"model": "fc", "aggregator": {"na')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged \(not JSON"):
        files.read_json(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is damaged: it holds a JSON list, not an object"):
        files.read_json(str(path))


def test_num_classes_against_the_noise_matrix_without_class_names(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path, num_classes=12, class_names=[])
    with pytest.raises(records.DatasetError,
                       match=r"num_classes is 12, but its noise_matrix is 10x10"):
        read(copy)


def test_labels_outside_num_classes_name_the_record(digits_dir, tmp_path):
    # A consistent but wrong class space: only the labels themselves show it.
    matrix = np.asarray(records.load_info(digits_dir).noise_matrix)[:5, :5].tolist()
    copy = copy_of(digits_dir, tmp_path, num_classes=5, class_names=list("01234"),
                   noise_matrix=matrix)
    with pytest.raises(records.DatasetError,
                       match=r"train.tfrecord-00000-of-00003: record \d+ \(digits-\d+\) has "
                             r"label \d and true_label \d; dataset_info.json says num_classes "
                             r"5, so labels must be in \[0, 5\)"):
        full_check(copy)


def test_image_shape_as_declared(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path, image_shape=[9, 8, 1])
    with pytest.raises(records.DatasetError,
                       match=r"tfrecord-00000-of-00003: record 0 \(digits-\d+\) holds an "
                             r"image of shape \[8, 8, 1\]; dataset_info.json declares "
                             r"image_shape \[9, 8, 1\]"):
        full_check(copy)


# -- shards: corrupt records, counts, digests ---------------------------------

def test_flipped_byte_names_the_file_and_record(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path)
    path = copy / SHARD
    spans = record_spans(path)
    k = len(spans) // 2
    data = bytearray(path.read_bytes())
    data[spans[k][0] + 30] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(records.DatasetError, match=ENDS_CHANGED.format(path)):
        read(copy)
    with pytest.raises(records.DatasetError) as e:
        full_check(copy)
    assert str(e.value).startswith(
        f"{path}: cannot read record {k}, which starts at byte {spans[k][0]}: corrupted "
        "record at ")
    assert "rebuild the dataset" in str(e.value)


def test_flipped_byte_in_a_gzip_shard_names_the_file(digits_dir, tmp_path):
    out = tmp_path / "gz"
    run_build(out, gzip=True)
    path = out / (SHARD + ".gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(records.DatasetError,
                       match=rf"{path}: cannot read record \d+, which starts at byte \d+ "
                             r"of the decompressed stream: .*(inflate|corrupted)"):
        full_check(out)
    with pytest.raises(records.DatasetError, match=ENDS_CHANGED.format(path)):
        read(out)


def test_changed_record_fails_the_digest(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path)

    def relabel(recs):
        ex = tf.train.Example.FromString(recs[3])
        label = ex.features.feature["label"].int64_list.value
        label[0] = (label[0] + 1) % 10
        return recs[:3] + [ex.SerializeToString()] + recs[4:]

    rewrite_shard(copy / SHARD, relabel)
    with pytest.raises(records.DatasetError, match=ENDS_CHANGED.format(copy / SHARD)):
        read(copy)
    # Past the ends a reader checks, only the full check sees the change.
    info = json.loads((copy / records.INFO_FILE).read_text())
    info["splits"]["train"]["shards"][SHARD]["ends_sha256"] = records.file_ends_sha256(
        str(copy / SHARD))
    (copy / records.INFO_FILE).write_text(json.dumps(info))
    read(copy)
    with pytest.raises(records.DatasetError,
                       match=rf"{copy / SHARD}: its records do not match the records_sha256 "
                             r"in dataset_info.json"):
        full_check(copy)


def test_missing_record_fails_the_count(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path)
    shard = records.load_info(str(copy)).splits["train"].shards[SHARD]
    rewrite_shard(copy / SHARD, lambda recs: recs[:-1])
    with pytest.raises(records.DatasetError,
                       match=rf"{copy / SHARD} has {os.path.getsize(copy / SHARD)} bytes; "
                             rf"dataset_info.json says {shard.num_bytes}: the file was cut "
                             "short, extended or replaced"):
        read(copy)
    info = json.loads((copy / records.INFO_FILE).read_text())  # as if the size were right
    info["splits"]["train"]["shards"][SHARD]["num_bytes"] = os.path.getsize(copy / SHARD)
    (copy / records.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(records.DatasetError,
                       match=rf"{copy / SHARD} holds {shard.num_records - 1} records; "
                             rf"dataset_info.json says {shard.num_records}"):
        full_check(copy)


def test_dataset_without_digests_gets_a_verified_read(digits_dir, tmp_path):
    """Directories built before per-shard digests: counts per split, labels,
    shapes and record checksums are still verified."""
    info = json.loads(open(os.path.join(digits_dir, records.INFO_FILE)).read())
    splits = {k: {f: v for f, v in s.items() if f != "shards"} for k, s in info["splits"].items()}
    copy = copy_of(digits_dir, tmp_path, splits=splits)
    assert read(copy).steps_per_epoch > 0
    rewrite_shard(copy / SHARD, lambda recs: recs[:-1])
    with pytest.raises(records.DatasetError,
                       match=r"split 'train' has \d+ records in its shards; dataset_info.json "
                             r"says num_examples \d+"):
        read(copy)


def test_train_command_prints_one_error_line(digits_dir, tmp_path):
    copy = copy_of(digits_dir, tmp_path)
    path = copy / SHARD
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    model_dir = tmp_path / "run"
    proc = run_main("cg_tf.train", f"--data_dir={copy}", f"--model_dir={model_dir}",
                    "--steps=2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --data_dir: {path}: its first and last bytes do not "
                           "match"), last


# -- truncated gzipped IDX sources ---------------------------------------------

def truncated_gz_idx(tmp_path, keep_fraction=0.6):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (40, 6, 6))
    write_idx(src, "train", images, list(range(10)) * 4, gz=True)
    write_idx(src, "t10k", rng.integers(0, 256, (3, 6, 6)), [0, 1, 2], gz=True)
    path = src / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])
    return src, images


def test_truncated_gzip_idx_gives_rejected_records(tmp_path):
    src, images = truncated_gz_idx(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(build.BuildError, match=r"records were rejected \(truncated: \d+\)"):
        run_build(out, source=f"idx:{src}", rate=0.0)
    assert not (out / records.INFO_FILE).exists()
    info = run_build(out, source=f"idx:{src}", rate=0.0, max_reject_fraction=1.0,
                     overwrite=True)
    rejected = [json.loads(line) for line in open(out / "rejected.jsonl")]
    assert rejected and all(r["reason"].startswith("truncated: image") for r in rejected)
    assert all(r["origin"].startswith("train-images-idx3-ubyte.gz[") for r in rejected)
    # Every image before the cut is kept, exactly; every one after it is rejected.
    kept = read_split(out, "train")
    first_missing = min(int(r["example_id"].split("-")[1]) for r in rejected)
    assert sorted(kept) == [f"train-{i:05d}" for i in range(first_missing)]
    assert info.splits["train"].num_examples == first_missing > 0
    for i in range(first_missing):
        png = tf.io.decode_png(kept[f"train-{i:05d}"]["image"]).numpy()[..., 0]
        np.testing.assert_array_equal(png, images[i])


def test_truncated_gzip_idx_header_is_a_source_error(tmp_path):
    from cg_tf.data.sources import SourceError, make_source
    src, _ = truncated_gz_idx(tmp_path, keep_fraction=0.0)
    (src / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x28")[:15])
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz' is not an IDX file"):
        make_source(f"idx:{src}")


def test_truncated_gzip_idx_command_prints_one_error_line(tmp_path):
    src, _ = truncated_gz_idx(tmp_path)
    proc = run_main("pipelines.noisy_labels", f"--source=idx:{src}",
                    f"--output_dir={tmp_path / 'out'}", "--num_shards=1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rejected (truncated: " in last, last


# -- --overwrite deletes only what a build made --------------------------------

@pytest.mark.parametrize("name", ["beam-temp-mine", "mine.tfrecord-00000-of-00001"])
def test_overwrite_keeps_a_user_entry_named_like_a_build_file(tmp_path, name):
    run_build(tmp_path, num_shards=2)
    user = tmp_path / name
    if name.startswith("beam-temp"):
        user.mkdir()
        (user / "notes.txt").write_text("mine")
    else:
        user.write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(build.BuildError, match=rf"not part of a dataset \(e.g. '{name}'\); "
                                               "refusing to --overwrite it"):
        run_build(tmp_path, num_shards=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert (user / "notes.txt" if user.is_dir() else user).read_text() == "mine"


def test_overwrite_replaces_a_build_with_other_shards(tmp_path):
    run_build(tmp_path, num_shards=3)
    run_build(tmp_path, num_shards=2, overwrite=True, gzip=True)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [records.INFO_FILE, "rejected.jsonl", build.MANIFEST_FILE]
        + [records.shard_name(s, i, 2, "GZIP") for s in ("train", "test") for i in range(2)])
    read(tmp_path)


def test_overwrite_of_a_dataset_built_before_manifests(tmp_path):
    run_build(tmp_path, num_shards=2)
    os.remove(tmp_path / build.MANIFEST_FILE)  # What older builds left.
    run_build(tmp_path, num_shards=3, overwrite=True)
    assert len([n for n in os.listdir(tmp_path) if ".tfrecord-" in n]) == 6


@pytest.mark.parametrize("manifest", ['{"x": 1}', '{"files": '])
def test_overwrite_of_a_build_whose_manifest_is_damaged_is_refused_once(tmp_path, manifest):
    run_build(tmp_path, num_shards=2)
    (tmp_path / build.MANIFEST_FILE).write_text(manifest)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(build.BuildError) as refused:
        run_build(tmp_path, num_shards=2, overwrite=True)
    message = str(refused.value)
    assert message.count("cannot tell which files an earlier build made") == 1, message
    assert message.endswith("refusing to --overwrite it")
    assert sorted(os.listdir(tmp_path)) == before


def test_a_build_refuses_a_directory_in_use(tmp_path):
    """Two builds into one directory: the second refuses, naming the first, and
    leaves the directory as it was."""
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def first():
        with lock.hold(str(out), "dataset build"):
            held.set()
            release.wait()

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    try:
        with pytest.raises(lock.Busy, match="is in use: .*dataset build"):
            run_build(out)
        assert os.listdir(out) == [lock.LOCK_FILE]
    finally:
        release.set()
        thread.join()
    run_build(out)  # Free again.


def test_a_full_disk_during_the_build_is_one_message(tmp_path, monkeypatch):
    """The shard writer fails as a full disk makes it fail: the build ends with
    the trainer's kind of message, and the directory is left incomplete."""
    import errno

    from cg_tf.data import build

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.io, "TFRecordWriter", full)
    out = tmp_path / "d"
    with pytest.raises(build.BuildError, match=rf"cannot write {re.escape(str(out))}: No space "
                                               r"left on device\. The directory is left "
                                               r"incomplete \(no dataset_info.json\)"):
        run_build(out)
    assert not (out / records.INFO_FILE).exists()


# -- what opening costs, and the full check as a command --------------------------

def read_bytes() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_opening_a_dataset_reads_its_shards_ends_only(digits_dir, tmp_path, monkeypatch):
    """A reader checks each shard's size and ends (here 1 KiB a side, with the
    digests a build would record with them), not its records: it reads a small
    part of the shards' bytes. The full check reads all of them."""
    monkeypatch.setattr(records, "ENDS_BYTES", 1024)
    info = json.loads(open(os.path.join(digits_dir, records.INFO_FILE)).read())
    for split in info["splits"].values():
        for name, shard in split["shards"].items():
            shard["ends_sha256"] = records.file_ends_sha256(os.path.join(digits_dir, name))
    copy = copy_of(digits_dir, tmp_path, splits=info["splits"])
    total = sum(os.path.getsize(copy / n) for s in info["splits"].values() for n in s["shards"])
    before = read_bytes()
    assert read(copy).steps_per_epoch > 0
    opened = read_bytes() - before
    before = read_bytes()
    full_check(copy)
    checked = read_bytes() - before
    assert opened <= 0.05 * total < total <= checked, (opened, checked, total)


def test_the_full_check_is_a_command(digits_dir, tmp_path):
    done = run_main("cg_tf.data.verify", str(digits_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("records in 6 shards verified"), done.stdout
    copy = copy_of(digits_dir, tmp_path)
    rewrite_shard(copy / SHARD, lambda recs: recs[:-1])
    done = run_main("cg_tf.data.verify", str(copy))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {copy / SHARD} holds "), \
        done.stderr[-2000:]
