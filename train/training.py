"""Train CancerNet on a patient-level split; keep the epoch with the best validation ROC-AUC.

Writes RUN_DIR/model.keras, split.csv, history.csv and train_meta.json (what export puts
into the contract: data, split, threshold chosen on validation patients, metrics).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idc_infer import code_version
from idc_infer.contract import PUBLIC_SET_PATCH_MPP, Contract
from idc_infer.errors import IdcError
from idc_infer.files import write_json
from idc_infer.metrics import best_balanced_threshold, classification_metrics

from .data import (
    TrainingDataError,
    counts_by_patient,
    discover_labelled,
    drop_refused_sizes,
    resolve_split,
    write_split_manifest,
)
from .options import PATIENT_WEIGHTS
from .synthetic import SYNTHETIC_MARKER

EARLY_STOPPING = ("val-auc", "val-loss")  # what patience counts and which epoch is kept
DISTRIBUTE = ("none", "mirrored", "multiworker")  # tf.distribute: none, all GPUs of this box, TF_CONFIG's cluster

log = logging.getLogger(__name__)

COLLAPSE_STD = 1e-3


class CollapsedModelError(IdcError, RuntimeError):
    """The trained model gives (almost) the same output for every patch."""


@dataclass
class TrainConfig:
    data_dir: Path
    run_dir: Path
    epochs: int = 40
    batch_size: int = 32
    seed: int = 0
    learning_rate: float = 1e-2
    split: str = "patient"  # "patient", "janowczyk2016", "folders", "random-patch" or a manifest CSV path
    patience: int = 8
    min_epochs: int = 3
    augment: str = "idc"  # "idc", "hed" (stain jitter), "seed" (the tutorial's), "both" or "none"
    optimizer: str = "seed"  # "seed": the arch's seed optimizer; "adam-cosine": Adam, cosine decay to 0 over the epochs
    patient_weight: str = (
        "none"  # how much each patient weighs: "none" (each patch 1), "sqrt" (1/sqrt n), "equal" (1/n)
    )
    early_stopping: str = "val-auc"  # what patience counts and which epoch is kept: one of EARLY_STOPPING
    arch: str = "cancernet"
    resume: bool = False
    distribute: str = "none"  # one of DISTRIBUTE: "mirrored" is all GPUs of this box, "multiworker" TF_CONFIG's
    mixed_precision: bool | None = None  # None: on when a GPU is present
    transfer_weights: str | None = "imagenet"
    patch_mpp: float = PUBLIC_SET_PATCH_MPP  # microns per pixel of the training patches, into the contract


def config_record(config: TrainConfig) -> dict:
    """The configuration as run_config.json and train_meta.json record it (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()}


def _seed_everything(seed: int) -> None:
    import keras

    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    keras.utils.set_random_seed(seed)


def patch_weights(labels: list[int], patient_ids: list[str], patient_weight: str = "none") -> np.ndarray:
    """Per-patch training weights: each patient weighs n (none), sqrt(n) (sqrt) or 1 (equal) in
    total, then both classes are balanced on those weights; mean weight 1.

    A whole patient has ~1,000 patches and a sampled one ~40: unweighted, a few whole patients'
    slides dominate what the model learns of tissue variation between patients.
    """
    if patient_weight not in PATIENT_WEIGHTS:
        raise ValueError(f"unknown patient weighting {patient_weight!r}; choose from {', '.join(PATIENT_WEIGHTS)}")
    classes = np.asarray(labels)
    ids, index, sizes = np.unique(np.asarray(patient_ids), return_inverse=True, return_counts=True)
    per_patch = {"none": np.ones(len(ids)), "sqrt": 1.0 / np.sqrt(sizes), "equal": 1.0 / sizes}[patient_weight]
    weights = per_patch[index].astype(np.float64)
    for c in (0, 1):  # then each class weighs the same in total (n / 2 n_class per patch for "none")
        total = weights[classes == c].sum()
        if total > 0:
            weights[classes == c] /= total
    return weights * (len(weights) / weights.sum())


TRAINED_CONTRACT_FIELDS = (
    "input_height_px",
    "input_width_px",
    "layout",
    "channel_order",
    "scale",
    "offset",
    "resize_method",
    "native_patch_px",
    "undersized_policy",
    "oversized_policy",
    "class_names",
    "positive_class_index",
)


def training_contract(contract: Contract, threshold: float, patch_mpp: float | None) -> dict:
    """What train_meta.json records of the contract the patches were trained through: every preprocessing
    field, the threshold chosen on the validation patients and the patches' scale."""
    record = {name: getattr(contract, name) for name in TRAINED_CONTRACT_FIELDS}
    record["class_names"] = list(contract.class_names)
    return record | {"threshold": float(threshold), "patch_mpp": patch_mpp}


def keras_prob_idc(model, dataset, positive_index: int = 1) -> np.ndarray:
    """The positive (IDC) class's column of a Keras model's output on a dataset, float64."""
    probs = model.predict(dataset, verbose=0)
    return probs[:, positive_index].astype(np.float64)


def check_not_collapsed(probs: np.ndarray, where: str) -> None:
    spread = float(np.std(probs))
    if spread < COLLAPSE_STD:
        raise CollapsedModelError(
            f"the model's output on {where} is constant (std {spread:.2e}): it has collapsed, usually because "
            "BatchNormalization statistics had not settled; train longer or with more data"
        )


def recalibrate_batchnorm(model, dataset, max_batches: int = 40) -> None:
    """Re-estimate BatchNormalization moving statistics as a plain average over training batches.

    With momentum 0.99 the moving statistics need hundreds of steps to forget their initial
    values; a short run then exports a model with constant output. Averaging the batch
    statistics of the current weights ("precise BN") fixes that and does not touch the weights.
    """
    import keras

    def walk(layer):  # BN layers of nested models (a transfer backbone) too
        for inner in getattr(layer, "layers", []):
            yield inner
            yield from walk(inner)

    layers = [layer for layer in walk(model) if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    try:
        for k, (images, _) in enumerate(dataset.take(max_batches), start=1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / k  # running mean of batch statistics
            model(images, training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def validation_loss(labels, probs_idc) -> float:
    """Categorical cross-entropy of the validation patches (computed here, so it works distributed)."""
    labels = np.asarray(labels)
    p_true = np.where(labels == 1, probs_idc, 1.0 - np.asarray(probs_idc))
    return float(-np.mean(np.log(np.clip(p_true, 1e-7, 1.0))))


def _make_auc_callback(
    val_ds,
    val_labels,
    bn_ds,
    patience: int,
    min_epochs: int,
    state_dir: Path,
    resume: bool,
    monitor: str = "val-auc",
    positive_index: int = 1,
):
    import json

    import keras

    from idc_infer.metrics import roc_auc

    best_weights_file = state_dir / "best.weights.h5"
    state_file = state_dir / "best.json"

    class BestByValAuc(keras.callbacks.Callback):
        """Keep the weights of the epoch with the best validation ROC-AUC (default; loss can pick
        an early epoch whose BatchNormalization statistics have not settled) or lowest validation
        loss, stop after ``patience`` epochs without one. State is saved every epoch so --resume
        continues the same early stopping."""

        def __init__(self):
            super().__init__()
            self.best_score, self.best_epoch, self.wait = -math.inf, -1, 0
            if resume and state_file.exists() and best_weights_file.exists():
                saved = json.loads(state_file.read_text())
                if saved.get("monitor", "val-auc") != monitor:
                    raise TrainingDataError(
                        f"the run was started with --early-stopping {saved.get('monitor', 'val-auc')}; "
                        f"resume it with the same setting, not {monitor}"
                    )
                self.best_score, self.best_epoch, self.wait = saved["best_score"], saved["best_epoch"], saved["wait"]

        def on_epoch_end(self, epoch, logs=None):
            recalibrate_batchnorm(self.model, bn_ds)
            probs = keras_prob_idc(self.model, val_ds, positive_index)
            auc = roc_auc(val_labels, probs)
            spread = float(np.std(probs))
            if logs is not None:
                logs["val_roc_auc"], logs["val_prob_std"] = auc, spread
            loss = validation_loss(val_labels, probs)
            if logs is not None:
                logs["val_idc_loss"] = loss
            score = auc if monitor == "val-auc" else -loss  # higher is better either way
            usable = not math.isnan(score) and spread >= COLLAPSE_STD
            # patience 0: no early stopping, every epoch is kept in turn, so the last one wins (as the seed)
            if patience == 0 or (usable and score > self.best_score):
                self.best_score, self.best_epoch, self.wait = score, epoch, 0
                self.model.save_weights(best_weights_file)
            else:
                self.wait += 1
                if self.wait >= patience and epoch + 1 >= min_epochs:
                    self.model.stop_training = True
            write_json(
                state_file,
                {"best_score": self.best_score, "best_epoch": self.best_epoch, "wait": self.wait, "monitor": monitor},
            )

        def on_train_end(self, logs=None):
            if best_weights_file.exists():
                self.model.load_weights(best_weights_file)

    return BestByValAuc()


def make_epoch_timer():
    """A callback recording the wall seconds of each epoch (training, BatchNorm re-estimation and
    validation) as ``epoch_s`` in the epoch's logs, so history.csv holds the epoch times."""
    import time

    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["epoch_s"] = round(time.perf_counter() - self.started, 1)

    return EpochTimer()


def _strategy(name: str):
    """The tf.distribute strategy; created before any other TensorFlow call (multi-worker needs that)."""
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainingDataError(
                "--distribute multiworker needs TF_CONFIG (the cluster and this worker's task); see the README"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown --distribute {name!r}")


def is_chief(strategy) -> bool:
    """Whether this process writes the run's outputs: always, except on non-chief workers of a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


# what --resume must find unchanged (anything else, e.g. --epochs to train longer, may change)
RESUME_KEYS = (
    "data_dir",
    "split",
    "arch",
    "batch_size",
    "seed",
    "learning_rate",
    "augment",
    "early_stopping",
    "distribute",
    "transfer_weights",
    "optimizer",
    "patient_weight",
)


def _check_resumable(run_dir: Path, config_record: dict, assignment: dict) -> None:
    import json

    started = run_dir / "run_config.json"
    if not started.exists():
        raise TrainingDataError(
            f"{run_dir} has no run_config.json: it was not started by this version of idc-train, "
            "so it cannot be resumed safely; start a new --out"
        )
    previous = json.loads(started.read_text(encoding="utf-8"))

    def same(key: str) -> bool:
        before, now = previous["config"].get(key), config_record.get(key)
        if key in ("data_dir", "split") and before and now and Path(before).exists() and Path(now).exists():
            return Path(before).resolve() == Path(now).resolve()  # relative or absolute, the same place
        return str(before) == str(now)

    # adam-cosine decays over epochs x steps: a new --epochs would make the learning rate jump back up
    keys = RESUME_KEYS + (("epochs",) if config_record.get("optimizer") == "adam-cosine" else ())
    changed = [key for key in keys if not same(key)]
    if changed:
        raise TrainingDataError(
            f"{run_dir} was started with other settings ({', '.join(changed)}); resume with the "
            "same options or start a new --out"
        )
    if previous["split"] != assignment:
        raise TrainingDataError(
            f"the split of {run_dir} assigned patients differently (the data or the manifest "
            "changed); resuming would mix test patients into training: start a new --out"
        )


def _use_mixed_precision(requested: bool | None) -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU")) if requested is None else requested


def describe_data(data_dir: Path, counts: dict[str, tuple[int, int]], synthetic: bool) -> str:
    n0 = sum(c[0] for c in counts.values())
    n1 = sum(c[1] for c in counts.values())
    kind = "SYNTHETIC patches (demo)" if synthetic else "real patches"
    return f"{kind} from {data_dir.name}: {len(counts)} patients, {n0} non-IDC + {n1} IDC"


def train(config: TrainConfig, contract: Contract | None = None) -> dict:
    """Train, pick the threshold on validation patients, evaluate on test patients, write RUN_DIR."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import shutil

    import keras

    from .architectures import build_model, make_optimizer
    from .pipeline import make_dataset

    contract = contract or Contract()
    strategy = _strategy(config.distribute)  # first: multi-worker collectives must be set up before anything else
    chief = is_chief(strategy)
    run_dir = Path(config.run_dir)
    if not chief:  # every worker trains; only the chief writes the run, the others keep scratch state apart
        resolver = strategy.cluster_resolver
        run_dir = run_dir / f".worker-{resolver.task_type}-{resolver.task_id}"
    _seed_everything(config.seed)

    patches = discover_labelled(config.data_dir)
    if not patches:
        raise TrainingDataError(f"no labelled patches found under {config.data_dir}")
    counts = counts_by_patient(patches)
    for pid, (n0, n1) in counts.items():
        log.info("patient %s: %d non-IDC, %d IDC", pid, n0, n1)
    sets, assignment = resolve_split(config.split, patches, config.seed)
    sets = drop_refused_sizes(sets, contract)  # before any count, weight or class check is made of them
    if not assignment:  # random-patch: record each patient's sets so the leak is visible
        sets_of: dict[str, set[str]] = {}
        for name, items in sets.items():
            for patch in items:
                sets_of.setdefault(patch.patient_id, set()).add(name)
        assignment = {pid: "+".join(sorted(names)) for pid, names in sets_of.items()}
    for name in ("train", "val", "test"):
        n1 = sum(p.label for p in sets[name])
        log.info(
            "%s set: %d patients, %d patches (%d non-IDC, %d IDC)",
            name,
            len({p.patient_id for p in sets[name]}),
            len(sets[name]),
            len(sets[name]) - n1,
            n1,
        )
    for name in ("train", "val"):
        labels = {p.label for p in sets[name]}
        if labels != {0, 1}:
            raise TrainingDataError(
                f"the {name} set needs patches of both classes, has {sorted(labels)}; "
                "give more patients or another --split"
            )
    record = config_record(config)
    if config.resume:
        _check_resumable(run_dir, record, assignment)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad data dir or split leaves no empty run behind
    write_json(run_dir / "run_config.json", {"config": record, "split": assignment})
    write_split_manifest(run_dir / "split.csv", assignment, counts)

    def arrays(name):
        return [str(p.path) for p in sets[name]], [p.label for p in sets[name]]

    train_paths, train_labels = arrays("train")
    val_paths, val_labels = arrays("val")
    weights = patch_weights(train_labels, [p.patient_id for p in sets["train"]], config.patient_weight)
    train_ds = make_dataset(
        train_paths,
        train_labels,
        contract,
        config.batch_size,
        shuffle=True,
        augment_images=config.augment,
        seed=config.seed,
        weights=weights,
    )
    bn_ds = make_dataset(train_paths, train_labels, contract, 64, shuffle=True, seed=config.seed + 1)
    val_ds = make_dataset(val_paths, val_labels, contract, 256)

    mixed = _use_mixed_precision(config.mixed_precision)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    log.info("training %s on %d replica(s), mixed precision %s", config.arch, strategy.num_replicas_in_sync, mixed)
    with strategy.scope():
        model = build_model(
            config.arch,
            contract.input_height_px,
            contract.input_width_px,
            len(contract.class_names),
            transfer_weights=config.transfer_weights,
        )
        optimizer = make_optimizer(
            config.arch,
            config.learning_rate,
            config.epochs,
            config.optimizer,
            steps_per_epoch=math.ceil(len(train_paths) / config.batch_size),
        )
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])

    state_dir = run_dir / "checkpoints"
    if not config.resume:
        shutil.rmtree(state_dir, ignore_errors=True)
        (run_dir / "history.csv").unlink(missing_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    best = _make_auc_callback(
        val_ds,
        val_labels,
        bn_ds,
        config.patience,
        config.min_epochs,
        state_dir,
        config.resume,
        monitor=config.early_stopping,
        positive_index=contract.positive_class_index,
    )
    callbacks = [
        keras.callbacks.BackupAndRestore(str(state_dir / "backup"), delete_checkpoint=False),  # every epoch
        best,
        make_epoch_timer(),  # after best (its validation pass counts), before the logger (which writes epoch_s)
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=config.resume),  # after best: logs val_roc_auc
    ]
    # Keras' own validation pass fails on a last batch that does not split evenly across replicas;
    # the ROC-AUC callback's predict() handles it, so distributed runs rely on that alone.
    model.fit(
        train_ds,
        validation_data=val_ds if strategy.num_replicas_in_sync == 1 else None,
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=2,  # class and patient weights: the dataset's third element
        shuffle=False,
    )  # tf.data shuffles already
    backbone_weights = (
        {"imagenet": "imagenet", "file": f"weights file {config.transfer_weights}"}.get(
            model.name.rsplit("_", 1)[-1], "none (trained from scratch)"
        )
        if config.arch == "transfer"
        else None
    )
    keras.mixed_precision.set_global_policy("float32")
    if mixed:  # the exported model runs on CPUs: save a float32 copy of the (float32) weights
        weights = model.get_weights()
        model = build_model(
            config.arch,
            contract.input_height_px,
            contract.input_width_px,
            len(contract.class_names),
            transfer_weights=None,
        )
        model.set_weights(weights)

    val_probs = keras_prob_idc(model, val_ds, contract.positive_class_index)
    check_not_collapsed(val_probs, "the validation patients")
    threshold = best_balanced_threshold(val_labels, val_probs)
    metrics = {"val": classification_metrics(val_labels, val_probs, threshold)}
    if sets["test"]:
        test_paths, test_labels = arrays("test")
        test_probs = keras_prob_idc(
            model, make_dataset(test_paths, test_labels, contract, 256), contract.positive_class_index
        )
        check_not_collapsed(test_probs, "the test patients")
        metrics["test"] = classification_metrics(test_labels, test_probs, threshold)
        metrics["test_at_0.5"] = classification_metrics(test_labels, test_probs, 0.5)

    model.save(run_dir / "model.keras")
    with open(run_dir / "history.csv", encoding="utf-8") as handle:
        epochs_run = sum(1 for _ in handle) - 1
    synthetic = (Path(config.data_dir) / SYNTHETIC_MARKER).exists()
    meta = {
        "training_data": describe_data(Path(config.data_dir), counts_by_patient(sets["train"]), synthetic),
        "data_dir": str(config.data_dir),
        "demo": synthetic,
        "split": {name: sorted({p.patient_id for p in sets[name]}) for name in ("train", "val", "test")},
        "split_method": config.split if not Path(config.split).is_file() else f"manifest {Path(config.split).name}",
        "threshold": threshold,
        "threshold_chosen_on": "validation patients (max balanced accuracy)",
        "metrics": metrics,
        "epochs_run": epochs_run,
        "best_epoch": best.best_epoch + 1,
        "config": record,
        "arch": config.arch,
        "patch_mpp": config.patch_mpp,
        # the preprocessing the model was trained with: idc-export starts the exported contract from it
        "contract": training_contract(contract, threshold, config.patch_mpp),
        "early_stopping": (
            f"{config.early_stopping}, patience {config.patience}" if config.patience else "off: the last epoch is kept"
        ),
        "replicas": strategy.num_replicas_in_sync,
        "mixed_precision": mixed,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "tensorflow": __import__("tensorflow").__version__,
    }
    if backbone_weights:
        meta["backbone_weights"] = backbone_weights
    if not chief:
        return meta
    # an evaluation of an earlier model must not sit beside this model's train_meta.json if the
    # evaluation below is interrupted (idc-crossval --resume would take it for this model's)
    shutil.rmtree(run_dir / "eval-test", ignore_errors=True)
    from .evaluate import evaluate

    # written first: the evaluations below load the model with this run's contract and threshold (they read
    # train_meta.json beside it), not an earlier run's or the defaults
    write_json(run_dir / "train_meta.json", meta)

    # the validation patients judged as a reader should judge them: uniform-sample pooled metrics with
    # patient-bootstrap intervals, whole-patient fraction errors, the darkness baseline (eval-val/)
    val_eval = evaluate(
        run_dir / "model.keras",
        config.data_dir,
        run_dir / "eval-val",
        split=str(config.split),
        set_name="val",
        seed=config.seed,
        patches=sets["val"],
    )
    meta["val_evaluation"] = {key: value for key, value in val_eval["pooled"].items()}
    if "whole_patients" in meta["val_evaluation"]:
        meta["val_evaluation"]["whole_patients"] = {
            k: v for k, v in val_eval["pooled"]["whole_patients"].items() if k != "patients"
        }
    write_json(run_dir / "train_meta.json", meta)
    if sets["test"]:
        evaluate(
            run_dir / "model.keras",
            config.data_dir,
            run_dir / "eval-test",
            split=str(config.split),
            set_name="test",
            seed=config.seed,
            patches=sets["test"],
        )
    return meta
