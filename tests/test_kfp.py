"""The sweep and easy/hard as Kubeflow Pipelines packages: what the package
holds, and a tiny digits sweep run from the package by KFP's local runner
giving the built-in runner's summary.csv."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, no_write_permission, run_main

from cg_tf.experiments import kfp_package

TINY = ["--source=digits", "--noise_rates=0.5", "--aggregators=mean,winsorized:2",
        "--seeds=0", "--model=fc", "--fc_widths=32", "--batch_size=50", "--epochs=3",
        "--learning_rate=0.5", "--eval_sample_size=200", "--probe_size=0", "--deterministic",
        "--num_shards=2"]


def program(name, *args, cwd=REPO):
    done = subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tasks_of(path):
    with open(path) as f:
        spec = yaml.safe_load(f)
    tasks = spec["root"]["dag"]["tasks"]
    by_name = {t["taskInfo"]["name"]: t for t in tasks.values()}
    executors = spec["deploymentSpec"]["executors"]
    return spec, by_name, tasks, executors


DEMO_ARGS = ["--aggregators=mean,winsorized:1,winsorized:4", "--batch_size=25", "--epochs=30",
             "--eval_sample_size=1000", "--fc_widths=256", "--learning_rate=0.5",
             "--model=fc", "--momentum=0.0", "--noise_rates=0.5", "--probe_size=25",
             "--seeds=0", "--source=digits"]


def test_the_sweep_package_holds_a_task_per_stage_then_the_report(tmp_path):
    path = tmp_path / "sweep.yaml"
    out = program("sweep", "--flagfile=configs/sweep_demo.flags", "--output_dir=gs://b/sweep",
                  f"--kfp_package={path}", "--kfp_image=registry/cg_tf:1",
                  "--kfp_accelerator_type=NVIDIA_L4", "--kfp_accelerator_count=2",
                  "--kfp_cpu=8", "--kfp_memory=32G")
    assert "5 tasks" in out.stdout
    spec, by_name, tasks, executors = tasks_of(path)
    assert sorted(by_name) == ["data/noise_0.5", "report", "runs/mean_noise0.5_seed0",
                               "runs/winsorized_c1_noise0.5_seed0",
                               "runs/winsorized_c4_noise0.5_seed0"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["output_dir"]["defaultValue"] == "gs://b/sweep"
    assert params["workdir"]["defaultValue"] == "/opt/cg_tf"
    task_of = {key: t["taskInfo"]["name"] for key, t in tasks.items()}
    for name, task in by_name.items():
        inputs = task["inputs"]["parameters"]
        # The flagfile's flags by value: a task needs no file of this machine.
        assert inputs["args"]["runtimeValue"]["constant"] == DEMO_ARGS
        assert inputs["only"]["runtimeValue"]["constant"] == ("" if name == "report" else name)
        after = {task_of[k] for k in task.get("dependentTasks", [])}
        want = ({n for n in by_name if n != "report"} if name == "report"
                else {"data/noise_0.5"} if name.startswith("runs/") else set())
        assert after == want, name
        container = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]
        container = container["container"]
        assert container["image"] == "registry/cg_tf:1"
        resources = container.get("resources", {})
        if name.startswith("runs/"):
            assert resources["accelerator"]["resourceType"] == "NVIDIA_L4"
            assert resources["accelerator"]["resourceCount"] == "2"
            assert resources["cpuLimit"] == 8.0 and resources["memoryLimit"] == 32.0
        else:
            assert "accelerator" not in resources


def test_the_easy_hard_package_orders_its_stages(tmp_path):
    path = tmp_path / "easy_hard.yaml"
    program("easy_hard", "--flagfile=configs/easy_hard_demo.flags", "--output_dir=gs://b/eh",
            f"--kfp_package={path}", "--kfp_image=img")
    _, by_name, tasks, _ = tasks_of(path)
    task_of = {key: t["taskInfo"]["name"] for key, t in tasks.items()}
    after = {n: {task_of[k] for k in t.get("dependentTasks", [])} for n, t in by_name.items()}
    assert after["first_training"] == {"data/clean"}
    assert after["split"] == {"data/clean", "first_training"}
    assert after["cross_eval"] >= {"runs/easy", "runs/hard"}
    assert after["report"] == set(by_name) - {"report"}


@pytest.mark.parametrize("args,message", [
    ([], "--kfp_package needs --kfp_image"),
    (["--kfp_accelerator_count=0"], "--kfp_accelerator_count must be positive"),
    (["--kfp_cpu=-1"], "--kfp_cpu must be a positive number of CPUs (8, 0.5, 500m), got '-1'"),
    (["--kfp_cpu=0"], "--kfp_cpu must be a positive number of CPUs"),
    (["--kfp_memory=1xyz"], "--kfp_memory must be a positive size (32G, 512Mi), got '1xyz'"),
    (["--kfp_memory=0"], "--kfp_memory must be a positive size"),
    (["--output_dir=runs/x"], "--output_dir=runs/x is relative: a package's tasks run in "
                              "their own containers"),
    (["--kfp_package=/no/such/folder/p.yaml"], "--kfp_package=/no/such/folder/p.yaml: its "
                                               "folder /no/such/folder does not exist"),
])
def test_bad_package_flags_fail_before_writing(tmp_path, args, message):
    image = [] if not args else ["--kfp_image=img"]
    done = subprocess.run([sys.executable, "-m", "pipelines.sweep",
                           "--flagfile=configs/sweep_demo.flags", "--output_dir=gs://b/s",
                           f"--kfp_package={tmp_path / 'p.yaml'}", *image, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"error: {message}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "p.yaml").exists()


def test_a_package_in_a_folder_it_cannot_write_fails_in_one_line(tmp_path):
    with no_write_permission(tmp_path / "ro") as (folder, prefix):
        package = folder / "p.yaml"
        done = run_main("pipelines.sweep", "--flagfile=configs/sweep_demo.flags",
                        "--output_dir=gs://b/s", f"--kfp_package={package}", "--kfp_image=img",
                        prefix=prefix, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: --kfp_package={package}: cannot write it: Permission denied")
        assert not package.exists()


def test_only_the_packages_own_file_is_worded_as_a_failure_to_write_it(tmp_path):
    """An error about another file (one KFP reads, say) keeps its own traceback."""
    import errno

    from pipelines.shared_flags import package_refused
    package = tmp_path / "p.yaml"
    mine = OSError(errno.EACCES, "Permission denied", str(package))
    assert str(package_refused(mine, str(package))) == (
        f"--kfp_package={package}: cannot write it: Permission denied")
    other = OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "kfp_config.ini"))
    assert package_refused(other, str(package)) is None
    assert package_refused(OSError("no file named"), str(package)) is None


def test_a_flagfile_of_this_machine_is_not_baked_into_the_tasks(tmp_path):
    """The package's own flags and the flagfile's path stay out of the tasks,
    whether given on the command line or in a (local) flagfile."""
    local = tmp_path / "mine.flags"
    local.write_text("--flagfile=configs/sweep_demo.flags\n--kfp_image=registry/cg_tf:1\n"
                     f"--kfp_package={tmp_path / 'p.yaml'}\n--seeds=3\n")
    program("sweep", f"--flagfile={local}", "--output_dir=gs://b/sweep", "--runner=DirectRunner")
    _, by_name, _, _ = tasks_of(tmp_path / "p.yaml")
    args = by_name["runs/mean_noise0.5_seed3"]["inputs"]["parameters"]["args"]
    assert args["runtimeValue"]["constant"] == [
        *(a if a != "--seeds=0" else "--seeds=3" for a in DEMO_ARGS), "--runner=DirectRunner"]


def summary_rows(output_dir):
    with open(os.path.join(output_dir, "summary.csv")) as f:
        return {r["run"]: {k: v for k, v in r.items() if k != "wall_seconds"}
                for r in csv.DictReader(f)}


@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner",
                            "ignore:You may be attemping to run a task")  # KFP's local runner
def test_a_package_run_by_kfps_local_runner_gives_the_built_in_runners_summary(tmp_path):
    from kfp import components, local
    builtin, packaged = tmp_path / "builtin", tmp_path / "packaged"
    program("sweep", *TINY, f"--output_dir={builtin}")
    path = tmp_path / "tiny.yaml"
    program("sweep", *TINY, f"--output_dir={packaged}", f"--kfp_package={path}",
            "--kfp_image=unused-by-the-local-runner")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    components.load_component_from_file(str(path))(output_dir=str(packaged), workdir=REPO)
    want, got = summary_rows(builtin), summary_rows(packaged)
    assert sorted(got) == ["mean_noise0.5_seed0", "winsorized_c2_noise0.5_seed0"]
    assert got == want
    assert (packaged / "figure.png").exists() and (packaged / "runs").is_dir()
