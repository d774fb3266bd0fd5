"""Resolution adaptation: BatchNorm statistics re-estimated at a stage's input size, and head fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.converters.adapt import Adaptation, adapt
from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess

from toy_images import texture_images

torch = pytest.importorskip("torch", reason='the torch adaptation tests need torch: pip install -c constraints.txt -e ".[dev]"')
nn = torch.nn

PRE = Preprocess(mean=(128.0,) * 3, std=(64.0,) * 3, resize="stretch", crop_fraction=1.0)


class TextureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _tensor(images: ImageSet, size: int) -> torch.Tensor:
    return torch.from_numpy(PRE.tensor([images.image(i) for i in range(len(images))], (size, size)))


def _accuracy(model: nn.Module, images: ImageSet, size: int) -> float:
    with torch.no_grad():
        return float((model(_tensor(images, size)).argmax(1).numpy() == images.targets).mean())


@pytest.fixture(scope="module")
def trained():
    """TextureNet trained at 32 px, with held-out test images and unlabelled adaptation images."""
    torch.manual_seed(0)
    train, test, unlabelled = texture_images(120, 0), texture_images(100, 1), texture_images(96, 2)
    model = TextureNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = _tensor(train, 32), torch.from_numpy(train.targets)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), test, unlabelled


def _copy(model: nn.Module) -> nn.Module:
    clone = TextureNet()
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_bn_reestimation_moves_statistics_and_recovers_accuracy(trained):
    model, test, unlabelled = trained
    model = _copy(model)
    assert _accuracy(model, test, 32) >= 0.95
    plain = _accuracy(model, test, 16)
    mean, var = model.bn.running_mean.clone(), model.bn.running_var.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    record = adapt(model, Adaptation("bn"), PRE, (16, 16), unlabelled)
    assert record["kind"] == "bn" and record["size"] == [16, 16] and record["images"] == 96
    assert record["batchnorm_layers"] == 1
    # the statistics are those of the 16 px inputs: the cumulative average of the per-batch statistics
    with torch.no_grad():
        conv = model.conv(_tensor(unlabelled, 16))
    batch_means = torch.stack([conv[i:i + 32].mean((0, 2, 3)) for i in range(0, 96, 32)])
    assert torch.allclose(model.bn.running_mean, batch_means.mean(0), atol=1e-5)
    assert not torch.allclose(model.bn.running_mean, mean) and (model.bn.running_var < 0.5 * var).all()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.training and model.bn.momentum == 0.1
    adapted = _accuracy(model, test, 16)
    assert plain <= 0.75 and adapted >= 0.9, (plain, adapted)


def test_head_adaptation_fine_tunes_classifier_with_distillation(trained):
    model, test, unlabelled = trained
    student, teacher = _copy(model), _copy(model)
    conv = student.conv.weight.clone()
    record = adapt(student, Adaptation("head", epochs=3, lr=1e-2), PRE, (16, 16), unlabelled, teacher, (32, 32))
    assert record["kind"] == "head" and record["teacher_size"] == [32, 32] and record["epochs"] == 3
    assert torch.equal(student.conv.weight, conv) and all(p.requires_grad for p in student.parameters())
    assert not torch.equal(student.fc.weight, teacher.fc.weight)
    assert _accuracy(student, test, 16) >= 0.9


def test_adaptation_errors_say_what_to_do(trained):
    model, _, unlabelled = trained
    with pytest.raises(ConversionError, match="no BatchNorm"):
        adapt(nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), Adaptation("bn"), PRE,
              (16, 16), unlabelled)
    with pytest.raises(ConversionError, match="full resolution"):
        adapt(_copy(model), Adaptation("head"), PRE, (16, 16), unlabelled)
    with pytest.raises(ConversionError, match="at least 64 images"):
        adapt(_copy(model), Adaptation("bn"), PRE, (16, 16), unlabelled.subset(np.arange(40)))
    with pytest.raises(ConversionError, match="unknown adaptation"):
        Adaptation("fixres")
    assert adapt(model, Adaptation("none"), PRE, (16, 16), unlabelled) == {"kind": "none"}
