"""Which route to OpenVINO IR is more faithful: ``convert_model`` on the torch module or on its ONNX export?

For each model, on real images, measures against PyTorch (fp32): the largest and mean absolute
logit difference, the largest difference relative to the largest logit, and top-1 agreement, for

* the IR converted from the torch module and the IR converted from the ONNX export (fp32 weights,
  executed in f32 on CPU);
* the torch-route IR with fp16 weights (``--fp16``), executed in f32;
* the torch-route IR executed with OpenVINO's default CPU precision on this machine (bf16 on CPUs
  with AVX512-BF16 or AMX), which is why the adapter asks for f32.

Models: EfficientNet-Lite0 at 224 and Lite2 at 260 (ImageNet sample, first ``--images`` of a seeded
shuffle), and the CIFAR-10 ResNet (examples/cifar10, CIFAR-10 images of the calibration split)
when its weights exist.

    python -m benchmarks.openvino_conversion     # writes benchmarks/results/openvino_conversion.json
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "openvino_conversion"


def compare(reference: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(reference - got)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float(diff.max() / np.abs(reference).max()),
            "top1_agreement": float((reference.argmax(1) == got.argmax(1)).mean())}


def routes(name: str, model, x: np.ndarray, threads: int) -> dict:
    import openvino as ov
    import torch

    from stagewise.converters.torch_source import export_onnx

    core = ov.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}

    def run(m, cfg):
        compiled = core.compile_model(m, "CPU", cfg)
        return np.concatenate([compiled({0: x[i:i + 16]})[0] for i in range(0, len(x), 16)])

    with torch.no_grad():
        reference = np.concatenate([model(torch.from_numpy(x[i:i + 16])).numpy() for i in range(0, len(x), 16)])
    shape = ov.PartialShape([-1, *x.shape[1:]])
    out = {"n": int(len(x)), "input": list(x.shape[1:])}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        from_torch = ov.convert_model(model, example_input=torch.from_numpy(x[:1]), input=[shape])
        t1 = time.perf_counter()
        onnx_path = Path(tmp) / f"{name}.onnx"
        export_onnx(model, x[:1], onnx_path, "image", ["logits"])
        t2 = time.perf_counter()
        from_onnx = ov.convert_model(str(onnx_path), input=[shape])
        t3 = time.perf_counter()
        fp16 = Path(tmp) / "fp16.xml"
        ov.save_model(from_torch, str(fp16), compress_to_fp16=True)
        out["torch_route"] = {**compare(reference, run(from_torch, f32)), "convert_s": t1 - t0,
                              "ops": len(from_torch.get_ops())}
        out["onnx_route"] = {**compare(reference, run(from_onnx, f32)), "convert_s": t3 - t1,
                             "onnx_export_s": t2 - t1, "ops": len(from_onnx.get_ops())}
        out["torch_route_fp16_weights"] = compare(reference, run(core.read_model(str(fp16)), f32))
        default = core.compile_model(from_torch, "CPU", {"INFERENCE_NUM_THREADS": threads})
        out["cpu_default_precision"] = str(default.get_property("INFERENCE_PRECISION_HINT"))
        out["torch_route_cpu_default_precision"] = compare(
            reference, run(from_torch, {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}))
    return out


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", cifar_weights=None)
    ap.add_argument("--images", type=int, default=200, help="real images per model (default 200)")
    args = ap.parse_args()
    imagenet = harness.imagenet_parts(args.data).images

    from stagewise.converters.factory import build_model
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS
    from stagewise.images import Preprocess

    harness.set_threads(torch=args.threads)
    result = {**harness.metadata(NAME), "threads": args.threads, "models": {}}
    order = np.random.default_rng(0).permutation(len(imagenet))[:args.images]
    frames = [imagenet.image(int(i)) for i in order]
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    for variant, size in ((0, 224), (2, 260)):
        name = f"efficientnet_lite{variant}@{size}"
        model = build_model(f"stagewise.converters.zoo:efficientnet_lite{variant}", image_size=size)
        result["models"][name] = routes(name, model, pre.tensor(frames, (size, size)), args.threads)
        print(name, result["models"][name])
    example = harness.example_module("cifar10")
    weights = args.cifar_weights or example.WEIGHTS
    if weights.is_file():
        cifar = harness.subset(harness.cifar10_parts(args.data).calibration, args.images, seed=1)
        x = Preprocess(mean=example.MEAN, std=example.STD, resize="stretch", crop_fraction=1.0).tensor(
            [cifar.image(i) for i in range(len(cifar))], (32, 32))
        result["models"]["resnet_cifar@32"] = routes("resnet_cifar", example.resnet_cifar(weights=weights), x,
                                                     args.threads)
        result["models"]["resnet_cifar@32"]["weights"] = str(weights)
        print("resnet_cifar", result["models"]["resnet_cifar@32"])
    else:
        result["models"]["resnet_cifar@32"] = f"skipped: {weights} not found"
    harness.save(result, args.out)


if __name__ == "__main__":
    main()
