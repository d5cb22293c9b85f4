"""C++ op libraries built on first use without ever hanging.

A library registers its ops with torch's dispatcher (`TORCH_LIBRARY(namespace, m)`); loading it makes them
`torch.ops.<namespace>.*`, which torch.compile traces as ops and whose Python binding releases the GIL.

torch's `load_inline` guards its build folder with a lock *file*: a build that is killed (Ctrl-C, a timeout,
a closed terminal) leaves the file behind and every later process waits for it forever. Here each build runs
in a private folder and is moved into place only when it is complete; processes take turns through an
`flock`, which the kernel releases when its holder dies, however it dies. The folder is keyed by everything
the binary depends on (package, torch and Python versions, compiler, flags, the source text), so two
virtual environments never rebuild over each other and a changed source is never served stale.

A build that fails, or another process's build that takes longer than `ERNIE45_BUILD_WAIT` seconds (default
900), is reported once and the caller gets None: torch's own ops then do the work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ernie45")
_loaded: dict[Path, Any] = {}


def cache_root() -> Path:
    """Where built extensions live: `ERNIE45_KERNEL_DIR`, else `$XDG_CACHE_HOME/ernie45/kernels`."""
    if os.environ.get("ERNIE45_KERNEL_DIR"):
        return Path(os.environ["ERNIE45_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ernie45" / "kernels"


def build_key(name: str, sources: list[str], cflags: list[str], ldflags: list[str]) -> str:
    """A short hash of what the binary depends on."""
    from .. import __version__

    compiler = os.environ.get("CXX", "c++")
    parts = [name, __version__, torch.__version__, sys.version, compiler, shutil.which(compiler) or "", *cflags,
             "|", *ldflags, "|", *sources]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def load_extension(name: str, sources: list[str], namespace: str, cflags: list[str], ldflags: list[str]) -> Any:
    """The ops `torch.ops.<namespace>` that the library `name`, built from C++ `sources`, registers, or None (the
    reason logged)."""
    key = build_key(name, [namespace, *sources], cflags, ldflags)
    root = cache_root()
    final = root / f"{name}-{key}"
    if final in _loaded:
        return _loaded[final]
    try:
        built = (final / f"{name}.so").is_file()
        if built:
            _import(final, name)
        else:
            root.mkdir(parents=True, exist_ok=True)
            with _turn(root / f"{name}-{key}.lock") as got:
                if not got:
                    return None
                if (final / f"{name}.so").is_file():  # another process built it while we waited
                    _import(final, name)
                else:
                    _build(name, key, root, final, sources, cflags, ldflags)
    except Exception as e:  # a broken toolchain must not stop inference: torch's ops still work
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        log.warning("ernie45: the C++ kernels %s did not build (%s); torch's ops run instead", name, first)
        return None
    _loaded[final] = getattr(torch.ops, namespace)
    return _loaded[final]


def _build(name: str, key: str, root: Path, final: Path, sources: list[str], cflags: list[str],
           ldflags: list[str]) -> None:  # fmt: skip
    """Compile in a private folder, then move it into place: `final` exists only when complete."""
    from torch.utils.cpp_extension import load_inline

    for stale in root.glob(f"{name}-{key}.building-*"):  # we hold the lock: these are from killed builds
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f"{name}-{key}.building-{os.getpid()}"
    work.mkdir()
    log.warning("ernie45: compiling the C++ kernels %s (once per machine and version, about half a minute)", name)
    started = time.monotonic()
    try:
        # is_python_module=False: the library is loaded, and its ops registered, from here on
        # no_implicit_headers: the sources include what they use; torch/extension.h (pybind11, the whole C++ API)
        # would double the compile
        load_inline(name, cpp_sources=sources, extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(work),
                    is_python_module=False, no_implicit_headers=True)  # fmt: skip
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.warning("ernie45: kernels %s built in %.0f s (%s)", name, time.monotonic() - started, final)


def _import(folder: Path, name: str) -> None:
    torch.ops.load_library(str(folder / f"{name}.so"))


@contextlib.contextmanager
def _turn(lock: Path) -> Iterator[bool]:
    """Hold `lock` (an flock: released by the OS when its holder dies) while building; False after waiting
    longer than `ERNIE45_BUILD_WAIT` seconds for another process."""
    limit = float(os.environ.get("ERNIE45_BUILD_WAIT", "900"))
    with open(lock, "a+") as f:
        deadline, said = time.monotonic() + limit, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("ernie45: waited %.0f s for another process building the kernels (%s); torch's ops "
                                "run instead this time", limit, lock)  # fmt: skip
                    yield False
                    return
                if not said:
                    log.warning("ernie45: another process is building the C++ kernels; waiting for it (%s)", lock)
                    said = True
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
