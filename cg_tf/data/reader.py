"""tf.data input: a dataset directory -> shuffled, augmented, batched, distributed.

The reader checks dataset_info.json and every shard's size and ends digest
against it (`cg_tf.data.verify.verify_on_open`: O(shards), before anything is
served; the full pass over the records is `python -m cg_tf.data.verify DIR`,
which a local build runs), then yields dictionaries
  image (float32 HxWxC in [0, 1]), label, true_label, is_corrupt (int32),
  example_id (string)
for training (global batches, a reproducible order per epoch that depends only
on (seed, epoch), so a resumed run sees the same batches) and for the fixed
evaluation subsets of the memorization metrics.

Small splits (up to `cache_max_examples`) are decoded once, held in memory
and permuted anew each epoch; large ones are shuffled by file and by a
buffer of serialized records, and decoded after the shuffle.
"""

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from cg_tf.data import records, verify
from cg_tf.options import option

AUGMENTATIONS = ("none", "flip", "flip_crop", "randaugment")


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How a run reads its dataset, beyond which one and in what batches: flags
    of the command line (nested in cg_tf.training.trainer.TrainConfig)."""

    image_size: tuple[int, int] | None = option(
        None, "HEIGHT,WIDTH to resize images to (needed for image folders).")
    augment: str = option("none", f"One of {', '.join(AUGMENTATIONS)}.")
    eval_sample_size: int = option(1000, "Examples per evaluation subset.")

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, "
                             f"got {self.augment!r}")
        if self.image_size is not None and (len(self.image_size) != 2
                                            or min(self.image_size) < 1):
            raise ValueError("image_size must be HEIGHT,WIDTH (two positive integers), got "
                             f"{','.join(map(str, self.image_size))}")
        if self.eval_sample_size < 1:
            raise ValueError(f"eval_sample_size must be positive, got {self.eval_sample_size}")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """A reader's whole configuration: the dataset, its global batch (checked
    against the training split when the reader opens), the seed of its order,
    the options, and buffer sizes no run needs to change."""

    data_dir: str
    batch_size: int
    seed: int = 0
    options: InputOptions = InputOptions()
    shuffle_buffer: int = 10_000
    cache_max_examples: int = 200_000
    eval_batch_size: int = 500


def output_shape(image_shape, image_size, where: str) -> tuple[int, int, int]:
    """The shape of the images a reader gives: the dataset's (`image_shape`,
    of the data at `where`), resized to `image_size` if that is set."""
    h, w, c = image_shape
    if image_size is None:
        if h is None or w is None:
            raise ValueError(f"{where} has images of varying size: set --image_size")
        return (h, w, c)
    return (image_size[0], image_size[1], c)


def _augmenter(name: str, image_shape: tuple[int, int, int], seed: int) -> keras.Sequential | None:
    """Keras preprocessing layers for one augmentation recipe (None for 'none')."""
    h, w, _ = image_shape
    layers = {
        "none": [],
        "flip": [keras.layers.RandomFlip("horizontal", seed=seed)],
        # The standard CIFAR recipe: pad 4 pixels, random crop back, flip.
        "flip_crop": [keras.layers.ZeroPadding2D(4), keras.layers.RandomCrop(h, w, seed=seed),
                      keras.layers.RandomFlip("horizontal", seed=seed + 1)],
        "randaugment": [keras.layers.RandAugment(value_range=(0, 1), seed=seed)],
    }[name]
    return keras.Sequential(layers) if layers else None


class Reader:
    """Reads one dataset directory made by pipelines/noisy_labels.py."""

    def __init__(self, config: InputConfig):
        self.config = config
        self.info = records.load_info(config.data_dir)
        if records.TRAIN_SPLIT not in self.info.splits:
            raise records.DatasetError(f"{config.data_dir!r} has no {records.TRAIN_SPLIT!r} split")
        self.num_classes = self.info.num_classes
        self.image_shape = self._output_shape()
        train = self.info.splits[records.TRAIN_SPLIT]
        if not 1 <= config.batch_size <= train.num_examples:
            raise ValueError(f"--batch_size must be between 1 and the {train.num_examples} "
                             f"training examples of {config.data_dir}, got {config.batch_size}")
        self.steps_per_epoch = train.num_examples // config.batch_size
        # The share of training labels the noise changed (uniform noise may
        # redraw an example's own label: below the rate asked).
        self.labels_changed = train.num_corrupt / train.num_examples
        self._augment = _augmenter(config.options.augment, self.image_shape, config.seed)
        self._cached = {}  # Decoded splits, in-memory tensors, evaluation subsets.
        verify.verify_on_open(config.data_dir, self.info)  # Once, before any batch.

    @property
    def batch_size(self) -> int:
        """The global batch of the training dataset."""
        return self.config.batch_size

    @property
    def noise(self) -> dict:
        """How the training labels were corrupted (dataset_info.json's noise)."""
        return self.info.noise

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names, where the dataset records them (else ())."""
        return self.info.class_names

    @classmethod
    def open(cls, data_dir: str, batch_size: int, seed: int = 0, **options) -> "Reader":
        """The reader of `data_dir` for global batches of `batch_size`, in the
        order of `seed` (InputOptions by name)."""
        return cls(InputConfig(data_dir, batch_size, seed, InputOptions(**options)))

    def _output_shape(self) -> tuple[int, int, int]:
        return output_shape(self.info.image_shape, self.config.options.image_size,
                            self.config.data_dir)

    # -- decoding -------------------------------------------------------------

    def _decode(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = records.parse_example(serialized)
        h, w, c = self.image_shape
        image = tf.io.decode_image(ex["image"], channels=c, expand_animations=False)
        if self.info.image_shape[0] is None:
            # Resize the shorter side to 8/7 of the target, then center-crop.
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scale = (8.0 / 7.0) * max(h, w) / tf.reduce_min(shape)
            image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
            image = tf.image.resize_with_crop_or_pad(image, h, w)
        elif (h, w) != tuple(self.info.image_shape[:2]):
            image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, (h, w))), 0, 255),
                            tf.uint8)
        image = tf.ensure_shape(image, (h, w, c))
        return {"image": image,
                "label": tf.cast(ex["label"], tf.int32),
                "true_label": tf.cast(ex["true_label"], tf.int32),
                "is_corrupt": tf.cast(ex["is_corrupt"], tf.int32),
                "example_id": ex["example_id"]}

    @staticmethod
    def _to_float(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return dict(ex, image=tf.cast(ex["image"], tf.float32) / 255.0)

    def _fits_in_memory(self, split: str) -> bool:
        return self.info.splits[split].num_examples <= self.config.cache_max_examples

    def _records(self, split: str, seed: tf.Tensor | None = None) -> tf.data.Dataset:
        """The split's serialized records, its files in order or, given a
        stateless seed, in a random order."""
        files = self.info.shard_paths(self.config.data_dir, split)
        names = tf.constant(files)
        if seed is not None:
            names = tf.gather(names, tf.argsort(tf.random.stateless_uniform([len(files)], seed=seed)))
        return tf.data.Dataset.from_tensor_slices(names).interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=self.info.compression or ""),
            cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)

    def _decoded(self, split: str) -> tf.data.Dataset:
        """The split decoded, in file order (cached in memory for small splits:
        read it whole, as a cache read in part is thrown away)."""
        if split not in self._cached:
            ds = self._streamed(split)
            if self._fits_in_memory(split):
                ds = ds.cache()
            self._cached[split] = ds
        return self._cached[split]

    def _streamed(self, split: str) -> tf.data.Dataset:
        """The split decoded, in file order, never cached (for reading a part)."""
        return self._records(split).map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)

    def _in_memory(self, split: str) -> dict[str, tf.Tensor]:
        """A small split as tensors, for exact per-epoch permutations."""
        key = ("tensors", split)
        if key not in self._cached:
            batches = list(self._decoded(split).batch(4096))
            self._cached[key] = {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]}
        return self._cached[key]

    # -- training -------------------------------------------------------------

    def _epoch_seed(self, epoch: tf.Tensor) -> tf.Tensor:
        """The stateless seed of an epoch's order: a function of (seed, epoch) only."""
        return tf.stack([tf.constant(self.config.seed, tf.int64), tf.cast(epoch, tf.int64)])

    def train_epoch(self, epoch: tf.Tensor | int, part: tuple[int, int] | None = None
                    ) -> tf.data.Dataset:
        """One epoch of global batches, in an order that depends only on (seed, epoch);
        with `part` = (start, size), only those examples of each global batch,
        chosen before anything is decoded (a worker's slice).

        Small splits: a uniformly random permutation of the whole split. Large
        ones: a random file order, interleaved, through a shuffle buffer.
        """
        split = records.TRAIN_SPLIT
        seed = self._epoch_seed(epoch)
        bs = self.config.batch_size
        start, size = part or (0, bs)
        if self._fits_in_memory(split):
            data = self._in_memory(split)
            n = self.info.splits[split].num_examples
            order = tf.argsort(tf.random.stateless_uniform([n], seed=seed))
            ds = tf.data.Dataset.from_tensor_slices(order).batch(bs, drop_remainder=True)
            return ds.map(lambda idx: self._to_float(
                {k: tf.gather(v, idx[start:start + size]) for k, v in data.items()}))
        ds = (self._records(split, seed)
              .shuffle(self.config.shuffle_buffer, seed=self.config.seed,
                       reshuffle_each_iteration=False))
        if part:  # the records of each global batch this part keeps, in order
            ds = ds.batch(bs, drop_remainder=True).map(lambda r: r[start:start + size]).unbatch()
        return (ds.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
                .map(self._to_float, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(size, drop_remainder=True))

    def train_dataset(self, start_step: int = 0, num_steps: int | None = None,
                      keep_ids: bool = False, part: tuple[int, int] | None = None
                      ) -> tf.data.Dataset:
        """Global batches from global step `start_step` on, across epochs (endless
        unless `num_steps` is given): numbers only (an XLA-compiled step takes
        no strings), with the examples' string ids if `keep_ids`; with `part` =
        (start, size), only those examples of each (an input pipeline's slice,
        read and decoded alone: `distribute`).

        A run resumed at step s sees exactly the batches an uninterrupted run
        sees from step s (augmentation aside, which draws fresh randomness).
        """
        first_epoch, skip = divmod(start_step, self.steps_per_epoch)
        if self._fits_in_memory(records.TRAIN_SPLIT):
            self._in_memory(records.TRAIN_SPLIT)  # Load outside the epoch function.
        ds = (tf.data.Dataset.range(first_epoch, tf.int64.max)
              .flat_map(lambda epoch: self.train_epoch(epoch, part))
              .skip(skip))
        if num_steps is not None:
            ds = ds.take(num_steps)
        else:  # said, for `distribute`
            ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        if not keep_ids:
            ds = ds.map(lambda b: {k: v for k, v in b.items() if k != "example_id"})
        if self._augment is not None:
            augment = self._augment
            ds = ds.map(lambda b: dict(b, image=augment(b["image"], training=True)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    # -- evaluation -----------------------------------------------------------

    def examples(self, split: str = records.TRAIN_SPLIT) -> tf.data.Dataset:
        """A whole split, batched, in file order, unaugmented (for exports and
        evaluation; its length is known, as Keras' evaluate likes)."""
        batches = -(-self.info.splits[split].num_examples // self.config.eval_batch_size)
        return (self._decoded(split).map(self._to_float).batch(self.config.eval_batch_size)
                .apply(tf.data.experimental.assert_cardinality(batches)))

    def eval_subsets(self, sample_size: int | None = None) -> dict[str, tf.data.Dataset]:
        """The fixed evaluation subsets, batched, unshuffled and unaugmented.

        pristine / corrupt / mixed: the first `sample_size` training examples
        (in file order, which the pipeline made a stable hash order) that are
        clean / corrupt / either; test: the clean evaluation split, whole unless
        it exceeds `sample_size` times ten.
        """
        n = sample_size or self.config.options.eval_sample_size
        if ("eval", n) in self._cached:
            return self._cached[("eval", n)]
        train = self._streamed(records.TRAIN_SPLIT)  # a part of it: each subset caches its own
        subsets = {
            "pristine": train.filter(lambda ex: ex["is_corrupt"] == 0).take(n),
            "corrupt": train.filter(lambda ex: ex["is_corrupt"] == 1).take(n),
            "mixed": train.take(n),
        }
        if self.info.eval_split in self.info.splits:
            subsets["test"] = self._streamed(self.info.eval_split).take(10 * n)
        self._cached[("eval", n)] = {
            name: ds.map(self._to_float).batch(self.config.eval_batch_size).cache()
            for name, ds in subsets.items()}
        return self._cached[("eval", n)]


def distribute(batches: Callable[[tuple[int, int]], tf.data.Dataset],
               strategy: tf.distribute.Strategy, global_batch_size: int):
    """Splits each global batch over the strategy's replicas, in replica order.

    `batches(part)` is the dataset of the global batches' `part` = (start,
    size) (Reader.train_dataset's): every input pipeline (one per worker)
    reads and decodes only its consecutive slice of each global batch, which
    its local replicas split in turn; so the examples a replica sees, and
    hence the update, are the same for one or many workers (tf.data's
    auto-sharding would give workers different batches).
    """
    def per_pipeline(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        size = global_batch_size // ctx.num_input_pipelines
        mine = batches((ctx.input_pipeline_id * size, size))
        endless = int(mine.cardinality()) == tf.data.INFINITE_CARDINALITY
        # Static batch shapes for a graph that takes the iterator, as Keras' fit
        # does (drop_remainder changes nothing: the slices divide evenly); and an
        # endless dataset said to be one (rebatch forgets it), for which
        # multi-worker strategies do not relax the batch dimension.
        out = mine.rebatch(ctx.get_per_replica_batch_size(global_batch_size),
                           drop_remainder=True)
        if endless:
            out = out.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return out

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(per_pipeline, options)
