"""The launch commands the README and the entry point's help show resolve to a valid config and engine.

Each command's config and overrides are loaded, and its engine and batch layout are checked for the number of ranks
the launcher would start, so a documented command cannot drift into one that fails at start. (Real launches through
each launcher run in tests/engines/test_launchers.py and tests/test_quickstart.py.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.rules import check_layout

ROOT = Path(__file__).resolve().parents[1]


def launch_commands() -> list[tuple[str, str]]:
    """(source file, command line) for each documented ``launch/pretrain.py`` command with a config from configs/."""
    found = []
    for source in ("README.md", "launch/pretrain.py"):
        for line in (ROOT / source).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "launch/pretrain.py --config configs/" in line and re.match(r"^(python|torchrun|deepspeed)\b", line):
                found.append((source, line))
    return found


def ranks_of(argv: list[str]) -> int:
    for flag in ("--nproc_per_node", "--num_gpus", "--world"):  # --world: a dry run's simulated ranks
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    return 1


def test_the_readme_shows_each_launcher() -> None:
    launchers = {line.split()[0] for _, line in launch_commands()}
    assert launchers == {"python", "torchrun", "deepspeed"}


@pytest.mark.parametrize("source, command", launch_commands())
def test_documented_launch_command_is_valid(source: str, command: str) -> None:
    argv = shlex.split(command)
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:] if re.match(r"^\w+(\.\w+)+=", a)]
    cfg = load_config(ROOT / config, overrides)
    device = "cuda" if "--dry-run" in argv else "cpu"  # a dry run checks the cluster's layout
    check_layout(cfg, ranks_of(argv), device)  # raises ConfigError for a layout training refuses
