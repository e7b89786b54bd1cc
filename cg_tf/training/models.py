"""Models of the papers, built as functional Keras models that output logits.

  fc                 the fully connected nets of Coherent Gradients (784-2048-10,
                     784-256-256-256-10: `widths` sets width and depth)
  small_cnn          two conv layers and a dense layer, no BatchNorm
  cifar_resnet18     ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)
  resnet50, inception_v3, vgg16   keras.applications with weights=None
"""

import math
from collections.abc import Sequence

import keras
from keras import layers

MODELS = ("fc", "small_cnn", "cifar_resnet18", "resnet50", "inception_v3", "vgg16")


def authors_init() -> keras.initializers.Initializer:
    """The Coherent Gradients authors' weights for their fc nets: N(0, 1) x 2 /
    sqrt(fan_in + fan_out), i.e. variance 4 / (fan_in + fan_out), twice Glorot's."""
    return keras.initializers.VarianceScaling(2.0, "fan_avg", "untruncated_normal")


# --init: a fresh kernel initializer per layer (biases start at zero under both).
FC_INITS = {"keras": keras.initializers.GlorotUniform, "authors": authors_init}


def fc(input_shape, num_classes: int, widths: Sequence[int] = (2048,),
       init: str = "keras") -> keras.Model:
    kernel = FC_INITS[init]
    x = inputs = keras.Input(input_shape)
    x = layers.Flatten()(x)
    for i, w in enumerate(widths):
        x = layers.Dense(w, activation="relu", kernel_initializer=kernel(), name=f"dense_{i}")(x)
    logits = layers.Dense(num_classes, kernel_initializer=kernel(), name="logits")(x)
    return keras.Model(inputs, logits, name="fc")


def small_cnn(input_shape, num_classes: int) -> keras.Model:
    x = inputs = keras.Input(input_shape)
    for i, filters in enumerate((32, 64)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
        x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu", name="dense")(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="small_cnn")


def _basic_block(x, filters: int, stride: int, name: str):
    shortcut = x
    y = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def cifar_resnet18(input_shape, num_classes: int, width: int = 64) -> keras.Model:
    x = inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="stem_bn")(x))
    for stage, mult in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width * mult, stride, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="cifar_resnet18")


def _application(fn, input_shape, num_classes: int) -> keras.Model:
    return fn(weights=None, input_shape=tuple(input_shape), classes=num_classes,
              classifier_activation=None)


def describe(name: str, input_shape, num_classes: int, widths: Sequence[int] = (2048,)) -> str:
    """The model as figures and summaries name it: fc with its layer sizes
    (e.g. fc 64-1024-10), any other by its name."""
    if name != "fc":
        return name
    return "fc " + "-".join(str(n) for n in (math.prod(input_shape), *widths, num_classes))


def build_model(name: str, input_shape, num_classes: int,
                widths: Sequence[int] = (2048,), init: str = "keras") -> keras.Model:
    """The named model; raises ValueError naming --model for an unknown name.
    `init` (a key of FC_INITS) sets the fc nets' kernels; the others keep their own."""
    if name == "fc":
        return fc(input_shape, num_classes, widths, init)
    if name == "small_cnn":
        return small_cnn(input_shape, num_classes)
    if name == "cifar_resnet18":
        return cifar_resnet18(input_shape, num_classes)
    apps = {"resnet50": keras.applications.ResNet50,
            "inception_v3": keras.applications.InceptionV3,
            "vgg16": keras.applications.VGG16}
    if name in apps:
        return _application(apps[name], input_shape, num_classes)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
