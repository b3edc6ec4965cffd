"""The console scripts' launcher: the command's imports run with the collector paused, then it is back on."""
import gc
import sys

import pytest

from megatron_dsv3.cli import launch


@pytest.fixture
def fake_command(monkeypatch):
    """A module `dsv3_fake_cli` whose import records whether the collector was running."""
    seen = {}

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name != "dsv3_fake_cli":
                return None
            import importlib.util

            return importlib.util.spec_from_loader(name, self)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen["collector_on_during_import"] = gc.isenabled()

            def main():
                seen["collector_on_during_run"] = gc.isenabled()
                return 7

            module.main = main

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    yield seen
    sys.modules.pop("dsv3_fake_cli", None)
    gc.unfreeze()


def test_command_imports_with_the_collector_paused_and_runs_with_it_on(fake_command):
    assert gc.isenabled()
    assert launch._start("dsv3_fake_cli:main") == 7
    assert fake_command == {"collector_on_during_import": False, "collector_on_during_run": True}
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_collector_left_off_when_it_was_off(fake_command):
    gc.disable()
    try:
        launch._start("dsv3_fake_cli:main")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_every_console_script_names_a_launcher_of_an_existing_command():
    """setup.py's entry points go through the launcher, and each launcher names a module:function that exists."""
    import ast
    import importlib
    import inspect

    from tests.distributed import REPO

    tree = ast.parse((REPO / "setup.py").read_text())
    scripts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.startswith("dsv3-")]
    assert len(scripts) == 4
    for script in scripts:
        name, target = (part.strip() for part in script.split("="))
        module, _, func = target.partition(":")
        assert module == "megatron_dsv3.cli.launch", script
        source = inspect.getsource(getattr(launch, func))
        command = source.split('_start("')[1].split('")')[0]
        cmd_module, _, cmd_func = command.partition(":")
        assert callable(getattr(importlib.import_module(cmd_module), cmd_func)), script
