"""Print one of README's two set-up commands, exactly as README writes it.

    python3 tools/readme_commands.py 1     # the main job: the suite on the reference
    python3 tools/readme_commands.py 2     # the tests
    python3 tools/readme_commands.py 1 --readme OTHER.md

CI runs what this prints, so the commands it proves are README's own and cannot drift from it. The
commands are the one-line ```bash blocks under README's "## Set-up: two commands" heading; anything
else there (a missing block, a block of several lines) is an error, so an edit that breaks the
layout makes CI red instead of running something else.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Set-up: two commands"


def setup_commands(text: str) -> list[str]:
    """The commands of the set-up section, in order."""
    start = text.find(f"\n{HEADING}\n")
    if start < 0:
        raise ValueError(f"README.md has no {HEADING!r} section")
    section = text[start + len(HEADING) + 2:]
    following = re.search(r"^## ", section, flags=re.M)
    section = section[:following.start()] if following else section
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
    commands = []
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if len(lines) != 1:
            raise ValueError(f"a set-up block must hold one command line, found {len(lines)}: {block!r}")
        commands.append(lines[0].strip())
    if len(commands) != 2:
        raise ValueError(f"README.md's set-up section must have 2 ```bash blocks, found {len(commands)}")
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 tools/readme_commands.py",
                                     description="Print one of README's two set-up commands.")
    parser.add_argument("number", choices=["1", "2"], help="1: the suite on the reference, 2: the tests")
    parser.add_argument("--readme", type=Path, default=README, help="the README to read (default: the project's)")
    args = parser.parse_args(argv)
    try:
        commands = setup_commands(args.readme.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"readme_commands: {e}", file=sys.stderr)
        return 1
    print(commands[int(args.number) - 1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
