"""slurm/train.sbatch on a real two-node Slurm cluster started by the tests (tests/slurm_cluster.py), CPU only.

Both "nodes" run on this machine (MEDTUNE_CPU=1, gloo), so a job is a real two-node launch: srun starts one
launcher per node, each with its own SLURM_NODEID as machine rank, meeting at the first node's rendezvous, with one
or two training processes per node. Jobs ask for 2 CPUs per task, and the cluster binds each task to its CPUs.
Skipped only where the cluster cannot start (no slurm/munge packages, not root); in CI (CI=true) that is a failure
instead.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RECIPE, free_port, losses
from slurm_cluster import ClusterUnavailable, SlurmCluster, unavailable_reason

SBATCH = ROOT / "slurm" / "train.sbatch"
CPUS_PER_TASK = 2  # every CPU of a test node, so that the jobs (one at a time) do not share one
RANK_LINE = re.compile(r"medtune: node=\S+ slurm_node=(\S+) machine_rank=(\d+) of (\d+)")
AFFINITY_LINE = re.compile(r"rank (\d+) on \S+: CPU affinity (\d+)")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def test_sbatch_script():
    """$SLURM_NODEID must reach the launcher unexpanded, inside the single-quoted srun command: expanded in the
    batch shell it would be the first node's 0 on every node, and the rendezvous would never complete. srun must
    get the CPUs (since Slurm 22.05 it does not inherit --cpus-per-task), and the stop-signal trap must be set
    before data preparation."""
    text = SBATCH.read_text()
    step = re.search(r"^srun ([^\n]*)bash -c '(.*?)'", text, re.S | re.M)
    assert step, "train.sbatch must launch through `srun ... bash -c '...'`"
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in step.group(1)
    body = step.group(2)
    assert re.search(r'--machine_rank "\$SLURM_NODEID"', body)
    assert "exec python -m medtune.training.node_launch" in body
    outside = text[: step.start()] + text[step.end():]
    assert "SLURM_NODEID" not in re.sub(r"#.*", "", outside), "SLURM_NODEID used outside the per-node command"
    for flag in ("--num_machines", "--main_process_ip", "--main_process_port", "--rdzv_backend", "--resume true"):
        assert flag in body
    for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in text
    assert text.index("trap 'on_stop USR1' USR1") < text.index("python -m medtune.prepare_data")


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
           steps: int, env: dict[str, str] | None = None, overrides: tuple[str, ...] = ()) -> tuple[str, Path]:
    """`overrides`: recipe arguments after the defaults below (the last value of a key wins)."""
    logs = tmp_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_env = {"MEDTUNE_CPU": "1", "RECIPE": str(TINY_RECIPE), "MASTER_PORT": str(free_port()),
               "ACCELERATE_CONFIG": f"configs/accelerate/{accelerate_config}", "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    job = cluster.sbatch(
        "--gpus-per-node=0", f"--cpus-per-task={CPUS_PER_TASK}", "--time=20", f"--chdir={ROOT}",
        f"--output={logs}/%x-%j.out", str(SBATCH),
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
        "--data_cache_dir", str(tmp_path / "data-cache"), "--max_steps", str(steps), "--max_length", "128",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "steps",
        "--save_steps", str(steps), "--sample_prompt", "", "--generation_eval_samples", "0", "--report_to", "none",
        *overrides, cwd=ROOT, env=job_env,
    )
    return job, logs / f"medtune-{job}.out"


def read(log: Path) -> str:
    # Several processes append to the log: one's write can split another's multi-byte character (progress bars).
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def wait_for(cluster: SlurmCluster, job: str, log: Path, ready, timeout: float = 600) -> str:
    """The job's log once ready(log text) holds; fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while not ready(text := read(log)):
        assert time.monotonic() < deadline, f"timed out; log:\n{text[-6000:]}"
        assert cluster.job(job).get("JobState") not in DONE, f"{cluster.job(job)}\n{text[-6000:]}"
        time.sleep(0.2)
    return text


def wait_restarts(cluster: SlurmCluster, job: str, log: Path, restarts: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while int((info := cluster.job(job)).get("Restarts", 0)) < restarts:
        assert time.monotonic() < deadline and info.get("JobState") not in DONE, f"{info}\n{read(log)[-6000:]}"
        time.sleep(0.5)


def run_of(text: str, job: str, restart: int) -> str:
    """The part of a requeued job's (appended) log written by its `restart`-th run."""
    return re.split(rf"medtune: job={job} restart=\d+ ", text)[restart + 1]


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
    # srun gave each node's task the job's CPUs: without --cpus-per-task the cluster would bind it to one. Each rank
    # says so once.
    affinity = AFFINITY_LINE.findall(text)
    assert sorted(int(rank) for rank, _ in affinity) == [0, 1], text[-4000:]
    assert {int(cpus) for _, cpus in affinity} == {CPUS_PER_TASK}, text[-4000:]
    adapters = list(out.glob("**/adapter_model.safetensors"))
    assert out / "adapter_model.safetensors" in adapters
    assert (out / "adapter_model.safetensors").stat().st_size > 0


def seconds_between(first: str, second: str) -> float:
    return (datetime.fromisoformat(second) - datetime.fromisoformat(first)).total_seconds()


@pytest.mark.slow
def test_preempted_job_is_requeued_by_the_batch_shell_and_finishes(cluster, tiny_model_dir, tmp_path):
    """The reference recipe's strategies (evaluation and a checkpoint per epoch, W&B on, offline), two ranks per
    node, rank 0 ending training 5 s after the others (as W&B's finish can): USR1 to the batch shell (what
    `#SBATCH --signal=B:USR1@300` does before the time limit) mid-epoch. The ranks checkpoint without evaluating
    and exit "preempted", the batch shell requeues the job, and the requeued job resumes from the checkpoint into
    the same W&B run, evaluates once at the epoch end and finishes."""
    from medtune.checkpoints import find_resume_checkpoint, step_of
    from medtune.monitoring import RUN_ID_FILE

    out = tmp_path / "out"
    reference = ("--max_steps", "-1", "--num_train_epochs", "1", "--max_train_samples", "96",  # ~12 steps
                 "--max_eval_samples", "8", "--eval_strategy", "epoch", "--save_strategy", "epoch",
                 "--report_to", "wandb")
    job, log = submit(cluster, tmp_path, out, tiny_model_dir, "multi_gpu_multinode.yaml", 10,
                      env={"PROCS_PER_NODE": "2", "TRAIN_SCRIPT": "tests/slurm_train.py", "SLOW_END_SECONDS": "5",
                           # Submitted from a process that used W&B (a notebook; this test session): its service
                           # token, which sbatch passes on, names a socket the job cannot reach.
                           "WANDB_SERVICE": f"3-{os.getpid()}-unix-{tmp_path}/gone.sock"},
                      overrides=reference)
    wait_for(cluster, job, log, lambda text: text.count("'loss'") >= 2)
    cluster.scancel("--batch", "--signal=USR1", job)

    wait_restarts(cluster, job, log, 1)
    checkpoint = find_resume_checkpoint(out)
    assert checkpoint is not None, read(log)[-6000:]
    run_id = (Path(checkpoint) / RUN_ID_FILE).read_text()
    info = cluster.wait_state(job, DONE, timeout=600)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    assert "preempted" in info.get("Comment", "")
    first = run_of(text, job, 0)
    assert "processes=4" in first
    signalled = re.search(rf"medtune: job={job} got SIGUSR1 at (\S+)$", first, re.M)
    requeued = re.search(rf"medtune: job={job} requeueing at (\S+): the ranks stopped for a signal", first)
    assert signalled and requeued, first[-6000:]
    print(f"USR1 -> requeue: {seconds_between(signalled.group(1), requeued.group(1)):.0f} s")
    assert "'eval_loss'" not in first, "evaluated after the stop"
    assert "W&B could not start" not in text, text[-6000:]
    assert f"resuming from {checkpoint}" in run_of(text, job, 1)
    end = Path(find_resume_checkpoint(out))
    assert step_of(checkpoint) < step_of(end), "stopped at the epoch's end: nothing left to resume"
    assert sorted(losses(end)) == list(range(1, step_of(end) + 1))
    history = json.loads((end / "trainer_state.json").read_text())["log_history"]
    assert len([e for e in history if "eval_loss" in e]) == 1
    assert (end / RUN_ID_FILE).read_text() == run_id, "resumed into another W&B run"
    assert list(out.glob("wandb/offline-run-*"))
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_stop_signal_before_training_requeues_without_training(cluster, tiny_model_dir, tmp_path):
    """USR1 during data preparation (in the batch shell), then, in the requeued job, during model loading (in the
    training processes): each time the job is requeued without a training step, then it finishes."""
    from medtune.checkpoints import checkpoints

    steps, out = 4, tmp_path / "out"
    job, log = submit(cluster, tmp_path, out, tiny_model_dir, "multi_gpu_multinode.yaml", steps,
                      env={"TRAIN_SCRIPT": "tests/slurm_train.py", "SLOW_LOAD_SECONDS": "8"})
    wait_for(cluster, job, log, lambda text: f"medtune: job={job} restart=0 " in text)
    cluster.scancel("--batch", "--signal=USR1", job)  # data preparation takes seconds, if only to import
    wait_restarts(cluster, job, log, 1)
    wait_for(cluster, job, log, lambda text: "loading the model" in text.partition(f"job={job} restart=1 ")[2])
    cluster.scancel("--batch", "--signal=USR1", job)
    wait_restarts(cluster, job, log, 2)

    info = cluster.wait_state(job, DONE, timeout=600)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", f"{info}\n{text[-6000:]}"
    preparing, loading, finishing = (run_of(text, job, r) for r in range(3))
    assert "requeueing at" in preparing and "stop signal during data preparation" in preparing, preparing[-4000:]
    assert "loading the model" not in preparing
    assert "stop signal before the first step" in loading and "the ranks stopped for a signal" in loading
    assert "'loss'" not in preparing + loading, "trained before the requeue"
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{steps}"]
    assert sorted(losses(out)) == list(range(1, steps + 1))
