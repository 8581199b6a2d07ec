"""Ingest benchmark: throughput against a parse-only baseline, and peak memory at 1× vs 10× input.

Run ``python benchmarks/ingest.py`` (``--quick`` for a smoke run). Every figure is measured in
the same run as its baseline, so ratios, not absolute numbers, are what to compare across
machines. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Read by Ray when it starts; set before anything imports ray (children inherit them).
# Forced rather than defaulted: a private, throw-away local Ray must not pick up a user's
# cluster auth or phone home, and Ray Data's V2 datasource path is not what ingest uses.
os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)

import psutil

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "datasets"
SOURCES = {"oc20": "oc20-s2ef", "mp": "materials-project"}
MIB = 1 << 20


def parse_oc20(files: list[Path]) -> int:
    """Baseline: what any OC20 consumer pays, ASE reading every frame with its labels."""
    import ase.io

    n = 0
    for path in files:
        for atoms in ase.io.read(str(path), ":"):
            atoms.get_potential_energy()
            atoms.get_forces(apply_constraint=False)  # raw DFT forces, as the reader stores
            n += 1
    return n


def parse_mp(files: list[Path]) -> int:
    """Baseline: JSON-decode each document and build its pymatgen Structure."""
    from pymatgen.core import Structure

    n = 0
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    Structure.from_dict(json.loads(line)["structure"])
                    n += 1
    return n


def ingest_serial(source: str, files: list[Path], out: Path) -> int:
    """The same work as ``run_ingest`` (plan, checksum, every unit) in this process, no Ray."""
    from matsci_ray.data.integrity import sha256_file
    from matsci_ray.data.readers import get_reader
    from matsci_ray.data.shards import IngestOptions, ingest_unit

    options = IngestOptions(source=source)
    reader = get_reader(source)
    n = 0
    for file in reader.expand(files):
        digest = sha256_file(file)
        for unit in reader.plan(file):
            sidecar = ingest_unit(unit, out / reader.dataset, options, digest)
            n += sum(s["rows"] for s in sidecar["shards"].values()) + len(sidecar["rejects"])
    return n


def ingest_ray(source: str, files: list[Path], out: Path) -> int:
    """``run_ingest`` on the already-started Ray; returns records read (kept + rejected)."""
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    manifest = run_ingest(source, files, out, IngestOptions(source=source), progress=False)
    return int(manifest["counts"]["total"] + manifest["counts"]["rejected"])


def _tree_cpu() -> float:
    """CPU seconds so far of this process and its live descendants (Ray's daemons, workers);
    a worker exiting mid-run would lose its share, but Ray keeps them alive."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed(fn: Callable[..., int], *args: Any, tree: bool = False) -> tuple[float, float, int]:
    """``(wall s, CPU s, result)``. CPU time is what a shared, oversubscribed machine can't
    inflate; ``tree`` counts the Ray processes too, else only this one (where Ray idles)."""
    cpu = _tree_cpu if tree else time.process_time
    start, cpu0 = time.perf_counter(), cpu()
    n = fn(*args)
    return time.perf_counter() - start, cpu() - cpu0, n


def replicate(key: str, files: list[Path], factor: int, dest: Path) -> list[Path]:
    """``factor`` copies of the input with distinct ids, so nothing is rejected as a duplicate."""
    dest.mkdir(parents=True)
    if key == "oc20":  # the system id is the file stem, so each copy is a new system
        out = []
        for copy in range(factor):
            for path in files:
                out.append(dest / f"{path.stem}r{copy}{path.suffix}")
                shutil.copyfile(path, out[-1])
        return out
    target = dest / "summary_docs.jsonl"
    with open(target, "w") as fh:
        for copy in range(factor):
            for path in files:
                for line in path.read_text().splitlines():
                    doc = json.loads(line) if line.strip() else None
                    # ids default to the line number (distinct per copy); real MP ids get a suffix
                    if doc and doc.get("material_id"):
                        doc["material_id"] = f"{doc['material_id']}-r{copy}"
                        line = json.dumps(doc)
                    fh.write(line + "\n")
    return [target]


def child(spec: dict[str, Any]) -> None:
    """Memory-run body, in its own process so each run starts with fresh Ray workers."""
    import ray

    from matsci_ray.ray_env import init_ray

    init_ray(num_cpus=spec["num_cpus"], temp_dir=Path(spec["ray_tmp"]))
    try:
        n = ingest_ray(spec["source"], [Path(p) for p in spec["paths"]], Path(spec["out"]))
    finally:
        ray.shutdown()
    print(json.dumps({"records": n}))


def _is_worker(proc: psutil.Process) -> bool:
    # Ray retitles workers "ray::<task>" (or "ray::IDLE"); before that they run default_worker.py.
    # Its per-node agents are titled "ray::…Agent" too, but they are fixed overhead, not workers.
    cmd = " ".join(proc.cmdline()).strip()
    title = cmd.split(" ", 1)[0]
    return (title.startswith("ray::") and not title.endswith("Agent")) or "default_worker" in cmd


def measure_memory(
    source: str, paths: list[Path], num_cpus: int, work: Path, interval: float = 0.05
) -> dict[str, Any]:
    """Peak RSS of the ingest's whole process tree (driver, Ray daemons, workers), polled."""
    spec: dict[str, Any] = dict(source=source, paths=[str(p) for p in paths], num_cpus=num_cpus)
    spec |= dict(out=str(work / "out"), ray_tmp=str(work / "ray"))
    log, result = work / "child.log", work / "child.out"
    start = time.perf_counter()
    # files, not pipes: Ray forwards worker logs to the driver, which could fill a pipe and stall
    with open(log, "w") as err, open(result, "w") as out:
        proc = psutil.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdout=out, stderr=err
        )
        tree = workers_sum = worker_max = 0
        while proc.poll() is None:
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = in_workers = 0
            for p in procs:
                try:  # processes come and go between listing and reading them
                    rss = p.memory_info().rss
                    worker = _is_worker(p)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if worker:
                    in_workers += rss
                    worker_max = max(worker_max, rss)
            tree, workers_sum = max(tree, total), max(workers_sum, in_workers)
            time.sleep(interval)
    if proc.wait() != 0:
        raise RuntimeError(f"ingest child failed:\n{log.read_text()[-3000:]}")
    records = json.loads(result.read_text().strip().splitlines()[-1])["records"]
    shutil.rmtree(work / "out", ignore_errors=True)
    peaks = {"tree_mib": tree, "workers_sum_mib": workers_sum, "worker_max_mib": worker_max}
    wall = time.perf_counter() - start
    return {"records": records, "wall_s": wall} | {k: v / MIB for k, v in peaks.items()}


def bench_throughput(key: str, files: list[Path], tmp: Path, repeats: int) -> dict[str, Any]:
    source = SOURCES[key]
    parse = parse_oc20 if key == "oc20" else parse_mp
    fns: dict[str, Callable[..., int]] = {"parse": parse, "ray": ingest_ray}
    fns["serial"] = ingest_serial
    res: dict[str, Any] = {"source": source, "files": len(files)}
    runs: dict[str, list[float]] = {m: [] for m in ("parse", "ray", "serial")}
    cpus: dict[str, list[float]] = {m: [] for m in ("parse", "ray", "serial")}
    counts: set[int] = set()
    # One extra Ray run first: it starts the workers and pays their imports (reported as cold);
    # the in-process modes warm up on one file so no timed run pays for imports either.
    res["ray_cold_s"], _, n = timed(ingest_ray, source, files, tmp / "cold")
    counts.add(n)
    parse(files[:1])
    ingest_serial(source, files[:1], tmp / "warm")
    for i in range(repeats):
        # interleaved, so drift (thermal, page cache, noisy neighbours) hits every mode alike
        for mode in ("parse", "ray", "serial"):
            out = tmp / f"{key}-{mode}-{i}"
            args = (files,) if mode == "parse" else (source, files, out)
            seconds, cpu, n = timed(fns[mode], *args, tree=mode == "ray")
            runs[mode].append(seconds)
            cpus[mode].append(cpu)
            counts.add(n)
            shutil.rmtree(out, ignore_errors=True)
    if len(counts) != 1:  # a rejected or lost record would make the rates incomparable
        raise RuntimeError(f"{source}: modes disagree on the record count: {sorted(counts)}")
    res["records"] = n = counts.pop()
    for mode, times in runs.items():
        res |= {f"{mode}_s": times, f"{mode}_rps": n / statistics.median(times)}
        res |= {f"{mode}_cpu_s": cpus[mode], f"{mode}_cpu_rps": n / statistics.median(cpus[mode])}
    for a, b in (("ray", "parse"), ("serial", "parse"), ("ray", "serial")):
        res[f"{a}_vs_{b}"] = res[f"{a}_rps"] / res[f"{b}_rps"]
        res[f"{a}_vs_{b}_cpu"] = res[f"{a}_cpu_rps"] / res[f"{b}_cpu_rps"]
    return res


def bench_memory(
    key: str, files: list[Path], tmp: Path, factor: int, repeats: int, num_cpus: int
) -> dict[str, Any]:
    res: dict[str, Any] = {"source": SOURCES[key], "factor": factor}
    inputs = {"1x": files, f"{factor}x": replicate(key, files, factor, tmp / f"{key}-rep")}
    for label, paths in inputs.items():
        runs = [
            measure_memory(SOURCES[key], paths, num_cpus, Path(tempfile.mkdtemp(dir=tmp)))
            for _ in range(repeats)
        ]
        res[label] = {"runs": runs, "records": runs[0]["records"]} | {
            m: statistics.median(r[m] for r in runs)
            for m in ("tree_mib", "workers_sum_mib", "worker_max_mib", "wall_s")
        }
    shutil.rmtree(tmp / f"{key}-rep")
    big = res[f"{factor}x"]
    for m in ("tree_mib", "workers_sum_mib", "worker_max_mib"):
        res[f"{m}_ratio"] = big[m] / res["1x"][m]
    return res


def markdown(result: dict[str, Any]) -> str:
    reps, cpus = result["repeats"], result["num_cpus"]
    lines = []
    for sfx, unit in (("", "records per wall-clock second"), ("_cpu", "records per CPU second")):
        lines += [
            f"Throughput, {unit} (median of {reps}; ratios against the same run's parse)",
            "",
            f"| source | records | parse | Ray ingest ({cpus} CPUs) | Ray ÷ parse "
            "| serial ingest | serial ÷ parse | Ray ÷ serial |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in result["throughput"].values():
            keys = ["parse{}_rps", "ray{}_rps", "ray_vs_parse{}", "serial{}_rps"]
            keys += ["serial_vs_parse{}", "ray_vs_serial{}"]
            cells = [r[k.format(sfx)] for k in keys]
            fmts = ["{:.0f}", "{:.0f}", "{:.2f}", "{:.0f}", "{:.2f}", "{:.2f}"]
            row = " | ".join(map(str.format, fmts, cells))
            lines.append(f"| {r['source']} | {r['records']} | {row} |")
        lines.append("")
    cold = [f"{r['source']} {r['ray_cold_s']:.1f} s" for r in result["throughput"].values()]
    lines.append("First (cold) Ray ingest, starting the workers: " + ", ".join(cold))
    lines += [
        "",
        f"Peak RSS, MiB (median of {result['repeats']}; 1× → N×, ratio = N× / 1×)",
        "",
        "| source | records 1× → N× | process tree | all workers | largest worker |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in result["memory"].values():
        one, big = r["1x"], r[f"{r['factor']}x"]
        cells = [f"{one['records']} → {big['records']}"]
        for m in ("tree_mib", "workers_sum_mib", "worker_max_mib"):
            cells.append(f"{one[m]:.0f} → {big[m]:.0f} ({r[m + '_ratio']:.2f}×)")
        lines.append(f"| {r['source']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 OC20 files, 1 repeat")
    p.add_argument("--repeats", type=int, default=3, help="measurements per figure (median)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs for Ray")
    p.add_argument("--factor", type=int, default=10, help="replication for the memory runs")
    p.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=sorted(SOURCES))
    p.add_argument("--samples", type=Path, default=SAMPLES, help="the shared/datasets folder")
    p.add_argument(
        "--mp-copies", type=int, default=10, help="MP throughput input: copies of the 200 docs"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest.json")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats
    oc20 = sorted((args.samples / "oc20" / "trajectories").glob("*.traj"))
    # --quick: a few trajectories keep the smoke run short
    files = {"oc20": oc20[:3] if args.quick else oc20}
    files["mp"] = [args.samples / "materials_project" / "summary_docs.jsonl"]

    import ray

    from matsci_ray.ray_env import init_ray

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine: dict[str, Any] = dict(
        cpus=os.cpu_count(), mem_gib=psutil.virtual_memory().total / (1 << 30)
    )
    # the machine may be shared: a busy neighbour shows in the load and skews absolute rates
    machine |= dict(python=platform.python_version(), ray=ray.__version__)
    machine["loadavg_1m_start"] = os.getloadavg()[0]
    result: dict[str, Any] = dict(date=now, command=" ".join(["python", *sys.argv]))
    result |= dict(machine=machine, num_cpus=args.num_cpus, repeats=repeats, quick=args.quick)
    result |= dict(throughput={}, memory={})
    # short path under /tmp: Ray's unix sockets live in its temp dir and paths are length-capped
    with tempfile.TemporaryDirectory(prefix="mrb-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        init_ray(num_cpus=args.num_cpus, temp_dir=tmp / "ray")
        try:
            for key in args.sources:
                print(f"throughput: {key}", file=sys.stderr, flush=True)
                inputs = files[key]
                if key == "mp":  # 200 documents parse in ~30 ms: too short to time reliably
                    inputs = replicate(key, inputs, args.mp_copies, tmp / "mp-throughput")
                result["throughput"][key] = bench_throughput(key, inputs, tmp, repeats)
        finally:
            ray.shutdown()  # before the memory runs: each starts its own Ray
        for key in args.sources:
            print(f"memory: {key}", file=sys.stderr, flush=True)
            result["memory"][key] = bench_memory(
                key, files[key], tmp, args.factor, repeats, args.num_cpus
            )
    machine["loadavg_1m_end"] = os.getloadavg()[0]
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
