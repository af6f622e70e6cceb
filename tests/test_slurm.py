"""slurm/train.sbatch on a real two-node Slurm cluster started by the tests (tests/slurm_cluster.py), CPU only.

Both "nodes" run on this machine, one training process each (MEDTUNE_CPU=1, gloo), so a job is a real two-node
launch: srun starts one `accelerate launch` per node, each with its own SLURM_NODEID as machine rank, meeting at
the first node's rendezvous. Skipped only where the cluster cannot start (no slurm/munge packages, not root);
in CI (CI=true) that is a failure instead.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conftest import RESUME_RTOL, ROOT, TINY_RECIPE, free_port, losses
from slurm_cluster import ClusterUnavailable, SlurmCluster, unavailable_reason

SBATCH = ROOT / "slurm" / "train.sbatch"
RANK_LINE = re.compile(r"medtune: node=\S+ slurm_node=(\S+) machine_rank=(\d+) of (\d+)")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def test_sbatch_rank_is_expanded_on_each_node():
    """$SLURM_NODEID must reach `accelerate launch` unexpanded, inside the single-quoted srun command: expanded
    in the batch shell it would be the first node's 0 on every node, and the rendezvous would never complete."""
    text = SBATCH.read_text()
    step = re.search(r"^srun [^\n]*bash -c '(.*?)'", text, re.S | re.M)
    assert step, "train.sbatch must launch through `srun ... bash -c '...'`"
    body = step.group(1)
    assert re.search(r'--machine_rank "\$SLURM_NODEID"', body)
    assert "exec accelerate launch" in body
    outside = text[: step.start()] + text[step.end():]
    assert "SLURM_NODEID" not in re.sub(r"#.*", "", outside), "SLURM_NODEID used outside the per-node command"
    for flag in ("--num_machines", "--main_process_ip", "--main_process_port", "--rdzv_backend", "--resume true"):
        assert flag in body
    for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm test cluster required in CI: {reason}")
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except ClusterUnavailable as err:
        c.stop()
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    yield c
    c.stop()


def submit(cluster: SlurmCluster, tmp_path: Path, out: Path, tiny_model_dir: Path, accelerate_config: str,
           steps: int, env: dict[str, str] | None = None) -> tuple[str, Path]:
    logs = tmp_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_env = {"MEDTUNE_CPU": "1", "RECIPE": str(TINY_RECIPE), "MASTER_PORT": str(free_port()),
               "ACCELERATE_CONFIG": f"configs/accelerate/{accelerate_config}", "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    job = cluster.sbatch(
        "--gpus-per-node=0", "--cpus-per-task=1", "--time=20", f"--chdir={ROOT}",
        f"--output={logs}/%x-%j.out", str(SBATCH),
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
        "--data_cache_dir", str(tmp_path / "data-cache"), "--max_steps", str(steps), "--max_length", "128",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "steps",
        "--save_steps", str(steps), "--sample_prompt", "", "--generation_eval_samples", "0", "--report_to", "none",
        cwd=ROOT, env=job_env,
    )
    return job, logs / f"medtune-{job}.out"


def read(log: Path) -> str:
    return log.read_text() if log.exists() else "(no log)"


@pytest.mark.slow
def test_two_node_zero3_job_completes_with_distinct_ranks(cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    job, log = submit(cluster, tmp_path, out, tiny_model_dir, "deepspeed_zero3_multinode.yaml", steps=6)
    info = cluster.wait_state(job, DONE, timeout=600)
    text = read(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"

    ranks = {(node, int(rank), int(of)) for node, rank, of in RANK_LINE.findall(text)}
    assert {(r, of) for _, r, of in ranks} == {(0, 2), (1, 2)}, text[-4000:]
    assert {node for node, _, _ in ranks} == {"node1", "node2"}
    assert "processes=2" in text
    adapters = list(out.glob("**/adapter_model.safetensors"))
    assert out / "adapter_model.safetensors" in adapters
    assert (out / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_to_the_same_loss(cluster, tiny_model_dir, tmp_path):
    """USR1 to the batch shell (what `#SBATCH --signal=B:USR1@300` does before the time limit): the trap forwards
    it to the training processes, they checkpoint and requeue the job, and the requeued run resumes from the
    checkpoint to the same per-step losses as an uninterrupted job."""
    from medtune.preemption import find_resume_checkpoint

    steps, config = 10, "multi_gpu_multinode.yaml"
    straight = tmp_path / "straight"
    job, log = submit(cluster, tmp_path / "a", straight, tiny_model_dir, config, steps)
    info = cluster.wait_state(job, DONE, timeout=600)
    assert info["JobState"] == "COMPLETED", f"{info}\n{read(log)[-6000:]}"

    out = tmp_path / "preempted"
    job, log = submit(cluster, tmp_path / "b", out, tiny_model_dir, config, steps)
    deadline = time.monotonic() + 300
    while read(log).count("'loss'") < 2:
        assert time.monotonic() < deadline, read(log)[-6000:]
        assert cluster.job(job).get("JobState") not in DONE, read(log)[-6000:]
        time.sleep(0.5)
    cluster.scancel("--batch", "--signal=USR1", job)

    deadline = time.monotonic() + 600
    while int(cluster.job(job).get("Restarts", 0)) < 1:
        assert time.monotonic() < deadline, read(log)[-6000:]
        time.sleep(1)
    checkpoint = find_resume_checkpoint(str(out))
    assert checkpoint is not None, read(log)[-6000:]
    stopped_at = int(Path(checkpoint).name.split("-")[1])
    assert stopped_at < steps

    info = cluster.wait_state(job, DONE, timeout=600)
    text = read(log)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert f"medtune: job={job} preempted" in text
    assert "preempted" in info.get("Comment", "")
    assert f"medtune: job={job} restart=1" in text
    assert f"resuming from {checkpoint}" in text

    expected, resumed = losses(straight / f"checkpoint-{steps}"), losses(out / f"checkpoint-{steps}")
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=RESUME_RTOL), (step, resumed, expected)
    assert (out / "adapter_model.safetensors").exists()
