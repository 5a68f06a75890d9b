"""`train.py` as a user meets it: one-line errors with exit code 2, one run per workdir (lock), resuming past a corrupt
checkpoint, and the metrics it writes (metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import train
from sanawm_jax import cli
from sanawm_jax.training import lock
from sanawm_jax.training.metrics import TENSORBOARD_DIR, read_metrics

METRIC_FIELDS = ("step", "loss", "grad_norm", "learning_rate", "step_time_s", "tokens_per_s")
LEARNING_RATE = 1e-3  # the rate of test_training's runs, so that both modules share one compiled train step


def train_args(data: Path, workdir: Path, *extra: str) -> list[str]:
    """train.py on the embedded default data, as cached once per session."""
    return [
        "--workdir", str(workdir), "--data", str(data / "clips"), "--text", str(data / "text"), "--num-frames", "17",
        "--height", "64", "--width", "96", "--lr", str(LEARNING_RATE), "--seed", "7", "--no-compilation-cache",
        *extra,
    ]


def empty_data(root: Path) -> Path:
    """A clip directory with no clips and an empty text store: enough for train.py to get past its input checks."""
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "clips.jsonl").touch()
    (root / "text").mkdir()
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `train.py argv`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "error: argument --batch-size: must be a positive integer, got '0'"),
    (["--lr", "nan"], "error: argument --lr: must be a positive finite number, got 'nan'"),
    (["--log-every", "0"], "error: argument --log-every: must be a positive integer, got '0'"),
])
def test_bad_flag_is_one_line_naming_it_with_exit_code_2(tmp_path, capsys, flags, message):
    code, lines = run_cli(train_args(empty_data(tmp_path), tmp_path / "run", *flags), capsys)
    assert (code, lines) == (2, [message])
    assert not (tmp_path / "run").exists()


def test_data_without_clip_index_is_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    code, lines = run_cli(["--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "clips")], capsys)
    assert code == 2
    assert lines == [f"error: {tmp_path / 'clips'} is not a clip directory: clips.jsonl is missing"]
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="clips.jsonl is missing"):
        cli.run(train.main, ["--workdir", str(tmp_path / "run"), "--data", str(tmp_path), "--debug"])


# ---- one run per workdir -----------------------------------------------------------------------------------------

HOLD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.WorkdirLock(sys.argv[2]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_workdir_held_by_a_live_run_is_refused_naming_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, lock.__file__, str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        code, lines = run_cli(train_args(empty_data(tmp_path), workdir), capsys)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {workdir} is in use by the training run of pid {holder.pid} on "
                                   f"{socket.gethostname()} started ")
        assert json.loads((workdir / lock.LOCK_FILE).read_text())["pid"] == holder.pid  # left to its holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ---- a resumed run -----------------------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def overwrite_data_files(checkpoint: Path) -> list[Path]:
    """Overwrite the array data files of an orbax checkpoint with random bytes of the same size."""
    files = [path for path in (checkpoint / "state").rglob("*") if path.is_file() and path.parent.name == "d"]
    rng = np.random.default_rng(0)
    for path in files:
        path.write_bytes(rng.bytes(path.stat().st_size))
    return files


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def resumed_run(demo_train_data, tmp_path_factory):
    """A run of 4 steps (checkpoints at steps 2 and 4) started on a workdir with the stale lock of a killed run; its
    step-4 checkpoint is then corrupted and a second run goes on to step 6. Holds both runs' step records, the
    metrics after the first run and the warnings of both."""
    workdir = tmp_path_factory.mktemp("resumed")
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (workdir / lock.LOCK_FILE).write_text(json.dumps(stale))
    warnings = Collect()
    logging.getLogger("sanawm_jax").addHandler(warnings)
    try:
        first = cli.run(train.main, train_args(demo_train_data, workdir, "--steps", "4", "--checkpoint-every", "2"))
        first_metrics = read_metrics(workdir)
        corrupted = overwrite_data_files(workdir / "checkpoints" / "4")
        second = cli.run(train.main, train_args(demo_train_data, workdir, "--steps", "6", "--checkpoint-every", "2"))
    finally:
        logging.getLogger("sanawm_jax").removeHandler(warnings)
    return SimpleNamespace(workdir=workdir, stale=stale, first=first, first_metrics=first_metrics, second=second,
                           corrupted=corrupted, warnings=warnings.messages)


def test_stale_lock_of_a_killed_run_is_taken_over_and_released(resumed_run):
    assert [record["step"] for record in resumed_run.first] == [1, 2, 3, 4]
    taken_over = [message for message in resumed_run.warnings if "taking over the lock" in message]
    assert len(taken_over) == 1 and f"pid {resumed_run.stale['pid']} " in taken_over[0], resumed_run.warnings
    assert not (resumed_run.workdir / lock.LOCK_FILE).exists()


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one_and_is_kept(resumed_run):
    workdir = resumed_run.workdir
    assert any("checkpoint step 4" in message and "cannot be restored" in message for message in resumed_run.warnings)
    assert [record["step"] for record in resumed_run.second] == [3, 4, 5, 6]
    # Resumed exactly at step 2: the same batches and losses as the first run's steps 3 and 4 (same programs on the
    # same inputs: 1e-6, in practice bit-exact).
    assert [r["clips"] for r in resumed_run.second[:2]] == [r["clips"] for r in resumed_run.first[2:]]
    np.testing.assert_allclose([r["loss"] for r in resumed_run.second[:2]],
                               [r["loss"] for r in resumed_run.first[2:]], rtol=1e-6)
    moved = workdir / "corrupt_checkpoints" / "4"
    for path in resumed_run.corrupted:  # never deleted: moved aside with every file
        assert (moved / path.relative_to(workdir / "checkpoints" / "4")).is_file()
    assert sorted(int(path.name) for path in (workdir / "checkpoints").iterdir()) == [2, 4, 6]


def test_metrics_jsonl_has_one_record_per_step_across_the_resume(resumed_run):
    assert [record["step"] for record in resumed_run.first_metrics] == [1, 2, 3, 4]
    metrics = read_metrics(resumed_run.workdir)
    # The first run's records of steps 3 and 4 (after the checkpoint the second run resumed from) were replaced.
    assert [record["step"] for record in metrics] == [1, 2, 3, 4, 5, 6]
    for record in metrics:
        assert set(METRIC_FIELDS) <= set(record) and all(math.isfinite(record[name]) for name in METRIC_FIELDS)
        assert record["learning_rate"] == LEARNING_RATE and record["step_time_s"] > 0
        # 3 latent frames of 2 x 3 latent pixels (64 x 96 at stride 32), patch 1, batch 1: 18 tokens per step.
        np.testing.assert_allclose(record["tokens_per_s"] * record["step_time_s"], 18, rtol=1e-9)
    # --log-every 1: each record holds its own step's values.
    steps = {record["step"]: record for record in resumed_run.first[:2] + resumed_run.second}
    np.testing.assert_allclose([r["loss"] for r in metrics], [steps[r["step"]]["loss"] for r in metrics], rtol=1e-12)
    np.testing.assert_allclose([r["grad_norm"] for r in metrics], [steps[r["step"]]["grad_norm"] for r in metrics],
                               rtol=1e-12)


def read_events(path: Path) -> list[event_pb2.Event]:
    """The events of a TensorBoard event file (TFRecord: length, its CRC, payload, payload CRC)."""
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        events.append(event_pb2.Event.FromString(data[offset + 12: offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_tensorboard_events_hold_the_losses_and_hide_the_replaced_steps(resumed_run):
    files = sorted((resumed_run.workdir / TENSORBOARD_DIR).glob("events.out.tfevents.*"), key=os.path.getmtime)
    assert len(files) == 2  # one per run
    losses = [
        {event.step: value.simple_value for event in read_events(path) for value in event.summary.value
         if value.tag == "train/loss"}
        for path in files
    ]
    assert sorted(losses[0]) == [1, 2, 3, 4] and sorted(losses[1]) == [3, 4, 5, 6]
    by_step = {record["step"]: record["loss"] for record in resumed_run.first + resumed_run.second}
    # Event scalars are float32.
    np.testing.assert_allclose([losses[1][step] for step in (3, 4, 5, 6)], [by_step[s] for s in (3, 4, 5, 6)],
                               rtol=1e-6)
    # The second run starts with a session start at step 3, which makes TensorBoard drop the first run's steps >= 3.
    starts = [event.step for event in read_events(files[1]) if event.HasField("session_log")
              and event.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]
