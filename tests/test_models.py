"""Tiny configurations: output shapes and ranges, layer names, weights options."""

import keras
import numpy as np
import pytest

from lgg import evaluate, files, models


def _raw_slices(size, count=2):
    return np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype("float32")


def test_unet_shapes_and_range():
    model = models.build_unet((64, 64, 3), base_filters=4, depth=3)
    output = model.predict(_raw_slices(64), verbose=0)
    assert model.output_shape == (None, 64, 64, 1) and output.shape == (2, 64, 64, 1)
    assert 0.0 <= output.min() and output.max() <= 1.0
    names = {layer.name for layer in model.layers}
    assert {"enc1_conv1", "enc3_pool", "bridge_conv2", "dec1_up", "dec1_concat", "mask"} <= names


def test_unet_default_size_is_cpu_sized():
    assert models.build_unet().count_params() == pytest.approx(1.95e6, rel=0.02)


@pytest.mark.parametrize("shape", [(100, 100, 3), (64, 32, 3), (64, 64)])
def test_unet_rejects_shapes_it_cannot_pool(shape):
    with pytest.raises(ValueError, match="received input_shape"):
        models.build_unet(shape)


def test_preprocessing_is_inside_the_model():
    # the model takes raw [0, 255] slices and standardizes each channel of each slice itself
    model = models.build_unet((32, 32, 3), base_filters=4, depth=2)
    preprocess = keras.Model(model.input, model.get_layer("preprocess_standardize").output)
    x = _raw_slices(32, 2) * np.array([0.2, 1.0, 0.6], "float32")
    scaled = x / 255.0
    mean, std = scaled.mean(axis=(1, 2), keepdims=True), scaled.std(axis=(1, 2), keepdims=True)
    expected = (scaled - mean) / np.sqrt(std**2 + 1e-3)
    np.testing.assert_allclose(preprocess.predict(x, verbose=0), expected, atol=1e-4)


def test_resnet50_unet_full_resolution_and_skip_table():
    model = models.build_resnet50_unet((64, 64, 3), encoder_weights=None)
    assert model.output_shape == (None, 64, 64, 1)
    for name in (*models.RESNET50_SKIP_LAYERS, models.RESNET50_BRIDGE_LAYER):
        model.get_layer(name)
    output = model.predict(_raw_slices(64), verbose=0)
    assert output.shape == (2, 64, 64, 1) and 0 <= output.min() and output.max() <= 1


def test_resnet50_freeze_encoder():
    model = models.build_resnet50_unet((64, 64, 3), encoder_weights=None, freeze_encoder=True)
    assert not model.get_layer("conv2_block1_1_conv").trainable
    assert model.get_layer("dec1_conv1").trainable


def test_resnet50_weights_from_a_local_file(tmp_path):
    path = tmp_path / "resnet50_notop.weights.h5"
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    source.save_weights(path)
    model = models.build_resnet50_unet((64, 64, 3), encoder_weights=str(path))
    np.testing.assert_array_equal(
        model.get_layer("conv1_conv").get_weights()[0], source.get_layer("conv1_conv").get_weights()[0]
    )


def test_resnet50_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        models.build_resnet50_unet((64, 64, 3), encoder_weights=str(tmp_path / "nope.h5"))


def test_imagenet_weights_offline_say_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="encoder_weights=None") as error:
        models.build_resnet50_unet((64, 64, 3), encoder_weights="imagenet")
    assert "offline" in str(error.value) and models.IMAGENET_WEIGHTS_FILE in str(error.value)


@pytest.mark.parametrize("backbone", ["light", "resnet50"])
def test_classifier_outputs_one_probability_per_slice(backbone):
    model = models.build_classifier((64, 64, 3), backbone=backbone, encoder_weights=None)
    output = model.predict(_raw_slices(64, 3), verbose=0)
    assert model.output_shape == (None, 1) and output.shape == (3, 1)
    assert 0 <= output.min() and output.max() <= 1


def test_classifier_rejects_unknown_backbone():
    with pytest.raises(ValueError, match="received 'vgg'"):
        models.build_classifier(backbone="vgg")


def test_attention_gates_weight_every_skip_and_survive_h5(tmp_path):
    model = models.build_resnet50_unet((64, 64, 3), encoder_weights=None, attention=True)
    assert model.name == "resnet50_attention_unet" and model.output_shape == (None, 64, 64, 1)
    gates = [layer.name for layer in model.layers if layer.name.endswith("_gated")]
    assert sorted(gates) == ["att2_gated", "att3_gated", "att4_gated"]  # one per skip connection
    coefficients = keras.Model(model.input, model.get_layer("att2_coefficients").output)
    values = coefficients.predict(_raw_slices(64), verbose=0)
    assert values.shape == (2, 16, 16, 1) and 0 <= values.min() and values.max() <= 1
    files.save_model(model, tmp_path / "attention.h5")
    reloaded = keras.models.load_model(tmp_path / "attention.h5", compile=False)
    x = _raw_slices(64)
    # rounding differs between the graphs (1.1e-5 seen on the CI machine for a U-Net); a bad load is ~1 off
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=evaluate.SAME_MODEL_ATOL
    )


def test_fused_batchnorm_computes_what_the_stock_layer_computes():
    """Same variables, same outputs (inference and training) and the same moving averages, up to rounding and
    the unbiased batch variance in the moving variance (n / (n - 1) = 1.0002 here)."""
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 8, 8, 16)).astype("float32")
    stock, fused = keras.layers.BatchNormalization(momentum=0.9), models.FusedBatchNormalization(momentum=0.9)
    stock.build(x.shape), fused.build(x.shape)
    weights = [np.linspace(0.5, 1.5, 16), np.linspace(-1, 1, 16), np.full(16, 0.5), np.full(16, 2.0)]
    stock.set_weights(weights), fused.set_weights(weights)
    np.testing.assert_allclose(fused(x, training=False), stock(x, training=False), atol=1e-5)
    np.testing.assert_allclose(fused(x, training=True), stock(x, training=True), atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), stock.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), stock.moving_variance.numpy(), rtol=1e-3)
    assert not np.allclose(fused.moving_mean.numpy(), weights[2])  # the training call did update them
    bfloat16 = models.FusedBatchNormalization(dtype="mixed_bfloat16")
    assert keras.backend.standardize_dtype(bfloat16(x.astype("bfloat16"), training=True).dtype) == "bfloat16"
    assert bfloat16.moving_mean.dtype == "float32"


def test_a_fused_model_exports_as_stock_layers_with_the_same_weights(tmp_path):
    fused = models.build_model("unet", 32, base_filters=4, precision="mixed_bfloat16", fused_batchnorm=True)
    assert any(isinstance(layer, models.FusedBatchNormalization) for layer in fused.layers)
    assert type(models.build_model("unet", 32, base_filters=4).get_layer("enc1_bn1")) is keras.layers.BatchNormalization
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    fused(x, training=True)  # move the moving averages off their initial values
    plain = models.exportable(fused, "unet", 32, base_filters=4)
    assert not any(isinstance(layer, models.FusedBatchNormalization) for layer in plain.layers)
    assert plain.dtype_policy.name == "float32"
    np.testing.assert_allclose(plain.predict(x, verbose=0), fused.predict(x, verbose=0), atol=0.02)  # bfloat16
    # weights saved while training (snapshots, resume state) load into the exported model
    fused.save_weights(tmp_path / "fused.weights.h5")
    copy = models.build_model("unet", 32, base_filters=4)
    copy.load_weights(tmp_path / "fused.weights.h5")
    for a, b in zip(copy.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_fused_training_step_matches_the_stock_one(jit_compile):
    """One Adam step of a small U-Net, fused against stock batch normalization from the same weights, with and
    without XLA (on by default on CPUs without AVX-512): the same weights after it, up to rounding."""
    from lgg import train

    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = (rng.uniform(size=(4, 32, 32, 1)) > 0.7).astype("float32")
    stock = models.build_model("unet", 32, base_filters=4)
    fused = models.build_model("unet", 32, base_filters=4, fused_batchnorm=True)
    fused.set_weights(stock.get_weights())
    for model in (stock, fused):
        train.compile_model(model, "segmentation", jit_compile=jit_compile).train_on_batch(x, y)
    for a, b, weight in zip(stock.get_weights(), fused.get_weights(), stock.weights):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-4, err_msg=weight.path)
