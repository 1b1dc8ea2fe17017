"""Fisher merging with mask nodes (FMN): a weighted mean whose weights broadcast each model's mask-node Fisher.

    theta* = sum_j W_j theta_j / sum_j W_j   (elementwise over the body)

W_j = lambda_j x (model j's head/neuron Fisher, normalised, floored and raised to `power`, broadcast to the parameters):

    role (per layer l)            reference broadcast            per_node broadcast
    query, key rows/bias of h     F_head[l, h]                   F_head[l, h]
    value weight rows / bias      mean_h F_head[l]               F_head[l, h] (rows of head h)
    attention-output weight       mean_h F_head[l]               F_head[l, h] (input columns of head h)
    attention-output bias, norm   mean_h F_head[l]               mean_h F_head[l]
    FFN-input rows/bias of j      F_neuron[l, j]                 F_neuron[l, j]
    FFN-output weight             mean_j F_neuron[l]             F_neuron[l, j] (input columns of neuron j)
    FFN-output bias, norm         mean_j F_neuron[l]             mean_j F_neuron[l]
    everything else in the body   U = mean_l (mean_h F_head[l] + mean_j F_neuron[l])   (or plain average)

Where the weights of every model are zero the entry falls back to the lambda-weighted plain average.
The weights normalise, so merging full weights or task vectors gives the same result (no base needed).
Memory: the node Fisher of all models (M x L x (H + F) numbers), one accumulator and one model's tensor.

Defaults (README "Choosing FMN's options honestly"): per_node broadcast, and the normalization (none or unit mean),
the power p (0.25, 0.5, or 0: no Fisher weighting) and the scaling s chosen together on the selection split by the
mean selection score over the tasks (`objective: mean`; `worst_gain` is the alternative): 20 candidates.
`REFERENCE` is the rule above exactly.

`scaling` s (fmn-pl's addition, 1 = the rule above) scales the merged task vector:
theta = theta0 + s (theta* - theta0) = theta0 + s sum_j W_j tau_j / sum_j W_j. A weighted *mean* of task
vectors shrinks each task's own direction by about 1/M; s > 1 restores it, as task arithmetic's lambda does
for a sum. null chooses s from `scalings` on the selection split; `power: null` chooses p from `powers` with it,
`normalize: null` the normalization from `normalizes` (every (normalize, p, s) scored, p = 0 once since it ignores
the Fisher; one more evaluation with worst_gain unless p = 0, s = 1, the average itself, is among them; one merged
task vector and one candidate body are held in memory meanwhile).
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, get_args

import torch

from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option, check_coefficients
from fmn_pl.merging.search import Objective, check_objective, choose_body
from fmn_pl.nodes import adapter_for, node_shape

Normalize = Literal["none", "mean", "type", "layer", "rank"]
Broadcast = Literal["reference", "per_node"]
SCALINGS = [1.0, 1.5, 2.0, 2.5]
POWERS = [0.25, 0.5, 0.0]
NORMALIZES: list[Normalize] = ["none", "mean"]
# The FMN paper's rule (its reference code), as options: what `fmn_reference.yaml` and the study's baseline row set.
REFERENCE = {"broadcast": "reference", "normalize": "none", "power": 1.0, "scaling": 1.0}


def weightings(normalizes: list[str], powers: list[float]) -> list[tuple[str, float]]:
    """(normalize, p) of each distinct weighting, in the order FMN scores them: p = 0 ignores the Fisher, so it
    is one weighting whatever the normalization (listed with the first)."""
    return [(n, p) for n in normalizes for p in powers if p != 0 or n == normalizes[0]]


def normalize_fisher(head: torch.Tensor, neuron: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's node Fisher ([L, H], [L, F]) rescaled so that models of different loss scales compare.

    none: unchanged (reference). mean: divided by its mean over all nodes (heads and neurons together).
    type: heads and neurons each divided by their own mean. layer: each layer's heads and each layer's
    neurons divided by their own mean. A group whose mean is 0 stays 0. rank: each node's percentile among its
    model's nodes of its type, in (0, 1] (ties share their mean rank; a zero Fisher stays 0): scale-free, so a
    task whose loss is on a larger scale (STS-B's MSE) does not take every node.
    """

    def unit(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        m = x.mean() if dim is None else x.mean(dim=dim, keepdim=True)
        return torch.where(m > 0, x / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(x))

    if how == "none":
        return head, neuron
    if how == "mean":
        m = torch.cat([head.reshape(-1), neuron.reshape(-1)]).mean()
        return (head / m, neuron / m) if m > 0 else (head, neuron)
    if how == "type":
        return unit(head), unit(neuron)
    if how == "layer":
        return unit(head, 1), unit(neuron, 1)
    if how == "rank":
        return percentile(head), percentile(neuron)
    raise ValueError(f"fmn normalize must be one of {', '.join(get_args(Normalize))}; got {how!r}")


def percentile(x: torch.Tensor) -> torch.Tensor:
    """Each entry's rank among all entries of `x` divided by their number, in (0, 1]; equal values share their
    mean rank and zeros stay 0 (a node no example depends on keeps no weight)."""
    flat = x.reshape(-1)
    _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)  # sorted ascending
    last = counts.cumsum(0).to(torch.float64)  # 1-based rank of each distinct value's last copy
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = (mean_rank / flat.numel())[inverse]
    return torch.where(flat > 0, ranks, torch.zeros_like(ranks)).reshape(x.shape).to(x.dtype)


def universal_weight(head: torch.Tensor, neuron: torch.Tensor) -> torch.Tensor:
    """U = mean over layers of (mean head Fisher + mean neuron Fisher): the weight of embeddings and pooler."""
    return (head.mean(1) + neuron.mean(1)).mean()


def _check_options(
    grid: list[str],
    normalize: str | None,
    normalizes: list[Normalize],
    epsilon: float,
    power: float | None,
    powers: list[float],
    scaling: float | None,
    scalings: list[float],
) -> None:
    """Refuse FMN options out of their range by name (`grid`: the normalizations to try), before any setup."""
    if not grid or any(n not in get_args(Normalize) for n in grid):
        raise ValueError(
            f"fmn normalize and normalizes must be among {', '.join(get_args(Normalize))}; "
            f"got {normalize!r} and {normalizes!r}"
        )
    if epsilon < 0:
        raise ValueError(f"fmn epsilon must be >= 0, got {epsilon}")
    if power is not None and power < 0 or not powers or min(powers) < 0:
        raise ValueError(f"fmn power and powers must be >= 0, got {power} and {powers}")
    if scaling is not None and scaling <= 0 or not scalings or min(scalings) <= 0:
        raise ValueError(f"fmn scaling and scalings must be > 0, got {scaling} and {scalings}")


class FMN(MergeMethod):
    """Fisher merging with mask nodes: a weighted mean by each model's head/neuron Fisher (`mask_fisher`)."""

    needs = frozenset({"mask_fisher"})

    schema = (
        Option("broadcast", "Broadcast", "per_node", "node Fisher by layer mean (reference) or by own node."),
        Option("normalize", "Normalize | None", None, "per-model Fisher scaling (`Normalize`); null: chosen."),
        Option("normalizes", "list[Normalize]", NORMALIZES, "the grid `normalize` is chosen from when null."),
        Option("universal", "bool", True, "weight non-layer body tensors by the universal Fisher (false: average)."),
        Option("epsilon", "float", 0.0, "floor on every (normalised) node Fisher (0: reference)."),
        Option("coefficients", "list[float] | None", None, "per-model multipliers of the weights (None: all 1)."),
        Option("scaling", "float | None", None, "s in theta0 + s (theta* - theta0); 1: reference; null: chosen."),
        Option("scalings", "list[float]", SCALINGS, "the grid s is chosen from when `scaling` is null."),
        Option("power", "float | None", None, "p in W = F^p: 1 reference, 0 equal weights; null: chosen."),
        Option("powers", "list[float]", POWERS, "the grid p is chosen from when `power` is null."),
        Option("objective", "Objective", "mean", "what a chosen s (and p) maximises: mean or worst_gain."),
    )

    def __init__(
        self,
        broadcast: Broadcast = "per_node",
        normalize: Normalize | None = None,
        normalizes: list[Normalize] = NORMALIZES,
        universal: bool = True,
        epsilon: float = 0.0,
        coefficients: list[float] | None = None,
        scaling: float | None = None,
        scalings: list[float] = SCALINGS,
        power: float | None = None,
        powers: list[float] = POWERS,
        objective: Objective = "mean",
    ) -> None:
        """Defaults: normalization, p and s chosen on the selection split by the mean score (`REFERENCE`: the paper).

        Args:
            broadcast: reference = value/attention-output/FFN-output weights by the layer's mean node Fisher;
                per_node = value rows, attention-output input columns and FFN-output input columns by their own node.
            normalize: per-model Fisher scaling before merging: none (reference), mean (unit mean over all its
                nodes), type (unit mean of heads and of neurons separately), layer (unit mean per layer and node type),
                rank (each node's percentile among the model's heads, or neurons: scale-free). null chooses it
                from `normalizes` on the selection split, with p and s (p = 0 is one candidate: no Fisher in it).
            normalizes: the grid the normalization is chosen from when `normalize` is null.
            universal: weight embeddings, pooler and other non-layer body tensors by the universal Fisher U
                (mean over layers of mean head + mean neuron Fisher); false = plain average there.
            epsilon: floor on every (normalised) node Fisher, so near-zero sums cannot blow up; 0 = reference
                (entries where every model's weight is exactly 0 fall back to the plain average).
            coefficients: per-model multipliers lambda_j of the weights, one per checkpoint (None: all 1).
            scaling: s in theta0 + s (theta* - theta0); 1 = the reference rule (no base model needed); null
                chooses s from `scalings` on the selection split by `objective` (needs the base model).
            scalings: the grid s is chosen from when `scaling` is null.
            power: p in W = F^p (fmn-pl's addition): 1 = reference; 0 = equal weights (the plain average, or task
                arithmetic with lambda = s / M); between, one task's much larger Fisher dominates less. null
                chooses p from `powers` on the selection split, together with s when that is null too.
            powers: the grid p is chosen from when `power` is null (every p with every s of `scalings`).
            objective: what a chosen s (and p) maximises: mean (the mean selection score over the tasks) or
                worst_gain (the smallest gain over the plain average among the tasks, then the mean; the average
                is scored too unless it is a candidate: p = 0, s = 1).
        """
        if broadcast not in ("reference", "per_node"):
            raise ValueError(f"fmn broadcast must be 'reference' or 'per_node', got {broadcast!r}")
        self.normalize, self.normalizes = normalize, list(normalizes)
        _check_options(self.normalize_grid(), normalize, normalizes, epsilon, power, powers, scaling, scalings)
        self.broadcast, self.universal = broadcast, universal
        self.epsilon, self.coefficients, self.power, self.powers = epsilon, coefficients, power, list(powers)
        self.scaling, self.scalings = scaling, list(scalings)
        self.objective = check_objective(objective, "fmn")
        if scaling != 1.0:  # an instance's needs: the base model for the task vectors
            self.needs = frozenset({"mask_fisher", "base"})
        self._c: torch.Tensor = torch.ones(0)
        self._fisher: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # normalize -> [M, L, H], [M, L, F], floored
        self._head: torch.Tensor = torch.zeros(0)  # [M, L, H], raised to the power in use
        self._neuron: torch.Tensor = torch.zeros(0)  # [M, L, F]
        self._roles: dict[str, tuple[str, int, str]] = {}  # key -> (role, layer, "weight" | "bias")

    # -- setup: node Fisher of every model, parameter roles -------------------------------------------
    def setup(self, ctx: MergeContext) -> None:
        self._c = torch.tensor(check_coefficients(self.coefficients, ctx.num_models, "fmn"), dtype=torch.float64)
        L, H, F = node_shape(ctx.config)
        raw = []
        for i in range(ctx.num_models):
            art = ctx.artifact(i, "mask_fisher")
            head, neuron = art.get("head").double(), art.get("neuron").double()
            for name, t, shape in (("head", head, (L, H)), ("neuron", neuron, (L, F))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{art.path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
            if (head < 0).any() or (neuron < 0).any():
                raise ValueError(f"{art.path}: Fisher values must be >= 0")
            raw.append((head, neuron))
        self._fisher = {}
        for how in self.normalize_grid():
            pairs = [normalize_fisher(head, neuron, how) for head, neuron in raw]
            self._fisher[how] = (
                torch.stack([h.clamp_min(self.epsilon) for h, _ in pairs]),
                torch.stack([n.clamp_min(self.epsilon) for _, n in pairs]),
            )
        self._roles = parameter_roles(ctx.config, ctx.body_prefix, ctx.keys)
        self.use_weights(self.normalize_grid()[0], self.powers[0] if self.power is None else self.power, ctx)

    def normalize_grid(self) -> list[str]:
        return list(self.normalizes) if self.normalize is None else [self.normalize]

    def use_weights(self, normalize: str, p: float, ctx: MergeContext) -> None:
        """Weights from the `normalize`d node Fisher raised to p (0 ** 0 = 1: power 0 is the plain average); the
        weights in use are what `ctx.notes["fmn"]` describes."""
        head, neuron = self._fisher[normalize]
        self._head, self._neuron = head.pow(p), neuron.pow(p)
        ctx.notes["fmn"] = {
            "normalize": normalize,
            "power": p,
            "universal_weights": [float(universal_weight(h, n)) for h, n in zip(self._head, self._neuron)],
            "mean_head_fisher": [float(h.mean()) for h in self._head],
            "mean_neuron_fisher": [float(n.mean()) for n in self._neuron],
            "universal_keys": [k for k in ctx.keys if k not in self._roles],
        }

    # -- weights --------------------------------------------------------------------------------------
    def weights(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """[M, ...] float64 weights broadcastable to a tensor of `shape` (before the zero fallback)."""
        M = len(self._c)
        role = self._roles.get(key)
        if role is None:
            if not self.universal:
                w = torch.ones(M, dtype=torch.float64)
            else:
                w = torch.stack([universal_weight(h, n) for h, n in zip(self._head, self._neuron)])
            return _expand(w * self._c, len(shape))
        name, layer, kind = role
        head, neuron = self._head[:, layer], self._neuron[:, layer]  # [M, H], [M, F]
        per_node = self.broadcast == "per_node"
        if name in ("query", "key") or (name == "value" and per_node):
            w = _rows(head, shape[0], key)
        elif name == "attn_out" and per_node and kind == "weight":
            w = _rows(head, shape[1], key).unsqueeze(1)  # input columns of each head: [M, 1, in]
            return w * _expand(self._c, 2)
        elif name == "ffn_in":
            w = _rows(neuron, shape[0], key)
        elif name == "ffn_out" and per_node and kind == "weight":
            w = _rows(neuron, shape[1], key).unsqueeze(1)
            return w * _expand(self._c, 2)
        elif name in ("value", "attn_out", "attn_norm"):
            w = head.mean(1)
        else:  # ffn_out, ffn_norm
            w = neuron.mean(1)
        if w.dim() == 1:  # one number per model
            return _expand(w * self._c, len(shape))
        w = w * self._c[:, None]  # [M, rows]
        return w.reshape(M, shape[0], *([1] * (len(shape) - 1)))

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        fixed = self.normalize is not None and self.power is not None
        if fixed and self.scaling == 1.0:
            yield from super().merge(ctx)
            return
        if fixed and self.scaling is not None:
            for key, merged in super().merge(ctx):
                base = ctx.base(key)
                yield key, merged.sub_(base).mul_(self.scaling).add_(base)
            return
        # choose (normalize, p) and/or s on the selection split; the merged task vector of one weighting is held
        # in memory at a time (with s = 1 the merged bodies themselves: no base model needed)
        origin = (lambda key: ctx.base(key, keep=True)) if self.scaling != 1.0 else (lambda key: 0.0)
        self.setup(ctx)
        norms = self.normalize_grid()
        powers = self.powers if self.power is None else [self.power]
        scalings = self.scalings if self.scaling is None else [self.scaling]
        held: dict[tuple[str, float], dict[str, torch.Tensor]] = {}

        def vector(w: tuple[str, float]) -> dict[str, torch.Tensor]:
            if w not in held:
                held.clear()
                self.use_weights(*w, ctx)
                held[w] = {key: self.merge_tensor(key, ctx.models(key), ctx).sub_(origin(key)) for key in ctx.keys}
            return held[w]

        named = self.normalize is None or self.power is None  # else the key is s itself, as task arithmetic's

        def key_of(n: str, p: float, s: float) -> Any:  # e.g. "normalize=mean p=0.25 s=2.0" (p = 0: no normalize)
            if not named:
                return s
            return (
                (f"normalize={n} " if self.normalize is None and p != 0 else "")
                + (f"p={p} " if self.power is None else "")
                + f"s={s}"
            )

        grid = {key_of(n, p, s): (n, p, s) for n, p in weightings(norms, powers) for s in scalings}
        candidates = {
            key: lambda n=n, p=p, s=s: {k: origin(k) + s * v for k, v in vector((n, p)).items()}
            for key, (n, p, s) in grid.items()
        }
        # p = 0, s = 1 is the plain average when the coefficients are equal: its scores are worst_gain's reference
        equal = self.coefficients is None or len(set(self.coefficients)) == 1
        average = next((key for key, (_, p, s) in grid.items() if (p, s) == (0.0, 1.0)), None) if equal else None
        best, measured = choose_body(
            ctx, candidates, "fmn", self.objective, average=average, describe=lambda key: key if named else f"s={key}"
        )
        n, p, s = grid[best]
        vec = vector((n, p))  # the last weighting built, so the notes describe the chosen weights
        held.clear()
        ctx.choose("fmn", "scaling", s, scalings, **measured)
        self._note_choice(ctx, (n, norms), (p, powers), s)
        for key in ctx.keys:
            yield key, vec.pop(key).mul_(s).add_(origin(key))

    def _note_choice(
        self, ctx: MergeContext, normalize: tuple[str, list[str]], power: tuple[float, list[float]], s: float
    ) -> None:
        """Record the chosen normalization and p (each with its grid) where they were chosen, and say so when
        p = 0 was chosen: no Fisher weighting is left in the merged body."""
        (n, norms), (p, powers) = normalize, power
        if self.power is None:
            ctx.choose("fmn", "power", p, powers)
        if self.normalize is None:
            ctx.choose("fmn", "normalize", n, norms)
        if p == 0:  # say what the chosen body is: no Fisher weighting is left in it
            ctx.remark(
                "fmn: the selection split chose power 0, the unweighted merge: "
                + (
                    "the plain average itself (no candidate scored better)"
                    if s == 1
                    else f"task arithmetic with lambda = s / {ctx.num_models} = {s / ctx.num_models:g}"
                )
            )

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        shape = tuple(ctx.readers[0].shape(key))
        w = self.weights(key, shape)
        total = w.sum(0, keepdim=True)
        if (total == 0).any():  # nodes with zero Fisher in every model: plain (lambda-weighted) average
            w = torch.where(total == 0, _expand(self._c, w.dim() - 1).expand_as(w), w)
            total = w.sum(0, keepdim=True)
        share = (w / total).float()
        acc: torch.Tensor | None = None
        for j in range(len(models)):
            theta = models[j]
            acc = theta * share[j] if acc is None else acc.addcmul_(theta, share[j])
            del theta  # before the next model's tensor is read
        assert acc is not None
        return acc


def _expand(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """[M] -> [M, 1, ..., 1] with `ndim` trailing singleton dimensions."""
    return w.reshape(-1, *([1] * ndim))


def _rows(node: torch.Tensor, size: int, key: str) -> torch.Tensor:
    """[M, N] node weights -> [M, size] with each node repeated over its size // N consecutive entries."""
    n = node.shape[1]
    if size % n:
        raise ValueError(f"{key}: dimension {size} is not a multiple of the {n} mask nodes of its layer")
    return node.repeat_interleave(size // n, dim=1)


def parameter_roles(config: object, body_prefix: str, keys: list[str]) -> dict[str, tuple[str, int, str]]:
    """{key: (role, layer, "weight" | "bias")} for every body tensor of a mask-node module; others are universal."""
    adapter = adapter_for(config)
    layers = node_shape(config)[0]
    base = body_prefix.rstrip(".")
    present = set(keys)
    roles = {}
    for layer in range(layers):
        prefix = adapter.layer_prefix(base, layer) if base else f"{adapter.layers}.{layer}."
        for role, path in adapter.roles().items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{path}.{kind}"
                if key in present:
                    roles[key] = (role, layer, kind)
    return roles
