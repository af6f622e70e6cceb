"""`accelerate launch` for one node of slurm/train.sbatch, exiting with EXIT_PREEMPTED when its ranks did.

    python -m medtune.training.node_launch <accelerate launch arguments> launch/train.py --config <recipe> ...

The batch script requeues a job only when its ranks stopped for a signal with a complete checkpoint, not when they
failed. accelerate launch hides that: torchrun turns any non-zero worker status into a ChildFailedError, and
accelerate exits 1 (a single process: a CalledProcessError, also 1). This keeps the arguments and everything else of
`accelerate launch` and only maps "the ranks exited EXIT_PREEMPTED" to that status.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from medtune.training.preemption import EXIT_PREEMPTED

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        # Once one rank has exited non-zero, torchrun ends the others with SIGTERM; the ranks still exiting then
        # (they ignore it while they train) are listed with -SIGTERM.
        codes = {f.exitcode for f in err.failures.values()}
        if EXIT_PREEMPTED not in codes or not codes <= {EXIT_PREEMPTED, -signal.SIGTERM}:
            raise
    except subprocess.CalledProcessError as err:
        if err.returncode != EXIT_PREEMPTED:
            raise
    else:
        return
    # The first node to exit makes srun (--kill-on-bad-exit) send SIGTERM to the others. Killed by it, this process
    # would report a signal, which srun ranks above any exit status; ignored, srun returns EXIT_PREEMPTED.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"medtune: the training processes stopped for a signal (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
