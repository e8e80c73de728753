"""The number of experts E comes from the dataset's modalities (behaviour + content), not from
an assumed three: moe.top_k and moe.ep_size are checked against it where the dataset is known,
and training works end to end with one and with three content modalities."""

import json

import pytest

from magnet_dist.config import load_config
from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.synthetic import generate_synthetic
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import ConfigError
from magnet_dist.train.pipeline import ensure_content_edges
from magnet_dist.train.reference import build_model, train_reference

ONE = {"visual": 16}  # behaviour + 1 content: 2 dominant + 1 balanced + 1 complementary = 4
THREE = {"visual": 16, "text": 24, "audio": 8}  # behaviour + 3 content: 4 + 6 + 6 = 16


def make_dataset(out, modalities):
    with DatasetWriter(out, source="synthetic", seed=5) as writer:
        info = generate_synthetic(
            writer, users=200, items=80, interactions=3000, seed=5, modalities=modalities
        )
        writer.commit(info["num_users"], info["num_items"], info["details"])
    ensure_content_edges(load_config(overrides=[f"data.path={out}"]), quiet=True)
    return out


@pytest.fixture(scope="module")
def one_content(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("one") / "ds", ONE)


@pytest.fixture(scope="module")
def three_content(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("three") / "ds", THREE)


def cfg_for(data, run_dir, *extra):
    return load_config(
        overrides=[
            f"data.path={data}",
            f"train.run_dir={run_dir}",
            "train.epochs=2",
            "train.batch_size=512",
            "model.dim=8",
            *extra,
        ]
    )


@pytest.mark.parametrize(("fixture", "experts"), [("one_content", 4), ("three_content", 16)])
def test_training_uses_the_dataset_expert_count(request, tmp_path, fixture, experts):
    data = request.getfixturevalue(fixture)
    # top_k 3 of 4, or 10 of 16 (the old check against an assumed E=9 refused the latter)
    top_k = 3 if experts == 4 else 10
    metrics = train_reference(cfg_for(data, tmp_path, f"moe.top_k={top_k}"), progress=False)
    table = json.loads((tmp_path / "experts.json").read_text())
    assert len(table["experts"]) == experts
    assert len(metrics["routing"]["final"]["load_share"]) == experts
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"load_{experts - 1}" in header and f"load_{experts}" not in header
    assert metrics["test.recall@20"] > 0


def test_top_k_above_e_of_one_content_modality_names_e(one_content, tmp_path):
    with pytest.raises(ConfigError, match=r"moe\.top_k=5 .*E=4 for 2 modalities"):
        cfg_for(one_content, tmp_path, "moe.top_k=5")


def test_ep_size_is_checked_against_the_dataset_e(one_content, three_content, tmp_path):
    """E=4 and E=16 are divisible by 2 (the old fixed E=9 refused ep_size 2 for both)."""
    for data in (one_content, three_content):
        cfg_for(data, tmp_path, "moe.ep_size=2", "train.workers=2")
    with pytest.raises(ConfigError, match=r"moe\.ep_size=8 .*E=4 .*values that work: \[1, 2, 4\]"):
        cfg_for(one_content, tmp_path, "moe.ep_size=8", "train.workers=8")
    cfg_for(three_content, tmp_path, "moe.ep_size=8", "train.workers=8")  # 8 divides E=16


def test_model_build_checks_e_when_the_config_came_before_the_data(one_content, tmp_path):
    """A config loaded while data.path was not prepared yet is checked at the model build."""
    cfg = cfg_for(tmp_path / "not-yet", tmp_path, "moe.top_k=6")  # E unknown: accepted
    with pytest.raises(ConfigError, match=r"moe\.top_k=6 .*E=4"):
        build_model(cfg, load_dataset(one_content))
