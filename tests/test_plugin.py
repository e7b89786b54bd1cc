"""The Memorization plugin's routes, through TensorBoard's own WSGI app and
data provider, on event files written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, plugin_client

from cg_tf.measure import metrics, tags
from cg_tf.measure.monitor import write_histogram, write_plugin_tensor, write_run_config

BASE = "/data/plugin/memorization"
RUNS = {"mean": ("mean", 0, [0.2, 0.6, 0.9]), "winsorized, c=4": ("winsorized", 4, [0.1, 0.1, 0.05])}


PNG = tf.io.encode_png(tf.zeros([4, 4, 1], tf.uint8)).numpy()
EXAMPLES = [json.dumps({"ids": ["p0", "p1", "c0"], "groups": ["pristine", "pristine", "corrupt"],
                        "labels": [1, 2, 0], "true_labels": [1, 2, 2],
                        "class_names": ["zero", "one", "two"]}).encode(), PNG, PNG, b""]
# [prediction, first learned, learned for good] per example, by step.
# (At step 5 the run showed 2: --examples_shown changed on a resume.)
STATES = {1: [[0, 2, 2], [-1, -1, -1], [-1, -1, -1]], 5: [[0, 2], [-1, -1], [-1, -1]],
          10: [[1, 2, 0], [10, 1, 10], [10, 1, 10]], 20: [[1, 0, 0], [10, 1, 10], [10, -1, 10]]}


def write_runs(logdir):
    for run, (name, c, corrupt) in RUNS.items():
        writer = tf.summary.create_file_writer(str(logdir / run))
        # The records Aggregator.to_json makes: mean has no parameter.
        write_run_config(writer, {"aggregator": {"name": name, **({"c": c} if c else {})},
                                  "noise": {"rate": 0.5}, "labels_changed": 0.45,
                                  "num_classes": 10,
                                  "tracked": {"pristine": 30, "corrupt": 30}})
        with writer.as_default():
            for i, step in enumerate((1, 10, 20)):
                tf.summary.scalar(tags.eval_tag("pristine", "accuracy"), 0.5 + 0.2 * i, step)
                tf.summary.scalar(tags.eval_tag("corrupt", "accuracy"), corrupt[i], step)
                tf.summary.scalar(tags.eval_tag("test", "accuracy"), 0.4 + 0.2 * i, step)
                tf.summary.scalar(tags.ADJUSTED_OVERFIT, corrupt[i] / 2, step)
                tf.summary.scalar(tags.COHERENCE, float("nan") if i == 0 else 1.5, step)
                for group in tags.GROUPS:
                    write_histogram(tags.learned_for_good_tag(group), metrics.log_histogram(
                        np.arange(1, 5 + step), np.arange(1, step + 1), bins=4), step, "")
        if run == "mean":  # the other shows no examples (an older cg_tf)
            with writer.as_default():
                write_plugin_tensor(tags.EXAMPLES, EXAMPLES, 0)
                for step, states in STATES.items():
                    write_plugin_tensor(tags.EXAMPLE_STATES, np.array(states, np.int64), step)
        writer.close()
    (logdir / "not_a_cg_tf_run").mkdir()
    with tf.summary.create_file_writer(str(logdir / "not_a_cg_tf_run")).as_default():
        tf.summary.scalar("loss", 1.0, step=1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logdir")
    write_runs(logdir)
    return plugin_client(logdir)


def get(client, path, status=200):
    response = client.get(BASE + path)
    assert response.status_code == status, response.get_data(as_text=True)
    return response


def test_the_tab_is_active_only_with_cg_tf_runs(client):
    listing = json.loads(client.get("/data/plugins_listing").get_data())
    assert listing["memorization"]["enabled"]
    assert listing["memorization"]["tab_name"] == "Memorization"
    module = listing["memorization"]["loading_mechanism"]["module_path"]
    assert get(client, module.removeprefix(BASE)).mimetype == "text/javascript"


def test_runs_lists_configs_and_tags(client):
    runs = json.loads(get(client, "/runs").get_data())["runs"]
    assert [r["name"] for r in runs] == ["mean", "winsorized, c=4"]
    assert runs[1]["config"]["aggregator"] == {"name": "winsorized", "c": 4}
    assert tags.eval_tag("corrupt", "accuracy") in runs[0]["tags"]


def test_scalars_of_several_runs(client):
    tag = tags.eval_tag("corrupt", "accuracy")
    data = json.loads(get(client, f"/scalars?tag={tag}&runs=mean&runs=winsorized%2C%20c%3D4").get_data())
    assert data["winsorized, c=4"] == [[1, pytest.approx(0.1)], [10, pytest.approx(0.1)],
                                     [20, pytest.approx(0.05)]]
    assert [p[0] for p in data["mean"]] == [1, 10, 20]
    # NaN becomes null: the answer stays valid JSON.
    coherence = json.loads(get(client, f"/scalars?tag={tags.COHERENCE}").get_data())
    assert coherence["mean"][0] == [1, None] and coherence["mean"][1] == [10, 1.5]


def test_histograms_are_the_latest(client):
    data = json.loads(get(client, "/histograms?run=mean").get_data())
    assert set(data) == set(tags.GROUPS)
    assert data["pristine"]["step"] == 20 and data["pristine"]["tracked"] == 30
    buckets = np.array(data["pristine"]["buckets"])
    # Steps 1..24 on 4 log-spaced buckets over [1, 20] (those past the end in the last).
    np.testing.assert_allclose(buckets, metrics.log_histogram(np.arange(1, 25),
                                                              np.arange(1, 21), bins=4))
    np.testing.assert_allclose(buckets[[0, -1], [0, 1]], [1, 20])
    assert buckets[:, 2].sum() == 24


def test_table_has_final_values(client):
    rows = json.loads(get(client, "/table").get_data())["rows"]
    by_run = {r["run"]: r for r in rows}
    assert by_run["winsorized, c=4"]["aggregator"] == "winsorized:4"
    assert by_run["mean"]["aggregator"] == "plain SGD"
    assert by_run["winsorized, c=4"]["corrupt accuracy"] == pytest.approx(0.05)
    assert by_run["mean"]["test accuracy"] == pytest.approx(0.8)
    assert by_run["mean"]["adjusted overfit"] == pytest.approx(0.45)
    assert by_run["mean"]["step"] == 20 and by_run["mean"]["noise_rate"] == 0.5
    assert by_run["mean"]["labels_changed"] == 0.45  # the rate asked and what it changed


def test_examples_at_an_evaluation(client):
    last = json.loads(get(client, "/examples?run=mean").get_data())
    assert last["steps"] == [1, 5, 10, 20] and last["step"] == 20
    assert last["class_names"] == ["zero", "one", "two"]
    rows = last["examples"]
    assert [(r["id"], r["group"], r["label_name"], r["true_label_name"]) for r in rows] == [
        ("p0", "pristine", "one", "one"), ("p1", "pristine", "two", "two"),
        ("c0", "corrupt", "zero", "two")]
    assert [r["prediction"] for r in rows] == [1, 0, 0]
    assert [r["first_learned"] for r in rows] == [10, 1, 10]
    assert [r["learned_for_good"] for r in rows] == [10, None, 10]
    assert rows[0]["thumbnail"].startswith("data:image/png;base64,")
    assert rows[2]["thumbnail"] is None  # not an image
    first = json.loads(get(client, "/examples?run=mean&step=1").get_data())
    assert first["step"] == 1 and all(r["learned_for_good"] is None for r in first["examples"])
    older = json.loads(get(client, "/examples?run=winsorized%2C%20c%3D4").get_data())
    assert older == {"steps": [], "examples": []}


@pytest.mark.parametrize("path,message", [
    ("/scalars?tag=eval/corrupt/accuracy&runs=nope", "unknown run(s): nope"),
    ("/scalars?tag=eval/corrupt/accuracy&runs=not_a_cg_tf_run", "not_a_cg_tf_run"),
    ("/scalars?tag=no/such/tag", "unknown tag"),
    ("/scalars?tag=eval/corrupt/accuracy&runs=", "(none given)"),
    ("/scalars?tag=eval/corrupt/accuracy&runs=mean,winsorized", "unknown run(s): mean,winsorized"),
    ("/histograms?run=", "unknown run"),
    ("/histograms", "unknown run"),
    ("/table?runs=mean&runs=../../etc", "unknown run(s): ../../etc"),
    ("/table?runs=mean%00", "unknown run(s): mean\x00"),
    ("/examples?run=nope", "unknown run: 'nope'"),
    ("/examples?run=mean&step=7", "step '7' is not an evaluation of 'mean' that TensorBoard "
                                  "kept (1, 5, 10, 20)"),
    ("/examples?run=mean&step=5", "'mean' showed 2 examples at step 5 and 3 since its last "
                                  "start (--examples_shown changed on a resume)"),
    ("/examples?run=mean&step=-1", "step '-1' is not an evaluation"),
    ("/examples?run=mean&step=1e1", "step '1e1' is not an evaluation"),
])
def test_bad_parameters_get_400_with_a_message(client, path, message):
    response = get(client, path, status=400)
    assert message in json.loads(response.get_data())["error"]


@pytest.mark.parametrize("path,status", [
    ("/static/../plugin.py", 400),
    ("/static/%2e%2e/plugin.py", 400),
    ("/static/..%2f..%2f__init__.py", 400),
    ("/static//etc/passwd", 400),
    ("/static/%00", 400),
    ("/static/index.js%00.html", 400),
    ("/static/index.js%0a", 400),
    ("/static/..", 400),
    ("/static/missing.js", 404),
    ("/static/", 404),
])
def test_static_files_refuse_traversal(client, path, status):
    get(client, path, status=status)


def test_the_tab_is_served_from_a_checkout_reached_through_a_symlink(tmp_path):
    link = tmp_path / "checkout"
    link.symlink_to(REPO)
    code = ("import sys; from werkzeug import test, wrappers\n"
            "from cg_tf.tensorboard_plugin import plugin\n"
            "assert plugin.__file__.startswith(sys.argv[1]), plugin.__file__\n"
            "app = plugin.MemorizationPlugin.__new__(plugin.MemorizationPlugin)._serve_static\n"
            "r = test.Client(app).get('/data/plugin/memorization/static/index.js')\n"
            "print(r.status_code, r.mimetype)")
    done = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(link)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["200", "text/javascript"]


def test_the_plugin_loads_without_tensorflow():
    """TensorBoard can serve the tab where TensorFlow is not installed: the
    plugin and what it imports name aggregators from their records alone."""
    code = ("import sys; import cg_tf.tensorboard_plugin.plugin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_runs_fill_tensorboards_hparams_dashboard(tmp_path):
    """Two runs of the Python face (plain SGD and winsorized c=2 @hidden), read
    through TensorBoard's own HParams plugin: one session group a run, with
    its settings and its metrics, the peak test accuracy among them."""
    import keras
    from tensorboard.plugins.hparams import hparams_plugin

    from cg_tf.data.arrays import ArrayData
    from cg_tf.data.noise import corrupt_labels
    from cg_tf.measure import hparams
    from cg_tf.measure.callback import MemorizationCallback
    from cg_tf.measure.monitor import MonitorConfig
    from cg_tf.robust.aggregators import Mean, Winsorized
    from cg_tf.training.robust_model import RobustModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    noisy, _ = corrupt_labels(y, 0.4, num_classes=4, seed=0)
    data = ArrayData(x, noisy, y, batch_size=30, test=(x[:60], y[:60]), eval_sample_size=60)
    for name, aggregator in (("mean", Mean()), ("winsorized", Winsorized(2, layers="hidden"))):
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dense(4)])
        model = RobustModel(net, aggregator)
        model.compile(optimizer=keras.optimizers.SGD(0.3))
        model.fit(x, noisy, batch_size=30, epochs=3, verbose=0, callbacks=[MemorizationCallback(
            data, str(tmp_path / name), MonitorConfig(eval_log_spaced=False, probe_size=0))])
    client = plugin_client(tmp_path, hparams_plugin.HParamsPlugin)

    def post(route, body):
        response = client.post(f"/data/plugin/hparams/{route}", data=json.dumps(body),
                               content_type="application/json")
        assert response.status_code == 200, response.get_data(as_text=True)
        return json.loads(response.get_data(as_text=True))

    experiment = post("experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"aggregator", "aggregator_parameter", "layers", "noise_rate", "steps"} <= columns
    metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metric_tags == list(hparams.METRICS)
    groups = post("session_groups", {"startIndex": 0, "sliceSize": 10, "allowedStatuses": [
        "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": h} for h in columns] + [
            {"metric": {"tag": t, "group": ""}} for t in metric_tags]})["sessionGroups"]
    by_aggregator = {g["hparams"]["aggregator"]: g for g in groups}
    assert set(by_aggregator) == {"plain SGD", "winsorized"}
    # The trial is named after the run's directory (its last three parts).
    assert by_aggregator["plain SGD"]["name"].endswith(f"{tmp_path.name}/mean")
    winsorized = by_aggregator["winsorized"]
    assert winsorized["hparams"]["aggregator_parameter"] == 2
    assert winsorized["hparams"]["layers"] == "hidden" and winsorized["hparams"]["steps"] == 12
    assert winsorized["hparams"]["noise_rate"] == pytest.approx(0.4, abs=0.05)
    metrics_of = {m["name"]["tag"]: m["value"] for m in winsorized["metricValues"]}
    summary = json.loads((tmp_path / "winsorized" / "summary.json").read_text())
    assert metrics_of[tags.eval_tag("test", "accuracy")] == pytest.approx(
        summary["test_accuracy"], abs=1e-6)
    assert metrics_of[hparams.PEAK_TEST_ACCURACY] >= metrics_of[tags.eval_tag("test", "accuracy")]
