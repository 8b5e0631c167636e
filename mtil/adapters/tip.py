"""Tip-Adapter's and Tip-X's logits, and the head that carries a cache into evaluation and checkpoints.

With ``f`` a query's L2-normalised image features, ``W`` the C x D zero-shot text weights (template ensembles,
here stored D x C as mtil's zero-shot heads are), ``s`` the model's logit scale, ``Keys`` the M x D cache keys and
``Values`` the M x C one-hot labels of the cache images::

    A      = f · Keysᵀ                                  (M affinities per query)
    logits = s · f · Wᵀ + α · exp(−β (1 − A)) · Values  [+ γ · X]

**Names.** In mtil α is always the *weight* of the cache term and β its *sharpness*, as written above. The
Tip-Adapter paper and its public code swapped the names α and β against each other (the project's reference notes
record it), so read their tables and configuration files by role (weight vs sharpness), not by letter.

**Tip-X** (SuS-X) adds ``γ · X`` where ``X = −R(KL) · Values`` and, for query ``i`` and cache image ``j``,

* ``p_i = softmax(f_i · Wᵀ / T)`` and ``q_j = softmax(k_j · Wᵀ / T)`` are zero-shot class distributions over the
  C classes, with cosine similarities (not multiplied by ``s``) and temperature ``T = 0.5``; ``k_j`` are the cache
  image's own (averaged, normalised, original) features, so ``q`` is fixed when the keys are;
* ``KL_ij = Σ_c p_ic (log p_ic − log q_jc)`` = KL(query ‖ cache image);
* ``R`` maps KL linearly from the range ``[kl_min, kl_max]`` onto the range ``[a_min, a_max]`` of the affinities
  ``A`` (the original scales by the min and max over the whole test set, which makes a query's logits depend on
  the other queries; mtil fixes the four numbers once, from the validation queries against the cache, so a head
  is a function of one query). The sign: a cache image whose class distribution is close to the query's (small
  KL) gets a large ``−R(KL)``, so ``X``, like ``A``, says "similar" with larger numbers. With a cache of K images
  per class (what the few-shot protocol builds), ``R``'s offset adds the same amount to every class and changes
  no ranking; its slope is what γ weighs.

``γ = 0`` gives Tip-Adapter exactly; ``α = 0`` (and ``γ = 0``) gives the zero-shot logits times ``s``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtil.models.heads import Head, register_head

TIPX_TEMPERATURE = 0.5


def zero_shot_logits(features: torch.Tensor, text_weight: torch.Tensor, logit_scale: torch.Tensor | float
                     ) -> torch.Tensor:
    """``s · f · Wᵀ`` with ``text_weight`` D x C."""
    return logit_scale * (features @ text_weight)


def affinity(features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``A = f · Keysᵀ``: B x M."""
    return features @ keys.T


def cache_logits(affinities: torch.Tensor, values: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """``exp(−β (1 − A)) · Values``: B x C."""
    return torch.exp(-beta * (1.0 - affinities)) @ values


def class_distribution(features: torch.Tensor, text_weight: torch.Tensor,
                       temperature: float = TIPX_TEMPERATURE) -> torch.Tensor:
    """``softmax(f · Wᵀ / T)`` over the classes (cosine similarities, not times the logit scale)."""
    return torch.softmax((features @ text_weight) / temperature, dim=-1)


def kl_matrix(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``KL(p_i ‖ q_j)`` for every row ``i`` of ``p`` (B x C) and ``j`` of ``q`` (M x C): B x M."""
    log_p, log_q = p.clamp_min(eps).log(), q.clamp_min(eps).log()
    return (p * log_p).sum(dim=-1, keepdim=True) - p @ log_q.T


def rescale(values: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Map ``values`` linearly from the range ``source = [lo, hi]`` onto ``target = [lo, hi]`` (a source range of
    zero width maps everything onto the target's low end)."""
    span = source[1] - source[0]
    unit = (values - source[0]) / span if float(span) > 0 else torch.zeros_like(values)
    return target[0] + unit * (target[1] - target[0])


def tipx_term(features: torch.Tensor, text_weight: torch.Tensor, cache_distribution: torch.Tensor,
              values: torch.Tensor, kl_range: torch.Tensor, affinity_range: torch.Tensor,
              temperature: float = TIPX_TEMPERATURE) -> torch.Tensor:
    """Tip-X's ``X = −R(KL(p ‖ q)) · Values`` (B x C); see the module docstring for ``R`` and the sign."""
    kl = kl_matrix(class_distribution(features, text_weight, temperature), cache_distribution)
    return -rescale(kl, kl_range, affinity_range) @ values


def kl_and_affinity_ranges(features: torch.Tensor, affinity_features: torch.Tensor, keys: torch.Tensor,
                           text_weight: torch.Tensor, cache_distribution: torch.Tensor,
                           temperature: float = TIPX_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[min, max]`` of KL and of ``A`` over ``features`` (the validation queries) against the cache: the
    fixed scaling of Tip-X's term (never computed on test queries)."""
    kl = kl_matrix(class_distribution(features, text_weight, temperature), cache_distribution)
    a = affinity(affinity_features, keys)
    return torch.stack([kl.min(), kl.max()]), torch.stack([a.min(), a.max()])


def combine(zero_shot: torch.Tensor, cache: torch.Tensor, alpha: torch.Tensor | float,
            extra: torch.Tensor | None = None, gamma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``zero_shot + α · cache [+ γ · extra]``."""
    logits = zero_shot + alpha * cache
    return logits if extra is None else logits + gamma * extra


def one_hot_values(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The cache values: one row per cache image, its label one-hot, float."""
    return F.one_hot(labels.long(), classes).float()


@register_head
class TipHead(Head):
    """A Tip-Adapter (or Tip-Adapter-F, Tip-X) head for one dataset: zero-shot text weights, cache keys and values,
    the chosen α, β, γ and the logit scale, all as buffers (so :func:`~mtil.models.heads.head_state` saves it as
    plain tensors and ``weights_only`` reads it back).

    **The affinity-features seam** (for the IMO adapter): with ``affinity_split`` set, the features a subclass's
    :meth:`encode` returns are the original features (D columns, the zero-shot term and Tip-X's distributions)
    followed by other features for the affinity ``A`` (the keys' width); :meth:`split_features` cuts them. Such
    a subclass must give its own ``kind`` and ``feature_id``. Without it, one set of features serves both.
    """

    kind = "tip"

    def __init__(self, text_weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 logit_scale: torch.Tensor | float, alpha: float, beta: float, gamma: float = 0.0,
                 cache_distribution: torch.Tensor | None = None, kl_range: torch.Tensor | None = None,
                 affinity_range: torch.Tensor | None = None, temperature: float = TIPX_TEMPERATURE,
                 affinity_split: bool = False):
        super().__init__()
        classes = text_weight.shape[1]
        if values.shape != (keys.shape[0], classes):
            raise ValueError(f"values must be {keys.shape[0]} x {classes}, got {tuple(values.shape)}")
        self.register_buffer("text_weight", text_weight.detach().float().contiguous())
        self.register_buffer("keys", keys.detach().float().contiguous())
        self.register_buffer("values", values.detach().float().contiguous())
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone())
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("gamma", torch.tensor(float(gamma)))
        tipx = cache_distribution is not None
        if tipx and (kl_range is None or affinity_range is None):
            raise ValueError("a Tip-X head needs kl_range and affinity_range with its cache_distribution")
        self.register_buffer("cache_distribution", cache_distribution.detach().float().contiguous() if tipx
                             else torch.zeros(0, classes))
        self.register_buffer("kl_range", kl_range.detach().float().clone() if tipx else torch.zeros(2))
        self.register_buffer("affinity_range", affinity_range.detach().float().clone() if tipx else torch.zeros(2))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("affinity_split", torch.tensor(bool(affinity_split)))

    @property
    def num_classes(self) -> int:
        return self.text_weight.shape[1]

    @property
    def is_tipx(self) -> bool:
        return self.cache_distribution.shape[0] > 0

    def split_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(original features, affinity features): the same tensor twice unless ``affinity_split``."""
        if not bool(self.affinity_split):
            return features, features
        width = self.text_weight.shape[0]
        if features.shape[1] != width + self.keys.shape[1]:
            raise ValueError(f"expected {width} + {self.keys.shape[1]} feature columns, got {features.shape[1]}")
        return features[:, :width], features[:, width:]

    def parts(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of the logits, unweighted: ``zero_shot`` (already times ``s``), ``cache`` and, for Tip-X,
        ``tipx``."""
        original, affine = self.split_features(features.float())
        out = {"zero_shot": zero_shot_logits(original, self.text_weight, self.logit_scale),
               "cache": cache_logits(affinity(affine, self.keys), self.values, self.beta)}
        if self.is_tipx:
            out["tipx"] = tipx_term(original, self.text_weight, self.cache_distribution, self.values,
                                    self.kl_range, self.affinity_range, float(self.temperature))
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        terms = self.parts(features)
        return combine(terms["zero_shot"], terms["cache"], self.alpha, terms.get("tipx"), self.gamma)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> "TipHead":
        tipx = tensors["cache_distribution"].shape[0] > 0
        return cls(tensors["text_weight"], tensors["keys"], tensors["values"], tensors["logit_scale"],
                   float(tensors["alpha"]), float(tensors["beta"]), float(tensors["gamma"]),
                   tensors["cache_distribution"] if tipx else None, tensors["kl_range"] if tipx else None,
                   tensors["affinity_range"] if tipx else None, float(tensors["temperature"]),
                   bool(tensors["affinity_split"]))


def fit_keys(keys: torch.Tensor, original: torch.Tensor, affine: torch.Tensor, labels: torch.Tensor,
             values: torch.Tensor, text_weight: torch.Tensor, logit_scale: float, alpha: float, beta: float, *,
             epochs: int, lr: float, batch_size: int, generator_seed: int,
             on_epoch=None) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Tip-Adapter-F: the keys as parameters, trained with cross-entropy on the Tip-Adapter logits (fixed α, β)
    of the training samples ``original`` / ``affine`` (one row per augmented view of a cache image) for
    ``epochs`` passes in shuffled batches, AdamW (``lr``, eps 1e-4 as the original, weight decay 0.01) and a
    cosine schedule to 0 over all steps. The keys are not renormalised (as the original's linear layer is not).
    Deterministic given ``generator_seed``: the shuffles use their own generator, nothing draws from the global
    RNG. Returns the trained keys and per epoch ``{"epoch", "loss"}`` (plus what ``on_epoch(keys)`` adds)."""
    device = keys.device
    weights = torch.nn.Parameter(keys.detach().clone().float())
    optimizer = torch.optim.AdamW([weights], lr=lr, eps=1e-4)
    per_epoch = -(-labels.numel() // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * per_epoch))
    zero_shot = zero_shot_logits(original, text_weight, logit_scale)
    generator = torch.Generator().manual_seed(int(generator_seed))
    history = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(labels.numel(), generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, labels.numel(), batch_size):
            batch = order[start:start + batch_size]
            logits = combine(zero_shot[batch], cache_logits(affinity(affine[batch], weights), values, beta), alpha)
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * batch.numel()
            seen += batch.numel()
        record = {"epoch": epoch, "loss": total / seen}
        if on_epoch is not None:
            record.update(on_epoch(weights.detach()))
        history.append(record)
    return weights.detach(), history
