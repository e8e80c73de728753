"""The distributed trainer's driver (``trainer.mode=distributed``): partition the graph, find or
start a Ray cluster (embedded and loopback-only by default), and run ``TorchTrainer`` over
``train.workers`` workers (``train/worker.py``). Graph servers are started by the workers
themselves, next to them, and die with them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from magnet_dist.config import Config
from magnet_dist.errors import FAILURE_DIR, MagnetError
from magnet_dist.locks import run_lock
from magnet_dist.train.ray_env import RAY_WORKER_ENV, keep_ray_on_loopback


def check_layout(cfg: Config) -> int:
    """Partitions and workers must fit: every partition needs >= 1 worker, equally many."""
    parts = cfg.graph.partitions or cfg.train.workers
    workers = cfg.train.workers
    if workers < parts or workers % parts:
        ok = [w for w in range(parts, 4 * parts + 1, parts)]
        raise MagnetError(
            f"train.workers={workers} does not fit graph.partitions={parts}: each partition needs "
            f"the same number of workers (>= 1); use train.workers in {ok} or "
            f"graph.partitions={workers}"
        )
    return parts


def ensure_partitions(cfg: Config, quiet: bool = False) -> Path:
    from magnet_dist.graph.partition import partition_dataset
    from magnet_dist.train.library_output import captured_output

    parts = check_layout(cfg)
    t0 = time.time()
    # DGL's partitioning statistics (C++ and Python prints) go to a log beside the partitions
    with tempfile.TemporaryDirectory() as tmp:
        with captured_output(Path(tmp) / "partition.log") as log:
            part_config = partition_dataset(
                cfg.data.path,
                parts,
                method=cfg.graph.partition_method,
                out_dir=cfg.graph.partition_dir,
                allow_missing_content=not cfg.model.content_view,
            )
        kept = Path(part_config).parent / "partition.log"
        with kept.open("a") as out:
            out.write(log.read_text(errors="replace"))
    if not quiet:
        print(
            f"[distributed] partitions ready: {part_config} ({time.time() - t0:.1f} s; log: {kept})"
        )
    return Path(part_config)


def job_env(cfg: Config) -> dict[str, str]:
    """The variables every worker of the job gets: :data:`RAY_WORKER_ENV`, and with
    ``trainer.interface`` the interface gloo and NCCL use (read when Ray Train creates the
    process group, before the training function runs)."""
    env = dict(RAY_WORKER_ENV)
    # Ray Train's print patch tees a worker's print to stdout and to a logger that also
    # writes to the console: every line of ours appeared twice
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if cfg.trainer.interface:
        env["GLOO_SOCKET_IFNAME"] = cfg.trainer.interface
        env["NCCL_SOCKET_IFNAME"] = cfg.trainer.interface
    return env


def embedded_node_ip(host: str) -> str:
    """The node IP of an embedded (single-machine) Ray: ``trainer.host`` when it names one
    address; loopback for ``node`` and ``0.0.0.0`` (a machine's cluster config run locally
    stays on loopback; its graph servers then bind this IP, or 0.0.0.0 when asked)."""
    return "127.0.0.1" if host in ("node", "0.0.0.0") else host


PLACEMENT_GROUP_CLEANER_LOGGER = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"
)


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of the embedded cluster. Ray Train's placement-group cleaner asks the
    state API every second whether the Train controller still lives; the state API is served by
    the dashboard, which the embedded cluster does not start (it would add ~1 GB of processes),
    so the cleaner logged a warning every second (~230 lines in a quick start). Its job, removing
    the placement group of a controller that died, is done here by ``ray.shutdown()``."""
    import logging

    import ray

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    # the cleaner finds the cluster through RAY_ADDRESS; unset, with another Ray instance on
    # the machine its thread died with "Found multiple active Ray instances" (a traceback in
    # the quick start's output)
    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - not connected yet: the cleaner may still guess right
        pass


@contextmanager
def ray_cluster(cfg: Config):
    """Connect to ``trainer.ray_address`` / ``RAY_ADDRESS`` if given (``ray job submit`` sets
    it), else start an embedded single-node cluster bound to ``trainer.host`` (loopback)."""
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        keep_ray_on_loopback()  # before the first ray import: Ray reads the flag then
    import ray

    if ray.is_initialized():
        yield
        return
    from magnet_dist.train.ray_auth import make_private, private_token_for_new_cluster, token_file

    if address:
        make_private(token_file())  # a token file of ours that others can read
        # merged with the runtime_env of `ray job submit` (Ray refuses a conflicting value)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": job_env(cfg)})
    else:
        private_token_for_new_cluster()  # else Ray writes ~/.ray/auth_token world-readable
        # token authentication stays on (Ray's default for a new cluster); Ray announces that
        # with a warning on every run ("set RAY_AUTH_MODE=disabled to opt out"): not printed.
        # (Setting RAY_AUTH_MODE=token here instead breaks: Ray reads it at import.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        cpus = max(int(cfg.train.workers * cfg.train.cpus_per_worker) + 1, os.cpu_count() or 1)
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,  # not "Started a local Ray instance."
            _node_ip_address=embedded_node_ip(cfg.trainer.host),
            log_to_driver=True,
            runtime_env={
                "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **job_env(cfg)},
                "worker_process_setup_hook": f"{__name__}.{quiet_placement_group_cleaner.__name__}",
            },
        )
    try:
        yield
    finally:
        ray.shutdown()


def with_absolute_paths(cfg: Config) -> Config:
    """Ray Train workers run in their own working directory: every path they get is absolute.

    ``train.storage_path`` (Ray Train's checkpoints) may be a URI Ray Train and pyarrow.fs
    accept (``s3://``, ``gs://``, ``hdfs://``...): passed to Ray unchanged; ``file://`` becomes
    the local path it names. Dataset, partitions and run folder are read and written with plain
    file I/O (DGL, Parquet, metrics): they must be paths, local or on a shared filesystem."""
    cfg = cfg.model_copy(deep=True)
    for key, value in (
        ("data.path", cfg.data.path),
        ("graph.partition_dir", cfg.graph.partition_dir),
        ("train.run_dir", cfg.train.run_dir),
    ):
        if value and "://" in str(value):
            raise MagnetError(
                f"{key}={value} is a URI, but it must be a filesystem path (on a cluster: a "
                "shared mount every node sees, e.g. the ReadWriteMany volume of k8s/pvc.yaml); "
                "only train.storage_path (Ray Train's checkpoints) may be a URI"
            )
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.graph.partition_dir:
        cfg.graph.partition_dir = str(Path(cfg.graph.partition_dir).resolve())
    cfg.train.run_dir = str(cfg.run_dir.resolve())
    if cfg.train.storage_path:
        cfg.train.storage_path = ray_storage_path(cfg.train.storage_path)
    return cfg


def ray_storage_path(storage_path: str) -> str:
    """``train.storage_path`` as Ray Train gets it: an absolute path (``file://`` URIs
    included), or a pyarrow.fs URI unchanged; a URI pyarrow cannot open is refused now
    rather than by Ray after the workers started."""
    if "://" not in storage_path:
        return str(Path(storage_path).expanduser().resolve())
    scheme = storage_path.split("://", 1)[0].lower()
    if scheme == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(storage_path)
        if parsed.netloc not in ("", "localhost"):
            raise MagnetError(
                f"train.storage_path={storage_path}: a file:// URI names a local path "
                "(file:///abs/path); for another host's files use a shared mount"
            )
        return str(Path(unquote(parsed.path)).resolve())
    known = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock"}
    if scheme not in known:
        raise MagnetError(
            f"train.storage_path={storage_path}: pyarrow.fs (Ray Train's storage layer) does "
            f"not handle {scheme}:// (it does: {', '.join(sorted(known))}, file://); use one "
            "of those, or a path on a shared filesystem"
        )
    return storage_path


def storage_filesystem(storage_path: str):
    """``(pyarrow.fs.FileSystem, path)`` of a ``ray_storage_path`` value: how to read what Ray
    Train wrote there (e.g. its checkpoint manager snapshot) when it is a URI."""
    import pyarrow.fs

    if "://" not in storage_path:
        return pyarrow.fs.LocalFileSystem(), storage_path
    return pyarrow.fs.FileSystem.from_uri(storage_path)


def train_distributed(cfg: Config, progress: bool = True) -> dict[str, Any]:
    if not (cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")):
        keep_ray_on_loopback()  # before the first ray import
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.train.faults import fault_hooks_from
    from magnet_dist.train.worker import train_loop_per_worker

    cfg = with_absolute_paths(cfg)
    # every input is checked before anything is written or started: a damaged Parquet file
    # (checksums of manifest.json), partitions of other data, a checkpoint of another config
    load_dataset(cfg.data.path, verify_checksum=True)
    # a refused resume must not have rebuilt partitions (or anything else) first
    check_resume_checkpoint(cfg, experiment_dir(cfg))
    part_config = ensure_partitions(cfg, quiet=not progress)
    num_parts = check_layout(cfg)
    run_dir = cfg.run_dir.resolve()
    # a URI stays one (Ray Train writes there through pyarrow.fs); a path is absolute already
    storage = cfg.train.storage_path or str(run_dir / "ray")
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = uuid.uuid4().hex  # names this fit()'s notes in failures/rank<r>.log
    # graph servers that were SIGKILLed (a fault, the OOM killer) leave shared memory behind:
    # clean it once Ray is done (on leaving both blocks)
    with run_lock(run_dir), _remove_dead_segments_after(run_dir), ray_cluster(cfg):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "run_dir": str(run_dir),
                "part_config": str(part_config.resolve()),
                "num_parts": num_parts,
                # 0: the workers pick free ports at every (re)start of the worker group
                "base_port": cfg.trainer.server_port,
                "progress": progress,
                # test hooks that inject faults (faults.FaultHooks); empty unless enabled
                "faults": fault_hooks_from(os.environ),
                "attempt": attempt,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.train.workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                placement_strategy=cfg.train.placement_strategy,
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.train.run_name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # Ray Train's INFO lines (a "Checkpoint successfully created" and a "Reporting
                # training result" per worker and epoch) only in its session logs
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        try:
            result = trainer.fit()  # Train V2 raises TrainingFailedError on failure
            if result.error is not None:
                raise result.error
        except Exception as err:
            explained = explain_failure(err, run_dir / FAILURE_DIR, attempt)
            if explained is err:
                raise
            raise explained from err
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise MagnetError(f"distributed run finished without writing {metrics_path}")
    return json.loads(metrics_path.read_text())


@contextmanager
def _remove_dead_segments_after(run_dir: Path):
    from magnet_dist.train.cluster import remove_dead_server_segments

    try:
        yield
    finally:
        remove_dead_server_segments(run_dir, wait_s=10.0)


def check_resume_checkpoint(cfg: Config, experiment: Path | None) -> None:
    """Refuse, before Ray starts, the checkpoint Ray Train would resume this run from if any of
    its files is damaged or missing, or it was written under a config that differs in a key
    that changes the result (the workers would fail on it, or resume silently changed, and be
    retried ``train.max_failures`` times). The checkpoint is the one Ray's public
    ``Result.from_path`` names as the latest; a run folder it cannot read is left to Ray."""
    from magnet_dist.train.checkpoint import load_checkpoint, verify_checkpoint_dir

    checkpoint = latest_ray_checkpoint(experiment)
    if checkpoint is None:
        return
    directory = Path(checkpoint.path)
    if not (directory / "dense.pt").is_file():
        raise MagnetError(
            f"run {cfg.train.run_name!r} would resume from checkpoint {directory}, which is "
            f"missing or incomplete (no dense.pt); delete {experiment} to start over, or use "
            "another train.run_name / train.storage_path"
        )
    try:
        verify_checkpoint_dir(directory)
        load_checkpoint(directory / "dense.pt", cfg, resume=True)
    except MagnetError as err:
        raise MagnetError(f"cannot resume run {cfg.train.run_name!r}: {err}") from None


def latest_ray_checkpoint(experiment: Path | None):
    """The latest checkpoint Ray Train registered in ``experiment`` (a local folder), read with
    Ray's public ``Result.from_path``; None when there is no run there yet or Ray cannot read it.
    """
    if experiment is None or not (experiment / "checkpoint_manager_snapshot.json").is_file():
        return None  # no run there yet (Ray writes the snapshot with its first checkpoint)
    from ray.train import Result

    # restoring logs Ray's advice for a *new* run ("configure a new RunConfig(name)"): this is
    # a resume, and we say ourselves what we found
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return Result.from_path(str(experiment)).checkpoint
    except Exception:  # a snapshot Ray cannot read: Ray reports it itself when it resumes
        return None
    finally:
        quiet.setLevel(level)


def experiment_dir(cfg: Config) -> Path | None:
    """Where Ray Train keeps this run's checkpoints (``cfg`` with absolute paths); None for a
    URI (remote storage: each worker verifies the checkpoint it loads)."""
    if cfg.train.storage_path and "://" in cfg.train.storage_path:
        return None
    storage = Path(cfg.train.storage_path or cfg.run_dir.resolve() / "ray").resolve()
    return storage / cfg.train.run_name


def read_fault_notes(failures_dir: Path, attempt: str) -> list[dict[str, Any]]:
    """The entries every rank recorded in ``failures/rank<r>.log`` during run attempt
    ``attempt`` (the id this driver gave its ``fit()``), oldest first. One file per rank: on
    NFS, appends of several nodes to one file are not atomic; the attempt id, not a comparison
    of the head's clock with each worker's, tells this run's notes from earlier ones."""
    entries = []
    for path in sorted(Path(failures_dir).glob("rank*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed worker
            if isinstance(entry, dict) and entry.get("attempt") == attempt:
                entries.append({**entry, "file": str(path)})
    return sorted(entries, key=lambda e: float(e.get("time") or 0.0))


def explain_failure(error: BaseException, failures_dir: Path, attempt: str) -> BaseException:
    """The error to raise for a failed ``trainer.fit()``: a MagnetError a worker raised (bad
    input found inside a worker), else the first cause a worker recorded in this attempt
    before it had to end itself (a dead graph server, an RPC timeout), else Ray's error."""
    for exc in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(exc, "_base_exc", exc)
        while cause is not None and not isinstance(cause, MagnetError):
            cause = cause.__cause__
        if isinstance(cause, MagnetError):
            return cause
    notes = [
        str(e.get("message"))
        for e in read_fault_notes(failures_dir, attempt)
        if e.get("kind", "fault") == "fault"
    ]
    if notes:
        # the first note is the cause; later ones are its consequences (a watchdog firing on a
        # peer of the worker whose server died)
        return MagnetError(
            f"distributed training failed: {notes[0]}\n(Ray Train: {str(error).splitlines()[0]}; "
            f"all {len(notes)} note(s) the workers recorded are in {failures_dir}/rank*.log, "
            f"attempt {attempt})"
        )
    return error
