"""Bad input to ``magnet-dist train``: each case is a named MagnetError (exit status 2 from the
CLI, a message naming the input, no traceback) and leaves no run folder behind; plus the
reference trainer's checkpoint atomicity and determinism.

Config keys and types, ``moe.top_k`` > E and ``moe.ep_size`` not dividing E are in
test_cli.py; malformed / hostile config files and overrides in test_bad_config.py; a distributed checkpoint from another config or truncated is in test_faults.py
(it needs a finished distributed run). None of these tests starts Ray: the distributed
driver checks its inputs first."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import TINY, train_cli

from magnet_dist.cli import main as cli_main
from magnet_dist.config import load_config
from magnet_dist.errors import ConfigError, DataError, MagnetError
from magnet_dist.train import checkpoint as ckpt
from magnet_dist.train.reference import train_reference


@pytest.fixture
def data_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny dataset (without its partitions) to damage."""
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out, ignore=shutil.ignore_patterns("partitions-*"))
    return out


def test_config_file_with_unknown_key_and_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: many\n  batchsize: 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "train.epochs" in str(info.value) and "train.batchsize" in str(info.value)
    rc = cli_main(["train", "--config", str(cfg), f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "train.batchsize: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["reference", "distributed"])
def test_truncated_interactions_parquet(data_copy, tmp_path, capsys, mode):
    path = data_copy / "interactions.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, err = train_cli(capsys, data_copy, tmp_path / "run", f"trainer.mode={mode}")
    assert rc == 2, err
    assert "interactions.parquet" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["reference", "distributed"])
def test_corrupted_feature_parquet_fails_its_checksum(data_copy, tmp_path, capsys, mode):
    path = next((data_copy / "item_features").glob("*.parquet"))
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    path.write_bytes(bytes(raw))  # footer intact: readable, but not the prepared data
    rc, err = train_cli(capsys, data_copy, tmp_path / "run", f"trainer.mode={mode}")
    assert rc == 2, err
    assert path.name in err and "checksum mismatch" in err
    assert not (tmp_path / "run").exists()


def test_workers_that_do_not_fit_the_partitions(tiny_dataset, tmp_path, capsys):
    rc, err = train_cli(
        capsys,
        tiny_dataset,
        tmp_path / "run",
        "trainer.mode=distributed",
        "train.workers=2",
        "graph.partitions=3",
    )
    assert rc == 2 and "train.workers=2 does not fit graph.partitions=3" in err
    assert not (tmp_path / "run").exists()


def test_partition_folder_of_another_dataset(tiny_dataset, tmp_path, capsys):
    from magnet_dist.data.prepare import prepare_dataset
    from magnet_dist.graph.partition import partition_dataset
    from magnet_dist.train.pipeline import ensure_content_edges

    other = tmp_path / "other"
    prepare_dataset("synthetic", other, users=200, items=80, interactions=3000, seed=8, quiet=True)
    ensure_content_edges(load_config(overrides=[f"data.path={other}"]), quiet=True)
    parts = tmp_path / "parts"
    partition_dataset(other, 2, method="random", out_dir=parts, verbose=False)
    before = sorted(p.name for p in parts.rglob("*"))
    rc, err = train_cli(
        capsys,
        tiny_dataset,
        tmp_path / "run",
        "trainer.mode=distributed",
        "graph.partition_method=random",
        f"graph.partition_dir={parts}",
    )
    assert rc == 2, err
    assert f"partition folder {parts} was built for other inputs (checksum" in err
    assert sorted(p.name for p in parts.rglob("*")) == before  # left as it was
    assert not (tmp_path / "run").exists()


def test_truncated_reference_checkpoint(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(capsys, tiny_dataset, run)[0] == 0
    path = run / "checkpoints" / "reference.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    rc, err = train_cli(capsys, tiny_dataset, run, "train.epochs=2")
    assert rc == 2 and f"checkpoint {path} cannot be read" in err


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = load_config()
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(path, cfg, {"step": 1, "w": torch.ones(3)})

    def dies_half_way(obj, f):  # the process "dies" after writing part of the file
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, cfg, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert (tmp_path / "ck.pt.tmp").exists()  # the torn write is the temporary file
    assert ckpt.load_checkpoint(path, cfg)["step"] == 1  # the previous checkpoint is intact


def test_resume_ignores_a_torn_temporary_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(overrides=[f"data.path={tiny_dataset}", f"train.run_dir={run}", *TINY])
    train_reference(cfg, progress=False)
    first = len(_steps(run))
    good = run / "checkpoints" / "reference.pt"
    good.with_name("reference.pt.tmp").write_bytes(good.read_bytes()[:200])  # a crash mid-write
    cfg2 = load_config(
        overrides=[f"data.path={tiny_dataset}", f"train.run_dir={run}", *TINY, "train.epochs=2"]
    )
    train_reference(cfg2, progress=False)
    assert _steps(run) == list(range(1, 2 * first + 1))
    assert not good.with_name("reference.pt.tmp").exists()  # replaced by the next save


def test_reference_same_seed_same_every_step(tiny_dataset, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = load_config(
            overrides=[f"data.path={tiny_dataset}", f"train.run_dir={tmp_path / name}", *TINY]
        )
        runs.append(train_reference(cfg, progress=False))
    rows = [_rows(tmp_path / name) for name in ("a", "b")]
    assert [(r["loss"], r["h_use"]) for r in rows[0]] == [(r["loss"], r["h_use"]) for r in rows[1]]
    for key in ("test.recall@20", "test.ndcg@20", "valid.recall@20"):
        assert runs[0][key] == runs[1][key]


def test_errors_are_magnet_errors():
    assert issubclass(DataError, MagnetError) and issubclass(ConfigError, MagnetError)


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(run)]


# ----------------------------------------------------------------------------------------------
# the issue-14 corpus (part A): dataset and partition folders, importers, full disks, outputs,
# a dataset replaced under a run, auto-prepare. Each case: exit 2 through the CLI with one line
# naming the file / key / column, no traceback, nothing partial left, and a good control.


MAGNET = str(Path(sys.executable).with_name("magnet-dist"))
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def no_tmp_left(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name]
    assert not left, f"temporary files left behind: {left}"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("num_users", "300", "key 'num_users' must be a non-negative integer, got '300'"),
        ("splits", [1, 2, 3], "key 'splits' must be an object"),
        ("modalities", {"text": "64"}, "key 'modalities.text' must be a positive integer"),
        ("checksum", 12, "key 'checksum' must be a string"),
    ],
)
def test_manifest_with_wrong_types(data_copy, tmp_path, capsys, key, value, expected):
    import json

    path = data_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if key == "modalities":
        value = {name: str(dim) for name, dim in manifest["modalities"].items()}
        expected = f"key 'modalities.{next(iter(value))}' must be a positive integer"
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    rc, err = train_cli(capsys, data_copy, tmp_path / "run")
    assert rc == 2 and expected in one_line_error(err) and str(path) in err, err
    assert not (tmp_path / "run").exists()


def test_good_manifest_control(data_copy):
    from magnet_dist.data.dataset import load_dataset

    assert load_dataset(data_copy, verify_checksum=True).num_users == 300


@pytest.fixture(scope="module")
def parts(tiny_dataset, tmp_path_factory) -> Path:
    """A finished 2-part random partition of the tiny dataset (copied before damaging)."""
    from magnet_dist.graph.partition import partition_dataset

    out = tmp_path_factory.mktemp("parts") / "p2"
    partition_dataset(tiny_dataset, 2, method="random", out_dir=out, verbose=False)
    return out


def _partition_cli(capsys, data: Path, out: Path, parts: int = 2) -> tuple[int, str]:
    return cli(
        capsys,
        "partition",
        "--data",
        str(data),
        "--parts",
        str(parts),
        "--method",
        "random",
        "--out",
        str(out),
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("missing_part", "part1/edge_feat.dgl is missing"),
        ("truncated_graph", "part0/graph.dgl has"),
        ("truncated_part_config", "magnet.json has"),
        ("changed_features", "part0/node_feat.dgl changed since it was written"),
        ("truncated_meta", "magnet_partition.json is damaged"),
    ],
)
def test_damaged_partition_folder_is_not_reused(
    tiny_dataset, parts, tmp_path, capsys, damage, expected
):
    copy = tmp_path / "parts"
    shutil.copytree(parts, copy)
    if damage == "missing_part":
        shutil.rmtree(copy / "part1")
    elif damage == "truncated_graph":
        _truncate(copy / "part0" / "graph.dgl")
    elif damage == "truncated_part_config":
        _truncate(copy / "magnet.json")
    elif damage == "changed_features":
        path = copy / "part0" / "node_feat.dgl"
        raw = bytearray(path.read_bytes())
        raw[-20:-12] = bytes(b ^ 0xFF for b in raw[-20:-12])  # same size, other bytes
        path.write_bytes(bytes(raw))
    else:
        _truncate(copy / "magnet_partition.json")
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    rc, err = _partition_cli(capsys, tiny_dataset, copy)
    line = one_line_error(err)
    assert rc == 2 and expected in line and str(copy) in line, err
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before  # left alone


def test_intact_partition_folder_is_reused(tiny_dataset, parts, tmp_path, capsys):
    copy = tmp_path / "parts"
    shutil.copytree(parts, copy)
    rc = cli_main(
        [
            "partition",
            "--data",
            str(tiny_dataset),
            "--parts",
            "2",
            "--method",
            "random",
            "--out",
            str(copy),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and f"reusing partitions in {copy}" in out


def test_more_parts_than_nodes_creates_nothing(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "parts"
    rc, err = _partition_cli(capsys, tiny_dataset, out, parts=500)
    assert rc == 2 and "500 partitions for 300 users and 120 items" in one_line_error(err)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong_type"])
def test_corrupted_content_edges(data_copy, tmp_path, capsys, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from magnet_dist.graph.content import content_edges_up_to_date
    from magnet_dist.train.pipeline import ensure_content_edges

    path = data_copy / "content_edges.parquet"
    if damage == "truncated":
        _truncate(path)
        expected = "content_edges.parquet is unreadable"
    else:
        table = pq.read_table(path)
        pq.write_table(table.set_column(0, "src", table["src"].cast(pa.float64())), path)
        expected = "content_edges.parquet: column 'src' must hold integer ids"
    rc, err = _partition_cli(capsys, data_copy, tmp_path / "parts")
    assert rc == 2 and expected in one_line_error(err), err
    assert not (tmp_path / "parts").exists()
    # the trainer's pipeline sees the edges changed since written and rebuilds them (control)
    cfg = load_config(overrides=[f"data.path={data_copy}"])
    assert not content_edges_up_to_date(data_copy, cfg.graph)
    ensure_content_edges(cfg, quiet=True)
    assert content_edges_up_to_date(data_copy, cfg.graph)
    capsys.readouterr()
    assert _partition_cli(capsys, data_copy, tmp_path / "parts")[0] == 0


# -- importers -----------------------------------------------------------------------------------


def _mmrec(root: Path, users: list[int], image=None) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    lines = ["userID\titemID\tx_label"]
    for u in users:
        lines += [f"{u}\t{i}\t{s}" for i, s in ((0, 0), (1, 0), (2, 1), (3, 2))]
    (root / "data.inter").write_text("\n".join(lines) + "\n")
    image = np.random.default_rng(0).standard_normal((4, 3)) if image is None else image
    np.save(root / "image_feat.npy", image)
    return root


def _prepare_cli(capsys, source: str, src: Path | None, out: Path) -> tuple[int, str]:
    args = ["prepare", "--source", source, "--out", str(out), "--quiet"]
    if src is not None:
        args += ["--path", str(src)]
    return cli(capsys, *args)


def test_mmrec_huge_user_ids_fail_before_allocating(tmp_path, capsys, assert_no_output):
    src = _mmrec(tmp_path / "src", [0, 1, (1 << 40) - 5])
    out = tmp_path / "out"
    # 8 GB of address space: sizing arrays by the largest id (2**40) would fail with a raw
    # MemoryError instead of naming the column
    res = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -v 8000000; exec "$@"',
            "limited",
            MAGNET,
            "prepare",
            "--source",
            "mmrec",
            "--path",
            str(src),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    line = one_line_error(res.stderr)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "data.inter: column 'userID': user 2 has no interaction at all" in line
    assert "the largest is 1099511627771, 3 distinct ones appear" in line
    assert_no_output(out)
    assert _prepare_cli(capsys, "mmrec", _mmrec(tmp_path / "good", [0, 1, 2]), out)[0] == 0


def test_mmrec_inter_that_is_a_folder(tmp_path, capsys, assert_no_output):
    src = _mmrec(tmp_path / "src", [0, 1])
    (src / "data.inter").unlink()
    (src / "data.inter").mkdir()
    out = tmp_path / "out"
    rc, err = _prepare_cli(capsys, "mmrec", src, out)
    assert rc == 2 and "data.inter: is a folder, not a file" in one_line_error(err)
    assert_no_output(out)


def test_float64_features_beyond_float32(tmp_path, capsys, assert_no_output):
    import numpy as np

    image = np.random.default_rng(0).standard_normal((4, 3))
    image[2, 1] = 1e300  # finite as float64, inf as float32
    src = _mmrec(tmp_path / "src", [0, 1], image=image)
    out = tmp_path / "out"
    rc, err = _prepare_cli(capsys, "mmrec", src, out)
    line = one_line_error(err)
    assert rc == 2 and "image_feat.npy: column 'feature': value 1e+300 does not fit float32" in line
    assert "row 2" in line
    assert_no_output(out)


def test_parquet_uint64_ids_above_int64(tmp_path, capsys, assert_no_output):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "item_features").mkdir(parents=True)
    users = np.array([1, 2, 2**64 - 1, 1, 2, 2**64 - 1] * 2, dtype=np.uint64)
    items = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4], dtype=np.uint64)
    pq.write_table(pa.table({"user_id": users, "item_id": items}), src / "interactions.parquet")
    vectors = pa.array([[0.1, 0.2]] * 4, pa.list_(pa.float32()))
    pq.write_table(
        pa.table({"item_id": pa.array([1, 2, 3, 4], pa.uint64()), "feature": vectors}),
        src / "item_features" / "text.parquet",
    )
    out = tmp_path / "out"
    rc, err = _prepare_cli(capsys, "parquet", src, out)
    line = one_line_error(err)
    assert rc == 2 and "column 'user_id': id 18446744073709551615 is above 2**63-1" in line
    assert_no_output(out)


def test_prepare_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, err = _prepare_cli(capsys, "synthetic", None, blocker / "data")
    assert rc == 2 and f"{blocker} is a file, not a folder" in one_line_error(err)
    assert blocker.read_text() == "not a folder"


# -- full disks (ulimit -f: writes fail with EFBIG, like ENOSPC) ----------------------------------


def _limited(command: list[str], kib: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` with files capped at ``kib`` KiB; SIGXFSZ ignored so writes fail with
    an OSError instead of killing the process."""
    script = f"trap '' XFSZ; ulimit -f {kib}; exec \"$@\""
    return subprocess.run(
        ["bash", "-c", script, "limited", *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def test_prepare_on_a_full_disk(tmp_path):
    out = tmp_path / "data"
    res = _limited(
        [
            MAGNET,
            "prepare",
            "--source",
            "synthetic",
            "--users",
            "2000",
            "--items",
            "400",
            "--interactions",
            "60000",
            "--out",
            str(out),
            "--quiet",
        ],
        kib=64,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    line = one_line_error(res.stderr)
    assert f"cannot write {out}: file size limit reached" in line
    assert "Traceback" not in res.stderr
    # nothing but the dataset's build lock file (kept, like every flock file: deleting it would
    # let a waiting process lock a file nobody else sees)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".data-build.lock"]


def test_enospc_anywhere_is_one_line_saying_disk_full(tmp_path, capsys, monkeypatch):
    """ulimit gives EFBIG; a real full disk gives ENOSPC: the CLI names the path either way,
    also for a write no writer wraps (here: raised by the prepare command itself)."""
    import errno

    from magnet_dist.data import prepare

    target = tmp_path / "data" / "interactions.parquet"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(prepare, "prepare_dataset", disk_full)
    rc, err = _prepare_cli(capsys, "synthetic", None, tmp_path / "data")
    assert rc == 2
    assert one_line_error(err) == (
        f"error: cannot write {target}: disk full (No space left on device); free space and re-run"
    )


def test_partition_on_a_full_disk(tiny_dataset, tmp_path):
    out = tmp_path / "parts"
    res = _limited(
        [
            MAGNET,
            "partition",
            "--data",
            str(tiny_dataset),
            "--parts",
            "2",
            "--method",
            "random",
            "--out",
            str(out),
        ],
        kib=16,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    line = one_line_error(res.stderr)
    assert f"cannot write {out}: " in line
    assert "file size limit reached" in line or "is the disk full?" in line
    assert "Traceback" not in res.stderr and not out.exists()


def test_json_and_parquet_writers_leave_no_tmp_on_a_full_disk(tmp_path):
    code = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from magnet_dist.errors import OutputError\n"
        "from magnet_dist.train.run_folder import write_json_atomic\n"
        "from magnet_dist.eval.recommend import write_parquet_atomic\n"
        "from pathlib import Path\n"
        "for name, write in (('m.json', lambda p: write_json_atomic(p, {'x': 'y' * 300000})),\n"
        "    ('r.parquet', lambda p: write_parquet_atomic(pa.table({'a': np.random.rand(99999)}), p))):\n"
        "    try:\n"
        "        write(Path(name))\n"
        "    except OutputError as err:\n"
        "        print(err)\n"
    )
    (tmp_path / "m.json").write_text('{"old": 1}')
    res = _limited([sys.executable, "-c", code], kib=64, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "cannot write m.json: file size limit reached" in res.stdout
    assert "cannot write r.parquet: file size limit reached" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    assert (tmp_path / "m.json").read_text() == '{"old": 1}'  # the previous file is intact


# -- outputs of a finished run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """(dataset copy, run folder) of a tiny reference run on its own dataset copy."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns("partitions-*"))
    run = root / "run"
    cfg = load_config(overrides=[f"data.path={data}", f"train.run_dir={run}", *TINY])
    train_reference(cfg, progress=False)
    return data, run


@pytest.mark.parametrize("fits", ["nothing", "best.pt"])
def test_training_on_a_full_disk(finished_run, tmp_path, fits):
    data, done = finished_run
    sizes = {p.name: p.stat().st_size for p in (done / "checkpoints").glob("*.pt")}
    if fits == "nothing":  # the first checkpoint write fails
        limit = sizes["best.pt"] // 2
    else:  # best.pt is written, the training-state checkpoint is not
        limit = (sizes["best.pt"] + sizes["reference.pt"]) // 2
    run = tmp_path / "run"
    res = _limited(
        [MAGNET, "train", "--quiet", f"data.path={data}", f"train.run_dir={run}", *TINY],
        kib=limit // 1024,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    line = one_line_error(res.stderr)
    assert f"cannot write {run / 'checkpoints'}" in line and "Traceback" not in res.stderr
    assert "file size limit reached" in line or "is the disk full?" in line
    no_tmp_left(run)


@pytest.mark.parametrize("command", ["evaluate", "recommend"])
def test_damaged_run_config(finished_run, tmp_path, capsys, command):
    _, done = finished_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "config.yaml").write_text("train:\n  epochs: 3\n  epochs: [\n")
    extra = ["--out", str(tmp_path / "r.parquet")] if command == "recommend" else []
    rc, err = cli(capsys, command, "--run", str(run), "--quiet", *extra)
    line = one_line_error(err)
    assert rc == 2 and f"config file {run / 'config.yaml'}: line 4, column 1" in line, err
    assert not (tmp_path / "r.parquet").exists()


def test_recommend_out_is_a_folder(finished_run, tmp_path, capsys):
    _, run = finished_run
    folder = tmp_path / "recs"
    folder.mkdir()
    rc, err = cli(capsys, "recommend", "--run", str(run), "--out", str(folder), "--quiet")
    assert rc == 2 and f"--out {folder} is a folder" in one_line_error(err)
    assert list(folder.iterdir()) == []
    rc, _ = cli(capsys, "recommend", "--run", str(run), "--out", str(folder / "r.parquet"))
    assert rc == 0 and (folder / "r.parquet").is_file()  # control


def test_recommend_on_a_full_disk(finished_run, tmp_path):
    _, run = finished_run
    out = tmp_path / "recs.parquet"
    res = _limited(
        [MAGNET, "recommend", "--run", str(run), "--k", "50", "--out", str(out), "--quiet"],
        kib=8,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert f"cannot write {out}: file size limit reached" in one_line_error(res.stderr)
    assert list(tmp_path.iterdir()) == []  # neither recs.parquet nor .recs.parquet.tmp


def test_evaluate_json_on_a_full_disk(finished_run, tmp_path):
    _, run = finished_run
    out = tmp_path / "m.json"
    res = _limited(
        [MAGNET, "evaluate", "--run", str(run), "--json", str(out), "--quiet"],
        kib=0,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert f"cannot write {out}: file size limit reached" in one_line_error(res.stderr)
    assert list(tmp_path.iterdir()) == []


def test_dataset_replaced_under_a_finished_run(finished_run, tmp_path, capsys):
    from magnet_dist.data.prepare import prepare_dataset

    data, run = finished_run
    other = tmp_path / "other"  # same generator and sizes, another seed: another split
    prepare_dataset("synthetic", other, users=300, items=120, interactions=6000, seed=8, quiet=True)
    shutil.copy(data / "content_edges.parquet", other)
    for command in ("evaluate", "recommend"):
        extra = ["--out", str(tmp_path / "r.parquet")] if command == "recommend" else []
        rc, err = cli(capsys, command, "--run", str(run), "--data", str(other), "--quiet", *extra)
        line = one_line_error(err)
        assert (
            rc == 2 and f"dataset {other}" in line and "is another dataset than the one run" in line
        ), err
        assert "--any-dataset" in line
    assert not (tmp_path / "r.parquet").exists()
    rc, _ = cli(capsys, "evaluate", "--run", str(run), "--quiet")  # control: its own dataset
    assert rc == 0
    rc, _ = cli(
        capsys, "evaluate", "--run", str(run), "--data", str(other), "--any-dataset", "--quiet"
    )
    assert rc == 0  # the explicit override


# -- auto-prepare ------------------------------------------------------------------------------


def test_typo_in_data_path_prepares_nothing(tmp_path, capsys):
    typo = tmp_path / "ml-100l"
    rc, err = cli(
        capsys,
        "train",
        "--config",
        str(QUICKSTART),
        f"data.path={typo}",
        f"train.run_dir={tmp_path / 'run'}",
        "--quiet",
    )
    line = one_line_error(err)
    assert rc == 2 and f"data.path {typo} does not exist" in line, err
    assert "magnet-dist prepare --source movielens-100k" in line
    assert list(tmp_path.iterdir()) == []


def test_the_config_files_path_given_again_may_be_prepared(tmp_path, monkeypatch):
    from magnet_dist.train.pipeline import check_auto_prepare

    monkeypatch.chdir(tmp_path)  # a fresh clone: data/ml-100k not there yet
    declared = load_config(QUICKSTART).data.path
    again = Path.cwd() / declared  # e.g. `data.path=$PWD/data/ml-100k`, as in test_multinode
    cfg = load_config(QUICKSTART, [f"data.path={again}"])
    check_auto_prepare(cfg, again)  # no error: the same place as the file's data.source


def test_data_path_that_is_not_a_dataset_is_left_alone(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    rc, err = cli(
        capsys,
        "train",
        "data.source=synthetic",
        f"data.path={folder}",
        f"train.run_dir={tmp_path / 'run'}",
    )
    assert rc == 2 and "exists but is not a prepared dataset" in one_line_error(err)
    assert [p.name for p in folder.iterdir()] == ["todo.txt"]
    assert not (tmp_path / "run").exists()


def test_missing_parquet_dataset_is_not_auto_prepared(tmp_path, capsys):
    rc, err = cli(
        capsys,
        "train",
        "data.source=parquet",
        f"data.path={tmp_path / 'd'}",
        f"train.run_dir={tmp_path / 'run'}",
    )
    assert rc == 2 and "prepare it first" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_generated_source_declared_with_its_path_is_prepared(tmp_path):
    from magnet_dist.train.pipeline import ensure_dataset

    path = tmp_path / "syn"
    cfg = load_config(
        overrides=[
            "data.source=synthetic",
            f"data.path={path}",
            "data.synthetic_users=50",
            "data.synthetic_items=30",
            "data.synthetic_interactions=600",
        ]
    )
    assert ensure_dataset(cfg, quiet=True) == path and (path / "manifest.json").is_file()
