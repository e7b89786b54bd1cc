"""The noise sweep (Coherent Gradients, Figure 2 and its tables): one noisy
dataset per noise rate, one training run per (aggregator setting, noise rate,
seed), and a report: a row per run, a row per setting (the runs that differ
only in their seed: mean, standard deviation, min and max), the settings' curves
at every evaluation, and the figure (a panel per setting, the seeds' mean with
a band). The grid, its stages and its report; the command line is
pipelines/sweep.py.

Layout under the output directory:
  data/noise_<rate>/   dataset stages (the dataset in data/)
  runs/<setting>_noise<rate>_seed<seed>/   training stages = model dirs (one logdir)
  summary.csv           a row per run
  settings.csv          a row per setting, over its seeds
  curves.csv            a row per (setting, curve, step), over its seeds
  summary.md, figure.png, figure.pdf
  report_files.json     the digests of the report files above, as written: a
                        file of those names that the sweep did not write (or
                        that was edited since) stops it before any work
"""

import dataclasses
import itertools
import os

import numpy as np
import tensorflow as tf

from cg_tf import provenance
from cg_tf.data import build
from cg_tf.data.sources import Source
from cg_tf.experiments import runner
from cg_tf.experiments.runner import Stage
from cg_tf.experiments.stages import dataset_stage, train_stage
from cg_tf.measure import report, tags
from cg_tf.robust import aggregators, layer_filter, names
from cg_tf.robust.aggregators import Aggregator
from cg_tf.storage import files
from cg_tf.training.trainer import TrainConfig, check_layer_filter, check_run_layout

RESULTS = ("pristine_accuracy", "corrupt_accuracy", "corrupt_true_label_accuracy",
           "test_accuracy", "adjusted_overfit")
# Averaged over seeds with the final RESULTS: the best test accuracy a run's
# evaluations saw (memorization arrives after generalization, so it can be
# well above the final one); the mean of its test evaluations over the last
# LATE_FRACTION of its steps (a run that swings from one evaluation to the
# next is not judged by its last one); and the first step after the peak at
# which test accuracy is FALL_DROP or more below it (None if it never is).
PEAK, LATE, FALL = "peak_test_accuracy", "late_test_accuracy", "fall_step"
LATE_FRACTION, FALL_DROP = 1 / 6, 0.1  # the last 10,000 of 60,000 steps; 10 points


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the grid."""
    aggregator: Aggregator
    noise_rate: float
    seed: int

    @property
    def setting(self) -> str:
        return f"{self.aggregator.setting}_noise{self.noise_rate:g}"

    @property
    def name(self) -> str:
        return f"{self.setting}_seed{self.seed}"


def grid(settings: list[Aggregator], noise_rates: list[float], seeds: list[int]
         ) -> list[Point]:
    """Every (noise rate, setting, seed); a ValueError if two runs would share
    a stage name (a value listed twice, noise rates alike in 6 digits)."""
    points = [Point(a, r, s) for r, a, s in itertools.product(noise_rates, settings, seeds)]
    named: dict[str, Point] = {}
    for p in points:
        if (q := named.setdefault(p.name, p)) is not p:
            raise ValueError(
                f"two runs of the grid would share the stage runs/{p.name} (noise rates "
                f"{q.noise_rate!r} and {p.noise_rate!r}, aggregators {q.aggregator.spec} and "
                f"{p.aggregator.spec}, seeds {q.seed} and {p.seed}): list each value of "
                f"--noise_rates, --aggregators and --seeds once, and noise rates that differ "
                f"in their first 6 digits")
    return points


def data_stage_name(rate: float) -> str:
    return f"data/noise_{rate:g}"


def stages(source: Source, build_config: build.BuildConfig, beam_args: list[str],
           train: TrainConfig, points: list[Point]) -> list[Stage]:
    """Dataset stages for every noise rate, then a training stage per point;
    each point checked (with the batch size) before anything runs."""
    out = []
    for rate in sorted({p.noise_rate for p in points}):
        config = dataclasses.replace(build_config,
                                     noise=dataclasses.replace(build_config.noise, rate=rate))
        out.append(dataset_stage(data_stage_name(rate), source, config, beam_args))
    for aggregator in {p.aggregator for p in points}:  # the model built once a filter
        check_layer_filter(dataclasses.replace(train, aggregator=aggregator),
                           source.image_shape, source.num_classes, "--aggregators")
    for p in points:
        check_run_layout(dataclasses.replace(train, aggregator=p.aggregator), 1, "--aggregators")
        out.append(train_stage(f"runs/{p.name}", data_stage_name(p.noise_rate),
                               dataclasses.replace(train, aggregator=p.aggregator, seed=p.seed)))
    return out


def published(runs_dir: str) -> tuple[list[Point], dict[str, dict]]:
    """The points and stage manifests of a folder of runs copied out of a
    sweep (tools.publish_runs: each run's config.json and manifest.json),
    in one fixed order (by noise rate; plain SGD first, then by aggregator,
    every layer's settings before a layer filter's, by parameter; then by
    seed: the order of --aggregators is not recorded, so a sweep that listed
    them otherwise reports them otherwise); each dataset's size is the one its
    runs recorded. A ValueError for a run whose name is not its point's."""
    points, manifests = [], {}
    for name in sorted(tf.io.gfile.listdir(runs_dir)):
        directory = os.path.join(runs_dir, name.rstrip("/"))
        config = files.read_json(os.path.join(directory, "config.json"))
        manifest = runner.read_manifest(directory)
        if not config or not manifest:
            continue
        p = Point(aggregators.from_json(config["aggregator"]),
                  config["dataset"]["noise"]["rate"], config["seed"])
        if p.name != name.rstrip("/"):
            raise ValueError(f"{directory} holds the run {p.name} (by its config.json)")
        points.append(p)
        manifests[f"runs/{p.name}"] = manifest
        manifests.setdefault(data_stage_name(p.noise_rate),
                             {"outputs": {"splits": config["dataset"]["examples"]}})
    points.sort(key=lambda p: (p.noise_rate, p.aggregator.name != "mean", p.aggregator.name,
                               p.aggregator.layers != layer_filter.ALL, p.aggregator.layers.name,
                               p.aggregator.value or 0, p.seed))
    return points, manifests


def peak(series: list[tuple[int, float]] | None) -> tuple[int | None, float | None]:
    """(step, value) of the highest value of a scalar series (the earliest
    step if it repeats); (None, None) for a missing or empty series."""
    if not series:
        return None, None
    step, value = max(series, key=lambda sv: (sv[1], -sv[0]))
    return step, value


def late_mean(series: list[tuple[int, float]] | None, steps: int) -> float | None:
    """The mean of the values at steps past (1 - LATE_FRACTION) x steps."""
    late = [v for s, v in series or () if s > (1 - LATE_FRACTION) * steps]
    return float(np.mean(late)) if late else None


def fall_step(series: list[tuple[int, float]] | None) -> int | None:
    """The first step after the peak whose value is FALL_DROP or more below it."""
    step, value = peak(series)
    return next((s for s, v in series or () if s > step and v <= value - FALL_DROP), None)


def rows(points: list[Point], manifests: dict[str, dict],
         runs: dict[str, report.Run] | None = None) -> list[dict]:
    """One row per finished run: its setting, seed, size (training examples,
    steps), final results, the step and value of its peak test accuracy, its
    late test accuracy and the step of its fall (from the run's evaluations in
    `runs`, by name: the same test sample as the final value), and the code
    that made it (git commit, dirty tree)."""
    runs = runs or {}
    out = []
    for p in points:
        manifest = manifests.get(f"runs/{p.name}") or {}
        outputs = manifest.get("outputs") or {}
        if not outputs:
            continue
        code = manifest.get(provenance.FIELD) or {}
        test = runs[p.name].scalars.get(tags.ACCURACY_CURVES["test"]) if p.name in runs else None
        data = (manifests.get(data_stage_name(p.noise_rate)) or {}).get("outputs") or {}
        out.append({"run": p.name, "setting": p.setting, "aggregator": p.aggregator.name,
                    "parameter": p.aggregator.value, "layers": p.aggregator.layers.name,
                    "noise_rate": p.noise_rate, "seed": p.seed,
                    "train_examples": (data.get("splits") or {}).get("train"),
                    **{k: outputs.get(k) for k in RESULTS},
                    **dict(zip(("peak_test_step", PEAK), peak(test))),
                    LATE: late_mean(test, outputs.get("steps") or 0), FALL: fall_step(test),
                    "steps": outputs.get("steps"), "wall_seconds": outputs.get("wall_seconds"),
                    "commit": code.get("git_commit"), "dirty": code.get("git_dirty")})
    return out


def over_seeds(table: list[dict]) -> list[dict]:
    """A row per setting of `rows`: its seeds, and the mean, standard
    deviation (population, over the seeds), min and max of each result (of
    the fall step: over the runs that fell, `fell` of them)."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in table):
        group = [r for r in table if r["setting"] == setting]
        row = {k: group[0][k] for k in ("setting", "aggregator", "parameter", "layers",
                                        "noise_rate", "train_examples", "steps")}
        row["seeds"] = len(group)
        row["fell"] = sum(r[FALL] is not None for r in group)
        for k in (*RESULTS, PEAK, LATE, FALL):
            values = np.array([r[k] for r in group if r[k] is not None], float)
            stats = (values.mean(), values.std(), values.min(), values.max()) \
                if len(values) else (None,) * 4
            row |= {f"{k}{suffix}": None if v is None else float(v)
                    for suffix, v in zip(("", "_std", "_min", "_max"), stats)}
        out.append(row)
    return out


def curves(panels: dict[str, list[report.Run]]) -> list[dict]:
    """A row per (setting, accuracy curve, evaluation step): mean, standard
    deviation, min and max over the setting's runs, at the steps all of them
    evaluated."""
    out = []
    for setting, runs in panels.items():
        for curve, tag in tags.ACCURACY_CURVES.items():
            spread = report.band([r.scalars[tag] for r in runs if r.scalars.get(tag)])
            if spread is None:
                continue
            out += [{"setting": setting, "curve": curve, "step": int(step), "runs": spread.runs,
                     "mean": float(m), "std": float(sd), "min": float(lo), "max": float(hi)}
                    for step, m, sd, lo, hi in zip(spread.steps, spread.mean, spread.std,
                                                   spread.min, spread.max)]
    return out


REPORT_FILES = ("summary.csv", "settings.csv", "curves.csv", "summary.md", "figure.png",
                "figure.pdf")


def check_report_files(output_dir: str) -> None:
    """Raises ValueError for a report file of `output_dir` the sweep did not write."""
    runner.check_report_files(output_dir, REPORT_FILES)


def write_report(output_dir: str, points: list[Point], manifests: dict[str, dict]
                 ) -> tuple[dict[str, str], str]:
    """summary.csv, settings.csv, curves.csv, summary.md and (once a run has
    finished) figure.png and figure.pdf in `output_dir`, recorded with their
    digests (`runner.write_recorded`); returns their paths and the summary to print."""
    return runner.write_recorded(output_dir, REPORT_FILES,
                                 lambda: _write_report(output_dir, points, manifests))


def _write_report(output_dir: str, points: list[Point], manifests: dict[str, dict]
                  ) -> tuple[dict[str, str], str]:
    by_name = {r.name: r for r in report.load_runs(os.path.join(output_dir, "runs"))}
    table = rows(points, manifests, by_name)
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("csv", "summary.csv"), ("settings", "settings.csv"), ("curves", "curves.csv"),
              ("md", "summary.md"))}
    report.write_table(paths["csv"], table)
    means = over_seeds(table)
    report.write_table(paths["settings"], means)
    panels = {}  # finished runs only: a running or killed one would draw a partial curve
    finished = {r["run"] for r in table}
    for p in points:
        if p.name in finished and p.name in by_name:
            panels.setdefault(p.setting, []).append(by_name[p.name])
    report.write_table(paths["curves"], curves(panels))
    shown = [{k: r[k] for k in ("setting", "seeds")} | {
        k.replace("_accuracy", ""): _pm(r[k], r[f"{k}_std"]) for k in (*RESULTS, PEAK, LATE)}
        for r in means]
    files.write_text(paths["md"], "# Noise sweep\n\n## Mean and spread over seeds\n\n"
                     + report.markdown(shown) + "\n## Every run\n\n"
                     + report.markdown([{k: v for k, v in r.items() if k != "setting"}
                                        for r in table]))
    if panels:
        # With several settings and noise rates: a row per rate, the settings across.
        settings = {p.aggregator.setting for p in points}
        rates = {p.noise_rate for p in points}
        columns = len(settings) if len(settings) > 1 and len(rates) > 1 else 3
        paths |= report.accuracy_figure(panels, os.path.join(output_dir, "figure.png"), columns)
    return paths, summary_text(means, points, [by_name[p.name] for p in points
                                               if p.name in by_name])


SHOWN = {"pristine_accuracy": "pristine", "corrupt_accuracy": "corrupt",
         "corrupt_true_label_accuracy": "corrupt (true label)", "test_accuracy": "test",
         "adjusted_overfit": "adjusted overfit", PEAK: "peak test",
         LATE: "late test"}


def summary_text(means: list[dict], points: list[Point], runs: list[report.Run]) -> str:
    """The sweep as a person reads it: what the runs share, a row per setting
    (mean ± spread over its seeds), and at each noise rate how much of the
    corrupt labels each aggregator fit."""
    if not means:
        return "Noise sweep: no run has finished yet."
    seeds = sorted({r["seeds"] for r in means})
    spec = {p.setting: names.label(p.aggregator.to_json()) for p in points}
    lines = [": ".join(filter(None, ["Noise sweep", report.caption(runs)])),
             f"accuracy: mean{' ± spread' if seeds[-1] > 1 else ''} over "
             f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}", "",
             report.text_table([
                 {"aggregator": spec[r["setting"]], "noise": _percent(r["noise_rate"])}
                 | {label: _pm(r[k], r[f"{k}_std"]) for k, label in SHOWN.items()}
                 for r in means])]
    for rate in sorted({r["noise_rate"] for r in means if r["noise_rate"]}):
        fits = [f"{spec[r['setting']]} {r['corrupt_accuracy']:.0%}"
                + ("" if r["test_accuracy"] is None else f" (test {r['test_accuracy']:.3f})")
                for r in means if r["noise_rate"] == rate and r["corrupt_accuracy"] is not None]
        if fits:
            lines += ["", f"At {_percent(rate)} noise, the corrupt training examples fit to "
                          f"their noisy label: {', '.join(fits)}."]
    return "\n".join(lines)


def _percent(rate: float) -> str:
    return f"{rate * 100:g}%"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if not std else f"{mean:.3f} ± {std:.3f}"
