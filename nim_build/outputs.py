"""Writing an output directory safely: checked before any work, built in a private temporary sibling, renamed into
place when complete, one writer at a time, and never a directory the user did not mean to replace.

    with output_dir(out, force) as tmp:    # tmp: a new empty directory beside out
        ...write everything into tmp...   # an exception removes tmp and leaves out as it was
    # here out is the new directory, complete; an old one (force) was replaced in one rename

Writers of outputs in the same parent directory hold an exclusive flock on that directory for the rename, so
concurrent runs on one output are serialized; temporary siblings are private (mkdtemp), and those of runs that were
killed (their pid is gone) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nim_build.errors import HostError, OutputExistsError, UserError

PARTIAL = ".partial-"  # temporary siblings: .<name>.partial-<pid>-<random>


def check_output(out: Path, force: bool, *, protect: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that exists without --force, that is not a directory, that would replace
    the working directory or one of its parents, or that is (or holds) one of the `protect`ed inputs."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
        if not force and any(out.iterdir()):
            raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    resolved = out.resolve()
    for keep, what in [(Path.cwd(), "the working directory"), *((p, "an input of this run") for p in protect)]:
        keep = Path(keep).resolve()
        if keep == resolved or resolved in keep.parents:
            raise UserError(f"--out {out} would replace {what} ({keep}); choose another --out")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            break


def check_free_space(out: Path, need: int) -> None:
    """Refuse, before writing, an output whose filesystem has less than `need` bytes (plus a little) free."""
    where = next(p for p in (Path(out).resolve(), *Path(out).resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need * 1.05 + (64 << 20):
        raise HostError(
            f"{where} has {free / 2**30:.2f} GiB free, and writing {out} needs about "
            f"{need / 2**30:.2f} GiB; free space there or choose another --out"
        )


@contextlib.contextmanager
def output_dir(out: Path, force: bool, *, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A private temporary directory beside out, renamed to out when the block completes (see the module doc)."""
    out = Path(out)
    check_output(out, force, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent))
    except OSError as e:  # /proc, a read-only or full filesystem, no permission
        raise HostError(
            f"cannot write in {out.parent} ({(e.strerror or str(e)).lower()}); choose another --out"
        ) from None
    try:
        yield tmp
        with _locked(out.parent):
            check_output(out, force, protect=protect)  # again: another run may have written it meanwhile
            _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an old output is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove temporary siblings of out left by runs that were killed (their pid no longer runs)."""
    for p in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = p.name.rsplit(PARTIAL, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
