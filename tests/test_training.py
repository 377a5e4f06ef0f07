"""Training behaviour: a diverging run stops naming the epoch and keeps its best model; same seed, same run;
the averaged weights (`ema`) are what fit validates and keeps, and survive a resume."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from lgg import data, models, train


class TurnsNaN(keras.utils.PyDataset):
    """Real slices until the model has taken two steps (one epoch), NaN pixels after that."""

    def __init__(self, images, masks, model):
        super().__init__()
        self.images, self.masks, self.model = images.astype("float32"), masks.astype("float32"), model

    def __len__(self):
        return 2

    def __getitem__(self, index):
        images = self.images[index * 4 : (index + 1) * 4].copy()
        if int(self.model.optimizer.iterations.numpy()) >= 2:
            images[:] = np.nan
        return images, self.masks[index * 4 : (index + 1) * 4]


@pytest.fixture(scope="module")
def small_arrays(real_data):
    slices = data.find_slices(real_data, max_cases=2)
    return data.load_arrays(slices[slices.has_tumor].head(8), 32)


def test_divergence_stops_with_the_epoch_and_keeps_the_best_model(small_arrays, tmp_path, capsys):
    images, masks = small_arrays
    model = train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation")
    val_data = data.evaluation_dataset(images, masks, batch_size=4)
    history = train.fit(model, TurnsNaN(images, masks, model), val_data, tmp_path, epochs=5, verbose=0)
    assert "loss became nan in epoch 2" in capsys.readouterr().out
    assert len(history) == 2  # stopped in the second epoch, not run to 5
    assert np.isfinite(model.predict(images, verbose=0)).all()  # best (first-epoch) weights restored
    assert (tmp_path / "best.weights.h5").exists()


def test_same_seed_gives_the_same_epochs(real_data, tmp_path):
    def run(folder):
        keras.utils.set_random_seed(7)
        slices = data.split_table(data.find_slices(real_data, max_cases=4))
        train_data, steps, val_data = train.make_datasets(slices, "segmentation", 32, 8, seed=7)
        model = train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation")
        return train.fit(model, train_data, val_data, tmp_path / folder, epochs=2, steps_per_epoch=steps, verbose=0)

    first, second = run("a"), run("b")
    columns = ["loss", "dice_coefficient", "val_loss", "val_dice_coefficient"]
    # CPU kernels may sum in different orders; README states this tolerance
    pd.testing.assert_frame_equal(first[columns], second[columns], atol=1e-4, rtol=1e-3)


def test_step_timer_times_the_steps_of_an_epoch_and_nothing_else(monkeypatch):
    """StepTimer's rate: the intervals between the ends of an epoch's steps, the first step and `skip` more left
    out, from a clock that ticks known times (so the figure is exact, whatever the machine's speed)."""
    from lgg import callbacks

    ticks = iter([10.0, 13.0, 14.0, 15.0, 15.5, 16.0])  # the ends of 6 steps: intervals 3, 1, 1, 0.5, 0.5
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(ticks))
    timer, logs = callbacks.StepTimer(batch_size=4), {}
    timer.on_epoch_begin(0)
    for step in range(6):
        timer.on_train_batch_end(step)
    timer.on_epoch_end(0, logs)
    assert timer.skip == 2 and list(timer.step_seconds()) == [1.0, 0.5, 0.5]
    assert logs["train_slices_per_s"] == pytest.approx(4 * 3 / 2.0)
    timer.on_epoch_begin(1)  # a new epoch starts from its own first step
    assert len(timer.step_seconds()) == 0 and np.isnan(timer.slices_per_s())


def test_step_timer_reaches_the_logs_of_a_real_fit(small_arrays):
    from lgg.callbacks import StepTimer

    images, masks = (np.concatenate([array] * 3).astype("float32") for array in small_arrays)  # 24 real slices
    model = train.compile_model(models.build_unet((32, 32, 3), base_filters=4), "segmentation", jit_compile=False)
    timer = StepTimer(batch_size=4, skip=0)
    history = model.fit(images, masks, batch_size=4, epochs=2, verbose=0, callbacks=[timer])
    assert len(timer.ends) == 6 and len(timer.step_seconds()) == 5  # 6 steps of the last epoch, 5 intervals
    rates = history.history["train_slices_per_s"]
    assert len(rates) == 2 and all(np.isfinite(rates)) and rates[-1] == pytest.approx(timer.slices_per_s())


@pytest.mark.parametrize(
    "schedule, patience, epochs_run",
    [("time-cosine", None, 12), ("time-cosine", 1, 2), ("plateau", None, 11), ("plateau", 1, 2)],
)
def test_early_stopping_follows_the_schedule_unless_a_patience_is_given(
    small_arrays, tmp_path, schedule, patience, epochs_run
):
    # a model that cannot improve (learning rate 1e-12, no batch normalization): its validation score is flat,
    # so EarlyStopping, where there is one, stops after `patience` epochs without a better one (the learning rate
    # halved on plateau stays too small to move it)
    images, masks = small_arrays
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model = train.compile_model(model, "segmentation", learning_rate=1e-12, jit_compile=False)
    val_data = data.evaluation_dataset(images, masks, batch_size=4)
    history = train.fit(model, data.evaluation_dataset(images, masks, batch_size=4), val_data, tmp_path, epochs=12,
                        patience=patience, max_minutes=60, schedule=schedule, verbose=0)  # fmt: skip
    assert len(history) == epochs_run  # plateau by default: 10 epochs without a better score after the first


def test_a_time_budget_is_not_cut_short_by_the_default_epoch_count(small_arrays, tmp_path, monkeypatch):
    # fit without `epochs`: 100 epochs, or (with max_minutes) no bound, so the time limit ends the run
    images, masks = small_arrays
    seen = []
    monkeypatch.setattr(keras.Model, "fit", lambda self, *args, **kwargs: seen.append(kwargs["epochs"]))
    monkeypatch.setattr(train.pd, "read_csv", lambda path: pd.DataFrame())
    model = train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation")
    dataset = data.evaluation_dataset(images, masks, batch_size=4)
    train.fit(model, dataset, dataset, tmp_path / "a", verbose=0)
    train.fit(model, dataset, dataset, tmp_path / "b", max_minutes=60, schedule="time-cosine", verbose=0)
    train.fit(model, dataset, dataset, tmp_path / "c", epochs=3, max_minutes=60, verbose=0)
    assert seen == [100, 100_000, 3]


def test_train_run_trains_with_the_augmentation_flair_share_and_sampling_it_records(real_data, tmp_path, monkeypatch):
    """`train --augmentation strong --flair-only 0.3 --tumor-fraction 0.5 --tumor-sampling case`: the batches are drawn
    with what config.json records."""
    from lgg import train

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any training: what reached the pipelines is all this asks

    monkeypatch.setattr(train, "make_datasets", record)
    with pytest.raises(KeyboardInterrupt):
        train.train_run("unet", real_data.parent, tmp_path / "run", max_cases=12, image_size=32, epochs=1,
                        augmentation="strong", flair_only=0.3, tumor_fraction=0.5, tumor_sampling="case",
                        verbose=0)  # fmt: skip
    assert seen["augmentation"] == "strong" and seen["flair_only"] == 0.3 and seen["tumor_sampling"] == "case"
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["augmentation"] == "strong" and recorded["flair_only"] == 0.3
    assert recorded["tumor_fraction"] == 0.5 and recorded["tumor_sampling"] == "case"


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_area_sampling_reaches_the_pipeline_with_each_slices_tumor_pixels(real_data, monkeypatch, pipeline):
    """`make_datasets(tumor_sampling="area")`: the pipeline gets the case of every training slice and its tumor
    pixels at the training size, so `tumor_pools` weighs a case's slices by area."""
    from lgg import batches

    slices = data.split_table(data.find_slices(real_data, max_cases=6))
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "training_dataset", record)
    monkeypatch.setattr(batches, "TrainingBatches", record)
    with pytest.raises(KeyboardInterrupt):
        train.make_datasets(slices, "segmentation", 32, 8, tumor_fraction=0.5, tumor_sampling="area", pipeline=pipeline)
    rows = slices[slices.split == "train"]
    masks = data.load_arrays(rows, 32)[1]
    np.testing.assert_array_equal(seen["tumor_areas"], masks.reshape(len(masks), -1).sum(1))
    np.testing.assert_array_equal(seen["tumor_cases"], rows.case_id.to_numpy())
    assert (seen["tumor_areas"][rows.has_tumor.to_numpy()] > 0).mean() > 0.9  # at 32 px a few tiny tumors vanish
    assert (seen["tumor_areas"][~rows.has_tumor.to_numpy()] == 0).all()


def _weights_distance(first, second):
    return float(sum(np.abs(a - b).sum() for a, b in zip(first, second, strict=True)))


@pytest.mark.parametrize("stop", ["epochs", "time limit"])
def test_fit_validates_keeps_and_returns_the_averaged_weights(small_arrays, tmp_path, stop):
    """`compile_model(ema=)`: the weights fit validates and returns are the optimizer's moving average, not the
    trained weights, whether the run ends at its last epoch or its time limit stops it (where Keras leaves the
    trained weights in the model and `fit` takes the average back from the best-weights file). With a momentum
    near 1 the average hardly leaves the first step's weights (it starts there), while the same training without
    it (same seed, same batches) keeps weights at least one step further on."""
    images, masks = small_arrays
    dataset = data.evaluation_dataset(images, masks, batch_size=4)  # 2 steps an epoch, in order
    length = {"epochs": 3} if stop == "epochs" else {"max_minutes": 1e-4}  # the time limit: after the 1st epoch

    def compiled(ema):
        keras.utils.set_random_seed(3)
        model = models.build_unet((32, 32, 3), base_filters=4, depth=2)
        return train.compile_model(model, "segmentation", learning_rate=1e-2, jit_compile=False, ema=ema)

    def run(folder, ema):
        model = compiled(ema)
        history = train.fit(model, dataset, dataset, tmp_path / folder, val_cases=(images, masks,
                            np.array(["a"] * 4 + ["b"] * 4)), verbose=0, **length)  # fmt: skip
        return [weight.numpy() for weight in model.trainable_weights], history

    first_step = compiled(None)
    first_step.train_on_batch(images[:4].astype("float32"), masks[:4].astype("float32"))
    first_step = [weight.numpy() for weight in first_step.trainable_weights]
    plain, plain_history = run("plain", None)
    averaged, averaged_history = run("averaged", 0.99999)
    assert len(averaged_history) == (3 if stop == "epochs" else 1)
    assert _weights_distance(first_step, averaged) < 0.05 * _weights_distance(first_step, plain)
    # validated with the average too: Keras' validation and the per-case Dice both differ from the plain run's
    assert not np.allclose(plain_history["val_loss"], averaged_history["val_loss"], atol=1e-4)
    assert not np.allclose(plain_history["val_case_dice"], averaged_history["val_case_dice"], atol=1e-4)
    assert np.allclose(averaged_history["loss"], plain_history["loss"], atol=1e-4, rtol=1e-3)  # trained alike


def test_a_resumed_run_with_averaged_weights_trains_on_as_one_never_stopped(small_arrays, tmp_path, monkeypatch):
    """The resume state of a run with `ema` holds the average as the model's weights (saved at an epoch's end,
    after `AveragedWeights` swapped it in): resumed, the run trains on from its own weights, not the average."""
    from lgg import callbacks

    images, masks = small_arrays
    dataset = data.evaluation_dataset(images, masks, batch_size=4)

    def run(folder, resume=False):
        keras.utils.set_random_seed(5)
        model = models.build_unet((32, 32, 3), base_filters=4, depth=2)
        model = train.compile_model(model, "segmentation", learning_rate=1e-2, jit_compile=False, ema=0.9)
        history = train.fit(model, dataset, dataset, tmp_path / folder, epochs=4, resume=resume, verbose=0)
        return [weight.numpy() for weight in model.trainable_weights], history

    straight, straight_history = run("straight")

    class Killed(Exception):
        pass

    save = callbacks.ResumeCheckpoint.on_epoch_end

    def save_then_die(self, epoch, logs=None):
        save(self, epoch, logs)
        if epoch == 1:
            raise Killed  # as a kill right after the second epoch's state was saved

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.ResumeCheckpoint, "on_epoch_end", save_then_die)
        with pytest.raises(Killed):
            run("stopped")
    resumed, resumed_history = run("stopped", resume=True)
    assert resumed_history["epoch"].tolist() == [0, 1, 2, 3]
    columns = ["loss", "val_loss", "val_dice_coefficient"]
    pd.testing.assert_frame_equal(resumed_history[columns], straight_history[columns], atol=1e-4, rtol=1e-3)
    assert _weights_distance(resumed, straight) < 1e-3 * _weights_distance(resumed, [w * 0 for w in straight])


@pytest.mark.parametrize("ema", [0, 1, 1.5, -0.1, float("nan"), "0.99", True])
def test_a_nonsense_averaging_momentum_is_refused(ema):
    with pytest.raises(ValueError, match="ema"):
        train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation", ema=ema)
    with pytest.raises(ValueError, match="ema"):
        train.RunConfig(ema=ema)


def test_a_young_average_is_named_and_a_grown_one_is_not(small_arrays):
    from lgg.callbacks import young_average

    images, masks = (array.astype("float32") for array in small_arrays)
    for ema, steps, expected in [(0.999, 2, "after 2 steps the averaged weights still hold 100%"), (0.5, 8, None)]:
        model = models.build_unet((32, 32, 3), base_filters=4, depth=2)
        model = train.compile_model(model, "segmentation", jit_compile=False, ema=ema)
        model.fit(images, masks, batch_size=8, epochs=steps, verbose=0)  # one step an epoch
        warning = young_average(model)
        assert warning is None if expected is None else expected in warning
