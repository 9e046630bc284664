"""`python -m maxdpo.plot RUN [RUN ...] -o curves.png`: a run's training curves, several runs overlaid.

Panels: loss, reward margin, reward accuracy, chosen and rejected rewards and log-probs, learning rate; train
values as lines, evaluations as dashed lines with markers, one colour per run. A metric a run does not log
(KTO has no reward accuracy) leaves its panel without that run. The final export's model card embeds this
picture.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from maxdpo.metrics_log import read_rows

PANELS = (("loss", ("loss",)), ("reward margin", ("rewards/margins",)), ("reward accuracy", ("rewards/accuracies",)),
          ("rewards: chosen (solid), rejected (dotted)", ("rewards/chosen", "rewards/rejected")),
          ("log-probs: chosen (solid), rejected (dotted)", ("logps/chosen", "logps/rejected")),
          ("learning rate", ("learning_rate",)))
COLUMNS = 3
STYLES = {"rewards/rejected": ":", "logps/rejected": ":"}


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[name]) for row in rows if name in row]
    return [step for step, _ in points], [value for _, value in points]


def run_rows(run: Path) -> list[dict]:
    """A run folder's logged rows (metrics.jsonl)."""
    rows = read_rows(run / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} has no logged rows")
    return rows


def draw_curves(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    """Draws the curves of each (label, metrics rows) into the image `out` (PNG, or by its suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_of_panels = -(-len(PANELS) // COLUMNS)
    figure, axes = plt.subplots(rows_of_panels, COLUMNS, figsize=(4.6 * COLUMNS, 3.4 * rows_of_panels),
                                squeeze=False)
    axes = axes.ravel()
    for color, (label, rows) in enumerate(runs):
        for axis, (_, names) in zip(axes, PANELS):
            for name in names:
                style = STYLES.get(name, "-")
                steps, values = _series(rows, name)
                if steps:
                    axis.plot(steps, values, style, color=f"C{color}", label=label if name == names[0] else None)
                steps, values = _series(rows, f"eval_{name}")
                if steps:
                    axis.plot(steps, values, "--" if style == "-" else style, marker="o", markersize=3,
                              color=f"C{color}", label=f"{label} (eval)" if name == names[0] else None)
    for axis, (title, _) in zip(axes, PANELS):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxdpo.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.labels and len(args.labels) != len(args.runs):
        print(f"maxdpo: error: --labels gives {len(args.labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        labels = args.labels or [run.name for run in args.runs]
        draw_curves([(label, run_rows(run)) for label, run in zip(labels, args.runs)], args.out)
    except OSError as err:
        print(f"maxdpo: error: {err}", file=sys.stderr)
        return 2
    print(f"maxdpo: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
