"""CLI wiring only: each command lives in its own module and calls one library function."""

import importlib
import os
import sys

import click

from nim_build import __version__
from nim_build.cli import _errors
from nim_build.errors import NimBuildError

# command name -> module under nim_build.cli exposing a click command named `command`.
COMMANDS = {
    "engine": "engine",
    "run": "run",
    "repo": "repo",
    "serve": "serve",
    "infer": "infer",
    "chart": "chart",
    "cache-engine": "cache_engine",
    "profiles": "profiles",
    "store": "store",
    "download": "download",
    "mpi-worker": "mpi_worker",
    "mpi-rsh": "mpi_rsh",
}


class LazyGroup(click.Group):
    """Imports a command's module only when it runs, so `nim_build --help` stays fast (no torch import)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"nim_build.cli.{COMMANDS[name]}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nim_build")
def cli():
    """Turn a Hugging Face checkpoint into an FP8 TensorRT-LLM engine, a Triton model repository and a Helm release.

    \b
    Typical flow:
      nim_build engine mistralai/Mistral-Nemo-Instruct-2407 --out engines/nemo --quant fp8
      nim_build repo engines/nemo --out triton_repo_out/nemo
      nim_build serve triton_repo_out/nemo
      nim_build infer --prompt "Hello" --stream
    """


def main(argv=None):
    """Entry point: errors of nim_build -> one line on stderr and the exit code of cli/_errors.py's table; any other
    exception is an internal error (traceback, exit 1)."""
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        cli.main(args=args, prog_name="nim_build", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as e:  # bad flags and arguments: one line, and where to read about them
        where = f" (`{e.ctx.command_path} --help` lists them)" if e.ctx is not None else ""
        click.echo(f"Error: {e.format_message()}{where}", err=True)
        sys.exit(_errors.EXIT_USAGE)
    except click.ClickException as e:
        e.show()
        sys.exit(_errors.EXIT_USAGE if e.exit_code in (1, 2) else e.exit_code)
    except (NimBuildError, OSError) as e:
        if not isinstance(e, NimBuildError):
            e = _errors.host_error(e) or e
        if os.environ.get("NIM_BUILD_DEBUG") or not isinstance(e, NimBuildError):
            raise
        click.echo(_errors.message(e), err=True)
        sys.exit(_errors.exit_code(e))
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(_errors.EXIT_OK)
