"""What the user sees while a build works: each step, CACHED or its time, RUN output.

Modes (as `docker build --progress`): `plain` for CI logs (every line
prefixed with its step number), `tty` redraws a step's line in place when it
finishes, `quiet` prints nothing. Progress goes to stderr; stdout stays free
for machine-readable output (`-q` prints the image id there).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "tty" if self.stream.isatty() else "plain"
        if mode not in ("plain", "tty", "quiet"):
            raise ValueError(mode)
        self.mode = mode
        self.number = 0
        self._had_output = False

    def _write(self, text: str) -> None:
        if self.mode != "quiet":
            self.stream.write(text)
            self.stream.flush()

    def step_start(self, title: str) -> None:
        self.number += 1
        self._had_output = False
        self._write(f"#{self.number} {title}\n" if self.mode == "plain" else f"=> {title}")

    def step_done(self, title: str, seconds: float, cached: bool = False) -> None:
        status = "CACHED" if cached else f"DONE {seconds:.1f}s"
        if self.mode == "plain":
            self._write(f"#{self.number} {status}\n")
        elif self._had_output:
            self._write(f"=> {title}  {status}\n")
        else:
            self._write(f"\r\033[K=> {title}  \033[2m{status}\033[0m\n")

    def note(self, text: str) -> None:
        self._write(text + "\n")

    def output(self, data: bytes) -> None:
        text = data.decode(errors="replace")
        if self.mode == "plain":
            lines = text.splitlines()
            self._write("".join(f"#{self.number} {line}\n" for line in lines))
        elif self.mode == "tty":
            if not self._had_output:
                self._write("\n")
                self._had_output = True
            self._write("".join(f"   \033[2m{line}\033[0m\n" for line in text.splitlines()))

    def run_with_output(self, fn: Callable[[], T], read_fd: int, write_fd: int) -> T:
        """Call fn (which writes to write_fd) while streaming what it writes; closes write_fd."""
        pending = bytearray()

        def pump() -> None:
            while True:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                pending.extend(chunk)
                cut = pending.rfind(b"\n")
                if cut >= 0:
                    self.output(bytes(pending[:cut + 1]))
                    del pending[:cut + 1]
            if pending:
                self.output(bytes(pending))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            return fn()
        finally:
            os.close(write_fd)
            reader.join()
