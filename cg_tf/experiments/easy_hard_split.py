"""The easy/hard experiment (Zielinski et al., 2020, section on easy and hard
examples): train with SGD for a few epochs on a clean dataset; the training
examples it then classifies correctly are "easy", the others "hard". Split each
set into training and held-out parts, train fresh models on easy and on hard,
and evaluate each on both held-out parts and on the original test set. The
split, the stages and the report; the command line is pipelines/easy_hard.py.

Stages under the output directory:
  data/clean/     the clean dataset (Beam)
  first_training/ SGD for --first_epochs; its learned_ids.txt / not_learned_ids.txt
  split/          selection files and the easy/ and hard/ datasets (Beam), each
                  with splits train and heldout
  runs/easy, runs/hard   fresh models trained on each set (one logdir)
  cross_eval/     accuracy of each model on each held-out set and the test set
and summary.csv, summary.md, figure.png and figure.pdf.
"""

import dataclasses
import os

from cg_tf.data import build, hashing, records
from cg_tf.data.noise import NoiseSpec
from cg_tf.data.sources import Source
from cg_tf.data.sources.records_source import RecordsSource, write_selection
from cg_tf.experiments import runner, stages
from cg_tf.experiments.runner import Stage
from cg_tf.measure import report, tags
from cg_tf.measure.monitor import LEARNED_IDS, NOT_LEARNED_IDS
from cg_tf.robust.aggregators import Mean
from cg_tf.storage import files
from cg_tf.training.trainer import TrainConfig, check_layer_filter, check_run_layout

SETS = ("easy", "hard")
PARTS = ("train", "heldout")
EVALUATIONS = (("easy", "heldout"), ("hard", "heldout"), ("clean", "test"))


@dataclasses.dataclass(frozen=True)
class Sizes:
    train: int | None = None  # per set; None: equal sizes from the smaller set
    heldout: int | None = None

    def resolve(self, available: dict[str, int]) -> tuple[int, int]:
        """Examples per set in the training and held-out parts. By default both
        parts of both sets are equal: half the smaller set each."""
        smaller = min(available.values())
        train = self.train if self.train is not None else smaller // 2
        heldout = self.heldout if self.heldout is not None else smaller - train
        for name, n in available.items():
            if train + heldout > n:
                raise ValueError(
                    f"--train_size={train} + --heldout_size={heldout} exceed the {n} {name} "
                    f"examples ({available}); lower them")
        if min(train, heldout) < 1:
            raise ValueError(f"too few examples for the split ({available}); "
                             "train longer or shorter, or set --train_size/--heldout_size")
        return train, heldout


def select(ids: list[str], train: int, heldout: int, seed: int, name: str) -> dict[str, str]:
    """{id: part}: the `train` ids hashing lowest go to training, the next
    `heldout` to held-out (a stable, exact choice)."""
    ranked = sorted(ids, key=lambda i: (hashing.stable_hash64(seed, i, f"easy_hard/{name}"), i))
    return {**{i: "train" for i in ranked[:train]},
            **{i: "heldout" for i in ranked[train:train + heldout]}}


def _read_ids(path: str) -> list[str]:
    return [line.strip() for line in files.read_text(path).splitlines() if line.strip()]


def split_stage(sizes: Sizes, seed: int, num_shards: int, beam_args: list[str]) -> Stage:
    def run(directory: str, inputs: dict) -> dict:
        clean = inputs["data/clean"]["outputs"]["data_dir"]
        first = inputs["first_training"]["outputs"]["model_dir"]
        ids = {"easy": _read_ids(os.path.join(first, LEARNED_IDS)),
               "hard": _read_ids(os.path.join(first, NOT_LEARNED_IDS))}
        train, heldout = sizes.resolve({k: len(v) for k, v in ids.items()})
        out = {"available": {k: len(v) for k, v in ids.items()}, "train_size": train,
               "heldout_size": heldout}
        for name in SETS:
            selection = os.path.join(directory, f"{name}_selection.tsv")
            write_selection(selection, select(ids[name], train, heldout, seed, name))
            source = RecordsSource(clean, selection, PARTS, eval_split="heldout")
            data_dir = os.path.join(directory, name)
            build.build_dataset(source, build.BuildConfig(data_dir, NoiseSpec("uniform", 0.0, seed),
                                                          num_shards=num_shards),
                                build.beam_options(beam_args))
            out[f"{name}_data_dir"] = data_dir
        return out

    params = {"train_size": sizes.train, "heldout_size": sizes.heldout, "seed": seed,
              "num_shards": num_shards}
    return Stage("split", "easy_hard_split", params, run, ("data/clean", "first_training"),
                 contents=tuple(f for name in SETS for f in (
                     f"{name}_selection.tsv", f"{name}/{records.INFO_FILE}")))


def cross_eval_stage(train: TrainConfig) -> Stage:
    def run(directory: str, inputs: dict) -> dict:
        data = {"clean": inputs["data/clean"]["outputs"]["data_dir"],
                **{s: inputs["split"]["outputs"][f"{s}_data_dir"] for s in SETS}}
        readers = {d: stages.evaluation_reader(path, train.input.image_size)
                   for d, path in data.items()}
        results = {}
        for trained_on in SETS:
            model_dir = inputs[f"runs/{trained_on}"]["outputs"]["model_dir"]
            net = stages.restore_net(dataclasses.replace(train, model_dir=model_dir),
                                     readers[trained_on])
            results[trained_on] = {f"{d}/{s}": stages.accuracy_on(net, readers[d], s)
                                   for d, s in EVALUATIONS}
        return {"accuracy": results}

    return Stage("cross_eval", "easy_hard_eval", {}, run,
                 ("data/clean", "split", "runs/easy", "runs/hard"))


def pipeline(source: Source, build_config: build.BuildConfig, beam_args: list[str],
             train: TrainConfig, first_epochs: int, sizes: Sizes) -> list[Stage]:
    """The stages; `train` configures the fresh models, and (with plain SGD
    and `first_epochs`) the first training."""
    clean = dataclasses.replace(build_config,
                                noise=dataclasses.replace(build_config.noise, rate=0.0))
    first = dataclasses.replace(train, aggregator=Mean(), epochs=first_epochs, steps=None)
    check_run_layout(train, 1)
    check_layer_filter(train, source.image_shape, source.num_classes)
    return [stages.dataset_stage("data/clean", source, clean, beam_args),
            stages.train_stage("first_training", "data/clean", first),
            split_stage(sizes, build_config.noise.seed, build_config.num_shards, beam_args),
            *[stages.train_stage(f"runs/{s}", "split", train, data_output=f"{s}_data_dir")
              for s in SETS],
            cross_eval_stage(train)]


def table(manifests: dict[str, dict]) -> list[dict]:
    accuracy = manifests["cross_eval"]["outputs"]["accuracy"]
    split = manifests["split"]["outputs"]
    return [{"trained_on": trained_on,
             "train_examples": split["train_size"],
             **{f"{d} {s}": accuracy[trained_on][f"{d}/{s}"]["accuracy"]
                for d, s in EVALUATIONS}}
            for trained_on in SETS]


REPORT_FILES = ("summary.csv", "summary.md", "figure.png", "figure.pdf")


def write_report(output_dir: str, manifests: dict[str, dict]) -> tuple[dict[str, str], str]:
    """summary.csv, summary.md, figure.png and figure.pdf in `output_dir`,
    recorded with their digests (`runner.write_recorded`); returns their paths
    and the summary to print."""
    return runner.write_recorded(output_dir, REPORT_FILES,
                                 lambda: _write_report(output_dir, manifests))


def _write_report(output_dir: str, manifests: dict[str, dict]) -> tuple[dict[str, str], str]:
    rows = table(manifests)
    split = manifests["split"]["outputs"]
    first = manifests["first_training"]["outputs"]
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("csv", "summary.csv"), ("md", "summary.md"))}
    report.write_table(paths["csv"], rows)
    files.write_text(paths["md"], (
        f"# Easy and hard examples\n\n{_split_sentence(split, first)}\n\n"
        "Accuracy of the model trained on each set (rows) on the held-out part of "
        "each set and on the original test set (columns):\n\n" + report.markdown(rows)))
    # The runs' datasets are made from the clean one's records: name it instead.
    source = manifests["data/clean"]["params"]["source"]
    runs = [dataclasses.replace(r, config={**r.config, "source": source})
            for r in report.load_runs(os.path.join(output_dir, "runs"))]
    paths |= _figure(rows, runs, os.path.join(output_dir, "figure.png"))
    return paths, summary_text(rows, split, first, runs)


def summary_text(rows: list[dict], split: dict, first: dict, runs: list[report.Run]) -> str:
    """The experiment as a person reads it: the split, each model's accuracy on
    every evaluation set, and how the two generalize to the test set."""
    test = {r["trained_on"]: r["clean test"] for r in rows}
    return "\n".join([
        ": ".join(filter(None, ["Easy and hard examples", report.caption(runs)])),
        _split_sentence(split, first), "",
        "accuracy of the model trained on each set:",
        report.text_table([{"trained on": r["trained_on"]} | {
            k: r[k] for k in (f"{d} {s}" for d, s in EVALUATIONS)} for r in rows]), "",
        f"Trained on easy examples, a model scores {test['easy']:.3f} on the test set; "
        f"trained on as many hard ones, {test['hard']:.3f}."])


def _split_sentence(split: dict, first: dict) -> str:
    return (f"After {first['steps']} steps of plain SGD, {split['available']['easy']} training "
            f"examples were classified correctly (easy) and {split['available']['hard']} not "
            f"(hard); each set gives {split['train_size']} for training and "
            f"{split['heldout_size']} held out.")


def _figure(rows: list[dict], runs: list[report.Run], path: str) -> dict[str, str]:
    """Bars: each model on each evaluation set; curves: each model's accuracy
    on its own held-out set in training. One legend, under the caption of the
    runs' shared setting; PNG and PDF."""
    plt = report.pyplot()
    colors = dict(zip(SETS, ("#1f77b4", "#ff7f0e")))
    label = {s: f"trained on {s}" for s in SETS}
    with plt.rc_context(report.FIGURE_STYLE):
        fig, (bars, curves) = plt.subplots(1, 2, figsize=(7.2, 3.2), layout="constrained")
        width = 0.38
        for i, row in enumerate(rows):
            xs = [j + (i - 0.5) * width for j in range(len(EVALUATIONS))]
            drawn = bars.bar(xs, [row[f"{d} {s}"] for d, s in EVALUATIONS], width,
                             color=colors[row["trained_on"]], label=label[row["trained_on"]])
            bars.bar_label(drawn, fmt="%.2f", fontsize=7)
        bars.set_xticks(range(len(EVALUATIONS)),
                        [f"{d} {s}".replace("heldout", "held-out") for d, s in EVALUATIONS])
        bars.set_title("final accuracy")
        x_label, scale = report.x_axis(runs)
        for run in runs:
            series = run.scalars.get(tags.ACCURACY_CURVES["test"])  # its held-out set
            if series:
                steps, values = zip(*series)
                curves.plot([s * scale[run.name] for s in steps], values,
                            color=colors.get(run.name), label=label.get(run.name, run.name))
        curves.set_title("accuracy on its own held-out set")
        curves.set_xlabel(x_label)
        curves.grid(alpha=0.3)
        for ax in (bars, curves):
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("accuracy")
        report.legend(fig, (bars, curves), report.caption(runs))
    return report.save_figure(fig, path)
