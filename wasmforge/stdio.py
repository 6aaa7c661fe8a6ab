"""Standard descriptors that are closed must stay closed to the programs we run."""

from __future__ import annotations

import os


def reserve_std_fds() -> None:
    """Give closed stdin/stdout/stderr /dev/null, so that a file opened later (a module, a .cwasm)
    never takes descriptor 0, 1 or 2 and is handed to the program as its standard input or output."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
