"""Offline validation of the Kubernetes manifests in k8s/ (KubeRay RayJob / RayCluster, PVC).

* RayJob / RayCluster: jsonschema against the KubeRay CRDs' ``openAPIV3Schema`` (the version
  entry matching the manifest's apiVersion), read from ``../shared/k8s-schemas/`` beside the
  repository or from ``$MAGNET_K8S_SCHEMAS``. A user's clone has no ``../shared``: there these
  tests skip and say why; with ``MAGNET_REQUIRE_K8S_SCHEMAS=1`` (set by ``.ci/run``) missing
  schemas FAIL them. The other tests need no schemas and always run. CRD schemas do not
  set ``additionalProperties: false``, so a misspelled field passes plain jsonschema (and the
  API server would silently prune it): a strictness walk rejects every field the schema does
  not declare.
* Built-in kinds (PersistentVolumeClaim, ...): ``kubernetes_validate`` in strict mode.
* Consistency: the entrypoint's script and config exist and the config loads; worker replicas,
  train.workers and graph.partitions agree; config paths are on the shared volume; security
  settings (ClusterIP head service, token auth) are in place.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from magnet_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
APP_DIR = "/app"  # where the Dockerfile puts the repository inside the image
K8S_VERSION = "1.30.0"  # Kubernetes API version the built-in kinds are validated against
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RAY_GROUP = "ray.io"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
REQUIRE_SCHEMAS_ENV = "MAGNET_REQUIRE_K8S_SCHEMAS"  # "1": missing CRD schemas fail (CI)


# ---------------------------------------------------------------------------------------------
# schemas and manifests


def schema_dir() -> Path:
    env = os.environ.get("MAGNET_K8S_SCHEMAS")
    return Path(env) if env else REPO.parent / "shared" / "k8s-schemas"


def _load_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, apiVersion): openAPIV3Schema} for every version in the KubeRay CRD files."""
    root = schema_dir()
    missing = [name for name in CRD_FILES.values() if not (root / name).is_file()]
    if missing:
        message = (
            f"KubeRay CRD schemas not found: {', '.join(missing)} in {root}. They live in "
            "../shared/k8s-schemas/ beside the repository (ray-project/kuberay "
            "ray-operator/config/crd/bases/); set MAGNET_K8S_SCHEMAS to another folder that "
            "holds them."
        )
        if os.environ.get(REQUIRE_SCHEMAS_ENV) == "1":
            pytest.fail(f"{message} {REQUIRE_SCHEMAS_ENV}=1: they are required.", pytrace=False)
        pytest.skip(f"{message} Set {REQUIRE_SCHEMAS_ENV}=1 to make this a failure (CI does).")
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((root / name).read_text())
        group = crd["spec"]["group"]
        assert crd["spec"]["names"]["kind"] == kind, f"{name} defines {crd['spec']['names']}"
        for version in crd["spec"]["versions"]:
            schemas[(kind, f"{group}/{version['name']}")] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    return _load_crd_schemas()


def load_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path.name}: a document is not a mapping: {d!r}"
    return docs


MANIFEST_FILES = sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")])
ALL_DOCS = [
    pytest.param(doc, id=f"{p.name}:{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}")
    for p in MANIFEST_FILES
    for doc in load_documents(p)
]


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [p.values[0] for p in ALL_DOCS if p.values[0].get("kind") == kind]


def the_one(kind: str) -> dict[str, Any]:
    docs = docs_of_kind(kind)
    assert len(docs) == 1, f"expected exactly one {kind} in k8s/, found {len(docs)}"
    return docs[0]


# ---------------------------------------------------------------------------------------------
# strictness: fields the schema does not declare


def undeclared_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that ``schema`` does not declare.

    An object node accepts the keys in ``properties``; any key when it has
    ``additionalProperties`` (their values are walked against it when it is a schema) or
    ``x-kubernetes-preserve-unknown-fields: true``. Arrays are walked item by item. ``allOf`` /
    ``anyOf`` / ``oneOf`` branches contribute their declarations. Type errors are left to
    jsonschema: nodes of the wrong shape are not walked.
    """
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    branches = [schema] + [
        s for key in ("allOf", "anyOf", "oneOf") for s in schema.get(key, []) if isinstance(s, dict)
    ]
    if any(b.get("x-kubernetes-preserve-unknown-fields") for b in branches):
        return []
    errors: list[str] = []
    if isinstance(value, dict):
        properties: dict[str, Any] = {}
        additional: Any = None
        for b in branches:
            properties.update(b.get("properties", {}))
            if b.get("additionalProperties") not in (None, False):
                additional = b["additionalProperties"]
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in properties:
                errors += undeclared_fields(item, properties[key], where)
            elif additional is not None:
                if isinstance(additional, dict):
                    errors += undeclared_fields(item, additional, where)
            else:
                known = ", ".join(sorted(properties)) or "none"
                errors.append(f"{where}: field not declared by the schema (known here: {known})")
    elif isinstance(value, list):
        items = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        for i, item in enumerate(value):
            for item_schema in items:
                errors += undeclared_fields(item, item_schema, f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------------------------------------
# validation of one document


def validate_ray(doc: dict[str, Any], crd_schemas: dict) -> list[str]:
    key = (doc.get("kind"), doc.get("apiVersion"))
    schema = crd_schemas.get(key)
    if schema is None:
        known = ", ".join(f"{k} {v}" for k, v in sorted(crd_schemas))
        return [f"no KubeRay CRD schema for kind={key[0]!r} apiVersion={key[1]!r} (known: {known})"]
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    errors += undeclared_fields(doc, schema)
    # The CRD leaves the top-level metadata as a bare object (the API server checks it as an
    # ObjectMeta): check it the same way, strictly, through a built-in kind that embeds it.
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        errors = [e for e in errors if not e.startswith("metadata.")]
        errors += validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})
    return errors


def validate_builtin(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no Kubernetes schema: {e.message}"]
    return []


def validate_document(doc: dict[str, Any], crd_schemas: dict) -> list[str]:
    for field in ("apiVersion", "kind", "metadata"):
        if field not in doc:
            return [f"missing {field}"]
    errors: list[str] = []
    name = doc["metadata"].get("name") if isinstance(doc["metadata"], dict) else None
    if not isinstance(name, str) or len(name) > 63 or not DNS1123_LABEL.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label (a-z, 0-9, '-', <= 63)")
    if str(doc["apiVersion"]).split("/")[0] == RAY_GROUP:
        return errors + validate_ray(doc, crd_schemas)
    return errors + validate_builtin(doc)


# ---------------------------------------------------------------------------------------------
# every manifest validates


def test_k8s_dir_has_the_expected_manifests() -> None:
    names = {p.name for p in MANIFEST_FILES}
    assert {"rayjob.yaml", "raycluster.yaml", "pvc.yaml"} <= names, names
    the_one("RayJob")
    the_one("RayCluster")
    assert docs_of_kind("PersistentVolumeClaim"), "k8s/ has no PersistentVolumeClaim"


def test_kubernetes_validate_ships_the_target_version() -> None:
    versions = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(K8S_VERSION.rsplit(".", 1)[0]) for v in versions), (
        f"kubernetes-validate {kubernetes_validate.__version__} ships {versions}, not {K8S_VERSION}"
    )


def is_ray_doc(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == RAY_GROUP


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_manifest_validates(doc: dict[str, Any], request) -> None:
    # built-in kinds need no CRD schemas: they are validated on every clone
    schemas = request.getfixturevalue("crd_schemas") if is_ray_doc(doc) else {}
    errors = validate_document(doc, schemas)
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------
# broken manifests fail (the validator is not a rubber stamp)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Copy of ``doc`` with ``dotted`` (``a.b.0.c``) set to ``value``."""
    out = copy.deepcopy(doc)
    node: Any = out
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _rename(doc: dict[str, Any], dotted: str, new_name: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[new_name] = node.pop(keys[-1])
    return out


WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
HEAD_CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda d: _rename(d, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
            "shutdownAfterJobFinish",
        ),
        (lambda d: _rename(d, f"{WORKER}.replicas", "replica"), "replica"),
        (lambda d: _rename(d, f"{HEAD_CONTAINER}.resources", "resource"), "resource"),
        (lambda d: _rename(d, "spec.rayClusterSpec.headGroupSpec", "headGroup"), "headGroup"),
        (lambda d: _set(d, "metadata.lables", {"a": "b"}), "lables"),
        (lambda d: _set(d, f"{WORKER}.replicas", "two"), "replicas"),
        (lambda d: _set(d, "spec.backoffLimit", "x"), "backoffLimit"),
        (lambda d: _set(d, "spec.shutdownAfterJobFinishes", "yes"), "shutdownAfterJobFinishes"),
        (lambda d: _set(d, "spec.rayClusterSpec.authOptions.mode", "tokens"), "mode"),
        (lambda d: _set(d, f"{HEAD_CONTAINER}.resources.limits.memory", "lots"), "memory"),
        (lambda d: _set(d, f"{HEAD_CONTAINER}.ports.0.containerPort", "8265"), "containerPort"),
        (lambda d: _set(d, "apiVersion", "ray.io/v2"), "ray.io/v2"),
        (lambda d: _set(d, "kind", "RayJobs"), "RayJobs"),
    ],
    ids=[
        "misspelled-shutdownAfterJobFinish",
        "misspelled-worker-replica",
        "misspelled-container-resource",
        "misspelled-headGroup",
        "misspelled-metadata-lables",
        "replicas-not-int",
        "backoffLimit-not-int",
        "shutdown-not-bool",
        "authOptions-mode-not-in-enum",
        "memory-not-a-quantity",
        "containerPort-not-int",
        "unknown-apiVersion",
        "unknown-kind",
    ],
)
def test_broken_rayjob_fails(mutate, expect: str, crd_schemas: dict) -> None:
    broken = mutate(the_one("RayJob"))
    errors = validate_document(broken, crd_schemas)
    assert errors, "a broken RayJob validated"
    assert any(expect in e for e in errors), errors


def test_misspelled_field_passes_plain_jsonschema_but_not_the_strict_walk(crd_schemas) -> None:
    """Why the walk exists: the CRD schema alone accepts unknown fields (today's CRDs)."""
    broken = _rename(the_one("RayJob"), "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    schema = crd_schemas[("RayJob", broken["apiVersion"])]
    plain = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken)]
    assert not any("shutdownAfterJobFinish" in m for m in plain), (
        "the CRD now rejects unknown fields itself: this premise changed (the walk stays)"
    )
    strict = undeclared_fields(broken, schema)
    assert any(e.startswith("spec.shutdownAfterJobFinish:") for e in strict), strict


def test_broken_raycluster_fails(crd_schemas: dict) -> None:
    rc = the_one("RayCluster")
    no_head = copy.deepcopy(rc)
    del no_head["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in validate_document(no_head, crd_schemas))
    bad_group = _rename(rc, "spec.workerGroupSpecs.0.groupName", "group")
    assert any("group" in e for e in validate_document(bad_group, crd_schemas))
    bad_volume = _rename(
        rc, "spec.headGroupSpec.template.spec.volumes.0.persistentVolumeClaim", "pvc"
    )
    assert any("pvc" in e for e in validate_document(bad_volume, crd_schemas))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: _rename(d, "spec.accessModes", "accesModes"),
        lambda d: _set(d, "spec.accessModes", "ReadWriteMany"),
        lambda d: _set(d, "spec.resources.requests", ["200Gi"]),
        lambda d: _set(d, "kind", "PersistentVolumeClaims"),
        lambda d: _set(d, "metadata", {"name": "magnet-shared", "label": {"a": "b"}}),
    ],
    ids=["misspelled-field", "accessModes-not-a-list", "requests-not-a-map", "bad-kind", "meta"],
)
def test_broken_pvc_fails(mutate) -> None:
    pvc = docs_of_kind("PersistentVolumeClaim")[0]  # a built-in kind: no CRD schemas needed
    assert not validate_document(pvc, {})
    assert validate_document(mutate(pvc), {}), "a broken PVC validated"


def test_strict_walk_honours_open_nodes() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "additionalProperties": {"type": "string"}},
            "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "c": {"type": "array", "items": {"type": "object", "properties": {"x": {}}}},
            "d": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    }
    ok = {"a": {"any": "thing"}, "b": {"free": {"form": 1}}, "c": [{"x": 1}], "d": "1Gi"}
    assert undeclared_fields(ok, schema) == []
    assert undeclared_fields({"c": [{"x": 1}, {"y": 2}]}, schema) == [
        "c[1].y: field not declared by the schema (known here: x)"
    ]
    assert undeclared_fields({"e": 1}, schema)[0].startswith("e: field not declared")


# ---------------------------------------------------------------------------------------------
# consistency with the repository: entrypoint, config, storage, image, security


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = ray_cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


RAY_DOCS = [pytest.param(the_one(k), id=k) for k in ("RayJob", "RayCluster")]


def repo_path(path: str) -> Path:
    """A path as the image sees it (/app/...) or relative to the repository, in the repo."""
    if path.startswith(APP_DIR + "/"):
        path = path[len(APP_DIR) + 1 :]
    assert not Path(path).is_absolute(), f"{path} is outside the repository ({APP_DIR} in image)"
    return REPO / path


def parse_python_command(command: str) -> tuple[Path, Path]:
    """(script, config) of ``python SCRIPT ... --config CONFIG ...``."""
    for sep in ("&&", "||", ";", "|"):
        assert sep not in command, f"{command!r}: one command only (KubeRay/ray job submit)"
    argv = shlex.split(command)
    assert argv and Path(argv[0]).name in ("python", "python3"), f"{command!r}: not python ..."
    assert len(argv) > 1 and argv[1].endswith(".py"), f"{command!r}: no script"
    if "--config" in argv:
        config = argv[argv.index("--config") + 1]
    else:
        config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        assert config, f"{command!r}: no --config"
    return repo_path(argv[1]), repo_path(config)


def check_command(command: str) -> None:
    script, config = parse_python_command(command)
    assert script.is_file(), f"entrypoint script {script.relative_to(REPO)} is not in the repo"
    assert config.is_file(), f"config {config.relative_to(REPO)} is not in the repo"
    load_config(config)  # raises ConfigError with the key path when it does not load


def test_rayjob_entrypoint_names_script_and_config_that_exist() -> None:
    check_command(the_one("RayJob")["spec"]["entrypoint"])


def test_readme_submit_commands_name_script_and_config_that_exist() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    commands = [
        line.split(" -- ", 1)[1].strip().rstrip("\\").strip()
        for line in readme.replace("\\\n", " ").splitlines()
        if "ray job submit" in line and " -- " in line
    ]
    assert commands, "k8s/README.md shows no `ray job submit ... -- python ...` command"
    for command in commands:
        check_command(command)


def cluster_config():
    rayjob = the_one("RayJob")
    _, config = parse_python_command(rayjob["spec"]["entrypoint"])
    return load_config(config)


def test_cluster_config_is_distributed_and_reachable() -> None:
    cfg = cluster_config()
    assert cfg.trainer.mode == "distributed"
    assert cfg.trainer.host == "node", "DGL servers must bind the node's IP (other pods dial it)"
    assert cfg.trainer.ray_address in (None, "auto"), "must join the cluster the job runs on"
    assert cfg.graph.partitions in (None, cfg.train.workers)


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_workers_match_config(doc: dict[str, Any]) -> None:
    cfg = cluster_config()
    groups = ray_cluster_spec(doc)["workerGroupSpecs"]
    replicas = sum(g["replicas"] for g in groups)
    assert replicas == cfg.train.workers, (
        f"{doc['kind']}: {replicas} worker pods but train.workers={cfg.train.workers}: scale "
        "the worker group, train.workers and graph.partitions together"
    )
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert not ray_cluster_spec(doc).get("enableInTreeAutoscaling"), "fixed-size cluster"


def cpu_count(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("8", "7500m") in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_pod_cpus(group: dict[str, Any]) -> float:
    """The CPUs Ray advertises on a worker pod: rayStartParams num-cpus, else (KubeRay's
    default) the container's CPU limit."""
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        return float(params["num-cpus"])
    return cpu_count(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_placement_puts_one_trainer_on_each_worker_pod(doc: dict[str, Any]) -> None:
    """A partition's workers read its data from the server node's /dev/shm: the config must
    spread the trainers, one per pod, or Ray may pack them all onto one."""
    cfg = cluster_config()
    for g in ray_cluster_spec(doc)["workerGroupSpecs"]:
        cpus = worker_pod_cpus(g)
        assert cfg.train.cpus_per_worker <= cpus, (
            f"{g['groupName']}: train.cpus_per_worker={cfg.train.cpus_per_worker} does not fit "
            f"a {cpus}-CPU pod: the trainers would never be placed"
        )
        spread = cfg.train.placement_strategy == "STRICT_SPREAD"
        assert spread or cfg.train.cpus_per_worker > cpus / 2, (
            f"{g['groupName']}: {cpus}-CPU pods fit two trainers of "
            f"train.cpus_per_worker={cfg.train.cpus_per_worker} with placement "
            f"{cfg.train.placement_strategy}: use STRICT_SPREAD or more CPUs per worker"
        )
        threads = (cfg.train.threads_per_worker or cfg.train.cpus_per_worker) + (
            cfg.trainer.server_threads
        )
        assert threads <= cpus, (
            f"{g['groupName']}: trainer threads + graph-server threads = {threads} > {cpus} CPUs"
        )


def shm_limits(doc: dict[str, Any]) -> dict[str, tuple[int, int | None]]:
    """{pod group: (/dev/shm sizeLimit bytes, object-store-memory bytes or None)}."""
    out = {}
    spec = ray_cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, g in groups:
        pod = g["template"]["spec"]
        mounts = {
            m["name"]
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if m["mountPath"] == "/dev/shm"
        }
        vols = [v for v in pod.get("volumes", []) if v["name"] in mounts]
        assert len(vols) == 1 and vols[0].get("emptyDir", {}).get("medium") == "Memory", (
            f"{name}: /dev/shm must be one emptyDir with medium Memory: {vols}"
        )
        store = (g.get("rayStartParams") or {}).get("object-store-memory")
        out[name] = (quantity_bytes(vols[0]["emptyDir"]["sizeLimit"]), store and int(store))
    return out


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if str(quantity).endswith(suffix):
            return int(float(str(quantity)[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_shared_memory_holds_the_object_store_and_the_graph(doc: dict[str, Any]) -> None:
    """/dev/shm holds Ray's object store and (on workers) the DGL server's segments: each pod
    sets the object store's size, and /dev/shm leaves room beyond it (k8s/README.md)."""
    for name, (shm, store) in shm_limits(doc).items():
        assert store, f"{name}: set rayStartParams object-store-memory (default: 30% of RAM)"
        assert shm >= store + 2 * 2**30, (
            f"{name}: /dev/shm {shm / 2**30:.1f} GiB leaves < 2 GiB beside the object store "
            f"({store / 2**30:.1f} GiB)"
        )


def shared_mounts(doc: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """{pod group: {(claimName, mountPath)}} of the PVC mounts of every Ray container."""
    out: dict[str, set[tuple[str, str]]] = {}
    for group, pod in pod_specs(doc):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for c in pod["containers"]:
            out.setdefault(group, set()).update(
                (claims[m["name"]], m["mountPath"])
                for m in c.get("volumeMounts", [])
                if m["name"] in claims
            )
    return out


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_shared_volume_is_mounted_everywhere_and_holds_the_run(doc: dict[str, Any]) -> None:
    pvcs = {p["metadata"]["name"]: p for p in docs_of_kind("PersistentVolumeClaim")}
    mounts = shared_mounts(doc)
    per_group = list(mounts.values())
    assert len(mounts) == len(pod_specs(doc)) and all(per_group), (
        f"not mounted everywhere: {mounts}"
    )
    common = set.intersection(*per_group)
    assert common, f"head and workers mount different volumes: {mounts}"
    for claim, _ in common:
        assert claim in pvcs, f"claim {claim} is not defined in k8s/"
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], f"{claim} is not RWX"
    cfg = cluster_config()
    paths = {
        "data.path": cfg.data.path,
        "train.run_dir": cfg.train.run_dir,
        "train.storage_path": cfg.train.storage_path,
        "graph.partition_dir": cfg.graph.partition_dir,
    }
    mount_paths = [Path(m) for _, m in common]
    for key, value in paths.items():
        if value is None and key == "graph.partition_dir":
            continue  # default: under data.path
        assert value is not None, f"{key} must be set (default is a local path)"
        assert any(Path(value).is_relative_to(m) for m in mount_paths), (
            f"{key}={value} is not on the shared volume ({', '.join(map(str, mount_paths))})"
        )


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_ray_containers_image_and_resources(doc: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "scripts/setup_env.sh" in dockerfile and f"{APP_DIR}/.venv/bin" in dockerfile
    assert re.search(rf"^WORKDIR\s+{APP_DIR}\s*$", dockerfile, re.M), "image repo dir changed"
    images = set()
    for group, pod in pod_specs(doc):
        for c in pod["containers"]:
            images.add(c["image"])
            for kind in ("requests", "limits"):
                res = c.get("resources", {}).get(kind, {})
                assert {"cpu", "memory"} <= set(res), f"{group}/{c['name']}: {kind} {res}"
    assert len(images) == 1, f"one image for head and workers: {images}"
    assert all(":" in i.rsplit("/", 1)[-1] and not i.endswith(":latest") for i in images), images


def test_rayjob_lifecycle_fields() -> None:
    spec = the_one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert isinstance(spec.get(key), int) and spec[key] >= 0, key
    assert spec["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_dashboard_is_not_exposed_and_token_auth_is_on(doc: dict[str, Any]) -> None:
    spec = ray_cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "port 8265 must stay internal"
    assert not head.get("enableIngress"), "no ingress to the dashboard / Jobs API"
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray token auth must be on"
    pins = re.findall(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pins and spec["rayVersion"] == pins[0], f"rayVersion vs pyproject ray pin {pins}"
