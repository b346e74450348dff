"""Test helper: the model repository most daemon tests serve, and the digits model's labels."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.kit import REPO, write_model

DIGIT_LABELS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]
"""The labels of ``models/digits`` (its labels.txt), by digit."""


def build_test_repository(root: Path) -> Path:
    """The default digits model plus small test models, each exercising one behaviour.

    Needs the test architectures registered (tests/conftest.py does it when pytest starts)."""
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    write_model(root, "wide", manifest={"input": {"color": "RGB", "size": 64, "resize": 64},
                                        "model_args": {"width": 48}, "batching": {"max_batch_size": 16}})
    write_model(root, "gated", architecture="classifyd:test_gated",
                manifest={"input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 4}})
    write_model(root, "narrow", architecture="classifyd:test_gated",
                manifest={"input": {"color": "L", "size": 8, "resize": 8},
                          "batching": {"max_batch_size": 1, "max_queue": 2}})
    write_model(root, "patient", manifest={"input": {"color": "L", "size": 8, "resize": 8},
                                           "batching": {"max_batch_size": 64, "max_delay_ms": 600000}})
    broken = write_model(root, "broken", manifest={"input": {"color": "L", "size": 8, "resize": 8}})
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return root
