"""(IV-A) The triplet-template expert pool: dominant, balanced and complementary templates.

A template says how an expert mixes the per-modality interaction signals ``z_m = h_u^m * h_i^m``
before its MLP. Each expert carries its template, so it works the same on whichever rank
holds it (expert parallelism only moves whole experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn

FAMILIES = ("dominant", "balanced", "complementary")


@dataclass(frozen=True)
class Template:
    family: str  # dominant | balanced | complementary | free
    name: str  # e.g. "D_behaviour", "B_behaviour+text"
    weights: tuple[float, ...]  # modality weights (dominant/balanced); for complementary: others
    pair: tuple[int, int] | None = None  # complementary: the gated pair
    delta: float = 0.0  # complementary: share of the remaining modalities


def build_templates(
    modalities: list[str],
    families: list[str],
    alpha: float = 0.7,
    beta: float = 0.45,
    delta: float = 0.1,
) -> list[Template]:
    """The pool's templates in a fixed order: families in the given order, modalities in order.

    With M modalities: dominant gives M templates (alpha on one, the rest shared equally),
    balanced and complementary give one per pair. With only two modalities the balanced pair
    takes everything (0.5 each) and complementary has no third modality (delta unused).
    """
    m = len(modalities)
    if m < 2:
        raise ValueError("the template pool needs at least two modalities (behaviour + content)")
    out: list[Template] = []
    for family in families:
        if family == "dominant":
            for a in range(m):
                w = [(1 - alpha) / (m - 1)] * m
                w[a] = alpha
                out.append(Template("dominant", f"D_{modalities[a]}", tuple(w)))
        elif family == "balanced":
            for a, b in combinations(range(m), 2):
                rest = m - 2
                pair_w = beta if rest else 0.5
                w = [(1 - 2 * beta) / rest if rest else 0.0] * m
                w[a] = w[b] = pair_w
                out.append(Template("balanced", f"B_{modalities[a]}+{modalities[b]}", tuple(w)))
        elif family == "complementary":
            for a, b in combinations(range(m), 2):
                rest = m - 2
                w = [1.0 / rest if rest else 0.0] * m
                w[a] = w[b] = 0.0
                out.append(
                    Template(
                        "complementary",
                        f"C_{modalities[a]}|{modalities[b]}",
                        tuple(w),
                        pair=(a, b),
                        delta=delta if rest else 0.0,
                    )
                )
        else:
            raise ValueError(f"unknown expert family {family!r}; choose from {FAMILIES}")
    return out


def free_templates(count: int) -> list[Template]:
    """Ablation "free experts": no template, each expert sees the whole token."""
    return [Template("free", f"F_{k}", ()) for k in range(count)]


class TemplateExpert(nn.Module):
    """One expert: its template mixes ``z`` into a d-vector, then an MLP ``d -> d_h -> d``."""

    def __init__(
        self, template: Template, num_modalities: int, dim: int, hidden: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.template = template
        self.num_modalities = num_modalities
        self.dim = dim
        in_dim = num_modalities * dim if template.family == "free" else dim
        if template.family != "free":
            self.register_buffer("modality_weights", torch.tensor(template.weights))
        if template.family == "complementary":
            self.gate = nn.Linear(2 * dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def template_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, M*d]`` token -> ``[n, d]`` (or the raw token for free experts)."""
        t = self.template
        if t.family == "free":
            return x
        z = x.view(x.shape[0], self.num_modalities, self.dim)
        mixed = torch.einsum("nmd,m->nd", z, self.modality_weights)
        return self.complement(z, mixed)

    def complement(self, z: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The template input from ``z [n, M, d]`` and its template-weighted sum ``mixed``:
        ``mixed`` itself, or for a complementary expert its gated pair plus ``delta * mixed``."""
        t = self.template
        if t.family != "complementary":
            return mixed
        a, b = t.pair
        g = torch.sigmoid(self.gate(torch.cat([z[:, a], z[:, b]], dim=1)))
        return (1 - t.delta) * (g * z[:, a] + (1 - g) * z[:, b]) + t.delta * mixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.template_input(x))


def grouped_expert_outputs(
    experts: list[TemplateExpert], x: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Every expert on its own rows of ``x [A, M*d]``: rows sorted by expert, expert ``e`` owning
    the next ``counts[e]`` rows. Returns ``[A, d]`` in the same row order.

    The template mixing of all rows is one elementwise product with the per-row template
    weights (instead of an einsum per expert); each expert's gate and MLP then run on its
    contiguous slice (a view, no gather), so the work is exactly the assigned rows.
    """
    outs = []
    free = experts[0].template.family == "free"
    if free:
        inputs = x
    else:
        z = x.view(x.shape[0], experts[0].num_modalities, experts[0].dim)
        weights = torch.stack([e.modality_weights for e in experts])  # [E, M]
        rows = weights.repeat_interleave(torch.tensor(counts, device=x.device), dim=0)
        inputs = (z * rows.unsqueeze(2)).sum(1)
    # split, not slicing: one SplitBackward concatenates the slices' gradients, where each
    # slice's own backward would fill a full-size zero buffer
    parts = inputs.split(counts)
    zs = parts if free else z.split(counts)
    for expert, count, inp, zp in zip(experts, counts, parts, zs, strict=True):
        if count:
            outs.append(expert.mlp(inp if free else expert.complement(zp, inp)))
    return torch.cat(outs) if outs else x.new_zeros(0, experts[0].dim)


def build_experts(
    modalities: list[str],
    families: list[str],
    experts_per_template: int,
    dim: int,
    hidden: int,
    alpha: float,
    beta: float,
    delta: float,
    use_templates: bool = True,
    dropout: float = 0.0,
) -> list[TemplateExpert]:
    """E = |templates| * p experts; copy j of template t is expert ``t * p + j``."""
    templates = build_templates(modalities, families, alpha, beta, delta)
    if not use_templates:
        templates = free_templates(len(templates))
    return [
        TemplateExpert(t, len(modalities), dim, hidden, dropout)
        for t in templates
        for _ in range(experts_per_template)
    ]
