"""How many training labels a noise setting changes, without building the dataset.

  python -m tools.labels_changed --source=idx:/usr/share/datasets/fashion-mnist \
      --noise_mode=permute --noise_rates=0,0.25,0.5,0.75,1 --out=labels_changed.csv

Label noise is a pure function of the noise seed, each example's id and label
(cg_tf.data.noise); this applies it to every training example of the source,
as pipelines.noisy_labels does (without --train_examples), and counts the
selected examples and those whose label came out different from the true one
(a uniformly redrawn label, or a permuted one, may come out unchanged). The
share changed is what the pipeline logs as "realized ... of train labels
changed". OUT: a row per noise rate: noise_mode, noise_rate, noise_seed,
train_examples, selected, changed, changed_share.
"""

from absl import app, flags

from cg_tf import common_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when it runs: importing defines none)."""
    flags.DEFINE_string("source", None, "The dataset source (as pipelines.noisy_labels).")
    flags.DEFINE_string("noise_mode", "uniform", "uniform, uniform_other or permute.")
    flags.DEFINE_list("noise_rates", ["0.5"], "Noise rates.")
    flags.DEFINE_integer("noise_seed", 0, "Noise seed.")
    flags.DEFINE_string("out", None, "The CSV to write; printed to stdout without it.")
    flags.mark_flags_as_required(["source"])


def training_labels(source) -> list[tuple[str, int]]:
    """(example id, label) of every valid training example of a source."""
    return [(ex.example_id, int(ex.label)) for task in source.read_tasks()
            if task.split == "train" for ex in source.read(task) if ex.error is None]


def changed(examples: list[tuple[str, int]], mode: str, rate: float, seed: int,
            num_classes: int) -> dict:
    """The counts of one noise setting (a row of the CSV)."""
    from cg_tf.data import noise
    spec = noise.NoiseSpec(mode, rate, seed)
    selected = [(eid, y) for eid, y in examples if noise.is_selected(spec, eid)]
    if mode == "permute":
        new = noise.permuted_labels(spec, selected)
    else:
        new = {eid: noise.pointwise_label(spec, eid, y, num_classes) for eid, y in selected}
    count = sum(new[eid] != y for eid, y in selected)
    return {"noise_mode": mode, "noise_rate": rate, "noise_seed": seed,
            "train_examples": len(examples), "selected": len(selected), "changed": count,
            "changed_share": count / len(examples)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from cg_tf.data.sources import make_source
    from cg_tf.measure import report
    source = make_source(FLAGS.source)
    examples = training_labels(source)
    rows = [changed(examples, FLAGS.noise_mode, float(r), FLAGS.noise_seed, source.num_classes)
            for r in FLAGS.noise_rates]
    if FLAGS.out:
        report.write_table(FLAGS.out, rows)
        print(f"wrote {FLAGS.out}")
    else:
        print(report.text_table(rows))


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
