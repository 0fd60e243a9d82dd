"""Exact engine vs centralized NUTS: accuracy, speed, and scaling to a million clients.

Every fit runs in a fresh Python process, so each side pays its own JAX compilation ("end to
end, compilation included"); the time reported is the ``hf.fit`` call, imports excluded, and
peak memory is the worker process's maximum resident set size.

    python benchmarks/bench_exact.py                 # everything, writes BENCHMARKS.md
    python benchmarks/bench_exact.py --quick         # radon and eight schools, N up to 1e4

Accuracy: for every quantity (each global parameter and each client's parameter) the
difference of posterior means in units of the centralized posterior sd, and the ratio of sds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- bench_exact:start -->", "<!-- bench_exact:end -->"
#: centralized NUTS is attempted only up to this many clients (it takes minutes beyond)
NUTS_UP_TO = 10_000


def _problem(name: str):
    import hierfl as hf  # noqa: F401

    if name == "radon":
        from models import radon

        return radon.family(), radon.load()
    if name == "eight_schools":
        from models import eight_schools

        return eight_schools.family(), eight_schools.load()
    if name.startswith("synthetic-"):
        from models import synthetic_lmm

        data, _ = synthetic_lmm.generate(int(float(name.split("-")[1])), seed=0)
        return synthetic_lmm.family(), data
    raise ValueError(name)


def worker(name: str, method: str, out: str, seed: int) -> None:
    """Fit once in this process; write draws (small problems) and figures to ``out``."""
    import warnings

    warnings.simplefilter("ignore")
    import hierfl as hf

    family, data = _problem(name)
    start = time.perf_counter()
    fit = hf.fit(family, data, method=method, seed=seed)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {
        "seconds": seconds,
        "peak_bytes": peak,
        "clients": data.num_clients,
        "observations": data.num_obs,
        "server": fit.diagnostics.get("server", ""),
    }
    arrays = {}
    if data.num_clients <= NUTS_UP_TO:
        for site, draws in fit.posterior_samples().items():
            if site in fit.sites.global_sites or site in fit.sites.client_sites:
                arrays[site] = draws.reshape((-1,) + draws.shape[2:])
    np.savez(out, **arrays)
    Path(out + ".json").write_text(json.dumps(record))


def run(name: str, method: str, seed: int = 0, timeout: float = 3600.0):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "draws.npz")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, __file__, "worker", name, method, out, str(seed)],
            check=True,
            env=env,
            timeout=timeout,
            cwd=ROOT,
        )
        record = json.loads(Path(out + ".json").read_text())
        with np.load(out) as draws:
            return record, {k: draws[k] for k in draws.files}


def compare(test: dict, reference: dict) -> tuple[float, float, int]:
    """Max |mean difference| / reference sd and max |sd ratio - 1| over every quantity."""
    worst_mean, worst_sd, count = 0.0, 0.0, 0
    for site, ref in reference.items():
        if site not in test:
            continue
        ref_sd = ref.std(axis=0)
        keep = ref_sd > 0
        diff = np.abs(test[site].mean(axis=0) - ref.mean(axis=0))[keep] / ref_sd[keep]
        ratio = np.abs(test[site].std(axis=0)[keep] / ref_sd[keep] - 1.0)
        worst_mean = max(worst_mean, float(diff.max(initial=0)))
        worst_sd = max(worst_sd, float(ratio.max(initial=0)))
        count += int(keep.sum())
    return worst_mean, worst_sd, count


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {cpu} CPU, no GPU, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="scaling only up to 1e4 clients")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    lines = []
    lines.append("### Exact engine vs centralized NUTS (accuracy and end-to-end speed)\n")
    lines.append(
        "Same model, data and number of draws (4 chains x 1000 after 1000 warmup); each "
        "fit in a fresh process, compilation included.\n"
    )
    lines.append(
        "| problem | clients | quantities | max abs(mean diff)/sd | max abs(sd ratio - 1) "
        "| exact s | NUTS s | speed-up |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    problems = ["eight_schools", "radon", "synthetic-1e2", "synthetic-1e3", "synthetic-1e4"]
    for name in problems:
        exact_record, exact_draws = run(name, "exact")
        nuts_record, nuts_draws = run(name, "nuts")
        mean_err, sd_err, count = compare(exact_draws, nuts_draws)
        speed = nuts_record["seconds"] / exact_record["seconds"]
        lines.append(
            f"| {name} | {exact_record['clients']} | {count} | {mean_err:.3f} | "
            f"{sd_err:.3f} | {exact_record['seconds']:.1f} | "
            f"{nuts_record['seconds']:.1f} | {speed:.1f}x |"
        )
        print(lines[-1], flush=True)
    lines.append(
        "\n### Scaling of the exact engine (synthetic linear mixed data, ~10 "
        "observations per client)\n"
    )
    lines.append("| clients | observations | server | exact s | exact peak memory |")
    lines.append("| ---: | ---: | --- | ---: | ---: |")
    sizes = ["1e2", "1e3", "1e4"] + ([] if args.quick else ["1e5", "1e6"])
    for size in sizes:
        record, _ = run(f"synthetic-{size}", "exact")
        lines.append(
            f"| {record['clients']:,} | {record['observations']:,} | "
            f"{record['server']} | {record['seconds']:.1f} | "
            f"{record['peak_bytes'] / 2**30:.2f} GiB |"
        )
        print(lines[-1], flush=True)
    stamp = datetime.date.today().isoformat()
    lines.append(
        f"\nCommand: `python benchmarks/bench_exact.py{' --quick' if args.quick else ''}`"
        f"; machine: {machine()}; date: {stamp}.\n"
    )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", MARK_START, MARK_END, text)


def write_section(path: Path, start: str, end: str, body: str) -> None:
    """Replace (or append) the marked section of ``path``, leaving the rest untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
