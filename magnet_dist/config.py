"""One typed config for every stage, loaded from YAML with dotted ``key=value`` overrides.

Every knob of MAGNET_SPEC.md marked *(config)* lives here with its default. Unknown keys and
wrong types are rejected at load time with the key path (pydantic, ``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from magnet_dist.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str = "data/ml-100k"  # prepared dataset folder (manifest.json inside)
    source: Literal["movielens-100k", "mmrec", "parquet", "synthetic"] = "movielens-100k"
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
    variant: Literal["magnet", "lightgcn"] = "magnet"
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

    @model_validator(mode="after")
    def _lightgcn_is_all_off(self) -> ModelConfig:
        """The LightGCN baseline is MAGNET with every component off (no content view, no MoE)."""
        if self.variant == "lightgcn":
            object.__setattr__(self, "content_view", False)
            object.__setattr__(self, "use_moe", False)
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


class RoutingConfig(_Section):
    two_stage: bool = True  # ablation "single-stage": False (coverage losses throughout)
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
    sampled: bool = False  # reference trainer: sampled blocks instead of the full graph
    fanouts: list[int] = [10, 10]  # neighbours per layer and edge type (input side first); -1 = all
    # Scale sampled messages by degree/sampled so they estimate full-graph propagation.
    sample_rescale: bool = True
    max_steps_per_epoch: int | None = None
    run_dir: str | None = None  # default: runs/<run_name>
    run_name: str = "quickstart"
    storage_path: str | None = None  # Ray Train storage; default: <run_dir>/ray
    checkpoint_every: int = Field(1, ge=1)  # epochs
    # distributed: also checkpoint every N training steps (0 = only at epoch ends), with the
    # position inside the epoch, so a restarted worker group loses at most N steps
    checkpoint_every_steps: int = Field(0, ge=0)
    max_failures: int = Field(0, ge=-1)  # Ray Train worker-group restarts (-1: unlimited)
    threads_per_worker: int | None = None  # torch threads per worker (default: cpus_per_worker)
    cpus_per_worker: float = Field(1.0, gt=0)  # Ray resources reserved per training worker
    use_gpu: bool = False  # one GPU per worker; NCCL instead of gloo
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


class TrainerConfig(_Section):
    mode: Literal["reference", "distributed"] = "reference"
    ray_address: str | None = None  # None: existing cluster if RAY_ADDRESS, else embedded local
    host: str = "127.0.0.1"  # bind address for embedded Ray and DGL servers
    server_port: int = Field(
        0, ge=0
    )  # first graph-server port (+1 per partition); 0 = pick free ports
    server_timeout_s: float = Field(120.0, gt=0)


class EvalConfig(_Section):
    ks: list[int] = [10, 20]
    user_chunk: int = Field(1024, ge=1)
    item_chunk: int = Field(65536, ge=1)
    two_stage_above_items: int = Field(200_000, ge=1)  # catalogue size for retrieve-then-rerank
    candidates: int = Field(200, ge=1)
    # Ranking inside the distributed trainer (every worker encodes its user shard and every item
    # with full neighbourhoods). False: no in-loop ranking; the last epoch's model is exported as
    # checkpoints/best.pt for `magnet-dist evaluate` (large graphs, e.g. the 1M scale run).
    in_loop: bool = True


class Config(_Section):
    data: DataConfig = DataConfig()
    graph: GraphConfig = GraphConfig()
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    routing: RoutingConfig = RoutingConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        n_templates = num_templates(self.moe.families)
        n_experts = n_templates * self.moe.experts_per_template
        if self.model.use_moe and self.moe.top_k > n_experts:
            raise ValueError(
                f"moe.top_k={self.moe.top_k} exceeds the number of experts E={n_experts}; "
                f"use moe.top_k in 1..{n_experts}"
            )
        if self.moe.ep_size > 1:
            world = self.train.workers
            ok = [s for s in range(1, n_experts + 1) if n_experts % s == 0 and world % s == 0]
            if n_experts % self.moe.ep_size or world % self.moe.ep_size:
                raise ValueError(
                    f"moe.ep_size={self.moe.ep_size} must divide both the number of experts "
                    f"E={n_experts} and train.workers={world}; values that work: {ok}"
                )
        return self

    @property
    def num_experts(self) -> int:
        return num_templates(self.moe.families) * self.moe.experts_per_template

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.train.run_name}")


def num_templates(families: list[str], num_modalities: int = 3) -> int:
    """Templates in the pool: dominant has one per modality, balanced/complementary one per pair."""
    pairs = num_modalities * (num_modalities - 1) // 2
    per_family = {"dominant": num_modalities, "balanced": pairs, "complementary": pairs}
    return sum(per_family[f] for f in families)


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
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


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
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = Config
            for part in e["loc"][:-1]:
                field = section.model_fields.get(str(part))
                section = field.annotation if field is not None else section
            allowed = sorted(getattr(section, "model_fields", {}))
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif "input" in e and e["type"] != "value_error":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional) + overrides into a validated Config, or raise ConfigError."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = loaded
        origin = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        origin += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
