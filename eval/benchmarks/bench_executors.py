"""The local executor against Ray on two single-CPU nodes: wall time, peak memory, bytes moved, same bytes.

    python eval/benchmarks/bench_executors.py [--model qwen2.5-coder-1.5b|smollm2] [--rows ROW,...]
                                              [--calib-samples 16] [--calib-seqlen 512] [--redo] [--docs]

Rows: ``local-rtn``, ``local-nf4``, ``local-gptq`` (this process, every core) and ``ray-rtn``,
``ray-nf4``, ``ray-gptq`` (a Ray cluster started here: a head with no CPUs and two worker nodes of
one CPU each, ``--workers 2``). Each run is a child process; this one polls the memory of the Ray
workers that run llmquant's tasks. Per row: wall time of the run, peak RSS of the driver and of
each worker, the checkpoint's MB/s against its raw read speed, tensor bytes moved per block (from
the driver's log), and whether the output has the same bytes as the local row's. GPTQ calibrates on
`--calib-samples` windows of Wikipedia extracts (16 x 512 by default: the point is local against
Ray, not the peers' 64 x 512). Results go to ``eval/benchmarks/results/executors_<model>.json``
(kept by row unless ``--redo``) and the table to ``docs/benchmarks.md`` between its executors
markers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
if not __package__:
    sys.path.insert(0, str(ROOT))

START, END = "<!-- executors:start (eval/benchmarks/bench_executors.py writes this section) -->", "<!-- executors:end -->"
ALGOS = {"rtn": {"algo": "rtn", "bits": 4}, "nf4": {"algo": "nf4"}, "gptq": {"algo": "gptq", "bits": 4}}
GROUP_SIZE = {"smollm2": 64}  # as in the peers benchmark; 128 for the others
ROWS = [f"{where}-{algo}" for algo in ALGOS for where in ("local", "ray")]
TASKS = ("CalibrationWorker", "uncalibrated_block")  # the Ray workers' process titles while they run llmquant's work

CHILD = """
import json, logging, re, sys, time
from eval.memory import peak_rss_mb
from llmquant.api import quantize
settings = json.loads(sys.argv[3])
traffic = []
class Meter(logging.Handler):
    def emit(self, record):
        found = re.search(r"block (\\d+) over \\d+ workers: ([\\d.]+) MB of tensors to the driver, ([\\d.]+) MB", record.getMessage())
        if found:
            traffic.append([int(found[1]), float(found[2]), float(found[3])])
logging.getLogger("llmquant.host.distributed").addHandler(Meter())
logging.getLogger("llmquant.host.distributed").setLevel(logging.INFO)
start = time.perf_counter()
quantize(sys.argv[1], sys.argv[2], settings)
print(json.dumps({"wall_s": time.perf_counter() - start, "driver_peak_mb": peak_rss_mb(), "traffic": traffic}))
"""


def start_cluster() -> Any:
    from llmquant.deps import require

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    Cluster = require("ray.cluster_utils", extra="ray", purpose="the Ray rows").Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def run_row(model: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Run one quantization in a child process, polling the Ray workers' memory while it runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), RAY_AUTH_MODE="disabled")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(out), json.dumps(settings)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers: dict[int, float] = {}
    while child.poll() is None:
        for pid, rss in ray_workers_rss_mb().items():
            workers[pid] = max(workers.get(pid, 0.0), rss)
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["worker_peak_mb"] = sorted(workers.values(), reverse=True)
    return result


def ray_workers_rss_mb() -> dict[int, float]:
    """RSS of the processes running llmquant's Ray tasks now, by pid (Linux's /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if title.startswith("ray::") and any(t in title for t in TASKS):
                rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:"))
                found[int(proc.name)] = int(rss.split()[1]) / 1024
        except (OSError, ValueError, StopIteration):  # not a process, or one that just ended
            continue
    return found


def output_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="qwen2.5-coder-1.5b or smollm2")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--work", default="/tmp/llmquant-bench-executors")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per calibration-free row (RTN, NF4), the median's kept: timings here vary by 20%%")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--docs", action="store_true", help="only rebuild the docs section from the results")
    args = parser.parse_args()
    path = RESULTS / f"executors_{args.model}.json"
    if args.docs:
        write_docs()
        return
    from eval.benchmarks.bench_peers import read_speed_mb_s
    from eval.benchmarks.real_models import MODELS, model_folder, wiki_extracts

    model = model_folder(args.model)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data["setup"] = {"model": MODELS[args.model].description, "checkpoint_mb": sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6,
                     "read_mb_s": statistics.median(read_speed_mb_s(model) for _ in range(3)), "calibration": f"{args.calib_samples} x {args.calib_seqlen}",
                     "cpus": os.cpu_count()}
    rows = data.setdefault("rows", {})
    work = Path(args.work)
    cluster = None
    try:
        for row in sorted(args.rows.split(","), key=lambda r: r.startswith("ray")):  # no idle cluster beside local rows
            if row in rows and not args.redo:
                continue
            where, algo = row.split("-", 1)
            settings: dict[str, Any] = dict(ALGOS[algo])
            if algo != "nf4":
                settings["group_size"] = GROUP_SIZE.get(args.model, 128)
            if algo == "gptq":
                settings.update(calib=wiki_extracts(), calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
            if where == "ray":
                cluster = cluster or start_cluster()
                settings.update(executor="ray", ray_address=cluster.address, workers=2)
            out = work / row
            print(f"{row} ...", flush=True)
            runs = []
            for _ in range(1 if algo == "gptq" else args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_row(model, out, settings))
            result = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run
            result["wall_runs"] = [r["wall_s"] for r in runs]
            result["mb_s"] = data["setup"]["checkpoint_mb"] / result["wall_s"]
            result["vs_read"] = result["mb_s"] / data["setup"]["read_mb_s"]
            result["hash"] = output_hash(out)
            rows[row] = result
            path.write_text(json.dumps(data, indent=2) + "\n")
            print(f"{row}: {result['wall_s']:.1f} s, driver {result['driver_peak_mb']:.0f} MB, workers "
                  f"{[round(m) for m in result['worker_peak_mb']]} MB", flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()
    write_docs()


def table(data: dict[str, Any]) -> list[str]:
    setup, rows = data["setup"], data["rows"]
    lines = [f"{setup['model']}, checkpoint {setup['checkpoint_mb']:.0f} MB, raw read {setup['read_mb_s']:.0f} MB/s; GPTQ "
             f"calibration {setup['calibration']} tokens; {setup['cpus']} CPUs. Ray: a head with no CPUs and two worker "
             f"nodes of one CPU each on this machine, `--workers 2`. Rows without calibration: the median of "
             f"several runs (their range in brackets); raw read: the median of 3 reads.", "",
             "| row | wall s | MB/s (vs raw read) | driver peak RSS MB | worker peak RSS MB | MB moved per block (to / from the driver) | same bytes as local |",
             "|---|---|---|---|---|---|---|"]
    for row, r in rows.items():
        traffic = r.get("traffic") or []
        moved = (f"{sum(t[1] for t in traffic) / len(traffic):.1f} / {sum(t[2] for t in traffic) / len(traffic):.1f}"
                 if traffic else "-")
        local = rows.get("local-" + row.split("-", 1)[1], {}).get("hash")
        same = "-" if row.startswith("local") else ("yes" if r["hash"] == local else "no" if local else "?")
        workers = ", ".join(f"{m:.0f}" for m in r["worker_peak_mb"]) or "-"
        runs = r.get("wall_runs") or [r["wall_s"]]
        wall = f"{r['wall_s']:.1f}" + (f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else "")
        lines.append(f"| {row} | {wall} | {r['mb_s']:.0f} ({r['vs_read']:.2f}x) | {r['driver_peak_mb']:.0f} | "
                     f"{workers} | {moved} | {same} |")
    return lines


def write_docs() -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    text = docs.read_text()
    if START not in text:
        return
    body = []
    for path in sorted(RESULTS.glob("executors_*.json")):
        body += table(json.loads(path.read_text())) + [""]
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    docs.write_text(head + START + "\n" + "\n".join(body) + END + tail)


if __name__ == "__main__":
    main()
