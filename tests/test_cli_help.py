"""Every command of both CLIs answers --help (catches broken imports and option definitions)."""

import pytest
from typer.testing import CliRunner

from centre_node.cli import app as centre_app
from coordinator.cli import app as coordinator_app

CENTRE = [[], ["make-demo-slides"], ["tile"], ["distill"], ["keygen"], ["export"], ["inspect"], ["verify"],
          ["open"], ["coreset"], ["evaluate"], ["audit"], ["trust"], ["trust", "add"], ["study"],
          ["study", "coreset"], ["study", "mil"], ["mil"], ["mil", "train"], ["mil", "study"]]
COORD = [[], ["demo"], ["transfer"], ["certs"]]


@pytest.mark.parametrize("args", CENTRE, ids=lambda a: " ".join(a) or "root")
def test_centre_node_help(args):
    r = CliRunner().invoke(centre_app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


@pytest.mark.parametrize("args", COORD, ids=lambda a: " ".join(a) or "root")
def test_coordinator_help(args):
    r = CliRunner().invoke(coordinator_app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


def test_study_mil_is_the_mil_study_command():
    a = CliRunner().invoke(centre_app, ["study", "mil", "--help"]).output
    b = CliRunner().invoke(centre_app, ["mil", "study", "--help"]).output
    assert "--patches" in a and "--ipcs" in a and "--ipcs" in b
