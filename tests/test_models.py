"""Every model builds for its input shape and class count and trains one step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cg_tf.robust.aggregators import Mean
from cg_tf.training import models
from cg_tf.training.robust_model import RobustModel
from tools import batchnorm_statistics


@pytest.mark.parametrize("name,shape", [
    ("fc", (28, 28, 1)), ("small_cnn", (28, 28, 1)), ("cifar_resnet18", (32, 32, 3)),
    ("resnet18", (32, 32, 3)), ("vgg13_bn", (32, 32, 3)),
    ("vgg16", (32, 32, 3)), ("resnet50", (32, 32, 3)), ("inception_v3", (75, 75, 3))])
def test_model_trains_one_step(name, shape):
    keras.utils.set_random_seed(0)
    net = models.build_model(name, shape, 7, widths=(32, 16))
    assert net.output_shape == (None, 7)
    model = RobustModel(net, Mean())
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [v.numpy() for v in net.trainable_variables]
    data = {"image": tf.random.uniform([4, *shape]), "label": tf.constant([0, 1, 2, 6])}
    out = tf.function(model.train_step)(data)
    assert np.isfinite(float(out["loss"]))
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, net.trainable_variables))


def test_fc_widths_set_depth_and_width():
    net = models.fc((28, 28, 1), 10, (256, 256, 256))
    assert [l.units for l in net.layers if isinstance(l, keras.layers.Dense)] == [256, 256, 256, 10]
    assert models.fc((28, 28, 1), 10, (2048,)).count_params() == 784 * 2048 + 2048 + 2048 * 10 + 10


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("vgg13_bn", 133_053_736)])
def test_the_authors_imagenet_nets_have_torchvisions_size(name, params):
    """torchvision's resnet18 and vgg13_bn (the authors' models) for 1,000
    classes at 224x224: the same trainable parameters, layer for layer."""
    net = models.build_model(name, (224, 224, 3), 1000)
    assert sum(int(np.prod(w.shape)) for w in net.trainable_weights) == params
    assert net.output_shape == (None, 1000)


@pytest.mark.parametrize("name", ["cifar_resnet18", "resnet18", "vgg13_bn"])
def test_the_nets_written_here_normalize_as_pytorch_does(name):
    bns = [l for l in models.build_model(name, (32, 32, 3), 10).layers
           if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all((l.momentum, l.epsilon) == (0.9, 1e-5) for l in bns)


def test_the_nets_written_here_start_from_torchvisions_weights():
    """Convolutions N(0, 2 / fan_out) with zero biases; VGG's classifier N(0,
    0.01) with zero biases; ResNet's classifier PyTorch's nn.Linear default,
    weights and biases U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)). Keras's
    defaults (Glorot uniform, zero biases) fail each."""
    keras.utils.set_random_seed(0)
    resnet, vgg = models.resnet18((64, 64, 3), 1000), models.vgg13_bn((32, 32, 3), 10)
    for conv in (resnet.get_layer("stage3_block0_conv1"), vgg.get_layer("conv4_1")):
        assert np.std(conv.kernel.numpy()) == pytest.approx(np.sqrt(2 / (9 * 512)), rel=0.02)
        assert abs(np.mean(conv.kernel.numpy())) < 1e-3
    assert not np.any(vgg.get_layer("conv4_1").bias.numpy())
    for name in ("fc1", "logits"):
        assert np.std(vgg.get_layer(name).kernel.numpy()) == pytest.approx(0.01, rel=0.02)
        assert not np.any(vgg.get_layer(name).bias.numpy())
    bound, logits = 1 / np.sqrt(512), resnet.get_layer("logits")
    assert np.std(logits.kernel.numpy()) == pytest.approx(bound / np.sqrt(3), rel=0.02)
    for w in (logits.kernel.numpy(), logits.bias.numpy()):
        assert 0.9 * bound < np.abs(w).max() <= bound


def test_batch_norm_follows_pytorchs_moving_statistics_and_epsilon():
    """PyTorch's BatchNorm2d (momentum 0.1, eps 1e-5) in NumPy: each training
    call moves the running mean and variance 10% of the way to the batch's
    (Keras averages the biased variance); inference normalizes by them with
    eps 1e-5. Keras's defaults (momentum 0.99, epsilon 1e-3) fail both."""
    rng = np.random.default_rng(0)
    layer = models.batch_norm("bn")
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(2.0, 0.05, (8, 4, 4, 3)).astype(np.float32)
        layer(x, training=True)
        mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 1, 2))
        var = 0.9 * var + 0.1 * x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(layer(x, training=False).numpy(),
                               (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_batchnorm_statistics_compares_moving_and_batch_statistics():
    """tools.batchnorm_statistics on BatchNorm and dropout whose moving
    statistics never moved (mean 0, variance 1) while the input has variance
    0.01 about 3, against NumPy: inference divides by sqrt(1 + eps), batch
    statistics centre and scale each batch, dropout stays off, and the moving
    statistics are put back."""
    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(name="bn")
    net = keras.Model(inputs, keras.layers.Dropout(0.5)(bn(inputs)))
    rng = np.random.default_rng(0)
    images = (3 + 0.1 * rng.standard_normal((64, 3))).astype(np.float32)
    (batch, moving), = batchnorm_statistics.variances(net, images).values()
    assert moving == 1.0 and batch == pytest.approx(np.var(images, axis=0).mean(), rel=1e-5)
    blocks = images.reshape(4, 16, 3)
    centred = ((blocks - blocks.mean(1, keepdims=True)) / np.sqrt(blocks.var(1, keepdims=True)
                                                                  + bn.epsilon)).reshape(64, 3)
    labels = np.argmax(centred, 1)  # all right with batch statistics, not with the moving ones
    data = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(16)
    for training, outputs in ((False, images), (True, centred)):
        share = batchnorm_statistics.accuracy(net, data, training)
        assert share == np.mean(np.argmax(outputs, 1) == labels)
        assert bn.moving_variance.numpy().tolist() == [1.0] * 3  # put back
    assert net.layers[-1].rate == 0.5
    with pytest.raises(ValueError, match="has no BatchNormalization layer"):
        batchnorm_statistics.variances(models.small_cnn((8, 8, 1), 3), images)


def test_batchnorm_statistics_reaches_nested_dropout_and_refuses_nested_batchnorm():
    """Dropout inside a nested model is held off too; BatchNorm inside one is
    refused by name (its input is not reachable from the outer net's)."""
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.9)], name="inner")
    inputs = keras.Input((3,))
    net = keras.Model(inputs, inner(keras.layers.BatchNormalization(name="bn")(inputs)))
    images = np.eye(3, dtype=np.float32).repeat(8, 0)
    data = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.argmax(images, 1)})
    keras.utils.set_random_seed(0)
    # With dropout at 0.9 on, some rows would be all zero and guessed as class 0.
    assert batchnorm_statistics.accuracy(net, data.batch(24), training=True) == 1.0
    assert inner.layers[0].rate == 0.9
    wrapped = keras.Sequential([keras.Input((3,)), keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(name="deep_bn")], name="block")])
    with pytest.raises(ValueError, match=r"inside a nested model \(deep_bn\)"):
        batchnorm_statistics.batch_norms(wrapped)


def test_unknown_model():
    with pytest.raises(ValueError, match="--model must be one of"):
        models.build_model("alexnet", (32, 32, 3), 10)


def test_describe_names_an_fc_net_by_its_layer_sizes():
    assert models.describe("fc", (8, 8, 1), 10, (1024,)) == "fc 64-1024-10"
    assert models.describe("fc", (28, 28, 1), 10, (256, 256, 256)) == "fc 784-256-256-256-10"
    assert models.describe("small_cnn", (28, 28, 1), 10) == "small_cnn"


@pytest.mark.parametrize("init,variance,kurtosis", [
    # N(0, 1) x 2 / sqrt(fan_in + fan_out): variance 4 / (fan_in + fan_out), Gaussian (kurtosis 3).
    ("authors", lambda fan_in, fan_out: 4 / (fan_in + fan_out), 3.0),
    # Glorot uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), kurtosis 9/5.
    ("keras", lambda fan_in, fan_out: 2 / (fan_in + fan_out), 1.8)])
def test_fc_init_moments(init, variance, kurtosis):
    keras.utils.set_random_seed(0)
    net = models.fc((28, 28, 1), 10, (512, 256), init=init)
    for layer in (l for l in net.layers if isinstance(l, keras.layers.Dense)):
        w = layer.kernel.numpy().ravel()
        fan_in, fan_out = layer.kernel.shape
        expected = variance(fan_in, fan_out)
        # Sampling error of the variance is sqrt(2 / n) relative; n >= 2,560 here.
        assert abs(w.mean()) < 4 * np.sqrt(expected / w.size), layer.name
        assert w.var() == pytest.approx(expected, rel=6 * np.sqrt(2 / w.size)), layer.name
        assert np.mean(w ** 4) / w.var() ** 2 == pytest.approx(kurtosis, abs=0.3), layer.name
        assert not layer.bias.numpy().any(), layer.name
    other = models.fc((28, 28, 1), 10, (512, 256), init=init)
    assert not np.allclose(other.layers[2].kernel.numpy(), net.layers[2].kernel.numpy())


def test_init_is_checked():
    from cg_tf.training.trainer import TrainConfig
    with pytest.raises(ValueError, match="--init must be one of keras, authors"):
        TrainConfig(data_dir="d", model_dir="m", init="he")
    with pytest.raises(ValueError, match="--init=authors applies to the fc model"):
        TrainConfig(data_dir="d", model_dir="m", model="small_cnn", init="authors")
