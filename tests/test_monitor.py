"""The run's memorization outputs: summaries, learning events, the probe's
time budget, and the learned-example export."""

import csv
import os

import numpy as np
import pytest

from cg_tf.data.reader import InputOptions
from cg_tf.measure import metrics, report, tags
from cg_tf.measure.monitor import LEARNED_IDS, LEARNING_EVENTS, NOT_LEARNED_IDS, MonitorConfig
from cg_tf.robust.aggregators import Winsorized
from cg_tf.training.trainer import TrainConfig, Trainer


def train(data_dir, model_dir, **monitor):
    cfg = TrainConfig(data_dir=str(data_dir), model_dir=str(model_dir), fc_widths=(32,),
                      aggregator=Winsorized(c=2), batch_size=50, epochs=2,
                      learning_rate=0.5, input=InputOptions(eval_sample_size=200),
                      monitor=MonitorConfig(**monitor))
    trainer = Trainer(cfg)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "wins"
    trainer, summary = train(digits_dir, model_dir, probe_max_share=1.0)
    return trainer, summary, str(model_dir)


def test_every_metric_is_written_at_every_evaluation(run):
    trainer, summary, model_dir = run
    (r,) = report.load_runs(os.path.dirname(model_dir))
    schedule = trainer.monitor.schedule(trainer.total_steps)
    assert schedule[:3] == [1, 2, 4] and schedule[-1] == summary["steps"]
    wanted = [tags.eval_tag(s, m) for s in tags.SUBSETS
              for m in ("accuracy", "true_label_accuracy", "loss")]
    wanted += [tags.ADJUSTED_OVERFIT, tags.COHERENCE, tags.layer_coherence_tag("dense_0"),
               tags.update_share_tag("mean", "pristine"),
               tags.update_share_tag("aggregate", "corrupt"),
               tags.clipped_fraction_tag("corrupt"), tags.removed_mass_tag("pristine"),
               tags.learned_fraction_tag("corrupt"), tags.stayed_fraction_tag("pristine"),
               tags.PROBE_SHARE, tags.EVAL_SHARE]
    for tag in wanted:  # probe_max_share=1: the probe runs at every evaluation too
        assert [s for s, _ in r.scalars[tag]] == schedule, tag
    assert tags.eval_tag("test", "top5") not in r.scalars  # 10 classes: no top-5
    assert r.config["aggregator"]["name"] == "winsorized" and r.config["noise"]["rate"] == 0.5
    # The last evaluation is the final model's: the summary agrees.
    assert r.last(tags.eval_tag("corrupt", "accuracy")) == pytest.approx(
        summary["corrupt_accuracy"], abs=1e-6)
    assert r.last(tags.ADJUSTED_OVERFIT) == pytest.approx(metrics.adjusted_overfit(
        summary["mixed_accuracy"], summary["test_accuracy"], 0.5, 10), abs=1e-6)


def test_learning_events_follow_the_evaluations(run):
    trainer, _, model_dir = run
    with open(os.path.join(model_dir, LEARNING_EVENTS)) as f:
        rows = list(csv.DictReader(f))
    schedule = set(trainer.monitor.schedule(trainer.total_steps))
    by_group = {g: [r for r in rows if r["group"] == g] for g in tags.GROUPS}
    assert len(by_group["pristine"]) == 200 and len(by_group["corrupt"]) == 200
    for r in rows:
        first, since = int(r["first_learned_step"]), int(r["learned_for_good_step"])
        stayed = r["stayed_learned"] == "1"
        assert first == metrics.NOT_LEARNED or first in schedule
        assert since == metrics.NOT_LEARNED or (since in schedule and since >= first >= 1)
        assert stayed == (since == first != metrics.NOT_LEARNED)
    # Examples learned for good are those classified as their training label at the end.
    final = trainer.monitor.evaluate()
    for group, ids in trainer.monitor.ids.items():
        first, since, stayed = trainer.monitor.events.of(group)
        np.testing.assert_array_equal(since != metrics.NOT_LEARNED, final[group]["correct"])
        assert final[group]["correct"][stayed].all()
        learned = np.mean(first != metrics.NOT_LEARNED)
        assert learned >= final[group]["accuracy"] - 1e-9
    pristine_learned = np.mean([int(r["first_learned_step"]) >= 0 for r in by_group["pristine"]])
    corrupt_learned = np.mean([int(r["first_learned_step"]) >= 0 for r in by_group["corrupt"]])
    assert pristine_learned > 0.9 > corrupt_learned


def test_learned_export_partitions_the_training_set(run):
    trainer, summary, model_dir = run
    read = lambda name: open(os.path.join(model_dir, name)).read().split()  # noqa: E731
    learned, not_learned = read(LEARNED_IDS), read(NOT_LEARNED_IDS)
    ids, correct = [], []
    for batch in trainer.reader.examples():
        ids += [i.decode() for i in batch["example_id"].numpy()]
        correct += list(metrics.evaluate(trainer.model.net, [batch])["correct"])
    assert sorted(learned + not_learned) == sorted(ids)
    assert set(learned) == {i for i, ok in zip(ids, correct) if ok}
    assert summary["learned_examples"] == {"learned": len(learned),
                                           "not_learned": len(not_learned)}


def test_the_probe_keeps_to_its_time_budget(digits_dir, tmp_path):
    trainer, summary = train(digits_dir, tmp_path / "r", probe_max_share=0.01,
                             export_learned=False)
    (r,) = report.load_runs(str(tmp_path))
    probed = [s for s, _ in r.scalars[tags.COHERENCE]]
    evaluated = [s for s, _ in r.scalars[tags.eval_tag("test", "accuracy")]]
    assert probed[0] == 1 and len(probed) < len(evaluated)
    # Past the first (tracing) probe, a probe starts only within the budget, so
    # the share exceeds it by at most one probe.
    assert summary["time_shares"]["probe"] < 0.05
    assert not os.path.exists(tmp_path / "r" / LEARNED_IDS)


def test_bad_monitor_flags_fail_before_training(digits_dir, tmp_path):
    # Built in Python (MonitorConfig): the errors name the fields as Python does.
    for kw, message in (({"probe_max_share": 0}, "^probe_max_share must be in"),
                        ({"eval_every": 0}, "^eval_every must be positive"),
                        ({"probe_size": -1}, "^probe_size must be >= 0")):
        with pytest.raises(ValueError, match=message):
            train(digits_dir, tmp_path / "bad", **kw)
        assert not os.path.exists(tmp_path / "bad")


def test_evaluation_equals_a_plain_computation_and_traces_once(run):
    """Each subset's metrics are those of the logits of its examples (the
    mixed subset's taken from the tracked ones', without a pass of its own),
    and evaluating again runs the function traced before."""
    import tensorflow as tf
    trainer, _, _ = run
    monitor, net = trainer.monitor, trainer.model.net
    assert monitor._mixed_index is not None  # the mixed subset is not evaluated apart
    logits_of = tf.function(lambda x: net(x, training=False))
    first_batch = next(iter(monitor.subsets["test"]))["image"]
    traced = metrics._eval_fn(net, first_batch)
    traces = traced.experimental_get_tracing_count()
    got = monitor.evaluate()
    assert traced.experimental_get_tracing_count() == traces == 1
    assert list(got) == list(tags.SUBSETS)
    for name, subset in monitor.subsets.items():
        logits, labels, true_labels = [], [], []
        for batch in subset:
            logits.append(logits_of(batch["image"]).numpy())
            labels.append(batch["label"].numpy())
            true_labels.append(batch["true_label"].numpy())
        logits, labels, true_labels = map(np.concatenate, (logits, labels, true_labels))
        shifted = logits - logits.max(1, keepdims=True)
        losses = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(labels)), labels]
        pred = logits.argmax(1)
        np.testing.assert_array_equal(got[name]["correct"], pred == labels, err_msg=name)
        assert got[name]["count"] == len(labels)
        assert got[name]["accuracy"] == np.mean(pred == labels), name
        assert got[name]["true_label_accuracy"] == np.mean(pred == true_labels), name
        assert got[name]["loss"] == pytest.approx(losses.mean(), rel=1e-5), name
    # A subset on its own gives the values it gives among the others.
    alone = monitor.evaluate(["mixed"])
    assert list(alone) == ["mixed"]
    for key in ("accuracy", "true_label_accuracy", "loss", "count"):
        assert alone["mixed"][key] == got["mixed"][key], key


def test_the_test_split_can_be_evaluated_less_often(digits_dir, tmp_path):
    trainer, summary = train(digits_dir, tmp_path / "r", eval_every=10, test_eval_every=20,
                             probe_size=0, export_learned=False)
    (r,) = report.load_runs(str(tmp_path))
    total = trainer.total_steps
    assert total % 20  # the last step is not one of the test split's: evaluated at the end
    schedule = trainer.monitor.schedule(total)
    assert [s for s, _ in r.scalars[tags.eval_tag("corrupt", "accuracy")]] == schedule
    assert [s for s, _ in r.scalars[tags.eval_tag("mixed", "loss")]] == schedule
    test_steps = [s for s in schedule if s % 20 == 0 or s == total]
    assert [s for s, _ in r.scalars[tags.eval_tag("test", "accuracy")]] == test_steps
    assert [s for s, _ in r.scalars[tags.ADJUSTED_OVERFIT]] == test_steps
    assert r.last(tags.eval_tag("test", "accuracy")) == pytest.approx(summary["test_accuracy"],
                                                                      abs=1e-6)
    assert summary["subset_sizes"]["test"] > 0
    with pytest.raises(ValueError, match="--test_eval_every=15 is not a multiple"):
        train(digits_dir, tmp_path / "bad", eval_every=10, test_eval_every=15)
    with pytest.raises(ValueError, match="^test_eval_every must be positive"):
        MonitorConfig(test_eval_every=0)
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.parametrize("factor", [0.5, 1.0, -1.0, float("nan")])
def test_a_growth_warning_that_could_fire_on_a_shrinking_norm_is_refused(factor):
    """--warn_growth=0.5 warned of growth when a layer's norm had halved."""
    with pytest.raises(ValueError, match=rf"^warn_growth must be 0 \(never warn\) or a factor "
                                         rf"above 1, got {factor}"):
        MonitorConfig(warn_growth=factor)
    MonitorConfig(warn_growth=0)
    MonitorConfig(warn_growth=1.5)
