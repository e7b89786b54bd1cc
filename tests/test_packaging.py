"""What a Dataflow worker gets: the sdist built from setup.py, and a pipeline
that builds and validates with Dataflow options (without network)."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

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


IMAGE = "us-docker.pkg.dev/cg-tf-test/images/cg_tf:1"


@pytest.mark.parametrize("ship", [[f"--setup_file={REPO}/setup.py"],
                                  [f"--sdk_container_image={IMAGE}"]],
                         ids=["setup_file", "container_image"])
def test_dataflow_pipeline_builds_and_validates(tmp_path, ship):
    # The two ways the README ships cg_tf to Dataflow's workers: the sdist of
    # setup.py, or the image of the Dockerfile (which holds it installed).
    options = PipelineOptions([
        "--runner=DataflowRunner", "--project=cg-tf-test", "--region=us-central1",
        "--temp_location=gs://cg-tf-test/tmp", "--staging_location=gs://cg-tf-test/staging",
        *ship, "--no_auth", "--dry_run=True",
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
    from apache_beam.portability.api import beam_runner_api_pb2
    images = [beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
              for e in result.job.proto_pipeline.components.environments.values()]
    assert (images == [IMAGE]) == ship[0].startswith("--sdk_container_image"), images


def dockerfile() -> str:
    return open(os.path.join(REPO, "Dockerfile")).read()


def test_the_dockerfile_installs_what_setup_py_pins():
    text = dockerfile()
    # Beam's SDK image of the version setup.py pins (Dataflow starts its workers from it).
    beam_pin = re.search(r'"apache-beam\[tfrecord\]==([\d.]+)\.\*"',
                         open(os.path.join(REPO, "setup.py")).read()).group(1)
    assert re.search(rf"ARG BASE=apache/beam_python3\.\d+_sdk:{re.escape(beam_pin)}\.\d+", text)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert os.path.exists(os.path.join(REPO, name)), name
    extras = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', text).group(1)
    declared = set(re.findall(r'^        "(\w+)": \[', open(os.path.join(REPO, "setup.py")).read(),
                              re.M))
    assert set(extras.split(",")) <= declared, (extras, declared)
    # What the tasks of a KFP package need in the image: the programs and their configs.
    assert "WORKDIR /opt/cg_tf" in text and "COPY pipelines pipelines" in text
    assert "COPY configs configs" in text


@pytest.mark.slow
def test_the_dockerfiles_install_runs_in_a_fresh_venv(tmp_path):
    """The Dockerfile's steps without Docker: its files copied as COPY does,
    its pip install in a fresh venv, then a program run from its WORKDIR."""
    text = dockerfile()
    work = tmp_path / "opt" / "cg_tf"
    work.mkdir(parents=True)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            src = os.path.join(REPO, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, work / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = re.search(r'pip install --no-cache-dir ("[^"]+")', text).group(1).strip('"')
    done = subprocess.run([python, "-m", "pip", "install", "-q", install], cwd=work,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([python, "-m", "pipelines.sweep", "--flagfile=configs/sweep_demo.flags",
                           "--output_dir=gs://b/s", "--kfp_package=p.yaml", "--kfp_image=x"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and (work / "p.yaml").exists(), done.stderr[-3000:]


# The layout of docs/DESIGN.md (section 10), top to bottom: a module may import from its own layer and below.
LAYERS = [("cg_tf.train", "cg_tf.train_flags", "cg_tf.demo", "cg_tf.common_flags", "cg_tf.console",
           "cg_tf.tensorboard_plugin",
           "pipelines", "tools"),
          ("cg_tf.experiments",), ("cg_tf.training",), ("cg_tf.measure",), ("cg_tf.robust",),
          ("cg_tf.data",), ("cg_tf.storage", "cg_tf.options", "cg_tf.keras_internals", "cg_tf.provenance")]


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
