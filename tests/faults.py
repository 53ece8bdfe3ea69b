"""Run `rim-lens` commands in child processes that meet a fault: SIGKILL at a chosen moment, a
file-size limit, or a runs directory they may not write. Used by tests/test_faults.py.

A server process imports rim-lens once and forks one child per command (a forked child starts in
milliseconds, a fresh interpreter in seconds), so a test can kill dozens of commands. The child
counts its writes inside the workspace ("moments": opening a file to write, a rename, a mkdir, an
unlink, a safetensors or parquet write) and, at moment k, kills itself with SIGKILL: before a
rename or mkdir, or halfway through writing a file (the first half written, then killed), so a
reader could see a torn file if rim-lens wrote it in place.

    with Server() as server:
        done = server.run(["train", "r.yaml"], cwd=ws, kill_at=17)  # Done(code, signal, out, err, events)
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Done:
    """How a child command ended: exit code (None if killed), signal, output and the moments seen."""

    code: int | None
    signal: int | None
    out: str
    err: str
    events: list[list[str]] = field(default_factory=list)  # [op, path relative to the workspace]

    @property
    def killed(self) -> bool:
        return self.signal == signal.SIGKILL


class Server:
    """The forking server, as a context manager."""

    def __enter__(self) -> Server:
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        return self

    def run(
        self,
        argv: list[str],
        cwd: Path,
        kill_at: int | None = None,
        fsize: int | None = None,
        read_only: bool = False,
    ) -> Done:
        """Run `rim-lens argv` in `cwd` (killed at moment `kill_at`, under a file-size limit of
        `fsize` bytes, without the privilege to ignore file permissions when `read_only`)."""
        request = {"argv": argv, "cwd": str(cwd), "kill_at": kill_at, "fsize": fsize, "read_only": read_only}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Done(**reply)

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()  # nothing to flush; an orderly exit of torch & co. takes seconds
        self.proc.wait(timeout=60)
        self.proc.stdin.close()
        self.proc.stdout.close()


# -- the server (runs as __main__) ----------------------------------------------------------------
def serve() -> None:
    import joblib
    import torch

    import rim_lens.analysis.report  # noqa: F401 - imported once, before any fork
    import training.trainer  # noqa: F401
    from rim_lens.cli import main

    torch.set_num_threads(1)
    joblib.parallel_config(backend="sequential")  # no worker processes outlive a killed child
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            files = {name: Path(tmp) / name for name in ("out", "err", "events")}
            pid = os.fork()
            if pid == 0:
                _child(main, request, files)
            _, status = os.waitpid(pid, 0)
            reply = {
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "out": files["out"].read_text(errors="replace"),
                "err": files["err"].read_text(errors="replace"),
                "events": json.loads(files["events"].read_text()) if files["events"].exists() else [],
            }
        print(json.dumps(reply), flush=True)


def _child(main, request: dict, files: dict[str, Path]) -> None:
    """In the forked child: set the fault up, run the command, leave with its exit code."""
    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(files[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.stdout, sys.stderr = (
            io.TextIOWrapper(os.fdopen(fd, "wb", 0), write_through=True) for fd in (1, 2)
        )
        if request["fsize"] is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        if request["read_only"]:
            _drop_file_privileges()
        moments = Moments(Path(request["cwd"]), request["kill_at"])
        moments.install()
        try:
            code = main(request["argv"])
        finally:
            files["events"].write_text(json.dumps(moments.events))
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _drop_file_privileges() -> None:
    """Without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER even root obeys file
    permissions (an unprivileged user never had them): a chmod a-w folder is then read-only."""
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    drop = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
    data[0].effective &= drop
    data[0].permitted &= drop
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


class Moments:
    """Counts the child's writes under `root` and kills the child at moment `kill_at`."""

    def __init__(self, root: Path, kill_at: int | None) -> None:
        self.root, self.kill_at = root.resolve(), kill_at
        self.events: list[list[str]] = []

    def _mine(self, path: object) -> str | None:
        """`path` relative to the workspace if it lies inside it."""
        if isinstance(path, int) or path is None:
            return None
        try:
            return str(Path(os.path.abspath(os.fsdecode(path))).relative_to(self.root))
        except ValueError:
            return None

    def _moment(self, op: str, path: object) -> bool:
        """Record a write; True when this is the moment to kill."""
        rel = self._mine(path)
        if rel is None:
            return False
        self.events.append([op, rel])
        return len(self.events) == self.kill_at

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        import builtins
        import shutil

        import pandas as pd
        import safetensors.torch
        import transformers.modeling_utils

        import rim_lens.analysis.capture
        import training.resume

        def before(op: str, original):
            def wrapper(path, *args, **kwargs):
                if self._moment(op, path):
                    self._die()
                return original(path, *args, **kwargs)

            return wrapper

        for name in ("rename", "replace", "unlink", "rmdir"):
            setattr(os, name, before(name, getattr(os, name)))
        mkdir = os.mkdir

        def mkdir_(path, *args, **kwargs):  # a folder that exists already is no moment
            if not os.path.isdir(path) and self._moment("mkdir", path):
                self._die()
            return mkdir(path, *args, **kwargs)

        os.mkdir = mkdir_
        shutil.rmtree = before("rmtree", shutil.rmtree)

        raw_open = os.open

        def os_open(path, flags, *args, **kwargs):
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            fd = raw_open(path, flags, *args, **kwargs)
            if writes and self._moment("open", path):
                self._die()  # just created or opened: an empty file, nothing written
            return fd

        os.open = os_open
        file_open = io.open

        def open_(file, mode="r", *args, **kwargs):
            f = file_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and self._moment("write", file):
                return _Torn(f, self._die)
            return f

        builtins.open = io.open = open_

        save_file = safetensors.torch.save_file

        def safetensors_save(tensors, filename, metadata=None):
            if self._moment("safetensors", filename):
                data = safetensors.torch.save(tensors, metadata=metadata)
                with file_open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
                self._die()
            return save_file(tensors, filename, metadata=metadata)

        for module in (safetensors.torch, training.resume, rim_lens.analysis.capture):
            module.save_file = safetensors_save
        transformers.modeling_utils.safe_save_file = safetensors_save

        to_parquet = pd.DataFrame.to_parquet

        def parquet(frame, path, *args, **kwargs):
            if self._moment("parquet", path):
                buffer = io.BytesIO()
                to_parquet(frame, buffer, *args, **kwargs)
                with file_open(path, "wb") as f:
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                self._die()
            return to_parquet(frame, path, *args, **kwargs)

        pd.DataFrame.to_parquet = parquet


class _Torn:
    """A file that writes half of its first write, then kills the process."""

    def __init__(self, f, die) -> None:
        self._f, self._die = f, die

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        self._die()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._die()

    def close(self):
        self._die()


if __name__ == "__main__":
    serve()
