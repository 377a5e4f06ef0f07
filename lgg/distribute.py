"""Data-parallel training on TensorFlow's engine, `tf.distribute`: `train --distribute mirrored` (one
machine, all its GPUs: `MirroredStrategy`) and `--distribute multi-worker` (several machines, or several
processes on one, each started with the same command and its own `TF_CONFIG`, as TensorFlow documents:
`MultiWorkerMirroredStrategy`).

What does not change with the number of replicas N, so that a distributed run computes what one
process computes with the same settings:

- `batch_size` is the global batch: each step, each replica computes `batch_size / N` slices of the same
  stream of batches (it must divide), the gradients are averaged over all of them, and the learning rate
  stays the recipe's. (Raising the global batch to keep more GPUs busy changes the recipe: then scale the
  learning rate with it, e.g. linearly (Goyal et al. 2017), and measure.)
- Batch normalization is synchronized: the batch moments are all-reduced over the replicas (Keras'
  `synchronized=True`, TensorFlow only), so they are the global batch's, as in one process. The cost is a
  few small all-reduces per layer and step. (Not synchronized, each replica would normalize with the
  moments of `batch_size / N` slices: 2 or 4 slices on 8 or 4 GPUs at the default batch of 16.)
- The time budget is the chief's: its elapsed time is sent to every worker (an all-reduce) at every
  epoch boundary, so every worker sets the same learning rate and stops after the same epoch.

What does change: the "batch" and "tversky" overlap terms of the loss (and the logged batch Dice and
Jaccard) are computed per replica (the mean of N terms over `batch_size / N` slices each; Keras averages
losses that way); the "slice" Dice term and the cross-entropy are the same sums. XLA is off with more than
one replica (`Distribution.check`).

Only the chief (the chief task, else worker 0) writes the run folder; the other workers write theirs
into a temporary folder that is removed when they finish. `--resume` continues from the chief's run
folder, which the other workers must then see (a shared file system; `lgg.train.fit` checks that every
worker resumes at the chief's epoch). Evaluation and export run on the chief alone,
after training, on a copy of the model outside the strategy.

Keras 3 (3.15) does not run `fit` under `MultiWorkerMirroredStrategy` as released
(keras-team/keras#20585, open): its first-batch build all-reduces the input batch (the collective
reduce of a batch fails), and the scalar logs are reduced along an axis 0 they do not have.
`_patch_keras_for_multi_worker` replaces those two steps while a multi-worker run trains, for the
Keras versions it was checked with; another version is refused with the reason, rather than patched blind.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras

from lgg.config import DISTRIBUTE

PATCHED_KERAS = ("3.15",)  # the Keras versions whose TensorFlow trainer the multi-worker fix was checked against


class Distribution:
    """Where one run trains: its strategy (None: this process's default), whether this process is the chief.

    Made in two steps, so that a run's settings and folder are checked before the cluster is joined:
    `Distribution(name)` reads the cluster description (no TensorFlow op), `start()` makes the strategy
    (a multi-worker one waits there for every worker).
    """

    def __init__(self, name=None):
        if name not in (None, *DISTRIBUTE):
            raise ValueError(f"distribute must be one of {DISTRIBUTE} or None; received {name!r}")
        self.name, self.strategy, self.task, self.cluster = name, None, ("worker", 0), {}
        if name is None:
            return
        if keras.backend.backend() != "tensorflow":
            raise ValueError(f"--distribute {name} runs on tf.distribute: it needs KERAS_BACKEND=tensorflow")
        if name == "mirrored":
            return
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--distribute multi-worker needs TF_CONFIG in the environment of every worker, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
            )
        description = os.environ["TF_CONFIG"]
        try:
            config = json.loads(description)
            self.cluster, task = dict(config["cluster"]), config["task"]
            self.task = (task["type"], int(task["index"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"TF_CONFIG is not a TensorFlow cluster description ({error!r}): {description}") from None
        if self.task[0] not in ("chief", "worker") or set(self.cluster) - {"chief", "worker"}:
            raise ValueError(
                f"TF_CONFIG: --distribute multi-worker trains with chief and worker tasks only (no evaluator or "
                f"parameter server); received task {self.task[0]!r} in a cluster of {sorted(self.cluster)}"
            )
        addresses = self.cluster.get(self.task[0])
        if not isinstance(addresses, list) or not all(isinstance(address, str) for address in addresses):
            raise ValueError(
                f"TF_CONFIG: cluster[{self.task[0]!r}] must be a list of host:port; received {addresses!r}"
            )
        if not 0 <= self.task[1] < len(addresses):
            raise ValueError(
                f"TF_CONFIG: task index {self.task[1]} is not one of the {len(addresses)} {self.task[0]} addresses"
            )
        _check_patchable()

    def start(self):
        """Make the strategy (a multi-worker one connects to the cluster and waits for every worker)."""
        if self.name is None or self.strategy is not None:
            return self
        import tensorflow as tf

        if self.name == "mirrored":
            self.strategy = tf.distribute.MirroredStrategy()
        else:
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return self

    @property
    def replicas(self):
        return 1 if self.strategy is None else self.strategy.num_replicas_in_sync

    @property
    def is_chief(self):
        """TensorFlow's rule (`multi_worker_util.is_chief`): the chief task where the cluster has one,
        else worker 0."""
        task_type, index = self.task
        if "chief" in self.cluster:
            return task_type == "chief"
        return task_type == "worker" and index == 0

    @property
    def multi_worker(self):
        return self.name == "multi-worker"

    def check(self, batch_size, jit_compile):
        """Refuse what cannot run on the started strategy; return the compiler setting to train with:
        XLA off with more than one replica (Keras 3.15's `fit` under MirroredStrategy with XLA reads a
        variable of replica 1 from device 0, "Trying to access resource ... located in device CPU:1")."""
        if batch_size % self.replicas:
            raise ValueError(
                f"batch_size {batch_size} is the global batch: it must divide among the {self.replicas} replicas "
                f"of --distribute {self.name}"
            )
        if self.replicas == 1:
            return jit_compile
        if jit_compile:
            raise ValueError(
                f"--jit-compile with --distribute {self.name} ({self.replicas} replicas): XLA fails under "
                "tf.distribute in Keras 3.15 (a replica's variable read from another device); leave it unset"
            )
        return False

    def evaluation_batch_size(self, count, batch_size):
        """A batch size for evaluating `count` slices under which every replica gets slices in every batch:
        a multiple of the replicas, the last batch at least one slice per replica (Keras' distributed
        evaluation fails on a replica's empty share of a short last batch, `empty_share`). The largest up to
        `batch_size`, else the smallest above it."""
        replicas = self.replicas
        if replicas == 1:
            return batch_size
        sizes = range(replicas, count + replicas, replicas)  # the last may hold all the slices in one batch
        fits = [size for size in sizes if not empty_share(count % size, replicas)]
        if fits:
            return max([size for size in fits if size <= batch_size] or [min(fits)])
        raise ValueError(
            f"{count} validation slices cannot be shared among {self.replicas} replicas without an empty share: "
            "use more cases or fewer replicas"
        )

    def scope(self):
        """Build and compile the model in this (its variables mirrored on every replica)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def training(self):
        """Around `fit`: the Keras fix for multi-worker runs (see the module's docstring)."""
        return _patch_keras_for_multi_worker() if self.multi_worker else contextlib.nullcontext()

    def agree(self, value):
        """The chief's `value` (a float) on every worker (an all-reduce: tf.distribute reduces by sum or
        mean only, so every replica but the chief's first adds zero); `value` itself in one process."""
        if not self.multi_worker:
            return value
        import tensorflow as tf

        def share(context):  # global replica 0 is the chief's first: every other replica adds zero
            return tf.constant(float(value) if context.replica_id_in_sync_group == 0 else 0.0)

        local = self.strategy.experimental_distribute_values_from_function(share)
        return float(self.strategy.reduce("SUM", local, axis=None))

    @contextlib.contextmanager
    def run_folder(self, out_dir, resume=False):
        """The folder this process writes: `out_dir` on the chief, a temporary one elsewhere (removed after);
        a resumed worker starts from the chief's resume state and history (`lgg.train.fit` then checks that
        every worker resumes at the chief's epoch)."""
        if self.is_chief:
            yield Path(out_dir)
            return
        folder = Path(tempfile.mkdtemp(prefix=f"lgg-worker{self.task[1]}-"))
        try:
            for name in ("resume", "history.csv") if resume else ():
                source = Path(out_dir) / name
                if source.is_dir():
                    shutil.copytree(source, folder / name)
                elif source.is_file():
                    shutil.copy2(source, folder / name)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def empty_share(remainder, replicas):
    """Whether a last batch of `remainder` slices leaves a replica nothing: tf.distribute gives each replica
    in turn ceil(remainder / replicas) slices until none are left (5 over 4 replicas: 2, 2, 1, 0)."""
    if remainder == 0:
        return False
    return -(-remainder // replicas) * (replicas - 1) >= remainder


def synchronize_batchnorm(model):
    """Batch moments all-reduced over the replicas in every BatchNormalization layer of `model`
    (nested models too). Export swaps in unsynchronized twins (`lgg.models.exportable`)."""
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _check_patchable():
    version = ".".join(keras.__version__.split(".")[:2])
    if version not in PATCHED_KERAS:
        raise ValueError(
            f"--distribute multi-worker: Keras {keras.__version__} is not one this package's fix for "
            f"keras-team/keras#20585 was checked with ({', '.join(PATCHED_KERAS)}); "
            f"install keras=={PATCHED_KERAS[-1]}.*"
        )


@contextlib.contextmanager
def _patch_keras_for_multi_worker():
    """Keras 3's TensorFlow trainer under `MultiWorkerMirroredStrategy` (keras-team/keras#20585):

    1. `fit` builds the model's metrics from the first batch, which it all-reduces (MEAN) across
       workers to get one batch; the collective reduce of a nested batch fails ("Attempt to convert a
       value (PerReplica...)"). Only the batch's shapes matter there: this replica's part is used.
    2. Each step's logs (scalars) are reduced across workers with `axis=0`, which a scalar has not
       ("Invalid reduction dimension 0 for input with 0 dimensions"): reduced with `axis=None`.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    _check_patchable()

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda value: (
                        self.distribute_strategy.experimental_local_results(value)[0]
                        if isinstance(value, tf.distribute.DistributedValues)
                        else value
                    ),
                    next(batches),
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):

            def reduce(value):
                rank = len(strategy.experimental_local_results(value)[0].shape)
                return strategy.reduce("MEAN", value, axis=0 if rank else None)

            return tree.map_structure(reduce, values)
        return original_reduce(values, strategy, reduction)

    original_build, original_reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
        trainer.reduce_per_replica = original_reduce
