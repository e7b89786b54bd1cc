"""The components the reproduction pipelines are made of: build a dataset
(Beam), train a model (the trainer, resumable), evaluate trained models.

Parameters that change a stage's output are its manifest parameters; those
that only say where or how fast it runs (Beam runner options, the trainer's
`EXECUTION_FIELDS`: strategy, checkpoint and log intervals, ...) are not, so a
stage can be resumed or re-run elsewhere. A training run's own config.json
leaves out the same fields (cg_tf.training.trainer.run_params).
"""

import dataclasses
import os

import keras
import tensorflow as tf

from cg_tf.data import build, records
from cg_tf.data.reader import InputConfig, InputOptions, Reader
from cg_tf.data.sources import Source
from cg_tf.experiments.runner import Stage
from cg_tf.measure import metrics
from cg_tf.training.models import build_model
from cg_tf.training.trainer import (CHECKPOINTS, CONFIG_FILE, SUMMARY_FILE, TrainConfig, Trainer,
                                   run_params)

DATA = "data"  # a dataset stage's dataset, inside its artifact directory


def dataset_stage(name: str, source: Source, config: build.BuildConfig,
                  beam_args: list[str]) -> Stage:
    """Builds `source` with `config` (its output_dir is replaced by the stage's)."""
    params = {"source": source.spec, "source_fingerprint": source.fingerprint(),
              **{k: v for k, v in dataclasses.asdict(config).items()
                 if k not in ("output_dir", "overwrite")}}

    def run(directory: str, _inputs: dict) -> dict:
        out = os.path.join(directory, DATA)
        info = build.build_dataset(source, dataclasses.replace(config, output_dir=out),
                                   build.beam_options(beam_args))
        return {"data_dir": out, "splits": {k: v.num_examples for k, v in info.splits.items()},
                "realized_noise_rate": info.to_json()["realized_noise_rate"]}

    return Stage(name, "dataset", params, run, contents=(f"{DATA}/{records.INFO_FILE}",))


def train_stage(name: str, data_stage: str, config: TrainConfig,
                data_output: str = "data_dir") -> Stage:
    """Trains `config` on the dataset that `data_stage` names in its output
    `data_output`; the artifact directory is the model directory, so an
    interrupted stage resumes from its checkpoints."""

    def run(directory: str, inputs: dict) -> dict:
        data_dir = inputs[data_stage]["outputs"][data_output]
        keras.backend.clear_session()
        summary = Trainer(dataclasses.replace(config, data_dir=data_dir,
                                              model_dir=directory)).run()
        return {"model_dir": directory,
                **{k: v for k, v in summary.items() if not isinstance(v, dict)}}

    params = {**run_params(config), "data": data_output}
    return Stage(name, "train", params, run, (data_stage,), resumable=True,
                 contents=(CONFIG_FILE, SUMMARY_FILE))


def restore_net(config: TrainConfig, reader: Reader) -> keras.Model:
    """The final network of a training run: built as the run built it (for the
    image shape and classes of `reader`, a reader of its dataset) and given the
    weights of its last checkpoint (nothing else of the run is built)."""
    path = tf.train.latest_checkpoint(os.path.join(config.model_dir, CHECKPOINTS))
    if path is None:
        raise ValueError(f"no checkpoint in {config.model_dir}")
    net = build_model(config.model, reader.image_shape, reader.num_classes, config.fc_widths,
                      config.init)
    # The run's checkpoint holds the net as model.net, beside what this leaves out.
    model = tf.Module()
    model.net = net
    status = tf.train.Checkpoint(model=model).restore(path)
    status.expect_partial().assert_existing_objects_matched()
    return net


def evaluation_reader(data_dir: str, image_size: tuple[int, int] | None = None,
                      batch_size: int = 500) -> Reader:
    """A reader of whole splits of a dataset directory, images resized as the
    model was trained (it caches small splits)."""
    return Reader(InputConfig(data_dir, batch_size=1, options=InputOptions(image_size=image_size),
                              eval_batch_size=batch_size))


def accuracy_on(net: keras.Model, reader: Reader, split: str) -> dict:
    """Accuracy and loss of `net` on a whole split."""
    if split not in reader.info.splits:
        raise ValueError(f"{reader.config.data_dir} has no split {split!r}")
    r = metrics.evaluate(net, reader.examples(split))
    return {"accuracy": r["accuracy"], "loss": r["loss"], "count": r["count"]}

