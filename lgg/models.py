"""Model builders: U-Net, ResNet50 + U-Net, and the tumor / no-tumor slice classifier.

Every model holds its own preprocessing, built from stock Keras layers only, so an exported
`.h5` takes raw slices (float32 in [0, 255], shape (N, S, S, 3), channels in the Kaggle order
pre-contrast, FLAIR, post-contrast) and loads in a process that never imports this package.
"""

import os
import threading
from pathlib import Path

import keras
from keras import layers

from lgg.config import MODEL_KINDS, PRECISIONS

# Skip connections of the ResNet50 encoder, shallow to deep, and the bridge (He et al. 2016).
RESNET50_SKIP_LAYERS = ("conv1_relu", "conv2_block3_out", "conv3_block4_out")
RESNET50_BRIDGE_LAYER = "conv4_block6_out"
# Scale of ImageNet pixels after the caffe-style mean subtraction ResNet50 was trained on,
# so a standardized MRI slice reaches the pretrained encoder at the range it expects.
IMAGENET_PIXEL_STD = 57.4
IMAGENET_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _standardize(inputs, name="preprocess"):
    """Rescale to [0, 1], then standardize each channel of each slice (zero mean, unit variance).

    Per-slice, per-channel standardization removes the scanner- and case-dependent intensity
    scale of MRI. `GroupNormalization` with one group per channel (instance normalization) does
    exactly that with a stock layer, so the exported model needs no custom code. (A
    `LayerNormalization` over the spatial axes would too, but its `axis` tuple comes back from
    `.h5` files as `-1` in Keras 3.15.)
    """
    x = layers.Rescaling(1.0 / 255.0, name=f"{name}_rescale")(inputs)
    return layers.GroupNormalization(
        groups=inputs.shape[-1], axis=-1, center=False, scale=False, epsilon=1e-3, name=f"{name}_standardize"
    )(x)


@keras.saving.register_keras_serializable(package="lgg", name="FusedBatchNormalization")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` computed by TensorFlow's fused kernel (`FusedBatchNormV3`, oneDNN on CPUs).

    The same variables and the same result up to rounding as the stock layer; the moving variance
    is updated with the unbiased batch variance (n / (n - 1): 1.001 at the U-Net's coarsest level).
    Keras 3's own layer computes the moments and the normalization as separate operations, in
    float32 under mixed precision: on a 2-core Xeon (AVX-512, AMX) that was half the U-Net's
    training step in bfloat16. Only `train` on the TensorFlow backend builds with it
    (`build_model(..., fused_batchnorm=True)`); `exportable` swaps in the stock layer with the same
    weights, so no saved model ever needs this class. Elsewhere (other backends, masks, other axes)
    it is the stock layer.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.autocast = False  # inputs reach the kernel in the dtype the layer before computed (bfloat16 or float32)

    def call(self, inputs, training=None, mask=None):
        fused = (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.center
            and self.scale
            and not self.renorm
            and not self.synchronized
            and keras.backend.standardize_dtype(inputs.dtype) in ("float16", "bfloat16", "float32")
        )
        if not fused:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        statistics = {"mean": self.moving_mean, "variance": self.moving_variance, "epsilon": self.epsilon}
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, **statistics, is_training=True, exponential_avg_factor=1 - self.momentum
            )
            self.moving_mean.assign(mean)  # the kernel returns the updated moving averages
            self.moving_variance.assign(variance)
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, **statistics, is_training=False
            )
        return tf.cast(outputs, self.compute_dtype)


# Keras' weights files (`.weights.h5`: snapshots, best epoch, resume state) name each layer's entry after its class:
# under the stock name, weights saved from a fused model load into the stock one the run exports, and back. (A whole
# saved model names it by its registered name, lgg>FusedBatchNormalization, and loads where lgg.models is imported.)
FusedBatchNormalization.__name__ = "BatchNormalization"

_BATCHNORM = threading.local()  # what `_conv_block` builds in this thread; `build_model` may switch it


def _batchnorm_layer():
    return getattr(_BATCHNORM, "layer", layers.BatchNormalization)


def _conv_block(x, filters, name):
    for index in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        x = _batchnorm_layer()(name=f"{name}_bn{index}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return x


def _decoder_step(x, skip, filters, name):
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return _conv_block(x, filters, name)


def _attention_gate(skip, gating, filters, name):
    """Additive attention gate (Oktay et al. 2018, "Attention U-Net"): each skip-connection pixel
    is weighted by a coefficient in [0, 1] computed from the skip features and the coarser
    decoder features (the gating signal, half the skip's resolution)."""
    theta = layers.Conv2D(filters, 2, strides=2, padding="same", use_bias=False, name=f"{name}_theta")(skip)
    phi = layers.Conv2D(filters, 1, padding="same", name=f"{name}_phi")(gating)
    joint = layers.Activation("relu", name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta, phi]))
    coefficients = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_coefficients")(joint)
    coefficients = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_upsample")(coefficients)
    return layers.Multiply(name=f"{name}_gated")([skip, coefficients])


def _segmentation_head(x):
    # float32 output even under a mixed-precision policy, so Dice and the loss stay exact.
    return layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)


def build_unet(input_shape=(256, 256, 3), base_filters=16, depth=4, name="unet"):
    """U-Net (Ronneberger, Fischer, Brox 2015) with batch normalization.

    Each level applies two 3x3 convolutions with batch norm and ReLU; the encoder max-pools, the
    decoder upsamples with 2x2 transposed convolutions and concatenates the encoder's features.

    Args:
        input_shape: tuple. Slice shape `(S, S, 3)`; `S` must be divisible by `2**depth`.
            Defaults to `(256, 256, 3)`.
        base_filters: int. Filters at the first level, doubled at each level down.
            Defaults to `16` (1.9 M parameters at depth 4), sized for CPU training.
        depth: int. Number of pooling steps. Defaults to `4`, as the paper.
        name: str. Model name. Defaults to `"unet"`.

    Example:
        >>> model = build_unet(input_shape=(128, 128, 3), base_filters=8)
        >>> model.output_shape
        (None, 128, 128, 1)
    """
    size = input_shape[0]
    if len(input_shape) != 3 or input_shape[0] != input_shape[1] or size % (2**depth):
        raise ValueError(
            f"input_shape must be (S, S, C) with S divisible by 2**depth={2**depth}; received input_shape={input_shape}"
        )
    inputs = keras.Input(shape=input_shape, name="slice")
    x = _standardize(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, name=f"enc{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, name="bridge")
    for level in reversed(range(depth)):
        x = _decoder_step(x, skips[level], base_filters * 2**level, name=f"dec{level + 1}")
    return keras.Model(inputs, _segmentation_head(x), name=name)


def available_encoder_weights(encoder_weights):
    """`encoder_weights` if they can be had on this machine, else None, with the reason printed: the
    fallback of the notebooks and the results table (the command line refuses instead)."""
    try:
        _resnet50_weights(encoder_weights)
    except RuntimeError as error:  # "imagenet" offline, without the cached weights file
        print(f"{error}\n-> falling back to encoder_weights=None (random initialization)")
        return None
    return encoder_weights


def _resnet50_weights(encoder_weights):
    """Resolve `encoder_weights` to what `keras.applications.ResNet50` accepts, or fail clearly."""
    if encoder_weights is None:
        return None
    if encoder_weights != "imagenet":
        path = Path(encoder_weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder_weights file not found: {path}. Pass None, 'imagenet', or the path of "
                f"ResNet50 no-top weights ({IMAGENET_WEIGHTS_FILE})."
            )
        return str(path)
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / IMAGENET_WEIGHTS_FILE
    if cache.is_file():
        return "imagenet"
    try:
        keras.utils.get_file(
            IMAGENET_WEIGHTS_FILE,
            "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_WEIGHTS_FILE,
            cache_subdir="models",
            file_hash="4d473c1dd8becc155b73f8504c6f6626",
        )
    except Exception as error:  # any network failure: say what to do instead of a traceback
        raise RuntimeError(
            "Could not download the ImageNet weights for ResNet50 "
            f"({type(error).__name__}: {error}). This machine is probably offline. Either copy "
            f"{IMAGENET_WEIGHTS_FILE} into {cache.parent}/ (or pass its path as encoder_weights), "
            "or train from scratch with encoder_weights=None."
        ) from None
    return "imagenet"


def _resnet50_encoder(inputs, encoder_weights, freeze_encoder):
    x = _standardize(inputs)
    x = layers.Rescaling(IMAGENET_PIXEL_STD, name="preprocess_imagenet_scale")(x)
    encoder = keras.applications.ResNet50(include_top=False, weights=_resnet50_weights(encoder_weights), input_tensor=x)
    encoder.trainable = not freeze_encoder
    return encoder


def build_resnet50_unet(
    input_shape=(256, 256, 3),
    encoder_weights="imagenet",
    freeze_encoder=False,
    decoder_filters=(256, 128, 64, 32),
    attention=False,
    name=None,
):
    """U-Net whose encoder is ResNet50 (He et al. 2016), in the segmentation_models style.

    The encoder's features at 1/2, 1/4 and 1/8 resolution (`RESNET50_SKIP_LAYERS`) feed the
    decoder's skip connections and `RESNET50_BRIDGE_LAYER` (1/16) is the bridge; the last
    decoder step returns to full resolution.

    Args:
        input_shape: tuple. `(S, S, 3)`, `S` divisible by 16. Defaults to `(256, 256, 3)`.
        encoder_weights: `"imagenet"`, `None` or a path to ResNet50 no-top weights.
            Defaults to `"imagenet"`; offline, `"imagenet"` raises a `RuntimeError` saying how
            to proceed.
        freeze_encoder: bool. Keep the encoder's weights fixed. Defaults to `False`.
        decoder_filters: tuple of 4 ints. Filters of the decoder steps, deep to shallow.
            Defaults to `(256, 128, 64, 32)`.
        attention: bool. Pass each skip connection through an attention gate (Oktay et al.
            2018), gated by the decoder features one level deeper: the original work's ResUANet.
            Defaults to `False`.
        name: str. Model name. Defaults to `"resnet50_unet"` (`"resnet50_attention_unet"`).

    Example:
        >>> model = build_resnet50_unet((128, 128, 3), encoder_weights=None)
    """
    if len(input_shape) != 3 or input_shape[0] % 16 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (S, S, 3) with S divisible by 16; received {input_shape}")
    if len(decoder_filters) != len(RESNET50_SKIP_LAYERS) + 1:
        raise ValueError(f"decoder_filters needs 4 entries; received {decoder_filters}")
    inputs = keras.Input(shape=input_shape, name="slice")
    encoder = _resnet50_encoder(inputs, encoder_weights, freeze_encoder)
    skips = [encoder.get_layer(layer_name).output for layer_name in RESNET50_SKIP_LAYERS]
    x = encoder.get_layer(RESNET50_BRIDGE_LAYER).output
    for step, filters in enumerate(decoder_filters):
        skip = skips[-1 - step] if step < len(skips) else None
        level = len(decoder_filters) - step
        if skip is not None and attention:
            skip = _attention_gate(skip, x, filters // 2, name=f"att{level}")
        x = _decoder_step(x, skip, filters, name=f"dec{level}")
    name = name or ("resnet50_attention_unet" if attention else "resnet50_unet")
    return keras.Model(inputs, _segmentation_head(x), name=name)


def build_classifier(
    input_shape=(256, 256, 3),
    backbone="light",
    encoder_weights="imagenet",
    freeze_encoder=False,
    name=None,
):
    """Tumor / no-tumor slice classifier; outputs the probability that a slice shows tumor.

    Args:
        input_shape: tuple. `(S, S, 3)`. Defaults to `(256, 256, 3)`.
        backbone: `"light"` (a small CNN that trains in minutes on a CPU) or `"resnet50"`
            (the original notebooks' choice). Defaults to `"light"`.
        encoder_weights: for `"resnet50"`: `"imagenet"`, `None` or a weights file.
            Defaults to `"imagenet"`.
        freeze_encoder: bool. For `"resnet50"`: keep the encoder fixed. Defaults to `False`.
        name: str. Model name. Defaults to `"classifier_<backbone>"`.

    Example:
        >>> model = build_classifier((128, 128, 3), backbone="light")
        >>> model.output_shape
        (None, 1)
    """
    inputs = keras.Input(shape=input_shape, name="slice")
    if backbone == "resnet50":
        x = _resnet50_encoder(inputs, encoder_weights, freeze_encoder).output
    elif backbone == "light":
        x = _standardize(inputs)
        for level, filters in enumerate((16, 32, 64, 128, 128)):
            x = _conv_block(x, filters, name=f"enc{level + 1}")
            x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    else:
        raise ValueError(f"backbone must be 'light' or 'resnet50'; received {backbone!r}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="tumor")(x)
    return keras.Model(inputs, outputs, name=name or f"classifier_{backbone}")


# ----------------------------------------------------------------------------- the registry: a model by its kind
def build_model(
    kind,
    image_size,
    encoder_weights=None,
    base_filters=16,
    backbone="light",
    attention=False,
    precision="float32",
    fused_batchnorm=False,
):
    """One of the three models; `precision="mixed_bfloat16"` computes in bfloat16 with float32
    weights and a float32 output layer (Keras mixed precision); `fused_batchnorm=True` builds our
    blocks' batch normalization as `FusedBatchNormalization` (for training on TensorFlow)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; received {precision!r}")
    previous, previous_norm = keras.mixed_precision.global_policy(), _batchnorm_layer()
    keras.mixed_precision.set_global_policy(precision)  # per thread, as the switch of batch normalization
    _BATCHNORM.layer = FusedBatchNormalization if fused_batchnorm else layers.BatchNormalization
    try:
        return _build_model(kind, image_size, encoder_weights, base_filters, backbone, attention)
    finally:
        keras.mixed_precision.set_global_policy(previous)
        _BATCHNORM.layer = previous_norm


def exportable(model, kind, image_size, base_filters=16, backbone="light", attention=False):
    """The model as it is exported and evaluated: float32 and stock layers only, with the trained
    weights (mixed precision keeps its weights in float32, and `FusedBatchNormalization` holds the
    stock layer's variables, so nothing is rounded). A model that is both already is returned as is."""
    fused = any(isinstance(layer, FusedBatchNormalization) for layer in model.layers)  # build_model's are flat
    # built under tf.distribute (lgg.distribute: its BatchNorm layers synchronized): the copy is a plain model
    distributed = getattr(model, "_distribute_strategy", None) is not None
    if model.dtype_policy.name == "float32" and not fused and not distributed:
        return model
    copy = build_model(kind, image_size, None, base_filters, backbone, attention)
    copy.set_weights(model.get_weights())
    return copy


def _build_model(kind, image_size, encoder_weights, base_filters, backbone, attention):
    input_shape = (image_size, image_size, 3)
    if attention and kind != "resnet50-unet":
        raise ValueError(f"attention gates are an option of resnet50-unet, not of {kind}")
    if kind == "unet":
        return build_unet(input_shape, base_filters=base_filters)
    if kind == "resnet50-unet":
        return build_resnet50_unet(input_shape, encoder_weights=encoder_weights, attention=attention)
    if kind == "classifier":
        return build_classifier(input_shape, backbone=backbone, encoder_weights=encoder_weights)
    raise ValueError(f"model kind must be one of {MODEL_KINDS}; received {kind!r}")


def resize_matrix(source, target):
    """`(source, target)` float32: resizing one axis of `source` pixels to `target` as `cv2` does it in
    `lgg` (`INTER_AREA` to shrink slices, `INTER_LINEAR` to take probabilities back up). Both are
    linear and separable, so each column is `cv2.resize` of a unit signal, and a resize of an image is
    this matrix applied along its width and then its height."""
    import cv2
    import numpy as np

    interpolation = cv2.INTER_AREA if target < source else cv2.INTER_LINEAR
    unit = np.eye(source, dtype=np.float32)
    return np.stack([cv2.resize(row[None, :], (target, 1), interpolation=interpolation)[0] for row in unit])


def _resize(x, source, target, name):
    """`(N, source, source, C)` -> `(N, target, target, C)` with `resize_matrix` along the width, then the height:
    two fixed `Dense` layers and three `Permute`s, stock layers that compute the same on every backend (Keras's
    `Resizing` has no area interpolation outside TensorFlow)."""
    matrix = resize_matrix(source, target)
    x = layers.Permute((1, 3, 2), name=f"{name}_width_last")(x)  # (N, H, C, W)
    width = layers.Dense(target, use_bias=False, trainable=False, name=f"{name}_width")
    x = width(x)  # (N, H, C, target)
    x = layers.Permute((3, 2, 1), name=f"{name}_height_last")(x)  # (N, target, C, H)
    height = layers.Dense(target, use_bias=False, trainable=False, name=f"{name}_height")
    x = height(x)  # (N, target, C, target): the last axis is the height now
    for dense in (width, height):
        dense.set_weights([matrix])
    return layers.Permute((3, 1, 2), name=f"{name}_channels_last")(x)  # (N, target, target, C)


def average_models(members, name="ensemble", size=None):
    """One model that averages the output probabilities of `members` (the nnU-Net way of ensembling).

    It keeps the contract of a single model: one input (raw slices), one output of the same side,
    every member inside with its own preprocessing, stock layers only, so the `.h5` loads with
    `keras.models.load_model(path, compile=False)` anywhere.

    Members of one side are averaged at that side. Members trained at different sides (a 128x128
    and a 160x160 U-Net) need `size`, the side of the ensemble's slices (the dataset's native 256):
    inside the model each member smaller than that shrinks the slices as `lgg` shrinks them for it
    alone (`cv2.INTER_AREA`) and takes its probabilities back to `size` as `lgg` takes them back to
    256 (`cv2.INTER_LINEAR`), both as fixed matrices (`resize_matrix`); the one difference is that
    `lgg` rounds a shrunk slice to whole grey levels (uint8) and the model does not.
    """
    import numbers

    from lgg.inference import model_task

    members = list(members)
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two models; received {len(members)}")
    for index, member in enumerate(members, start=1):
        if model_task(member) != "segmentation":  # model_task refuses any shape but (N, S, S, 3) in
            raise ValueError(f"model {index} outputs {member.output_shape}: an ensemble averages segmenters")
    first = members[0]
    sides = sorted({member.input_shape[1] for member in members})
    if size is None:
        if len(sides) > 1:
            raise ValueError(f"the models take slices of {sides} pixels a side: an ensemble needs one shape, or a "
                             "`size` its slices have (e.g. 256) to which each member's are resized")  # fmt: skip
        size = sides[0]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < sides[-1]:
        raise ValueError(f"size must be a whole number of pixels no smaller than any member's side ({sides[-1]})")
    size = int(size)
    inputs = keras.Input(shape=(size, size, first.input_shape[-1]), name="slice")
    outputs = []
    for index, member in enumerate(members, start=1):
        side, inner = member.input_shape[1], keras.Model(member.input, member.output, name=f"member{index}")
        if side == size:
            outputs.append(inner(inputs))
        else:
            shrunk = _resize(inputs, size, side, f"member{index}_in")
            outputs.append(_resize(inner(shrunk), side, size, f"member{index}_out"))
    return keras.Model(inputs, layers.Average(name="mean_probability")(outputs), name=name)
