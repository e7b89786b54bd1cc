"""An ImageNet-shaped image folder, for tests and benchmarks of the image path.

  python -m tools.make_image_folder --output_dir=data/imagenet_like \
      [--classes=100] [--train_per_class=20] [--validation_per_class=5] [--seed=0]

Lays the folder out as ImageNet ships it (and as `--source=imagefolder:DIR`
reads it):

  DIR/train/n00000000/n00000000_0.JPEG    one folder per class (synthetic WordNet ids)
  DIR/validation/ILSVRC2012_val_00000001.JPEG    flat
  DIR/validation_labels.txt               `<file name> <class>` lines

Images are JPEGs of ImageNet's sizes and byte counts (long side 300 to 500
pixels, aspect 4:3, 3:4, 1:1, 3:2 or 2:3; 35 to 145 KB, 73 KB on average
at the defaults, against ImageNet's 110 KB) whose
content a network can learn: each class has its own colour and gratings (in
coordinates relative to the image, so at any size), each image a random shift
of them under pixel noise. The same seed gives the same bytes.
"""

import io
import os

import numpy as np
from absl import app, flags
from PIL import Image

ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2), (2, 3))
GRATINGS = 3
NOISE_STD = 24.0
QUALITY = 90


def class_names(num_classes: int) -> list[str]:
    """Synthetic WordNet ids, sorted in class-index order as ImageNet's are."""
    return [f"n{k:08d}" for k in range(num_classes)]


def class_pattern(rng: np.random.Generator) -> dict:
    """A class: its base colour and gratings (frequency in cycles per image,
    orientation, per-channel amplitude)."""
    return {"colour": rng.uniform(60, 196, 3),
            "freq": rng.uniform(1.0, 6.0, GRATINGS),
            "angle": rng.uniform(0, np.pi, GRATINGS),
            "amp": rng.uniform(-50, 50, (GRATINGS, 3))}


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of an ImageNet-like photo."""
    a, b = ASPECTS[rng.integers(len(ASPECTS))]
    long = int(rng.integers(300, 501))
    return (long * b // a, long) if a >= b else (long, long * a // b)


def render(pattern: dict, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An image of the class: its gratings at a random phase, plus noise; uint8 HxWx3."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    image = np.broadcast_to(pattern["colour"], (height, width, 3)).copy()
    phase = rng.uniform(0, 2 * np.pi, GRATINGS)
    for f, a, amp, p in zip(pattern["freq"], pattern["angle"], pattern["amp"], phase):
        wave = np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + p)
        image += wave[..., None] * amp
    image += rng.normal(0, NOISE_STD, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def make_image_folder(output_dir: str, num_classes: int = 100, train_per_class: int = 20,
                      validation_per_class: int = 5, seed: int = 0,
                      size=image_size) -> dict:
    """Writes the folder; returns its counts and bytes. `size(rng)` gives each
    image's (height, width) (tests pass small ones)."""
    if num_classes < 2 or train_per_class < 1 or validation_per_class < 0:
        raise ValueError(f"need 2 or more classes and 1 or more training images a class, "
                         f"got {num_classes} classes, {train_per_class} training and "
                         f"{validation_per_class} validation images a class")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    rng = np.random.default_rng(seed)
    names = class_names(num_classes)
    patterns = [class_pattern(rng) for _ in names]
    total = 0

    def write(path: str, pattern: dict) -> None:
        nonlocal total
        data = jpeg_bytes(render(pattern, *size(rng), rng))
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)

    for name, pattern in zip(names, patterns):
        os.makedirs(os.path.join(output_dir, "train", name))
        for i in range(train_per_class):
            write(os.path.join(output_dir, "train", name, f"{name}_{i}.JPEG"), pattern)
    # ImageNet's validation images are flat and shuffled across classes.
    labels = rng.permutation(np.repeat(np.arange(num_classes), validation_per_class))
    os.makedirs(os.path.join(output_dir, "validation"))
    lines = []
    for i, k in enumerate(labels, 1):
        file_name = f"ILSVRC2012_val_{i:08d}.JPEG"
        write(os.path.join(output_dir, "validation", file_name), patterns[k])
        lines.append(f"{file_name} {names[k]}\n")
    with open(os.path.join(output_dir, "validation_labels.txt"), "w") as f:
        f.writelines(lines)
    return {"classes": num_classes, "train": num_classes * train_per_class,
            "validation": len(labels), "bytes": total}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when it runs: tests import the functions)."""
    flags.DEFINE_string("output_dir", None, "Folder to create (must be absent or empty).")
    flags.DEFINE_integer("classes", 100, "Number of classes.")
    flags.DEFINE_integer("train_per_class", 20, "Training images a class.")
    flags.DEFINE_integer("validation_per_class", 5, "Validation images a class.")
    flags.DEFINE_integer("seed", 0, "Seed of the classes' patterns and the images.")


def main(argv):
    del argv
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required")
    try:
        made = make_image_folder(FLAGS.output_dir, FLAGS.classes, FLAGS.train_per_class,
                                 FLAGS.validation_per_class, FLAGS.seed)
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e))
    print(f"{FLAGS.output_dir}: {made['train']:,} training and {made['validation']:,} "
          f"validation images of {made['classes']} classes, {made['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    define_flags()
    app.run(main)
