"""Pictures of the process: schedule curves, forward-noising strips, denoising trajectories.

Pure functions from tensors to matplotlib Figures / image tensors; the entry point
(``diffusion.visualize``) and the training callbacks save and log them. Figures are built with
``matplotlib.figure.Figure`` (no pyplot, no GUI backend). Images are drawn with nearest-neighbour
interpolation, so a 16×16 or 28×28 digit stays sharp at any display size.

Steps in strips are the paper's t ∈ {0, …, T}: t = 0 is the data x_0 and t ≥ 1 is code index
t - 1 (see diffusion.processes.ddpm).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.textpath import TextPath
from torchvision.utils import make_grid

from diffusion.processes.ddpm import GaussianDiffusion

CELL_INCHES = 0.9  # side of one image in a strip, at DPI pixels per inch
DPI = 100
LABEL_POINTS = 9  # font size of a strip's row and column labels
LEFT_INCHES = 1.2  # the least room left of a strip for its row labels


def label_inches(labels: Sequence[str]) -> float:
    """Width of the widest label at LABEL_POINTS, in inches (72 points each)."""
    widths = [TextPath((0, 0), s, size=LABEL_POINTS).get_extents().width for s in labels if s]
    return max(widths, default=0.0) / 72


def to_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Images in [-1, 1], (N, C, H, W) -> one float grid in [0, 1], (C, H', W')."""
    nrow = nrow or max(1, int(images.shape[0] ** 0.5))
    grid = make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    return grid.clamp(0, 1)


def schedule_curves(beta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The arrays a schedule plot draws, in float64, indexed by the paper's t = 1..T.

    Returns ``t``, ``beta``, ``alpha_bar``, ``sqrt_alpha_bar`` and
    ``log_snr`` = log(ᾱ_t / (1 - ᾱ_t)).
    """
    beta = beta.double().cpu()
    alpha_bar = torch.cumprod(1.0 - beta, 0)
    return {
        "t": torch.arange(1, beta.shape[0] + 1, dtype=torch.float64),
        "beta": beta,
        "alpha_bar": alpha_bar,
        "sqrt_alpha_bar": alpha_bar.sqrt(),
        "log_snr": torch.log(alpha_bar) - torch.log1p(-alpha_bar),
    }


PANELS = [  # key, title, y-axis label, y scale (all quantities are dimensionless)
    ("beta", "β_t, noise added at step t", "β_t (log scale)", "log"),
    ("alpha_bar", "ᾱ_t = ∏ (1 − β_i), signal variance kept", "ᾱ_t", "linear"),
    ("sqrt_alpha_bar", "√ᾱ_t, scale of x_0 in x_t", "√ᾱ_t", "linear"),
    ("log_snr", "log-SNR(t) = ln(ᾱ_t / (1 − ᾱ_t))", "log-SNR (natural log)", "linear"),
]


def plot_schedules(curves: dict[str, dict[str, torch.Tensor]], T: int) -> Figure:
    """β_t, ᾱ_t, √ᾱ_t and log-SNR against t for each named schedule, one legend, shared t axis."""
    fig = Figure(figsize=(10, 7), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (key, title, ylabel, scale) in zip(axes.flat, PANELS, strict=True):
        for name, c in curves.items():
            ax.plot(c["t"].numpy(), c[key].numpy(), label=name, linewidth=1.5)
        ax.set_yscale(scale)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(f"diffusion step t (1 … T = {T})")
    axes[0, 0].legend(title="schedule")
    fig.suptitle(f"Noise schedules at T = {T}")
    return fig


def paper_steps(T: int, num: int) -> list[int]:
    """``num`` evenly spaced paper steps in [0, T], always including 0 and T, increasing."""
    num = max(2, num)
    return sorted({round(i * T / (num - 1)) for i in range(num)})


def forward_strips(
    process: GaussianDiffusion, x0: torch.Tensor, steps: Sequence[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t at paper steps ``steps`` for images ``x0`` (B, C, H, W), two ways from one seed:

    one-shot q(x_t | x_0) with ε drawn once, and the iterated chain q(x_t | x_{t-1}).
    Returns two tensors (len(steps), B, C, H, W).
    """
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    batch = x0.shape[0]
    one_shot = [
        x0 if s == 0 else process.q_sample(x0, torch.full((batch,), s - 1), eps) for s in steps
    ]
    g = torch.Generator().manual_seed(seed)
    chain, x, wanted = [], x0, set(steps)
    if 0 in wanted:
        chain.append(x0)
    for code_t in range(max(steps)):
        x = process.q_step(x, torch.full((batch,), code_t), torch.randn(x.shape, generator=g))
        if code_t + 1 in wanted:
            chain.append(x)
    return torch.stack(one_shot), torch.stack(chain)


def mosaic(rows: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """Images in [-1, 1], one (num_columns, C, H, W) tensor per row -> one (C, H', W') image in
    [0, 1] with ``pad`` white pixels around every cell, so cell (r, c) spans rows
    r·(H + 2·pad) … and columns c·(W + 2·pad) … of the result."""
    cells = torch.stack([r.detach().float().cpu() for r in rows]).clamp(-1, 1).add(1).div(2)
    cells = torch.nn.functional.pad(cells, (pad, pad, pad, pad), value=1.0)
    n_rows, n_cols, c, h, w = cells.shape
    return cells.permute(2, 0, 3, 1, 4).reshape(c, n_rows * h, n_cols * w)


def plot_strips(
    rows: Sequence[tuple[str, torch.Tensor]], column_titles: Sequence[str], title: str
) -> Figure:
    """A labelled grid of images: each row is (label, images (num_columns, C, H, W)).

    The cells are one mosaic drawn on one axes (crisp pixels), labelled through its ticks: one
    axes per cell made a 16-sample strip cost about a second of matplotlib per picture.
    """
    n_rows, n_cols = len(rows), len(column_titles)
    left = max(LEFT_INCHES, label_inches([label for label, _ in rows]) + 0.2)  # a prompt is long
    width, height = left + 0.1 + CELL_INCHES * n_cols, 0.6 + CELL_INCHES * n_rows
    fig = Figure(figsize=(width, height), dpi=DPI)
    side = rows[0][1].shape[-1]
    image = mosaic([images for _, images in rows], pad=max(1, side // 16))
    ax = fig.add_axes((left / width, 0.02, 1 - left / width - 0.01, 1 - 0.62 / height))
    extent = (0, n_cols, n_rows, 0)  # cell (r, c) centred at (c + 0.5, r + 0.5)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                  extent=extent, aspect="auto")  # fmt: skip
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest", extent=extent,
                  aspect="auto")  # fmt: skip
    centres = [i + 0.5 for i in range(max(n_rows, n_cols))]
    ax.set_yticks(centres[:n_rows], [label for label, _ in rows], fontsize=LABEL_POINTS)
    ax.xaxis.tick_top()
    ax.set_xticks(centres[:n_cols], list(column_titles), fontsize=LABEL_POINTS)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, y=1 - 0.05 / height, va="top")  # above the column titles
    return fig


def class_grid(
    images: torch.Tensor, labels: torch.Tensor, names: Sequence[str], title: str
) -> Figure:
    """Images in [-1, 1] with their class labels as a labelled grid: one row per class, in the
    order the classes first appear, each row padded with white cells to the longest."""
    order = list(dict.fromkeys(labels.tolist()))
    rows = [images[labels == c] for c in order]
    width = max(len(r) for r in rows)
    blank = torch.ones_like(images[:1])
    rows = [torch.cat([r, blank.expand(width - len(r), *r.shape[1:])]) for r in rows]
    return plot_strips([(names[c], r) for c, r in zip(order, rows, strict=True)],
                       [""] * width, title)  # fmt: skip


def figure_to_tensor(fig: Figure) -> torch.Tensor:
    """Render a Figure to a float (3, H, W) image in [0, 1], for loggers."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    with Image.open(buf) as img:
        return pil_to_tensor(img.convert("RGB")).float() / 255.0


VIEW_SIDE = 512
"""Grids written as PNG files are upscaled (nearest neighbour) to at least this many pixels
across, so that 16×16 digits can be looked at; the .npz files keep the raw samples."""


def upscale(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor so each image is at least ``min_side``
    pixels wide."""
    factor = max(1, -(-min_side // images.shape[-1]))
    return images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def save_gif(frames: Sequence[torch.Tensor], path, duration_ms: int = 60) -> None:
    """Save (C, H, W) images in [0, 1] as an animated GIF; the last frame is held for 1 s."""
    from PIL import Image

    pil = []
    for frame in frames:
        arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        pil.append(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    durations = [duration_ms] * (len(pil) - 1) + [1000]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=durations, loop=0)


class TrajectoryRecorder:
    """A sampler callback keeping x_t and x̂_0 of the first ``k`` samples at every step.

    After sampling, ``frames`` maps each visited code index t (see diffusion.process) to
    (x_t, x̂_0), each (k, C, H, W) on the sampler's device, and ``final`` holds its output.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.frames: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.final: torch.Tensor | None = None

    def __call__(self, step) -> None:
        # device-side copies: no host sync inside the sampling loop; drawing moves them once
        self.frames[step.t] = (step.x_t[: self.k].clone(), step.x0_hat[: self.k].clone())
        self.final = step.x_next[: self.k].clone()  # the last call leaves the sampler's output

    def pick(self, num: int) -> list[int]:
        """``num`` visited indices, evenly spaced from the first (noisiest) to the last."""
        visited = sorted(self.frames, reverse=True)
        num = min(num, len(visited))
        if num <= 1:
            return visited[:1]
        return [visited[round(i * (len(visited) - 1) / (num - 1))] for i in range(num)]


def denoising_strip(
    recorder: TrajectoryRecorder,
    num_columns: int,
    title: str,
    time_text: Callable[[float], str] | None = None,
) -> Figure:
    """Rows x_t and x̂_0 for each recorded sample at ``num_columns`` visited steps, then x_0.

    Columns are labelled by ``time_text`` (the process's :meth:`time_text`: DDPM's paper step
    t = code index + 1, an SDE's t, EDM's σ); by default as DDPM's.
    """
    assert recorder.final is not None, "run the sampler with the recorder first"
    ts = recorder.pick(num_columns)
    time_text = time_text or (lambda t: f"t={t + 1:.5g}")
    columns = [time_text(t) for t in ts] + ["x_0"]
    rows = []
    for i in range(recorder.final.shape[0]):
        x_t = [recorder.frames[t][0][i] for t in ts] + [recorder.final[i]]
        x0_hat = [recorder.frames[t][1][i] for t in ts] + [recorder.final[i]]
        rows += [(f"#{i} x_t", torch.stack(x_t)), (f"#{i} x̂_0", torch.stack(x0_hat))]
    return plot_strips(rows, columns, title)


def denoising_frames(recorder: TrajectoryRecorder, num_frames: int) -> list[torch.Tensor]:
    """About ``num_frames`` GIF frames from x_T to x_0: top row x_t, bottom row x̂_0, samples
    side by side, in [0, 1]; the last frame shows the output."""
    from torchvision.utils import make_grid

    assert recorder.final is not None, "run the sampler with the recorder first"
    frames = []
    pairs = [recorder.frames[t] for t in recorder.pick(num_frames)]
    pairs.append((recorder.final, recorder.final))
    for x_t, x0_hat in pairs:
        pair = torch.cat([x_t, x0_hat]).clamp(-1, 1)
        grid = make_grid((upscale(pair) + 1) / 2, nrow=x_t.shape[0], padding=2, pad_value=1.0)
        frames.append(grid)
    return frames
