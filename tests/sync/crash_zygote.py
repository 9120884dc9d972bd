"""Run ``ff-sync`` passes as forked children of a process that already imported MLflow.

The crash test needs dozens of passes killed at chosen moments; paying ``import mlflow`` (about
a second) for each would make it too slow. This process imports the sync and MLflow once, opens
no store, then for each command read from stdin — a JSON object ``{"args": [...], "delay":
seconds or null, "log": path}`` — forks a child that runs the real command-line entry point
(``formula_foundry.sync.commands.cli.main``, behind the same import hiding as ``ff-sync``) with
its output in ``log``, and SIGKILLs it after ``delay`` seconds if it is still running. It
answers one JSON line per command: ``{"killed": bool, "rc": int | null, "elapsed": seconds}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from formula_foundry.sync.mlflow.lean_imports import hide_unused_modules

hide_unused_modules()  # as the ff-sync command does, before MLflow is imported

import mlflow  # noqa: E402
import mlflow.store.tracking.sqlalchemy_store  # noqa: E402, F401

from formula_foundry.sync.commands.cli import main  # noqa: E402


def _child(args: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        main(args, prog_name="ff-sync")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(cmd: dict[str, object]) -> dict[str, object]:
    delay = cmd.get("delay")
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(list(cmd["args"]), str(cmd["log"]))  # type: ignore[call-overload]
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if delay is not None and time.monotonic() - started >= float(delay):  # type: ignore[arg-type]
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            break
        time.sleep(0.002)
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return {"killed": killed, "rc": rc, "elapsed": time.monotonic() - started}


if __name__ == "__main__":
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(json.loads(line))), flush=True)
