"""Bad config files and overrides: each is one clear line naming the file / key (exit status 2
through the CLI, no traceback, no echo of a huge input), and the good control is accepted.

Unknown keys, wrong types, ``moe.top_k`` > E and ``moe.ep_size`` are in test_cli.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from magnet_dist.cli import main as cli_main
from magnet_dist.config import MAX_CONFIG_NODES, load_config
from magnet_dist.errors import ConfigError


def _billion_laughs() -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    return text + "train:\n  run_name: *i\n"


# (file bytes, what the one-line error must say)
BAD_FILES = {
    "malformed": (b"train:\n  epochs: [\n", "line 3, column 1"),
    "not_utf8": (b"train:\n  run_name: \xff\xfe\n", "not UTF-8 text (byte 19"),
    "python_tag": (
        b"train: !!python/object/apply:os.system ['echo hi']\n",
        "tag !!python/object/apply:os.system is not allowed",
    ),
    "duplicate_key": (
        b"train:\n  epochs: 3\n  epochs: 4\n",
        "duplicate key 'epochs' at line 3 (first at line 2)",
    ),
    "billion_laughs": (_billion_laughs().encode(), f"more than {MAX_CONFIG_NODES:,} values"),
    "recursive_alias": (b"a: &a [*a]\n", "recursive alias"),
    "non_finite_lr": (b"train:\n  lr: .inf\n", "train.lr: Input should be a finite number"),
    "nan_weight": (
        b"graph:\n  modality_weights: {text: .nan}\n",
        "graph.modality_weights.text: Input should be a finite number",
    ),
    "ks_zero": (b"eval:\n  ks: [0, 20]\n", "eval.ks.0: Input should be greater than or equal to 1"),
    "ks_repeated": (b"eval:\n  ks: [10, 10, 20]\n", "eval.ks: repeated cut-off"),
    "ks_without_20": (b"eval:\n  ks: [10]\n", "eval.ks: [10] lacks 20"),
    "fanouts_vs_layers": (
        b"train:\n  fanouts: [5, 5, 5]\nmodel:\n  layers: 2\n",
        "train.fanouts=[5, 5, 5] has 3 value(s) but model.layers=2",
    ),
    "fanout_zero": (b"train:\n  fanouts: [0, 5]\n", "train.fanouts: a fanout of 0"),
    "run_name_escapes": (b"train:\n  run_name: ../../x\n", "train.run_name: '../../x' is not"),
    "run_name_nested": (b"train:\n  run_name: a/b\n", "train.run_name: 'a/b' is not"),
    "removed_sampled": (b"train:\n  sampled: true\n", "train.sampled was removed"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file(case, tmp_path, capsys):
    raw, expected = BAD_FILES[case]
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert expected in str(info.value)
    run = tmp_path / "run"
    rc = cli_main(["train", "--config", str(cfg), f"train.run_dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err and str(cfg) in err
    assert "Traceback" not in err and len(err) < 1000, err
    assert len(err.strip().splitlines()) == 1, err  # one problem, one line
    assert not run.exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=[", "override 'train.epochs=[': line 1, column 2"),
        ("train.lr=.nan", "train.lr: Input should be a finite number"),
        ("eval.ks=[0, 20]", "eval.ks.0"),
        ("train.fanouts=[5]", "train.fanouts=[5] has 1 value(s) but model.layers=2"),
        ("train.run_name=..", "train.run_name: '..' is not"),
        ("train.epochs={a: !!python/name:os.system }", "is not allowed"),
    ],
)
def test_bad_override(override, expected, tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli_main(["train", f"train.run_dir={run}", override])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_good_controls_are_accepted(tmp_path):
    cfg = tmp_path / "good.yaml"
    cfg.write_text(
        "train:\n  fanouts: [8, -1]\n  lr: 1.0e-3\n  run_name: my-run_2\n"
        "eval:\n  ks: [5, 20, 50]\n"
        "graph:\n  modality_weights: {text: 0.7, meta: 0.3}\n"
        "model:\n  layers: 2\n",
        encoding="utf-8",
    )
    c = load_config(cfg)
    assert c.train.fanouts == [8, -1] and c.eval.ks == [5, 20, 50]
    assert c.run_dir == Path("runs/my-run_2")
    c = load_config(overrides=["model.layers=3", "train.fanouts=[5,5,5]"])
    assert c.train.fanouts == [5, 5, 5]
    c = load_config(overrides=["model.layers=0", "train.fanouts=[]"])
    assert c.train.fanouts == []


def test_small_aliases_and_old_run_configs_load(tmp_path):
    cfg = tmp_path / "alias.yaml"
    cfg.write_text("model:\n  dim: &d 32\nmoe:\n  experts_per_template: 1\n")
    assert load_config(cfg).model.dim == 32
    merged = tmp_path / "merge.yaml"  # YAML merge keys; an explicit key overrides a merged one
    merged.write_text("train:\n  <<: {epochs: 4, lr: 0.01}\n  epochs: 5\n")
    assert (load_config(merged).train.epochs, load_config(merged).train.lr) == (5, 0.01)
    old = tmp_path / "old_run.yaml"  # a run folder's config.yaml written before the removal
    old.write_text("train:\n  sampled: false\n  epochs: 3\n")
    assert load_config(old).train.epochs == 3


def test_long_bad_value_is_not_echoed_in_full(capsys):
    rc = cli_main(["train", "--print-config", "train.epochs=" + "x" * 100_000])
    err = capsys.readouterr().err
    assert rc == 2 and "train.epochs" in err and len(err) < 1000


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_and_the_commands_in_their_headers_load(path):
    """Every config under configs/ validates, and so does every ``python launch/train.py
    --config ...`` command its comments show a user (with that command's overrides)."""
    load_config(path)
    commands = re.findall(r"^#\s+python launch/train\.py (.+)$", path.read_text(), re.M)
    for command in commands:
        args = shlex.split(command)
        assert args[:2] == ["--config", f"configs/{path.name}"], command
        load_config(path, args[2:])


def test_movielens_config_is_the_measured_setting():
    """configs/movielens.yaml is the setting docs/benchmarks.md measured on MovieLens-100K
    (the 3-seed table): a changed key must come with a new measurement."""
    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml")
    measured = (c.train.lr, c.model.reg_weight, c.model.layers, c.model.score_weights)
    assert measured == (5e-3, 1e-3, 2, "behaviour")
    assert (c.moe.top_k, c.moe.lr_scale, c.moe.weight_decay, c.moe.dropout) == (1, 0.1, 1e-3, 0.2)
    assert (c.train.epochs, c.train.eval_every, c.train.patience) == (200, 2, 10)
