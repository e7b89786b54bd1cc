"""What a Dataflow worker gets: the sdist built from setup.py, and a pipeline
that builds and validates with Dataflow options (without network)."""

import os
import subprocess
import sys
import tarfile

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from conftest import REPO

from cg_tf.data.beam.noisy_labels import BuildNoisyDataset
from cg_tf.data.noise import NoiseSpec
from cg_tf.data.sources import make_source


def test_sdist_holds_every_package(tmp_path):
    # This is the command Dataflow runs for --setup_file.
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (sdist,) = tmp_path.glob("cg_tf-*.tar.gz")
    tar = tarfile.open(sdist)
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for module in ("cg_tf/__init__.py", "cg_tf/data/records.py", "cg_tf/data/noise.py",
                   "cg_tf/data/hashing.py", "cg_tf/data/images.py", "cg_tf/data/build.py",
                   "cg_tf/data/beam/noisy_labels.py", "cg_tf/data/sources/idx.py",
                   "cg_tf/data/sources/imagefolder.py", "cg_tf/storage/files.py", "setup.py"):
        assert module in names, module
    # Workers install only cg_tf: nothing under a generic name such as tools or pipelines.
    (top_level,) = [n for n in tar.getnames() if n.endswith("egg-info/top_level.txt")]
    assert tar.extractfile(top_level).read().decode().split() == ["cg_tf"]


def test_dataflow_pipeline_builds_and_validates(tmp_path):
    options = PipelineOptions([
        "--runner=DataflowRunner", "--project=cg-tf-test", "--region=us-central1",
        "--temp_location=gs://cg-tf-test/tmp", "--staging_location=gs://cg-tf-test/staging",
        f"--setup_file={REPO}/setup.py", "--no_auth", "--dry_run=True",
        "--sdk_location=container", "--job_name=cg-tf-noisy-labels"])
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | BuildNoisyDataset(make_source("digits"), "gs://cg-tf-test/out",
                                     NoiseSpec("permute", 0.5), num_shards=4)
    result = pipeline.run()  # A dry run: translated and validated, not submitted.
    result.wait_until_finish()
    job = result.job.proto
    assert job.name == "cg-tf-noisy-labels"
    transforms = {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}
    for name in ("Read", "Validate", "WriteShards", "Permute", "WriteStats", "WriteRejected"):
        assert any(name in t for t in transforms), name


# The layout of docs/DESIGN.md (section 10), top to bottom: a module may import from its own layer and below.
LAYERS = [("cg_tf.train", "cg_tf.train_flags", "cg_tf.demo", "cg_tf.common_flags", "cg_tf.console",
           "cg_tf.tensorboard_plugin",
           "pipelines", "tools"),
          ("cg_tf.experiments",), ("cg_tf.training",), ("cg_tf.measure",), ("cg_tf.robust",),
          ("cg_tf.data",), ("cg_tf.storage", "cg_tf.options", "cg_tf.keras_internals")]


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def imported_modules(path: str) -> set[str]:
    """The project modules a file imports (anywhere in it, functions included)."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in ("cg_tf", "pipelines", "tools")}


def test_every_import_points_down():
    """Each module of the package imports only from its layer or those below."""
    wrong = []
    for folder in ("cg_tf", "pipelines", "tools"):
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            for name in names:
                if not name.endswith(".py") or name == "__init__.py" and root.endswith("cg_tf"):
                    continue
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                module = module.removesuffix(".__init__")
                own = layer_of(module)
                assert own is not None, f"{module} is in no layer of docs/DESIGN.md's layout"
                for target in imported_modules(path):
                    if layer_of(target) is not None and layer_of(target) < own:
                        wrong.append(f"{module} imports {target}")
    assert not wrong, wrong
