"""Train the embedded default model: scikit-learn's 8x8 digits on ``SmallCNN``.

Run from the repository root::

    .venv/bin/python -m tools.train_digits [--out models/digits] [--epochs N]

The first 1,437 samples are used for training and the last 360 are held out.
Each sample is converted exactly as the server sees it: the pixel value
``v`` in 0..16 becomes the uint8 pixel ``round(v * 255 / 16)``, and the
server's preprocessing turns it into ``(x / 255 - 0.5) / 0.5`` with no resize.
Writes ``<out>/1/model.safetensors``, ``<out>/labels.txt`` and
``<out>/model.toml``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional

from server.models.loader.architectures import SmallCNN

N_TRAIN = 1437
SEED = 0
WIDTH = 32
BATCH_SIZE = 64
EPOCHS = 30
LEARNING_RATE = 3e-3
MIN_ACCURACY = 0.95  # the requirement; refuse to write a worse model
LABELS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]
MANIFEST = """\
# The default model: handwritten digits (scikit-learn's 8x8 digits), labels in Chinese.
# Rebuilt by `make default-model` (tools/train_digits.py).
architecture = "classifyd:small_cnn"
default = true
top_k = 3

[model_args]
width = 32

[input]
color = "L"
size = 8
resize = 8
crop = "center"
mean = [0.5]
std = [0.5]
interpolation = "bilinear"

[batching]
max_batch_size = 64
max_delay_ms = 0
"""


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images ``[N, 8, 8]`` (as served) and their labels."""
    digits = load_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 8, 8]`` -> float ``[N, 1, 8, 8]`` normalised like the server (mean 0.5, std 0.5)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ((x - 0.5) / 0.5).unsqueeze(1)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction, filling with background (-1)."""
    padded = functional.pad(x, (1, 1, 1, 1), value=-1.0)
    n, _, h, w = x.shape
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> float:
    """One pass over shuffled, shifted training data, stepping the LR schedule per batch; returns the mean loss."""
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for start in range(0, len(x), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        loss = functional.cross_entropy(model(random_shift(x[idx], generator)), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
    return total / len(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in whatever mode it is in) on ``x``."""
    return (model(x).argmax(1) == y).float().mean().item()


def train(epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Train ``SmallCNN`` on the first 1,437 digits; returns it with the held-out tensors."""
    images, labels = digits_uint8()
    x, y = to_tensor(images), torch.from_numpy(labels)
    x_train, y_train, x_test, y_test = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    model = SmallCNN(num_classes=10, in_channels=1, width=WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = epochs * -(-N_TRAIN // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        loss = train_epoch(model, optimizer, scheduler, x_train, y_train, generator)
        print(f"epoch {epoch + 1:3d}/{epochs}  loss {loss:.4f}")
    return model, x_test, y_test


def write_model(model: nn.Module, out: Path) -> Path:
    """Write the weights, labels and manifest under ``out``; returns the weights path."""
    weights = out / "1" / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors creates it private; it is a committed, shared artefact
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS), encoding="utf-8")
    (out / "model.toml").write_text(MANIFEST, encoding="utf-8")
    return weights


def reload(weights: Path) -> nn.Module:
    """A fresh ``SmallCNN`` in eval mode with the saved weights loaded strictly."""
    model = SmallCNN(num_classes=10, in_channels=1, width=WIDTH)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """Train, check held-out accuracy in eval mode, save the model and check it again reloaded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/digits"), help="model directory")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    started = time.perf_counter()
    model, x_test, y_test = train(args.epochs)
    print(f"trained in {time.perf_counter() - started:.1f}s")
    model.eval()  # held-out data never goes through train mode: it would update BatchNorm statistics
    acc = accuracy(model, x_test, y_test)
    print(f"held-out top-1 accuracy (eval mode): {acc:.4f} on {len(y_test)} images")
    if acc < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {acc:.4f} is below {MIN_ACCURACY}; not saving")
    weights = write_model(model, args.out)
    print(f"wrote {weights} ({weights.stat().st_size} bytes)")
    print(f"reloaded from {weights}, eval mode: {accuracy(reload(weights), x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
