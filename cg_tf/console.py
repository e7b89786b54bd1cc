"""What the command lines print.

By default: the programs' own progress and results, and every warning and
error, each once, as `HH:MM:SS message`. TensorFlow's, XLA's, Beam's and
absl's informational lines are silenced at their source. `--verbosity=1`
(absl's flag) brings them back, with absl's full prefixes.

Every program imports this module before anything loads TensorFlow, whose
C++ log level is read from the environment once, when it loads; the module
then loads TensorFlow itself, catching the lines its C++ side prints before
that level applies.
"""

import logging as std_logging
import os
import re
import sys
import tempfile


def verbose(argv: list[str]) -> bool:
    """Whether the command line asks for --verbosity (or -v) of 1 or more."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in ("--verbosity", "-verbosity", "-v", "--v"):
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            return int(value) >= 1
        except ValueError:
            return False
    return False


# Python loggers of other libraries and the least level they print by default.
THIRD_PARTY = {
    "tensorflow": std_logging.WARNING,        # e.g. the checkpoint saver's timings
    "apache_beam": std_logging.WARNING,       # e.g. "Renamed 1 shards", cache sizes
    "apache_beam.io.gcp": std_logging.ERROR,  # optional GCP clients missing, at import
}


def _not_beam_chatter(record: std_logging.LogRecord) -> bool:
    """Beam logs some notices on the root logger itself, as it loads (e.g. that
    the optional GCP clients are missing)."""
    return record.levelno >= std_logging.ERROR or f"{os.sep}apache_beam{os.sep}" not in \
        record.pathname


# What TensorFlow's C++ side writes to stderr as it loads, before its log level
# applies (TensorFlow 2.21 on a CPU with AVX-512: absl's notice, then oneDNN's
# INFO line, twice): absl INFO lines and that notice.
IMPORT_CHATTER = re.compile(r"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |WARNING: All log messages before "
                            r"absl::InitializeLog\(\) is called are written to STDERR")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with file descriptor 2 caught, and writes back to
    stderr every line of what it printed there except `IMPORT_CHATTER`."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not IMPORT_CHATTER.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def silence_libraries() -> None:
    """TensorFlow's C++ INFO lines (CPU features, XLA service, oneDNN; warnings
    stay) and the other libraries' informational Python lines, silenced at
    their source; TensorFlow loaded now if it has not been (its level is read
    once, as it loads)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    for name, level in THIRD_PARTY.items():  # before the libraries load and log
        std_logging.getLogger(name).setLevel(level)
    root = std_logging.getLogger()
    if _not_beam_chatter not in root.filters:
        root.addFilter(_not_beam_chatter)
    if "tensorflow" not in sys.modules:
        import_tensorflow_quietly()


QUIET = not verbose(sys.argv[1:])
if QUIET:
    silence_libraries()


# The project's code: the package and, beside it in a checkout, the programs.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("cg_tf", "pipelines", "tools"))


class _Short(std_logging.Formatter):
    def format(self, record):
        return f"{self.formatTime(record, '%H:%M:%S')} {record.getMessage()}"


def _shown(record: std_logging.LogRecord) -> bool:
    """Warnings and errors, and the project's own informational lines (other
    libraries log through absl too, e.g. TensorFlow's checkpoint timings)."""
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(OURS)


def short_python_log_lines() -> None:
    """Python's log lines (the project's warnings) as `HH:MM:SS message`, as the
    command lines print them, where no handler was set up (the Python route)."""
    root = std_logging.getLogger()
    if not root.handlers:
        handler = std_logging.StreamHandler()
        handler.setFormatter(_Short())
        root.addHandler(handler)


def configure() -> None:
    """Unless verbose, absl's handler (which every Python log line goes through)
    shows `HH:MM:SS message` and only what `_shown` keeps (call from main, once
    absl has set its handler up)."""
    if QUIET:
        from absl import logging
        handler = logging.get_absl_handler()
        handler.setFormatter(_Short())
        handler.addFilter(_shown)
