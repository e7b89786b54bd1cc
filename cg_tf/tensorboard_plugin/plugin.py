"""TensorBoard's Memorization tab: the papers' curves for several runs side by side.

Reads only through TensorBoard's data provider: the scalars and histograms a
run writes (names in cg_tf.measure.tags) and its configuration (a tensor summary under
this plugin's name, whose presence makes the tab active). Every query parameter
is checked against the data (400 with a message otherwise); static files are
served from this package's `static/` only.
"""

import base64
import json
import math
import os
import re

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from cg_tf.measure import report, tags

# Resolved, as the requested paths are (a checkout reached through a symlink).
STATIC_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "static")
# One file name: letters, digits, '_', '-', '.'; no separator, null byte or control character.
STATIC_NAME = re.compile(r"[\w.-]*", re.ASCII)
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
MAX_POINTS = 1000  # per curve; the last point is always kept


class BadRequest(ValueError):
    """A query parameter that does not name existing data."""


class MemorizationPlugin(base_plugin.TBPlugin):
    plugin_name = tags.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js",
                                            tab_name="Memorization")

    def get_plugin_apps(self):
        return {"/static/*": self._serve_static, "/runs": self._serve_runs,
                "/scalars": self._serve_scalars, "/histograms": self._serve_histograms,
                "/table": self._serve_table, "/examples": self._serve_examples}

    def is_active(self):
        return False  # Active through data: the run config tensors (data_plugin_names).

    # -- reading --------------------------------------------------------------

    @staticmethod
    def _where(request):
        return {"ctx": plugin_util.context(request.environ),
                "experiment_id": plugin_util.experiment_id(request.environ)}

    def _configs(self, where) -> dict[str, dict]:
        """{run: its configuration} for every run of this project."""
        return report.read_configs(self._provider, **where)

    @staticmethod
    def _runs(request, configs: dict[str, dict]) -> list[str]:
        """The `runs` parameters (one run each, any name; default: all), checked."""
        if "runs" not in request.args:
            return sorted(configs)
        runs = [r for r in request.args.getlist("runs") if r]
        unknown = [r for r in runs if r not in configs]
        if unknown or not runs:
            raise BadRequest(f"unknown run(s): {', '.join(unknown) or '(none given)'}")
        return runs

    def _scalars(self, where, runs: list[str], tag_list: list[str]):
        return self._provider.read_scalars(
            where["ctx"], experiment_id=where["experiment_id"], plugin_name="scalars",
            downsample=MAX_POINTS, run_tag_filter=provider.RunTagFilter(runs=runs, tags=tag_list))

    def _scalar_tags(self, where, runs: list[str]) -> dict[str, list[str]]:
        """{run: its scalar tags}."""
        listing = self._provider.list_scalars(
            where["ctx"], experiment_id=where["experiment_id"], plugin_name="scalars",
            run_tag_filter=provider.RunTagFilter(runs=runs))
        return {run: sorted(by_tag) for run, by_tag in listing.items()}

    # -- routes ---------------------------------------------------------------

    def _json(self, request, handler):
        try:
            body, code = handler(self._where(request)), 200
        except BadRequest as e:
            body, code = {"error": str(e)}, 400
        return http_util.Respond(request, json.dumps(_clean(body), allow_nan=False),
                                 "application/json", code=code)

    @wrappers.Request.application
    def _serve_runs(self, request):
        def handler(where):
            configs = self._configs(where)
            scalar_tags = self._scalar_tags(where, sorted(configs))
            return {"runs": [{"name": run, "config": configs[run],
                              "tags": scalar_tags.get(run, [])} for run in sorted(configs)]}
        return self._json(request, handler)

    @wrappers.Request.application
    def _serve_scalars(self, request):
        """?tag=T[&runs=a&runs=b]: {run: [[step, value], ...]} for the runs that have T."""
        def handler(where):
            runs = self._runs(request, self._configs(where))
            tag = request.args.get("tag", "")
            if not any(tag in t for t in self._scalar_tags(where, runs).values()):
                raise BadRequest(f"unknown tag: {tag!r}")
            data = self._scalars(where, runs, [tag])
            return {run: [[d.step, _finite(d.value)] for d in by_tag[tag]]
                    for run, by_tag in data.items() if tag in by_tag}
        return self._json(request, handler)

    @wrappers.Request.application
    def _serve_histograms(self, request):
        """?run=R: the latest histogram, on log-spaced steps, of the step each
        tracked pristine and corrupt example was learned for good, and how many
        are tracked: {group: {"step": s, "buckets": [[left, right, count], ...],
        "tracked": n}}."""
        def handler(where):
            run = request.args.get("run", "")
            configs = self._configs(where)
            if run not in configs:
                raise BadRequest(f"unknown run: {run!r}")
            wanted = [tags.learned_for_good_tag(g) for g in tags.GROUPS]
            data = self._provider.read_tensors(
                where["ctx"], experiment_id=where["experiment_id"], plugin_name="histograms",
                downsample=1, run_tag_filter=provider.RunTagFilter(runs=[run], tags=wanted))
            by_tag, tracked = data.get(run, {}), configs[run].get("tracked", {})
            return {g: {"step": by_tag[t][-1].step, "buckets": by_tag[t][-1].numpy.tolist(),
                        "tracked": tracked.get(g)}
                    for g, t in zip(tags.GROUPS, wanted) if by_tag.get(t)}
        return self._json(request, handler)

    @wrappers.Request.application
    def _serve_table(self, request):
        """[row per run]: the final accuracies and adjusted overfit."""
        def handler(where):
            configs = self._configs(where)
            runs = report.read_runs(self._provider, **where, configs=configs,
                                    runs=self._runs(request, configs),
                                    tag_list=list(tags.TABLE_COLUMNS.values()),
                                    downsample=MAX_POINTS)
            return {"rows": report.table(runs)}
        return self._json(request, handler)

    @wrappers.Request.application
    def _serve_examples(self, request):
        """?run=R[&step=S]: the tracked examples the run shows, at its
        evaluation S (default: the last one TensorBoard kept; it keeps 10
        evaluations a run unless started with --samples_per_plugin=
        memorization=0): {"steps": [the kept evaluations], "step": S,
        "class_names": [...], "examples": [example_rows' rows]}; {"steps": [],
        "examples": []} for a run that shows none (--examples_shown=0, or an
        older cg_tf); a 400 for an evaluation of another number of examples
        than the index (--examples_shown changed on a resume)."""
        def handler(where):
            run = request.args.get("run", "")
            if run not in self._configs(where):
                raise BadRequest(f"unknown run: {run!r}")
            data = self._provider.read_tensors(
                where["ctx"], experiment_id=where["experiment_id"], plugin_name=tags.PLUGIN_NAME,
                downsample=MAX_POINTS,
                run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tags.EXAMPLES,
                                                                       tags.EXAMPLE_STATES]))
            by_tag = data.get(run, {})
            if not by_tag.get(tags.EXAMPLES) or not by_tag.get(tags.EXAMPLE_STATES):
                return {"steps": [], "examples": []}
            states = {d.step: d.numpy for d in by_tag[tags.EXAMPLE_STATES]}
            steps = sorted(states)
            step = request.args.get("step", str(steps[-1]))
            if not step.isdigit() or int(step) not in states:
                raise BadRequest(f"step {step!r} is not an evaluation of {run!r} that "
                                 f"TensorBoard kept ({', '.join(map(str, steps))})")
            records = list(by_tag[tags.EXAMPLES][-1].numpy)
            index = json.loads(records[0])
            shown = len(states[int(step)][0])
            if shown != len(index["ids"]):
                raise BadRequest(f"{run!r} showed {shown} examples at step {step} and "
                                 f"{len(index['ids'])} since its last start (--examples_shown "
                                 "changed on a resume): choose a step of the last start")
            return {"steps": steps, "step": int(step), "class_names": index["class_names"],
                    "examples": example_rows(index, records[1:], states[int(step)].tolist())}
        return self._json(request, handler)

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/static/", 1)[-1]
        if not STATIC_NAME.fullmatch(name):
            return http_util.Respond(request, f"not a static file: {name!r}", "text/plain",
                                     code=400)
        path = os.path.realpath(os.path.join(STATIC_DIR, name))
        ext = os.path.splitext(path)[1]
        if os.path.dirname(path) != STATIC_DIR:
            return http_util.Respond(request, f"not a static file: {name!r}", "text/plain",
                                     code=400)
        if ext not in STATIC_TYPES or not os.path.isfile(path):
            return http_util.Respond(request, f"no such file: {name!r}", "text/plain", code=404)
        with open(path, "rb") as f:
            return http_util.Respond(request, f.read(), STATIC_TYPES[ext])


def example_rows(index: dict, thumbnails: list[bytes], states: list[list[int]]) -> list[dict]:
    """One row per shown example: its id, group, labels (and their names),
    thumbnail (a PNG data URL, or None), and at the evaluation of `states`
    ([prediction, first learned, learned for good] rows) its prediction and
    the steps it was first learned and learned for good (None: not)."""
    names = index.get("class_names") or []

    def name(label: int) -> str:
        return names[label] if 0 <= label < len(names) else str(label)

    def learned(step: int) -> int | None:
        return None if step < 0 else step  # metrics.NOT_LEARNED is -1

    prediction, first, since = states
    return [{"id": i, "group": g, "label": y, "true_label": t, "prediction": p,
             "label_name": name(y), "true_label_name": name(t), "prediction_name": name(p),
             "first_learned": learned(f), "learned_for_good": learned(s),
             "thumbnail": "data:image/png;base64," + base64.b64encode(png).decode()
             if png else None}
            for i, g, y, t, png, p, f, s in zip(index["ids"], index["groups"], index["labels"],
                                                index["true_labels"], thumbnails, prediction,
                                                first, since)]


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(value):
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
