"""Paper-style table and plots from the results.json files of a run or a multirun folder.

python scripts/report.py outputs/multirun/2026-11-28/12-00-00 [more folders] --out docs/report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbl.report import collect, missing_jobs, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="results.json files or folders holding them")
    parser.add_argument("--out", type=Path, default=Path("outputs/report"))
    args = parser.parse_args()
    runs = collect(args.paths)
    files = write_report(runs, args.out, missing_jobs(args.paths, runs))
    print(files.pop("markdown").read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
