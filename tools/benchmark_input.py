"""What reading the training batches costs each worker of a multi-worker run.

  python -m tools.benchmark_input --data_dir=DATA [--workers=2] [--batch_size=128]
      [--steps=200] [--streamed] [--image_size=224,224] [--augment=flip_crop]

Starts --workers processes at once, as many workers on one machine; each reads
its slice of --steps global batches the way `cg_tf.data.reader.distribute`
gives it, two ways in turn: `whole` (every worker reads and decodes the whole
global batch and keeps its slice, the input before per-worker reading) and
`part` (each reads and decodes only its slice). Prints each way's wall time and
examples decoded per worker. --streamed reads the split from its files
(decoding each example as it comes, as for splits too large for memory);
otherwise a split that fits in memory is decoded once and sliced by index.
--image_size and --augment are the trainer's (an image folder's records need
--image_size). Each worker also reports what opening the dataset cost it
(seconds, and bytes read against the records' bytes) and its CPU seconds,
hence the examples a CPU core decodes (and augments) a second.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from cg_tf import common_flags

_DATA = flags.DEFINE_string("data_dir", None, "Dataset made by pipelines.noisy_labels.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes reading at once.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Global batches each worker reads.")
_STREAMED = flags.DEFINE_bool("streamed", False, "Read the split from its files.")
_IMAGE_SIZE = flags.DEFINE_list("image_size", None, "HEIGHT,WIDTH to resize images to.")
_AUGMENT = flags.DEFINE_string("augment", "none", "The trainer's --augment.")
_ONE = flags.DEFINE_string("one", None, "Internal: WAY,WORKER to read in this process.")
WAYS = ("whole", "part")


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux's rchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def records_bytes(info) -> int:
    return sum(os.path.getsize(os.path.join(_DATA.value, name))
               for split in info.splits.values() for name in split.shards)


def read(way: str, worker: int) -> dict:
    """Reads one worker's slices of the global batches: the open's seconds and
    bytes, then the reading's seconds, CPU seconds and examples."""
    from cg_tf.data.reader import InputConfig, InputOptions, Reader
    size = tuple(int(x) for x in _IMAGE_SIZE.value) if _IMAGE_SIZE.value else None
    try:
        options = InputOptions(image_size=size, augment=_AUGMENT.value)
    except ValueError as e:  # worded by field: named here as the flag
        raise app.UsageError(common_flags.as_flags(str(e), InputOptions)) from None
    began, before = time.monotonic(), bytes_read()
    reader = Reader(InputConfig(_DATA.value, _BATCH.value, options=options,
                                cache_max_examples=0 if _STREAMED.value else 200_000))
    opened = {"open_seconds": time.monotonic() - began, "open_bytes": bytes_read() - before,
              "records_bytes": records_bytes(reader.info)}
    size = _BATCH.value // _WORKERS.value
    start = worker * size
    if way == "whole":
        ds = reader.train_dataset(0, _STEPS.value).map(
            lambda b: {k: v[start:start + size] for k, v in b.items()})
    else:
        ds = reader.train_dataset(0, _STEPS.value, part=(start, size))
    began, cpu = time.monotonic(), time.process_time()
    examples = sum(int(b["label"].shape[0]) for b in ds)
    return {"seconds": time.monotonic() - began, "cpu_seconds": time.process_time() - cpu,
            "examples": examples, **opened}


def main(_):
    if _ONE.value:
        way, worker = _ONE.value.split(",")
        print(json.dumps(read(way, int(worker))))
        return
    if not _DATA.value:
        raise app.UsageError("--data_dir is required")
    if _BATCH.value % _WORKERS.value:
        raise app.UsageError(f"--batch_size={_BATCH.value} is not divisible by --workers")
    flags_ = [f"--data_dir={_DATA.value}", f"--workers={_WORKERS.value}",
              f"--batch_size={_BATCH.value}", f"--steps={_STEPS.value}",
              f"--streamed={_STREAMED.value}", f"--augment={_AUGMENT.value}"]
    if _IMAGE_SIZE.value:
        flags_.append(f"--image_size={','.join(_IMAGE_SIZE.value)}")
    first = True
    for way in WAYS:
        began = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "tools.benchmark_input", *flags_,
                                   f"--one={way},{w}"], stdout=subprocess.PIPE, text=True)
                 for w in range(_WORKERS.value)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        wall = time.monotonic() - began
        reading = max(r["seconds"] for r in results)
        taken = sum(r["examples"] for r in results) // _WORKERS.value
        handled = _STEPS.value * (_BATCH.value if way == "whole" else
                                  _BATCH.value // _WORKERS.value)
        if first:
            r = results[0]
            print(f" open: {r['open_bytes']:,} bytes read of the records' {r['records_bytes']:,} "
                  f"({r['open_bytes'] / r['records_bytes']:.2%}) in {r['open_seconds']:.2f} s "
                  f"(worker 0)")
            first = False
        cpu = sum(r["cpu_seconds"] for r in results)
        print(f"{way:>5}: {_WORKERS.value} workers read {_STEPS.value} global batches of "
              f"{_BATCH.value} in {reading:.1f} s (slowest worker; {wall:.1f} s with start-up), "
              f"each {'decoding' if _STREAMED.value else 'gathering'} {handled:,} examples "
              f"and keeping {taken:,}; {handled * _WORKERS.value / cpu:,.0f} examples a CPU "
              f"second")


if __name__ == "__main__":
    common_flags.run(main)
