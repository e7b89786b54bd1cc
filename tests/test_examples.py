"""The tracked examples the Memorization tab shows: thumbnails and states
(cg_tf.measure.examples), and the plugin's rows of them."""

import json

import numpy as np
import pytest
import tensorflow as tf

from cg_tf.measure import examples, metrics
from cg_tf.measure.monitor import LearningEvents
from cg_tf.tensorboard_plugin.plugin import example_rows


def test_pixels_of_unit_range_images_keep_their_values_others_are_stretched():
    unit = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    assert examples.thumbnail_pixels(unit)[..., 0].tolist() == [[0, 128], [255, 64]]
    standardized = unit * 4 - 2  # [-2, 2]: stretched from min to max
    assert examples.thumbnail_pixels(standardized)[..., 0].tolist() == [[0, 128], [255, 64]]
    flat = np.full([3, 3, 3], 7.0)
    assert not examples.thumbnail_pixels(flat).any()
    for not_an_image in (np.zeros([10]), np.zeros([4, 4, 5]), np.zeros([1, 8])):
        assert examples.thumbnail_pixels(not_an_image) is None
        assert examples.thumbnail(not_an_image) == b""


@pytest.mark.parametrize("shape, side", [((224, 160, 3), (48, 34, 3)), ((28, 28), (28, 28, 1)),
                                         ((60, 30, 1), (48, 24, 1))])
def test_a_thumbnail_is_a_png_at_most_48_pixels_a_side(shape, side):
    rng = np.random.default_rng(0)
    png = examples.thumbnail(rng.uniform(size=shape).astype(np.float32))
    decoded = tf.io.decode_png(png).numpy()
    assert decoded.shape == side
    if shape[:2] == side[:2]:  # not resized: the pixels themselves
        image = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
        assert np.array_equal(decoded[..., 0], np.round(image.reshape(side)[..., 0] * 255))


def heads(sizes, rng):
    return {g: {"image": rng.uniform(size=[n, 6, 6]).astype(np.float32),
                "example_id": np.array([f"{g}-{i}".encode() for i in range(n)]),
                "label": rng.integers(0, 3, n), "true_label": rng.integers(0, 3, n)}
            for g, n in sizes.items()}


def test_shown_examples_and_their_states_follow_the_learning_events():
    rng = np.random.default_rng(1)
    tracked = {"pristine": 5, "corrupt": 2}
    shown = examples.Shown(heads(tracked, rng), 3, class_names=("a", "b", "c"))
    assert shown.counts == {"pristine": 3, "corrupt": 2} and len(shown) == 5
    records = shown.records()
    index = json.loads(records[0])
    assert index["ids"] == ["pristine-0", "pristine-1", "pristine-2", "corrupt-0", "corrupt-1"]
    assert index["groups"] == ["pristine"] * 3 + ["corrupt"] * 2
    assert len(records) == 6 and all(r[:8] == b"\x89PNG\r\n\x1a\n" for r in records[1:])
    events = LearningEvents(tracked)
    history = {g: rng.integers(0, 2, [4, n]).astype(bool) for g, n in tracked.items()}
    for k, step in enumerate((1, 2, 4, 8)):
        results = {g: {"prediction": rng.integers(0, 3, n)} for g, n in tracked.items()}
        for g in tracked:
            events.update(g, history[g][k], step)
        states = shown.states(results, events)
        assert states.shape == (3, 5) and states.dtype == np.int64
        expected_first = np.concatenate([events.of(g)[0][:shown.counts[g]] for g in tracked])
        expected_since = np.concatenate([events.of(g)[1][:shown.counts[g]] for g in tracked])
        predictions = np.concatenate([results[g]["prediction"][:shown.counts[g]]
                                      for g in tracked])
        assert np.array_equal(states, np.stack([predictions, expected_first, expected_since]))
    # The plugin's rows: names, steps (None where not learned), a data URL.
    rows = example_rows(index, records[1:], states.tolist())
    assert [r["id"] for r in rows] == index["ids"]
    for r, p, f, s in zip(rows, *states.tolist()):
        assert r["prediction"] == p and r["prediction_name"] == "abc"[p]
        assert r["first_learned"] == (None if f == metrics.NOT_LEARNED else f)
        assert r["learned_for_good"] == (None if s == metrics.NOT_LEARNED else s)
        assert r["thumbnail"].startswith("data:image/png;base64,")
    assert {r["label_name"] for r in rows} <= set("abc")
