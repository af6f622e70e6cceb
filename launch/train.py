"""Training entry point: `accelerate launch launch/train.py --config <recipe>` or plain `python launch/train.py ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medtune.training import stop_signal  # noqa: E402

stop_signal.listen()  # before the seconds of importing torch: a stop signal from now on is remembered, not lost

from medtune.training.train import main  # noqa: E402

if __name__ == "__main__":
    main()
