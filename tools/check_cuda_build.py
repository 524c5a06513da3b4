"""Checks a CUDA build of convbert_fast._C without a GPU: the library loads (so it linked against this torch),
every op schema in csrc/ops.cpp has a CUDA kernel registered with the dispatcher, and the library holds a cubin
for each architecture asked for and PTX for each one marked +PTX (what newer GPUs compile at load). Fails naming
what is missing.

    python tools/check_cuda_build.py [--arch "8.0;9.0+PTX"]     (run from the tree the extension was built in)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def schema_names() -> list[str]:
    """The names of the ops on tensors that csrc/ops.cpp defines (`m.def("name(Tensor ...`); ops without tensor
    arguments (cpu_isa, set_cpu_isa: settings of the CPU kernels) have one catch-all kernel and no CUDA one."""
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(([^"]*)', (ROOT / "csrc" / "ops.cpp").read_text())
    names = [name for name, arguments in schemas if "Tensor" in arguments]
    if not names:
        raise SystemExit("check_cuda_build: no m.def(...) schema found in csrc/ops.cpp")
    return names


def embedded_arches(library: str) -> tuple[set[str], set[str]] | None:
    """({"sm_80", ...} of the cubins, {"sm_90", ...} of the PTX) in `library`, by cuobjdump (the toolkit's, else the
    one Triton's wheel ships); None when none is found."""
    folders = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    with contextlib.suppress(ImportError):
        import triton

        folders.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    paths = [os.path.join(folder, "cuobjdump") for folder in folders]
    cuobjdump = shutil.which("cuobjdump") or next((path for path in paths if os.path.isfile(path)), None)
    if cuobjdump is None:
        return None
    def listed(kind: str, suffix: str) -> set[str]:
        listing = subprocess.run([cuobjdump, kind, library], capture_output=True, text=True, check=True).stdout
        return set(re.findall(rf"\.(sm_\d+a?)\.{suffix}", listing))

    return listed("--list-elf", "cubin"), listed("--list-ptx", "ptx")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"))
    args = parser.parse_args()

    import torch

    if torch.version.cuda is None:
        print(f"check_cuda_build: torch {torch.__version__} is a CPU build: nothing to check", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))  # the tree it was built in, not an installed copy
    import convbert_fast._C as library  # the import itself is the link check: unresolved symbols fail here

    print(f"loaded {library.__file__} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    names = schema_names()
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"convbert_fast::{n}", "CUDA")]
    print(f"{len(names) - len(missing)} of {len(names)} ops have a CUDA kernel registered")
    failed = bool(missing)
    if missing:
        print("no CUDA kernel registered for: " + ", ".join(missing), file=sys.stderr)

    arches = [a for a in re.split(r"[;\s]+", args.arch) if a]  # "9.0+PTX": its cubin and its PTX
    wanted = {"sm_" + a.split("+")[0].replace(".", "") for a in arches}
    wanted_ptx = {"sm_" + a.split("+")[0].replace(".", "") for a in arches if a.endswith("+PTX")}
    found = embedded_arches(library.__file__)
    if found is None:
        print("cuobjdump not found: the embedded architectures were not checked", file=sys.stderr)
        failed = True
    else:
        cubins, ptx = found
        print("cubins for: " + ", ".join(sorted(cubins)) + "; PTX for: " + (", ".join(sorted(ptx)) or "none"))
        if wanted - cubins:
            print("no cubin for: " + ", ".join(sorted(wanted - cubins)), file=sys.stderr)
            failed = True
        if wanted_ptx - ptx:
            print("no PTX for: " + ", ".join(sorted(wanted_ptx - ptx)), file=sys.stderr)
            failed = True
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
