"""Train the Keras CIFAR-10 ResNet (``model.py``) on CPU and save its weights.

Data: the CIFAR-10 training archive (``../shared/data/cifar10-train.tar.gz`` by default),
split with ``stagewise.datasets`` stratified with seed 0 into 80% train / 10% calibration /
10% test: the network is trained on the train part only; the calibration part is left for
picking thresholds and the test part for reporting (``python -m benchmarks.litert_side_by_side``).

Training: AdamW with a cosine learning rate, batch 128, random horizontal flips and random
translations of up to 4 pixels; a few epochs keep it within about 15 minutes on 2 CPU cores.
Writes ``cifar_resnet.weights.h5`` and ``cifar_resnet.json`` (settings, time, accuracies)
next to this file unless ``--out`` says otherwise.

    python examples/cifar10_keras/train.py --epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import MEAN, STD, WEIGHTS, build  # noqa: E402


def decode(image_set) -> np.ndarray:  # noqa: ANN001 - stagewise.datasets.ImageSet
    out = np.empty((len(image_set), 32, 32, 3), dtype=np.uint8)
    for i in range(len(image_set)):
        out[i] = image_set.image(i)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE.parents[1].parent / "shared" / "data" / "cifar10-train.tar.gz")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    if not args.data.exists():
        print(f"SKIPPED: {args.data} not found; this example trains on the CIFAR-10 archive from the shared data "
              "folder (pass --data PATH)", file=sys.stderr)
        sys.exit(0)

    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    from stagewise.datasets import open_image_set

    t0 = time.time()
    train_set, calib_set, test_set = open_image_set(args.data).split([0.8, 0.1, 0.1], seed=0)
    x_train, y_train = decode(train_set), np.asarray(train_set.targets)
    x_test, y_test = decode(test_set), np.asarray(test_set.targets)
    print(f"decoded {len(x_train)} train / {len(x_test)} test images in {time.time() - t0:.0f} s", flush=True)
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)

    def normalise(x):
        return (tf.cast(x, tf.float32) - mean) / std

    augment = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=args.seed),
                                keras.layers.RandomTranslation(4 / 32, 4 / 32, fill_mode="reflect", seed=args.seed)])
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=args.seed)
                .batch(args.batch_size).map(lambda x, y: (augment(normalise(x), training=True), y),
                                            num_parallel_calls=1).prefetch(2))
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(500).map(lambda x, y: (normalise(x), y))

    model = build()
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.01, warmup_target=args.lr,
                                                      warmup_steps=steps // 20)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t1 = time.time()
    history = model.fit(train_ds, epochs=args.epochs, validation_data=test_ds, verbose=2)
    train_seconds = time.time() - t1
    _, test_acc = model.evaluate(test_ds, verbose=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(args.out))
    record = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
              "threads": args.threads, "seed": args.seed, "train_seconds": round(train_seconds, 1),
              "params": int(model.count_params()), "train_images": len(x_train), "test_images": len(x_test),
              "split": "stratified 0.8/0.1/0.1 seed 0 (train/calibration/test)",
              "test_accuracy": float(test_acc),
              "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
              "keras": keras.__version__, "tensorflow": tf.__version__}
    args.out.with_name(args.out.name.replace(".weights.h5", ".json")).write_text(json.dumps(record, indent=2))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): test accuracy {test_acc:.4f} "
          f"on {len(x_test)} held-out images after {train_seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
