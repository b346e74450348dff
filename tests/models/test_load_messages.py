"""Load failures a user can act on: each names the kind of file it found and what to do, in torch's place.

Real files saved the ways users save them: a whole pickled module, a torch.export program or a TorchScript
archive under an architecture that reads a state dict; and model events that say which version serves.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
import torchvision
from classifier.v1 import classifier_pb2 as pb

from client import ClassifierClient
from client.__main__ import event_line
from server.core.manifest import load_manifest
from server.models.loader.weights import WeightsError, build_model, plain
from tests.support.kit import DaemonThread, running_daemon, to_toml, write_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]
SMALL_RGB = {"input": {"size": 16, "crop": "none"}}


def version_dir(root: Path, architecture: str, labels: int = 3) -> Path:
    """``root/m/1`` under a manifest naming ``architecture``; the caller saves the weights into it."""
    path = root / "m" / "1"
    path.mkdir(parents=True)
    (root / "m" / "model.toml").write_text(to_toml({"architecture": architecture, **SMALL_RGB}), encoding="utf-8")
    (root / "m" / "labels.txt").write_text("".join(f"c{i}\n" for i in range(labels)), encoding="utf-8")
    return path


def failure(path: Path) -> str:
    with pytest.raises(WeightsError) as caught:
        build_model(path, load_manifest(path))
    return str(caught.value)


def resnet() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=3).eval()


def test_a_pickled_module_says_to_save_the_state_dict_without_colour_codes(tmp_path: Path) -> None:
    path = version_dir(tmp_path, "torchvision:resnet18")
    torch.save(resnet(), path / "model.pt")  # the whole module, not model.state_dict()
    message = failure(path)
    assert "holds a pickled torchvision.models.resnet.ResNet object" in message
    assert 'torch.save(model.state_dict(), "model.pt")' in message and "safetensors" in message
    assert "\x1b" not in message and "weights_only" not in message  # torch's advice to unpickle is not passed on


def test_an_export_program_under_a_state_dict_architecture_is_named_first(tmp_path: Path) -> None:
    path = version_dir(tmp_path, "torchvision:resnet18")
    torch.export.save(torch.export.export(resnet(), (torch.zeros(1, 3, 16, 16),)), path / "model.pt2")
    message = failure(path)
    assert message == (f'{path / "model.pt2"}: the file is a torch.export program: set architecture = '
                       '"torch_export" (the manifest gives "torchvision:resnet18")')


def test_a_torchscript_archive_under_torch_export_is_named_first(tmp_path: Path) -> None:
    path = version_dir(tmp_path, "torch_export")
    torch.jit.save(torch.jit.trace(resnet(), torch.zeros(1, 3, 16, 16)), path / "model.pt")
    message = failure(path)
    assert 'the file is a TorchScript archive: set architecture = "torchscript"' in message
    assert "corrupt" not in message


def test_torch_messages_passed_on_lose_their_colour_codes() -> None:
    coloured = "Weights only load failed. \x1b[1mdo those steps\x1b[0m."
    assert plain(coloured) == "Weights only load failed. do those steps."


def unloaded(daemon: DaemonThread, count: int) -> list[dict[str, object]]:
    """The daemon's UNLOADED events once there are ``count`` of them, oldest first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = [e for e in daemon.daemon.events.recent()[::-1] if e["kind"] == "UNLOADED"]
        if len(events) >= count:
            return events
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} UNLOADED events: {daemon.daemon.events.recent()}")


def test_events_say_which_version_serves_after_a_rollback_and_never_call_a_retired_generation_serving(
        tmp_path: Path) -> None:
    small = {"input": {"color": "L", "size": 8, "resize": 8}, "model_args": {"width": 8}}
    write_model(tmp_path, "m", manifest=small)
    write_model(tmp_path, "m", version=2, manifest=small, seed=1)
    with running_daemon(tmp_path, watch=False, reload_min_interval_s=0) as daemon, \
            ClassifierClient(daemon.target) as client:
        assert client.get_model("m").serving_version == 2
        ready = [e for e in daemon.daemon.events.recent() if e["kind"] == "READY"]
        assert ready[0]["reason"] == "version 2 now serves" and ready[0]["serving"]
        shutil.rmtree(tmp_path / "m" / "2")  # the rollback of docs/hot-swap.md: version 1 takes over
        client.reload_model("m")
        rollback = unloaded(daemon, 1)[-1]
        assert (rollback["version"], rollback["serving"]) == (2, False)
        assert rollback["reason"] == "removed from disk; version 1 now serves"
        write_model(tmp_path, "m", manifest=small, seed=2)  # new files for version 1: a second generation
        client.reload_model("m")
        retired = unloaded(daemon, 2)[-1]
        assert (retired["version"], retired["serving"]) == (1, False)  # the retired generation does not serve
        assert retired["reason"] == "generation 1 retired, replaced by generation 2; version 1 serves"
        line = event_line(pb.ModelEvent(model="m", version=1, kind=pb.ModelEvent.UNLOADED, reason=retired["reason"]))
        assert line.endswith("m v1 UNLOADED: generation 1 retired, replaced by generation 2; version 1 serves")


def test_start_up_warns_when_several_models_have_no_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small = {"input": {"color": "L", "size": 8, "resize": 8}, "model_args": {"width": 8}}
    write_model(tmp_path, "digits", manifest=small)
    write_model(tmp_path, "flowers", manifest=small)
    with caplog.at_level(logging.WARNING), running_daemon(tmp_path, watch=False):
        pass
    warnings = [r.getMessage() for r in caplog.records if "no default model" in r.getMessage()]
    assert warnings == [f"no default model: the repository has 2 models (digits, flowers) and none sets default = "
                        f"true, so requests that name no model get NOT_FOUND (HTTP 404); add default = true to one "
                        f"model's model.toml, e.g. {tmp_path / 'digits' / 'model.toml'}"]
    caplog.clear()
    write_model(tmp_path, "flowers", manifest={**small, "default": True})
    with caplog.at_level(logging.WARNING), running_daemon(tmp_path, watch=False):
        pass
    assert not [r for r in caplog.records if "no default model" in r.getMessage()]
