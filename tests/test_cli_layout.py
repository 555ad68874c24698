"""Every console script is a thin command in dinov2/cli/ (or data_curation's own), answers --help, and the
package installs no top-level name of its own besides ``dinov2`` and ``data_curation``."""

import importlib
import importlib.util
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_lives_in_cli_and_has_help(name, capsys):
    module_name, _, function = SCRIPTS[name].partition(":")
    assert module_name.startswith("dinov2.cli.") or module_name == "data_curation.cli", module_name
    main = getattr(importlib.import_module(module_name), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and name in capsys.readouterr().out


def test_no_top_level_launchers_package():
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["dinov2*", "data_curation*"]
    assert importlib.util.find_spec("launchers") is None  # the old top-level name collided in users' environments
