"""One table for a sweep: ``python -m diffusion.report outputs/multiruns/<date_time> [--wandb]``.

Every job directory of the multirun (``<dir>/0``, ``<dir>/1``, …) gives one row: the swept
values (the overrides that differ between jobs, from ``.hydra/overrides.yaml``) and the final
metrics ``diffusion.train`` wrote to ``result.json`` (``val/loss``, and ``val/fid``/``val/kid``
where FID was on). The rows go to ``report.md`` and ``report.csv`` in the multirun directory,
and ``report.png`` plots each metric per sweep point. ``--wandb`` also logs the table and the
plot to W&B, in the sweep's group (offline without credentials).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

from diffusion.errors import UserError, exit_on_user_error


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else []
    return dict(item.split("=", 1) for item in items or [] if "=" in item)


def collect(sweep_dir: str | Path) -> tuple[list[str], list[str], list[dict]]:
    """(swept keys, metric names, rows); a row maps keys, metrics, ``job`` and ``status``."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((p for p in sweep_dir.glob("*") if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))  # fmt: skip
    if not jobs:
        raise UserError(
            f"no runs in {str(sweep_dir)!r}: give a multirun directory such as "
            "outputs/multiruns/<date_time> (it holds one numbered folder per sweep point)"
        )
    overrides = {job: _overrides(job) for job in jobs}
    keys = sorted({k for o in overrides.values() for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1] or keys
    rows, metric_names = [], []
    for job in jobs:
        result_file = job / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        row = {"job": int(job.name), **{k: overrides[job].get(k, "") for k in swept}}
        if result is None:
            row["status"] = "no result.json (failed or still running)"
        else:
            row["status"] = "done"
            row["global_step"] = result["global_step"]
            for name, value in result["metrics"].items():
                row[name] = value
                if name not in metric_names:
                    metric_names.append(name)
        rows.append(row)
    return swept, metric_names, rows


def _markdown(columns: list[str], rows: list[dict]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(swept: list[str], metrics: list[str], rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "done"]
    if len(swept) == 1:  # the values alone, the key on the axis
        labels, xlabel = [str(r[swept[0]]) for r in done], swept[0]
    else:
        labels, xlabel = (
            ["\n".join(f"{k}={r[k]}" for k in swept) or str(r["job"]) for r in done],
            "",
        )
    panels = max(1, len(metrics))
    fig = Figure(figsize=(max(4.0, 1.3 * len(done)) * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=False):
        values = [r.get(metric, float("nan")) for r in done]
        ax.bar(range(len(done)), values, color="tab:blue")
        ax.set_xticks(range(len(done)), labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"sweep over {', '.join(swept)}" if swept else "sweep")
    fig.savefig(path, dpi=100)


def write_report(sweep_dir: str | Path, to_wandb: bool = False) -> list[dict]:
    """Write report.md, report.csv and report.png into ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    swept, metrics, rows = collect(sweep_dir)
    columns = ["job", *swept, *metrics, "global_step", "status"]
    (sweep_dir / "report.md").write_text(_markdown(columns, rows))
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _plot(swept, metrics, rows, sweep_dir / "report.png")
    if to_wandb:
        _log_to_wandb(sweep_dir, columns, rows)
    return rows


def _log_to_wandb(sweep_dir: Path, columns: list[str], rows: list[dict]) -> None:
    import wandb

    from diffusion.wandb_mode import ensure_wandb_never_blocks

    ensure_wandb_never_blocks()
    run = wandb.init(project="diffusion", group=f"sweep-{sweep_dir.name}", job_type="report",
                     name=f"report-{sweep_dir.name}", dir=str(sweep_dir))  # fmt: skip
    table = wandb.Table(columns=columns, data=[[r.get(c, "") for c in columns] for r in rows])
    run.log({"sweep/table": table, "sweep/plot": wandb.Image(str(sweep_dir / "report.png"))})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/multiruns/<date>")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        write_report(args.sweep_dir, to_wandb=args.wandb)
        print((Path(args.sweep_dir) / "report.md").read_text(), end="")


if __name__ == "__main__":
    main()
