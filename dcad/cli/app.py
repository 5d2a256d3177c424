"""The `dcad` typer app: one place that wires the verbs and turns bad input into one-line errors."""

from __future__ import annotations

import sys

import typer

from dcad import __version__
from dcad.cli import data as data_cli
from dcad.cli import leaderboard as leaderboard_cli
from dcad.cli import log as log_cli
from dcad.cli import models as models_cli
from dcad.cli import pipeline as pipeline_cli
from dcad.cli import predict as predict_cli
from dcad.cli import promote as promote_cli
from dcad.cli import sweep as sweep_cli
from dcad.cli import stack as stack_cli
from dcad.cli import train as train_cli
from dcad.cli import ui as ui_cli
from dcad.cli import weights as weights_cli
from dcad.cli.console import err_console
from dcad.core.errors import DcadError

app = typer.Typer(
    name="dcad",
    help="Multi-class industrial anomaly detection (DRDC) on Ray + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cli.app, name="data")
train_cli.register(app)
predict_cli.register(app)
leaderboard_cli.register(app)
promote_cli.register(app)
sweep_cli.register(app)
app.add_typer(models_cli.app, name="models")
app.add_typer(weights_cli.app, name="weights")
app.add_typer(pipeline_cli.app, name="pipeline")
app.add_typer(stack_cli.app, name="stack")
ui_cli.register(app)
log_cli.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dcad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """dcad: train, evaluate, sweep and promote DRDC anomaly detectors."""


def main() -> None:
    import logging

    # MLflow announces creating and migrating a new sqlite store's tables at INFO: not news to a user.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except DcadError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
