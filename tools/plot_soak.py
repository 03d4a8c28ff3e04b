"""Plots soak runs (tools/soak.sh, loadgen --samples): the server's resident memory against
requests answered, one line per run, with its anonymous part (the heap: what an allocator
keeps) beside it; file-backed pages (the mapped libtorch and model code) are the difference.

    tools/plot_soak.py OUT.png RUN.csv...      each run is labelled with its file's name
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt

MIB = 1 << 20


def main(out: str, runs: list[str]) -> None:
    if not runs:
        sys.exit("usage: plot_soak.py OUT.png RUN.csv...")
    figure, (total, anon) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for run in sorted(runs):
        with open(run) as f:
            # loadgen writes each sample as a client takes it: nearly, not quite, in order.
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["requests"]))
        requests = [int(r["requests"]) for r in rows]
        label = Path(run).stem
        total.plot(requests, [int(r["rss_bytes"]) / MIB for r in rows], marker=".", label=label)
        anon.plot(requests, [int(r["rss_anon_bytes"]) / MIB for r in rows], marker=".", label=label)
    total.set_title("resident memory (VmRSS)")
    anon.set_title("anonymous resident memory (RssAnon: heap, stacks)")
    for axes in (total, anon):
        axes.set_xlabel("requests answered")
        axes.set_ylabel("MiB")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
