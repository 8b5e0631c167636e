"""MoE-Adapters' model parts (Yu et al., CVPR 2024): mixture-of-experts adapters beside the MLP of every residual
block of both encoders, a router per task, and DDAS, the autoencoders that pick a router per test image.

**Where.** In every block of both transformers, in parallel with the MLP, on the residual stream after attention
(the official code's ``parallel`` option): ``x <- x + Attn(LN1 x)``, then ``x <- x + MLP(LN2 x) + MoE(x)``. The MoE
reads the *un-normalised* stream ``x``. It is wired in with two forward hooks per block (one on ``ln_2`` keeps
its input, one on ``mlp``, or open_clip's ``ls_2``, adds the MoE's output), so the block's own code runs unchanged
and CLIP's state dict keeps its names: the experts live outside the model (:class:`MoEAdapters`), a checkpoint's
``model`` entry is a plain CLIP. Both back-ends: clip-anytorch's blocks see ``(L, N, D)``, open_clip's (its
``nn.MultiheadAttention`` is ``batch_first``) ``(N, L, D)``; the layout is read from each block's attention.

**Expert** (:class:`Expert`): ``0.1 * up(dropout(relu(down(x))))``, ``down: D -> 64`` (kaiming-uniform, a=sqrt 5,
bias 0), ``up: 64 -> D`` (weight and bias 0, so a fresh expert outputs exactly 0 and CLIP is unchanged), dropout 0.1
on the hidden layer in training only. No residual, no layer norm.

**Router** (per block, encoder and task): ``W_r`` and ``W_noise`` (D x E, zero at init). It reads the sequence's
first token (CLS of the image, SOT of the text) and gives one gate vector per sample, applied to all its tokens:
``logits = x0 W_r`` (+ ``N(0,1) * (softplus(x0 W_noise) + 0.01)`` in training only), the top-k logits (among the
experts the router may use, :attr:`MoELayer.allowed`), a softmax over those k only, scattered into E weights. So the
weights of the chosen experts sum to one and exactly k are non-zero. Only the experts a batch chose run (each on the
samples that chose it), so an expert no sample chose gets no gradient at all, as in the official sparse dispatch.

**Routes.** :meth:`MoEAdapters.routed` sets, per encoder, which router the samples use: None (no adapters: exactly
CLIP), a task index for every sample, or a tensor with one index per sample (-1: none for that sample).

**DDAS** (:class:`TaskSelector`): one autoencoder per task, ``Linear(D, h) -> ReLU -> Linear(h, D)``, on the frozen
CLIP image feature (L2-normalised, times sqrt(D) so its entries are of unit scale). Per image: ``score_t = MSE_t /
threshold_t``; the task of the lowest score routes the image to its router, or to zero-shot CLIP when that score is
above 1 (every error above its task's threshold) or an optional reference autoencoder wins. ``threshold_t`` is a
quantile of task t's own reconstruction errors on held-out training images (a false-rejection rate), or one
absolute threshold on raw errors (the official rule, whose 0.0655 was on AlexNet features).

**Evaluation heads** (:class:`MoERoutedHead`): a small handle (a token and dataset names) to the method's live
:class:`RoutedInference`, which routes each image and scores it against the class prompts encoded through the same
router. The handle is what a checkpoint keeps among the heads; the experts, routers and autoencoders are the
method's state (a resume registers them again under the same token).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.errors import UserError
from mtil.models.heads import Head, register_head

EXPERT_BOTTLENECK = 64  # the official adapter width (hard-coded there)
EXPERT_SCALE = 0.1
EXPERT_DROPOUT = 0.1
NOISE_FLOOR = 0.01  # noise std = softplus(x W_noise) + this
ENCODERS = ("image", "text")
ZERO_SHOT = -1  # the route of "no adapters": exactly CLIP


# ---------------------------------------------------------------------------------------------- blocks
def transformer_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """encoder -> its residual blocks (``visual.transformer.resblocks``, ``transformer.resblocks``); a one-line
    UserError for an image tower without such blocks (a ResNet, a timm tower)."""
    visual = model.visual
    if not hasattr(visual, "transformer"):
        kind = ("a timm tower, whose blocks mtil does not name" if hasattr(visual, "trunk")
                else "a ResNet, which has no transformer blocks")
        raise UserError(f"--method moe-adapters puts experts in the transformer blocks of both encoders, and this "
                        f"model's image encoder is {kind}: use a ViT (clip-anytorch, or open_clip's native ViT)")
    blocks = {"image": list(visual.transformer.resblocks), "text": list(model.transformer.resblocks)}
    for encoder, found in blocks.items():
        for block in found:
            if not (hasattr(block, "ln_2") and hasattr(block, "mlp") and isinstance(block.attn, nn.MultiheadAttention)):
                raise UserError(f"--method moe-adapters needs CLIP's residual blocks (ln_1, attn, ln_2, mlp); the "
                                f"{encoder} encoder has a {type(block).__name__}")
    return blocks


def block_width(block: nn.Module) -> int:
    return int(block.attn.embed_dim)


# ---------------------------------------------------------------------------------------------- experts and routers
class Expert(nn.Module):
    """A bottleneck adapter ``scale * up(dropout(relu(down(x))))``; ``up`` starts at zero (output exactly 0)."""

    def __init__(self, width: int, bottleneck: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        # skip_init: no draw from the global RNG (the straight and the resumed run must draw the same numbers)
        self.down = nn.utils.skip_init(nn.Linear, width, bottleneck, device=device or "cpu")
        self.up = nn.utils.skip_init(nn.Linear, bottleneck, width, device=device or "cpu")
        with torch.no_grad():
            if self.down.weight.device.type != "meta":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5),
                                         generator=generator if self.down.weight.device.type == "cpu" else None)
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.down(x)), EXPERT_DROPOUT, training)
        return EXPERT_SCALE * self.up(hidden)


class MoELayer(nn.Module):
    """The experts and the per-task routers of one block of one encoder.

    Buffers: ``counts[r, e]``: how often router r chose expert e in training (the official rule freezes each task's
    most chosen); ``allowed[r, e]``: the experts router r may choose (all until its task ends; then, under the
    default protection, the ones it chose on its own data, all frozen); ``frozen[e]``: protected experts."""

    def __init__(self, width: int, experts: int, routers: int, top_k: int, bottleneck: int = EXPERT_BOTTLENECK,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top-k {top_k} of {experts} experts")
        self.width, self.top_k = width, top_k
        self.experts = nn.ModuleList([Expert(width, bottleneck, generator, device) for _ in range(experts)])
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(width, experts, device=device))
                                       for _ in range(routers)])
        self.noises = nn.ParameterList([nn.Parameter(torch.zeros(width, experts, device=device))
                                        for _ in range(routers)])
        self.register_buffer("counts", torch.zeros(routers, experts, dtype=torch.long, device=device))
        self.register_buffer("allowed", torch.ones(routers, experts, dtype=torch.bool, device=device))
        self.register_buffer("frozen", torch.zeros(experts, dtype=torch.bool, device=device))
        self.recording: torch.Tensor | None = None  # (E,) bool: which experts were chosen (protection pass)
        self.batch_first = False  # set by MoEAdapters.attach from the block's attention
        self._stream: torch.Tensor | None = None  # the block's post-attention stream, between the two hooks

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def num_routers(self) -> int:
        return len(self.gates)

    def choose(self, first: torch.Tensor, route: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices N x k, weights N x k) of router ``route`` for the first tokens ``first`` (N x D): noisy top-k
        gating in training, clean at test; a softmax over the k chosen logits (float32, outside autocast)."""
        with torch.autocast(first.device.type, enabled=False):
            x0 = first.float()
            logits = x0 @ self.gates[route].float()
            if training:
                std = F.softplus(x0 @ self.noises[route].float()) + NOISE_FLOOR
                logits = logits + torch.randn_like(logits) * std
            logits = logits.masked_fill(~self.allowed[route], float("-inf"))
            top, indices = logits.topk(self.top_k, dim=-1)
            return indices, torch.softmax(top, dim=-1)

    def gate_weights(self, first: torch.Tensor, routes: torch.Tensor | int, training: bool = False) -> torch.Tensor:
        """The dense N x E gate weights (zero rows for samples of route -1)."""
        routes = _per_sample(routes, first.shape[0], first.device)
        weights = first.new_zeros(first.shape[0], self.num_experts, dtype=torch.float32)
        for route in routes.unique().tolist():
            if route < 0:
                continue
            rows = (routes == route).nonzero().squeeze(1)
            indices, w = self.choose(first[rows], route, training)
            weights[rows] = weights[rows].scatter(1, indices, w)
        return weights

    def forward(self, x: torch.Tensor, routes: torch.Tensor | int, training: bool) -> torch.Tensor:
        """The MoE's output for the block's stream ``x`` ((L, N, D), or (N, L, D) when ``batch_first``)."""
        xb = x if self.batch_first else x.transpose(0, 1)  # N x L x D (a view)
        n = xb.shape[0]
        routes = _per_sample(routes, n, x.device)
        out = torch.zeros_like(xb)
        for route in routes.unique().tolist():
            if route < 0:
                continue
            rows = (routes == route).nonzero().squeeze(1)
            indices, weights = self.choose(xb[rows, 0], route, training)
            if training:
                with torch.no_grad():
                    self.counts[route] += torch.bincount(indices.flatten(), minlength=self.num_experts)
            if self.recording is not None:
                self.recording[indices.unique()] = True
            for expert in indices.unique().tolist():
                sample, slot = (indices == expert).nonzero(as_tuple=True)
                where = rows[sample]
                contribution = self.experts[expert](xb[where], training)
                contribution = contribution * weights[sample, slot].to(contribution.dtype)[:, None, None]
                out = out.index_add(0, where, contribution.to(out.dtype))
        return out if self.batch_first else out.transpose(0, 1)


def _per_sample(routes: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(routes, int):
        return torch.full((n,), routes, dtype=torch.long, device=device)
    routes = routes.to(device=device, dtype=torch.long)
    if routes.shape != (n,):
        raise ValueError(f"{routes.numel()} routes for a batch of {n}")
    return routes


def expert_parameters(width: int, bottleneck: int = EXPERT_BOTTLENECK) -> int:
    """Parameters of one expert: down (D x b + b) and up (b x D + D)."""
    return 2 * width * bottleneck + bottleneck + width


class MoEAdapters(nn.Module):
    """Every block's :class:`MoELayer`, per encoder, and the hooks that put them into a CLIP model.

    Not a submodule of the model: ``model.state_dict()`` stays CLIP's. ``routes`` (encoder -> None, an int or a
    per-sample tensor) decides what the hooks do; None (the default) leaves the model exactly CLIP."""

    def __init__(self, widths: dict[str, Sequence[int]], experts: int, routers: int, top_k: int,
                 bottleneck: int = EXPERT_BOTTLENECK, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        make = lambda width: MoELayer(width, experts, routers, top_k, bottleneck, generator)  # noqa: E731
        self.image = nn.ModuleList([make(w) for w in widths["image"]])
        self.text = nn.ModuleList([make(w) for w in widths["text"]])
        if device is not None:
            self.to(device)
        self.routes: dict[str, torch.Tensor | int | None] = {e: None for e in ENCODERS}
        self._handles: list = []
        self._attached: list[nn.Module] = []  # the model the hooks are in (a list: not a submodule)

    @classmethod
    def for_model(cls, model: nn.Module, experts: int, routers: int, top_k: int,
                  bottleneck: int = EXPERT_BOTTLENECK, seed: int = 0) -> "MoEAdapters":
        blocks = transformer_blocks(model)
        device = next(model.parameters()).device
        return cls({e: [block_width(b) for b in blocks[e]] for e in ENCODERS}, experts, routers, top_k, bottleneck,
                   seed, device)

    def settings(self) -> dict[str, object]:
        """What :meth:`from_settings` needs to rebuild this (widths, experts, routers, k, bottleneck)."""
        first = self.image[0]
        return {"widths": {e: [layer.width for layer in self.layers(e)] for e in ENCODERS},
                "experts": first.num_experts, "routers": first.num_routers, "top_k": first.top_k,
                "bottleneck": first.experts[0].down.out_features}

    @classmethod
    def from_settings(cls, settings: dict) -> "MoEAdapters":
        return cls({e: list(settings["widths"][e]) for e in ENCODERS}, int(settings["experts"]),
                   int(settings["routers"]), int(settings["top_k"]), int(settings["bottleneck"]))

    def layers(self, encoder: str) -> nn.ModuleList:
        return self.image if encoder == "image" else self.text

    def all_layers(self) -> Iterator[tuple[str, int, MoELayer]]:
        for encoder in ENCODERS:
            for index, layer in enumerate(self.layers(encoder)):
                yield encoder, index, layer

    @property
    def model(self) -> nn.Module | None:
        return self._attached[0] if self._attached else None

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """Hook the layers into ``model``'s blocks (again after :meth:`detach`; a no-op when already there) and move
        the layers to its device."""
        if self.model is model:
            return
        self.detach()
        blocks = transformer_blocks(model)
        for encoder in ENCODERS:
            if len(blocks[encoder]) != len(self.layers(encoder)):
                raise ValueError(f"the model's {encoder} encoder has {len(blocks[encoder])} blocks, the adapters "
                                 f"{len(self.layers(encoder))}")
            for block, layer in zip(blocks[encoder], self.layers(encoder)):
                if block_width(block) != layer.width:
                    raise ValueError(f"a {encoder} block of width {block_width(block)} for an adapter of width "
                                     f"{layer.width}")
                layer.batch_first = bool(block.attn.batch_first)
                self._handles.append(block.ln_2.register_forward_pre_hook(self._keep_stream(encoder, layer)))
                target = block.ls_2 if hasattr(block, "ls_2") else block.mlp  # open_clip scales the MLP by ls_2
                self._handles.append(target.register_forward_hook(self._add_output(encoder, layer, block)))
        self.to(next(model.parameters()).device)
        self._attached = [model]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._attached = [], []

    def _keep_stream(self, encoder: str, layer: MoELayer):
        def hook(module, args):
            layer._stream = args[0] if self.routes[encoder] is not None else None
        return hook

    def _add_output(self, encoder: str, layer: MoELayer, block: nn.Module):
        def hook(module, args, output):
            stream, layer._stream = layer._stream, None
            routes = self.routes[encoder]
            if stream is None or routes is None:
                return None
            return output + layer(stream, routes, block.training)
        return hook

    @contextlib.contextmanager
    def routed(self, image: torch.Tensor | int | None = None, text: torch.Tensor | int | None = None):
        """Within the block, the image and text encoders use these routes (None: no adapters; -1 likewise)."""
        before = dict(self.routes)
        self.routes = {"image": _route_or_none(image), "text": _route_or_none(text)}
        try:
            yield
        finally:
            self.routes = before

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Records which experts every layer chooses inside the block: (encoder, index) -> (E,) bool."""
        records = {}
        for encoder, index, layer in self.all_layers():
            layer.recording = torch.zeros(layer.num_experts, dtype=torch.bool, device=layer.frozen.device)
            records[(encoder, index)] = layer.recording
        try:
            yield records
        finally:
            for _, _, layer in self.all_layers():
                layer.recording = None

    # ------------------------------------------------------------------ training and protection
    def set_trainable(self, route: int) -> None:
        """Only router ``route`` (gate and noise) and the unprotected experts require grad."""
        for _, _, layer in self.all_layers():
            for e, expert in enumerate(layer.experts):
                expert.requires_grad_(not bool(layer.frozen[e]))
            for r in range(layer.num_routers):
                layer.gates[r].requires_grad_(r == route)
                layer.noises[r].requires_grad_(r == route)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _route_or_none(route: torch.Tensor | int | None) -> torch.Tensor | int | None:
    if route is None or (isinstance(route, int) and route < 0):
        return None
    return route


def moe_parameter_count(widths: dict[str, Sequence[int]], experts: int, bottleneck: int = EXPERT_BOTTLENECK,
                        frozen: dict[str, Sequence[int]] | None = None) -> int:
    """Trainable parameters of one task by the formula: per block, the unfrozen experts plus one router and its
    noise matrix (2 D E)."""
    total = 0
    for encoder in ENCODERS:
        for index, width in enumerate(widths[encoder]):
            locked = frozen[encoder][index] if frozen is not None else 0
            total += (experts - locked) * expert_parameters(width, bottleneck) + 2 * width * experts
    return total


# ---------------------------------------------------------------------------------------------- DDAS
class AutoEncoder(nn.Module):
    """``Linear(D, h) -> ReLU -> Linear(h, D)``, initialised from a generator (no global RNG draw)."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.encoder = nn.utils.skip_init(nn.Linear, dim, hidden, device="cpu")
        self.decoder = nn.utils.skip_init(nn.Linear, hidden, dim, device="cpu")
        with torch.no_grad():
            for linear in (self.encoder, self.decoder):
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(linear.in_features)
                linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.relu(self.encoder(z)))

    def errors(self, z: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared reconstruction error."""
        return (self(z) - z).pow(2).mean(dim=1)


def selector_input(features: torch.Tensor) -> torch.Tensor:
    """What the autoencoders read: the L2-normalised image feature times sqrt(D) (entries of unit scale)."""
    features = F.normalize(features.float(), dim=-1)
    return features * math.sqrt(features.shape[-1])


def fit_autoencoder(z: torch.Tensor, hidden: int, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3,
                    holdout: float = 0.2, quantile: float = 0.95) -> tuple[AutoEncoder, float, dict[str, float]]:
    """Train an autoencoder on ``z`` (rows from :func:`selector_input`) with Adam, from ``seed`` only; returns it,
    the ``quantile`` of its errors on the held-out rows (the last ``holdout`` share of a seeded permutation; all
    rows when there are fewer than 10) and a summary."""
    generator = torch.Generator().manual_seed(int(seed))
    z = z.detach().float().cpu()
    order = torch.randperm(len(z), generator=generator)
    held = int(len(z) * holdout) if len(z) >= 10 else 0
    fit_rows, held_rows = (order[:len(z) - held], order[len(z) - held:]) if held else (order, order)
    ae = AutoEncoder(z.shape[1], hidden, generator)
    optimiser = torch.optim.Adam(ae.parameters(), lr=lr)
    train = z[fit_rows]
    with torch.enable_grad():
        for _ in range(steps):
            batch = train[torch.randint(0, len(train), (min(batch_size, len(train)),), generator=generator)]
            loss = F.mse_loss(ae(batch), batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    ae.requires_grad_(False)
    with torch.no_grad():
        errors = ae.errors(z[held_rows])
        threshold = float(torch.quantile(errors, quantile))
        fit_error = float(ae.errors(train).mean())
    return ae, threshold, {"images": len(z), "held_out": held, "fit_mse": fit_error,
                           "held_out_mse": float(errors.mean()), "threshold": threshold}


class TaskSelector(nn.Module):
    """DDAS: one autoencoder per trained task (slot t = router t), and optionally one on reference data whose win
    routes to zero-shot. ``absolute`` None: relative scores (error / the task's own threshold, zero-shot above 1);
    a number: raw errors against that one threshold (the official rule)."""

    def __init__(self, absolute: float | None = None):
        super().__init__()
        self.autoencoders = nn.ModuleList()
        self.thresholds: list[float] = []
        self.reference: AutoEncoder | None = None
        self.reference_threshold = math.inf
        self.absolute = absolute

    def __len__(self) -> int:
        return len(self.autoencoders)

    def add(self, ae: AutoEncoder, threshold: float) -> None:
        self.autoencoders.append(ae.to(self._device()))
        self.thresholds.append(float(threshold))

    def set_reference(self, ae: AutoEncoder, threshold: float) -> None:
        self.reference = ae.to(self._device())
        self.reference_threshold = float(threshold)

    def _device(self) -> torch.device:
        return next(self.parameters()).device if any(True for _ in self.parameters()) else torch.device("cpu")

    @torch.no_grad()
    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """N x T: each task's error, divided by its threshold unless ``absolute``."""
        with torch.autocast(z.device.type, enabled=False):
            errors = torch.stack([ae.errors(z.float()) for ae in self.autoencoders], dim=1)
        if self.absolute is not None:
            return errors
        return errors / torch.tensor(self.thresholds, device=errors.device).clamp_min(1e-12)

    @torch.no_grad()
    def route(self, features: torch.Tensor) -> torch.Tensor:
        """One route per image of CLIP's ``features``: the best task, or -1 (zero-shot)."""
        z = selector_input(features)
        self.to(z.device)
        if len(self) == 0:
            return torch.full((len(z),), ZERO_SHOT, dtype=torch.long, device=z.device)
        scores = self.scores(z)
        best, task = scores.min(dim=1)
        limit = self.absolute if self.absolute is not None else 1.0
        zero = best > limit
        if self.reference is not None:
            with torch.autocast(z.device.type, enabled=False):
                ref = self.reference.errors(z)
            ref = ref if self.absolute is not None else ref / max(self.reference_threshold, 1e-12)
            zero = zero | (ref < best)
        return torch.where(zero, torch.full_like(task, ZERO_SHOT), task)

    def selector_state(self) -> dict:
        return {"autoencoders": [{k: v.detach().cpu().clone() for k, v in ae.state_dict().items()}
                                 for ae in self.autoencoders],
                "thresholds": list(self.thresholds),
                "reference": None if self.reference is None else
                {k: v.detach().cpu().clone() for k, v in self.reference.state_dict().items()},
                "reference_threshold": self.reference_threshold if self.reference is not None else None}

    @torch.no_grad()
    def load_selector_state(self, state: dict) -> None:
        def build(tensors: dict) -> AutoEncoder:
            dim, hidden = tensors["decoder.weight"].shape
            ae = AutoEncoder(dim, hidden)
            ae.load_state_dict(tensors)
            return ae.requires_grad_(False)

        device = self._device()
        self.autoencoders = nn.ModuleList([build(t).to(device) for t in state["autoencoders"]])
        self.thresholds = [float(t) for t in state["thresholds"]]
        self.reference = None if state.get("reference") is None else build(state["reference"]).to(device)
        self.reference_threshold = math.inf if self.reference is None else float(state["reference_threshold"])


# ---------------------------------------------------------------------------------------------- routed inference
_LIVE: "weakref.WeakValueDictionary[str, RoutedInference]" = weakref.WeakValueDictionary()


class RoutedInference:
    """Test-time MoE-Adapters: each image's route from DDAS on CLIP's own feature, the image re-encoded through
    that router (a zero-shot image keeps CLIP's feature), and class prompts encoded through the same router
    (CLIP's own text features for zero-shot). Registered under ``token`` so checkpointed heads find it again.

    ``classes_of(dataset) -> (classnames, templates)``; ``autocast() -> context``: the evaluation's arithmetic."""

    def __init__(self, moe: MoEAdapters, selector: TaskSelector, token: str,
                 classes_of: Callable[[str], tuple[list[str], list[str]]],
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.moe, self.selector, self.classes_of, self.autocast = moe, selector, classes_of, autocast
        self._text: dict[tuple[str, int], torch.Tensor] = {}
        self.token = ""
        self.register(token)

    def register(self, token: str) -> None:
        if self.token and _LIVE.get(self.token) is self:
            del _LIVE[self.token]
        self.token = token
        _LIVE[token] = self

    def invalidate(self) -> None:
        """The weights moved: class-prompt features are encoded again when next asked."""
        self._text.clear()

    @torch.no_grad()
    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """N x (D + 1): each image's L2-normalised feature through its route, then the route (-1: zero-shot)."""
        self.moe.attach(model)
        with self.moe.routed():
            features = F.normalize(model.encode_image(images).float(), dim=-1)
        routes = self.selector.route(features)
        chosen = routes >= 0
        if bool(chosen.any()):
            with self.moe.routed(image=routes[chosen]):
                features[chosen] = F.normalize(model.encode_image(images[chosen]).float(), dim=-1)
        return torch.cat([features, routes.to(features.dtype)[:, None]], dim=1)

    @torch.no_grad()
    def text_weight(self, dataset: str, route: int) -> torch.Tensor:
        """D x C: ``dataset``'s class prompts (every template, averaged) through router ``route``."""
        key = (dataset, int(route))
        if key not in self._text:
            from mtil.models.text import zeroshot_head

            model = self.moe.model
            if model is None:
                raise RuntimeError("MoE-Adapters' evaluation asked for text features before any image was encoded")
            classnames, templates = self.classes_of(dataset)
            was_training = model.training
            model.eval()
            try:
                with self.moe.routed(text=int(route)), self.autocast():
                    self._text[key] = zeroshot_head(model, classnames, templates).float()
            finally:
                model.train(was_training)
        return self._text[key]

    def num_classes(self, datasets: Sequence[str]) -> int:
        return sum(len(self.classes_of(d)[0]) for d in datasets)

    @torch.no_grad()
    def logits(self, datasets: Sequence[str], encoded: torch.Tensor) -> torch.Tensor:
        """Cosine logits over the classes of ``datasets`` (in order), each image against its own route's prompts."""
        features, routes = encoded[:, :-1].float(), encoded[:, -1].round().long()
        out = features.new_zeros(len(features), self.num_classes(datasets))
        for route in routes.unique().tolist():
            rows = routes == route
            weight = torch.cat([self.text_weight(d, route) for d in datasets], dim=1).to(features.device)
            out[rows] = features[rows] @ weight
        return out


def live_inference(token: str) -> RoutedInference:
    found = _LIVE.get(token)
    if found is None:
        raise UserError("a --method moe-adapters head needs its run's experts, routers and DDAS autoencoders, which "
                        "live in the method's state: evaluate it in its training run (rerunning the training command "
                        "on a finished run prints its results), not with --eval-only")
    return found


def _text_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _tensor_text(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("utf-8")


@register_head
class MoERoutedHead(Head):
    """A handle on the live :class:`RoutedInference` of token ``token`` for the classes of ``datasets``; what a
    checkpoint keeps is only the token and the names (the weights are the method's state)."""

    kind = "moe-adapters"
    union_logits = None  # encodes images its own way: the task-agnostic head is the method's own

    def __init__(self, token: str, datasets: Sequence[str]):
        super().__init__()
        self.token, self.datasets = token, list(datasets)
        self.feature_id = f"moe-adapters-routed:{token}"

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return live_inference(self.token).encode(model, images)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return live_inference(self.token).logits(self.datasets, features)

    @property
    def num_classes(self) -> int:
        return live_inference(self.token).num_classes(self.datasets)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"token": _text_tensor(self.token), "datasets": _text_tensor("\n".join(self.datasets))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MoERoutedHead":
        return cls(_tensor_text(tensors["token"]), _tensor_text(tensors["datasets"]).split("\n"))
