"""Pipeline components that cache and resume, in the manner of TFX.

A `Stage` declares its kind, its parameters (JSON) and the stages it reads,
and owns one artifact directory `<root>/<name>` with a `manifest.json`:

  {"kind", "params", "inputs": {stage: fingerprint}, "fingerprint",
   "status": "running" | "complete", "outputs", "seconds"}

The fingerprint hashes the kind, the parameters and the inputs' fingerprints,
so it is known for every stage before anything runs. `run_stages` first checks
every stage's directory against it (a directory made with other parameters is
refused, naming what differs, unless `overwrite`), then runs the stages in
order: a complete stage with a matching manifest is skipped; an interrupted one
("running") is restarted, in place if it is `resumable` (training continues
from its checkpoints) and from an emptied directory otherwise. The manifest is
written atomically, and "complete" only after the stage's work is done.
"""

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

import tensorflow as tf

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


def fingerprint(kind: str, params: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"kind": kind, "params": params, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_manifest(directory: str, manifest: dict) -> None:
    path = os.path.join(directory, MANIFEST)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _clear(directory: str) -> None:
    if tf.io.gfile.exists(directory):
        tf.io.gfile.rmtree(directory)
    tf.io.gfile.makedirs(directory)


def plan(root: str, stages: list[Stage], overwrite: bool = False) -> dict[str, dict]:
    """Each stage's expected manifest header; checks names, inputs and existing
    artifact directories before anything runs."""
    expected = {}
    for stage in stages:
        if stage.name in expected:
            raise StageError(f"two stages are named {stage.name!r}")
        missing = [i for i in stage.inputs if i not in expected]
        if missing:
            raise StageError(f"stage {stage.name!r} reads {missing}, which no earlier stage makes")
        inputs = {i: expected[i]["fingerprint"] for i in stage.inputs}
        expected[stage.name] = {"kind": stage.kind, "params": stage.params, "inputs": inputs,
                                "fingerprint": fingerprint(stage.kind, stage.params, inputs)}
        found = read_manifest(os.path.join(root, stage.name))
        if found and found.get("fingerprint") != expected[stage.name]["fingerprint"] \
                and not overwrite:
            diff = _differences({k: found.get(k) for k in ("kind", "params", "inputs")},
                                {k: expected[stage.name][k] for k in ("kind", "params", "inputs")})
            raise StageError(
                f"{os.path.join(root, stage.name)} was made with other parameters "
                f"({'; '.join(diff[:5]) or 'unknown'}); use another --output_dir, or "
                f"--overwrite to rebuild it and everything after it")
    return expected


def progress(message: str) -> None:
    """Stage progress, to the log and the terminal."""
    logging.info("%s", message)
    print(message, flush=True)


def run_stages(root: str, stages: list[Stage], overwrite: bool = False, only: str | None = None,
               log: Callable[[str], None] = progress) -> dict[str, dict]:
    """Runs what is not done yet; returns every stage's manifest.

    `only` (a glob on stage names) runs just the matching stages, whose inputs
    must be complete: e.g. one training run of a grid per machine.
    """
    expected = plan(root, stages, overwrite)
    manifests = {}
    for n, stage in enumerate(stages, 1):
        directory = os.path.join(root, stage.name)
        want = expected[stage.name]
        found = read_manifest(directory)
        if found and found["fingerprint"] == want["fingerprint"] and found["status"] == "complete":
            log(f"[{n}/{len(stages)}] {stage.name}: complete, skipped")
            manifests[stage.name] = found
            continue
        if only and not fnmatch.fnmatch(stage.name, only):
            manifests[stage.name] = found
            continue
        not_ready = [i for i in stage.inputs
                     if (manifests.get(i) or {}).get("status") != "complete"]
        if not_ready:
            raise StageError(f"stage {stage.name!r} needs {not_ready} complete first")
        if found is None or found["fingerprint"] != want["fingerprint"] or not stage.resumable:
            _clear(directory)
            how = "starting" if found is None else "restarting" if found["fingerprint"] == \
                want["fingerprint"] else "rebuilding (--overwrite)"
        else:
            how = "resuming"
        log(f"[{n}/{len(stages)}] {stage.name}: {how}")
        manifest = {**want, "status": "running", "outputs": {}}
        write_manifest(directory, manifest)
        start = time.monotonic()
        outputs = stage.run(directory, {i: manifests[i] for i in stage.inputs})
        manifest.update(status="complete", outputs=outputs,
                        seconds=round(time.monotonic() - start, 1))
        write_manifest(directory, manifest)
        manifests[stage.name] = manifest
        log(f"[{n}/{len(stages)}] {stage.name}: complete in {manifest['seconds']:.0f} s")
    return manifests
