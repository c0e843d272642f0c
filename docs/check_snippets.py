"""Run the guide's code snippets (docs/guide/snippets/*.py) and report what each printed and how long it took.

Each snippet is a self-contained script that asserts the property it
illustrates, so a snippet that stops working fails here. Run from anywhere:

    python docs/check_snippets.py [name ...] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

SNIPPETS = pathlib.Path(__file__).resolve().parent / "guide" / "snippets"
ROOT = SNIPPETS.parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="snippet names without .py (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per snippet")
    args = parser.parse_args()
    paths = [SNIPPETS / f"{name}.py" for name in args.names] or sorted(SNIPPETS.glob("*.py"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # the sources next to this file, whatever copy of the package is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    failed = []
    for path in paths:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-W", "ignore::DeprecationWarning", str(path)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env=env,
                check=False,
            )
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            output = proc.stdout + (proc.stderr if proc.returncode else "")
        except subprocess.TimeoutExpired:
            status, output = f"FAILED (timeout {args.timeout:.0f} s)", ""
        elapsed = time.perf_counter() - start
        print(f"{path.stem:24s} {status:24s} {elapsed:7.1f} s")
        if output.strip():
            print("    " + output.strip().replace("\n", "\n    "))
        if status != "ok":
            failed.append(path.stem)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
