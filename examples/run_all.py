"""Regenerate the README's example figures: run every example at its README budget, niced, on a fixed
number of threads, after printing the device; the output is also written to runs/examples.log.

    python examples/run_all.py                  # all, 1 thread each (the README's figures)
    python examples/run_all.py --only st_minilm_manpages --threads 2

The man-pages set is built first when it is missing (benchmarks/quality/build_manpages.py).
"""
import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "llm_encoder_train_step": [["examples/llm_encoder_train_step.py"]],
    "distributed_loss": [["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "examples/distributed_loss.py"],
                         ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                          "examples/distributed_loss.py", "--strategy", "ring"]],
    "st_minilm_manpages": [["examples/st_minilm_manpages.py", "--threads", "{threads}"]],
    "train_dpkg": [["examples/train_dpkg.py", "--threads", "{threads}"]],
}


def device(threads):
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, CPU {cpu}, {os.cpu_count()} CPUs, "
            f"{threads} thread(s) per run, nice 10, commit {commit.strip() or 'unknown'}, "
            f"python {sys.version.split()[0]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=tuple(RUNS), default=list(RUNS))
    args = ap.parse_args(argv)
    log_path = ROOT / "runs" / "examples.log"
    log_path.parent.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w", encoding="utf-8") as log:
        def say(text):
            print(text, flush=True)
            log.write(text + "\n")

        say(device(args.threads))
        if "st_minilm_manpages" in args.only and not (ROOT / "benchmarks/quality/data/manpages/qrels").is_dir():
            subprocess.run([sys.executable, "benchmarks/quality/build_manpages.py"], cwd=ROOT, env=env, check=True)
        for name in args.only:
            for argv_ in RUNS[name]:
                cmd = ["nice", "-n", "10", sys.executable] + [a.format(threads=args.threads) for a in argv_]
                say(f"\n$ {' '.join(cmd)}")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                for line in proc.stdout:
                    say(line.rstrip("\n"))
                if proc.wait():
                    raise SystemExit(f"{name}: exit code {proc.returncode} (output in {log_path})")


if __name__ == "__main__":
    main()
