"""Build hook: the wheel carries the repository's ``configs/`` as ``dust/configs`` (package data), so an installed
dust runs ``dust demo`` and ``dust train --config la/mcf`` from any folder. ``configs/`` at the repository root
stays the one copy (a source checkout and an editable install read it there: ``dust.config.shipped_configs``);
everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repository's configs/ in place
            return
        for source in sorted(CONFIGS.rglob("*.yaml")):
            target = Path(self.build_lib) / "dust" / "configs" / source.relative_to(CONFIGS)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildWithConfigs})
