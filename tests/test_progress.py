"""Progress on stderr: a bar on a terminal, a few plain lines elsewhere (cee-bench, cee-train)."""

import io
import os
import pty

from cee_gen.progress import Progress


def test_progress_off_a_terminal_is_a_few_plain_lines():
    out = io.StringIO()  # not a terminal
    with Progress(45, "cee-bench", "runs", lines=5, stream=out) as p:
        for i in range(45):
            p.update(1, f"row {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[0] == "cee-bench: 9/45 runs (row 8)" and lines[-1] == "cee-bench: 45/45 runs (row 44)"


def test_progress_on_a_terminal_is_one_bar_and_nothing_when_disabled():
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as term:
        with Progress(10, "cee-train", "steps", stream=term) as p:
            assert p.bar is not None
            for _ in range(10):
                p.update(1)
        quiet = io.StringIO()
        with Progress(10, "x", enabled=False, stream=quiet) as p:
            p.update(10)
        assert quiet.getvalue() == ""
    os.close(leader)
