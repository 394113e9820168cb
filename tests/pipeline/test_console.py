"""The driver's console: Ray's chatter to log.txt only, capsnet's own lines to the terminal."""

from __future__ import annotations

import os
import sys

from pipeline.train.console import DriverConsole, LocalConsole, visible

CHATTER = [
    "2026-11-26 20:00:00,000\tWARNING controller.py:123 -- Failed to query Ray Train "
    "Controller actor state",
    "[2026-11-26 20:00:01,000 E 123 456] core_worker.cc:789: PreemptionWatcher error",
    "(TrainController pid=4242) {'epoch': 1, 'test_accuracy': 0.5, 'train_loss': 0.3}",
]
OURS = "(RayTrainWorker pid=123, ip=127.0.0.1) [capsnet] epoch 1/2 step 5/10 loss 0.3 ETA 0m05s"


def test_visible_lines():
    assert visible(OURS) == "[capsnet] epoch 1/2 step 5/10 loss 0.3 ETA 0m05s"
    assert visible("\x1b[36m(RayTrainWorker pid=9)\x1b[0m [capsnet] hi") == "[capsnet] hi"
    assert visible("ValueError: non-finite loss") == "ValueError: non-finite loss"
    assert visible("ray.exceptions.RayTaskError: boom") is not None
    for line in CHATTER:
        assert visible(line) is None, line


def test_driver_console_filters_fd_level_output(tmp_path, capfd):
    log = tmp_path / "log.txt"
    with DriverConsole(log):
        for line in CHATTER:  # C++ code writes to the descriptor, not to sys.stdout
            os.write(2, (line + "\n").encode())
        os.write(1, (OURS + "\n").encode())
        os.write(1, (OURS + "\n").encode())  # forwarded twice by Ray: shown once
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[capsnet] epoch 1/2 step 5/10 loss 0.3 ETA 0m05s"]
    text = log.read_text()
    assert all(line in text for line in CHATTER) and text.count("[capsnet]") == 2


def test_driver_console_verbose_shows_everything(tmp_path, capfd):
    with DriverConsole(tmp_path / "log.txt", verbose=True):
        os.write(1, (CHATTER[0] + "\n").encode())
    assert CHATTER[0] in capfd.readouterr().out


def test_local_console_tees_stdout(tmp_path, capsys):
    with LocalConsole(tmp_path / "log.txt"):
        print("[capsnet] epoch 1/1")
        sys.stderr.write("progress bar\r")
    assert "[capsnet] epoch 1/1" in capsys.readouterr().out
    assert (tmp_path / "log.txt").read_text() == "[capsnet] epoch 1/1\n"


def _console_over_a_stuck_terminal(tmp_path, *, hang_up: bool) -> tuple[bool, str]:
    """Run DriverConsole while fd 1 (the terminal it echoes to) is a pipe nobody reads (a
    paused terminal: it fills) or whose reader is gone (writes fail). Returns (whether 2,000
    shown lines were printed within 10 s, log.txt)."""
    import threading

    read_end, write_end = os.pipe()
    if hang_up:
        os.close(read_end)
    saved = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    log = tmp_path / "log.txt"
    done = threading.Event()
    try:
        with DriverConsole(log):

            def chatter():
                for i in range(2000):  # ~150 kB of shown lines: more than a pipe holds
                    os.write(2, f"[capsnet] line {i} {'x' * 60}\n".encode())
                done.set()

            worker = threading.Thread(target=chatter, daemon=True)
            worker.start()
            finished = done.wait(timeout=10.0)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        if not hang_up:
            os.close(read_end)
    return finished, log.read_text()


def test_a_paused_terminal_never_blocks_the_run(tmp_path):
    finished, text = _console_over_a_stuck_terminal(tmp_path, hang_up=False)
    assert finished, "prints blocked behind a terminal nobody reads"
    assert "[capsnet] line 1999" in text  # log.txt has every line


def test_a_terminal_that_went_away_does_not_stop_the_log(tmp_path):
    finished, text = _console_over_a_stuck_terminal(tmp_path, hang_up=True)
    assert finished, "prints blocked after the terminal write failed"
    assert "[capsnet] line 1999" in text
