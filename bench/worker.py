"""Worker processes: each contender is measured in a process of its own.

Why a process: peak memory is read from the process's own counters, so no other
contender's caches or threads sit in it; a contender that crashes (a segfault,
the out-of-memory killer) loses one point, not the sweep.

Protocol: the parent writes one JSON request per line on the worker's stdin,
{"contender": name, "settings": Settings.as_dict(), "n": N}, and reads one JSON
reply per line from its stdout: the measurement (see measure.measure_point), or
{"status": "failed", "error": "..."}. Anything else the worker prints goes to
its stderr, kept in a temporary file whose tail explains a crash.

Run as: python -m attnkit.bench.worker
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

STDERR_TAIL = 600  # characters of a dead worker's stderr quoted in its error


def serve(requests, replies):
    """Answer each request line with one reply line until the input ends."""
    from . import contenders
    from .measure import measure_point
    from .settings import Settings

    for line in requests:
        request = json.loads(line)
        try:
            contender = contenders.by_name(request["contender"])
            result = measure_point(contender, Settings.from_dict(request["settings"]), request["n"])
            reply = {"status": "ok", **result}
        except Exception as error:  # one failed point is a result, not the end of the worker
            reply = {"status": "failed", "error": f"{type(error).__name__}: {error}".strip()}
            _release_device_memory()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _release_device_memory():
    """After a failure (out of memory, say), give cached GPU memory back for the next point."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main():
    # Keep stdout for the protocol alone: whatever a library prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


def _describe_exit(code):
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Worker:
    """A worker process measuring one contender, started on first use."""

    def __init__(self, contender_name, settings):
        self.contender_name = contender_name
        self.settings = settings
        self.process = None
        self.log = None

    def _start(self):
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attnkit.bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            # Its own session: Ctrl-C reaches the parent only, which then stops it.
            start_new_session=True,
        )

    def measure(self, n):
        """One measurement at sequence length n, as the worker replied it."""
        if self.process is None:
            self._start()
        request = {"contender": self.contender_name, "settings": self.settings.as_dict(), "n": n}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if reply:
            return json.loads(reply)
        return {"status": "failed", "error": self._death_notice()}

    def _death_notice(self):
        """Why the worker stopped answering; the next measure() starts a fresh one."""
        code = self.process.wait()
        self.log.seek(0)
        tail = self.log.read()[-STDERR_TAIL:].strip()
        self.close()
        notice = f"worker process died ({_describe_exit(code)})"
        return f"{notice}: {tail}" if tail else notice

    def close(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass  # a broken pipe to a killed worker
            self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


class WorkerPool:
    """One Worker per contender; measure(contender, n) is what the sweep calls."""

    def __init__(self, settings):
        self.settings = settings
        self.workers = {}

    def measure(self, contender, n):
        worker = self.workers.get(contender.name)
        if worker is None:
            worker = self.workers[contender.name] = Worker(contender.name, self.settings)
        return worker.measure(n)

    def close(self):
        for worker in self.workers.values():
            worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    main()
