"""Models of the papers, built as functional Keras models that output logits.

  fc                 the fully connected nets of Coherent Gradients (784-2048-10,
                     784-256-256-256-10: `widths` sets width and depth)
  small_cnn          two conv layers and a dense layer, no BatchNorm
  cifar_resnet18     ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)
  resnet18, vgg13_bn the ImageNet nets of Weak and Strong Gradient Directions
                     (torchvision's resnet18 and vgg13_bn, the authors' models)
  resnet50, inception_v3, vgg16   keras.applications with weights=None

The BatchNorm nets written here are initialized and normalize as
torchvision's (`conv`, `linear`, `batch_norm`), as the authors' nets are;
keras.applications keep Keras's.
"""

import functools
import math
from collections.abc import Sequence

import keras
from keras import layers

MODELS = ("fc", "small_cnn", "cifar_resnet18", "resnet18", "vgg13_bn", "resnet50",
          "inception_v3", "vgg16")


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


def conv(filters: int, kernel: int, stride: int = 1, use_bias: bool = False,
         name: str | None = None) -> layers.Conv2D:
    """A convolution initialized as torchvision's ResNet and VGG are: N(0, 2 /
    fan_out) (kaiming normal, fan_out = kernel^2 x filters), biases at zero."""
    return layers.Conv2D(filters, kernel, stride, padding="same", use_bias=use_bias,
                         kernel_initializer=keras.initializers.VarianceScaling(
                             2.0, "fan_out", "untruncated_normal"), name=name)


def linear(units: int, fan_in: int, name: str) -> layers.Dense:
    """A dense layer initialized as PyTorch's nn.Linear is (ResNet's classifier):
    weights and biases U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return layers.Dense(units, kernel_initializer=keras.initializers.VarianceScaling(
        1 / 3, "fan_in", "uniform"), bias_initializer=keras.initializers.RandomUniform(
            -bound, bound), name=name)


def batch_norm(name: str) -> layers.BatchNormalization:
    """BatchNormalization as PyTorch (the authors' torchvision nets) has it:
    the moving statistics move 10% of the way each update (PyTorch's momentum
    0.1 is Keras's 0.9) and epsilon is 1e-5. With Keras's own defaults (0.99,
    1e-3) the moving variance still holds 0.99^300 = 5% of its starting 1 after
    300 updates, many times a layer's true variance early in training, and a
    short run's evaluation reads chance while its training batches are fitted.
    (PyTorch averages the unbiased batch variance, Keras the biased one: a
    factor m / (m - 1) over m values a channel, which the batch x positions
    make negligible.)"""
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _basic_block(x, filters: int, stride: int, name: str):
    shortcut = x
    y = conv(filters, 3, stride, name=f"{name}_conv1")(x)
    y = batch_norm(f"{name}_bn1")(y)
    y = layers.ReLU()(y)
    y = conv(filters, 3, name=f"{name}_conv2")(y)
    y = batch_norm(f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = conv(filters, 1, stride, name=f"{name}_proj")(x)
        shortcut = batch_norm(f"{name}_proj_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def _resnet18_body(x, width: int, num_classes: int):
    """ResNet-18 after its stem: four stages of two basic blocks, global
    average pooling, the logits."""
    for stage, mult in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width * mult, stride, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D()(x)
    return linear(num_classes, x.shape[-1], "logits")(x)


def cifar_resnet18(input_shape, num_classes: int, width: int = 64) -> keras.Model:
    x = inputs = keras.Input(input_shape)
    x = conv(width, 3, name="stem_conv")(x)
    x = layers.ReLU()(batch_norm("stem_bn")(x))
    return keras.Model(inputs, _resnet18_body(x, width, num_classes), name="cifar_resnet18")


def resnet18(input_shape, num_classes: int, width: int = 64) -> keras.Model:
    """ResNet-18 for ImageNet-sized inputs: a 7x7 stride-2 stem and a 3x3
    stride-2 max-pool before the stages."""
    x = inputs = keras.Input(input_shape)
    x = conv(width, 7, 2, name="stem_conv")(x)
    x = layers.ReLU()(batch_norm("stem_bn")(x))
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
    return keras.Model(inputs, _resnet18_body(x, width, num_classes), name="resnet18")


# VGG-13's convolution stages (3x3 convolutions, each followed by a 2x2 max-pool).
VGG13_STAGES = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def vgg13_bn(input_shape, num_classes: int, hidden: int = 4096) -> keras.Model:
    """VGG-13 with BatchNorm after every convolution, and VGG's classifier:
    two dense layers of `hidden` units with dropout 0.5, initialized N(0,
    0.01) as torchvision's are. On 224x224 inputs the last max-pool leaves
    7x7, as torchvision's adaptive pooling does; on smaller ones the
    classifier takes what is left (2x2 at 64x64), where torchvision would
    spread it over 7x7."""
    x = inputs = keras.Input(input_shape)
    for stage, widths in enumerate(VGG13_STAGES):
        for i, filters in enumerate(widths):
            x = conv(filters, 3, use_bias=True, name=f"conv{stage}_{i}")(x)
            x = layers.ReLU()(batch_norm(f"conv{stage}_{i}_bn")(x))
        x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Flatten()(x)
    normal = functools.partial(keras.initializers.RandomNormal, 0.0, 0.01)
    for i in range(2):
        x = layers.Dense(hidden, activation="relu", kernel_initializer=normal(), name=f"fc{i}")(x)
        x = layers.Dropout(0.5)(x)
    logits = layers.Dense(num_classes, kernel_initializer=normal(), name="logits")(x)
    return keras.Model(inputs, logits, name="vgg13_bn")


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
    own = {"small_cnn": small_cnn, "cifar_resnet18": cifar_resnet18, "resnet18": resnet18,
           "vgg13_bn": vgg13_bn}
    if name in own:
        return own[name](input_shape, num_classes)
    apps = {"resnet50": keras.applications.ResNet50,
            "inception_v3": keras.applications.InceptionV3,
            "vgg16": keras.applications.VGG16}
    if name in apps:
        return _application(apps[name], input_shape, num_classes)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")


class NormClamp(keras.constraints.Constraint):
    """Rescales a weight to a fixed Frobenius norm (its norm at the start):
    the optimizer applies it after every update, so the weight keeps its
    direction's change and loses its norm's."""

    def __init__(self, norm: float):
        self.norm = float(norm)

    def __call__(self, w):
        return w * (self.norm / keras.ops.maximum(keras.ops.norm(keras.ops.reshape(w, [-1])),
                                                  1e-12))

    def get_config(self):
        return {"norm": self.norm}


def clamp_kernel_norms(net: keras.Model) -> None:
    """Holds every kernel of `net` at its current norm from now on (`NormClamp`
    on each trainable variable with more than one axis: dense and conv
    kernels; biases and BatchNorm's scales are left free, biases start at 0)."""
    for v in net.trainable_variables:
        if len(v.shape) > 1:
            v.constraint = NormClamp(float(keras.ops.norm(keras.ops.reshape(v, [-1]))))
