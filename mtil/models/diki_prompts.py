"""DIKI's model parts (Tang et al., ECCV 2024, "Mind the Interference"; docs/methods/diki.md).

* **Residual prefix prompts.** In the attention of the first ``depth`` blocks of both encoders, each task owns
  ``length`` key and value vectors per block (``2 x length x width``). They do not join the block's own keys: the
  block's output becomes ``W_o (Attn(q, K, V) + w Attn(q, P_k, P_v)) + b_o``, where the second attention has its
  own softmax over the prompt slots, no mask (every text token sees the prompts), ``q`` is the block's own query
  projection, ``P_k``/``P_v`` are used as they are (split into heads, not passed through ``W_k``/``W_v``) and the
  scale is ``1/sqrt(head width)``. It is computed as ``block output + W_o (w Attn(q, P_k, P_v))``, which is the same
  sum: with the official initial values (keys uniform in [-1, 1], values zero) the added term is exactly zero and
  CLIP's outputs are unchanged bit for bit. The prompts are applied by forward hooks on the blocks'
  ``nn.MultiheadAttention`` for the duration of one encoding (:func:`prefix_prompts`): CLIP's modules, names and
  state dict never change, on either back-end (clip-anytorch's ``(L, N, D)`` blocks, open_clip's batch-first ones).
* **Task statistics.** The mean and unbiased covariance (``+ 1e-7 I``) of a task's L2-normalised image features
  from the prompt-free CLIP (:func:`gaussian_statistics`), kept in float64.
* **Calibration.** Per test image: the log-likelihood of its prompt-free feature under every task's Gaussian, the
  task ``t`` with the highest one, and the weight ``w = sigmoid(l_t / d - 1)`` with ``d`` the feature dimension
  (:meth:`DikiKnowledge.calibrate`); the image is then encoded with task ``t``'s prompts at weight ``w``.
* **Text side** (:class:`TextBanks`): a class's text feature under (task ``t``, weight ``w``) is interpolated
  between the text features computed exactly at the weights of a grid ``0, 1/(K-1), ..., 1`` (the weight 0 being
  CLIP's own text feature), then renormalised; exact at the grid points.
* :class:`DikiHead` carries all of it (the prompts and statistics of every task, the class prompts' tokens) into
  evaluation and checkpoints: ``--eval-only`` and a chain's next link can use it without the method's state.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.errors import UserError
from mtil.models.backend import encode_text, pads_freely
from mtil.models.heads import Head, register_head
from mtil.models.text import trim_padding

COVARIANCE_RIDGE = 1e-7  # added to the covariance's diagonal (the official code's value)
TEXT_BATCH = 256  # class prompts encoded per batch for the text banks


# ------------------------------------------------------------------------------------------------ the blocks
def _attention_blocks(model: nn.Module, model_name: str = "") -> tuple[list[nn.Module], list[nn.Module]]:
    """Every block's attention module of the image and of the text encoder; a one-line UserError for towers
    without ``nn.MultiheadAttention`` blocks (a ResNet image encoder, timm and Hugging Face towers)."""
    named = f"--model {model_name}" if model_name else "the model"
    lead = "--method diki puts prompts in the attention of the transformer blocks of both encoders, and"
    visual = model.visual
    if hasattr(visual, "trunk"):
        raise UserError(f"{lead} the image encoder of {named} is a timm tower (timm's own Attention, not "
                        f"nn.MultiheadAttention): use a ViT with OpenAI's blocks (clip-anytorch, or open_clip's native "
                        f"ViT)")
    image = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if image is None:
        raise UserError(f"{lead} the image encoder of {named} is a ResNet, which has none: use a ViT "
                        f"(clip-anytorch, or open_clip's native ViT)")
    tower = model.text if hasattr(model, "text") else model
    text = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if text is None:
        raise UserError(f"{lead} the text encoder of {named} is not a CLIP transformer: use a model with OpenAI's "
                        f"text blocks (clip-anytorch, or open_clip's native text tower)")
    attentions = []
    for encoder, blocks in (("image", image), ("text", text)):
        found = [getattr(block, "attn", None) for block in blocks]
        if not found or not all(isinstance(a, nn.MultiheadAttention) and a._qkv_same_embed_dim
                                and a.in_proj_weight is not None for a in found):
            raise UserError(f"{lead} the {encoder} blocks of {named} do not all hold an nn.MultiheadAttention with "
                            f"a packed in_proj: use a ViT with OpenAI's blocks (clip-anytorch, or open_clip's native "
                            f"towers)")
        attentions.append(found)
    return attentions[0], attentions[1]


@dataclass(frozen=True)
class PromptSites:
    """The prompted attention modules: the first ``len(image)`` blocks of the image encoder, the first
    ``len(text)`` of the text encoder."""

    image: tuple[nn.MultiheadAttention, ...]
    text: tuple[nn.MultiheadAttention, ...]

    @property
    def image_width(self) -> int:
        return int(self.image[0].embed_dim)

    @property
    def text_width(self) -> int:
        return int(self.text[0].embed_dim)


def prompt_sites(model: nn.Module, image_layers: int, text_layers: int | None = None,
                 model_name: str = "") -> PromptSites:
    """The first ``image_layers`` image blocks and ``text_layers`` (default: the same) text blocks; an encoder with
    fewer blocks has all of them prompted."""
    image, text = _attention_blocks(model, model_name)
    text_layers = image_layers if text_layers is None else text_layers
    return PromptSites(tuple(image[:image_layers]), tuple(text[:text_layers]))


# ------------------------------------------------------------------------------------------------ the attention
def prefix_attention(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """The residual term ``W_o (w softmax(q P_k^T / sqrt(d_h)) P_v)`` (no bias), in ``query``'s layout.

    ``query``: the block's attention input, ``(L, N, D)`` or, for a batch-first module, ``(N, L, D)``; ``keys`` and
    ``values``: ``(N or 1, P, D)`` prompt vectors, split into ``attn.num_heads`` heads of ``D / heads`` columns as
    the query is; ``weight``: ``(N,)`` per sample, a number, or None for 1."""
    if query.dim() != 3:
        raise ValueError(f"prefix prompts need batched attention inputs, got a {query.dim()}-d query")
    x = query if attn.batch_first else query.transpose(0, 1)  # (N, L, D)
    batch, length, width = x.shape
    heads = attn.num_heads
    head_width = width // heads
    bias = attn.in_proj_bias[:width] if attn.in_proj_bias is not None else None
    q = F.linear(x, attn.in_proj_weight[:width], bias)
    q = q.view(batch, length, heads, head_width).transpose(1, 2)  # (N, H, L, d_h)
    slots = keys.shape[-2]

    def split(prompts: torch.Tensor) -> torch.Tensor:
        prompts = prompts.to(q.dtype).expand(batch, slots, width)
        return prompts.reshape(batch, slots, heads, head_width).transpose(1, 2)  # (N, H, P, d_h)

    out = F.scaled_dot_product_attention(q, split(keys), split(values))  # its own softmax, over the P slots only
    out = out.transpose(1, 2).reshape(batch, length, width)
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=out.dtype, device=out.device)
        out = out * (weight.view(-1, 1, 1) if weight.dim() else weight)
    out = F.linear(out, attn.out_proj.weight)
    return out if attn.batch_first else out.transpose(0, 1)


def _add_prefix(keys: torch.Tensor, values: torch.Tensor, weight, module: nn.MultiheadAttention,
                args: tuple, kwargs: dict, output: Any) -> tuple:
    query = args[0] if args else kwargs["query"]
    attended, attention_weights = output
    extra = prefix_attention(module, query, keys, values, weight)
    return attended + extra.to(attended.dtype), attention_weights


@contextmanager
def prefix_prompts(attentions: Sequence[nn.MultiheadAttention], keys: Sequence[torch.Tensor],
                   values: Sequence[torch.Tensor], weight: torch.Tensor | float | None = None) -> Iterator[None]:
    """Within the block, ``attentions[i]`` adds :func:`prefix_attention` with ``keys[i]``, ``values[i]`` and
    ``weight`` to its output (forward hooks, removed on exit: the model is left as it was)."""
    if not (len(attentions) == len(keys) == len(values)):
        raise ValueError(f"{len(attentions)} prompted blocks but {len(keys)} keys and {len(values)} values")
    handles = []
    try:
        for attn, k, v in zip(attentions, keys, values):
            handles.append(attn.register_forward_hook(partial(_add_prefix, k, v, weight), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ statistics
def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased covariance + 1e-7 I) of the rows of ``features``, in float64 (the features are expected
    L2-normalised)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise UserError(f"--method diki estimates a covariance from a task's training images and needs at least 2 of "
                        f"them (got {features.shape[0] if features.dim() else 0})")
    x = features.detach().double()
    mean = x.mean(dim=0)
    delta = x - mean
    cov = delta.T @ delta / (x.shape[0] - 1)
    cov = cov + COVARIANCE_RIDGE * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return mean, cov


# ------------------------------------------------------------------------------------------------ knowledge
class TaskKnowledge(nn.Module):
    """One task: its prompts (one ``2 x length x width`` Parameter per prompted block, keys then values) and the
    Gaussian statistics of its prompt-free image features (float64 buffers)."""

    def __init__(self, image_layers: int, text_layers: int, length: int, image_width: int, text_width: int,
                 dim: int):
        super().__init__()
        self.image = nn.ParameterList([nn.Parameter(torch.zeros(2, length, image_width)) for _ in range(image_layers)])
        self.text = nn.ParameterList([nn.Parameter(torch.zeros(2, length, text_width)) for _ in range(text_layers)])
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("cov", torch.eye(dim, dtype=torch.float64))
        self._factor: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def initialise(self, generator: torch.Generator) -> None:
        """The official initial values: keys uniform in [-1, 1] (drawn from ``generator``), values zero."""
        for prompt in [*self.image, *self.text]:
            keys = torch.rand(prompt.shape[1:], generator=generator, dtype=torch.float32) * 2 - 1
            prompt[0].copy_(keys.to(prompt.device, prompt.dtype))
            prompt[1].zero_()

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Cholesky factor L of the covariance, log det of the covariance), recomputed when the covariance
        changes."""
        key = (self.cov.data_ptr(), self.cov._version, self.cov.device)
        if self._factor is None or self._factor[0] != key:
            lower, info = torch.linalg.cholesky_ex(self.cov)
            if int(info) != 0:
                raise RuntimeError("a DIKI task covariance is not positive definite (its Cholesky factor failed)")
            self._factor = (key, lower, 2.0 * torch.log(torch.diagonal(lower)).sum())
        return self._factor[1], self._factor[2]

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """``log N(x; mean, cov)`` of every row of ``features``, in float64."""
        lower, logdet = self.factor()
        delta = features.to(torch.float64) - self.mean
        z = torch.linalg.solve_triangular(lower, delta.T, upper=False)
        return -0.5 * (self.mean.numel() * math.log(2 * math.pi) + logdet + (z * z).sum(dim=0))


class DikiKnowledge(nn.Module):
    """Every task's prompts and statistics, in training order, and the prompt layout (``layout``: image blocks,
    text blocks, prompt length, image width, text width, feature dimension). ``version`` goes up whenever a
    prompt or a statistic may have changed (the text banks are recomputed then)."""

    LAYOUT = ("image_layers", "text_layers", "length", "image_width", "text_width", "dim")

    def __init__(self, image_layers: int, text_layers: int, length: int, image_width: int, text_width: int,
                 dim: int):
        super().__init__()
        values = (image_layers, text_layers, length, image_width, text_width, dim)
        self._shape = dict(zip(self.LAYOUT, (int(v) for v in values)))
        self.register_buffer("layout", torch.tensor(values, dtype=torch.int64))  # saved with the state
        self.tasks = nn.ModuleList()
        self.version = 0
        self._cpu: tuple[int, dict[str, torch.Tensor]] | None = None

    # -------------------------------------------------------------- structure
    def shape(self) -> dict[str, int]:
        return dict(self._shape)

    @property
    def dim(self) -> int:
        return self._shape["dim"]

    def __len__(self) -> int:
        return len(self.tasks)

    def bump(self) -> None:
        self.version += 1

    def new_task(self) -> TaskKnowledge:
        shape = self.shape()
        return TaskKnowledge(**shape).to(self.layout.device)

    def add_task(self, mean: torch.Tensor, cov: torch.Tensor, generator: torch.Generator) -> TaskKnowledge:
        """A new task with the official initial prompts (drawn from ``generator``) and these statistics."""
        task = self.new_task()
        task.initialise(generator)
        with torch.no_grad():
            task.mean.copy_(mean)
            task.cov.copy_(cov)
        self.tasks.append(task)
        self.bump()
        return task

    def sites(self, model: nn.Module) -> PromptSites:
        shape = self.shape()
        sites = prompt_sites(model, shape["image_layers"], shape["text_layers"])
        if (len(sites.image), len(sites.text), sites.image_width, sites.text_width) != (
                shape["image_layers"], shape["text_layers"], shape["image_width"], shape["text_width"]):
            raise UserError(f"the DIKI prompts ({shape['image_layers']} image and {shape['text_layers']} text blocks "
                            f"of widths {shape['image_width']}/{shape['text_width']}) do not fit this model")
        return sites

    def train_only(self, index: int | None) -> None:
        """Task ``index``'s prompts require gradients, every other task's (all, for None) do not and hold none."""
        for i, task in enumerate(self.tasks):
            for prompt in [*task.image, *task.text]:
                prompt.requires_grad_(i == index)
                if i != index:
                    prompt.grad = None

    # -------------------------------------------------------------- prompts
    def task_prompts(self, index: int, encoder: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(keys, values) of task ``index`` in ``encoder`` ("image" or "text"), each ``(1, P, width)`` per block."""
        prompts = getattr(self.tasks[index], encoder)
        return [p[0].unsqueeze(0) for p in prompts], [p[1].unsqueeze(0) for p in prompts]

    def image_prompts(self, indices: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(keys, values) per image block, ``(N, P, width)``: row n holds task ``indices[n]``'s prompts."""
        keys, values = [], []
        for layer in range(self._shape["image_layers"]):
            stacked = torch.stack([task.image[layer] for task in self.tasks])  # (T, 2, P, width)
            chosen = stacked[indices]
            keys.append(chosen[:, 0])
            values.append(chosen[:, 1])
        return keys, values

    # -------------------------------------------------------------- calibration
    def log_likelihoods(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` float64: ``log N(f_n; mean_t, cov_t)`` for every task."""
        return torch.stack([task.log_likelihood(features) for task in self.tasks], dim=1)

    def calibrate(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(task index, weight, its log-likelihood) per row of prompt-free normalised ``features``: the task of the
        highest log-likelihood ``l`` and ``w = sigmoid(l / d - 1)``, ``d`` the feature dimension."""
        if not len(self.tasks):
            raise RuntimeError("DIKI calibration needs at least one task")
        likelihoods = self.log_likelihoods(features)
        best, index = likelihoods.max(dim=1)
        weight = torch.sigmoid(best / self.dim - 1.0)
        return index, weight.float(), best

    @torch.no_grad()
    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``(N, D + 2)``: each image's normalised feature through its chosen task's prompts at its weight, then the
        chosen task's index and the weight (see :func:`split_features`)."""
        plain = F.normalize(model.encode_image(images).float(), dim=-1)
        index, weight, _ = self.calibrate(plain)
        keys, values = self.image_prompts(index)
        with prefix_prompts(self.sites(model).image, keys, values, weight):
            features = F.normalize(model.encode_image(images).float(), dim=-1)
        return torch.cat([features, index.unsqueeze(1).float(), weight.unsqueeze(1)], dim=1)

    # -------------------------------------------------------------- tensors
    def cpu_tensors(self) -> dict[str, torch.Tensor]:
        """The state as CPU tensors, the same objects until ``version`` changes (so the heads and the method's
        state that a checkpoint holds share one copy: torch.save writes a storage once)."""
        if self._cpu is None or self._cpu[0] != self.version:
            self._cpu = (self.version, {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()})
        return self._cpu[1]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "DikiKnowledge":
        layout = tensors.get("layout")
        if not isinstance(layout, torch.Tensor) or layout.shape != (len(cls.LAYOUT),):
            raise ValueError("DIKI state without its prompt layout")
        knowledge = cls(*(int(v) for v in layout.tolist()))
        count = 0
        while f"tasks.{count}.mean" in tensors:
            count += 1
        for _ in range(count):
            knowledge.tasks.append(knowledge.new_task())
        knowledge.load_tensors(tensors)
        return knowledge

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (a state of the same layout and task count) into this knowledge, in place."""
        own = self.state_dict()
        if set(own) != set(tensors):
            raise ValueError(f"DIKI state of another layout or task count ({len(tensors)} tensors, "
                             f"{len(own)} expected)")
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(f"DIKI state tensor {name} has shape {tuple(value.shape)}, not "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(value)
        self.bump()

    def parameter_count(self, index: int) -> int:
        """Parameters of task ``index``'s prompts (what one task trains)."""
        return sum(p.numel() for p in self.tasks[index].parameters())


def split_features(features: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, task index, weight) of :meth:`DikiKnowledge.encode_image`'s output."""
    return features[:, :dim], features[:, dim].round().long(), features[:, dim + 1]


# ------------------------------------------------------------------------------------------------ text
@dataclass(frozen=True)
class ClassBlock:
    """The class prompts of one dataset: ``tokens`` (``C x templates`` rows, class-major, at the model's context
    length), ``templates`` per class; ``key`` names it in a shared :class:`TextBanks`."""

    key: str
    tokens: torch.Tensor
    templates: int

    @property
    def classes(self) -> int:
        return self.tokens.shape[0] // self.templates


def class_text_features(model: nn.Module, block: ClassBlock) -> torch.Tensor:
    """``(C, D)``: per class, its prompts' normalised text features averaged over the templates and renormalised
    (one template: its feature). Prompts in effect (:func:`prefix_prompts`) apply."""
    device = next(model.parameters()).device
    trim = pads_freely(model)
    out = []
    for start in range(0, block.tokens.shape[0], TEXT_BATCH):
        chunk = block.tokens[start:start + TEXT_BATCH]
        chunk = trim_padding(chunk) if trim else chunk
        out.append(F.normalize(encode_text(model, chunk.to(device)).float(), dim=-1))
    features = torch.cat(out).view(block.classes, block.templates, -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def grid_weights(points: int) -> list[float]:
    return [k / (points - 1) for k in range(points)]


class TextBanks:
    """Text features of class blocks at the weights of the grid: for task t, ``(K, C, D)`` with entry k computed
    with t's text prompts at weight ``k / (K - 1)`` (entry 0: CLIP's own, shared by every task). Computed on demand,
    kept until the knowledge's version changes (CLIP is frozen, so the weight-0 entries are kept for good)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.zero: dict[str, torch.Tensor] = {}
        self.tasks: dict[tuple[str, int], torch.Tensor] = {}
        self.texts_encoded = 0  # class prompts encoded (for tests and timing)

    @torch.no_grad()
    def bank(self, model: nn.Module, knowledge: DikiKnowledge, block: ClassBlock, task: int,
             points: int) -> torch.Tensor:
        if self.version != knowledge.version:
            self.version, self.tasks = knowledge.version, {}
        if block.key not in self.zero:
            self.zero[block.key] = class_text_features(model, block)
            self.texts_encoded += block.tokens.shape[0]
        found = self.tasks.get((block.key, task))
        if found is None or found.shape[0] != points:
            entries = [self.zero[block.key]]
            keys, values = knowledge.task_prompts(task, "text")
            sites = knowledge.sites(model).text
            for weight in grid_weights(points)[1:]:
                with prefix_prompts(sites, keys, values, weight):
                    entries.append(class_text_features(model, block))
                self.texts_encoded += block.tokens.shape[0]
            found = self.tasks[(block.key, task)] = torch.stack(entries)
        return found


def interpolated_logits(features: torch.Tensor, weight: torch.Tensor, bank: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``scale * cos(f, t)`` with ``t`` the renormalised linear interpolation, at each row's ``weight``, between
    the two neighbouring grid entries of ``bank`` (``(K, C, D)``, rows normalised): exactly ``scale * f . bank[k]``
    at a grid point."""
    points = bank.shape[0]
    position = weight.clamp(0.0, 1.0) * (points - 1)
    lower = position.floor().long().clamp(max=points - 2)
    fraction = (position - lower).unsqueeze(1)
    out = features.new_empty(features.shape[0], bank.shape[1])
    for k in lower.unique().tolist():
        rows = lower == k
        a, b = bank[k], bank[k + 1]
        f, frac = features[rows], fraction[rows]
        numerator = (1 - frac) * (f @ a.T) + frac * (f @ b.T)
        squared = (1 - frac) ** 2 + frac ** 2 + 2 * frac * (1 - frac) * (a * b).sum(dim=1)
        out[rows] = scale * numerator / squared.clamp_min(1e-12).sqrt()
    return out


# ------------------------------------------------------------------------------------------------ the head
@register_head
class DikiHead(Head):
    """Classifies images among the classes of one or several datasets (``blocks``, side by side) with DIKI's
    calibration: :meth:`encode` runs the prompt-free encoder, picks each image's task and weight and encodes it with
    that task's prompts; :meth:`forward` scores it against the classes' text features under the same task and
    weight (interpolated on the text grid). Holds every task's prompts and statistics (shared with the method and
    the other heads while training; a checkpoint stores one copy)."""

    kind = "diki"
    feature_id = "diki-calibrated"
    union_logits = None  # its own image encoding: --label-space seen asks the method's task_agnostic_head

    def __init__(self, knowledge: DikiKnowledge, blocks: Sequence[ClassBlock], grid: int, logit_scale: float,
                 banks: TextBanks | None = None, model: nn.Module | None = None,
                 autocast: Callable[[], ContextManager] | None = None):
        super().__init__()
        if grid < 2:
            raise ValueError(f"a text grid needs at least 2 points, got {grid}")
        self.knowledge = knowledge
        self.blocks = list(blocks)
        self.grid = int(grid)
        self.logit_scale = float(logit_scale)
        self.banks = banks if banks is not None else TextBanks()
        # what computes the text banks: the model and the evaluator's autocast (plain attributes, not submodules)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_autocast", autocast)

    @property
    def num_classes(self) -> int:
        return sum(block.classes for block in self.blocks)

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self._model is None:  # a head read from a checkpoint: the evaluator's model and arithmetic
            device = images.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            object.__setattr__(self, "_model", model)
            object.__setattr__(self, "_autocast", (lambda: torch.autocast(device, dtype=dtype)) if dtype else None)
        features = self.knowledge.encode_image(model, images)
        self._bank_list(list(range(len(self.knowledge))))  # under the evaluator's autocast, before forward needs them
        return features

    def _bank_list(self, tasks: Sequence[int]) -> dict[int, list[torch.Tensor]]:
        if self._model is None:
            raise RuntimeError("a DIKI head scores features only after encoding images with a model")
        context = self._autocast() if self._autocast is not None else nullcontext()
        with context:
            return {t: [self.banks.bank(self._model, self.knowledge, block, t, self.grid) for block in self.blocks]
                    for t in tasks}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image, index, weight = split_features(features.float(), self.knowledge.dim)
        tasks = index.unique().tolist()
        banks = self._bank_list(tasks)
        out = image.new_empty(image.shape[0], self.num_classes)
        for t in tasks:
            rows = index == t
            out[rows] = torch.cat([interpolated_logits(image[rows], weight[rows], bank.float(), self.logit_scale)
                                   for bank in banks[t]], dim=1)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"knowledge.{k}": v for k, v in self.knowledge.cpu_tensors().items()}
        for i, block in enumerate(self.blocks):
            out[f"block.{i}.tokens"] = block.tokens.detach().cpu()
            out[f"block.{i}.templates"] = torch.tensor(block.templates)
        out["grid"] = torch.tensor(self.grid)
        out["logit_scale"] = torch.tensor(self.logit_scale, dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "DikiHead":
        knowledge = DikiKnowledge.from_tensors({k[len("knowledge."):]: v for k, v in tensors.items()
                                                if k.startswith("knowledge.")})
        blocks, i = [], 0
        while f"block.{i}.tokens" in tensors:
            blocks.append(ClassBlock(f"block{i}", tensors[f"block.{i}.tokens"].long(),
                                     int(tensors[f"block.{i}.templates"])))
            i += 1
        return cls(knowledge, blocks, int(tensors["grid"]), float(tensors["logit_scale"]))
