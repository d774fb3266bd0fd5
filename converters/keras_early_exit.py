"""Keras early exit: cut a functional Keras model after named layers and attach exit heads.

Cuts are layer names, e.g. the output layer of a block of a ``keras.applications`` network
(``block_5_add`` in MobileNetV2, ``conv3_block4_out`` in ResNet50, ``block3b_add`` in
EfficientNetB0); :func:`~stagewise.converters.keras_source.valid_cut_points` lists the layers
after which a single tensor crosses. Stage k (k < last) maps its input (the image for stage 0,
the previous carry otherwise) to ``[carry, logits]``; the last stage maps the last carry to the
network's own logits.

Exit heads are Keras layers attached to the cut, trained with the backbone frozen, of two kinds:

* ``gap_linear``: ``GlobalAveragePooling2D -> Dense``, trained on labels plus distillation from
  the network's own final softmax (as the torch heads in :mod:`stagewise.converters.heads`);
* ``savchenko``: ``GlobalAveragePooling2D -> UnitNormalization (L2) -> Dense``: Savchenko's
  linear classifier on global-average-pooled, L2-normalised features, trained on the labels only.

Since the backbone is frozen and the head starts with pooling, heads are trained on the pooled
features directly, standardised for the optimiser with the scaling folded back into the dense
layer, so the exported head is exactly the layers above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import progress_bar

from .build import StagePlan
from .keras_source import count_macs, count_params, keras, logits_model, require_tensorflow_backend, split_model, tf

HEAD_KINDS = ("gap_linear", "savchenko")


@dataclass(frozen=True)
class KerasHeadTraining:
    """Settings of exit-head training (same meaning as :class:`~stagewise.converters.heads.HeadTraining`)."""

    kind: str = "gap_linear"
    distill: float = 0.5
    temperature: float = 2.0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Any, kind: str | None = None) -> "KerasHeadTraining":
        """From a torch ``HeadTraining`` (or anything with the same fields) plus a head ``kind``."""
        fields = {f: getattr(settings, f) for f in ("distill", "temperature", "epochs", "batch_size", "lr",
                                                      "weight_decay", "seed") if hasattr(settings, f)}
        kind = kind or getattr(settings, "kind", "gap_linear")
        if kind == "savchenko":
            fields["distill"] = 0.0  # Savchenko's heads are linear classifiers fitted to the labels
        return cls(kind=kind, **fields)


def pooled(carry: np.ndarray, kind: str = "gap_linear") -> np.ndarray:
    """The head's input features: global average pooling (NHWC), L2-normalised for ``savchenko``."""
    x = carry.mean(axis=(1, 2)) if carry.ndim == 4 else carry.reshape(len(carry), -1)
    if kind == "savchenko":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32)


def train_linear(features: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray,
                 settings: KerasHeadTraining = KerasHeadTraining()) -> tuple[np.ndarray, np.ndarray, dict]:
    """A linear classifier on ``features`` (N x C); returns ``(kernel C x K, bias K, record)``.

    Loss: ``(1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || head_T)``, AdamW with
    a cosine-decayed learning rate, on standardised features (scaling folded into the result).
    """
    rng = np.random.default_rng(settings.seed)
    mean = features.mean(0)
    std = np.maximum(features.std(0), 1e-6)
    x = ((features - mean) / std).astype(np.float32)
    classes = teacher_logits.shape[1]
    tf.random.set_seed(settings.seed)
    limit = float(np.sqrt(6.0 / (x.shape[1] + classes)))
    kernel = tf.Variable(rng.uniform(-limit, limit, (x.shape[1], classes)).astype(np.float32))
    bias = tf.Variable(np.zeros(classes, np.float32))
    steps = settings.epochs * -(-len(x) // settings.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(settings.lr, decay_steps=max(1, steps), alpha=0.01,
                                                      warmup_target=None)
    opt = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)
    t = settings.temperature
    soft = tf.nn.softmax(teacher_logits.astype(np.float32) / t).numpy()
    onehot = np.eye(classes, dtype=np.float32)[labels]

    @tf.function
    def step(xb, yb, sb):
        with tf.GradientTape() as tape:
            out = tf.matmul(xb, kernel) + bias
            loss = (1 - settings.distill) * tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(yb, out))
            if settings.distill:
                log_p = tf.nn.log_softmax(out / t)
                kl = tf.reduce_sum(sb * (tf.math.log(tf.maximum(sb, 1e-12)) - log_p), axis=1)
                loss += settings.distill * t * t * tf.reduce_mean(kl)
        grads = tape.gradient(loss, [kernel, bias])
        opt.apply_gradients(zip(grads, [kernel, bias]))
        return loss

    for _ in range(settings.epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            step(x[idx], onehot[idx], soft[idx])
    w = kernel.numpy() / std[:, None]
    b = bias.numpy() - (mean / std) @ kernel.numpy()
    train_acc = float(((features @ w + b).argmax(1) == labels).mean())
    record = {"kind": settings.kind, "trained_on": "frozen backbone",
              "loss": "cross_entropy+distillation" if settings.distill else "cross_entropy",
              "distill_weight": settings.distill, "distill_temperature": settings.temperature,
              "epochs": settings.epochs, "images": int(len(x)), "train_accuracy": train_acc,
              "framework": "keras"}
    if settings.kind == "savchenko":
        record["features"] = "global average pooling, L2-normalised"
    return w.astype(np.float32), b.astype(np.float32), record


def attach_head(carry: Any, kernel: np.ndarray, bias: np.ndarray, kind: str, name: str) -> Any:
    """Apply the exit head's Keras layers to the symbolic ``carry`` tensor; returns the logits tensor."""
    x = carry
    if len(carry.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    elif len(carry.shape) != 2:
        x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    if kind == "savchenko":
        x = keras.layers.UnitNormalization(axis=-1, name=f"{name}_l2norm")(x)
    dense = keras.layers.Dense(kernel.shape[1], name=f"{name}_logits")
    out = dense(x)
    dense.set_weights([kernel, bias])
    return out


def _features(segments: Sequence[keras.Model], preprocess: Preprocess, size: tuple[int, int], images: ImageSet,
              kind: str, batch: int = 128) -> tuple[list[np.ndarray], np.ndarray]:
    """Head features at every cut and the final logits, for every image."""
    feats: list[list[np.ndarray]] = [[] for _ in segments[:-1]]
    logits = []
    for i in progress_bar(range(0, len(images), batch), "backbone features for exit heads"):
        chunk = [images.image(j) for j in range(i, min(i + batch, len(images)))]
        x = preprocess.tensor(chunk, size)
        for k, seg in enumerate(segments):
            x = keras.ops.convert_to_numpy(seg(x, training=False))
            if k < len(segments) - 1:
                feats[k].append(pooled(x, kind))
        logits.append(x)
    return [np.concatenate(f) for f in feats], np.concatenate(logits)


def keras_early_exit_plans(model: keras.Model, cuts: Sequence[str], preprocess: Preprocess, size: tuple[int, int],
                           head_images: ImageSet, training: Any = KerasHeadTraining(), score: str = "max_softmax",
                           head: str | None = None) -> list[StagePlan]:
    """Stages of ``model`` cut after the layers ``cuts``, each non-final one with a trained exit head.

    ``head`` (``"gap_linear"`` or ``"savchenko"``) overrides ``training.kind``.
    """
    require_tensorflow_backend()
    settings = KerasHeadTraining.from_settings(training, head)
    if settings.kind not in HEAD_KINDS:
        raise ConversionError(f"unknown exit head {settings.kind!r}; choose {', '.join(HEAD_KINDS)}")
    if not cuts:
        raise ConversionError("an early-exit conversion needs at least one cut point (a layer name)")
    model = logits_model(model)
    _check_size(model, size)
    segments = split_model(model, cuts)
    feats, teacher = _features(segments, preprocess, size, head_images, settings.kind)
    labels = np.asarray(head_images.labels)
    names = [f"exit{k}" for k in range(len(cuts))] + ["final"]
    plans = []
    for k, segment in enumerate(segments):
        last = k == len(segments) - 1
        if last:
            module, head_record = segment, None
        else:
            kernel, bias, head_record = train_linear(feats[k], labels, teacher, settings)
            head_record["after"] = cuts[k]
            logits = attach_head(segment.outputs[0], kernel, bias, settings.kind, names[k])
            module = keras.Model(segment.inputs[0], [segment.outputs[0], logits], name=names[k])
        source = {"source": "image", "size": list(size)} if k == 0 else {"source": "carry", "from": names[k - 1]}
        plans.append(StagePlan(name=names[k], module=module, source=source, has_carry=not last,
                               exit={"score": score, "temperature": 1.0, "combine": "own"},
                               macs=count_macs(module), params=count_params(module), head=head_record,
                               framework="keras"))
    return plans


def _check_size(model: keras.Model, size: tuple[int, int]) -> None:
    fixed = tuple(model.inputs[0].shape[1:3])
    if any(d is not None for d in fixed) and fixed != tuple(size):
        raise ConversionError(f"the Keras model takes {fixed[0]}x{fixed[1]} images but the stage is {size[0]}x{size[1]}; "
                              "build the model for the stage's input size (or with input_shape=(None, None, 3))")


def keras_cascade_plans(models: Sequence[tuple[str, keras.Model, tuple[int, int]]], combine: str = "own",
                        score: str = "max_softmax") -> list[StagePlan]:
    """One stage per ``(name, keras model, (height, width))``, cheapest first (a resolution cascade).

    With ``combine="mean_probs"`` every stage after the first decides on the mean of its own and
    the earlier stages' probabilities.
    """
    require_tensorflow_backend()
    plans = []
    for k, (name, model, size) in enumerate(models):
        model = logits_model(model)
        _check_size(model, size)
        if len(model.inputs) != 1:
            raise ConversionError(f"stage {name}: the model has {len(model.inputs)} inputs; a cascade stage reads one image")
        plans.append(StagePlan(name=name, module=model, source={"source": "image", "size": list(size)},
                               has_carry=False,
                               exit={"score": score, "temperature": 1.0, "combine": combine if k else "own"},
                               macs=count_macs(model, size), params=count_params(model), framework="keras"))
    return plans

