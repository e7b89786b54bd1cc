"""Each source reader on small files in the source's real format, TFDS through
tfds.testing.mock_data, and the real Fashion-MNIST."""

import json
import os

import numpy as np
import pytest
from conftest import FASHION_MNIST, decode_png, jpeg, read_split, run_build, run_main, write_idx

from cg_tf.data import records
from cg_tf.data.reader import InputConfig, Reader
from cg_tf.data.sources import SourceError, make_source


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path, gz):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (7, 5, 4)), rng.integers(0, 256, (3, 5, 4))
    write_idx(src, "train", train, [0, 1, 2, 3, 4, 5, 6], gz=gz)
    write_idx(src, "t10k", test, [7, 8, 9], gz=gz)
    info = run_build(tmp_path / "out", source=f"idx:{src}", rate=0.0)
    assert tuple(info.image_shape) == (5, 4, 1)
    got = read_split(tmp_path / "out", "train")
    assert sorted(got) == [f"train-{i:05d}" for i in range(7)]
    for i in range(7):
        ex = got[f"train-{i:05d}"]
        assert ex["true_label"] == i
        np.testing.assert_array_equal(decode_png(ex["image"])[..., 0], train[i])
    assert [read_split(tmp_path / "out", "test")[f"test-{i:05d}"]["label"] for i in range(3)] == [7, 8, 9]


def test_idx_wrong_magic(tmp_path):
    write_idx(tmp_path, "train", np.zeros((2, 3, 3)), [0, 1])
    write_idx(tmp_path, "t10k", np.zeros((2, 3, 3)), [0, 1])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(SourceError, match="t10k-labels-idx1-ubyte' is not an IDX file"):
        make_source(f"idx:{tmp_path}")


def test_cifar10_binary(tmp_path):
    src = tmp_path / "cifar-10-batches-bin"
    src.mkdir()
    rng = np.random.default_rng(2)
    planes = {}
    for name, n in [(f"data_batch_{i}.bin", 2) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        recs = []
        for j in range(n):
            label, img = (j * 3 + len(name)) % 10, rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
            planes[(name, j)] = (label, img)
            recs.append(bytes([label]) + img.tobytes())
        (src / name).write_bytes(b"".join(recs))
    # A trailing partial record in one file is rejected, not silently dropped.
    with open(src / "data_batch_5.bin", "ab") as f:
        f.write(b"\x03" + b"\x00" * 100)
    info = run_build(tmp_path / "out", source=f"cifar10:{tmp_path}", rate=0.0,
                     max_reject_fraction=0.2)
    assert info.class_names[0] == "airplane" and tuple(info.image_shape) == (32, 32, 3)
    assert info.rejected["by_reason"] == {"truncated": 1}
    train = read_split(tmp_path / "out", "train")
    assert len(train) == 10 and len(read_split(tmp_path / "out", "test")) == 3
    label, img = planes[("data_batch_3.bin", 1)]
    ex = train["data_batch_3-00001"]
    assert ex["label"] == label
    np.testing.assert_array_equal(decode_png(ex["image"]), img.transpose(1, 2, 0))


def test_imagefolder_with_label_map(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "imagenet"
    for k, cls in enumerate(["n01", "n02", "n03"]):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            (root / "train" / cls / f"{cls}_{i}.JPEG").write_bytes(jpeg(rng, 20 + 3 * i, 30 + k))
    (root / "train" / "n02" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "train" / "n03" / "cmyk.JPEG").write_bytes(jpeg(rng, 17, 19, mode="CMYK"))
    (root / "validation").mkdir()
    for i in range(4):
        (root / "validation" / f"val_{i}.JPEG").write_bytes(jpeg(rng, 25, 25))
    (root / "validation_labels.txt").write_text(
        "val_0.JPEG n01\nval_1.JPEG,n03\nval_2.JPEG n02\nval_2.JPEG n02\nval_3.JPEG n99\n")
    out = tmp_path / "out"
    info = run_build(out, source=f"imagefolder:{root}", rate=0.0, max_reject_fraction=0.3)
    assert info.class_names == ("n01", "n02", "n03") and info.eval_split == "validation"
    assert tuple(info.image_shape) == (None, None, 3)
    assert info.rejected["by_reason"] == {"undecodable image": 1, "duplicate example_id": 1,
                                          "unknown class": 1}
    train, val = read_split(out, "train"), read_split(out, "validation")
    assert len(train) == 10 and "train/n03/cmyk.JPEG" in train
    assert {e: int(x["label"]) for e, x in val.items()} == {
        "validation/val_0.JPEG": 0, "validation/val_1.JPEG": 2, "validation/val_2.JPEG": 1}
    # Source JPEG bytes are stored as they are.
    assert train["train/n01/n01_2.JPEG"]["image"] == (root / "train/n01/n01_2.JPEG").read_bytes()
    rejected = [json.loads(line) for line in open(out / "rejected.jsonl")]
    assert {r["example_id"] for r in rejected} == {
        "train/n02/broken.JPEG", "validation/val_2.JPEG", "validation/val_3.JPEG"}
    # Variable-size images need --image_size; then they come out at that size.
    with pytest.raises(ValueError, match="image_size"):
        Reader(InputConfig(str(out), batch_size=2))
    reader = Reader.open(str(out), 2, image_size=(16, 16))
    batch = next(iter(reader.train_dataset(0, 1)))
    assert batch["image"].shape == (2, 16, 16, 3)
    assert len(list(reader.eval_subsets()["test"].unbatch())) == 3


def test_imagefolder_with_class_folders(tmp_path):
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "a.jpg").write_bytes(jpeg(rng, 8, 8))
    info = run_build(tmp_path / "out", source=f"imagefolder:{tmp_path}", rate=0.0)
    assert info.splits["validation"].num_examples == 2
    assert {e: int(x["label"]) for e, x in read_split(tmp_path / "out", "validation").items()} == {
        "val/cat/a.jpg": 0, "val/dog/a.jpg": 1}


def test_imagefolder_without_validation(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="no validation/"):
        make_source(f"imagefolder:{tmp_path}")


def test_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=12):
        info = run_build(tmp_path, source="tfds:mnist", rate=0.5, seed=1)
        assert info.num_classes == 10 and tuple(info.image_shape) == (28, 28, 1)
        train = read_split(tmp_path, "train")
    assert info.splits["train"].num_examples == 12 and info.splits["test"].num_examples == 12
    assert all(e.startswith("mnist-train.tfrecord") for e in train)
    assert all(decode_png(x["image"]).shape == (28, 28, 1) for x in train.values())


def test_tfds_unknown_name():
    with pytest.raises(SourceError, match="no TFDS dataset 'no_such_dataset_xyz'"):
        make_source("tfds:no_such_dataset_xyz")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_with_the_readme_command(tmp_path):
    out = tmp_path / "fashion_mnist"
    proc = run_main("pipelines.noisy_labels", f"--source=idx:{FASHION_MNIST}",
                    f"--output_dir={out}", "--noise_rate=0.5", "--num_shards=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = records.load_info(str(out))
    assert info.splits["train"].num_examples == 60_000
    assert info.splits["test"].num_examples == 10_000
    assert abs(info.splits["train"].num_corrupt / 60_000 - 0.45) < 0.01
    # A decoded training image equals the IDX bytes.
    import gzip
    with gzip.open(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")) as f:
        f.seek(16 + 123 * 784)
        pixels = np.frombuffer(f.read(784), np.uint8).reshape(28, 28)
    batch = Reader(InputConfig(str(out), batch_size=100)).eval_subsets()["mixed"]
    ids = [e.decode() for b in batch for e in b["example_id"].numpy()]
    assert len(ids) == 1000
    ex = read_split(out, "train")["train-00123"]
    np.testing.assert_array_equal(decode_png(ex["image"])[..., 0], pixels)
