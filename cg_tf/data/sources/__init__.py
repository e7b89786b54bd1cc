"""Data sources for the noisy-label pipeline, named by a --source spec."""

from cg_tf.data.sources.base import RawExample, ReadTask, Source, SourceError
from cg_tf.data.sources.cifar10 import Cifar10Source
from cg_tf.data.sources.digits import DigitsSource
from cg_tf.data.sources.idx import IdxSource
from cg_tf.data.sources.imagefolder import ImageFolderSource
from cg_tf.data.sources.tfds_source import TfdsSource

SOURCE_KINDS = ("digits", "idx:DIR", "cifar10:DIR", "imagefolder:DIR", "tfds:NAME")


def make_source(spec: str, tfds_data_dir: str | None = None,
                tfds_manual_dir: str | None = None) -> Source:
    """The source a --source spec names; raises SourceError for a bad spec."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return DigitsSource(spec)
    if kind in ("idx", "cifar10", "imagefolder", "tfds") and arg:
        if kind == "tfds":
            return TfdsSource(spec, arg, tfds_data_dir, tfds_manual_dir)
        cls = {"idx": IdxSource, "cifar10": Cifar10Source, "imagefolder": ImageFolderSource}[kind]
        return cls(spec, arg)
    raise SourceError(f"--source={spec!r} is not one of {', '.join(SOURCE_KINDS)}")


__all__ = ["RawExample", "ReadTask", "Source", "SourceError", "make_source", "SOURCE_KINDS"]
