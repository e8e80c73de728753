"""``magnet-dist recommend`` and ``magnet-dist evaluate`` on a tiny trained reference run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from magnet_dist.cli import main
from magnet_dist.config import load_config
from magnet_dist.data.dataset import load_dataset
from magnet_dist.eval.model_io import load_run
from magnet_dist.eval.recommend import SCHEMA
from magnet_dist.eval.run import evaluate_run
from magnet_dist.train.reference import train_reference

K = 10


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(
        overrides=[
            f"data.path={tiny_dataset}",
            f"train.run_dir={run_dir}",
            "train.epochs=2",
            "train.batch_size=512",
            "model.dim=16",
            "routing.min_steps=5",
            "routing.window=3",
            "routing.max_steps=20",
            "routing.ramp_steps=5",
        ]
    )
    train_reference(cfg, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run)


@pytest.fixture(scope="module")
def train_sets(tiny_dataset):
    ds = load_dataset(tiny_dataset)
    tu, ti = ds.pairs(0)
    sets: dict[int, set[int]] = {}
    for u, i in zip(tu.tolist(), ti.tolist(), strict=True):
        sets.setdefault(u, set()).add(i)
    return sets


@pytest.fixture(scope="module")
def all_recs(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("recs") / "all.parquet"
    assert main(["recommend", "--run", str(run), "--k", str(K), "--out", str(out), "--quiet"]) == 0
    return pq.read_table(out)


def per_user(table: pa.Table) -> dict[int, list[tuple[int, int, float]]]:
    out: dict[int, list] = {}
    cols = [table.column(c).to_pylist() for c in ("user_id", "rank", "item_id", "score")]
    for u, r, i, s in zip(*cols, strict=True):
        out.setdefault(u, []).append((r, i, s))
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------------------------
# recommend


def test_recommendations_schema_rows_and_order(all_recs, loaded, train_sets):
    assert all_recs.schema == SCHEMA
    rows = per_user(all_recs)
    assert sorted(rows) == list(range(loaded.num_users))
    for u, recs in rows.items():
        assert [r for r, _, _ in recs] == list(range(1, K + 1))
        items = [i for _, i, _ in recs]
        scores = [s for _, _, s in recs]
        assert len(set(items)) == K and all(0 <= i < loaded.num_items for i in items)
        assert not set(items) & train_sets.get(u, set()), f"user {u} got training items"
        assert scores == sorted(scores, reverse=True)


def test_recommendation_scores_are_the_model_scores(all_recs, loaded):
    users = torch.tensor(all_recs.column("user_id").to_numpy()[:50])
    items = torch.tensor(all_recs.column("item_id").to_numpy()[:50])
    hu = {m: v[users] for m, v in loaded.user_reps.items()}
    hi = {m: v[items] for m, v in loaded.item_reps.items()}
    expected, _ = loaded.model.score(hu, hi)
    got = all_recs.column("score").to_numpy()[:50]
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_include_train_keeps_training_items(run, tmp_path, train_sets):
    out = tmp_path / "r.parquet"
    argv = ["recommend", "--run", str(run), "--k", str(K), "--out", str(out), "--include-train"]
    assert main([*argv, "--quiet"]) == 0
    rows = per_user(pq.read_table(out))
    with_train = sum(
        bool({i for _, i, _ in recs} & train_sets.get(u, set())) for u, recs in rows.items()
    )
    assert with_train > len(rows) // 2  # trained models rank seen items high


@pytest.mark.parametrize("kind", ["comma", "text", "parquet"])
def test_user_list(run, tmp_path, all_recs, kind, capsys):
    wanted = [5, 3, 250]
    if kind == "comma":
        spec = "5,3,5,250"  # repeats are dropped
    elif kind == "text":
        spec = tmp_path / "users.txt"
        spec.write_text("# users\n5\n3, 5\n\n250\n")
    else:
        spec = tmp_path / "users.parquet"
        pq.write_table(pa.table({"user_id": pa.array([5, 3, 250], pa.int64())}), spec)
    out = tmp_path / "r.parquet"
    rc, stdout, _ = cli(capsys, "recommend", "--run", run, "--k", K, "--out", out, "--users", spec)
    assert rc == 0 and "3 users" in stdout
    table = pq.read_table(out)
    assert table.schema == SCHEMA and table.num_rows == len(wanted) * K
    assert list(dict.fromkeys(table.column("user_id").to_pylist())) == wanted
    full = per_user(all_recs)
    for u, recs in per_user(table).items():
        assert [i for _, i, _ in recs] == [i for _, i, _ in full[u]]


def test_unknown_users_are_named(run, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    rc, _, err = cli(capsys, "recommend", "--run", run, "--out", out, "--users", "3,300,abc,-1")
    assert rc == 2
    assert "3 unknown user(s)" in err and "'300'" in err and "'abc'" in err and "'-1'" in err
    assert "0..299" in err and not out.exists()
    rc, _, err = cli(capsys, "recommend", "--run", run, "--out", out, "--users", tmp_path / "x.txt")
    assert rc == 2 and "not found" in err


def test_two_stage_with_every_item_as_candidate_equals_exact(run, tmp_path, all_recs, loaded):
    out = tmp_path / "r.parquet"
    argv = ["recommend", "--run", str(run), "--k", str(K), "--out", str(out), "--quiet"]
    n = str(loaded.num_items)
    assert main([*argv, "--mode", "two-stage", "--candidates", n]) == 0
    two = pq.read_table(out)
    assert two.schema == SCHEMA
    a, b = per_user(all_recs), per_user(two)
    assert a.keys() == b.keys()
    for u in a:
        assert [i for _, i, _ in a[u]] == [i for _, i, _ in b[u]]
        np.testing.assert_allclose([s for *_, s in a[u]], [s for *_, s in b[u]], rtol=1e-5)


def test_original_ids_and_data_override(run, tiny_dataset, tmp_path, all_recs, capsys):
    # A copy of the dataset with id maps (the synthetic source has none): users "u<id>",
    # items 1000 + id. --data points the run at the copy.
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    ds = load_dataset(data)
    (data / "id_map").mkdir()
    users = pa.array([f"u{i}" for i in range(ds.num_users)])
    items = pa.array(np.arange(ds.num_items, dtype=np.int64) + 1000)
    for kind, arr in (("users", users), ("items", items)):
        idx = pa.array(np.arange(len(arr), dtype=np.int64))
        pq.write_table(
            pa.table({"index": idx, "original": arr}), data / "id_map" / f"{kind}.parquet"
        )
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["id_maps"] = {"users": "id_map/users.parquet", "items": "id_map/items.parquet"}
    (data / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "r.parquet"
    base = ["recommend", "--run", run, "--k", K, "--out", out, "--data", data, "--original-ids"]
    rc, _, _ = cli(capsys, *base, "--users", "u7,u2")
    assert rc == 0
    table = pq.read_table(out)
    assert table.schema.field("user_id").type == pa.string()
    assert table.schema.field("item_id").type == pa.int64()
    assert table.schema.field("rank").type == pa.int16()
    full = per_user(all_recs)
    got = per_user(table)
    assert list(got) == ["u7", "u2"]
    for u in (7, 2):
        assert [i for _, i, _ in got[f"u{u}"]] == [i + 1000 for _, i, _ in full[u]]
    rc, _, err = cli(capsys, *base, "--users", "u7,7")
    assert rc == 2 and "'7'" in err and "id map" in err


def test_data_override_with_other_dataset_is_refused(run, tmp_path, capsys):
    from magnet_dist.data.prepare import prepare_dataset

    other = tmp_path / "other"
    prepare_dataset("synthetic", other, users=50, items=40, interactions=600, seed=1, quiet=True)
    rc, _, err = cli(capsys, "evaluate", "--run", run, "--data", other)
    assert rc == 2 and "another dataset" in err


# ----------------------------------------------------------------------------------------------
# evaluate


def test_exact_evaluation_reproduces_metrics_json(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, _ = cli(capsys, "evaluate", "--run", run, "--json", out, "--quiet")
    assert rc == 0 and "exact ranking" in stdout
    got = json.loads(out.read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert got["two_stage"] is False and got["mode"] == "exact"
    assert got["checkpoint_epoch"] == trained["best_epoch"]
    keys = [k for k in trained if k.startswith(("valid.", "test."))]
    assert "test.recall@20" in keys and len(keys) == 8
    for key in keys:
        assert got[key] == pytest.approx(trained[key], abs=1e-9), key


def test_single_split(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, _, _ = cli(capsys, "evaluate", "--run", run, "--split", "valid", "--json", out)
    got = json.loads(out.read_text())
    assert rc == 0 and "valid.recall@20" in got and not any(k.startswith("test.") for k in got)


def test_two_stage_with_every_item_as_candidate_equals_exact_metrics(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--run", run, "--mode", "two-stage", "--candidates", 120]
    rc, stdout, _ = cli(capsys, *argv, "--sample-users", 40, "--json", out)
    assert rc == 0 and "TWO-STAGE" in stdout and "NOT the exact" in stdout
    got = json.loads(out.read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert got["two_stage"] is True and got["mode"] == "two-stage" and got["candidates"] == 120
    assert got["retrieval_recall@120"] == pytest.approx(1.0)
    for split in ("valid", "test"):
        assert got[f"{split}.sample_users"] == 40
        for m in ("recall", "ndcg"):
            for k in (10, 20):
                key = f"{m}@{k}"
                assert got[f"{split}.{key}"] == pytest.approx(trained[f"{split}.{key}"], abs=1e-9)
                assert got[f"{split}.exact_sample.{key}"] == pytest.approx(
                    got[f"{split}.two_stage_sample.{key}"], abs=1e-9
                )


def test_auto_mode_uses_two_stage_above_the_threshold(loaded):
    saved = loaded.cfg.eval.two_stage_above_items
    try:
        loaded.cfg.eval.two_stage_above_items = loaded.num_items
        assert evaluate_run(loaded, ["test"])["two_stage"] is False
        loaded.cfg.eval.two_stage_above_items = loaded.num_items - 1
        got = evaluate_run(loaded, ["test"], candidates=30)
    finally:
        loaded.cfg.eval.two_stage_above_items = saved
    assert got["two_stage"] is True and got["candidates"] == 30
    assert 0 < got["test.recall@20"] <= 1 and 0 < got["retrieval_recall@30"] <= 1
    assert got["retrieval_recall_users"] == len(np.unique(loaded.dataset.pairs(2)[0]))


def test_exact_mode_on_a_sample(loaded):
    got = evaluate_run(loaded, ["test"], "exact", sample=25, seed=3)
    assert got["test.sample_users"] == 25 and "test.recall@20" not in got
    assert 0 <= got["test.exact_sample.recall@20"] <= 1


def test_retrieval_vectors_give_the_dot_score(loaded):
    uv, iv = loaded.retrieval_vectors()
    users, items = torch.arange(0, 40), torch.arange(0, 40) * 3 % loaded.num_items
    hu = {m: v[users] for m, v in loaded.user_reps.items()}
    hi = {m: v[items] for m, v in loaded.item_reps.items()}
    expected = loaded.model.dot_score(hu, hi).numpy()
    got = (uv[users.numpy()] * iv[items.numpy()]).sum(1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# brute force: every (user, item) pair scored one by one with the model


@pytest.fixture(scope="module")
def brute_scores(loaded, train_sets):
    """[users, items] full MAGNET scores (dot + MoE), each row scored on its own, with the
    user's training items at -inf."""
    u = torch.arange(loaded.num_users).repeat_interleave(loaded.num_items)
    i = torch.arange(loaded.num_items).repeat(loaded.num_users)
    hu = {m: v[u] for m, v in loaded.user_reps.items()}
    hi = {m: v[i] for m, v in loaded.item_reps.items()}
    with torch.no_grad():
        y, _ = loaded.model.score(hu, hi)
    scores = y.view(loaded.num_users, loaded.num_items).clone()
    for user, items in train_sets.items():
        scores[user, list(items)] = float("-inf")
    return scores


def test_recommend_top_k_is_the_brute_force_top_k(all_recs, loaded, brute_scores):
    """Each user's K items are the K best by brute force (compared by score, so two items
    within float noise of each other may swap places)."""
    rows = per_user(all_recs)
    best = brute_scores.topk(K, dim=1)
    for u in range(loaded.num_users):
        items = [i for _, i, _ in rows[u]]
        np.testing.assert_allclose(
            brute_scores[u, items].numpy(), best.values[u].numpy(), rtol=1e-5, atol=1e-5
        )


def test_two_stage_with_fewer_candidates_is_exact_ranking_inside_the_candidates(
    loaded, brute_scores
):
    """N=12 of 120 items (fewer than K=20): the two-stage metrics are those of ranking each
    user's dot-product top-12 by the full score (retrieval recall 1.0 on this catalogue), and
    Recall@20 is exactly the share of test items the candidates hold."""
    n = 12
    got = evaluate_run(loaded, ["test"], "two-stage", candidates=n)
    assert got["two_stage"] is True and got["candidates"] == n < loaded.num_items
    assert got[f"retrieval_recall@{n}"] == pytest.approx(1.0)
    uv, iv = loaded.retrieval_vectors()
    dot = torch.from_numpy(uv @ iv.T)
    dot[torch.isinf(brute_scores)] = float("-inf")  # training items are never candidates
    cand = dot.topk(n, dim=1).indices
    su, si = loaded.dataset.pairs(2)
    truth: dict[int, set[int]] = {}
    for u, i in zip(su.tolist(), si.tolist(), strict=True):
        truth.setdefault(u, set()).add(i)
    want = {f"test.{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in (10, 20)}
    coverage = 0.0
    for u, g in truth.items():
        ranked = cand[u][brute_scores[u, cand[u]].argsort(descending=True)].tolist()
        coverage += len(g & set(ranked)) / len(g)
        for k in (10, 20):
            hits = [r for r, i in enumerate(ranked[:k]) if i in g]
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(g), k)))
            want[f"test.recall@{k}"] += len(hits) / len(g)
            want[f"test.ndcg@{k}"] += sum(1 / np.log2(r + 2) for r in hits) / idcg
    want = {key: v / len(truth) for key, v in want.items()}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["test.recall@20"] == pytest.approx(coverage / len(truth), abs=1e-12)
    exact = evaluate_run(loaded, ["test"], "exact")
    assert got["test.recall@20"] < exact["test.recall@20"]  # 12 candidates cannot hold 20 hits


def test_items_rank_among_the_listed_items_only(loaded, brute_scores):
    """--items (every third item): the metrics are those of ranking each user's listed items by
    brute force, over the users with a listed test item and their listed test items only."""
    items = np.arange(0, loaded.num_items, 3)
    got = evaluate_run(loaded, ["test"], "auto", items=items)
    listed = set(items.tolist())
    su, si = loaded.dataset.pairs(2)
    truth: dict[int, set[int]] = {}
    for u, i in zip(su.tolist(), si.tolist(), strict=True):
        if i in listed:
            truth.setdefault(u, set()).add(i)
    assert got["two_stage"] is False and got["on_items"] == len(items)
    assert got["test.on_items.users"] == len(truth) < len(set(su.tolist()))
    outside = torch.ones(loaded.num_items, dtype=torch.bool)
    outside[items] = False
    want = {f"test.on_items.{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in (10, 20)}
    for u, g in truth.items():
        scores = brute_scores[u].clone()
        scores[outside] = float("-inf")
        ranked = scores.argsort(descending=True).tolist()
        for k in (10, 20):
            hits = [r for r, i in enumerate(ranked[:k]) if i in g]
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(g), k)))
            want[f"test.on_items.recall@{k}"] += len(hits) / len(g)
            want[f"test.on_items.ndcg@{k}"] += sum(1 / np.log2(r + 2) for r in hits) / idcg
    for key, value in want.items():
        assert got[key] == pytest.approx(value / len(truth), abs=1e-9), key
    # every item listed: the ordinary metrics under other keys
    every = evaluate_run(loaded, ["test"], "exact", items=np.arange(loaded.num_items))
    exact = evaluate_run(loaded, ["test"], "exact")
    for key in ("recall@20", "ndcg@10"):
        assert every[f"test.on_items.{key}"] == pytest.approx(exact[f"test.{key}"], abs=1e-12)


def test_items_cli_reads_files_and_refuses_what_it_cannot_do(run, tmp_path, capsys):
    listed = tmp_path / "cold.parquet"
    pq.write_table(pa.table({"item_id": np.arange(0, 120, 3, dtype=np.int64)}), listed)
    out = tmp_path / "eval.json"
    rc, stdout, _ = cli(capsys, "evaluate", "--run", run, "--items", listed, "--json", out)
    got = json.loads(out.read_text())
    assert rc == 0 and "ranking among the 40 items of --items only" in stdout
    assert got["test.on_items.users"] > 0 and "test.recall@20" not in got
    text = tmp_path / "cold.txt"
    text.write_text("\n".join(str(i) for i in range(0, 120, 3)) + "\n")
    rc, _, _ = cli(capsys, "evaluate", "--run", run, "--items", text, "--json", out)
    assert rc == 0
    again = json.loads(out.read_text())
    for key in got:
        if ".on_items" in key:
            assert again[key] == got[key], key
    rc, _, err = cli(capsys, "evaluate", "--run", run, "--items", "3,999,x")
    assert rc == 2 and "2 unknown item(s) in --items: '999', 'x'" in err
    rc, _, err = cli(capsys, "evaluate", "--run", run, "--items", "3", "--mode", "two-stage")
    assert rc == 2 and "--items ranks exactly" in err
    rc, _, err = cli(capsys, "evaluate", "--run", run, "--items", "3", "--original-ids")
    assert rc == 2 and "no item id map" in err


def test_recommend_among_listed_items_is_the_brute_force_top_k(
    run, loaded, brute_scores, tmp_path, capsys
):
    """--items (every third item): each user's K items are the K best of the listed ones by
    brute force (training items excluded), and only listed items appear."""
    items = list(range(0, loaded.num_items, 3))
    out = tmp_path / "listed.parquet"
    spec = ",".join(str(i) for i in items)
    rc, stdout, _ = cli(capsys, "recommend", "--run", run, "--k", K, "--out", out, "--items", spec)
    assert rc == 0 and f"among the {len(items)} items of --items" in stdout
    rows = per_user(pq.read_table(out))
    outside = torch.ones(loaded.num_items, dtype=torch.bool)
    outside[items] = False
    restricted = brute_scores.masked_fill(outside, float("-inf"))
    best = restricted.topk(K, dim=1)
    assert len(rows) == loaded.num_users
    for u, recs in rows.items():
        got = [i for _, i, _ in recs]
        assert set(got) <= set(items) and len(got) == K
        np.testing.assert_allclose(
            restricted[u, got].numpy(), best.values[u].numpy(), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose([s for *_, s in recs], best.values[u].numpy(), rtol=1e-5)
    base = ["recommend", "--run", run, "--k", K, "--out", tmp_path / "x.parquet", "--items"]
    rc, _, err = cli(capsys, *base, "3", "--mode", "two-stage")
    assert rc == 2 and "--items scores every listed item" in err
    rc, _, err = cli(capsys, *base, "3,7000")
    assert rc == 2 and "1 unknown item(s) in --items: '7000'" in err


def test_recommend_among_listed_items_with_training_items(run, train_sets, tmp_path, capsys):
    """With --include-train a user's listed training items may come back; without, never; a
    list smaller than K gives fewer rows."""
    user = 0
    seen = sorted(train_sets[user])[:3]
    spec = ",".join(str(i) for i in seen)
    for flag, want in (([], set()), (["--include-train"], set(seen))):
        out = tmp_path / f"t{len(flag)}.parquet"
        argv = ["--run", run, "--k", K, "--out", out, "--users", user, "--items", spec, *flag]
        rc, _, _ = cli(capsys, "recommend", *argv)
        assert rc == 0
        got = {i for _, i, _ in per_user(pq.read_table(out)).get(user, [])}
        assert got == want
