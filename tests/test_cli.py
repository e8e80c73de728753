"""The ``magnet-dist`` console script: help texts and config errors (exit 2, clean messages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from magnet_dist.cli import SUBCOMMANDS, main

SCRIPT = Path(sys.executable).with_name("magnet-dist")


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *argv], capture_output=True, text=True, timeout=300, check=False
    )


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_console_script_help_lists_every_subcommand():
    assert SCRIPT.exists(), f"console script {SCRIPT} not installed"
    res = run_script("--help")
    assert res.returncode == 0, res.stderr
    for name in SUBCOMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_subcommand_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: magnet-dist {command}")
    if command != "bench":  # bench forwards its arguments to the script it runs
        assert "(default:" in out


def test_evaluate_and_recommend_help_show_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: both)" in out and "(default: auto)" in out
    with pytest.raises(SystemExit):
        main(["recommend", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--k K items per user (default: 20)" in out


def test_print_config_shows_merged_overrides(capsys):
    rc, out, _ = run_main(
        capsys, "train", "--print-config", "train.epochs=7", "moe.top_k=3", "model.dim=32"
    )
    assert rc == 0
    assert "epochs: 7" in out and "top_k: 3" in out and "dim: 32" in out
    assert "batch_size: 2048" in out  # untouched defaults are shown too


def test_unknown_key_names_path_and_allowed_keys():
    res = run_script("train", "--print-config", "train.epochs_typo=3")
    assert res.returncode == 2
    assert "train.epochs_typo" in res.stderr
    assert "allowed keys" in res.stderr and "epochs" in res.stderr and "batch_size" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_section_names_allowed_sections(capsys):
    rc, _, err = run_main(capsys, "train", "--print-config", "trian.epochs=3")
    assert rc == 2
    assert "trian" in err and "train" in err and "allowed keys" in err


def test_wrong_type_names_key(capsys):
    rc, _, err = run_main(capsys, "train", "--print-config", "train.epochs=abc")
    assert rc == 2
    assert "train.epochs" in err and "'abc'" in err
    assert "Traceback" not in err


def test_top_k_above_number_of_experts(capsys, tiny_dataset):
    """E comes from the prepared dataset (behaviour + visual + text: 9 experts)."""
    rc, _, err = run_main(
        capsys, "train", "--print-config", f"data.path={tiny_dataset}", "moe.top_k=20"
    )
    assert rc == 2
    assert "moe.top_k=20" in err and "E=9" in err


def test_ep_size_that_does_not_divide_lists_working_values(capsys, tiny_dataset):
    rc, _, err = run_main(
        capsys,
        "train",
        "--print-config",
        f"data.path={tiny_dataset}",
        "moe.ep_size=2",
        "train.workers=2",
    )
    assert rc == 2
    assert "moe.ep_size=2" in err and "E=9" in err
    assert "values that work: [1]" in err


def test_override_without_equals_sign(capsys):
    rc, _, err = run_main(capsys, "train", "--print-config", "train.epochs")
    assert rc == 2 and "train.epochs" in err


def test_evaluate_missing_run_is_a_clean_error(tmp_path):
    res = run_script("evaluate", "--run", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert "nope" in res.stderr and "Traceback" not in res.stderr
