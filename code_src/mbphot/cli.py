"""``mbphot run``: execute the four notebooks in order with papermill; ``mbphot notebooks DEST``
copies them into DEST to open them in Jupyter.

The notebooks are read from the source tree's ``notebooks/`` in a checkout, and from the
package data (``mbphot/notebooks/``, copied there when the wheel is built) in an installed
package.

Each notebook is MyST markdown; it is converted with jupytext, run with the parameters given
on the command line and/or in a YAML or JSON parameter file (``--params``; options override
the file), and saved executed. The run stops at the first failing notebook and names it and
its failing cell.

Each run writes into its own folder, ``<output>/runs/<run tag>/``, named for its exact
parameters (`RunParameters.run_tag`); a second run of the same parameters waits for the first.
Only when every notebook has succeeded does that folder get its ``COMPLETE`` marker and is it
published (`publish`): its catalogue, figures and notebooks are copied into a new folder under
``<output>/published/``, and the one link ``<output>/latest`` is switched to it by a rename. The
fixed places ``<output>/catalog``, ``<output>/figures``, ``<output>/notebooks`` and
``<output>/latest_run.json`` are links through ``latest``, so they always show one whole
successful run, the latest, and a fault while publishing leaves the previous one whole.
"""

import argparse
import difflib
import json
import logging
import errno
import os
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .archive.config import ENDPOINTS_ENV, load_endpoints
from .bands import BAND_NAMES
from .io import file_lock, write_json
from .params import DATA_SOURCES, ENGINES, MODES, PARAMETER_NAMES, REALISM_LEVELS, RunParameters
from .photometry import PROGRESS_ENV

__all__ = ["main", "run_notebooks", "run_pipeline", "publish", "read_parameter_file", "copy_notebooks", "NOTEBOOKS",
           "COMPLETE_MARKER"]

NOTEBOOKS = ("01_retrieve", "02_photometry", "03_crossmatch", "04_plots")


def _notebook_dir() -> Path:
    """The notebooks: the source tree's ``notebooks/`` in a checkout, else the package data."""
    checkout = Path(__file__).resolve().parents[2] / "notebooks"
    if (checkout / f"{NOTEBOOKS[0]}.md").is_file():
        return checkout
    return Path(__file__).resolve().parent / "notebooks"


DEFAULT_NOTEBOOK_DIR = _notebook_dir()
COMPLETE_MARKER = "COMPLETE"
LATEST_RECORD = "latest_run.json"
PUBLISHED = ("catalog", "figures", "notebooks")
"""The folders of a run folder that are published."""
PATH_PARAMETERS = ("data_dir", "output_dir", "files_manifest")
ENDPOINTS_KEY = "endpoints"
"""The parameter-file key of the archive endpoints file (``--endpoints``)."""
LOG_NAME = "mbphot-run.log"
"""The file in the run folder that gets the traceback of an unexpected error."""
RESUME_HINT = "run the same command again to resume: retrieved files and measured partitions are reused"


class NotebookFailed(RuntimeError):
    """A notebook raised, or its kernel died; the message names the notebook and the cell."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped: Ctrl-C, or SIGTERM or SIGHUP (``timeout``, Slurm, ``docker stop``,
    a closed terminal). The message says which, and in which notebook."""


def _stop_on_signal(number, frame):
    """Turn SIGTERM and SIGHUP into the same orderly stop as Ctrl-C: the kernel is shut down."""
    raise Interrupted(f"stopped by {signal.Signals(number).name}")


def run_notebooks(params: RunParameters, notebook_dir=DEFAULT_NOTEBOOK_DIR, progress=True) -> list[Path]:
    """Run the pipeline notebooks with papermill.

    Parameters
    ----------
    params : RunParameters
        Validated parameters; ``data_dir`` and ``output_dir`` are made absolute. The
        notebooks write into ``params.run_dir``.
    notebook_dir : path
        Folder holding the ``NN_name.md`` notebooks.

    Returns
    -------
    list of Path
        The executed notebooks, under ``<params.run_dir>/notebooks``.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook_dir = Path(notebook_dir)
    if progress:
        os.environ[PROGRESS_ENV] = "text"
    params = _absolute(params)
    parameters = params.as_dict()
    executed = []
    with tempfile.TemporaryDirectory(prefix="mbphot-notebooks-") as scratch:
        for name in NOTEBOOKS:
            source = notebook_dir / f"{name}.md"
            if not source.is_file():
                raise FileNotFoundError(f"notebook {source} not found; pass the notebooks folder with --notebooks")
            converted = Path(scratch) / f"{name}.ipynb"
            jupytext.write(jupytext.read(source), converted)
            target = params.run_dir / "notebooks" / f"{name}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                papermill.execute_notebook(
                    str(converted),
                    str(target),
                    parameters=parameters,
                    cwd=str(notebook_dir),
                    kernel_name="python3",
                    progress_bar=progress,
                    # The notebooks' own progress bars (photometry partitions, downloads) reach
                    # the terminal through their error stream, drawn as text (see photometry).
                    stderr_file=sys.stderr if progress else None,
                )
            except PapermillExecutionError as error:
                raise NotebookFailed(
                    f"notebook {name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                    f"the executed notebook, with the traceback, is {target}"
                ) from None
            except KeyboardInterrupt as stop:
                raise Interrupted(f"{str(stop) or 'stopped by Ctrl-C'} in notebook {name}") from None
            except Exception as error:
                # The kernel died (out of memory, killed) or papermill itself failed.
                log = _log_traceback(params.run_dir)
                first_line = next(iter(str(error).strip().splitlines()), "")
                raise NotebookFailed(
                    f"notebook {name} stopped: {type(error).__name__}: {first_line}\n"
                    f"the traceback is in {log}; {RESUME_HINT}"
                ) from None
            executed.append(target)
    return executed


def _log_traceback(run_dir) -> Path:
    """Append the traceback being handled to the run's log file (a temporary file if the run
    folder cannot be written); its path."""
    text = f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n{traceback.format_exc()}\n"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / LOG_NAME, "a") as handle:
            handle.write(text)
        return Path(run_dir) / LOG_NAME
    except OSError:
        handle, path = tempfile.mkstemp(prefix="mbphot-run-", suffix=".log")
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        return Path(path)


def _absolute(params: RunParameters) -> RunParameters:
    """``params`` with absolute ``data_dir`` and ``output_dir``: the kernels run elsewhere."""
    return replace(params, data_dir=str(Path(params.data_dir).resolve()), output_dir=str(Path(params.output_dir).resolve()))


def run_pipeline(params: RunParameters, notebook_dir=DEFAULT_NOTEBOOK_DIR, progress=True) -> Path:
    """Run the notebooks into the run's own folder, then publish it as the latest run.

    The run folder ``params.run_dir`` (``<output_dir>/runs/<params.run_tag>/``) is emptied
    first, so that a rerun never mixes its files with an earlier run's; a run of the same
    parameters in progress elsewhere is waited for (a lock in ``<output_dir>/.locks``). The folder
    holds ``parameters.json`` (usable as ``--params``), the executed notebooks and everything
    the notebooks write. Only after the last notebook has succeeded is ``COMPLETE`` written
    there and the run published (`publish`).

    Returns
    -------
    Path
        The run folder.

    Raises
    ------
    NotebookFailed
        A notebook failed; the run folder has no ``COMPLETE`` and ``output_dir``'s latest
        outputs are untouched.
    """
    params = _absolute(params)
    run_dir = params.run_dir
    waiting = f"mbphot run: waiting for another run of the same parameters to finish ({run_dir})"
    with file_lock(Path(params.output_dir) / ".locks" / run_dir.name, waiting_message=waiting):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        recorded = {**params.as_dict(), ENDPOINTS_KEY: os.environ.get(ENDPOINTS_ENV) or None}
        write_json(run_dir / "parameters.json", recorded)
        run_notebooks(params, notebook_dir, progress=progress)
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(run_dir / COMPLETE_MARKER, {"run_tag": params.run_tag, "finished_utc": finished, "parameters": recorded})
        publish(run_dir, params.output_dir, {"run_tag": params.run_tag, "run_dir": str(run_dir), "finished_utc": finished})
    return run_dir


def publish(run_dir, output_dir, record: dict) -> Path:
    """Make a finished run folder's catalogue, figures and notebooks the latest outputs, all at once.

    They are copied, with ``record`` as ``latest_run.json``, into a new folder under
    ``<output_dir>/published/``; then the link ``<output_dir>/latest`` is pointed at it by one
    rename, the single step that switches the outputs. ``catalog``, ``figures``,
    ``notebooks`` and ``latest_run.json`` in ``output_dir`` are links through ``latest``
    (made here the first time, replacing the plain folders of older versions). A fault at any
    point leaves the previous outputs whole; publishing runs one at a time (a lock), and
    removes the sets no longer linked and any left half-copied by a killed run.

    Parameters
    ----------
    run_dir : path-like
        The finished run folder.
    output_dir : path-like
        The output folder.
    record : dict
        Written as ``latest_run.json`` (the run's tag, folder and finish time).

    Returns
    -------
    Path
        The published folder.
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    store = output_dir / "published"
    latest = output_dir / "latest"
    with file_lock(output_dir / ".locks" / "publish"):
        store.mkdir(parents=True, exist_ok=True)
        current = latest.resolve() if latest.is_symlink() else None
        for stale in store.iterdir():
            # Under the lock nothing else is publishing: a hidden folder is a killed run's copy.
            if stale.name.startswith(".") or stale.resolve() != current:
                shutil.rmtree(stale)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=store))
        for name in PUBLISHED:
            (staging / name).mkdir()
            if (run_dir / name).is_dir():
                for source in sorted((run_dir / name).rglob("*")):
                    target = staging / name / source.relative_to(run_dir / name)
                    if source.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        shutil.copyfile(source, target)
        write_json(staging / LATEST_RECORD, record)
        snapshot = staging.with_name(staging.name.lstrip("."))
        os.rename(staging, snapshot)
        _link(latest, Path("published") / snapshot.name)
        for name in (*PUBLISHED, LATEST_RECORD):
            fixed = output_dir / name
            if not (fixed.is_symlink() and os.readlink(fixed) == str(Path("latest") / name)):
                _link(fixed, Path("latest") / name)
        if current is not None and current != snapshot and current.parent == store:
            shutil.rmtree(current)
    return snapshot


def _link(path: Path, target: Path) -> None:
    """Make ``path`` a relative link to ``target`` in one rename (a plain file or folder there is replaced)."""
    temporary = path.with_name(f".{path.name}.link-{os.getpid()}")
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(target)
    if path.exists() and not path.is_symlink():
        # An older version's plain folder or file: moved aside, then replaced by the link.
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, aside)
        os.replace(temporary, path)
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    else:
        os.replace(temporary, path)


def read_parameter_file(path) -> dict:
    """Read run parameters from a YAML (``.yaml``, ``.yml``) or JSON (``.json``) file.

    The file holds a mapping of notebook parameter names (`PARAMETER_NAMES`) to values, and
    optionally ``endpoints``, the archive endpoints file (as ``--endpoints``; a run's
    ``parameters.json`` records it). Relative ``data_dir``, ``output_dir``,
    ``files_manifest`` and ``endpoints`` are read from the file's folder, like the paths in a
    files manifest.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unreadable content, a key given twice, or a key that is not a parameter (named, with
        the allowed keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} not found; give a YAML or JSON file with --params")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"parameter file {path} must end in .yaml, .yml or .json, got {suffix or 'no suffix'!r}")
    text = path.read_text()
    try:
        values = json.loads(text, object_pairs_hook=_unique_keys) if suffix == ".json" else yaml.load(text, _UniqueKeyLoader)
    except _DuplicateKey as duplicate:
        raise ValueError(
            f"parameter file {path}: parameter {duplicate.key!r} is given twice; keep one (the file cannot say which wins)"
        ) from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"parameter file {path} is not valid {'JSON' if suffix == '.json' else 'YAML'}: {error}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(
            f"parameter file {path} must hold a mapping of parameter names to values, got {type(values).__name__}"
        )
    for key in values:
        if key not in (*PARAMETER_NAMES, ENDPOINTS_KEY):
            close = difflib.get_close_matches(str(key), PARAMETER_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"parameter file {path}: unknown parameter {key!r}; allowed: {', '.join(PARAMETER_NAMES)}{hint}"
            )
    for key in (*PATH_PARAMETERS, ENDPOINTS_KEY):
        if isinstance(values.get(key), str) and not Path(values[key]).expanduser().is_absolute():
            values[key] = str(path.resolve().parent / values[key])
    return values


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an error, not a silent last-wins."""
    values = {}
    for key, value in pairs:
        if key in values:
            raise _DuplicateKey(key)
        values[key] = value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping key given twice."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                raise _DuplicateKey(key)
        return super().construct_mapping(node, deep=deep)


def copy_notebooks(destination, notebook_dir=DEFAULT_NOTEBOOK_DIR, overwrite=False) -> list[Path]:
    """Copy the four notebooks (MyST markdown) into ``destination`` to open them in Jupyter.

    Raises
    ------
    FileExistsError
        A notebook of the same name is already there and ``overwrite`` is False.
    """
    destination = Path(destination).expanduser()
    sources = [Path(notebook_dir) / f"{name}.md" for name in NOTEBOOKS]
    missing = [str(source) for source in sources if not source.is_file()]
    if missing:
        raise FileNotFoundError(f"notebooks not found: {', '.join(missing)}")
    existing = [str(destination / source.name) for source in sources if (destination / source.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; use --force to overwrite them")
    destination.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(source, destination / source.name)) for source in sources]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbphot", description="Multiband forced photometry of COSMOS fields.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the four notebooks headless (papermill)",
        description="Run the four notebooks headless. Options override --params; the rest take their defaults.",
    )
    defaults = RunParameters()
    # No argparse defaults or types: an option given overrides the parameter file, one not
    # given leaves it, and RunParameters checks every value with one kind of message.
    option = {"default": argparse.SUPPRESS}
    run.add_argument("--params", dest="params_file", default=None, metavar="FILE",
                     help="YAML or JSON file of parameters (notebook names, e.g. radius_arcmin)")
    run.add_argument("--ra", dest="ra", **option, help=f"field centre RA in deg (default {defaults.ra})")
    run.add_argument("--dec", dest="dec", **option, help=f"field centre Dec in deg (default {defaults.dec})")
    run.add_argument("--radius", "--radius-arcmin", dest="radius_arcmin", **option,
                     help=f"radius in arcmin (default {defaults.radius_arcmin})")
    run.add_argument("--bands", dest="bands", **option, help=f"comma-separated subset of {','.join(BAND_NAMES)} or 'all'")
    run.add_argument("--data-source", dest="data_source", **option,
                     help=f"one of {', '.join(DATA_SOURCES)} (default {defaults.data_source})")
    run.add_argument("--files-manifest", dest="files_manifest", **option, metavar="FILE",
                     help="YAML files manifest of your own files (data source 'files')")
    run.add_argument("--engine", dest="engine", **option,
                     help=f"photometry engine, one of {', '.join(ENGINES)} (tractor where installed)")
    run.add_argument("--mode", dest="mode", **option,
                     help=f"one of {', '.join(MODES)}: per-source cutouts or whole-region scene fits (default {defaults.mode})")
    run.add_argument("--seed", dest="seed", **option, help=f"seed of the simulated field (default {defaults.seed})")
    run.add_argument("--realism", dest="realism", **option,
                     help=f"simulated field: one of {', '.join(REALISM_LEVELS)} (default {defaults.realism})")
    run.add_argument("--n-workers", dest="n_workers", **option,
                     help="photometry processes (default 0: one per core the run may use, within its CPU limit)")
    run.add_argument("--data-dir", dest="data_dir", **option, help=f"where retrieved and derived data go (default {defaults.data_dir})")
    run.add_argument("--output-dir", dest="output_dir", **option,
                     help=f"where run folders and the latest catalogue, figures and notebooks go (default {defaults.output_dir})")
    run.add_argument("--scheduler", dest="scheduler", **option, metavar="ADDRESS",
                     help="dask scheduler to run the photometry on, e.g. tcp://10.0.0.5:8786 (default: local processes)")
    run.add_argument("--endpoints", default=None, metavar="FILE",
                     help=f"YAML or JSON file of archive endpoints for data source 'archive' (sets ${ENDPOINTS_ENV})")
    run.add_argument("--notebooks", default=str(DEFAULT_NOTEBOOK_DIR), help="folder holding the notebooks")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    notebooks = commands.add_parser(
        "notebooks",
        help="copy the four notebooks into a folder, to open them in Jupyter",
        description="Copy the four notebooks (MyST markdown; jupytext opens them as notebooks) into DEST.",
    )
    notebooks.add_argument("destination", metavar="DEST", help="folder to copy the notebooks into (created)")
    notebooks.add_argument("--force", action="store_true", help="overwrite notebooks already in DEST")
    return parser


def main(argv=None) -> int:
    """The ``mbphot`` command; its exit status.

    ``mbphot run`` turns SIGTERM and SIGHUP into the orderly stop of Ctrl-C (the kernel is shut
    down, its workers end with it) and reports every failure in a short message naming the
    notebook or the file, with any unexpected traceback in the run's log file (`LOG_NAME`).
    """
    args = _parser().parse_args(argv)
    if args.command == "notebooks":
        try:
            copied = copy_notebooks(args.destination, overwrite=args.force)
        except (FileExistsError, FileNotFoundError) as error:
            print(f"mbphot notebooks: {error}", file=sys.stderr)
            return 1
        for path in copied:
            print(path)
        return 0
    previous = {number: signal.signal(number, _stop_on_signal) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run(args) -> int:
    """``mbphot run``: every failure ends in one short message (see `main`)."""
    params = None
    try:
        values = read_parameter_file(args.params_file) if args.params_file else {}
        endpoints_file = args.endpoints or values.pop(ENDPOINTS_KEY, None)
        values.update({name: getattr(args, name) for name in PARAMETER_NAMES if hasattr(args, name)})
        params = RunParameters(**values)
        if endpoints_file:
            endpoints = Path(endpoints_file).expanduser().resolve()
            if not endpoints.is_file():
                raise FileNotFoundError(f"--endpoints {endpoints_file}: no such file; give a YAML or JSON endpoints file")
            # The notebook kernels inherit the environment, and archive mode reads its endpoints from it.
            os.environ[ENDPOINTS_ENV] = str(endpoints)
        if params.data_source == "archive":
            load_endpoints()  # a mistake in the endpoints file stops the run here, not inside 01
        run_dir = run_pipeline(params, args.notebooks, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        # The kernel client's abandoned tasks would each log a traceback as the process exits.
        logging.getLogger("asyncio").disabled = True
        print(f"mbphot run: {str(stop) or 'stopped by Ctrl-C'}; {RESUME_HINT}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, NotebookFailed) as error:
        print(f"mbphot run: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"mbphot run: {_describe_os_error(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        log = _log_traceback(params.run_dir if params is not None else tempfile.gettempdir())
        print(f"mbphot run: unexpected {type(error).__name__}: {error}\nthe traceback is in {log}", file=sys.stderr)
        return 1
    print(f"run folder {run_dir}")
    print(f"latest catalogue, figures and notebooks in {run_dir.parents[1]}")
    return 0


def _describe_os_error(error: OSError) -> str:
    """A file-system error in words: which file, what happened, what to do."""
    where = f" {error.filename}" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"disk full writing{where}: free some space or choose another --data-dir / --output-dir"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where} ({error.strerror}): choose a folder you can write with --data-dir / --output-dir"
    return f"{error.strerror or error}{':' if where else ''}{where}"
