"""Run directories: one process at a time (a lock naming its holder, taken
over when stale), the recorded configuration of a run (a resume with another
one is refused), and a finished run left exactly as it was."""

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from conftest import REPO, file_size_limit, no_write_permission, parsed_flags, run_main

from cg_tf import train
from cg_tf.storage import lock
from cg_tf.training.trainer import Trainer


def snapshot(directory):
    """{relative path: (sha256, mtime)} of every file under `directory`."""
    out = {}
    for path in glob.glob(f"{directory}/**", recursive=True, include_hidden=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, directory)] = (digest, os.stat(path).st_mtime_ns)
    return out


def event_files(directory):
    return glob.glob(os.path.join(directory, "events.out.tfevents.*"))


def train_args(data_dir, model_dir, *extra):
    """A tiny run's command line (after `python -m`)."""
    return ["cg_tf.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
            "--fc_widths=16", "--eval_sample_size=50", "--probe_size=0",
            "--export_learned=false", *extra]


def trainer(args, overwrite=False):
    """The Trainer that the command line `args` makes, in this process."""
    with parsed_flags(*args):
        return Trainer(train.config_from_flags(), overwrite)


def error_line(proc):
    """The last line of stderr, which must be the program's one `error:` line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


# -- the lock ---------------------------------------------------------------------


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(directory, **fields):
    """A lock file as another process would have left it (this host by default)."""
    holder = dataclasses.replace(lock.Holder.me("training"), nonce="someone-else", **fields)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, lock.LOCK_FILE), "w") as f:
        f.write(holder.dumps())
    return holder


def read_lock(directory):
    with open(os.path.join(directory, lock.LOCK_FILE)) as f:
        return json.load(f)


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with lock.hold(str(tmp_path), "training"):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert f"pid {pid} is gone" in caplog.text
    assert not (tmp_path / lock.LOCK_FILE).exists()  # released


def test_a_live_holder_is_named_and_its_lock_kept(tmp_path, live_pid):
    write_lock(tmp_path, pid=live_pid)
    before = snapshot(tmp_path)
    with pytest.raises(lock.Busy, match=rf"is in use: training by pid {live_pid} on "
                                          rf"{socket.gethostname()} \(started "):
        with lock.hold(str(tmp_path), "training"):
            pass
    assert snapshot(tmp_path) == before


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_stops(tmp_path):
    """On a shared filesystem a pid says nothing: only the heartbeat counts
    (here through the tf.io.gfile storage of gs:// paths, on a local path)."""
    storage = lock.SharedStorage(settle=0.01)
    write_lock(tmp_path, host="elsewhere", pid=1)  # a fresh heartbeat
    with pytest.raises(lock.Busy, match="training by pid 1 on elsewhere"):
        lock.Lock(str(tmp_path), "training", storage).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 1000)
    held = lock.Lock(str(tmp_path), "training", storage).acquire()
    assert read_lock(tmp_path)["nonce"] == held.holder.nonce
    held.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_the_heartbeat_refreshes_the_lock_and_notices_losing_it(tmp_path):
    held = lock.Lock(str(tmp_path), "training", refresh=0.05).acquire()
    try:
        first = read_lock(tmp_path)["heartbeat"]
        deadline = time.time() + 10
        while read_lock(tmp_path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_lock(tmp_path)["heartbeat"] > first
        held.check()
        write_lock(tmp_path, host="elsewhere", pid=7)  # taken over by another host
        while not held.lost and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(lock.LockLost, match="pid 7 on elsewhere"):
            held.check()
    finally:
        held.release()
    assert read_lock(tmp_path)["host"] == "elsewhere"  # not ours to remove


def test_reentrant_in_one_thread_busy_for_another(tmp_path):
    errors = []
    with lock.hold(str(tmp_path), "stage runs/a") as outer:
        with lock.hold(str(tmp_path), "training") as inner:
            assert inner is outer

        def other():
            try:
                with lock.hold(str(tmp_path), "training"):
                    pass
            except lock.Busy as e:
                errors.append(str(e))
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert (tmp_path / lock.LOCK_FILE).exists()  # the inner exit did not release it
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_lock_file_this_program_did_not_write_is_not_removed(tmp_path):
    (tmp_path / lock.LOCK_FILE).write_text("mine")
    with pytest.raises(lock.Busy, match="is not a lock this program wrote"):
        with lock.hold(str(tmp_path), "training"):
            pass
    assert (tmp_path / lock.LOCK_FILE).read_text() == "mine"


# -- training runs ----------------------------------------------------------------


def test_two_trainers_on_one_directory_the_second_refuses_naming_the_first(digits_dir,
                                                                            tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", *train_args(digits_dir, run, "--steps=100000",
                                           "--checkpoint_every=10", "--log_every=10")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "checkpoint").exists():  # training
            assert first.poll() is None and time.time() < deadline, "the first did not start"
            time.sleep(0.1)
        second = run_main(*train_args(digits_dir, run, "--steps=20", "--learning_rate=0.5"),
                          timeout=180)
        line = error_line(second)
        assert f"is in use: training by pid {first.pid} on {socket.gethostname()}" in line
        assert first.poll() is None
        assert len(event_files(run)) == 1  # the second wrote nothing
    finally:
        first.kill()
        first.wait()


def test_a_resume_with_another_learning_rate_is_refused(digits_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(digits_dir, run, "--steps=4", "--checkpoint_every=2")
    trainer(args).run()
    before = snapshot(run)
    refused = run_main(*args, "--learning_rate=0.5")
    assert error_line(refused).endswith(
        f"error: {run} holds a run with another configuration (learning_rate: 0.1 -> 0.5); "
        "use another --model_dir, or --overwrite to start it over")
    assert snapshot(run) == before
    # Where or how fast it runs may differ.
    same = trainer([*args, "--checkpoint_every=3", "--log_every=1", "--strategy=one_device"])
    same.run()
    assert same.complete and snapshot(run) == before
    # --overwrite starts it over: one run, the new configuration.
    again = trainer([*args, "--learning_rate=0.5"], overwrite=True)
    assert again.run()["steps"] == 4
    assert not again.complete and len(event_files(run)) == 1
    with open(run / "config.json") as f:
        assert json.load(f)["learning_rate"] == 0.5


def test_a_finished_run_rerun_reports_it_and_changes_nothing(digits_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(digits_dir, run, "--steps=3", "--checkpoint_every=2")
    done = run_main(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    before = snapshot(run)
    assert "summary.json" in before and "config.json" in before
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(run) == before
    assert f"{run} was already complete (3 steps): nothing was changed" in again.stdout


# -- no space, no permission --------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, *options):
    """A tmpfs mounted at `path` for the block (the test is skipped where the
    machine does not allow mounting: the variants below need no mount)."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory, leave: int):
    """Fills the filesystem of `directory`, leaving about `leave` bytes."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(os.path.join(directory, "filler"), "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def refused(proc, run, reason):
    """Asserts the run ended in one `error:` line naming its directory and
    `reason`, and that whatever checkpoint it recorded as its latest reads back
    whole."""
    line = error_line(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith(f"error: cannot write {run}: ") and reason in line, line
    if latest := tf.train.latest_checkpoint(str(run / "checkpoints")):
        tf.train.load_checkpoint(latest).get_variable_to_shape_map()


def test_a_full_disk_ends_in_one_error_line(digits_dir, tmp_path):
    with tmpfs(tmp_path / "small", "size=4m") as disk:
        fill(disk, leave=16 * 1024)
        run = disk / "run"
        proc = run_main(*train_args(digits_dir, run, "--steps=4", "--checkpoint_every=1"))
        refused(proc, run, "No space left on device")


def test_a_file_size_limit_ends_in_one_error_line(digits_dir, tmp_path):
    """A full disk where nothing can be mounted: 16 KB a file, which the event
    file outgrows."""
    run = tmp_path / "run"
    proc = run_main(*train_args(digits_dir, run, "--steps=4", "--checkpoint_every=1"),
                    prefix=file_size_limit(16 * 1024))
    refused(proc, run, "File too large")


SWEEP = ["pipelines.sweep", "--source=digits", "--num_shards=2", "--fc_widths=16",
         "--aggregators=mean", "--noise_rates=0.5", "--seeds=0", "--steps=4",
         "--checkpoint_every=1", "--noreport"]


@pytest.mark.parametrize("stage", ["data", "training"])
def test_a_sweep_stage_whose_writes_are_refused_ends_in_one_error_line(stage, tmp_path):
    """16 KB a file: the dataset's shards outgrow it (the data stage), and so
    does a run's event file (the training stage). The line asks for no
    --overwrite (which would redo stages made with other flags), and the same
    command goes on."""
    out = tmp_path / "out"
    if stage == "training":
        built = run_main(*SWEEP, f"--output_dir={out}", "--only=data*")
        assert built.returncode == 0, built.stderr[-3000:]
    proc = run_main(*SWEEP, f"--output_dir={out}", prefix=file_size_limit(16 * 1024))
    line = error_line(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith(f"error: cannot write {out}") and "File too large" in line, line
    assert "raise the file-size limit" in line and "--overwrite" not in line, line
    if stage == "training":
        assert "the one it interrupted starts again" in line, line
    # With room again, the same command goes on from there.
    again = run_main(*SWEEP, f"--output_dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]


def test_what_counts_as_a_refused_write(tmp_path):
    """Space, quota, size and a read-only filesystem refuse only writes; a
    permission refused counts where the error names the folder being written,
    not a read refused elsewhere; and other errors are not refusals."""
    from cg_tf.storage.files import refused_write
    out = str(tmp_path / "out")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/elsewhere/x")
    assert refused_write(full, out).reason == "No space left on device"
    wrapped = RuntimeError(f"errors_impl.OutOfRangeError: {out}/_build_tmp/train.tmp-1; File "
                           "too large [while running 'WriteShards']")  # as Beam wraps it
    assert refused_write(wrapped, out).remedy == "raise the file-size limit (ulimit -f)"
    assert refused_write(PermissionError(errno.EACCES, "Permission denied", f"{out}/x"), out)
    assert refused_write(PermissionError(errno.EACCES, "Permission denied", "/data/in"),
                         out) is None
    remote = tf.errors.PermissionDeniedError(None, None, "gs://b/out/ckpt: HTTP 403")
    assert refused_write(remote, "gs://b/out").reason == "Permission denied"
    assert refused_write(remote, "gs://b/other") is None
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert refused_write(oom, out) is None
    assert refused_write(FileNotFoundError(errno.ENOENT, "No such file", out), out) is None


def test_a_read_only_model_dir_ends_in_one_error_line(digits_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m", "ro") as disk:
        proc = run_main(*train_args(digits_dir, disk / "run", "--steps=2"))
        refused(proc, disk / "run", "Read-only file system")


def test_a_model_dir_without_write_permission_ends_in_one_error_line(digits_dir, tmp_path):
    with no_write_permission(tmp_path / "ro") as (disk, prefix):
        proc = run_main(*train_args(digits_dir, disk / "run", "--steps=2"), prefix=prefix)
        refused(proc, disk / "run", "Permission denied")


def test_a_checkpoint_without_this_versions_state_is_refused_by_name(digits_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(digits_dir, run, "--steps=4", "--checkpoint_every=2")
    trainer(args).run()
    os.remove(run / "summary.json")  # as if it had stopped after its last checkpoint
    newer = trainer(args)
    newer.checkpoint.added_state = tf.Variable(0.0)  # state the checkpoint does not hold
    with pytest.raises(ValueError, match=r"ckpt-\d+ does not hold this version's run state "
                                         r".*; start the run over with --overwrite"):
        newer.run()
