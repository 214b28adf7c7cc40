"""Ship the notebooks inside the package.

The four notebooks live in ``notebooks/`` at the top of the repository, where people open
them. A wheel carries them as package data in ``mbphot/notebooks/``, copied there at build
time, so that ``mbphot run`` and ``mbphot notebooks DEST`` work from an installed package.
Everything else is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"


class build_py_with_notebooks(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install reads the notebooks from the source tree
        target = Path(self.build_lib) / "mbphot" / "notebooks"
        target.mkdir(parents=True, exist_ok=True)
        for notebook in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md")):
            shutil.copyfile(notebook, target / notebook.name)


setup(cmdclass={"build_py": build_py_with_notebooks})
