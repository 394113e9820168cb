"""What a person sees while a Ray run goes on: capsnet's own lines; the rest goes to log.txt.

A Ray driver's terminal gets Ray's internal chatter as well as the run's progress (in one
measured run 367 of 389 lines were `Failed to query Ray Train Controller actor state`), from
Python loggers, forwarded worker output and C++ code writing straight to file descriptors 1
and 2. So `DriverConsole` redirects the descriptors themselves into a pipe: every line goes to
the run's `log.txt`, and only capsnet's own lines (`[capsnet] ...`, with Ray's
`(RayTrainWorker pid=...)` prefix removed) and error lines reach the terminal, unless verbose.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from pathlib import Path

from pipeline.redact import redact

_RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\((\w+) pid=\d+(, ip=[^)]*)?\)(\x1b\[[0-9;]*m)*\s?")
_END = b"\x00capsnet-console-end\x00"
_SHOWN = re.compile(r"\[capsnet\]|\[smoke\]|^(\w+\.)*\w*(Error|Exception|Interrupt)\b:")


def visible(line: str) -> str | None:
    """The line as the terminal should show it, or None to keep it in log.txt only."""
    text = _RAY_PREFIX.sub("", line)
    return text if _SHOWN.search(text) else None


class DriverConsole:
    """Context manager: fds 1 and 2 -> log.txt (all) + the terminal (capsnet's lines only,
    everything with verbose=True). Lines shown twice in a row (Ray can forward a worker's
    line twice) are shown once.

    The run never waits for the terminal: one thread drains the pipe into log.txt, another
    echoes to the terminal from a bounded queue. A terminal that stops reading (a paused
    ssh session, Ctrl-S) costs dropped terminal lines, counted in log.txt; one that is gone
    (EPIPE) stops the echo only. Either way every line still reaches log.txt."""

    ECHO_QUEUE = 10_000
    """Shown lines waiting for a slow terminal before new ones are dropped."""

    def __init__(self, log_path: Path, *, verbose: bool = False):
        self.log_path, self.verbose = Path(log_path), verbose
        self._saved: list[int] = []
        self._thread: threading.Thread | None = None
        self._open = False
        self._drained = threading.Event()
        self._echo: queue.Queue[str | None] = queue.Queue(self.ECHO_QUEUE)
        self.dropped = 0
        """Shown lines the terminal did not take in time (log.txt has them)."""

    def __enter__(self) -> DriverConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._open = True
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._thread.start()
        threading.Thread(target=self._echo_lines, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, _END + b"\n")  # everything before it is shown before we return
        self._drained.wait(timeout=5.0)  # (unless the terminal is not reading)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        # Processes Ray started may still hold the pipe: the pump keeps writing log.txt, and
        # echoes nothing more once the terminal is ours again.

    def _pump(self, read_end: int) -> None:
        last_shown = None
        with open(read_end, "rb", buffering=0) as pipe, open(self.log_path, "ab") as log:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    if raw == _END:
                        self._open = False
                        self._put(None)  # the echo sets _drained when it gets here
                        continue
                    line = redact(raw.decode("utf-8", "replace"))  # whole lines: URLs intact
                    log.write((line + "\n").encode())
                    shown = line if self.verbose else visible(line)
                    if shown is None or shown == last_shown or not self._open:
                        continue
                    last_shown = shown
                    self._put(shown)
                log.flush()
                if self.dropped and not self._open:
                    log.write(
                        f"[capsnet] {self.dropped} line(s) not shown: the terminal "
                        "was not reading\n".encode()
                    )
                    self.dropped = 0
            if pending:
                log.write(redact(pending.decode("utf-8", "replace")).encode())

    def _put(self, line: str | None) -> None:
        try:
            self._echo.put_nowait(line)
        except queue.Full:
            self.dropped += line is not None
            if line is None:
                self._drained.set()

    def _echo_lines(self) -> None:
        terminal, alive = self._saved[0], True
        while True:
            line = self._echo.get()
            if line is None:
                self._drained.set()
                continue
            if not alive:
                continue
            try:
                os.write(terminal, (line + "\n").encode())
            except OSError:  # the terminal is gone: keep logging, stop echoing
                alive = False


class _Tee:
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        text = redact(text)
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class LocalConsole:
    """`--local` runs: what the run prints goes to the terminal as usual and to log.txt too
    (the progress bar, on stderr, stays on the terminal only)."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)

    def __enter__(self) -> LocalConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        self._stdout = sys.stdout
        sys.stdout = _Tee(sys.stdout, self._log)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._stdout
        self._log.close()
