"""A cohort on SLURM with dask-jobqueue's ``SLURMCluster``: one SLURM job per GPU worker.

Run from a login node (it submits the worker jobs and stays the client)::

    pip install dask-jobqueue
    python pipelines/cluster/slurm_jobqueue.py cohort.csv --out-dir heatmaps --jobs 8 \
        --partition gpu --account myproject

Each worker job asks for one GPU (``--gres=gpu:1``) and advertises ``GPU=1``, so tilefcn's
CUDA tasks (annotated ``resources={"GPU": 1}``) run one model per GPU. Rerun the same command
after a crash or a lost scheduler: complete scans are skipped, unfinished ones resume.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="scans, folders or CSV manifests")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM worker jobs (GPUs)")
    parser.add_argument("--partition", default="gpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per worker job")
    parser.add_argument("--memory", default="32GB", help="memory per worker job")
    parser.add_argument("--model", default="tissue")
    args, extra = parser.parse_known_args()  # anything else goes to `tilefcn run`

    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        queue=args.partition, account=args.account, walltime=args.walltime,
        cores=args.cores, processes=1, memory=args.memory,
        job_extra_directives=["--gres=gpu:1"],
        # threads per worker: decode/write overlap with the GPU; one GPU resource each
        worker_extra_args=["--resources", "GPU=1", "--nthreads", "2"])
    cluster.scale(jobs=args.jobs)
    try:
        print(f"Dashboard: {cluster.dashboard_link}", file=sys.stderr)
        command = ["tilefcn", "run", *args.inputs, "--out-dir", args.out_dir,
                   "--model", args.model, "--device", "cuda",
                   "--scheduler", cluster.scheduler_address, *extra]
        return subprocess.call(command)  # exit 1 when any scan failed (see the summary)
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
