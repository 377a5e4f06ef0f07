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
