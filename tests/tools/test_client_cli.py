"""``python -m client`` as people read it: state names, the labels file that answered, precision, a real daemon."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.__main__ import main as client_main
from tests.support.kit import encode, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)
SMALL = {"input": {"color": "L", "size": 8, "resize": 8}, "model_args": {"width": 8}}


def test_models_and_classify_print_names_languages_and_precision(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "digits", labels=["零", "一", "二"], manifest={**SMALL, "precision": "fp16"})
    (tmp_path / "digits" / "labels.en.txt").write_text("zero\none\ntwo\n", encoding="utf-8")
    image = tmp_path / "digit.png"
    image.write_bytes(encode(np.full((8, 8), 200, np.uint8), "PNG"))
    with running_daemon(tmp_path, watch=False) as daemon:
        target = ["--target", daemon.target]
        assert client_main([*target, "models"]) == 0
        models = capsys.readouterr().out
        assert "  version 1: READY (serving)" in models  # the state by name, never its number
        assert "  precision fp32 (precision fp16 needs a CUDA device; running fp32 on cpu)" in models
        assert "labels in en (--lang)" in models
        assert client_main([*target, "classify", str(image), "--top-k", "2"]) == 0
        assert capsys.readouterr().out.startswith(f"{image}: digits v1 (batch 1, labels.txt)\n")
        assert client_main([*target, "classify", str(image), "--lang", "en"]) == 0
        assert capsys.readouterr().out.startswith(f"{image}: digits v1 (batch 1, labels.en.txt)\n")
        assert client_main([*target, "classify", str(image), "--lang", "fr"]) == 0
        assert capsys.readouterr().out.startswith(f"{image}: digits v1 (batch 1, labels.txt: no labels.fr.txt)\n")
