"""The base score's per-modality weights (``model.score_weights``) and the head's learning rate
(``moe.lr_scale``): issue 16's levers for the MoE model against the ID-only LightGCN."""

import pytest
import torch

from magnet_dist.config import load_config
from magnet_dist.eval.model_io import LoadedRun
from magnet_dist.eval.scoring import pair_score_fn
from magnet_dist.model.hops import full_graph_hop
from magnet_dist.model.magnet import MagnetModel, parameter_groups
from magnet_dist.model.schedule import ScheduleState

NU, NI, D = 4, 5, 4


def _graph():
    tu = torch.tensor([0, 0, 1, 2, 3, 3])
    ti = torch.tensor([0, 1, 1, 2, 3, 4])
    cs, cd = torch.tensor([0, 1, 2, 4]), torch.tensor([1, 0, 4, 2])
    hop = full_graph_hop(NU, NI, tu, ti, cs, cd, torch.tensor([0.8, 0.8, 0.3, 0.3]))
    is_item = torch.arange(NU + NI) >= NU
    return hop, is_item


def _reps(model, emb, feats):
    hop, is_item = _graph()
    h = model.encode([hop] * model.cfg.model.layers, emb, feats, is_item, is_item)
    return {m: v[:NU] for m, v in h.items()}, {m: v[NU:] for m, v in h.items()}


def _all_pairs(hu, hi):
    return (
        {m: v.repeat_interleave(NI, 0) for m, v in hu.items()},
        {m: v.repeat(NU, 1) for m, v in hi.items()},
    )


@pytest.mark.parametrize("weights", ["learned", "behaviour"])
def test_model_starts_as_the_id_lightgcn(weights):
    """With the content view off, content weight 0 and the read-out at 0, MAGNET's score at
    initialisation is the ID-only LightGCN's score of the same ID embeddings, pair by pair."""
    torch.manual_seed(0)
    emb = torch.randn(NU + NI, D)
    feats = {"text": torch.randn(NU + NI, 3), "meta": torch.randn(NU + NI, 2)}
    ov = [f"model.dim={D}", "model.content_view=false"]
    magnet = MagnetModel(
        load_config(overrides=[*ov, f"model.score_weights={weights}"]),
        {
            "text": 3,
            "meta": 2,
        },
    )
    mean = MagnetModel(load_config(overrides=ov), {"text": 3, "meta": 2})
    mean.load_state_dict(magnet.state_dict(), strict=False)
    lightgcn = MagnetModel(
        load_config(overrides=[*ov, "model.variant=lightgcn", "model.content_channels=false"]),
        {"text": 3, "meta": 2},
    )
    want = pair_score_fn(lightgcn)(*_reps(lightgcn, emb, {}))
    got = pair_score_fn(magnet)(*_reps(magnet, emb, feats))
    assert torch.allclose(got, want, atol=1e-6)
    y, _ = magnet.score(*_all_pairs(*_reps(magnet, emb, feats)))  # the training-time score
    assert torch.allclose(y.view(NU, NI), want, atol=1e-6)
    # the spec's mean over modalities is not the ID LightGCN: the content dots dilute it
    assert not torch.allclose(pair_score_fn(mean)(*_reps(mean, emb, feats)), want, atol=1e-3)


def test_learned_content_weights_get_a_gradient_from_zero():
    torch.manual_seed(1)
    cfg = load_config(overrides=[f"model.dim={D}", "model.score_weights=learned"])
    model = MagnetModel(cfg, {"text": 3})
    assert model.dot_weight.tolist() == [1.0, 0.0]
    reps = lambda n: {m: torch.randn(n, D) for m in model.modalities}  # noqa: E731
    out = model.loss(reps(6), reps(6), reps(6), torch.zeros(1, D), ScheduleState())
    out.loss.backward()
    assert model.dot_weight.grad is not None
    assert model.dot_weight.grad[1].abs() > 0  # the content weight moves off 0
    model.dot_weight.data = torch.tensor([0.7, -0.4])
    hu, hi = reps(3), reps(3)
    want = 0.7 * (hu["behaviour"] * hi["behaviour"]).sum(1) - 0.4 * (hu["text"] * hi["text"]).sum(1)
    assert torch.allclose(model.dot_score(hu, hi), want, atol=1e-6)
    assert torch.allclose(model.dot_matrix(hu, hi).diagonal(), want, atol=1e-6)


@pytest.mark.parametrize("weights", ["mean", "learned", "behaviour"])
def test_retrieval_vectors_give_the_dot_score(weights):
    """Two-stage retrieval ranks by the inner product of these vectors: it must equal the
    model's base score, also with a negative learned weight."""
    torch.manual_seed(2)
    cfg = load_config(overrides=[f"model.dim={D}", f"model.score_weights={weights}"])
    model = MagnetModel(cfg, {"text": 3, "meta": 2})
    if weights == "learned":
        model.dot_weight.data = torch.tensor([1.3, -0.5, 0.2])
    hu = {m: torch.randn(NU, D) for m in model.modalities}
    hi = {m: torch.randn(NI, D) for m in model.modalities}
    run = LoadedRun(None, cfg, None, model, hu, hi, None)
    u, i = run.retrieval_vectors()
    assert torch.allclose(torch.from_numpy(u @ i.T), model.dot_matrix(hu, hi), atol=1e-5)
    # the index holds only the blocks the score reads: the ID block alone in behaviour mode
    assert u.shape[1] == i.shape[1] == D * (1 if weights == "behaviour" else 3)
    assert torch.allclose(
        model.dot_matrix(hu, hi)[:, 0],
        model.dot_score(hu, {m: v[:1].expand(NU, -1) for m, v in hi.items()}),
        atol=1e-5,
    )


def test_head_learning_rate_scale():
    cfg = load_config(overrides=["train.lr=5e-3", "moe.lr_scale=0.1", "moe.weight_decay=1e-4"])
    model = MagnetModel(cfg, {"text": 3})
    rest, head = parameter_groups(model, cfg.moe.weight_decay)
    head_ids = {id(p) for n, p in model.named_parameters() if n.startswith(("moe.", "readout."))}
    assert {id(p) for p in head["params"]} == head_ids
    assert head["lr"] == pytest.approx(5e-4) and head["weight_decay"] == 1e-4
    assert "lr" not in rest  # the embeddings and the encoder keep train.lr
    opt = torch.optim.Adam([rest, head], lr=cfg.train.lr)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3, 5e-4])
    default = MagnetModel(load_config(overrides=["train.lr=5e-3"]), {"text": 3})
    assert all("lr" not in g for g in parameter_groups(default, 0.0))
