"""Text conditioning: prompts → token ids → a text encoder → the U-Net's cross-attention.

A prompt batch travels as token ids (B, L), L the encoder's ``max_length``, padded with
:data:`PAD` = -1, so that conditions of any kind are one tensor per batch that guidance can
concatenate (diffusion.processes.guidance; the null condition is the empty prompt ""). The
encoder turns ids into a context (B, L, D) and a mask (B, L) of the real tokens; the U-Net
attends to the context at its attention levels (diffusion.nn.unet, ``context_dim`` = D), with
padding masked out, as in Imagen and Stable Diffusion.

``ByteEncoder`` (``text_encoder=bytes``): a small pre-norm transformer over UTF-8 bytes, trained
with the U-Net; it needs no files, so it is the offline default. Every prompt starts with a BOS
token, so the empty prompt has one token to attend to.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

log = logging.getLogger(__name__)

PAD = -1  #: token id of padding in a batch of prompts


class Truncation:
    """Warns, once per prompt (and for at most ``limit`` prompts), that a prompt was cut."""

    def __init__(self, limit: int = 10) -> None:
        self.seen: set[str] = set()
        self.limit = limit

    def __call__(self, prompt: str, kept: int, max_length: int, unit: str) -> None:
        if prompt in self.seen or len(self.seen) > self.limit:
            return
        self.seen.add(prompt)
        if len(self.seen) > self.limit:
            log.warning("more prompts are truncated; they are not reported one by one")
            return
        log.warning(
            "prompt truncated to the text encoder's context: %r has more than %d %s "
            "(text_encoder.max_length=%d), the rest is ignored",
            prompt[:60] + ("…" if len(prompt) > 60 else ""), kept, unit, max_length,
        )  # fmt: skip


class ByteEncoder(nn.Module):
    """Prompts as UTF-8 bytes through a transformer encoder: (B, L) ids -> (B, L, width).

    Ids: 0 (unused), 1 BOS, 2 + b for byte b. Args: ``width`` (D, the U-Net's context_dim),
    ``depth`` layers of ``heads`` heads, ``max_length`` tokens (BOS included).
    """

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 64):
        super().__init__()
        if width < 1 or depth < 1 or heads < 1 or width % heads:
            raise ValueError(
                f"text_encoder.width={width} must split into text_encoder.heads={heads}, "
                f"and text_encoder.depth={depth} be >= 1"
            )
        if max_length < 2:
            raise ValueError(f"text_encoder.max_length={max_length} must be >= 2")
        self.width, self.max_length = width, max_length
        self.embed = nn.Embedding(258, width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.truncation = Truncation()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) ids of the prompts, padded with PAD; a prompt longer than the
        context is truncated, with a warning that says so."""
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            data = prompt.encode("utf-8")
            if len(data) > self.max_length - 1:
                self.truncation(prompt, self.max_length - 1, self.max_length, "bytes")
                data = data[: self.max_length - 1]
            ids[i, 0] = 1
            ids[i, 1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.long) + 2
        return ids

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, width), mask (B, L), True at real tokens)."""
        mask = ids != PAD
        h = self.embed(ids.clamp(min=0)) + self.position[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


class TextConditioned(nn.Module):
    """``net(x, t, ids)``: the U-Net conditioned on prompts through its cross-attention.

    ``ids`` (B, L) token ids of :meth:`tokenize`; None means the empty prompt (the null
    condition ∅ of classifier-free guidance).
    """

    text = True  #: conditioned on prompts
    num_classes = 0

    def __init__(self, unet: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.encoder = unet, encoder
        self.image_size, self.in_channels = unet.image_size, unet.in_channels

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.tokenize(list(prompts))

    def null(self) -> torch.Tensor:
        """The ids of the empty prompt, (L,)."""
        return self.tokenize([""])[0]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if ids is None:
            ids = self.null().to(x.device).expand(x.shape[0], -1)
        context, mask = self.encoder(ids)
        return self.unet(x, t, context=context, context_mask=mask)


class PretrainedTextEncoder(nn.Module):
    """A frozen ``transformers`` text encoder: CLIP's text tower (``kind="clip"``, as Stable
    Diffusion) or T5's encoder (``"t5"``, as Imagen), with its tokenizer, from a local folder or
    a hub id (``subfolder`` for a pipeline's ``text_encoder/``). Its output is the context.

    The model is held outside the module's parameters: never trained, not in checkpoints (a
    checkpoint names it; loading it needs the folder or the network), shared, not copied, by
    the EMA, and run in float16 on GPUs. ``max_length`` tokens per prompt (longer prompts are
    truncated with a warning). ``cache_size`` > 0 keeps the contexts of that many distinct
    prompts (a dataset's captions, in float16 on the CPU), so each is encoded once per run.
    """

    KINDS = {
        "clip": ("CLIPTextModel", ("clip_text_model", "clip")),
        "t5": ("T5EncoderModel", ("t5",)),
    }

    def __init__(
        self,
        kind: str,
        name: str,
        subfolder: str | None = None,
        max_length: int = 77,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(
                f"text_encoder.kind={kind!r} is invalid: choose one of {sorted(self.KINDS)}"
            )
        if max_length < 2:
            raise ValueError(f"text_encoder.max_length={max_length} must be >= 2")
        if cache_size < 0:
            raise ValueError(f"text_encoder.cache_size={cache_size} must be >= 0")
        try:
            import transformers
        except ImportError:
            raise ValueError(
                f"text_encoder={kind} needs transformers: pip install -e '.[text]'"
            ) from None
        where = f"text_encoder.name={name!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        extra = {"subfolder": subfolder} if subfolder else {}
        try:
            config = transformers.AutoConfig.from_pretrained(name, **extra)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{where} is neither a folder with a text encoder nor reachable on the hub "
                f"({type(err).__name__}); offline, give the folder of a saved {kind} encoder"
            ) from None
        model_class, types = self.KINDS[kind]
        if config.model_type not in types:
            raise ValueError(
                f"{where} holds a {config.model_type!r} model, not a {kind} text encoder"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **extra)
        except (OSError, ValueError) as err:
            raise ValueError(f"{where} has no tokenizer ({type(err).__name__})") from None
        model = getattr(transformers, model_class).from_pretrained(name, **extra)
        object.__setattr__(self, "model", model.requires_grad_(False).eval())
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, max_length
        self.width = int(getattr(model.config, "hidden_size", None) or model.config.d_model)
        self.truncation = Truncation()
        self.cache_size = cache_size
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # ids -> context (L, D)

    def _apply(self, fn, recurse: bool = True):  # .to(device) moves the held model too
        super()._apply(fn, recurse)
        self.model._apply(fn, recurse)
        return self

    def __deepcopy__(self, memo: dict) -> PretrainedTextEncoder:
        """A copy sharing the frozen model and the tokenizer (the EMA needs no second one)."""
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            shared = key in ("model", "tokenizer")
            object.__setattr__(new, key, value if shared else copy.deepcopy(value, memo))
        return new

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) token ids, PAD where the tokenizer pads; at least one token each."""
        full = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        for prompt, ids in zip(prompts, full, strict=True):
            if len(ids) > self.max_length:
                self.truncation(prompt, self.max_length, self.max_length, "tokens")
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")  # fmt: skip
        ids = torch.where(enc["attention_mask"].bool(), enc["input_ids"].long(), PAD)
        empty = (ids == PAD).all(dim=1)
        first = self.tokenizer.eos_token_id or self.tokenizer.pad_token_id or 0
        ids[empty, 0] = first  # a prompt the tokenizer makes nothing of still has one token
        return ids

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's last hidden states (B, L, D) for token ids (B, L), float32."""
        mask = ids != PAD
        pad = self.tokenizer.pad_token_id or 0
        half = ids.device.type == "cuda"
        model = self.model.half() if half else self.model
        with torch.no_grad():
            out = model(input_ids=ids.where(mask, pad), attention_mask=mask.long())
        return out.last_hidden_state.float()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != PAD
        if not self.cache_size:
            return self.encode(ids), mask
        keys = [row.cpu().numpy().tobytes() for row in ids]
        todo = sorted({i for i, key in enumerate(keys) if key not in self.cache})
        if todo:
            for i, context in zip(todo, self.encode(ids[todo]), strict=True):
                self.cache[keys[i]] = context.half().cpu()
        rows = []
        for key in keys:
            self.cache.move_to_end(key)
            rows.append(self.cache[key])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)  # the least recently used
        return torch.stack(rows).to(ids.device, torch.float32), mask
