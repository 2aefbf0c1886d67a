"""What the launcher told this process, read from its environment before any distributed layer starts.

horovodrun, mpirun (Open MPI) and PMI launchers (srun, MPICH's mpiexec) each set their own rank and
size variables for the workers they start. Reading them lets every rank refuse bad input alike
before Horovod starts (only rank 0 prints why), lets the one-process fallback notice it was started
as one of many, and lets `prepare` decide whether mpi4py has peers to talk to. This module is the
one place that knows those variable names.
"""
from __future__ import annotations

import os

# (rank variable, size variable) per launcher, in the order they are asked.
HOROVODRUN = ("HOROVOD_RANK", "HOROVOD_SIZE")
OPEN_MPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
PMI = ("PMI_RANK", "PMI_SIZE")
# The launchers whose processes share an MPI world (mpi4py's COMM_WORLD); horovodrun over Gloo does not.
MPI_LAUNCHERS = (OPEN_MPI, PMI)
# One variable per launcher whose presence says it started this process, whatever the worker count.
LAUNCHED_MARKERS = (HOROVODRUN[0], OPEN_MPI[1], PMI[1])


def launcher_rank() -> int:
    """This process's rank as its launcher set it (horovodrun, mpirun, srun with PMI), 0 when run
    alone: lets every rank refuse bad input before Horovod starts while only rank 0 prints it."""
    for rank_variable, _ in (HOROVODRUN, *MPI_LAUNCHERS):
        if os.environ.get(rank_variable, "").isdigit():
            return int(os.environ[rank_variable])
    return 0


def mpi_world_size() -> int:
    """The number of processes mpirun (or a PMI launcher) started, 1 when none did."""
    return max(int(os.environ.get(size_variable, "1")) for _, size_variable in MPI_LAUNCHERS)


def launcher_marker() -> str | None:
    """The first variable that shows a multi-process launcher started this process, or None."""
    return next((name for name in LAUNCHED_MARKERS if name in os.environ), None)


def elastic_launch() -> bool:
    """Whether horovodrun's elastic driver (--host-discovery-script) started this process: it sets
    HOROVOD_ELASTIC=1 for its workers. Readable before Horovod starts, like launcher_rank."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"
