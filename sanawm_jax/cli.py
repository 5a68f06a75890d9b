"""What the command-line programs share: one-line usage errors with exit code 2, `--debug` tracebacks, and JAX's
persistent compilation cache.

A program builds its parser with `ArgumentParser` and runs `main` through `run`:

    def main(argv=None): ...
    if __name__ == "__main__":
        cli.run(main)

Bad input raises `UsageError` (or ValueError / FileNotFoundError / FileExistsError from the library, whose messages
name the problem); `run` prints `error: <message>` on stderr and exits with code 2. With `--debug` on the command line
or `SANAWM_DEBUG=1` in the environment the exception propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USAGE_EXIT_CODE = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SANAWM_DEBUG"
CACHE_ENV = "SANAWM_COMPILATION_CACHE"
# Exceptions whose message is the whole story for a user: bad flags, files, configs or checkpoints.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class UsageError(Exception):
    """Bad command-line input; the message is one line naming the problem."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug` and one-line errors: a parse error raises `UsageError` instead of printing usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)")

    def error(self, message):
        raise UsageError(message)


def debug_enabled(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None):
    """Call `main(argv)`; user errors become `error: ...` on stderr and exit code 2 unless debugging."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except (UsageError, *USER_ERRORS) as error:
        if debug_enabled(argv):
            raise
        message = " ".join(str(error).split("\n")[0].split()) if isinstance(error, UsageError) else str(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)


def default_cache_dir() -> Path:
    """`$SANAWM_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/sanawm_jax/jax`, else `~/.cache/sanawm_jax/jax`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sanawm_jax" / "jax"


def enable_compilation_cache(cache_dir: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `cache_dir` (default: `default_cache_dir()`), caching every
    program, so a second run of the same command skips XLA compilation."""
    import jax

    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def add_compilation_cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help=f"persistent XLA compilation cache (default: {default_cache_dir()})")
    parser.add_argument("--no-compilation-cache", action="store_true", help="compile from scratch every run")


def apply_compilation_cache_flags(args: argparse.Namespace) -> Path | None:
    """Enable the cache as the flags of `add_compilation_cache_flags` say; returns its directory or None.

    A run over several CPU processes uses no cache: JAX keys a CPU program's entry per process and only process 0
    writes entries, so process 0 alone would load its programs while the others compile them, and it would reach
    the first collective long before them (gloo waits 30 s for the others)."""
    import jax

    if args.no_compilation_cache or (jax.process_count() > 1 and jax.default_backend() == "cpu"):
        return None
    return enable_compilation_cache(args.compilation_cache)


def mesh_flag(text: str) -> str:
    """An argparse `type` for --mesh: AXIS=N,... over data, fsdp, context, tensor (checked, kept as text)."""
    from sanawm_jax.parallel import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """--mesh, and --coordinator / --num-processes / --process-id for a run over several processes."""
    parser.add_argument("--mesh", type=mesh_flag,
                        help="device mesh AXIS=N,... over data, fsdp, context, tensor, e.g. fsdp=2,context=4 (axes "
                             "not named are 1, the product is the device count; default: every device on fsdp)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="multi-process run: address of process 0 (with --num-processes and --process-id)")
    parser.add_argument("--num-processes", type=int, help="multi-process run: how many processes")
    parser.add_argument("--process-id", type=int, help="multi-process run: this process's index, 0 .. N-1")


def apply_parallel_flags(args: argparse.Namespace):
    """Join the processes (if --coordinator) and build the mesh of --mesh over every device; returns the Mesh."""
    from sanawm_jax.parallel import make_mesh, parse_mesh
    from sanawm_jax.parallel.distributed import initialize

    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in multi):
        if any(value is None for value in multi):
            raise UsageError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
        if args.num_processes < 1:
            raise UsageError(f"--num-processes must be positive, got {args.num_processes}")
        initialize(args.coordinator, args.num_processes, args.process_id)
    return make_mesh(parse_mesh(args.mesh) if args.mesh else None)
