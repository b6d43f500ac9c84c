"""The command line's own errors: one line, exit 2, and a suggestion for a near miss."""
from __future__ import annotations

import pytest

from crystalae.cli import main


@pytest.mark.parametrize("argv, suggestion", [
    (["generate", "--model", "perov_5", "--samples", "4"], "(did you mean --sample?)"),
    (["generat", "--sample", "3"], "(did you mean generate?)"),
    (["data", "prepare", "demo", "--out", "x", "--shardsize", "3"], "(did you mean --shard-size?)"),
    (["roundtrip", "demo", "--out", "x.csv", "--species", "label"], "(did you mean labels?)"),
])
def test_a_near_miss_gets_a_did_you_mean(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    error = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(error.splitlines()) == 1 and suggestion in error, error


def test_a_far_miss_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--zzzz", "1"])
    assert "did you mean" not in capsys.readouterr().err
