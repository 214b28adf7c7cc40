"""``mbphot run``: execute the four notebooks in order with papermill.

Each notebook is MyST markdown; it is converted with jupytext, run with the parameters given
on the command line, and saved executed under ``<output>/notebooks/``. The run stops at the
first failing notebook and names it and its failing cell.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from .bands import BAND_NAMES
from .params import DATA_SOURCES, ENGINES, MODES, RunParameters

__all__ = ["main", "run_notebooks", "NOTEBOOKS"]

NOTEBOOKS = ("01_retrieve", "02_photometry", "03_crossmatch", "04_plots")
DEFAULT_NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the cell."""


def run_notebooks(params: RunParameters, notebook_dir=DEFAULT_NOTEBOOK_DIR, progress=True) -> list[Path]:
    """Run the pipeline notebooks with papermill.

    Parameters
    ----------
    params : RunParameters
        Validated parameters; ``data_dir`` and ``output_dir`` are made absolute.
    notebook_dir : path
        Folder holding the ``NN_name.md`` notebooks.

    Returns
    -------
    list of Path
        The executed notebooks.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook_dir = Path(notebook_dir)
    output_dir = Path(params.output_dir).resolve()
    parameters = {
        "ra": params.ra,
        "dec": params.dec,
        "radius_arcmin": params.radius_arcmin,
        "bands": list(params.bands),
        "data_source": params.data_source,
        "seed": params.seed,
        "engine": params.engine,
        "mode": params.mode,
        "n_workers": params.n_workers,
        "data_dir": str(Path(params.data_dir).resolve()),
        "output_dir": str(output_dir),
    }
    executed = []
    with tempfile.TemporaryDirectory(prefix="mbphot-notebooks-") as scratch:
        for name in NOTEBOOKS:
            source = notebook_dir / f"{name}.md"
            if not source.is_file():
                raise FileNotFoundError(f"notebook {source} not found; pass the notebooks folder with --notebooks")
            converted = Path(scratch) / f"{name}.ipynb"
            jupytext.write(jupytext.read(source), converted)
            target = output_dir / "notebooks" / f"{name}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                papermill.execute_notebook(
                    str(converted),
                    str(target),
                    parameters=parameters,
                    cwd=str(notebook_dir),
                    kernel_name="python3",
                    progress_bar=progress,
                )
            except PapermillExecutionError as error:
                raise NotebookFailed(
                    f"notebook {name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                    f"the executed notebook, with the traceback, is {target}"
                ) from None
            executed.append(target)
    return executed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbphot", description="Multiband forced photometry of COSMOS fields.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the four notebooks headless (papermill)")
    defaults = RunParameters()
    run.add_argument("--ra", type=float, default=defaults.ra, help="field centre RA in deg (default %(default)s)")
    run.add_argument("--dec", type=float, default=defaults.dec, help="field centre Dec in deg (default %(default)s)")
    run.add_argument("--radius", type=float, default=defaults.radius_arcmin, help="radius in arcmin (default %(default)s)")
    run.add_argument("--bands", default="all", help=f"comma-separated subset of {','.join(BAND_NAMES)} or 'all'")
    run.add_argument("--data-source", default="sample", choices=DATA_SOURCES)
    run.add_argument("--engine", default="mbphot", choices=ENGINES, help="photometry engine (tractor where installed)")
    run.add_argument("--mode", default="scene", choices=MODES, help="per-source cutouts or whole-region scene fits")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed of the simulated field")
    run.add_argument("--n-workers", type=int, default=0, help="photometry processes (default 0: one per core)")
    run.add_argument("--data-dir", default="data", help="where retrieved and derived data go")
    run.add_argument("--output-dir", default="output", help="where notebooks, catalogue and figures go")
    run.add_argument("--notebooks", default=str(DEFAULT_NOTEBOOK_DIR), help="folder holding the notebooks")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = RunParameters(
            ra=args.ra,
            dec=args.dec,
            radius_arcmin=args.radius,
            bands=args.bands,
            data_source=args.data_source,
            seed=args.seed,
            engine=args.engine,
            mode=args.mode,
            n_workers=args.n_workers,
            data_dir=args.data_dir,
            output_dir=args.output_dir,
        )
        executed = run_notebooks(params, args.notebooks, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError, NotebookFailed) as error:
        print(f"mbphot run: {error}", file=sys.stderr)
        return 1
    for path in executed:
        print(f"executed {path}")
    return 0
