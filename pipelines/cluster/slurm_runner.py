"""A cohort inside one SLURM allocation with dask-jobqueue's ``SLURMRunner``.

``srun`` starts one Python process per task: task 0 becomes the scheduler, task 1 runs this
script's client code, every other task is a worker (here: one per GPU). Submit with
``sbatch pipelines/cluster/slurm_runner.sbatch cohort.csv heatmaps``.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main() -> int:
    from dask_jobqueue.slurm import SLURMRunner
    from distributed import Client

    inputs, out_dir = sys.argv[1:-1], sys.argv[-1]
    job = os.environ.get("SLURM_JOB_ID", "local")
    with SLURMRunner(scheduler_file=f"scheduler-{job}.json",
                     worker_options={"resources": {"GPU": 1}, "nthreads": 2}) as runner:
        with Client(runner) as client:  # only task 1 gets here
            client.wait_for_workers(runner.n_workers)
            return subprocess.call(["tilefcn", "run", *inputs, "--out-dir", out_dir,
                                    "--device", "cuda",
                                    "--scheduler", runner.scheduler_address])


if __name__ == "__main__":
    sys.exit(main())
