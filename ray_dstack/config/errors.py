"""`ConfigError`: every problem of a `.dstack.yml`, each with its field path and YAML line."""

from __future__ import annotations

from dataclasses import dataclass

from ray_dstack.errors import UsageError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file."""

    path: str  # dotted field path, e.g. `resources.gpu` or `env[2]`; "" for the whole file
    line: int | None  # 1-based YAML line, when the YAML has one
    message: str

    def format(self, filename: str) -> str:
        where = f"{filename}:{self.line}" if self.line else filename
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


MAX_SHOWN = 50  # a file with thousands of problems gets a readable message, not megabytes


class ConfigError(UsageError):
    """A configuration file is invalid. `str(err)` has one line per problem."""

    def __init__(self, filename: str, problems: list[Problem]):
        self.filename = filename
        self.problems = list(problems)
        shown = [p.format(filename) for p in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            shown.append(f"{filename}: ... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(shown))
