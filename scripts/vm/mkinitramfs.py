"""mkinitramfs.py KVER MODROOT OUTDIR MODULE... : copy MODULE and everything it depends on
(modules.dep order) from MODROOT/lib/modules/KVER into OUTDIR/mods, with OUTDIR/mods/order
listing them in load order for the initramfs' init."""

from __future__ import annotations

import os
import shutil
import sys


def main() -> None:
    kver, modroot, out, *wanted = sys.argv[1:]
    base = f"{modroot}/lib/modules/{kver}"
    deps: dict[str, tuple[str, list[str]]] = {}
    with open(f"{base}/modules.dep") as dep_file:
        for line in dep_file:
            path, rest = line.split(":", 1)
            deps[os.path.basename(path).split(".ko")[0].replace("-", "_")] = (path, rest.split())
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dependency in deps[os.path.basename(path).split(".ko")[0].replace("-", "_")][1]:
            visit(dependency)
        order.append(path)

    for name in wanted:
        visit(deps[name.replace("-", "_")][0])
    os.makedirs(f"{out}/mods", exist_ok=True)
    for path in order:
        shutil.copy(f"{base}/{path}", f"{out}/mods/")
    with open(f"{out}/mods/order", "w") as order_file:
        order_file.write("".join(os.path.basename(path) + "\n" for path in order))
    print(" ".join(os.path.basename(path) for path in order))


if __name__ == "__main__":
    main()
