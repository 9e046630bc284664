"""Metric sinks for a run: metrics.jsonl (one JSON object per logged step), TensorBoard events, a progress bar."""
from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from maxdpo.atomic import write_text


def _complete_rows(path: Path) -> list[str]:
    """The file's rows; a last row cut short by a killed process is left out."""
    lines = path.read_text().splitlines()
    rows = [line for line in lines[:-1] if line]
    if lines:
        try:
            json.loads(lines[-1])
            rows.append(lines[-1])
        except json.JSONDecodeError:
            pass
    return rows


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in _complete_rows(path)] if path.is_file() else []


def drop_rows_after(path: Path, step: int) -> None:
    """On resume, rows logged after the restored checkpoint are dropped: they will be logged again."""
    if not path.is_file():
        return
    kept = [line for line in _complete_rows(path) if json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            drop_rows_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard")) if enabled else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="dpo", dynamic_ncols=True, disable=not enabled)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def write(self, row: dict) -> None:
        """`row` has `step` and float metrics; eval rows carry the `eval_` prefix already."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for name, value in row.items():
            if name != "step":
                self.tensorboard.add_scalar(name, value, row["step"])
        shown = {k: row[k] for k in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies") if k in row}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        if any(k.startswith("eval_") for k in row):
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
        self.bar.close()
