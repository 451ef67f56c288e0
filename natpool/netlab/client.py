"""The test side of an agent: start it in a host namespace, send JSON-line requests, wait for replies.

A reader thread turns the agent's stdout into a queue, so every wait has a
deadline (:class:`AgentError` on timeout, with the agent's stderr tail) and a
hung agent can never hang the test. :meth:`Agent.close` always ends the
process: ``quit``, then SIGKILL if it has not exited within a second.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Any

from natpool.netlab.lab import Lab


class AgentError(RuntimeError):
    """The agent reported an error, died, or did not answer in time."""


class Agent:
    """One ``natpool.netlab.agent`` process inside host ``host``'s namespace of ``lab``."""

    def __init__(self, lab: Lab, host: str, *, start_timeout: float = 20.0) -> None:
        self.lab = lab
        self.host = host
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(lab.agent_argv(host), stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603
                                      stderr=self._stderr, text=True, bufsize=1)
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._pending: dict[int, dict[str, Any]] = {}
        self._next_id = 1
        self._reader = threading.Thread(target=self._read, name=f"agent-{host}-reader", daemon=True)
        self._reader.start()
        try:
            ready = self.reply(0, timeout=start_timeout)
        except BaseException:
            self.close()
            raise
        self.pid = int(ready["pid"])

    def _read(self) -> None:
        out = self._proc.stdout
        assert out is not None
        for line in out:
            with contextlib.suppress(ValueError):
                self._replies.put(json.loads(line))
        self._replies.put(None)  # EOF: the agent is gone

    def stderr_tail(self, limit: int = 3000) -> str:
        with contextlib.suppress(ValueError, OSError):
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-limit:]
        return ""

    def request(self, cmd: str, **args: Any) -> int:
        """Send one request; returns its id (wait for the answer with :meth:`reply`)."""
        rid = self._next_id
        self._next_id += 1
        stdin = self._proc.stdin
        if stdin is None or self._proc.poll() is not None:
            raise AgentError(f"agent {self.host} is not running\n{self.stderr_tail()}")
        try:
            stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}) + "\n")
            stdin.flush()
        except OSError as exc:
            raise AgentError(f"agent {self.host}: {exc}\n{self.stderr_tail()}") from exc
        return rid

    def reply(self, rid: int, timeout: float = 15.0) -> dict[str, Any]:
        """The result of request ``rid``; AgentError if it failed, the agent died or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while rid not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"agent {self.host}: no reply to request {rid} within {timeout}s\n"
                                 f"{self.stderr_tail()}")
            try:
                msg = self._replies.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                self._replies.put(None)
                raise AgentError(f"agent {self.host} exited ({self._proc.poll()})\n{self.stderr_tail()}")
            self._pending[int(msg.get("id") or 0)] = msg
        msg = self._pending.pop(rid)
        if not msg.get("ok"):
            raise AgentError(f"agent {self.host}: {msg.get('error')}\n{msg.get('traceback', '')}")
        result: dict[str, Any] = msg.get("result") or {}
        return result

    def call(self, cmd: str, *, wait: float = 15.0, **args: Any) -> dict[str, Any]:
        """``request`` + ``reply`` (``wait``: the reply's failure bound; ``args`` go to the agent)."""
        return self.reply(self.request(cmd, **args), wait)

    def wait(self, timeout: float) -> int:
        """The agent's exit status once it has ended; AgentError if it still runs after ``timeout``."""
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AgentError(f"agent {self.host} still running after {timeout}s") from None

    def close(self) -> None:
        """End the process (quit, then kill); idempotent."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"id": -1, "cmd": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5.0)
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
