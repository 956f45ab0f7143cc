"""Shared reporting for benchmarks: machine/version header and markdown tables under benchmarks/results/."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str:
    """The checkout's short commit; OPENSLOTH_GIT_REVISION where the copy has no .git (the GPU machine)."""
    if os.environ.get("OPENSLOTH_GIT_REVISION"):
        return os.environ["OPENSLOTH_GIT_REVISION"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_header(packages: Iterable[str] = ("numpy", "numba", "torch", "transformers", "trl", "datasets"),
                   command: str | None = None) -> str:
    """Markdown lines naming the date, machine, Python, package versions, packing backends and the command."""
    from opensloth import __version__
    from opensloth.packing import available_backends

    versions = ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())
    lines = [
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}",
        f"- python {platform.python_version()}; opensloth {__version__} (git {git_revision()}); "
        f"backends available: {', '.join(available_backends())}",
        f"- versions: {versions}",
    ]
    if command is None:
        command = " ".join([Path(sys.executable).name] + sys.argv)
    lines.append(f"- command: `{command}`")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, sections: Sequence[tuple[str, str]], header: str | None = None) -> Path:
    """Write benchmarks/results/<name>.md: a title, the machine header, then (subtitle, markdown body) sections."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = header if header is not None else machine_header()
    parts = [f"# {title}", ""] + ([header, ""] if header else [])
    for subtitle, body in sections:
        parts += [f"## {subtitle}", "", body.rstrip(), ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(parts))
    return path


SECTION_START = "<!-- section: {name} -->"
SECTION_END = "<!-- /section: {name} -->"


def write_section(file_stem: str, title: str, name: str, body: str) -> Path:
    """Write one ``## name`` section of benchmarks/results/<file_stem>.md, keeping every other section.

    The section sits between ``<!-- section: name -->`` markers, carries its own machine header (each section may
    come from a different run), and replaces an older copy of itself; the file gets ``# title`` when new.
    """
    path = RESULTS / f"{file_stem}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    block = "\n".join([SECTION_START.format(name=name), f"## {name}", "", body.rstrip(), "",
                       SECTION_END.format(name=name)])
    text = path.read_text() if path.exists() else f"# {title}\n"
    pattern = re.compile(re.escape(SECTION_START.format(name=name)) + r".*?" + re.escape(SECTION_END.format(name=name)),
                         re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path
