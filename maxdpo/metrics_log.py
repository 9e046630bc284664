"""Metric sinks for a run: metrics.jsonl (one JSON object per logged step), samples.jsonl (policy samples at
evaluations), TensorBoard events, optionally Weights & Biases, a progress bar."""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Optional

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


def _cell(text: str) -> str:
    """Text as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


class WandbSink:
    """Weights & Biases: the same rows under the same names, samples as a table; the run id is kept in the run
    folder so a resumed run continues its W&B run. wandb is imported only when this sink is used."""

    def __init__(self, run_dir: Path, project: str, name: str, tags: list, config: dict):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        write_text(id_file, run_id)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, tags=list(tags), config=config, dir=str(run_dir),
                              id=run_id, resume="allow")

    def write(self, row: dict) -> None:
        self.run.log({name: value for name, value in row.items() if name != "step"}, step=row["step"])

    def write_samples(self, step: int, samples: list[dict]) -> None:
        columns = ["prompt", "chosen", "sample"]
        table = self.wandb.Table(columns=columns, data=[[sample[c] for c in columns] for sample in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """The run's sinks; `wandb`: keyword arguments of a `WandbSink` (None: no W&B)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 wandb: Optional[dict] = None):
        self.enabled = enabled
        self.samples_path = run_dir / "samples.jsonl"
        if enabled:
            drop_rows_after(run_dir / "metrics.jsonl", start_step)
            drop_rows_after(self.samples_path, start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard")) if enabled else None
        self.wandb = WandbSink(run_dir, **wandb) if enabled and wandb else None
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
        if self.wandb:
            self.wandb.write(row)
        shown = {k: row[k] for k in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies") if k in row}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        if any(k.startswith("eval_") for k in row):
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """samples.jsonl rows {step, prompt, chosen, sample} and one TensorBoard text table per evaluation."""
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            f.write("".join(json.dumps({"step": step, **sample}) + "\n" for sample in samples))
        table = ["| prompt | chosen | policy sample |", "|---|---|---|"] + [
            f"| {_cell(s['prompt'])} | {_cell(s['chosen'])} | {_cell(s['sample'])} |" for s in samples]
        self.tensorboard.add_text("samples", "\n".join(table), step)
        if self.wandb:
            self.wandb.write_samples(step, samples)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            if self.wandb:
                self.wandb.close()
        self.bar.close()
