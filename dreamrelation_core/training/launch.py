"""Several training processes under PyTorch's own launcher, torchrun (`python -m torch.distributed.run`).

`worker_client` starts the worker (`python -m dreamrelation_core.training.worker`) through
`worker_command`: directly for one process, under torchrun for several (`Launch`: processes per
machine, machines, this machine's rank, the rendezvous address). Every process joins the group
(`distributed.init_from_env`); rank 0 alone plans the run folder, reads the control channel
(stdin) and writes the JSON lines on stdout, the others write nothing there (docs/distributed.md
"Launch and control").

torchrun's own behaviour that the control relies on: each worker runs in its own session, so a
terminal's Ctrl+C reaches torchrun only, and torchrun forwards that signal once to every worker,
then kills what still runs after `--shutdown-timeout` seconds (SHUTDOWN_TIMEOUT_S here: the time
to finish a step and write the checkpoint). A worker that fails ends the others the same way; the
failure summary torchrun prints on stderr is read back by `launcher_failure`.

Light on purpose (no torch): the client and the ComfyUI node import it before any model loads.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding dreamrelation_core/
# `python -m <module>`, with the package's folder put on sys.path first: embedded Pythons (ComfyUI's
# Windows portable build) ignore PYTHONPATH because of their `._pth` file.
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
TORCHRUN_MODULE = "torch.distributed.run"
# Seconds torchrun waits, after forwarding a stop signal (or after a worker failed), before it kills
# the workers still running: a step and the checkpoint must fit in it.
SHUTDOWN_TIMEOUT_S = 300
DEFAULT_MASTER_PORT = 29500


def module_command(module: str, args: Sequence[str], python: str | None = None) -> list[str]:
    """`python -m module args`, through BOOTSTRAP (this interpreter unless `python`)."""
    return [python or sys.executable, "-c", BOOTSTRAP, str(PACKAGE_ROOT), module, *map(str, args)]


@dataclass(frozen=True)
class Launch:
    """How many training processes, on how many machines (torchrun's options).

    nproc: processes on this machine (one per GPU); nnodes: machines; node_rank: this machine's
    place (0 is the one that plans the run folder, writes the files and reports); master_addr /
    master_port: where machine 0 waits for the others (several machines only)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def distributed(self) -> bool:
        """Several processes: the worker runs under torchrun."""
        return self.world_size > 1

    @property
    def reports(self) -> bool:
        """This machine holds rank 0, the process that speaks the protocol."""
        return self.node_rank == 0

    def validate(self) -> Launch:
        need = []
        if self.nproc < 1:
            need.append(f"--nproc (processes per machine) must be 1 or more, got {self.nproc}")
        if self.nnodes < 1:
            need.append(f"--nnodes (machines) must be 1 or more, got {self.nnodes}")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            need.append(f"--node-rank must be 0 to {self.nnodes - 1} for {self.nnodes} machine(s), got {self.node_rank}")
        if self.nnodes > 1 and not self.master_addr:
            need.append(f"--master-addr is needed with --nnodes {self.nnodes}: the address of machine 0 (node rank 0), "
                        "reachable from every machine")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            need.append(f"--master-port must be a TCP port (1-65535), got {self.master_port}")
        if need:
            raise TrainingError("; ".join(need))
        return self

    def torchrun_args(self) -> list[str]:
        """torchrun's options for this launch (before the worker's command)."""
        args = [f"--nproc-per-node={self.nproc}", f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "--max-restarts=0"]
        if self.nnodes == 1 and not self.master_addr and self.master_port is None:
            args.append("--standalone")  # a free local port: two runs on one machine do not collide
        else:
            args += [f"--master-addr={self.master_addr or '127.0.0.1'}",
                     f"--master-port={self.master_port or DEFAULT_MASTER_PORT}"]
        return args


def torchrun_command(worker_module: str, worker_args: Sequence[str], launch: Launch,
                     python: str | None = None) -> list[str]:
    """torchrun running `python -m worker_module worker_args` in each of its processes. Both are
    started through BOOTSTRAP (`--no-python`: torchrun runs our command line as it is)."""
    python = python or sys.executable
    worker = module_command(worker_module, worker_args, python)
    return module_command(TORCHRUN_MODULE, [*launch.validate().torchrun_args(), "--no-python", *worker], python)


# ---------------------------------------------------------------------------------------------
# devices


def check_batch(batch_size: int, processes: int, what: str = "processes") -> None:
    """Refuse, before anything starts, a global batch the processes cannot share evenly (each
    process computes batch_size / processes clips of every step)."""
    if processes > 1 and batch_size % processes:
        raise TrainingError(f"batch_size {batch_size} cannot be shared by {processes} {what}: batch_size counts the "
                            f"clips of one step over all of them, so it must be a multiple of {processes} "
                            f"({processes}, {2 * processes}, ...)")


def check_devices(device: str, nproc: int, cuda_count: int | None = None, platform: str | None = None) -> None:
    """Refuse, before anything starts, more processes on this machine than it has GPUs when the
    run is on CUDA (`device` 'cuda', 'cuda:N', or 'auto' with a GPU), and several GPUs on Windows
    (PyTorch has no NCCL there). On the CPU several gloo processes are allowed (the tests run that
    way). `cuda_count`: the GPUs (found here if None); `platform`: sys.platform's value."""
    if nproc <= 1:
        return
    if re.fullmatch(r"cuda:\d+", device):
        raise TrainingError(f"device {device!r} names one GPU, but {nproc} processes each need their own: set device "
                            "to 'cuda' or 'auto' (process N takes GPU N of its machine)")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cuda = device.startswith("cuda") or (device == "auto" and cuda_count > 0)
    if not on_cuda:
        return
    if (platform or sys.platform) == "win32":
        raise TrainingError(f"{nproc} GPU processes on Windows: the GPUs talk through NCCL, which PyTorch does not "
                            "ship for Windows. Train on one GPU here, or on several under Linux or WSL2")
    if cuda_count == 0:
        raise TrainingError(f"{nproc} training processes on device {device!r}, but this machine has no CUDA GPU: "
                            "use 1 process, or device 'cpu' (several CPU processes share the CPU's cores)")
    if nproc > cuda_count:
        raise TrainingError(f"{nproc} training processes (one per GPU) but this machine has {cuda_count} CUDA "
                            f"GPU(s): set gpus / --nproc to {cuda_count} or fewer")


# ---------------------------------------------------------------------------------------------
# torchrun's failure summary


@dataclass(frozen=True)
class ProcessFailure:
    """The first failure torchrun observed ("Root Cause" of its summary)."""

    rank: int
    exitcode: int
    signal: str | None  # SIGKILL, SIGSEGV, ... when a signal ended it

    def describe(self) -> str:
        if self.signal:
            how = f"was killed by {self.signal}" + (" (out of system memory?)" if self.signal == "SIGKILL" else "")
        else:
            how = f"exited with code {self.exitcode}"
        return f"training process rank {self.rank} {how}; torchrun stopped the others"


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*", re.S)
_SIGNAL = re.compile(r"\((SIG[A-Z]+)\)")


def launcher_failure(stderr_lines: Iterable[str]) -> ProcessFailure | None:
    """The root cause in torchrun's failure summary, or None when there is none."""
    text = "\n".join(stderr_lines)
    m = _ROOT_CAUSE.search(text)
    if m is None:
        return None
    sig = _SIGNAL.search(m.group(0))
    return ProcessFailure(int(m.group(1)), int(m.group(2)), sig.group(1) if sig else None)
