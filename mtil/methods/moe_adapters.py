"""``--method moe-adapters``: MoE-Adapters (Yu et al., CVPR 2024) on a frozen CLIP, with DDAS routing per image.

The model parts are in :mod:`mtil.models.moe_adapter` (where the experts sit, the routers, DDAS, the routed
heads). Per task t (docs/methods/moe-adapters.md):

* ``before_task``: the experts (built once, at the first task, from ``--seed``) are hooked into CLIP; CLIP is
  frozen; router t and every unprotected expert train. DDAS: the task's autoencoder is trained on the frozen CLIP
  features of its training images (eval transform, at most ``--moe-ddas-images``), and its threshold is a quantile
  of its errors on held-out ones; this is done before training so that a mid-task evaluation can route to task t.
  Every evaluated dataset gets a routed head (:class:`~mtil.models.moe_adapter.MoERoutedHead`).
* ``loss``: cross-entropy with label smoothing on ``exp(logit_scale) cos(image, text)``, both encoders through
  router t, every class prompt (first template) re-encoded at each step (so the text experts train).
* ``after_task``: protection. Default (``selected``): a clean pass of router t over the task's training images and
  prompts records the experts it chooses in each block; router t may choose only those from now on, and they are
  frozen, so everything an image routed to t computes is fixed: its predictions never change. ``official``: the
  official rule (freeze each block's 2 most chosen experts by training counts; the router keeps every expert), which
  lets later tasks change experts that router t still uses.

Exact resume: the experts, routers, counts, masks, autoencoders and thresholds are this method's state; the heads
in the checkpoint are handles that find the live state by a token this state carries. Nothing here draws from the
global RNG outside the training step (the experts and autoencoders have their own generators).
"""
from __future__ import annotations

import argparse
import secrets
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from mtil.datasets.captions import CAPTION_DATASETS
from mtil.datasets.fewshot import open_view, protocol_of
from mtil.engine.method import Method
from mtil.engine.precision import DTYPES, resolve_precision
from mtil.engine.tasks import resolve_tasks
from mtil.errors import UserError
from mtil.evaluation.sampling import balanced_sample
from mtil.evaluation.zeroshot import autocast_for
from mtil.flags import add_flag, positive_float, positive_int
from mtil.models.backend import encode_text, image_spec
from mtil.models.moe_adapter import (
    ENCODERS,
    MoEAdapters,
    MoERoutedHead,
    RoutedInference,
    TaskSelector,
    expert_parameters,
    fit_autoencoder,
    selector_input,
    transformer_blocks,
)
from mtil.models.text import tokenize, zeroshot_head
from mtil.models.transforms import eval_transform
from mtil.registry import register

DEFAULT_ITERATIONS = 1000  # the official script's --iterations
DEFAULT_LABEL_SMOOTHING = 0.2  # the official script's --ls
DEFAULT_LR = 1e-3  # a dataset outside the official Order-I table
# the official Order-I script's learning rate per dataset (train_full_shot_router11_experts22_1000iters.sh)
OFFICIAL_LRS = {"Aircraft": 5e-3, "Caltech101": 1e-3, "CIFAR100": 5e-3, "DTD": 1e-3, "EuroSAT": 1e-4,
                "Flowers": 1e-3, "Food": 1e-3, "MNIST": 1e-4, "OxfordPet": 1e-3, "StanfordCars": 1e-3,
                "SUN397": 1e-3}
EXPERT_SEED_OFFSET = 7_717  # the experts' initialisation seed = --seed + this
SELECTOR_SEED_OFFSET = 8_111  # an autoencoder's seed = --seed + this + its slot (the reference: slot -1)
SAMPLE_SEED_OFFSET = 8_513  # which training images DDAS and the protection pass read
PROTECTION_RULES = ("selected", "official")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


@register
class MoEAdaptersMethod(Method):
    name = "moe-adapters"
    summary = ("MoE-Adapters: experts beside every MLP of a frozen CLIP, a router per task (top-k), earlier tasks' "
               "experts frozen; DDAS autoencoders route each test image to a task's router or to zero-shot CLIP")
    flag_group = ("MoE-Adapters (--method moe-adapters)",
                  "Mixture-of-experts adapters with per-task routers on a frozen CLIP, and DDAS routing per test "
                  "image (docs/methods/moe-adapters.md). Defaults are the official Order-I script's: 1000 "
                  "iterations per task, label smoothing 0.2 (unless --ls is given), its per-dataset learning rates "
                  "(unless --lr or --moe-lr is given), AdamW with weight decay 0 (the engine's --wd default), batch "
                  "64 (the engine's --batch-size default), 100 warm-up steps then cosine.")
    train_modes = ("whole",)
    train_modes_note = "its experts and routers sit in both encoders; CLIP itself stays frozen"
    works_with = ()
    supports_distributed = False  # DDAS and the protection pass would have to agree across processes (docs)

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--moe-experts", role="shapes_optimizer", type=positive_int, default=22,
                 help="Experts per block and encoder.")
        add_flag(group, "--moe-routers", role="shapes_optimizer", type=positive_int, default=11,
                 help="Routers per block and encoder: the most tasks a run may train (one router each).")
        add_flag(group, "--moe-top-k", role="shapes_optimizer", type=positive_int, default=2,
                 help="Experts each sample's router chooses (softmax over the chosen k).")
        add_flag(group, "--moe-bottleneck", role="shapes_optimizer", type=positive_int, default=64,
                 help="Hidden width of every expert (down D->b, ReLU, dropout 0.1, up b->D, x0.1).")
        add_flag(group, "--moe-protect", role="shapes_optimizer", choices=list(PROTECTION_RULES), default="selected",
                 help="Protection of a finished task: 'selected' freezes every expert its router chooses on its "
                      "training images and prompts, and limits the router to them (its predictions never change); "
                      "'official' freezes each block's k most chosen experts in training and limits nothing (the "
                      "official code: earlier tasks may drift).")
        add_flag(group, "--moe-lr", type=positive_float, default=None,
                 help="Learning rate of the experts and routers for every task (default: --lr or a sequence "
                      "file's lr when given, else the official Order-I rate of the dataset, 1e-3 for others).")
        add_flag(group, "--moe-ddas-hidden", type=positive_int, default=None,
                 help="Hidden width of each DDAS autoencoder (default: min(100, D/4), D the image feature width; "
                      "100 for ViT-B).")
        add_flag(group, "--moe-ddas-steps", type=positive_int, default=1000,
                 help="Adam steps (batch 64, lr 1e-3) of each DDAS autoencoder.")
        add_flag(group, "--moe-ddas-images", type=positive_int, default=5000,
                 help="Training images per task (class-balanced, seeded) that DDAS and the protection pass read.")
        add_flag(group, "--moe-ddas-quantile", type=_fraction, default=0.95,
                 help="A task's DDAS threshold: this quantile of its autoencoder's errors on its held-out training "
                      "images (1 - it is the share of its own images sent to zero-shot); an image whose error is "
                      "above every task's threshold goes to zero-shot CLIP.")
        add_flag(group, "--moe-ddas-threshold", type=positive_float, default=None,
                 help="One absolute threshold on raw reconstruction errors instead (the official rule: lowest raw "
                      "error wins, zero-shot above this; the official 0.0655 was on AlexNet features and does not "
                      "transfer).")
        add_flag(group, "--moe-ddas-reference", role="dataset", type=str, default=None, metavar="DATASET",
                 help="Also train an autoencoder on this dataset's training images (the official TinyImageNet "
                      "slot); an image it reconstructs best goes to zero-shot CLIP (default: none).")

    # ------------------------------------------------------------------ declarations
    @classmethod
    def sets_task_length(cls, config) -> bool:
        return True  # 1000 iterations per task unless --iterations / --epochs / a sequence file say otherwise

    @classmethod
    def check_config(cls, config) -> None:
        typed = set(getattr(config, "_cli", ())) | set(getattr(config, "_file", ()))
        if config.moe_top_k > config.moe_experts:
            raise UserError(f"--moe-top-k {config.moe_top_k} chooses more experts than --moe-experts "
                            f"{config.moe_experts} holds")
        if config.moe_ddas_threshold is not None and "moe_ddas_quantile" in typed:
            raise UserError("--moe-ddas-threshold replaces the per-task thresholds of --moe-ddas-quantile: give one")
        if getattr(config, "lr_multipliers", None):
            raise UserError("--method moe-adapters trains only its experts and routers (CLIP is frozen), so "
                            "--lr-multipliers has nothing to split: use --moe-lr")
        if getattr(config, "freeze", None):
            raise UserError("--method moe-adapters freezes all of CLIP and protects its own experts: drop --freeze")
        if config.moe_lr is not None and "lr" in typed:
            raise UserError("--moe-lr replaces --lr for --method moe-adapters: give one of them")
        try:
            tasks = len(resolve_tasks(config))
        except (UserError, OSError):
            return  # the sequence's own error is reported where the engine reads it
        if tasks > config.moe_routers:
            raise UserError(f"{tasks} tasks need {tasks} routers, and --moe-routers is {config.moe_routers}: "
                            f"give --moe-routers {tasks}")

    def check_inputs(self) -> None:
        if self.config.moe_ddas_reference:
            open_view(self.config.moe_ddas_reference, self.config.data_location, self.config.download, None).raw(
                "train")

    def check_model(self, model) -> None:
        transformer_blocks(model)  # a ResNet or a timm tower: one line, before anything is written

    def __init__(self, config):
        super().__init__(config)
        self.token = secrets.token_hex(8)  # not torch's RNG: the training streams stay as they were
        self.moe: MoEAdapters | None = None
        self.selector = TaskSelector(absolute=config.moe_ddas_threshold)
        self.inference: RoutedInference | None = None
        self.trained: list[str] = []  # the task of each router, in order
        self.selector_records: list[dict[str, float]] = []
        self.route: int | None = None  # the router that trains now
        self.tokens: torch.Tensor | None = None
        self._specs = None

    # ------------------------------------------------------------------ the model parts
    def _ensure(self, model) -> MoEAdapters:
        cfg = self.config
        if self.moe is None:
            self.moe = MoEAdapters.for_model(model, cfg.moe_experts, cfg.moe_routers, cfg.moe_top_k,
                                             cfg.moe_bottleneck, seed=cfg.seed + EXPERT_SEED_OFFSET)
        self.moe.attach(model)
        self.selector.to(next(model.parameters()).device)
        self._inference()
        return self.moe

    def _inference(self) -> RoutedInference:
        if self.inference is None or self.inference.moe is not self.moe:
            self.inference = RoutedInference(self.moe, self.selector, self.token, self._classes_of, self._autocast)
        return self.inference

    def _classes_of(self, dataset: str) -> tuple[list[str], list[str]]:
        data = open_view(dataset, self.config.data_location, self.config.download, protocol_of(self.config))
        return list(data.classnames), list(data.templates)

    def _autocast(self):
        model = self.moe.model if self.moe is not None else None
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        return autocast_for(device, DTYPES[resolve_precision(self.config.precision, device)])

    def _eval_names(self, run) -> list[str]:
        names = self.config.eval_datasets or run.state.sequence
        return [n for n in names if n not in CAPTION_DATASETS]

    def _lr(self, task) -> float:
        cfg = self.config
        if cfg.moe_lr is not None:
            return float(cfg.moe_lr)
        typed = set(getattr(cfg, "_cli", ())) | set(getattr(cfg, "_file", ()))
        if self._specs is None:
            self._specs = {spec.dataset: spec for spec in resolve_tasks(cfg)}
        spec = self._specs.get(task.name)
        if "lr" in typed or (spec is not None and not spec.builtin and "lr" in spec.overrides):
            return float(task.settings.lr)
        return OFFICIAL_LRS.get(task.name, DEFAULT_LR)

    def _label_smoothing(self, task) -> float:
        typed = set(getattr(self.config, "_cli", ())) | set(getattr(self.config, "_file", ()))
        if "ls" in typed or task.settings.ls != self.config.ls:  # typed, or a sequence file's
            return float(task.settings.ls)
        return DEFAULT_LABEL_SMOOTHING

    # ------------------------------------------------------------------ the task
    def task_steps(self, run, task, steps: int) -> int:
        return steps or DEFAULT_ITERATIONS

    def extra_modules(self, run, task):
        return [self.moe] if self.moe is not None else []

    def parameter_groups(self, run, task, groups):
        params = [p for group in groups for p in group["params"]]
        return [{"params": params, "lr": self._lr(task)}] if params else []

    def before_task(self, run, task) -> None:
        cfg = self.config
        route = run.state.task_index
        if route != len(self.trained) and not (route == len(self.trained) - 1 and self.trained[-1] == task.name):
            raise UserError(f"--method moe-adapters keeps its experts, routers and autoencoders in its own state, "
                            f"which a chain's --load does not carry ({route} tasks done, {len(self.trained)} in its "
                            f"state): train the sequence in one run (a resume continues it)")
        if route >= cfg.moe_routers:
            raise UserError(f"task {route + 1} ({task.name}) needs router {route + 1}, and --moe-routers is "
                            f"{cfg.moe_routers}")
        model = run.model
        moe = self._ensure(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for _, _, layer in moe.all_layers():
            layer.allowed[route] = True  # a router may choose any expert while its task trains
        moe.set_trainable(route)
        for param in moe.parameters():
            param.grad = None  # a protected expert keeps no gradient of the task that trained it
        self.route = route
        if len(self.trained) <= route:  # a resume mid-task restored its autoencoder already
            self._train_selector(run, task, route)
            self.trained.append(task.name)
        self.tokens = tokenize(model, [task.data.templates[0].format(c) for c in task.data.classnames]).to(run.device)
        self._install_heads(run)
        self.inference.invalidate()
        self._say(run, self._count_line(task))

    def _count_line(self, task) -> str:
        moe, route = self.moe, self.route
        experts = {e: sum(int((~layer.frozen).sum()) for layer in moe.layers(e)) for e in ENCODERS}
        totals = {e: sum(layer.num_experts for layer in moe.layers(e)) for e in ENCODERS}
        expert_count = sum(int((~layer.frozen).sum()) * expert_parameters(layer.width,
                                                                          layer.experts[0].down.out_features)
                           for _, _, layer in moe.all_layers())
        router_count = sum(2 * layer.width * layer.num_experts for _, _, layer in moe.all_layers())
        ae = self.selector.autoencoders[route] if len(self.selector) > route else None
        ae_count = sum(p.numel() for p in ae.parameters()) if ae is not None else 0
        return (f"MoE-Adapters on {task.name} (router {route + 1} of {self.config.moe_routers}): "
                f"{moe.trainable_parameters():,} trainable parameters = {expert_count:,} in unfrozen experts (image "
                f"{experts['image']}/{totals['image']}, text {experts['text']}/{totals['text']}) + {router_count:,} "
                f"in router {route + 1} and its noise; lr {self._lr(task):g}, label smoothing "
                f"{self._label_smoothing(task):g}; DDAS autoencoder {ae_count:,} parameters (trained apart)")

    def _say(self, run, message: str) -> None:
        if run.parallel.is_main:
            print(message, flush=True)
        run.log.info(message)

    def _install_heads(self, run) -> None:
        for name in self._eval_names(run):
            run.heads[name] = MoERoutedHead(self.token, [name])

    def _training_images(self, run, data) -> Subset:
        targets = data.targets("train")
        cap = self.config.moe_ddas_images
        indices = balanced_sample(targets, cap, self.config.seed + SAMPLE_SEED_OFFSET)
        return Subset(data.dataset("train", eval_transform(image_spec(run.model))), indices)

    def _loader(self, run, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.config.batch_size_eval, shuffle=False,
                          num_workers=self.config.workers, pin_memory=run.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.config.seed))

    @torch.no_grad()
    def _clip_features(self, run, data) -> torch.Tensor:
        """Frozen CLIP's image features (no adapters) of the task's DDAS images."""
        model, features = run.model, []
        was_training = model.training
        model.eval()
        try:
            with self.moe.routed():
                for images, _ in self._loader(run, self._training_images(run, data)):
                    with run.autocast():
                        features.append(model.encode_image(images.to(run.device, non_blocking=True)).float())
        finally:
            model.train(was_training)
        return torch.cat(features)

    def _hidden(self, dim: int) -> int:
        return self.config.moe_ddas_hidden or max(1, min(100, dim // 4))

    def _fit(self, z: torch.Tensor, slot: int):
        cfg = self.config
        return fit_autoencoder(z, self._hidden(z.shape[1]), cfg.moe_ddas_steps,
                               seed=cfg.seed + SELECTOR_SEED_OFFSET + slot, quantile=cfg.moe_ddas_quantile)

    def _train_selector(self, run, task, route: int) -> None:
        cfg = self.config
        if cfg.moe_ddas_reference and self.selector.reference is None:
            reference = open_view(cfg.moe_ddas_reference, cfg.data_location, cfg.download, None)
            ae, threshold, record = self._fit(selector_input(self._clip_features(run, reference)), -1)
            self.selector.set_reference(ae, threshold)
            self._say(run, f"MoE-Adapters DDAS reference {cfg.moe_ddas_reference}: {record['images']} images, "
                           f"held-out MSE {record['held_out_mse']:.4g}, threshold {threshold:.4g}")
        ae, threshold, record = self._fit(selector_input(self._clip_features(run, task.data)), route)
        self.selector.add(ae, threshold)
        self.selector.to(run.device)
        self.selector_records.append(record)
        self._say(run, f"MoE-Adapters DDAS {task.name}: autoencoder {ae.encoder.in_features}->"
                       f"{ae.encoder.out_features}->{ae.encoder.in_features} on {record['images']} images, MSE "
                       f"{record['fit_mse']:.4g} (held out {record['held_out_mse']:.4g}), threshold "
                       f"{threshold:.4g} (quantile {cfg.moe_ddas_quantile:g})")

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        with self.moe.routed(image=self.route, text=self.route):
            image = F.normalize(run.model.encode_image(images), dim=-1)
            text = F.normalize(encode_text(run.model, self.tokens), dim=-1)
        logits = run.model.logit_scale.exp().detach() * image @ text.T
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=self._label_smoothing(run.task))}

    def after_step(self, run) -> None:
        if self.inference is not None:
            self.inference.invalidate()

    def after_task(self, run, task) -> None:
        route = self.route
        if self.config.moe_protect == "official":
            self._protect_official(route)
        else:
            self._protect_selected(run, task, route)
        self.moe.set_trainable(-1)
        self.inference.invalidate()
        frozen = {e: sum(int(layer.frozen.sum()) for layer in self.moe.layers(e)) for e in ENCODERS}
        totals = {e: sum(layer.num_experts for layer in self.moe.layers(e)) for e in ENCODERS}
        allowed = [int(layer.allowed[route].sum()) for _, _, layer in self.moe.all_layers()]
        self._say(run, f"MoE-Adapters after {task.name} ({self.config.moe_protect} protection): frozen experts image "
                       f"{frozen['image']}/{totals['image']}, text {frozen['text']}/{totals['text']}; router "
                       f"{route + 1} may choose {min(allowed)}-{max(allowed)} experts per block")
        self.route = None
        self.tokens = None

    def _protect_official(self, route: int) -> None:
        """Freeze each block's top-k experts by how often router ``route`` chose them in training."""
        for _, _, layer in self.moe.all_layers():
            layer.frozen[layer.counts[route].topk(layer.top_k).indices] = True

    @torch.no_grad()
    def _protect_selected(self, run, task, route: int) -> None:
        """Every expert router ``route`` chooses (clean) on the task's images and prompts: frozen, and the only
        ones it may choose from now on."""
        model = run.model
        was_training = model.training
        model.eval()
        try:
            with self.moe.recording() as chosen:
                with self.moe.routed(image=route):
                    for images, _ in self._loader(run, self._training_images(run, task.data)):
                        with run.autocast():
                            model.encode_image(images.to(run.device, non_blocking=True))
                with self.moe.routed(text=route), run.autocast():
                    zeroshot_head(model, task.data.classnames, task.data.templates)  # the test prompts
                    encode_text(model, self.tokens)  # the training prompts
            for (encoder, index), used in chosen.items():
                layer = self.moe.layers(encoder)[index]
                layer.allowed[route] = used
                layer.frozen |= used
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ evaluation
    def task_agnostic_head(self, run, dataset: str, layout: list[str]):
        if self.moe is None or not self.trained:
            return None
        self._ensure(run.model)
        return MoERoutedHead(self.token, layout)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.moe is None:
            return {}
        return {"token": self.token, "settings": self.moe.settings(),
                "moe": {k: v.detach().cpu().clone() for k, v in self.moe.state_dict().items()},
                "selector": self.selector.selector_state(), "trained": list(self.trained),
                "selector_records": [dict(r) for r in self.selector_records]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.moe is None:
            self.moe = MoEAdapters.from_settings(state["settings"])
        params = self.moe.state_dict()
        if set(params) != set(state["moe"]):
            raise RuntimeError("the checkpoint's MoE-Adapters tensors do not match this run's settings")
        for name, value in state["moe"].items():
            params[name].copy_(value)  # in place: the optimiser built over these parameters keeps them
        self.selector.load_selector_state(state["selector"])
        if self.moe.model is not None:
            self.selector.to(next(self.moe.model.parameters()).device)
        self.trained = [str(t) for t in state["trained"]]
        self.selector_records = [dict(r) for r in state.get("selector_records", [])]
        self.token = str(state["token"])
        self._inference().register(self.token)
        self.inference.invalidate()
