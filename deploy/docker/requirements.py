"""Print pyproject.toml's runtime requirements, one a line, leaving out the named packages.

The vLLM rollout image uses it to install mmupt's requirements around vLLM's own torch pin:
    python deploy/docker/requirements.py --exclude torch torchvision > requirements.txt
"""
import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def requirements(exclude: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    name = lambda req: re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()  # noqa: E731
    return [req for req in deps if name(req) not in exclude]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exclude", nargs="*", default=[], help="package names to leave out")
    args = parser.parse_args()
    print("\n".join(requirements({n.lower() for n in args.exclude})))
