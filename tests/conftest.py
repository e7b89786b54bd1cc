"""Shared fixtures. Splits the CPU into four logical devices before TensorFlow
initializes, so MirroredStrategy tests run with two or four real replicas."""

import contextlib
import glob
import gzip
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(4)])

from cg_tf.data import build  # noqa: E402
from cg_tf.data.noise import NoiseSpec  # noqa: E402
from cg_tf.data.sources import make_source  # noqa: E402
from cg_tf.robust.reference import trimmed as np_trimmed  # noqa: E402, F401
from cg_tf.robust.reference import winsorized as np_winsorized  # noqa: E402, F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def run_build(output_dir, source="digits", mode="uniform", rate=0.5, seed=0, num_shards=3,
              beam_args=(), **kwargs):
    """Builds a dataset in-process with the named FnApiRunner."""
    config = build.BuildConfig(output_dir=str(output_dir), noise=NoiseSpec(mode, rate, seed),
                               num_shards=num_shards, **kwargs)
    options = build.beam_options(["--runner=FnApiRunner", *beam_args])
    return build.build_dataset(make_source(source), config, options)


@contextlib.contextmanager
def parsed_flags(*argv):
    """absl's flags parsed from `argv` (program name first) inside the block,
    and back to their defaults after it."""
    from absl import flags
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(list(argv))
        yield
    finally:
        flags.FLAGS.unparse_flags()


def run_main(module, *args, timeout=600, prefix=()):
    """Runs `python -m module args` from the repository, after the command
    `prefix` (which runs it); returns the CompletedProcess."""
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def file_size_limit(limit: int) -> tuple[str, ...]:
    """The command prefix that runs a child whose files may not grow past
    `limit` bytes (ulimit -f): a write past it fails as "File too large" (Python
    ignores the SIGXFSZ the kernel sends first). The child writes no bytecode,
    which the limit would cut short and leave for later imports."""
    if not shutil.which("prlimit"):
        pytest.skip("no prlimit (util-linux) to limit a child's file size")
    return ("prlimit", f"--fsize={limit}", "--", "env", "PYTHONDONTWRITEBYTECODE=1")


# The capabilities that let root write and read where a file's mode forbids it.
_DAC = "-dac_override,-dac_read_search"


@contextlib.contextmanager
def no_write_permission(path):
    """A directory at `path` (mode 0o555) that a child cannot write to, and the
    command prefix to run that child with: for root, whom modes do not stop,
    without the capabilities that override them. Skips the test where this
    cannot be arranged (no setpriv, or a child still writes there)."""
    path.mkdir()
    path.chmod(0o555)
    prefix = () if os.geteuid() else ("setpriv", f"--inh-caps={_DAC}", f"--bounding-set={_DAC}",
                                      "--")
    try:
        try:
            probe = subprocess.run([*prefix, "touch", str(path / "probe")], capture_output=True)
        except FileNotFoundError:
            pytest.skip("no setpriv to run a child without root's file-mode override")
        if probe.returncode == 0:
            pytest.skip(f"a child can still write to a mode-0o555 folder here ({path})")
        yield path, prefix
    finally:
        path.chmod(0o755)


def checkpointed(run_dir, step: int) -> bool:
    """Whether the run under `run_dir` has saved a checkpoint at `step` or later.
    Polls for a checkpoint ask this, not for one file: the trainer keeps only the
    newest two, so a fast run deletes `ckpt-<step>` within milliseconds."""
    names = glob.glob(os.path.join(str(run_dir), "checkpoints", "ckpt-*.index"))
    return any(int(os.path.basename(n)[len("ckpt-"):-len(".index")]) >= step for n in names)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Noisy digits (uniform noise, rate 0.5, seed 0), built once per test session."""
    out = tmp_path_factory.mktemp("digits")
    run_build(out)
    return str(out)


def read_split(data_dir, split):
    """{example_id: record features as numpy} for every record of a split."""
    from cg_tf.data import records
    info = records.load_info(str(data_dir))
    ds = tf.data.TFRecordDataset(info.shard_paths(str(data_dir), split),
                                 compression_type=info.compression or "")
    out = {}
    for raw in ds:
        ex = {k: v.numpy() for k, v in records.parse_example(raw).items()}
        eid = ex.pop("example_id").decode()
        assert eid not in out, f"duplicate id {eid} in the output"
        out[eid] = ex
    return out


def decode_png(data):
    return tf.io.decode_image(data, expand_animations=False).numpy()


_MIRRORED = {}


def replicas(n: int) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the first n logical CPUs for the whole session:
    strategies created later in one process over the same devices reuse
    collective instance keys and collide with the earlier ones' state. Each
    size gets collective group keys of its own (TensorFlow's test hook
    `_collective_key_base`), or the 2- and 4-replica groups would share key 1."""
    if n not in _MIRRORED:
        cls = tf.distribute.MirroredStrategy
        base, cls._collective_key_base = cls._collective_key_base, 1000 * n
        try:
            _MIRRORED[n] = cls([f"/cpu:{i}" for i in range(n)])
        finally:
            cls._collective_key_base = base
    return _MIRRORED[n]


def two_replicas() -> tf.distribute.MirroredStrategy:
    return replicas(2)


def write_idx(directory, prefix, images, labels, truncate_images=0, gz=False):
    """Writes MNIST-style IDX files <prefix>-{images-idx3,labels-idx1}-ubyte[.gz],
    the images file cut short by `truncate_images` bytes."""
    n, h, w = images.shape
    img = (np.array([0x803, n, h, w], ">u4").tobytes() + images.astype(np.uint8).tobytes())
    lab = np.array([0x801, len(labels)], ">u4").tobytes() + np.asarray(labels, np.uint8).tobytes()
    img = img[:len(img) - truncate_images]
    for name, data in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        opener = gzip.open if gz else open
        with opener(os.path.join(directory, name + (".gz" if gz else "")), "wb") as f:
            f.write(data)


def jpeg(rng, h, w, mode="RGB"):
    """A random h x w JPEG image (bytes) in PIL mode `mode`."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(
        buf, format="JPEG")
    return buf.getvalue()


def make_aggregator(name: str, c: int = 2, k: int = 3, layers: str = "all"):
    """The registered aggregator `name`, with c (or k groups) where it takes one,
    and a layer filter."""
    from cg_tf.robust import aggregators
    cls = aggregators.REGISTRY[name]
    return cls(**({cls.parameter: {"c": c, "k": k}[cls.parameter]} if cls.parameter else {}),
               **({"layers": layers} if layers != "all" else {}))


def noise_matrix(pairs: Iterable[tuple[int, int]], num_classes: int) -> np.ndarray:
    """Counts[true_label, training_label] over (true, training) label pairs."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true, noisy in pairs:
        m[true, noisy] += 1
    return m


def expected_corrupt_fraction(spec, num_classes: int,
                              class_counts: Mapping[int, int] | None = None) -> float:
    """The expected fraction of training examples whose label changes."""
    if spec.mode == "uniform":
        return spec.rate * (num_classes - 1) / num_classes
    if spec.mode == "uniform_other":
        return spec.rate
    if class_counts is None:
        raise ValueError("permute needs the class counts")
    p = np.array(list(class_counts.values()), dtype=np.float64)
    p /= p.sum()
    return spec.rate * (1.0 - float(np.sum(p * p)))


def plugin_client(logdir, plugin_class=None):
    """A werkzeug client of TensorBoard's app serving only one plugin (by
    default the Memorization plugin) over the event files under `logdir`."""
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from werkzeug import test as werkzeug_test

    from cg_tf.tensorboard_plugin.plugin import MemorizationPlugin
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = (plugin_class or MemorizationPlugin)(base_plugin.TBContext(
        data_provider=provider, logdir=str(logdir), multiplexer=multiplexer))
    return werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
    """A run with --deterministic turns TensorFlow's op determinism on for the
    whole process, and Keras then silently trains without XLA: each test
    leaves it as it found it (TensorFlow's switch off is private)."""
    yield
    from tensorflow.python.framework import config as tf_config
    tf_config.disable_op_determinism()
