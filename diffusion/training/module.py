"""The LightningModule: the system that ties a network, a process, a prediction target, a loss
weighting and a sampler together.

It is built from plain config dicts (so ``DiffusionModule.load_from_checkpoint(path)`` rebuilds
a working model without the Hydra run that made it; configs of earlier versions are made current
by diffusion.compat):
  - ``net``: the network, a Hydra ``_target_`` node (see diffusion.nn);
  - ``process``: the family (diffusion.processes), or DDPM's of ``schedule`` and ``T``;
  - ``prediction``, ``loss_weight``, ``learn_sigma``: the objective (diffusion.training.objective);
  - ``sampler``: a ``_partial_`` sampler node (see diffusion.samplers);
  - ``optimizer``: a ``_partial_`` optimizer node completed with the network's parameters.
The EMA copy of the network is used for validation and sampling, and is in the checkpoint.
One training step: x_0 → objective (process → network → target, weighting) → loss. One sample:
x_T → sampler, calling the network through the Predictor (ε̂, x̂_0, score) → x_0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from diffusion.compat import upgrade
from diffusion.errors import ConfigError, NonFiniteLossError
from diffusion.nn.text import TextConditioned
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.guidance import Guided
from diffusion.processes.prediction import Predictor, make_target
from diffusion.samplers import Callback, check_sampler, name_of
from diffusion.training.determinism import mix, seeded
from diffusion.training.ema import EMA
from diffusion.training.objective import Objective, check_fits
from diffusion.training.time_sampling import LossAwareTimes
from diffusion.training.weighting import Likelihood, LossWeight, Simple, load_loss_weight


def _plain(cfg: Mapping | DictConfig) -> dict:
    """A config as plain dicts, with the ``_target_`` paths of earlier versions made current."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return upgrade(cfg)


class DiffusionModule(LightningModule):
    """Diffusion training system (diffusion.training.objective: DDPM's Algorithm 1, denoising
    score matching for the score families) with EMA, warm-up and sampling.

    Args:
        net: config of the ε-network ``net(x_t, t)``.
        schedule: config of the β schedule (``_partial_``), called as ``schedule(T)``.
        T: number of diffusion steps (≥ 1).
        image_shape: (C, H, W) of the images, for :meth:`sample`.
        optimizer: ``_partial_`` optimizer config, e.g. AdamW with its ``lr``.
        warmup_steps: linear learning-rate warm-up from 0 over this many steps.
        ema_decay: decay of the weights' exponential moving average.
        ema_warmup: use min(ema_decay, (1 + n) / (10 + n)) at update n (see diffusion.ema).
        sampler: ``_partial_`` sampler config used by :meth:`sample`.
        val_timesteps: validation loss is L_simple averaged over this many evenly spaced t's,
            with noise fixed per batch, so it is comparable across runs and checkpoints.
        data: the data config the model is trained on, kept in the checkpoint so that
            ``diffusion.evaluate`` finds the reference images.
        nonfinite_loss: on a NaN/Inf loss, ``error`` stops the run naming the step (the last
            checkpoint stays as it was); ``skip`` drops that batch (no optimizer step), up to
            ``max_skipped_steps`` in a row. Checking costs one device sync per step.
        process: the family, a ``_target_`` node (``conf/process/``): DDPM's process
            (``diffusion.processes.ddpm.ddpm`` of ``schedule`` and ``T``; also what None
            means), a score SDE or NCSN. The sampler must suit it (what it ``needs``, the
            process ``offers``: diffusion.samplers).
        seed: the randomness of training batch b (t, ε, dropout) is seeded by (seed, b, rank),
            so a resumed run continues bitwise (see diffusion.determinism).
        channels_last: keep the network's weights and activations in channels_last (NHWC)
            memory, which the convolutions run faster in (experiments/performance).
        compile: train through ``torch.compile`` of the network (validation, sampling and the
            checkpoint use the plain network; the first steps pay the compilation).
        prediction: the network's target, ``eps``, ``x0``, ``v`` or ``edm`` (EDM's preconditioned
            denoiser; diffusion.processes.prediction).
        sigma_data: σ_data of ``prediction=edm``, the data's standard deviation (Karras et al.).
        cond_drop_prob: for a class-conditional network (``model.num_classes`` > 0), the share of
            training labels replaced by the null class ∅ (p_uncond of Ho & Salimans 2022), so
            that one network is also the unconditional model guidance needs.
        loss_weight: the weighting, a name (``simple``, ``min_snr``, ``p2``, ``vlb``,
            ``likelihood``: conf/loss_weight/) or a ``_target_`` node; None is ``simple``.
        learn_sigma: the network also outputs its variance's interpolation v (twice the
            channels), trained with L_hybrid (Nichol & Dhariwal 2021); needs DDPM's bound.
        vlb_weight: λ of L_hybrid = L_simple + λ L_vlb.
        t_sampling: ``uniform``, or ``loss_aware`` importance sampling of t by the loss's second
            moment (Nichol & Dhariwal 2021, Sec. 3.3; for L_vlb; diffusion.training.time_sampling).
        text_encoder: a text encoder node (``conf/text_encoder/``): the network is conditioned
            on prompts through cross-attention at its attention levels (``model.context_dim`` is
            the encoder's width; diffusion.nn.text), captions dropped to the empty prompt with
            ``cond_drop_prob``. None: no text.
        init_from: where the run's initial weights came from (``diffusers:<folder or hub id>``
            or a checkpoint), recorded: ``diffusion.train`` loads them (:meth:`load_network`).
    """

    def __init__(
        self,
        net: Mapping,
        schedule: Mapping,
        T: int,
        image_shape: list[int],
        optimizer: Mapping,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sampler: Mapping | None = None,
        val_timesteps: int = 10,
        data: Mapping | None = None,
        nonfinite_loss: str = "error",
        max_skipped_steps: int = 10,
        seed: int = 0,
        process: Mapping | None = None,
        channels_last: bool = True,
        compile: bool = False,
        prediction: str = "eps",
        loss_weight: Mapping | str | None = None,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
        t_sampling: str = "uniform",
        sigma_data: float = 0.5,
        cond_drop_prob: float = 0.1,
        init_from: str | None = None,
        text_encoder: Mapping | None = None,
    ) -> None:
        super().__init__()
        net, schedule, optimizer = _plain(net), _plain(schedule), _plain(optimizer)
        process = _plain(process) if process is not None else None
        data = _plain(data) if data is not None else None
        sampler = (
            _plain(sampler)
            if sampler is not None
            else {
                "_target_": "diffusion.samplers.chain.ddpm_ancestral",
                "_partial_": True,
            }
        )
        if isinstance(loss_weight, Mapping | DictConfig):
            loss_weight = _plain(loss_weight)
        text_encoder = _plain(text_encoder) if text_encoder is not None else None
        image_shape = list(image_shape)
        self.save_hyperparameters()
        self.target = make_target(prediction, sigma_data)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # a learned variance doubles the output channels (Nichol & Dhariwal 2021)
        extra = {"out_channels": 2 * image_shape[0]} if learn_sigma else {}
        self.net = self._network(net, extra, text_encoder)
        self.net.to(memory_format=self.memory_format)
        self.ema = EMA(self.net, ema_decay, ema_warmup)
        # A compiled bound method, not a module: it must not enter the state_dict a second time.
        self._compiled_forward = torch.compile(self.net.forward) if compile else None
        self.process = (
            instantiate(process) if process else GaussianDiffusion(instantiate(schedule)(T))
        )
        self._told: set = set()  # samplers said to ignore a learned variance
        weight = self._loss_weight(loss_weight)
        check_fits(self.process, weight, learn_sigma, t_sampling)
        self.time_sampler = LossAwareTimes(self.process.T) if t_sampling == "loss_aware" else None
        self.objective = Objective(self.process, self.target, weight, learn_sigma, vlb_weight)
        if nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"nonfinite_loss must be 'error' or 'skip', got {nonfinite_loss!r}")
        self.image_shape = tuple(image_shape)
        self._skipped_in_a_row = 0
        self._batches_seen = 0  # training batches so far, the key of each batch's randomness
        self.val_t = self.process.validation_times(val_timesteps)
        self.check_sampler(sampler)
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"module.cond_drop_prob={cond_drop_prob!r} must be in [0, 1)")
        self.class_names: list[str] | None = None  #: the data's, for a class-conditional net

    @staticmethod
    def _network(net: dict, extra: dict, text_encoder: dict | None) -> torch.nn.Module:
        """The network of ``net``; with a text encoder, conditioned on prompts through
        cross-attention of the encoder's width (diffusion.nn.text)."""
        if text_encoder is None:
            return instantiate(net, **extra)
        encoder = instantiate(text_encoder)
        given = net.get("context_dim") or 0
        if given and given != encoder.width:
            raise ConfigError(
                f"model.context_dim={given} but the text encoder's width is {encoder.width}: "
                "leave model.context_dim=0 (it follows the encoder) or make them equal"
            )
        unet = instantiate(net, **extra, context_dim=encoder.width)
        return TextConditioned(unet, encoder)

    @property
    def text(self) -> bool:
        """Conditioned on prompts (``text_encoder``)."""
        return bool(getattr(self.net, "text", False))

    def load_network(self, state: Mapping[str, torch.Tensor]) -> None:
        """Network weights from elsewhere (a diffusers model, another run) into the network and
        its EMA copy; ConfigError naming the first weight that does not fit."""
        for net in (self.net, self.ema.module):
            own = net.state_dict()
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
            if missing or extra or wrong:
                key = (missing or extra or wrong)[0]
                shapes = f"has shape {tuple(state[key].shape)}, the model {tuple(own[key].shape)}"
                why = "is missing" if missing else "is unexpected" if extra else shapes
                raise ConfigError(f"the weights do not fit the model: {key!r} {why}")
            net.load_state_dict(state)

    @property
    def num_classes(self) -> int:
        """K of a class-conditional network (its null class ∅ is K); 0 if unconditional."""
        return getattr(self.net, "num_classes", 0)

    def _loss_weight(self, config: Mapping | str | None) -> LossWeight:
        weight = load_loss_weight(config) if config is not None else Simple()
        if getattr(self.process, "weighting", "sde") == "likelihood" and isinstance(weight, Simple):
            weight = Likelihood()  # process.weighting=likelihood, the setting before loss_weight=
        return weight

    def check_sampler(self, sampler: Mapping) -> None:
        """Refuse a sampler that does not suit the process; say when it ignores a learned
        variance."""
        fn = check_sampler(self.process, sampler)
        if self.hparams.learn_sigma and not fn.uses_learned_variance and fn not in self._told:
            self._told.add(fn)  # once per sampler, not at every batch
            rank_zero_info(
                f"sampler {name_of(sampler['_target_'])} uses the model's mean only: the learned "
                "variance is not used (sampler=ddpm uses it)"
            )

    def validate_sampler(self, sampler: Mapping) -> None:
        """:meth:`check_sampler`, then one run of the sampler on a single pixel with a network
        that predicts zeros, so that a bad option (steps beyond the chain, η outside [0, 1], an
        unknown spacing) is a ConfigError now and not a traceback at the first sample grid."""
        sampler = _plain(sampler)
        self.check_sampler(sampler)
        width = 2 if self.hparams.learn_sigma else 1

        def zeros(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], width * x.shape[1], *x.shape[2:])

        model = Predictor(zeros, self.process, self.target, self.hparams.learn_sigma)
        try:
            fn = instantiate(sampler)
            fn(model, torch.zeros(1, 1, 1, 1), self.process, generator=torch.Generator())
        except (ValueError, TypeError, IndexError) as err:
            raise ConfigError(f"sampler: {err}") from None

    def predictor(
        self,
        use_ema: bool = True,
        labels: torch.Tensor | None = None,
        guidance: float = 0.0,
        prompts: list[str] | None = None,
    ) -> Predictor:
        """The network (EMA or raw) seen through the process and its prediction target; for a
        conditional network, at ``labels`` (class-conditional) or ``prompts`` (text-conditional)
        — None: the null condition ∅ (the null class, the empty prompt) — with classifier-free
        guidance ``guidance`` = w (diffusion.processes.guidance)."""
        net = self.ema if use_ema else self.net
        condition, null = self.condition(labels, prompts, guidance)
        if null is None:
            return Predictor(net, self.process, self.target, self.hparams.learn_sigma)
        channels = self.image_shape[0] if self.hparams.learn_sigma else None
        guided = Guided(net, condition, guidance, null=null, mean_channels=channels)
        return Predictor(guided, self.process, self.target, self.hparams.learn_sigma)

    def condition(
        self, labels: Any = None, prompts: list[str] | None = None, guidance: float = 0.0
    ) -> tuple[torch.Tensor | None, torch.Tensor | int | None]:
        """(the condition of each image as the network takes it, the null condition ∅), or
        (None, None) for an unconditional network; ValueError for a condition it cannot take."""
        k = self.num_classes
        if prompts is not None and not self.text:
            raise ValueError("prompts need a text-conditional model (trained with text_encoder=)")
        if labels is not None and not k:
            raise ValueError(
                "labels need a class-conditional model; this one was trained without classes "
                "(model.num_classes=0)"
            )
        if self.text:
            ids = None if prompts is None else self.net.tokenize(list(prompts)).to(self.device)
            return ids, self.net.null()
        if not k:
            if guidance:
                raise ValueError("guidance needs a conditional model (classes or prompts)")
            return None, None
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < k:
                raise ValueError(f"labels must be in [0, {k}) for this model's {k} classes, got "
                                 f"{sorted(set(labels.tolist()) - set(range(k)))}")  # fmt: skip
            labels = labels.to(self.device)
        return labels, k

    # ----- training -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        x0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        seed = mix(self.hparams.seed, self._batches_seen, self.global_rank)
        self._batches_seen += 1
        x0 = x0.contiguous(memory_format=self.memory_format)
        net = self._compiled_forward or self.net
        with seeded(seed, self.device):
            if y is not None:  # labels or captions dropped to ∅ with probability p_uncond
                y, null = self.condition_batch(y)
                drop = torch.rand(y.shape[0], device=y.device) < self.hparams.cond_drop_prob
                drop = drop.reshape(-1, *([1] * (y.ndim - 1)))
                y = torch.where(drop, torch.as_tensor(null, device=y.device), y)
            if self.time_sampler is None:
                loss = self.objective(net, x0, y=y).mean()
            else:  # t ~ p_t, each loss weighted by 1 / (T p_t) (diffusion.training.time_sampling)
                t, weight = self.time_sampler.sample(x0.shape[0], x0.device)
                losses = self.objective(net, x0, t, y=y)
                loss = (losses * weight).mean()
        if not torch.isfinite(loss):
            step = self.global_step
            give_up = self._skipped_in_a_row >= self.hparams.max_skipped_steps
            if self.hparams.nonfinite_loss == "error" or give_up:
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at step {step} (batch {batch_idx}); the "
                    "run stopped and the last checkpoint is untouched. Lower optimizer.lr, check "
                    "the data, or set module.nonfinite_loss=skip"
                )
            self._skipped_in_a_row += 1
            self.log("train/skipped_steps", float(self._skipped_in_a_row))
            return None  # Lightning skips the optimizer step
        self._skipped_in_a_row = 0
        if self.time_sampler is not None:  # every rank keeps the same history
            gathered = self.all_gather(torch.stack([t.to(losses), losses.detach()]))
            self.time_sampler.update(*gathered.reshape(-1, 2, t.shape[0]).transpose(0, 1)
                                     .reshape(2, -1))  # fmt: skip
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def condition_batch(self, y: torch.Tensor | list[str]) -> tuple[torch.Tensor, Any]:
        """A batch's conditions as the network takes them (captions tokenized), and ∅."""
        if self.text:
            return self.net.tokenize(list(y)).to(self.device), self.net.null()
        return y, self.num_classes

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, not in on_train_batch_end: callbacks (the
        # checkpoint among them) run that hook before the module, so a checkpoint written there
        # would hold step n's weights with only n - 1 EMA updates, and a resumed run would lack one.
        super().optimizer_step(*args, **kwargs)
        if self._skipped_in_a_row == 0:
            self.ema.update(self.net)

    def validation_step(self, batch, batch_idx: int) -> None:
        # Fixed t's and noise seeded by the batch index: the same numbers for the same weights.
        x0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if y is not None:
            y = self.condition_batch(y)[0]
        generator = torch.Generator().manual_seed(batch_idx)
        x0 = x0.contiguous(memory_format=self.memory_format)
        losses = []
        for step in self.val_t.tolist():
            eps = (
                torch.randn(x0.shape, generator=generator)
                .to(x0)
                .contiguous(memory_format=self.memory_format)
            )
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=self.val_t.dtype)
            losses.append(self.objective(self.ema, x0, t, eps, y=y))
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_optimizers(self) -> dict:
        optimizer = instantiate(self.hparams.optimizer)(params=self.net.parameters())
        warmup = max(int(self.hparams.warmup_steps), 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.process, GaussianDiffusion):  # the exact float64 schedule used
            checkpoint["beta"] = self.process.beta64.clone()
        checkpoint["batches_seen"] = self._batches_seen
        if self.class_names is not None:
            checkpoint["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._batches_seen = checkpoint.get("batches_seen", 0)
        self.class_names = checkpoint.get("class_names")

    # ----- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        callback: Callback | None = None,
        sampler: Mapping | None = None,
        x_T: torch.Tensor | None = None,
        labels: torch.Tensor | list[int] | None = None,
        guidance: float = 0.0,
        prompts: list[str] | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` images in [-1, 1], shape (n, C, H, W).

        ``sampler`` is a ``_partial_`` sampler config (default: the one the model was trained
        with); ``generator`` (a CPU generator) fixes the initial noise x_T ~ N(0, I) and the
        sampler's noise, or ``x_T`` gives the initial noise directly. A class-conditional model
        draws image i of class ``labels[i]`` (n labels; None: unconditional, the null class)
        with classifier-free guidance ``guidance`` = w ≥ 0 (0: the conditional model); a
        text-conditional one draws image i for ``prompts[i]`` (None: the empty prompt).
        """
        for name, given in (("labels", labels), ("prompts", prompts)):
            if given is not None and len(given) != n:
                raise ValueError(f"{len(given)} {name} for {n} images: give one per image")
        model = self.ema if use_ema else self.net
        was_training = model.training
        # channels_last convolutions sample about 2x faster on the CPU (experiments/fid_vs_nfe)
        model.eval().to(memory_format=torch.channels_last)
        if x_T is None:
            x_T = torch.randn((n, *self.image_shape), generator=generator)
        x_T = x_T.to(self.device, memory_format=torch.channels_last)
        sampler = _plain(sampler) if sampler is not None else self.hparams.sampler
        self.check_sampler(sampler)
        sample_fn = instantiate(sampler)
        device_gen = generator
        if generator is not None and self.device.type != "cpu":
            seed = int(torch.randint(2**62, (1,), generator=generator))
            device_gen = torch.Generator(self.device).manual_seed(seed)
        model = self.predictor(use_ema, labels, guidance, prompts)
        x0 = sample_fn(model, x_T, self.process, generator=device_gen, callback=callback)
        network = self.ema if use_ema else self.net
        network.train(was_training).to(memory_format=self.memory_format)
        return x0.clamp(-1.0, 1.0)
