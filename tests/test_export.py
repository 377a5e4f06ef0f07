"""Exported models: `.h5` loads without the package; with it, loss and metrics come back too."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from lgg import data, evaluate, losses, models, train

SAME_MODEL = evaluate.SAME_MODEL_ATOL  # the notebooks' export check uses the same bar


@pytest.fixture(scope="module")
def trained_unet(real_data, tmp_path_factory):
    slices = data.find_slices(real_data, max_cases=2)
    images, masks = data.load_arrays(slices[slices.has_tumor].head(16), 64)
    # XLA, as training uses it on CPUs without AVX-512 (elsewhere the default is off): the model in memory
    # predicts through XLA, the reloaded one through plain kernels, and they must agree
    unet = models.build_unet((64, 64, 3), base_filters=4, depth=3)
    model = train.compile_model(unet, "segmentation", jit_compile=True)
    model.fit(images.astype("float32"), masks.astype("float32"), batch_size=8, epochs=1, verbose=0)
    run_dir = tmp_path_factory.mktemp("export")
    train.export_model(model, run_dir)
    return model, images.astype("float32"), run_dir


def test_run_folder_holds_both_formats(trained_unet):
    _, _, run_dir = trained_unet
    assert (run_dir / "model.h5").stat().st_size > 10_000
    assert (run_dir / "model.keras").stat().st_size > 10_000
    assert not list(run_dir.glob(".partial-*"))


def test_h5_loads_in_a_fresh_process_without_the_package(trained_unet, tmp_path):
    model, images, run_dir = trained_unet
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        model = keras.models.load_model({str(run_dir / "model.h5")!r}, compile=False)
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        assert not any(name == "lgg" or name.startswith("lgg.") for name in sys.modules), "lgg was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict(images, verbose=0), atol=SAME_MODEL)


@pytest.mark.parametrize("file_name", ["model.h5", "model.keras"])
def test_loads_with_loss_and_metrics_when_the_package_is_imported(trained_unet, file_name):
    model, images, run_dir = trained_unet
    loaded = evaluate.load_model(run_dir / file_name)
    assert isinstance(loaded.loss, losses.BCEDiceLoss)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=SAME_MODEL)
    results = loaded.evaluate(images, (images[..., :1] > 128).astype("float32"), verbose=0, return_dict=True)
    assert {"loss", "dice_coefficient", "jaccard_index"} <= set(results)


def test_the_same_model_bar_passes_rounding_and_catches_a_partly_loaded_model(trained_unet, tmp_path):
    model, images, run_dir = trained_unet
    differences = evaluate.check_reloaded(model, [run_dir / "model.h5", run_dir / "model.keras"], images)
    assert max(differences.values()) < SAME_MODEL / 10  # rounding only, with room for other CPUs
    # every layer loaded but one, left at its initial weights, as a partial load would leave it
    partial = models.build_unet((64, 64, 3), base_filters=4, depth=3)
    for layer in model.layers:
        if layer.name != "dec1_conv2":
            partial.get_layer(layer.name).set_weights(layer.get_weights())
    with pytest.raises(AssertionError, match="partial does not reproduce the model"):
        evaluate.check_same_predictions(partial.predict(images, verbose=0), model.predict(images, verbose=0), "partial")
    with pytest.raises(AssertionError, match="differ by up to nan"):
        evaluate.check_same_predictions(np.full((2, 1), np.nan), np.zeros((2, 1)), "nan")
    with pytest.raises(AssertionError, match=r"shape \(2, 1\)"):
        evaluate.check_same_predictions(np.zeros((2, 1)), np.zeros((3, 1)), "short")


def test_classifier_round_trip(tmp_path):
    model = train.compile_model(models.build_classifier((64, 64, 3)), "classification")
    train.export_model(model, tmp_path)
    x = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    loaded = keras.models.load_model(tmp_path / "model.h5", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=SAME_MODEL)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="model.h5 is not a Keras model"):
        evaluate.load_model(path)


def test_mixed_precision_model_becomes_float32_with_the_same_weights():
    mixed = models.build_model("unet", 32, base_filters=4, precision="mixed_bfloat16")
    assert mixed.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    assert mixed.get_layer("mask").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # the global policy is left as it was
    plain = models.exportable(mixed, "unet", 32, base_filters=4)
    assert {layer.dtype_policy.name for layer in plain.layers} == {"float32"}
    for kept, original in zip(plain.get_weights(), mixed.get_weights()):
        np.testing.assert_array_equal(kept, original)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=0.05)
    with pytest.raises(ValueError, match="precision"):
        models.build_model("unet", 32, precision="float16")


def test_an_ensemble_is_one_model_that_averages_its_members_and_loads_anywhere(trained_unet, tmp_path):
    trained, images, run_dir = trained_unet
    other = models.build_unet((64, 64, 3), base_filters=4, depth=3)  # untrained: its probabilities differ
    ensemble = models.average_models([evaluate.load_model(run_dir / "model.h5"), other])
    expected = (trained.predict(images, verbose=0) + other.predict(images, verbose=0)) / 2
    assert ensemble.input_shape == trained.input_shape and ensemble.output_shape == trained.output_shape
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), expected, atol=SAME_MODEL)
    train.export_model(ensemble, tmp_path)
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np, keras
        model = keras.models.load_model({str(tmp_path / "model.h5")!r}, compile=False)
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=SAME_MODEL)
    with pytest.raises(ValueError, match="one shape"):
        models.average_models([trained, models.build_unet((32, 32, 3), base_filters=4, depth=3)])
    with pytest.raises(ValueError, match="at least two"):
        models.average_models([trained])


def test_an_ensemble_of_two_sides_computes_what_each_member_computes_alone(trained_unet, tmp_path):
    """A 64x64 and a 48x48 U-Net averaged at 64: inside the model the small one's slices are shrunk and its
    probabilities taken back as `lgg` does for it alone (cv2 area, then bilinear: 64 -> 48 is no whole factor,
    where area and bilinear differ), and the `.h5` gives the same on PyTorch, without the package."""
    import os

    import cv2

    from lgg import inference

    trained, images, run_dir = trained_unet
    keras.utils.set_random_seed(0)  # the untrained member's weights, so that its sensitivity is the same each run
    small = models.build_unet((48, 48, 3), base_filters=4, depth=3, name="small")
    with pytest.raises(ValueError, match="one shape"):
        models.average_models([trained, small])
    with pytest.raises(ValueError, match="no smaller than any member"):
        models.average_models([trained, small], size=40)
    with pytest.raises(ValueError, match="whole number"):
        models.average_models([trained, small], size=64.0)
    with pytest.raises(ValueError, match="segmenters"):
        models.average_models([trained, models.build_classifier((64, 64, 3))], size=64)
    ensemble = models.average_models([evaluate.load_model(run_dir / "model.h5"), small], size=np.int64(64))
    assert ensemble.input_shape == (None, 64, 64, 3) and ensemble.output_shape == (None, 64, 64, 1)

    def small_alone(interpolation):  # the small member as lgg runs it, on float slices (no uint8 rounding)
        shrunk = np.stack([cv2.resize(image, (48, 48), interpolation=interpolation) for image in images])
        return inference.resize_probabilities(small.predict(shrunk, verbose=0)[..., 0], 64)

    expected = (trained.predict(images, verbose=0)[..., 0] + small_alone(cv2.INTER_AREA)) / 2
    got = ensemble.predict(images, verbose=0)[..., 0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # the test tells the shrink apart: bilinear instead of area moves the average by far more than its bar
    assert np.abs((trained.predict(images, verbose=0)[..., 0] + small_alone(cv2.INTER_LINEAR)) / 2 - got).max() > 1e-3
    # through lgg, which rounds a shrunk slice to whole grey levels (up to 0.5 apart from the model's): that moved
    # this untrained member's probabilities by up to 0.0016 on one CPU, so the bar is 0.01, not the same-model 0.001
    pixels = images.astype("uint8")
    through_lgg = [inference.predict_probabilities(model, pixels) for model in (trained, small)]
    np.testing.assert_allclose(inference.predict_probabilities(ensemble, pixels), sum(through_lgg) / 2, atol=0.01)
    train.export_model(ensemble, tmp_path)
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        assert keras.backend.backend() == "torch"
        model = keras.models.load_model({str(tmp_path / "model.h5")!r}, compile=False)
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        assert not any(name == "lgg" or name.startswith("lgg.") for name in sys.modules), "lgg was imported"
    """)
    environment = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True, env=environment)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy")[..., 0], got, atol=SAME_MODEL)
