"""``diffusion.visualize`` modes and the arrays the plots draw (diffusion.plots)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from diffusion.errors import ConfigError
from diffusion.evaluation import plots
from diffusion.processes import schedules
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.visualize import available_schedules, visualize


def compose_viz(overrides: list[str], out) -> object:
    with initialize_config_module("diffusion.conf", version_base="1.3"):
        return compose("visualize", overrides=[*overrides, f"out_dir={out}"])


def strip_size(n_cols: int, n_rows: int) -> tuple[int, int]:
    """Pixel size of plots.plot_strips' figure."""
    w = (1.3 + plots.CELL_INCHES * n_cols) * plots.DPI
    h = (0.6 + plots.CELL_INCHES * n_rows) * plots.DPI
    return round(w), round(h)


@pytest.mark.parametrize("name", available_schedules())
def test_schedule_curves_are_the_schedule_modules_arrays(name):
    beta = getattr(schedules, name)(1000)
    curves = plots.schedule_curves(beta)
    process = GaussianDiffusion(beta)
    assert torch.equal(curves["beta"], beta)
    assert torch.allclose(curves["alpha_bar"], torch.cumprod(1 - beta, 0))
    assert torch.allclose(curves["sqrt_alpha_bar"].float(), process.sqrt_alpha_bar, rtol=1e-5)
    snr = process.snr(torch.arange(1000, dtype=torch.float64))
    assert torch.allclose(curves["log_snr"].exp(), snr, rtol=1e-9)
    assert curves["t"][0] == 1 and curves["t"][-1] == 1000


def test_schedule_plot_draws_those_arrays():
    betas = {"linear": schedules.linear(100), "cosine": schedules.cosine(100)}
    curves = {k: plots.schedule_curves(v) for k, v in betas.items()}
    fig = plots.plot_schedules(curves, 100)
    axes = fig.axes
    for ax, (key, *_rest) in zip(axes, plots.PANELS, strict=True):
        drawn = {line.get_label(): line for line in ax.lines}
        assert set(drawn) == {"linear", "cosine"}
        for name, c in curves.items():
            assert torch.allclose(torch.as_tensor(drawn[name].get_ydata()), c[key])
            assert torch.equal(torch.as_tensor(drawn[name].get_xdata()), c["t"])
    assert axes[0].get_yscale() == "log"
    assert "diffusion step t" in axes[3].get_xlabel()


def test_paper_steps_include_both_ends():
    assert plots.paper_steps(1000, 5) == [0, 250, 500, 750, 1000]
    assert plots.paper_steps(3, 10) == [0, 1, 2, 3]


def test_forward_strips_start_at_the_data_and_match_q_sample():
    process = GaussianDiffusion(schedules.linear(50))
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    one_shot, chain = plots.forward_strips(process, x0, [0, 1, 25, 50], seed=3)
    assert one_shot.shape == chain.shape == (4, 2, 1, 4, 4)
    assert torch.equal(one_shot[0], x0) and torch.equal(chain[0], x0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(one_shot[2], process.q_sample(x0, torch.full((2,), 24), eps))
    # the chain's first step uses the same first noise draw as the one-shot sample
    assert torch.allclose(chain[1], one_shot[1], atol=1e-6)


def test_a_strip_is_one_mosaic_with_each_image_in_its_labelled_cell():
    # image (r, c) is the constant r·10 + c (scaled into [-1, 1]): each cell must hold its own
    value = lambda r, c: (r * 10 + c) / 50 - 1  # noqa: E731
    rows = [(f"row {r}", torch.stack([torch.full((1, 4, 6), value(r, c)) for c in range(3)]))
            for r in range(2)]  # fmt: skip
    fig = plots.plot_strips(rows, ["a", "b", "c"], "title")
    (ax,) = fig.axes
    (drawn,) = ax.images
    image = torch.as_tensor(drawn.get_array().data)
    pad = 1
    assert image.shape == (2 * (4 + 2 * pad), 3 * (6 + 2 * pad))
    for r in range(2):
        for c in range(3):
            cell = image[r * 6 : (r + 1) * 6, c * 8 : (c + 1) * 8]
            assert torch.allclose(cell[pad:-pad, pad:-pad], torch.tensor((value(r, c) + 1) / 2))
            assert torch.all(cell[0] == 1) and torch.all(cell[:, 0] == 1)  # white border
    assert [t.get_text() for t in ax.get_yticklabels()] == ["row 0", "row 1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert list(ax.get_xticks()) == [0.5, 1.5, 2.5]  # at the cells' centres (extent = cells)


@pytest.mark.parametrize("label", ["a four, upright and bold", "an eight, slanted and bold too"])
def test_a_strips_row_labels_fit_inside_the_figure(label):
    # prompts label the rows of text-to-image grids; the margin must grow to hold them
    rows = [(label, torch.zeros(3, 1, 8, 8)), ("a one", torch.zeros(3, 1, 8, 8))]
    fig = plots.plot_strips(rows, ["", "", ""], "title")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    (ax,) = fig.axes
    lefts = {t.get_text(): t.get_window_extent(renderer).x0 for t in ax.get_yticklabels()}
    assert lefts[label] >= 0 and lefts["a one"] > lefts[label]
    # control: a short label keeps the old size, so the margin grows only when it must
    short = plots.plot_strips([("a one", torch.zeros(3, 1, 8, 8))], ["", "", ""], "title")
    assert short.get_size_inches()[0] * plots.DPI == pytest.approx(strip_size(3, 1)[0])
    assert fig.get_size_inches()[0] > short.get_size_inches()[0]


def test_strip_columns_are_labelled_in_each_familys_own_time():
    from diffusion.processes.edm import EDM
    from diffusion.processes.sde import VPSDE
    from diffusion.samplers import Step

    def strip_labels(times, time_text=None):
        recorder = plots.TrajectoryRecorder(k=1)
        x = torch.zeros(1, 1, 4, 4)
        for t in times:
            recorder(Step(t=t, x_t=x, x_next=x, x0_hat=x, nfe=1))
        fig = plots.denoising_strip(recorder, len(times), "title", time_text)
        return [label.get_text() for label in fig.axes[0].get_xticklabels()]

    ddpm = GaussianDiffusion(schedules.linear(10))
    assert strip_labels([9.0, 4.0, 0.0], ddpm.time_text) == ["t=10", "t=5", "t=1", "x_0"]
    assert strip_labels([9.0, 4.0, 0.0]) == ["t=10", "t=5", "t=1", "x_0"]  # DDPM's by default
    assert strip_labels([1.0, 0.5], VPSDE().time_text) == ["t=1", "t=0.5", "x_0"]
    assert strip_labels([80.0, 0.002], EDM().time_text) == ["σ=80", "σ=0.002", "x_0"]


def test_mode_forward(tmp_path):
    paths = visualize(compose_viz(["mode=forward", "n=2", "T=100", "num_steps=5"], tmp_path))
    assert [p.name for p in paths] == ["forward.png"]
    with Image.open(paths[0]) as img:
        assert img.size == strip_size(5, 4)


def test_mode_schedules(tmp_path):
    paths = visualize(compose_viz(["mode=schedules", "T=200", "num_steps=6"], tmp_path))
    assert [p.name for p in paths] == ["schedules.png", "schedules_forward.png"]
    with Image.open(paths[0]) as img:
        assert img.size == (1000, 700)
    with Image.open(paths[1]) as img:
        assert img.size == strip_size(6, 4)  # four schedules stacked


def test_mode_schedules_rejects_an_unknown_schedule(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown schedule 'cosin'; available: \['cosine'"):
        visualize(compose_viz(["mode=schedules", "schedules=[cosin]"], tmp_path))


def test_mode_denoise_from_a_checkpoint(tmp_path, tiny_ckpt):
    ckpt = tiny_ckpt
    cfg = compose_viz(
        ["mode=denoise", f"ckpt={ckpt}", "n=2", "num_steps=4", "gif_frames=10"], tmp_path
    )
    paths = visualize(cfg)
    assert [p.name for p in paths] == ["denoise.png", "denoise.gif"]
    with Image.open(paths[0]) as img:
        assert img.size == strip_size(4 + 1, 4)  # 4 steps and x_0; x_t and x̂_0 rows for 2 samples
    with Image.open(paths[1]) as gif:
        assert gif.n_frames == 10 + 1  # and the final image
        assert gif.size[0] >= 2 * 64  # two 16×16 samples upscaled to at least 64 pixels each
    # any sampler: a 5-step DDIM trajectory
    cfg = compose_viz(
        ["mode=denoise", f"ckpt={ckpt}", "n=1", "sampler=ddim", "sampler.steps=5"], tmp_path
    )
    visualize(cfg)
    with Image.open(tmp_path / "denoise.png") as img:
        assert img.size == strip_size(5 + 1, 2)


@pytest.mark.parametrize(
    "override,message",
    [
        ("mode=backward", r"mode='backward' is invalid: choose one of \['forward'"),
        ("mode=denoise", "needs a checkpoint"),
    ],
)
def test_bad_mode_input(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        visualize(compose_viz([override], tmp_path))
