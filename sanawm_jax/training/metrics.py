"""Training metrics on disk: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard event files in
`WORKDIR/tensorboard` (tensorboardX, no TensorFlow).

    writer = MetricsWriter(workdir, step)      # step: where the run starts (0, or the restored checkpoint's step)
    writer.write({"step": 10, "loss": 0.5, ...})
    writer.close()

A run resumed from step s continues both logs after s: records of later steps (written by a run that went past its
last checkpoint) are dropped from metrics.jsonl and hidden from TensorBoard (`purge_step`), so every step appears once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`, in file order ([] if there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def drop_records_after(workdir, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step`."""
    path = Path(workdir) / METRICS_FILE
    records = read_metrics(workdir)
    kept = [record for record in records if record["step"] <= step]
    if len(kept) == len(records):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends records (each with an integer "step" and numeric values) to metrics.jsonl and, as scalars
    `train/<name>`, to TensorBoard."""

    def __init__(self, workdir, step: int):
        workdir = Path(workdir)
        drop_records_after(workdir, step)
        self.file = open(workdir / METRICS_FILE, "a", encoding="utf-8")
        self.tensorboard = SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=step + 1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step":
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()
