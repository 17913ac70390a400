"""The executor resolver: None, short names, dotted paths, classes, entry points, bad values."""

from __future__ import annotations

import sys
import textwrap

import pytest

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.executor import (
    DiffusionExecutor,
    MultiProcDiffusionExecutor,
    UniProcDiffusionExecutor,
    executor_names,
    resolve_executor_class,
)
from spmd_diffusion.executor.external_executor import HTTPDiffusionExecutor


class LocalExecutor(DiffusionExecutor):
    def _init_executor(self) -> None:
        pass


def test_default_and_builtin_names():
    assert resolve_executor_class(None) is MultiProcDiffusionExecutor
    assert resolve_executor_class("mp") is MultiProcDiffusionExecutor
    assert resolve_executor_class("uni") is UniProcDiffusionExecutor
    assert resolve_executor_class("http") is HTTPDiffusionExecutor


def test_class_and_dotted_path():
    assert resolve_executor_class(LocalExecutor) is LocalExecutor
    assert resolve_executor_class(f"{__name__}.LocalExecutor") is LocalExecutor
    assert resolve_executor_class(f"{__name__}:LocalExecutor") is LocalExecutor
    config = OmniDiffusionConfig(executor_class=f"{__name__}.LocalExecutor")
    assert DiffusionExecutor.get_class(config) is LocalExecutor


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path that registers an executor under the entry-point group."""
    package = tmp_path / "my_cluster_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
        from spmd_diffusion.executor import DiffusionExecutor

        class ClusterExecutor(DiffusionExecutor):
            def _init_executor(self):
                self.started = True
        """
        )
    )
    dist = tmp_path / "my_cluster_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cluster-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[spmd_diffusion.executors]\nmy-cluster = my_cluster_plugin:ClusterExecutor\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_cluster_plugin", None)


def test_entry_point(installed_plugin):
    cls = resolve_executor_class("my-cluster")
    assert cls.__name__ == "ClusterExecutor"
    assert "my-cluster" in executor_names()
    assert cls(OmniDiffusionConfig()).started


@pytest.mark.parametrize(
    "value, message",
    [
        ("nonsense", r"unknown executor_class 'nonsense'; valid names: mp, uni"),
        ("no_such_module.Executor", "cannot be imported"),
        ("collections.OrderedDict", "not a DiffusionExecutor subclass"),
        (dict, "not a DiffusionExecutor subclass"),
        (42, "must be None, a name"),
    ],
)
def test_bad_values_give_a_clear_error(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_executor_class(value)
