"""The native extensions (setup.py: `_native` for the AEAD, `_offload` for the kernel's
offloads) and the two switches that choose them over their pure-Python twins.

FABRIC_NATIVE=0 runs the twins even where the extensions are built (CI runs the data
path's tests both ways); FABRIC_REQUIRE_NATIVE=1 makes a missing extension an
ImportError instead of a quiet fallback (CI sets it).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

WANTED = os.environ.get("FABRIC_NATIVE") != "0"
BUILD_HINT = ("install gcc, the Python headers and libssl-dev (scripts/setup.sh does; Debian: apt-get install "
              "gcc libc6-dev python3-dev libssl-dev), then `pip install -e .` again")


def load(name: str) -> tuple[ModuleType | None, str]:
    """The extension fabric.dataplane.`name`, or None and why it is missing."""
    try:
        return importlib.import_module(f"fabric.dataplane.{name}"), ""
    except ImportError as exc:
        if os.environ.get("FABRIC_REQUIRE_NATIVE") == "1":
            raise ImportError(f"FABRIC_REQUIRE_NATIVE=1 but fabric.dataplane.{name} did not import ({exc}): "
                              f"{BUILD_HINT}") from exc
        return None, f"the native extension did not import: {exc}"
