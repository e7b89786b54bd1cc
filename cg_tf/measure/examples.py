"""The tracked examples themselves, for the Memorization tab: the first few of
each tracked group (pristine, corrupt), each with a thumbnail, its noisy and
true label, and at every evaluation its prediction, the step it was first
classified as its training label and the step since which it has been so at
every evaluation (learned for good). What the monitor writes of them
(tags.EXAMPLES at the start, tags.EXAMPLE_STATES at each evaluation) is
bounded by the number shown: a thumbnail of at most THUMBNAIL_SIDE pixels a
side each, then 24 bytes an example an evaluation.
"""

import json

import numpy as np
import tensorflow as tf

THUMBNAIL_SIDE = 48  # pixels, the longer side; smaller images keep their size
STATE_ROWS = ("prediction", "first_learned", "learned_for_good")


def thumbnail_pixels(image: np.ndarray) -> np.ndarray | None:
    """An image (h, w) or (h, w, 1 or 3) as uint8 pixels (h, w, c): values in
    [0, 1] are taken as such, others stretched from their min to their max;
    None for data that is not an image."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or min(image.shape[:2]) < 2:
        return None
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def thumbnail(image: np.ndarray) -> bytes:
    """PNG bytes of an image at most THUMBNAIL_SIDE pixels a side (b"" for data
    that is not an image)."""
    pixels = thumbnail_pixels(image)
    if pixels is None:
        return b""
    h, w = pixels.shape[:2]
    if max(h, w) > THUMBNAIL_SIDE:
        size = [max(1, round(h * THUMBNAIL_SIDE / max(h, w))),
                max(1, round(w * THUMBNAIL_SIDE / max(h, w)))]
        pixels = tf.cast(tf.round(tf.image.resize(pixels, size, antialias=True)), tf.uint8)
    return tf.io.encode_png(pixels).numpy()


class Shown:
    """The examples a run shows: the first `count` of each tracked group's
    evaluation subset (`heads`: the first examples' image, example_id, label
    and true_label, by group)."""

    def __init__(self, heads: dict[str, dict], count: int, class_names=()):
        self.counts = {g: min(count, len(h["label"])) for g, h in heads.items()}
        self.index = {"ids": [], "groups": [], "labels": [], "true_labels": [],
                      "class_names": list(class_names)}
        self.thumbnails = []
        for group, head in heads.items():
            n = self.counts[group]
            self.index["ids"] += [i.decode() if isinstance(i, bytes) else str(i)
                                  for i in np.asarray(head["example_id"])[:n]]
            self.index["groups"] += [group] * n
            self.index["labels"] += [int(v) for v in np.asarray(head["label"])[:n]]
            self.index["true_labels"] += [int(v) for v in np.asarray(head["true_label"])[:n]]
            self.thumbnails += [thumbnail(x) for x in np.asarray(head["image"])[:n]]

    def __len__(self) -> int:
        return len(self.index["ids"])

    def records(self) -> list[bytes]:
        """What tags.EXAMPLES holds: the JSON index, then each thumbnail."""
        return [json.dumps(self.index).encode(), *self.thumbnails]

    def states(self, results: dict[str, dict], events) -> np.ndarray:
        """[3, shown] int64: each shown example's prediction (from an
        evaluation's `results`, by group), first learned and learned-for-good
        steps (`events.of(group)`; metrics.NOT_LEARNED where not)."""
        columns = []
        for group, n in self.counts.items():
            first, since, _ = events.of(group)
            columns.append(np.stack([np.asarray(results[group]["prediction"])[:n],
                                     first[:n], since[:n]]).astype(np.int64))
        return np.concatenate(columns, axis=1) if columns else np.zeros([3, 0], np.int64)
