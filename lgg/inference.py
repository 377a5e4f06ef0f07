"""Run a trained model on slices of any square size, at the model's own input size."""

import numpy as np

from lgg.data import resize_image


def model_task(model):
    """`"segmentation"` for `(N, S, S, 1)` outputs, `"classification"` for `(N, 1)`; else a clear error."""
    input_shape, output_shape = tuple(model.input_shape), tuple(model.output_shape)
    if len(input_shape) != 4 or input_shape[-1] != 3 or input_shape[1] != input_shape[2] or input_shape[1] is None:
        raise ValueError(f"model {model.name!r} takes {input_shape}; an lgg model takes (None, S, S, 3)")
    if len(output_shape) == 4 and output_shape[-1] == 1:
        return "segmentation"
    if len(output_shape) == 2 and output_shape[-1] == 1:
        return "classification"
    raise ValueError(
        f"model {model.name!r} outputs {output_shape}; an lgg segmenter outputs (None, S, S, 1) "
        "and a classifier (None, 1)"
    )


def predict_probabilities(model, images, batch_size=32):
    """Tumor probability per pixel (segmenter, `(N, H, W)`) or per slice (classifier, `(N,)`).

    `images` are uint8 slices `(N, H, W, 3)`; they are resized to the model's input size and a
    segmenter's probabilities are resized back to `H x W`, so scores are computed at the
    resolution of the true masks. Flip test-time augmentation: `predict_with_mirror`.
    """
    task = model_task(model)
    size = model.input_shape[1]
    images = np.asarray(images)
    batch = np.stack([resize_image(image, size) for image in images]).astype(np.float32)
    probabilities = model.predict(batch, batch_size=batch_size, verbose=0)
    if task == "classification":
        return probabilities[:, 0]
    return resize_probabilities(probabilities[..., 0], images.shape[1])


def resize_probabilities(probabilities, size):
    """Probability maps `(N, S, S)` resized bilinearly to `(N, size, size)`: how a model's output
    at its input size is brought back to the resolution of the true masks."""
    import cv2

    if probabilities.shape[1] == size:
        return probabilities
    return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR) for p in probabilities])


def predict_with_mirror(model, images, batch_size=32):
    """`(plain, tta)`: segmenter probabilities without and with horizontal-flip test-time
    augmentation, from one plain and one mirrored pass."""
    plain = predict_probabilities(model, images, batch_size)
    mirrored = predict_probabilities(model, np.asarray(images)[:, :, ::-1], batch_size)[:, :, ::-1]
    return plain, (plain + mirrored) / 2
