"""`medtune-report --run PATH`: plot loss, eval loss and tokens/s of a finished run to report.png, no W&B account.

PATH is a W&B run folder (offline-run-*/run-*), its .wandb file, or a training output_dir. W&B transaction logs are
read with wandb's own reader (`wandb leet inspect --json`); an output_dir with W&B runs under wandb/ uses those (all
segments of the newest run id, so a resumed run is one curve), else the Trainer's trainer_state.json log_history
(output_dir/trainer_state.json or the newest checkpoint's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from medtune.checkpoints import checkpoints

PLOTS = {"loss": "train loss", "eval_loss": "eval loss", "tokens_per_second": "tokens/s"}


def wandb_records(run_file: str | os.PathLike, kind: str = "history") -> list[dict]:
    """Records of one type ("history", "config", "artifact", ...) of a .wandb transaction log or run folder,
    read by the wandb CLI's own reader (`wandb leet inspect --json`)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, env=env, check=True).stdout
    records = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    return [r[kind] for r in records if r.get("type") == kind]


def _from_wandb(item: dict) -> dict | None:
    """A W&B history row in the Trainer's key names: train/loss -> loss, eval/loss -> eval_loss."""
    step = item.get("train/global_step")
    if step is None:
        return None
    row = {"step": int(step)}
    for key, value in item.items():
        if key.startswith(("train/", "eval/")) and key != "train/global_step":
            prefix, name = key.split("/", 1)
            row[f"eval_{name}" if prefix == "eval" else name] = value
    return row


def _run_files(path: Path) -> list[Path]:
    """The .wandb logs under path, oldest first, of the newest run id (a resumed run has one folder per job)."""
    if path.suffix == ".wandb":
        return [path]
    direct = sorted(path.glob("run-*.wandb"))
    if direct:
        return direct
    logs = sorted(path.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name.split("-")[-2])
    if not logs:
        return []
    newest_id = logs[-1].stem.removeprefix("run-")
    return [p for p in logs if p.stem.removeprefix("run-") == newest_id]


def _trainer_state(path: Path) -> Path | None:
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    return next((c / "trainer_state.json" for c in checkpoints(path) if (c / "trainer_state.json").is_file()), None)


def load_history(path: str | os.PathLike) -> list[dict]:
    """Logged rows of a run as Trainer-style dicts with a "step" key, merged by step (later logs win)."""
    path = Path(path)
    run_files = _run_files(path)
    if run_files:
        rows = [row for f in run_files for row in (_from_wandb(r["item"]) for r in wandb_records(f)) if row]
    elif (state := _trainer_state(path)) is not None:
        rows = [dict(row) for row in json.loads(state.read_text())["log_history"] if "step" in row]
    else:
        raise FileNotFoundError(f"{path}: no W&B run (run-*.wandb) and no trainer_state.json found")
    merged: dict[tuple, dict] = {}
    for row in rows:  # a resumed job re-logs the steps after its checkpoint; the later value is kept
        kind = "eval" if any(k.startswith("eval_") for k in row) else "train"
        merged.setdefault((row["step"], kind), {}).update(row)
    return sorted(merged.values(), key=lambda r: r["step"])


def plot_report(history: list[dict], out_png: str | os.PathLike) -> dict[str, tuple[list, list]]:
    """Write the plot; returns {metric: (steps, values)} exactly as drawn, read back from the figure's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    plotted = {}
    for key, label in PLOTS.items():
        points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        ax = ax_speed if key == "tokens_per_second" else ax_loss
        (line,) = ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        plotted[key] = (list(line.get_xdata()), list(line.get_ydata()))
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.set_ylabel("real tokens / s (all devices)")
    ax_speed.set_xlabel("optimizer step")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return plotted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medtune-report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="W&B run folder or .wandb file, or a training output_dir")
    parser.add_argument("--out", help="folder for report.png (default: the run folder)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    history = load_history(run)
    out_dir = Path(args.out) if args.out else (run.parent if run.is_file() else run)
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted = plot_report(history, out_dir / "report.png")
    summary = ", ".join(f"{k}: {len(v[0])} points, last {v[1][-1]:.4g}" for k, v in plotted.items())
    print(f"{out_dir / 'report.png'} ({summary or 'nothing to plot'})")


if __name__ == "__main__":
    main()
