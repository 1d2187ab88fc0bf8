"""The command line run in-process, its JSON output read back."""

from __future__ import annotations

import json

from asmkit.cli import main


def run_json(capsys, argv):
    """``asmkit ARGV`` (with ``--json`` among them): asserts status 0, returns the object."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)
