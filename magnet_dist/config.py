"""One typed config for every stage, loaded from YAML with dotted ``key=value`` overrides.

Every knob of MAGNET_SPEC.md marked *(config)* lives here with its default. Unknown keys and
wrong types are rejected at load time with the key path (pydantic, ``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from magnet_dist.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are YAML floats, and no knob means anything at inf
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    path: str = "data/ml-100k"  # prepared dataset folder (manifest.json inside)
    source: Literal["movielens-100k", "movielens-1m", "mmrec", "parquet", "synthetic"] = (
        "movielens-100k"
    )
    source_path: str | None = None  # input folder for mmrec / parquet sources
    seed: int = 2024  # split / generator seed
    synthetic_users: int = 10_000
    synthetic_items: int = 2_000
    synthetic_interactions: int = 200_000


class GraphConfig(_Section):
    content_k: int = Field(10, ge=1)  # fused top-k content neighbours per item
    per_modality_k: int | None = None  # KNN per modality before fusion (default: content_k)
    modality_weights: dict[str, float] | None = None  # w_c; None = equal
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(200, ge=1)
    hnsw_ef: int = Field(64, ge=1)
    recall_sample: int = Field(1000, ge=1)  # items checked against exact search
    partition_method: Literal["random", "metis"] = "metis"
    partitions: int | None = None  # default: train.workers
    partition_dir: str | None = None  # default: <data.path>/partitions-<n>-<method>


class ModelConfig(_Section):
    # "lightgcn": MAGNET with the content view and the MoE off; "mf": BPR matrix
    # factorisation (ID embeddings only, no propagation, no content, no MoE)
    variant: Literal["magnet", "lightgcn", "mf"] = "magnet"
    dim: int = Field(64, ge=1)
    layers: int = Field(2, ge=0)
    content_view: bool = True  # augmented view G_a (ablation: False)
    use_moe: bool = True  # MoE read-out on top of the dot product (ablation: False)
    templates: bool = True  # template-weighted expert inputs (ablation "free experts": False)
    fusion: Literal["learned", "fixed"] = "learned"
    fusion_init: float = 0.5  # lambda_m at start (learned) or always (fixed)
    reg_weight: float = Field(1e-4, ge=0)  # lambda_reg on the batch embeddings
    # item content features as channels of their own; False: ID embeddings only (with
    # variant=lightgcn: the classic ID-only LightGCN of MMRec's tables)
    content_channels: bool = True
    # How the per-modality dot products form the base score: "mean" (the spec: mean_m
    # <h_u^m, h_i^m>, so each content channel dilutes the ID dot), "learned" (sum_m w_m <.,.>
    # with w_behaviour = 1 and w_content = 0 at the start: the model starts as the ID LightGCN
    # and learns how much each content channel adds), "behaviour" (the ID dot alone; content
    # reaches the score only through the MoE head; configs/movielens.yaml). "learned" lets a
    # free scale on the ID dot undo the L2 on the embeddings (w_behaviour grew to 4.3 on
    # MovieLens-100K and the run peaked at epoch 16); docs/benchmarks.md (issue 16).
    score_weights: Literal["mean", "learned", "behaviour"] = "mean"

    @model_validator(mode="after")
    def _lightgcn_is_all_off(self) -> ModelConfig:
        """The LightGCN baseline is MAGNET with every component off (no content view, no MoE);
        BPR-MF is that with no propagation (``layers=0``) and no content channels either, so its
        score is the dot product of the raw ID embeddings. Both override the component keys."""
        if self.variant in ("lightgcn", "mf"):
            object.__setattr__(self, "content_view", False)
            object.__setattr__(self, "use_moe", False)
        if self.variant == "mf":
            object.__setattr__(self, "layers", 0)
            object.__setattr__(self, "content_channels", False)
        return self

    @model_validator(mode="after")
    def _moe_needs_content(self) -> ModelConfig:
        """The MoE templates mix behaviour with at least one content channel (runs after
        ``_lightgcn_is_all_off``, which turns the MoE off for the baseline)."""
        if self.use_moe and not self.content_channels:
            raise ValueError(
                "model.content_channels=false leaves one modality (behaviour), and the MoE "
                "templates mix at least two: set model.use_moe=false too"
            )
        return self


class MoEConfig(_Section):
    families: list[Literal["dominant", "balanced", "complementary"]] = [
        "dominant",
        "balanced",
        "complementary",
    ]
    experts_per_template: int = Field(1, ge=1)  # p: expert splitting, E = |templates| * p
    top_k: int = Field(2, ge=1)
    alpha: float = Field(0.7, gt=0, lt=1)  # dominant weight
    beta: float = Field(0.45, gt=0, lt=0.5)  # balanced pair weight
    delta: float = Field(0.1, ge=0, lt=1)  # complementary third-modality share
    hidden_mult: int = Field(2, ge=1)  # d_h = hidden_mult * d
    capacity_factor: float | None = None  # None: never drop (capacity = max load)
    ep_size: int = Field(1, ge=1)  # expert-parallel degree
    router_noise: float = Field(0.0, ge=0)  # logit noise std in the coverage stage
    # RMS-normalise each z_m per token: "router" (the router's input only), "all" (experts'
    # inputs too), "none". Measured on MovieLens-100K (valid Recall@20 at epoch 21): none 0.336,
    # router 0.280 (routing specialises, H_conf 0.95 -> 0.80, but the head overfits), all peaks
    # at 0.280 by epoch 3; LightGCN 0.307. With "none" routing stays near uniform.
    token_norm: Literal["none", "router", "all"] = "none"
    dropout: float = Field(0.0, ge=0, lt=1)  # on each expert's hidden layer (training only)
    weight_decay: float = Field(0.0, ge=0)  # L2 on router, experts and read-out (Adam)
    detach_token: bool = False  # MoE gradients do not flow back into the encoder
    # the head's (router, experts, read-out) learning rate = train.lr * lr_scale: the head
    # fits fast and overfits at the embeddings' rate (dense and reference optimisers; with
    # moe.ep_size > 1 the expert-parallel experts keep train.lr). Single-seed trials only so
    # far (issue 16).
    lr_scale: float = Field(1.0, gt=0)


class RoutingConfig(_Section):
    two_stage: bool = True  # ablation "single-stage": False (coverage losses throughout)
    # What the trigger watches: "hard" = H_load, the entropy of the actual Top-K assignments;
    # "soft" = H_use on the mean probabilities (the spec's literal reading, ~1 from the start
    # and blind to collapse; see docs/routing.md)
    trigger_on: Literal["hard", "soft"] = "hard"
    ema_decay: float = Field(0.9, ge=0, lt=1)  # mu
    tau: float = Field(0.9, ge=0, le=1)
    window: int = Field(50, ge=1)  # W
    min_steps: int = Field(200, ge=0)  # S_min
    max_steps: int = Field(2000, ge=1)  # S_max (forced switch)
    ramp_steps: int = Field(200, ge=0)  # R
    lambda_bal: float = Field(0.01, ge=0)
    lambda_cov: float = Field(0.1, ge=0)
    lambda_spec: float = Field(0.05, ge=0)
    lambda_cov_guard: float = Field(0.01, ge=0)


class TrainConfig(_Section):
    workers: int = Field(2, ge=1)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(2048, ge=1)
    # False: batch_size is the global batch (split over workers; same optimisation as the
    # reference). True: each worker's batch (DistDGL / GraphStorm convention; the global batch
    # grows with the workers): weak scaling, for throughput on graphs whose sampled
    # neighbourhood of a half batch costs about as much as a whole one's.
    batch_per_worker: bool = False
    lr: float = Field(1e-3, gt=0)
    n_neg: int = Field(1, ge=1)
    seed: int = 2024
    eval_every: int = Field(1, ge=1)
    patience: int = Field(10, ge=1)  # evaluations without valid recall@20 gain
    # neighbours per layer and edge type (input side first), one per model.layers; -1 = all
    fanouts: list[Annotated[int, Field(ge=-1)]] = [10, 10]
    # Scale sampled messages by degree/sampled so they estimate full-graph propagation.
    sample_rescale: bool = True
    # distributed: sample one hop per step (train.fanouts has one entry); layers 2..L of the
    # output nodes come from a full-graph table rank 0 recomputes (and broadcasts) every
    # history_refresh_steps steps (0: at the start of every epoch); train/history.py
    history: bool = False
    history_refresh_steps: int = Field(0, ge=0)
    # distributed: how DGL's SparseAdam applies a worker's own rows: "in_place" on the
    # shared-memory partition (graph/dist.py LocalShardAdam), or "kvstore" (DGL's pull/push;
    # the same arithmetic, slower: kept to measure the difference)
    sparse_update: Literal["in_place", "kvstore"] = "in_place"
    # distributed: where a worker's seeds in its own partition are neighbour-sampled: "server"
    # (an RPC to its partition's server, like the other partitions' seeds), or "in_process" from
    # the partition's graph, which its server (same host) shares in /dev/shm. The same sample
    # either way with one sampling thread (seeded per partition). in_process saves no work (the
    # sampling itself is the cost, not the RPC) and moves it from the server's core onto the
    # worker's: slower on 2 cores (docs/benchmarks.md, run 8)
    local_sampling: Literal["server", "in_process"] = "server"
    max_steps_per_epoch: int | None = None
    run_dir: str | None = None  # default: runs/<run_name>
    run_name: str = "quickstart"  # a folder name under runs/ (no path separators, not '..')
    storage_path: str | None = None  # Ray Train storage; default: <run_dir>/ray
    checkpoint_every: int = Field(1, ge=1)  # epochs
    # distributed: also checkpoint every N training steps (0 = only at epoch ends), with the
    # position inside the epoch, so a restarted worker group loses at most N steps
    checkpoint_every_steps: int = Field(0, ge=0)
    # distributed: also checkpoint when this many minutes of wall clock have passed since the
    # last checkpoint (0 = off); rank 0's clock decides, so every rank reports on the same step
    checkpoint_every_minutes: float = Field(0.0, ge=0)
    # resume although config keys that change the result differ from the checkpoint's (they
    # are printed); by default such a resume is refused (train/checkpoint.py RESUMABLE_CHANGES)
    resume_changed_config: bool = False
    max_failures: int = Field(0, ge=-1)  # Ray Train worker-group restarts (-1: unlimited)
    threads_per_worker: int | None = None  # torch threads per worker (default: cpus_per_worker)
    cpus_per_worker: float = Field(1.0, gt=0)  # Ray resources reserved per training worker
    use_gpu: bool = False  # one GPU per worker; NCCL instead of gloo
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"

    @field_validator("fanouts")
    @classmethod
    def _fanouts_are_counts(cls, value: list[int]) -> list[int]:
        if 0 in value:
            raise ValueError("a fanout of 0 samples no neighbour; use a count >= 1, or -1 for all")
        return value

    @field_validator("run_name")
    @classmethod
    def _run_name_is_one_folder(cls, value: str) -> str:
        """runs/<run_name> (and Ray's <storage>/<run_name>) must stay inside its parent."""
        if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise ValueError(
                f"{value!r} is not a folder name: no path separators, not '.' or '..'; "
                "use train.run_dir to place the run folder elsewhere"
            )
        return value

    @property
    def shares_graph(self) -> bool:
        """The graph servers share their partition's structure in /dev/shm and each worker
        samples its own partition from it (``local_sampling: in_process``)."""
        return self.local_sampling == "in_process"


class TrainerConfig(_Section):
    mode: Literal["reference", "distributed"] = "reference"
    ray_address: str | None = None  # None: existing cluster if RAY_ADDRESS, else embedded local
    # address the graph servers bind (and an embedded Ray's node IP): loopback by default;
    # "node" = each node's Ray IP (clusters); "0.0.0.0" only if asked (clients dial the node IP)
    host: str = "127.0.0.1"
    # network interface of multi-NIC nodes (e.g. eth1): gloo's GLOO_SOCKET_IFNAME, and with
    # host "node" the address the graph servers bind and the DGL clients listen on
    interface: str | None = None
    # DGL clients' connect-back ports ("LOW-HIGH"); None: the kernel's ephemeral range
    client_ports: str | None = Field(None, pattern=r"^\d+-\d+$")
    server_threads: int = Field(1, ge=1)  # OpenMP/torch threads of each graph server
    server_port: int = Field(
        0, ge=0
    )  # first graph-server port (+1 per partition); 0 = pick free ports
    server_timeout_s: float = Field(120.0, gt=0)


class EvalConfig(_Section):
    ks: list[Annotated[int, Field(ge=1)]] = [10, 20]  # cut-offs K; must hold 20 (selection)
    user_chunk: int = Field(1024, ge=1)
    item_chunk: int = Field(65536, ge=1)
    two_stage_above_items: int = Field(200_000, ge=1)  # catalogue size for retrieve-then-rerank
    candidates: int = Field(200, ge=1)
    # Ranking inside the distributed trainer (every worker encodes its user shard and every item
    # with full neighbourhoods). False: no in-loop ranking; the last epoch's model is exported as
    # checkpoints/best.pt for `magnet-dist evaluate` (large graphs, e.g. the 1M scale run).
    in_loop: bool = True
    # without in_loop: also export every epoch's model as checkpoints/epoch-<k>.pt (best.pt's
    # format) with its training seconds in snapshots.csv, for evaluation afterwards (e.g. the
    # time-to-quality benchmark, launch/bench_time_to_quality.py)
    snapshot_every_epoch: bool = False

    @field_validator("ks")
    @classmethod
    def _ks_hold_the_selection_cutoff(cls, value: list[int]) -> list[int]:
        """Model selection and early stopping read valid Recall@20 (train/common.py)."""
        if len(set(value)) != len(value):
            raise ValueError(f"repeated cut-off in {value}; list each K once")
        if 20 not in value:
            raise ValueError(
                f"{value} lacks 20: model selection uses valid Recall@20; e.g. [10, 20]"
            )
        return value


class Config(_Section):
    data: DataConfig = DataConfig()
    graph: GraphConfig = GraphConfig()
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    routing: RoutingConfig = RoutingConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    # where data.path and data.source came from ("default", "file", "override"): a missing
    # dataset is only built when both come from the same place (train/pipeline.py)
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        """What holds for any dataset (``moe.ep_size`` divides ``train.workers``) always; the
        number of experts E depends on the dataset's modalities, so ``moe.top_k`` and
        ``moe.ep_size`` are checked against E here only when ``data.path`` is already prepared
        (and again where the model is built: ``check_expert_count``)."""
        if self.moe.ep_size > 1 and self.train.workers % self.moe.ep_size:
            raise ValueError(
                f"moe.ep_size={self.moe.ep_size} must divide train.workers={self.train.workers}"
            )
        num_modalities = prepared_modalities(self)
        if num_modalities is not None:
            problem = expert_count_problem(self, num_modalities)
            if problem is not None:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _fanouts_fit_layers(self) -> Config:
        """The sampler draws one hop per layer: ``len(train.fanouts)`` must be ``model.layers``
        (one with ``train.history``). ``model.variant=mf`` propagates nothing: its fanouts are ``[]``, whatever was given."""
        if self.model.variant == "mf":
            object.__setattr__(self.train, "fanouts", [])
        if self.train.history and self.model.layers >= 1:
            if len(self.train.fanouts) != 1:
                raise ValueError(
                    f"train.history samples one hop per step, but train.fanouts is "
                    f"{self.train.fanouts}: give one fanout, e.g. train.fanouts=[10]"
                )
            return self
        if len(self.train.fanouts) != self.model.layers:
            raise ValueError(
                f"train.fanouts={self.train.fanouts} has {len(self.train.fanouts)} value(s) but "
                f"model.layers={self.model.layers}: give one fanout per layer"
            )
        return self

    def num_experts(self, num_modalities: int) -> int:
        """E for a dataset with ``num_modalities`` channels (behaviour + content modalities)."""
        return num_templates(self.moe.families, num_modalities) * self.moe.experts_per_template

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.train.run_name}")


def num_templates(families: list[str], num_modalities: int) -> int:
    """Templates in the pool: dominant has one per modality, balanced/complementary one per pair
    (``num_modalities`` = behaviour + the dataset's content modalities: 3 gives the paper's 9)."""
    pairs = num_modalities * (num_modalities - 1) // 2
    per_family = {"dominant": num_modalities, "balanced": pairs, "complementary": pairs}
    return sum(per_family[f] for f in families)


def model_modalities(cfg: Config, content_modalities: int) -> int:
    """Channels the model has for a dataset with ``content_modalities`` feature modalities."""
    return 1 + (content_modalities if cfg.model.content_channels else 0)


def prepared_modalities(cfg: Config) -> int | None:
    """The model's channel count for ``data.path`` if it is a prepared dataset, else None."""
    import json

    try:
        manifest = json.loads((Path(cfg.data.path).expanduser() / "manifest.json").read_text())
        return model_modalities(cfg, len(manifest["modalities"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def expert_count_problem(cfg: Config, num_modalities: int) -> str | None:
    """Why ``moe.top_k`` / ``moe.ep_size`` do not fit E experts of this dataset, or None."""
    if not cfg.model.use_moe or num_modalities < 2:
        return None
    e = cfg.num_experts(num_modalities)
    where = f"E={e} for {num_modalities} modalities (behaviour + {num_modalities - 1} content)"
    if cfg.moe.top_k > e:
        return f"moe.top_k={cfg.moe.top_k} exceeds the number of experts {where}; use 1..{e}"
    world = cfg.train.workers
    if cfg.moe.ep_size > 1 and (e % cfg.moe.ep_size or world % cfg.moe.ep_size):
        ok = [s for s in range(1, e + 1) if e % s == 0 and world % s == 0]
        return (
            f"moe.ep_size={cfg.moe.ep_size} must divide both the number of experts {where} "
            f"and train.workers={world}; values that work: {ok}"
        )
    return None


def check_expert_count(cfg: Config, num_modalities: int) -> None:
    """Raise ConfigError naming moe.top_k / moe.ep_size and E, where the dataset is known."""
    problem = expert_count_problem(cfg, num_modalities)
    if problem is not None:
        raise ConfigError(problem)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "moe.top_k=1"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        value = _parse_yaml(raw, f"override {item!r}") if raw != "" else None
        _set_dotted(tree, key.strip(), value)
    return tree


# Largest config a YAML file may expand to (nodes, aliases expanded): a real config has a few
# hundred; "billion laughs" (nested aliases) reaches billions from a 1 KB file.
MAX_CONFIG_NODES = 100_000
MAX_SHOWN_INPUT = 80  # characters of a rejected value echoed in an error message
# Keys that existed and were never read: accepted at their old default (a run folder's
# config.yaml written before their removal holds them), refused otherwise.
REMOVED_KEYS = {("train", "sampled"): False}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and configs whose aliases expand too far."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: explicit keys may override merged ones
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, list | dict) and key in seen:
                    raise ConfigError(
                        f"duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                        "a key may appear once per section"
                    )
                if not isinstance(key, list | dict):
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of the tree with every alias expanded (stops past MAX_CONFIG_NODES)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a recursive alias (an anchor used inside itself)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_CONFIG_NODES:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> Python value with the strict loader; every YAML problem is a ConfigError
    naming ``origin`` and the line (no traceback, no echo of the whole input)."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        try:
            nodes = _expanded_size(root)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
        except RecursionError:
            raise ConfigError(f"{origin}: nested too deeply") from None
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{origin}: expands to more than {MAX_CONFIG_NODES:,} values through its "
                "aliases (*name); a config is a few hundred values, write them out"
            )
        return loader.construct_document(root)
    except ConfigError as err:
        if str(err).startswith(origin):
            raise
        raise ConfigError(f"{origin}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply") from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans several lines and quotes input)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if problem.startswith("could not determine a constructor for the tag"):
        tag = problem.split("tag", 1)[1].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        problem = f"tag {tag} is not allowed (plain YAML only: no Python objects)"
    context = getattr(err, "context", None)
    if context and "constructor" not in problem:
        problem = f"{context}: {problem}"
    return _shorten(f"{where}{problem}", 200)


def _shorten(text: str, limit: int = MAX_SHOWN_INPUT) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _drop_removed_keys(tree: dict[str, Any], origin: str) -> None:
    for (section, key), old_default in REMOVED_KEYS.items():
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            if node[key] != old_default:
                raise ConfigError(
                    f"invalid config ({origin}): {section}.{key} was removed (nothing read "
                    "it: the reference trainer always propagates over the full graph); "
                    "delete the key"
                )
            del node[key]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = Config
            for part in e["loc"][:-1]:
                field = section.model_fields.get(str(part))
                section = field.annotation if field is not None else section
            allowed = sorted(getattr(section, "model_fields", {}))
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif "input" in e and e["type"] != "value_error":
            msg = f"{msg} (got {_shorten(repr(e['input']))})"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")  # cross-section checks name keys
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional) + overrides into a validated Config, or raise ConfigError."""
    tree: dict[str, Any] = {}
    tree_file: dict[str, Any] | None = None
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {path} {what}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path}: not UTF-8 text (byte {err.start}: "
                f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8"
            ) from None
        except OSError as err:
            raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
        loaded = _parse_yaml(text, f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = tree_file = loaded
        origin = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        origin += " + overrides"
    _drop_removed_keys(tree, origin)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
    from_overrides = parse_overrides(overrides or []).get("data", {})
    from_file = (tree_file or {}).get("data", {})
    if isinstance(from_overrides, dict) and isinstance(from_file, dict):
        same = from_overrides.get("path"), from_file.get("path")
        if all(isinstance(p, str) for p in same) and _same_path(*same):
            from_overrides = {k: v for k, v in from_overrides.items() if k != "path"}
    for key in ("path", "source"):
        if isinstance(from_overrides, dict) and key in from_overrides:
            cfg._origins[f"data.{key}"] = "override"
        elif isinstance(from_file, dict) and key in from_file:
            cfg._origins[f"data.{key}"] = "file"
        else:
            cfg._origins[f"data.{key}"] = "default"
    return cfg


def _same_path(a: str, b: str) -> bool:
    """The config file's path given again (say, absolute) is still the file's path."""
    return Path(a).expanduser().absolute() == Path(b).expanduser().absolute()


def data_origins(cfg: Config) -> tuple[str, str]:
    """(where data.path came from, where data.source came from); "default" when unknown."""
    origins = cfg._origins or {}
    return origins.get("data.path", "default"), origins.get("data.source", "default")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
