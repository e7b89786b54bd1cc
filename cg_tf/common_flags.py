"""Flags shared by several command-line programs (defined once per process)."""

import sys

from absl import app, flags

SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice (label noise; weights and "
                            "data order in training).")


HELP = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")


def run(main, **kwargs) -> None:
    """absl's app.run, except that asking for help exits 0 (absl's --help exits 1,
    which a script or CI reads as a failure). A main module lists the flags it
    shares with other programs in its --help by adopting their modules
    (`flags.adopt_module_key_flags(common_flags)`)."""
    try:
        app.run(main, **kwargs)
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in HELP for a in sys.argv[1:]):
            sys.exit(0)
        raise
