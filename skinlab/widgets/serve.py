"""``skinlab app``: serve the form as a standalone page with Voilà (for classrooms)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["VoilaMissing", "notebook_source", "serve", "write_notebook"]


class VoilaMissing(ImportError):
    """Voilà is not installed; the message says how to install it."""


def notebook_source(ledger: str | os.PathLike | None, start_dir: str | os.PathLike) -> dict:
    """The notebook Voilà runs: one cell calling :func:`skinlab.app` (absolute paths)."""
    ledger_arg = "None" if ledger is None else repr(str(Path(ledger).expanduser().absolute()))
    code = ("import skinlab\n"
            f"skinlab.app(ledger={ledger_arg}, start_dir={str(Path(start_dir).absolute())!r})")
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "skinlab-app", "metadata": {},
                   "outputs": [], "source": code}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def write_notebook(folder: str | os.PathLike, ledger=None, start_dir=None) -> Path:
    path = Path(folder) / "skinlab-app.ipynb"
    nb = notebook_source(ledger, start_dir or os.getcwd())
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return path


def serve(ledger=None, *, port: int = 8866, open_browser: bool = True, ip: str = "127.0.0.1",
          announce: Callable[[str], None] | None = None) -> int:
    """Serve the form with Voilà until interrupted; returns an exit code.

    Parameters
    ----------
    ledger : path, optional
        Defaults to ``skinlab-study/ledger.sqlite`` under the current folder, which is also where
        the path chooser starts.
    port, ip : where the page is served (loopback by default).
    open_browser : bool
    announce : callable, optional
        Called with one line (the page's address and the ledger) just before Voilà starts;
        ``skinlab app`` prints it. Nothing here prints.

    Raises
    ------
    VoilaMissing
        Voilà is not installed.
    """
    try:
        from voila.app import Voila
    except ImportError as exc:
        raise VoilaMissing("skinlab app needs Voilà: pip install 'skinlab[app]'") from exc
    if ledger is None:
        from .logic import DEFAULT_LEDGER

        ledger = DEFAULT_LEDGER
    with tempfile.TemporaryDirectory(prefix="skinlab-app-") as tmp:
        notebook = write_notebook(tmp, ledger, os.getcwd())
        if announce is not None:
            announce(f"skinlab: serving the form at http://{ip}:{port}/ (ledger {Path(ledger).absolute()}); "
                     "Ctrl-C to stop")
        argv = [str(notebook), f"--port={port}", f"--Voila.ip={ip}", "--theme=light",
                "--VoilaConfiguration.show_tracebacks=False"]
        if not open_browser:
            argv.append("--no-browser")
        Voila.launch_instance(argv=argv)
    return 0
