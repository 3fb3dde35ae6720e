"""An honest-but-curious server reconstructing one client's batch from the tensors the client shares.

Observation (what the server sees of one client, for one batch b of size B):
* FedSGD: g = ∇_θ L(b) for the shared tensors θ (one local step);
* FedAvg: the client runs ``local_steps`` SGD steps of rate η on b, training what its method trains; the server
  sees Δθ and, knowing η and the steps, uses ĝ = Δθ / (−η · steps) (the mean gradient along the path).

Threat models (which tensors travel, what the attacker knows of A, B):

| name      | observes                 | client trains (FedAvg) | attacker's A, B          |
|-----------|--------------------------|------------------------|--------------------------|
| full      | every non-embedding weight | the same             | (no adapters needed)     |
| fedit     | A, B                     | A, B                   | the client's (they travel) |
| ffa       | B                        | B                      | the client's (A frozen, seeded) |
| c-known   | C                        | C                      | the client's (frozen, Fed-SB style) |
| c-private | C                        | A, B, C                | the seeded init (A, B private) |
| head      | head                     | A, B, C, head          | the seeded init          |
| c+head    | C, head                  | A, B, C, head          | the seeded init (celora's default) |

The attacker always knows the tensors the server sent (C, head) and the architecture. Attacks: the span test
(text, where decisive), the embedding optimisation (text otherwise), Inverting Gradients (images), and the head
leak (label, pooled feature). Sequence lengths are known to the attacker (as in TAG/LAMP); labels come from the
head's gradient when the head is observed at batch size 1, and are otherwise given to the attacker (a generous
assumption: it can only overstate leakage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from celora.adapters.inject import adapter_layers, view_names
from celora.errors import CeloraError
from celora.privacy.attacks import ATTACKS
from celora.privacy.attacks.lm_prior import TextPrior
from celora.privacy.metrics import image_scores, summarize, text_scores

Kind = Literal["text", "image"]
TEXT_KEYS = ("rouge1", "rouge2", "rougeL", "token_f1")
IMAGE_KEYS = ("psnr", "ssim")
HEAD_KEYS = ("label_acc", "feature_cos")


@dataclass(frozen=True)
class ThreatModel:
    name: str
    observes: tuple[str, ...]  # "full" or factors among A, B, C, head
    trains: tuple[str, ...]  # what the client trains during a FedAvg local round
    basis_known: bool  # the attacker knows the client's A, B (else it uses the seeded init)
    description: str


THREATS: dict[str, ThreatModel] = {
    t.name: t
    for t in (
        ThreatModel("full", ("full",), ("full",), True, "full fine-tuning gradient (calibration)"),
        ThreatModel("fedit", ("A", "B"), ("A", "B"), True, "FedIT: A and B travel"),
        ThreatModel("ffa", ("B",), ("B",), True, "FFA-LoRA: B travels, A frozen from the seed"),
        ThreatModel("c-known", ("C",), ("C",), True, "C travels, A and B frozen and known (Fed-SB style)"),
        ThreatModel("c-private", ("C",), ("A", "B", "C"), False, "C travels, A and B private (seeded init known)"),
        ThreatModel("head", ("head",), ("A", "B", "C", "head"), False, "only the classifier head travels"),
        ThreatModel("c+head", ("C", "head"), ("A", "B", "C", "head"), False, "C and the head travel (celora default)"),
    )
}


def get_threat(name: str) -> ThreatModel:
    if name not in THREATS:
        raise CeloraError(f"--shared '{name}': unknown (choose from {', '.join(THREATS)})")
    return THREATS[name]


def _full_names(model: nn.Module) -> list[str]:
    """Every weight a full fine-tuning would share, except the embedding tables and the adapters."""
    return [n for n, _ in model.named_parameters() if "embeddings" not in n and ".lora_" not in n]


def factor_names(model: nn.Module, factors: Sequence[str], head_modules: Sequence[str]) -> list[str]:
    """Parameter names of ``factors`` ("full" = every non-embedding weight)."""
    if "full" in factors:
        return _full_names(model)
    if "head" in factors and not head_modules:
        raise CeloraError("--shared: this model has no classifier head to observe")
    return view_names(model, factors, head_modules)


@contextlib.contextmanager
def _grad_only(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Temporarily make exactly ``names`` require grad (restored afterwards)."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    wanted = set(names)
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        yield params
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])


def observe(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    names: Sequence[str],
    train_names: Sequence[str],
    *,
    local_steps: int = 0,
    lr: float = 1e-3,
) -> list[torch.Tensor]:
    """What the server sees: FedSGD (``local_steps = 0``) the gradient of the named tensors; FedAvg their
    change after ``local_steps`` SGD steps of rate ``lr`` on ``train_names`` ∪ ``names``, divided by −lr·steps.
    The model is left as it was."""
    model.eval()
    if local_steps == 0:
        with _grad_only(model, names) as params:
            grads = torch.autograd.grad(loss_fn(model), [params[n] for n in names], allow_unused=True)
        return [torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads, strict=True)]
    trained = list(dict.fromkeys([*train_names, *names]))
    with _grad_only(model, trained) as params:
        before = {n: params[n].detach().clone() for n in trained}
        opt = torch.optim.SGD([params[n] for n in trained], lr=lr)
        try:
            for _ in range(local_steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(model).backward()
                opt.step()
            return [(params[n].detach() - before[n]) / (-lr * local_steps) for n in names]
        finally:
            with torch.no_grad():
                for n in trained:
                    params[n].copy_(before[n])


@contextlib.contextmanager
def attacker_view(model: nn.Module, threat: ThreatModel, seeded: dict[str, torch.Tensor]) -> Iterator[None]:
    """The attacker's copy of the model: the client's A, B replaced by the seeded init when they are private."""
    params = dict(model.named_parameters())
    swap = [] if threat.basis_known else [n for n in params if n.endswith((".lora_A", ".lora_B")) and n in seeded]
    saved = {n: params[n].detach().clone() for n in swap}
    try:
        with torch.no_grad():
            for n in swap:
                params[n].copy_(seeded[n].to(params[n]))
        yield
    finally:
        with torch.no_grad():
            for n in swap:
                params[n].copy_(saved[n])


def span_input(model: nn.Module, threat: ThreatModel, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any] | None:
    """(M, P) for the span test on the first adapted layer (see attacks/span.py), or None (head only)."""
    layers = adapter_layers(model)
    if not layers:
        return None
    name, layer = next(iter(layers.items()))
    if "full" in threat.observes:
        return obs[f"{name}.base.weight"].T, None
    if "A" in threat.observes:
        return obs[f"{name}.lora_A"], None
    if "C" in threat.observes:
        return obs[f"{name}.lora_C"], layer.lora_A.detach()
    if "B" in threat.observes:
        return obs[f"{name}.lora_B"], (layer.lora_A @ layer.lora_C).detach()
    return None


@dataclass
class AttackSettings:
    threat: ThreatModel
    batch_size: int = 1
    local_steps: int = 0  # 0 = FedSGD; > 0 = FedAvg with this many local SGD steps
    lr: float = 1e-3  # the client's η (FedAvg)
    samples: int = 10  # batches attacked
    iterations: int = 200  # optimisation steps of the text / image attacks
    seed: int = 0


@dataclass
class AttackResult:
    rows: list[dict[str, Any]]  # one per batch
    summary: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)  # text pairs or image arrays for the picture
    floor_rows: list[dict[str, float]] = field(default_factory=list)  # random-token scores per batch (text)


def _head_capture(model: nn.Module, head_modules: Sequence[str]) -> tuple[list[torch.Tensor], Any]:
    store: list[torch.Tensor] = []
    if not head_modules:
        return store, None
    head = model.get_submodule(head_modules[-1])
    handle = head.register_forward_hook(lambda _m, inp, _o: store.append(inp[0].detach()))
    return store, handle


def attack_batch(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    kind: Kind,
    settings: AttackSettings,
    head_modules: Sequence[str],
    seeded: dict[str, torch.Tensor],
    *,
    tokenizer: Any = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    prior: TextPrior | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Observe one batch as the server and reconstruct it; returns (metrics row, example)."""
    threat = settings.threat
    names = factor_names(model, threat.observes, head_modules)
    train_names = factor_names(model, threat.trains, head_modules)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(**inputs).logits, labels)

    store, handle = _head_capture(model, head_modules)
    with torch.no_grad():
        model(**inputs)
    if handle is not None:
        handle.remove()
    true_feat = store[0] if store else None
    obs_list = observe(model, loss_fn, names, train_names, local_steps=settings.local_steps, lr=settings.lr)
    obs = dict(zip(names, obs_list, strict=True))
    row: dict[str, Any] = {}
    example: dict[str, Any] = {}
    given = labels
    if "head" in threat.observes:
        hm = head_modules[-1]
        leak = ATTACKS["head"](obs[f"{hm}.weight"], obs[f"{hm}.bias"])
        true_set = sorted(set(labels.tolist()))
        row["label_acc"] = len(set(leak.labels[: len(true_set)]) & set(true_set)) / len(true_set)
        same = labels == leak.labels[0]
        ref = true_feat[same.to(true_feat.device)].mean(0) if true_feat is not None and bool(same.any()) else None
        cos = (
            nn.functional.cosine_similarity(leak.feature.double(), ref.double().cpu(), dim=0)
            if ref is not None
            else None
        )
        row["feature_cos"] = float(cos) if cos is not None else 0.0
        if len(labels) == 1:
            given = torch.tensor([leak.labels[0]], dtype=labels.dtype)
    with attacker_view(model, threat, seeded):
        if kind == "text":
            lengths = [int(n) for n in batch["attention_mask"].sum(1).tolist()]
            ids = batch["input_ids"]
            refs = [ids[j, :n].tolist() for j, n in enumerate(lengths)]
            span = span_input(model, threat, obs)
            span_res = ATTACKS["span"](model, span[0], span[1], lengths) if span is not None else None
            if span_res is not None:
                hyps, start, method = span_res.ids, None, "span"
            else:
                with _grad_only(model, names):
                    opt = ATTACKS["text"](
                        model, names, obs_list, given, lengths, iterations=settings.iterations, seed=seed, prior=prior
                    )
                hyps, start, method = opt.ids, opt.start_ids, "optimisation" if prior is None else "optimisation+lm"
                row["match_loss"], row["match_loss_start"] = opt.loss, opt.start_loss
                if opt.nearest_ids is not None:  # what the same optimisation gives without the prior
                    nearest = _text_metrics(tokenizer, refs, opt.nearest_ids)
                    row.update({f"nearest_{k}": v for k, v in nearest.items()})
                    row["token_loss"], row["token_loss_nearest"] = opt.token_loss, opt.nearest_token_loss
            row.update(_text_metrics(tokenizer, refs, hyps))
            if start is not None:
                row.update({f"start_{k}": v for k, v in _text_metrics(tokenizer, refs, start).items()})
            row["method"] = method
            example = {
                "reference": [tokenizer.decode(r, skip_special_tokens=True) for r in refs],
                "reconstruction": [tokenizer.decode(h, skip_special_tokens=True) for h in hyps],
            }
        else:
            if normalise is None:
                raise CeloraError("image attack: the model's pixel processor is needed")
            pv = batch["pixel_values"]
            truth = _grayscale_truth(pv, normalise)
            shape = tuple(truth.shape)
            span = span_input(model, threat, obs)
            res, method = None, "span"
            if span is not None:
                first = next(iter(adapter_layers(model).values()))
                res = ATTACKS["image-span"](model, first, span[0], span[1], shape, normalise)
            if res is None:
                method = "inverting-gradients"
                with _grad_only(model, names):
                    res = ATTACKS["image"](
                        model, names, obs_list, given, shape, normalise, iterations=settings.iterations, seed=seed
                    )
            rec = res.images.detach().cpu()
            row.update(_matched_image_scores(truth, rec, "") | _matched_image_scores(truth, res.start.cpu(), "start_"))
            row["match_loss"], row["match_loss_start"], row["method"] = res.loss, res.start_loss, method
            example = {"reference": truth.numpy(), "reconstruction": rec.numpy()}
    return row, example


def _matched_image_scores(truth: torch.Tensor, rec: torch.Tensor, prefix: str) -> dict[str, float]:
    """PSNR/SSIM averaged over the batch after matching reconstructions to originals (Hungarian, on PSNR)."""
    from scipy.optimize import linear_sum_assignment

    b = truth.shape[0]
    table = [[image_scores(truth[i, 0].numpy(), rec[j, 0].numpy()) for j in range(b)] for i in range(b)]
    rows, cols = linear_sum_assignment(-np.array([[c["psnr"] for c in r] for r in table]))
    return {
        f"{prefix}{k}": float(np.mean([table[i][j][k] for i, j in zip(rows, cols, strict=True)])) for k in IMAGE_KEYS
    }


def _grayscale_truth(pixel_values: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Invert the pixel normalisation of channel 0: x = (v − normalise(0)) / (normalise(1) − normalise(0))."""
    shape = (1, 1, 1, 1)
    zero = normalise(torch.zeros(shape))[0, 0, 0, 0]
    one = normalise(torch.ones(shape))[0, 0, 0, 0]
    return ((pixel_values[:, :1].detach().cpu() - zero) / (one - zero)).clamp(0, 1)


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _text_metrics(tokenizer: Any, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> dict[str, float]:
    """Scores of the batch: sequences concatenated in batch order (the batch order itself is not attacked)."""
    special = _special_ids(tokenizer)
    ref_ids = [t for r in refs for t in r if t not in special]
    hyp_ids = [t for h in hyps for t in h if t not in special]
    ref_text = " ".join(tokenizer.decode(list(r), skip_special_tokens=True) for r in refs)
    hyp_text = " ".join(tokenizer.decode(list(h), skip_special_tokens=True) for h in hyps)
    return text_scores(ref_text, hyp_text, ref_ids, hyp_ids)


def random_text_floor(
    tokenizer: Any, refs: Sequence[Sequence[int]], vocab: int, rng: np.random.Generator
) -> dict[str, float]:
    """Scores of uniformly random non-special tokens of the same lengths (the floor of the text metrics)."""
    special = _special_ids(tokenizer)
    pool = np.array([i for i in range(vocab) if i not in special])
    hyps = [rng.choice(pool, size=len(r)).tolist() for r in refs]
    return _text_metrics(tokenizer, refs, hyps)


def _eager_attention(model: nn.Module) -> None:
    """Gradient matching differentiates a gradient: fused SDPA kernels have no double backward on CPU."""
    for m in model.modules():
        setter = getattr(m, "set_attn_implementation", None)
        if callable(setter) and hasattr(m, "config"):
            try:
                setter("eager")
            except (ValueError, TypeError, AttributeError):
                continue


def run_attack(
    model: nn.Module,
    data: Any,
    rows: np.ndarray,
    kind: Kind,
    settings: AttackSettings,
    head_modules: Sequence[str],
    seeded: dict[str, torch.Tensor],
    *,
    tokenizer: Any = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    prior: TextPrior | None = None,
) -> AttackResult:
    """Attack ``settings.samples`` disjoint batches of ``rows`` (one client's data); metrics with 95 % intervals."""
    b = settings.batch_size
    if b < 1:
        raise CeloraError(f"--batch-size must be >= 1, got {b}")
    if settings.samples < 1:
        raise CeloraError(f"--samples must be >= 1, got {settings.samples}")
    if len(rows) < b:
        raise CeloraError(f"--batch-size {b}: the client has only {len(rows)} training rows")
    _eager_attention(model)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(rows)
    n = min(settings.samples, len(order) // b)
    out_rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    floor_rows: list[dict[str, float]] = []
    for j in range(n):
        batch = data.batch(order[j * b : (j + 1) * b])
        row, ex = attack_batch(
            model,
            batch,
            kind,
            settings,
            head_modules,
            seeded,
            tokenizer=tokenizer,
            normalise=normalise,
            seed=settings.seed + j,
            prior=prior,
        )
        out_rows.append(row)
        examples.append(ex)
        if kind == "text":
            lengths = batch["attention_mask"].sum(1).tolist()
            refs = [batch["input_ids"][i, : int(m)].tolist() for i, m in enumerate(lengths)]
            vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
            floor_rows.append(random_text_floor(tokenizer, refs, vocab, rng))
        if progress is not None:
            progress(j, row)
    return AttackResult(out_rows, _summary(settings, kind, out_rows, floor_rows), examples, floor_rows)


def _summary(
    settings: AttackSettings, kind: Kind, rows: Sequence[dict[str, Any]], floor_rows: Sequence[dict[str, float]]
) -> dict[str, Any]:
    """Means with 95 % Student-t intervals over the attacked batches (one row each), and the random floor."""
    keys = list(TEXT_KEYS if kind == "text" else IMAGE_KEYS)
    keys += [f"start_{k}" for k in keys] + list(HEAD_KEYS) + ["match_loss", "match_loss_start"]
    if any("nearest_rouge1" in r for r in rows):  # with an LM prior: the same run read off without it
        keys += [f"nearest_{k}" for k in TEXT_KEYS] + ["token_loss", "token_loss_nearest"]
    summary: dict[str, Any] = {
        "threat": settings.threat.name,
        "description": settings.threat.description,
        "kind": kind,
        "batch_size": settings.batch_size,
        "protocol": "fedavg" if settings.local_steps else "fedsgd",
        "local_steps": settings.local_steps,
        "batches": len(rows),
        "examples": len(rows) * settings.batch_size,
        "methods": sorted({str(r.get("method")) for r in rows}),
        "metrics": summarize(rows, keys),
    }
    if floor_rows:
        summary["random_floor"] = summarize(floor_rows, TEXT_KEYS)
    return summary


def merge_results(parts: Sequence[AttackResult], settings: AttackSettings) -> AttackResult:
    """One result from the attacks of several clients (same settings): rows pooled, summary recomputed."""
    if not parts:
        raise CeloraError("merge_results: no attack results to merge")
    kind: Kind = parts[0].summary["kind"]
    rows = [r for p in parts for r in p.rows]
    floor = [r for p in parts for r in p.floor_rows]
    return AttackResult(rows, _summary(settings, kind, rows, floor), [e for p in parts for e in p.examples], floor)
