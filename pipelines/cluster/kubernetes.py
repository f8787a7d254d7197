"""A cohort on Kubernetes: a dask-kubernetes ``KubeCluster`` (the Dask operator), or the
scheduler of a helm-installed Dask (`helm install dask dask/dask`).

    # operator: the cluster is created here and deleted at the end
    python pipelines/cluster/kubernetes.py cohort.csv --out-dir /data/heatmaps --workers 8
    # helm chart: connect to its scheduler service instead (no cluster created)
    tilefcn run cohort.csv --out-dir /data/heatmaps \
        --scheduler tcp://dask-scheduler.default.svc.cluster.local:8786

The image must have tilefcn installed (workers import it), and scans and outputs must be on
storage every pod mounts at the same path (a PersistentVolumeClaim).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--image", default="ghcr.io/example/tilefcn:latest")
    parser.add_argument("--gpu", action="store_true", help="one nvidia.com/gpu per worker")
    args, extra = parser.parse_known_args()

    from dask_kubernetes.operator import KubeCluster, make_cluster_spec

    limits = {"cpu": "4", "memory": "16Gi", **({"nvidia.com/gpu": "1"} if args.gpu else {})}
    spec = make_cluster_spec(name="tilefcn", image=args.image, n_workers=args.workers,
                             resources={"limits": limits, "requests": limits})
    if args.gpu:  # advertise the GPU to dask so CUDA tasks run one model per GPU
        worker = spec["spec"]["worker"]["spec"]["containers"][0]
        worker["args"] = [*worker.get("args", []), "--resources", "GPU=1"]
    with KubeCluster(custom_cluster_spec=spec) as cluster:
        print(f"Dashboard: {cluster.dashboard_link}", file=sys.stderr)
        device = ["--device", "cuda"] if args.gpu else []
        return subprocess.call(["tilefcn", "run", *args.inputs, "--out-dir", args.out_dir,
                                "--scheduler", cluster.scheduler_address, *device, *extra])


if __name__ == "__main__":
    sys.exit(main())
