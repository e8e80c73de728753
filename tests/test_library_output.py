"""Library output goes to files, ours to the terminal (magnet_dist/train/library_output.py)."""

from __future__ import annotations

import io
import logging
import os
import subprocess

import pytest

from magnet_dist.train.library_output import captured_output, quiet_ray_console


def test_python_and_native_output_go_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "dgl.log"
    with captured_output(log):
        print("from python")
        os.write(1, b"from fd 1\n")
        os.write(2, b"from fd 2\n")
        subprocess.run(["echo", "from a child process"], check=True)  # inherits the fds
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    text = log.read_text()
    for line in ("from python", "from fd 1", "from fd 2", "from a child process"):
        assert line in text
    print("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


def test_a_failure_shows_the_logs_tail(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with captured_output(tmp_path / "x.log"):
            print("the cause, in the library's words")
            raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert "last lines of" in err and "the cause, in the library's words" in err


def test_ray_info_records_stay_off_the_console():
    """As in a Ray Train worker: the root logger at INFO with a console handler; Ray Train's
    "Reporting training result" comes from a logger named by its file path."""
    import ray

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        quiet_ray_console()
        quiet_ray_console()  # idempotent
        assert len(handler.filters) == 1
        path_named = os.path.join(os.path.dirname(ray.__file__), "train", "x", "context.py")
        logging.getLogger(path_named).info("Reporting training result 1")
        logging.getLogger(path_named).warning("a Ray warning stays")
        logging.getLogger("magnet_dist.worker").info("ours stays")
        dropped = logging.LogRecord("ray.train.v2.storage", logging.INFO, "", 0, "x", (), None)
        assert not handler.filters[0].filter(dropped)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert lines == ["a Ray warning stays", "ours stays"], lines
