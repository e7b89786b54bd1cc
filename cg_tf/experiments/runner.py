"""Pipeline components that cache and resume, in the manner of TFX.

A `Stage` declares its kind, its parameters (JSON) and the stages it reads,
and owns one artifact directory `<root>/<name>` with a `manifest.json`:

  {"kind", "params", "inputs": {stage: fingerprint}, "fingerprint",
   "status": "running" | "complete", "outputs", "seconds", "provenance",
   "contents": {file: sha256}, "input_contents": {stage: its contents}}

(`provenance`: the code that last ran the stage, cg_tf.provenance; not part of
the fingerprint.)

The fingerprint hashes the kind, the parameters and the inputs' fingerprints,
so it is known for every stage before anything runs. `run_stages` first checks
every stage's directory against it (a directory made with other parameters is
refused, naming what differs, unless `overwrite`), and that a complete stage
still holds what it made: the digests of its `contents` files (e.g. a dataset's
dataset_info.json, a run's config.json and summary.json), and its inputs'
contents as they were when it ran. A stage changed behind the runner (a
dataset rebuilt in place by another command) is refused, naming it, unless
`overwrite`, which rebuilds it and then every stage that read other contents
than it now holds (a stage never runs on an input that is not current). Then the stages
run in order: a complete, unchanged stage with a matching manifest is skipped;
an interrupted one ("running") is restarted, in place if it is `resumable`
(training continues from its checkpoints) and from an emptied directory
otherwise. The manifest is written atomically, and "complete" only after the
stage's work is done.

A stage runs holding its directory's lock (cg_tf.storage.lock), so two processes
never run one stage; a directory another process holds is refused, naming it.
Only what a stage made is ever deleted: a non-empty directory without a
manifest is refused up front (with or without `overwrite`), contents kept, as
pipelines.noisy_labels refuses a non-empty output directory.
"""

import dataclasses
import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Callable

import tensorflow as tf

from cg_tf import provenance
from cg_tf.storage import files, lock, rundir

MANIFEST = "manifest.json"


class StageError(ValueError):
    """A stage that cannot run as asked (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the artifact directory, relative to the pipeline's root
    kind: str
    params: dict
    run: Callable[[str, dict[str, dict]], dict]  # (artifact dir, input manifests) -> outputs
    inputs: tuple[str, ...] = ()
    resumable: bool = False
    # Files (relative to the directory) whose bytes are the stage's result: their
    # digests, recorded at completion, tell a stage changed behind the runner.
    contents: tuple[str, ...] = ()


# A stage's directory is the stage's alone once its manifest is there; before,
# only the runner's own first manifest, cut short by a kill, may be.
LAYOUT = rundir.Layout(
    owns=lambda _directory, record: rundir.EVERYTHING if record is not None
    else rundir.Names(frozenset({MANIFEST + files.TMP_SUFFIX})),
    record=MANIFEST)


def fingerprint(kind: str, params: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"kind": kind, "params": params, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(directory: str) -> dict | None:
    return files.read_json(os.path.join(directory, MANIFEST))


def write_manifest(directory: str, manifest: dict) -> None:
    files.write_json(os.path.join(directory, MANIFEST), manifest, sort_keys=True)


def digests(directory: str, paths) -> dict[str, str | None]:
    """The sha256 of each file (None for one that is gone)."""
    return {p: files.sha256(os.path.join(directory, p))
            if tf.io.gfile.exists(os.path.join(directory, p)) else None for p in paths}


def changes(directory: str, found: dict, inputs: dict[str, dict]) -> list[str]:
    """What changed since a complete stage ran: its content files, or those of
    its complete inputs (an input not built yet is compared once it is; a
    manifest without these records, from an older version, is trusted)."""
    recorded = found.get("contents") or {}
    now = digests(directory, recorded)
    out = [f"{p} {'is gone' if now[p] is None else 'changed'}" for p in recorded
           if now[p] != recorded[p]]
    ran_on = found.get("input_contents") or {}
    done = {i: m for i, m in inputs.items() if m and m.get("status") == "complete"}
    return out + [f"its input {i} changed since it ran" for i in ran_on
                  if i in done and done[i].get("contents") != ran_on[i]]


def _check_directory(directory: str, want: dict, overwrite: bool) -> dict | None:
    """Refuses a stage directory that no stage made, or one made with other
    parameters (unless `overwrite`); returns its manifest."""
    found = rundir.survey(directory, LAYOUT)
    if found.record is None and found.foreign:
        raise StageError(
            f"{directory} is not empty and has no {MANIFEST}, so no stage made it (it holds "
            f"{rundir.listing(found.foreign)}); move it away or use another --output_dir "
            "(nothing in it was changed)")
    if found.record is not None and found.record.get("fingerprint") != want["fingerprint"] \
            and not overwrite:
        keys = ("kind", "params", "inputs")
        diff = rundir.differences({k: found.record.get(k) for k in keys},
                                  {k: want[k] for k in keys})
        raise StageError(
            f"{directory} was made with other parameters ({'; '.join(diff[:5]) or 'unknown'}); "
            f"use another --output_dir, or --overwrite to rebuild it and everything after it")
    return found.record


def plan(root: str, stages: list[Stage], overwrite: bool = False) -> dict[str, dict]:
    """Each stage's expected manifest header; checks names, inputs and existing
    artifact directories (their parameters, and that a complete stage still
    holds what it made) before anything runs."""
    expected, found = {}, {}
    for stage in stages:
        if stage.name in expected:
            raise StageError(f"two stages are named {stage.name!r}")
        missing = [i for i in stage.inputs if i not in expected]
        if missing:
            raise StageError(f"stage {stage.name!r} reads {missing}, which no earlier stage makes")
        inputs = {i: expected[i]["fingerprint"] for i in stage.inputs}
        want = expected[stage.name] = {
            "kind": stage.kind, "params": stage.params, "inputs": inputs,
            "fingerprint": fingerprint(stage.kind, stage.params, inputs)}
        directory = os.path.join(root, stage.name)
        found[stage.name] = _check_directory(directory, want, overwrite)
        if _is_complete(found[stage.name], want) and not overwrite:
            changed = changes(directory, found[stage.name], {i: found[i] for i in stage.inputs})
            if changed:
                raise StageError(
                    f"{directory} changed since its stage completed ({'; '.join(changed[:3])}); "
                    "use --overwrite to rebuild it and everything after it")
    return expected


def progress(message: str) -> None:
    """Stage progress, to the terminal."""
    print(message, flush=True)


def _is_complete(found: dict | None, want: dict) -> bool:
    return bool(found) and found["fingerprint"] == want["fingerprint"] \
        and found["status"] == "complete"


def _is_current(directory: str, found: dict | None, want: dict, inputs: dict[str, dict]) -> bool:
    """Complete, with the parameters asked, and unchanged since."""
    return _is_complete(found, want) and not changes(directory, found, inputs)


def run_stages(root: str, stages: list[Stage], overwrite: bool = False, only: str | None = None,
               log: Callable[[str], None] = progress,
               before_each: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Runs what is not done yet; returns every stage's manifest.

    `only` (a glob on stage names) runs just the matching stages, whose inputs
    must be complete: e.g. one training run of a grid per machine.
    `before_each` is called before a stage runs (it may raise to stop there:
    a stop signal that a library swallowed).
    """
    if only and not any(fnmatch.fnmatch(s.name, only) for s in stages):
        raise ValueError(f"--only={only} matches none of the stages: "
                         f"{', '.join(s.name for s in stages)}")
    expected = plan(root, stages, overwrite)
    manifests, current = {}, set()  # current: complete, unchanged, as asked (or just run)
    for n, stage in enumerate(stages, 1):
        directory = os.path.join(root, stage.name)
        found = read_manifest(directory)
        inputs = {i: manifests[i] for i in stage.inputs}
        if _is_current(directory, found, expected[stage.name], inputs):
            log(f"[{n}/{len(stages)}] {stage.name}: complete, skipped")
            manifests[stage.name] = found
            current.add(stage.name)
            continue
        if only and not fnmatch.fnmatch(stage.name, only):
            manifests[stage.name] = found
            continue
        not_ready = [i for i in stage.inputs if i not in current]
        if not_ready:
            raise StageError(f"stage {stage.name!r} needs {not_ready} complete (and unchanged "
                             "since) first")
        before_each()
        with lock.hold(directory, f"stage {stage.name}") as held:
            manifests[stage.name] = _run_stage(
                stage, directory, expected[stage.name], inputs, overwrite, held,
                lambda what: log(f"[{n}/{len(stages)}] {stage.name}: {what}"))
        current.add(stage.name)
    return manifests


def _run_stage(stage: Stage, directory: str, want: dict, inputs: dict[str, dict],
               overwrite: bool, held: lock.Lock, say: Callable[[str], None]) -> dict:
    """Runs one stage whose directory this process holds; returns its manifest."""
    found = _check_directory(directory, want, overwrite)  # again: another process may have run it
    if _is_current(directory, found, want, inputs):
        say("complete, skipped")
        return found
    if found is None:
        how = "starting"
    elif found["fingerprint"] != want["fingerprint"]:
        how = "rebuilding (--overwrite)"
    elif _is_complete(found, want):
        how = "rebuilding (it changed since it completed)"
    else:
        how = "resuming" if stage.resumable else "restarting"
    if how != "resuming":
        rundir.clear(rundir.survey(directory, LAYOUT))
    say(how)
    manifest = {**want, "status": "running", "outputs": {},
                "input_contents": {i: m.get("contents") for i, m in inputs.items()},
                provenance.FIELD: provenance.provenance()}
    write_manifest(directory, manifest)
    start = time.monotonic()
    outputs = stage.run(directory, inputs)
    held.check()
    manifest.update(status="complete", outputs=outputs, contents=digests(directory, stage.contents),
                    seconds=round(time.monotonic() - start, 1))
    write_manifest(directory, manifest)
    say(f"complete in {manifest['seconds']:.0f} s")
    return manifest


# -- report files: written beside the stages, never over a user's own -------------------

# The report files a program wrote in the root and their digests ("writing"
# while it writes them).
REPORT_RECORD = "report_files.json"


def check_report_files(root: str, names: tuple[str, ...]) -> None:
    """Raises ValueError naming a file of `root` among `names` that the report
    would replace but that the program did not write, or that changed since."""
    record = files.read_json(os.path.join(root, REPORT_RECORD)) or {}
    for name in names:
        path = os.path.join(root, name)
        if tf.io.gfile.exists(path) and record.get(name) not in ("writing", files.sha256(path)):
            raise ValueError(f"--output_dir={root} holds a {name} that this program did not "
                             "write (or that was changed since): the report would replace it; "
                             "move it away or use another --output_dir")


def write_recorded(root: str, names: tuple[str, ...], write: Callable[[], tuple[dict, str]]
                   ) -> tuple[dict[str, str], str]:
    """`write()` (which returns the paths it wrote and a text), its files
    recorded with their digests in REPORT_RECORD, after `check_report_files`."""
    check_report_files(root, names)
    record_path = os.path.join(root, REPORT_RECORD)
    files.write_json(record_path, {name: "writing" for name in names})
    paths, text = write()
    files.write_json(record_path, {os.path.basename(p): files.sha256(p) for p in paths.values()})
    return paths, text
