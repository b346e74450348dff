"""The test architectures, added to classifyd's builtins by an explicit call (importing registers nothing).

tests/conftest.py calls :func:`register_test_architectures` when pytest starts, and ``python -m tests.support.serve``
before it serves: a manifest's ``architecture = "classifyd:test_gated"`` then builds :class:`GatedModel`, both in
the test process (``write_model`` builds the module to write its weights) and in a daemon process.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from server.models.loader.architectures import BUILTIN
from tests.support.faults import BrokenInit, CyclicModel, FussyModel, RaisingModel, SlowModel
from tests.support.kit import GatedModel, PacedModel
from tests.support.probe_model import Probe
from tests.support.rollout_models import Shade

TEST_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "test_gated": GatedModel,
    "test_paced": PacedModel,
    "test_slow": SlowModel,
    "test_fussy": FussyModel,
    "test_raising": RaisingModel,
    "test_broken_init": BrokenInit,
    "test_cyclic": CyclicModel,
    "test_probe": Probe,
    "test_shade": Shade,
}
"""``classifyd:<name>`` architectures only the tests use."""


def register_test_architectures() -> None:
    """Add :data:`TEST_ARCHITECTURES` to ``server.models.loader.architectures.BUILTIN``. Idempotent; never
    replaces an architecture classifyd ships."""
    for name, build in TEST_ARCHITECTURES.items():
        BUILTIN.setdefault(name, build)
