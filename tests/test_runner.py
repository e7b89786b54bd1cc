"""The component runner: caching, resuming, refusing other parameters."""

import json
import os
import subprocess
import sys

import pytest

from cg_tf.experiments import runner
from cg_tf.experiments.runner import Stage, StageError
from cg_tf.storage import lock


def toy(calls, name, params, inputs=(), resumable=False, fail=False):
    def run(directory, upstream):
        calls.append(name)
        assert set(upstream) == set(inputs)
        with open(os.path.join(directory, "out.txt"), "a") as f:
            f.write(json.dumps(params))
        if fail:
            raise RuntimeError(f"{name} failed")
        return {"value": params.get("x", 0) + sum(u["outputs"]["value"] for u in upstream.values())}
    return Stage(name, "toy", params, run, tuple(inputs), resumable, contents=("out.txt",))


def pipeline(calls, x=1, y=2, fail_b=False):
    return [toy(calls, "a", {"x": x}), toy(calls, "b", {"x": y}, ["a"], fail=fail_b),
            toy(calls, "c", {}, ["a", "b"])]


def test_runs_in_order_then_skips_what_is_complete(tmp_path):
    calls = []
    out = runner.run_stages(str(tmp_path), pipeline(calls))
    assert calls == ["a", "b", "c"] and out["c"]["outputs"]["value"] == 4
    assert out["b"]["inputs"] == {"a": out["a"]["fingerprint"]}
    again = runner.run_stages(str(tmp_path), pipeline(calls))
    assert calls == ["a", "b", "c"]  # nothing ran twice
    assert again == out


def test_other_parameters_are_refused_before_anything_runs(tmp_path):
    calls = []
    runner.run_stages(str(tmp_path), pipeline(calls))
    with pytest.raises(StageError, match=r"b was made with other parameters \(params.x: 2 -> 5\)"):
        runner.run_stages(str(tmp_path), pipeline(calls, y=5))
    assert calls == ["a", "b", "c"]
    # --overwrite rebuilds the changed stage and what reads it, not what it reads.
    out = runner.run_stages(str(tmp_path), pipeline(calls, y=5), overwrite=True)
    assert calls == ["a", "b", "c", "b", "c"] and out["c"]["outputs"]["value"] == 7
    assert (tmp_path / "b" / "out.txt").read_text() == '{"x": 5}'  # emptied first


def test_a_parameter_added_to_the_code_since_is_named(tmp_path):
    # Newer code with a new parameter (None by default) fingerprints a stage
    # differently; the refusal says which parameter, not "unknown".
    runner.run_stages(str(tmp_path), [toy([], "a", {"x": 1})])
    with pytest.raises(StageError, match=r"a was made with other parameters "
                                         r"\(params.window: \(absent\) -> None\)"):
        runner.run_stages(str(tmp_path), [toy([], "a", {"x": 1, "window": None})])


def test_an_upstream_change_reaches_downstream_fingerprints(tmp_path):
    runner.run_stages(str(tmp_path), pipeline([]))
    with pytest.raises(StageError, match="a was made with other parameters"):
        runner.run_stages(str(tmp_path), pipeline([], x=7))


def test_interrupted_stages_restart_cleanly(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="b failed"):
        runner.run_stages(str(tmp_path), pipeline(calls, fail_b=True))
    assert runner.read_manifest(str(tmp_path / "b"))["status"] == "running"
    assert runner.read_manifest(str(tmp_path / "a"))["status"] == "complete"
    runner.run_stages(str(tmp_path), pipeline(calls))
    assert calls == ["a", "b", "b", "c"]
    # Not resumable: restarted from an empty directory.
    assert (tmp_path / "b" / "out.txt").read_text() == '{"x": 2}'


def test_a_resumable_stage_continues_in_place(tmp_path):
    calls = []
    stages = [toy(calls, "train", {"x": 1}, resumable=True, fail=True)]
    with pytest.raises(RuntimeError):
        runner.run_stages(str(tmp_path), stages)
    runner.run_stages(str(tmp_path), [toy(calls, "train", {"x": 1}, resumable=True)])
    assert (tmp_path / "train" / "out.txt").read_text() == '{"x": 1}{"x": 1}'


def test_only_runs_matching_stages_whose_inputs_are_complete(tmp_path):
    calls = []
    with pytest.raises(StageError, match=r"stage 'b' needs \['a'\] complete \(and unchanged "
                                         r"since\) first"):
        runner.run_stages(str(tmp_path), pipeline(calls), only="b")
    runner.run_stages(str(tmp_path), pipeline(calls), only="a")
    runner.run_stages(str(tmp_path), pipeline(calls), only="b")
    assert calls == ["a", "b"]
    # A glob that matches no stage is refused before anything is written.
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"^--only=z\* matches none of the stages: a, b, c$"):
        runner.run_stages(str(fresh), pipeline(calls), only="z*")
    assert not fresh.exists() and calls == ["a", "b"]


def test_a_stage_changed_behind_the_runner_is_refused_naming_it(tmp_path):
    """Another command rewrote what a complete stage made (as
    pipelines.noisy_labels --overwrite rebuilds a sweep's dataset in place): the
    runner does not trust it, and --overwrite rebuilds it."""
    calls = []
    runner.run_stages(str(tmp_path), pipeline(calls))
    (tmp_path / "a" / "out.txt").write_text('{"x": 0}')
    with pytest.raises(StageError, match=rf"^{tmp_path / 'a'} changed since its stage completed "
                                         r"\(out.txt changed\); use --overwrite to rebuild it"):
        runner.run_stages(str(tmp_path), pipeline(calls))
    assert calls == ["a", "b", "c"]
    assert (tmp_path / "a" / "out.txt").read_text() == '{"x": 0}'  # left as it was
    lines = []
    runner.run_stages(str(tmp_path), pipeline(calls), overwrite=True, log=lines.append)
    # Rebuilt from its parameters it holds what it held when b and c read it,
    # so they are kept.
    assert calls == ["a", "b", "c", "a"]
    assert lines[0] == "[1/3] a: rebuilding (it changed since it completed)"
    assert (tmp_path / "a" / "out.txt").read_text() == '{"x": 1}'
    os.remove(tmp_path / "c" / "out.txt")
    with pytest.raises(StageError, match=r"c changed since its stage completed \(out.txt is gone\)"):
        runner.run_stages(str(tmp_path), pipeline(calls))


def test_what_read_a_stage_that_changed_is_refused_then_rebuilt(tmp_path):
    """A stage rebuilt with other contents than a later stage read: that stage
    is refused, naming its input, and --overwrite redoes it."""
    calls, source = [], {"labels": "noisy"}

    def make(directory, _inputs):
        calls.append("data")
        (tmp_path / "data" / "labels.txt").write_text(source["labels"])
        return {}

    def train(directory, _inputs):
        calls.append("run")
        labels = (tmp_path / "data" / "labels.txt").read_text()
        (tmp_path / "run" / "model.txt").write_text(f"trained on {labels}")
        return {}

    stages = [Stage("data", "data", {}, make, contents=("labels.txt",)),
              Stage("run", "train", {}, train, ("data",), resumable=True,
                    contents=("model.txt",))]
    runner.run_stages(str(tmp_path), stages)
    # Edited behind the runner, then rebuilt by it alone, from a source that changed:
    (tmp_path / "data" / "labels.txt").write_text("edited")
    source["labels"] = "clean"
    runner.run_stages(str(tmp_path), stages, overwrite=True, only="data")
    assert calls == ["data", "run", "data"]
    with pytest.raises(StageError, match=r"run changed since its stage completed \(its input "
                                         r"data changed since it ran\)"):
        runner.run_stages(str(tmp_path), stages)
    runner.run_stages(str(tmp_path), stages, overwrite=True)
    assert calls == ["data", "run", "data", "run"]
    assert (tmp_path / "run" / "model.txt").read_text() == "trained on clean"
    runner.run_stages(str(tmp_path), stages)  # all current again
    assert calls == ["data", "run", "data", "run"]


def test_a_changed_input_outside_only_is_not_read(tmp_path):
    """--overwrite --only=d after an input changed behind the runner: the input
    is not among the stages to run, so a new stage that reads it is refused
    rather than run on the changed contents."""
    calls = []
    runner.run_stages(str(tmp_path), pipeline(calls))
    (tmp_path / "a" / "out.txt").write_text('{"x": 0}')
    more = [*pipeline(calls), toy(calls, "d", {}, ["a"])]
    with pytest.raises(StageError, match=r"stage 'd' needs \['a'\] complete \(and unchanged "
                                         r"since\) first"):
        runner.run_stages(str(tmp_path), more, overwrite=True, only="d")
    assert calls == ["a", "b", "c"]


def test_bad_pipelines():
    with pytest.raises(StageError, match="two stages are named 'a'"):
        runner.plan("/nonexistent", [toy([], "a", {}), toy([], "a", {})])
    with pytest.raises(StageError, match=r"reads \['z'\], which no earlier stage makes"):
        runner.plan("/nonexistent", [toy([], "a", {}, ["z"])])


def test_a_folder_without_a_manifest_is_refused_and_kept(tmp_path):
    """Like pipelines.noisy_labels with a non-empty --output_dir: a folder with a
    stage's name that no stage made is the user's, even with --overwrite."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    calls = []
    for overwrite in (False, True):
        with pytest.raises(StageError, match=rf"^{tmp_path / 'b'} is not empty and has no "
                                             r"manifest.json, so no stage made it \(it holds "
                                             r"'notes.txt'\); move it away"):
            runner.run_stages(str(tmp_path), pipeline(calls), overwrite=overwrite)
    assert calls == []  # refused before anything ran
    assert os.listdir(tmp_path / "b") == ["notes.txt"]
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_a_first_manifest_cut_short_by_a_kill_is_the_runners_own(tmp_path):
    """Killed between writing a stage's first manifest and renaming it into
    place: the folder holds manifest.json.tmp alone, and the rerun starts the
    stage (a sweep killed between stages was refused here)."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json.tmp").write_text('{"status": "runn')
    calls = []
    runner.run_stages(str(tmp_path), pipeline(calls))
    assert calls == ["a", "b", "c"]
    assert runner.read_manifest(str(tmp_path / "b"))["status"] == "complete"
    assert "manifest.json.tmp" not in os.listdir(tmp_path / "b")


def test_a_stage_another_process_runs_is_refused_naming_it(tmp_path):
    from test_run_dir import write_lock
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        calls = []
        runner.run_stages(str(tmp_path), pipeline(calls, fail_b=False)[:1])
        write_lock(tmp_path / "b", pid=proc.pid, purpose="stage b")
        with pytest.raises(lock.Busy, match=rf"b is in use: stage b by pid {proc.pid} on "):
            runner.run_stages(str(tmp_path), pipeline(calls))
        assert calls == ["a"]
    finally:
        proc.kill()
        proc.wait()


def test_a_run_resumes_past_a_field_added_at_none_a_stage_does_not():
    """The trainer's record check lets newer code continue a run whose record
    lacks a field asked as None; a stage's fingerprint covers every field."""
    from cg_tf.storage import rundir
    assert rundir.mismatch({"a": 1}, {"a": 1, "new": None}) == []
    assert rundir.mismatch({"a": 1}, {"a": 1, "new": 3}) == ["new: (absent) -> 3"]
    assert rundir.mismatch({"a": 1, "old": None}, {"a": 1}) == ["old: None -> (absent)"]
    assert rundir.differences({"a": 1}, {"a": 1, "new": None}) == ["new: (absent) -> None"]


def test_before_each_can_stop_between_stages(tmp_path):
    """A stop noted while a stage ran (a signal whose exception a library
    swallowed) stops the runner before the next stage: the first is complete."""
    calls, stops = [], []

    def before_each():
        if calls:
            stops.append(len(calls))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run_stages(str(tmp_path), pipeline(calls), before_each=before_each)
    assert calls == ["a"] and stops == [1]
    assert runner.read_manifest(str(tmp_path / "a"))["status"] == "complete"
    assert not (tmp_path / "b").exists()
