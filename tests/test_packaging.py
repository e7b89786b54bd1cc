"""What an installation holds: the sdist a Dataflow worker gets from setup.py,
a pipeline that builds and validates with Dataflow options (without network),
and a wheel installed outside the checkout that runs every program the README
names."""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from conftest import REPO

from cg_tf.data.beam.noisy_dataset import BuildNoisyDataset
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
                   "cg_tf/data/beam/noisy_dataset.py", "cg_tf/data/sources/idx.py",
                   "cg_tf/data/sources/imagefolder.py", "cg_tf/storage/files.py", "setup.py"):
        assert module in names, module
    # The package and the programs beside it (README: every command runs installed).
    for module in ("pipelines/sweep.py", "pipelines/shared_flags.py", "tools/plot.py"):
        assert module in names, module
    (top_level,) = [n for n in tar.getnames() if n.endswith("egg-info/top_level.txt")]
    assert tar.extractfile(top_level).read().decode().split() == ["cg_tf", "pipelines", "tools"]


def readme_programs() -> list[str]:
    """The programs README.md names: its `python -m` commands of the project's
    modules, and the pipelines and tools it names in code spans."""
    text = open(os.path.join(REPO, "README.md")).read()
    names = set(re.findall(r"python -m ((?:cg_tf|pipelines|tools)(?:\.\w+)+)", text))
    names |= set(re.findall(r"`(?:python -m )?((?:pipelines|tools)\.\w+)", text))
    return sorted(names)


def setup_packages() -> list[str]:
    """The packages setup.py installs: its find_packages(include=PACKAGES)."""
    import ast
    import setuptools
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    (include,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and [t.id for t in n.targets] == ["PACKAGES"]]
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
               and ast.unparse(n.func) == "setuptools.setup"]
    (packages,) = [k.value for k in call.keywords if k.arg == "packages"]
    assert ast.unparse(packages) == "setuptools.find_packages(include=PACKAGES)"
    return setuptools.find_packages(where=REPO, include=include)


def test_every_readme_program_is_in_an_installed_package():
    """The quick half of the wheel test below: setup.py installs pipelines and
    tools beside cg_tf, and the module of every program the README names."""
    programs = readme_programs()
    assert {"cg_tf.demo", "cg_tf.train", "pipelines.noisy_labels", "pipelines.sweep",
            "pipelines.easy_hard", "tools.plot"} <= set(programs), programs
    packages = setup_packages()
    assert {"cg_tf", "pipelines", "tools"} <= set(packages), packages
    for module in programs:
        package, name = module.rsplit(".", 1)
        assert package in packages, module
        assert os.path.isfile(os.path.join(REPO, *package.split("."), name + ".py")), module
    # No two files of one name in different roles (a program and a library module).
    seen = {}
    for package in packages:
        folder = os.path.join(REPO, *package.split("."))
        for name in os.listdir(folder):
            if name.endswith(".py") and name != "__init__.py":
                seen.setdefault(name, []).append(package)
    assert not {n: p for n, p in seen.items() if len(p) > 1}


# What the wheel is built from: the files setup.py packages (a copy, so that the
# build leaves nothing in the checkout).
WHEEL_SOURCES = ("setup.py", "README.md", "cg_tf", "pipelines", "tools")


@pytest.mark.slow
def test_an_installed_wheel_runs_every_readme_program(tmp_path):
    """A wheel of the repository in a fresh virtual environment (which sees this
    one's site-packages for TensorFlow and the rest, not the checkout): every
    program the README names answers --help from a directory outside the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, source / name)
    dist = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(dist), "."], cwd=source,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = dist.glob("cg_tf-*.whl")
    assert {"cg_tf", "pipelines", "tools"} <= {
        n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # This environment's site-packages as a plain path: its own .pth files (an
    # editable install's path to the checkout among them) are not read.
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                           "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    origins = subprocess.run(
        [python, "-c", "import importlib.util as u; "
         "print(*(u.find_spec(m).origin for m in ('cg_tf', 'pipelines', 'tools')))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(o.startswith(purelib) for o in origins), origins
    for module in readme_programs():
        done = subprocess.run([python, "-m", module, "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (module, done.stderr[-3000:])
        # Its docstring's usage line and absl's flags, from the installed files.
        assert f"python -m {module}" in done.stdout, (module, done.stdout[:2000])
        assert "--helpfull" in done.stdout and purelib in done.stdout, module
        assert REPO not in done.stdout, module


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
LAYERS = [("cg_tf.train", "cg_tf.train_flags", "cg_tf.train_defaults", "cg_tf.demo", "cg_tf.common_flags", "cg_tf.console",
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


def test_the_private_apis_were_checked_against_the_pinned_versions():
    """cg_tf.keras_internals names the version each private API was checked
    against: the installed ones and setup.py's pins are of the same minor
    version (an upgrade re-checks the shim first)."""
    import importlib
    from cg_tf import keras_internals
    setup = open(os.path.join(REPO, "setup.py")).read()
    pins = {"keras": "keras", "tensorflow": "tensorflow-cpu",
            "apache_beam": r"apache-beam\[tfrecord\]"}
    for module, checked in keras_internals.CHECKED.items():
        minor = ".".join(checked.split(".")[:2])
        installed = importlib.import_module(module).__version__
        assert installed.split(".")[:2] == minor.split("."), (module, installed, checked)
        assert re.search(rf'"{pins[module]}=={re.escape(minor)}\.\*"', setup), module


def test_the_shims_newer_entries():
    """What tests/test_layer_rules.py, test_trainer.py and test_pipeline.py do
    not run yet: call_has_training_arg, and the parser of Beam's options."""
    import keras
    from cg_tf import keras_internals
    assert keras_internals.call_has_training_arg(keras.layers.Dropout(0.5))
    assert keras_internals.call_has_training_arg(keras.layers.BatchNormalization())
    assert not keras_internals.call_has_training_arg(keras.layers.Flatten())
    parser = keras_internals.beam_options_parser()
    known, unknown = parser.parse_known_args(["--runner=DataflowRunner", "--region=r",
                                              "--direct_num_workers=2", "--noise_rat=0.1"])
    assert (known.runner, known.region, known.direct_num_workers) == ("DataflowRunner", "r", 2)
    assert unknown == ["--noise_rat=0.1"]


SHIM = "cg_tf/keras_internals.py"
# Private uses outside the shim, by file: what stays there and why.
OUTSIDE_THE_SHIM = {
    # An override of keras.Model's hook (a method of the subclass itself).
    "cg_tf/training/robust_model.py": {"_maybe_symbolic_build"},
    # To become keras_internals.call_has_training_arg.
    "cg_tf/robust/layer_rules.py": {"_call_has_training_arg"},
}
PRIVATE_MODULES = ("keras.src", "tensorflow.python", "apache_beam.internal")


def private_uses(path: str) -> set[str]:
    """The private names a file reaches for: `x._name` other than on self,
    getattr/hasattr/setattr of a "_name", and imports of private modules."""
    import io
    import tokenize
    found = set()
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(open(path).read()).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    for i, t in enumerate(tokens):
        if (t.type == tokenize.NAME and t.string.startswith("_") and not t.string.startswith("__")
                and i >= 2 and tokens[i - 1].string == "."
                and tokens[i - 2].string != "self"):
            found.add(t.string)
        if (t.type == tokenize.STRING and re.fullmatch(r"[\'\"]_[a-z]\w*[\'\"]", t.string)
                and i >= 4 and tokens[i - 4].string in ("getattr", "hasattr", "setattr")):
            found.add(t.string.strip("\'\""))
        if t.string in ("import", "from") and i + 1 < len(tokens):
            name = "".join(x.string for x in tokens[i + 1:i + 4])
            found.update(m for m in PRIVATE_MODULES if name.startswith(m))
    return found


def test_private_apis_are_called_only_in_the_shim():
    """Every private Keras, TensorFlow and Beam call is in cg_tf/keras_internals.py
    (with the version it was checked against), but the ones OUTSIDE_THE_SHIM lists."""
    found = {}
    for folder in ("cg_tf", "pipelines", "tools"):
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, REPO)
                if name.endswith(".py") and relative != SHIM:
                    uses = private_uses(path) - OUTSIDE_THE_SHIM.get(relative, set())
                    if uses:
                        found[relative] = uses
    assert not found, found
    assert private_uses(os.path.join(REPO, SHIM)) >= {
        "_functional", "_in_multi_worker_mode", "_add_argparse_args", "_call_has_training_arg",
        "keras.src"}


def test_no_private_api_is_used_outside_the_shim():
    """Outside cg_tf/keras_internals.py, an `obj._name` is one of the project's
    own names (defined or assigned somewhere in it) or the one override the
    shim's docstring lists; a library's private attribute read anywhere else
    fails here, naming the file and line."""
    import ast
    sources = [p for d in ("cg_tf", "pipelines", "tools")
               for p in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)]
    trees = {p: ast.parse(open(p).read()) for p in sources}
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.alias):
                own.add((node.asname or node.name).split(".")[-1])
    listed = {"_maybe_symbolic_build"}  # RobustModel's override, in the shim's docstring
    found = [f"{os.path.relpath(p, REPO)}:{node.lineno} ._{node.attr[1:]}"
             for p, tree in trees.items() if not p.endswith("keras_internals.py")
             for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr.startswith("_")
             and not node.attr.startswith("__") and node.attr not in own | listed]
    found += [f"{os.path.relpath(p, REPO)}:{node.lineno} getattr(..., {node.args[1].value!r})"
              for p, tree in trees.items() if not p.endswith("keras_internals.py")
              for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr"
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_")
              and not str(node.args[1].value).startswith("__")
              and node.args[1].value not in own]
    assert not found, found


def test_every_program_loads_cg_tf_before_tensorflow():
    """cg_tf.console silences TensorFlow's loading lines only if it comes
    first: a program (a module run as __main__) that imports tensorflow at
    module level before any cg_tf or pipelines module printed oneDNN's and
    the CPU guard's lines (tools.plot and tools.publish_runs did)."""
    import ast
    wrong = []
    for path in sorted(glob.glob(os.path.join(REPO, "tools", "*.py"))
                       + glob.glob(os.path.join(REPO, "pipelines", "*.py"))
                       + glob.glob(os.path.join(REPO, "cg_tf", "*.py"))):
        text = open(path).read()
        if '__name__ == "__main__"' not in text:
            continue
        for node in ast.parse(text).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("cg_tf", "pipelines") for n in names):
                break
            if any(n.split(".")[0] in ("tensorflow", "keras") for n in names):
                wrong.append(os.path.relpath(path, REPO))
                break
    assert not wrong, wrong
