"""`.tally/env`: how the other `tally` commands find a running `tally dev` stack.

`tally dev` writes the servers it started (or was given) into `<TALLY_DEV_DIR>/env`
as shell `export` lines while it runs, with its pid, and removes the file when it
stops. Every other command that has none of the server URLs in its environment
reads the file, so `tally keys create` or `tally dlq inspect` beside `make dev`
work as written; a file whose `tally dev` is gone (a SIGKILL leaves it behind) is
ignored. The file is also `source`-able, for psql, scripts and other tools.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "env"
# What a command needs to act on the same stack as `tally dev`: its servers, topics, group and rollups.
SHARED = (
    "kafka_bootstrap",
    "postgres_url",
    "redis_url",
    "topic",
    "dlq_topic",
    "consumer_group",
    "rollups_file",
)
URLS = ("kafka_bootstrap", "postgres_url", "redis_url")


@dataclass(frozen=True, slots=True)
class DevEnv:
    """The settings `tally dev` shares, by field name, and the pid of the `tally dev` that wrote them."""

    pid: int
    values: dict[str, str]

    def render(self) -> str:
        lines = [f"# written by `tally dev` (pid {self.pid}) while it runs; removed when it stops", f"# pid {self.pid}"]
        lines += [f"export TALLY_{k.upper()}={shlex.quote(v)}" for k, v in self.values.items()]
        return "\n".join(lines) + "\n"

    def export_line(self) -> str:
        urls = (f"TALLY_{k.upper()}={shlex.quote(self.values[k])}" for k in URLS if k in self.values)
        return "export " + " ".join(urls)

    def summary(self) -> str:
        names = {"kafka_bootstrap": "kafka", "postgres_url": "postgres", "redis_url": "redis"}
        return ", ".join(f"{names[k]} {self.values[k]}" for k in URLS if k in self.values)


def parse(text: str) -> DevEnv | None:
    """The inverse of `DevEnv.render`; None for anything else."""
    pid: int | None = None
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# pid "):
            pid = int(line.removeprefix("# pid ")) if line.removeprefix("# pid ").isdigit() else None
        elif line.startswith("export TALLY_"):
            name, _, quoted = line.removeprefix("export TALLY_").partition("=")
            words = shlex.split(quoted)
            if name.lower() in SHARED and len(words) == 1:
                values[name.lower()] = words[0]
    return DevEnv(pid, values) if pid is not None and values else None


def path(dev_dir: Path) -> Path:
    return dev_dir / FILE_NAME


def write(dev_dir: Path, env: DevEnv) -> Path:
    target = path(dev_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(env.render())
    tmp.replace(target)  # never a half-written file for a command to read
    return target


def remove(dev_dir: Path, pid: int) -> None:
    """Remove the file if this `tally dev` wrote it (another one may have started since)."""
    found = read(dev_dir)
    if found is not None and found.pid == pid:
        path(dev_dir).unlink(missing_ok=True)


def read(dev_dir: Path) -> DevEnv | None:
    try:
        return parse(path(dev_dir).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def running(dev_dir: Path) -> DevEnv | None:
    """The env of a `tally dev` that is still running, or None."""
    found = read(dev_dir)
    return found if found is not None and _alive(found.pid) else None


def discover(environ: dict[str, str] | os._Environ[str]) -> tuple[dict[str, str], DevEnv | None]:
    """Settings overrides from a running `tally dev`, for a command given none of the server URLs.

    Variables set in `environ` always win; the returned env says what was used (None: nothing).
    """
    if any(f"TALLY_{k.upper()}" in environ for k in URLS):
        return {}, None
    found = running(Path(environ.get("TALLY_DEV_DIR", ".tally")))
    if found is None:
        return {}, None
    return {k: v for k, v in found.values.items() if f"TALLY_{k.upper()}" not in environ}, found
