"""Training behaviour: a diverging run stops naming the epoch and keeps its best model; same seed, same run."""

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
    import json

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
