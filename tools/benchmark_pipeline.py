"""Times the noisy-label Beam pipeline against a plain single-process loop that
writes the same records, in one process (so the ratio is fair on a busy machine).

  python -m tools.benchmark_pipeline --source=idx:/usr/share/datasets/fashion-mnist
"""

import json
import os
import tempfile
import time

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
import tensorflow as tf
from absl import flags

from cg_tf.data import build, noise, records
from cg_tf.data.beam import noisy_dataset
from cg_tf.data.sources import Source, make_source

_SOURCE = flags.DEFINE_string("source", "idx:/usr/share/datasets/fashion-mnist", "--source spec.")
_RATE = flags.DEFINE_float("noise_rate", 0.5, "Noise rate.")
_MODE = flags.DEFINE_enum("noise_mode", "uniform", list(noise.NOISE_MODES), "Noise mode.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Local Beam worker counts to time.")
_JSON = flags.DEFINE_string("json", None, "Also write the timings here.")


def plain_loop(source: Source, spec: noise.NoiseSpec, out: str) -> int:
    """The same validation, labels and encoding, one process, one file per split."""
    valid = [v for task in source.read_tasks() for raw in source.read(task)
             if isinstance(v := noisy_dataset.validate(raw, source.num_classes,
                                                       source.image_shape),
                           noisy_dataset.Encoded)]
    permuted = {}
    if spec.mode == "permute":
        permuted = noise.permuted_labels(spec, [(e.example_id, e.label) for e in valid
                                                if e.split == records.TRAIN_SPLIT
                                                and noise.is_selected(spec, e.example_id)])
    writers = {s: tf.io.TFRecordWriter(os.path.join(out, f"{s}.tfrecord")) for s in source.splits}
    for e in valid:
        label = e.label
        if e.split == records.TRAIN_SPLIT:
            label = (permuted.get(e.example_id, e.label) if spec.mode == "permute"
                     else noise.pointwise_label(spec, e.example_id, e.label, source.num_classes))
        writers[e.split].write(records.encode_example(e.image, label, e.label, e.example_id))
    for w in writers.values():
        w.close()
    return len(valid)


def main(_):
    source = make_source(_SOURCE.value)
    spec = noise.NoiseSpec(_MODE.value, _RATE.value, 0)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        n = plain_loop(source, spec, tmp)
        timings["plain_loop"] = time.monotonic() - start
        for workers in map(int, _WORKERS.value):
            out = os.path.join(tmp, f"beam{workers}")
            start = time.monotonic()
            build.build_dataset(source, build.BuildConfig(out, spec, num_shards=8),
                                build.beam_options([f"--direct_num_workers={workers}"]))
            timings[f"beam_{workers}_workers"] = time.monotonic() - start
    print(f"{source.spec}: {n:,} records")
    base = timings["plain_loop"]
    for name, seconds in timings.items():
        print(f"  {name:<16} {seconds:7.1f} s   {seconds / base:5.2f}x the plain loop")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"source": source.spec, "records": n, "seconds": timings}, f, indent=1)


if __name__ == "__main__":
    common_flags.run(main)
