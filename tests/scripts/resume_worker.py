"""A training run that SIGKILLs itself mid-way, after a checkpoint (see tests/test_reliability.py).

    python resume_worker.py MODE OUTPUT_DIR KILL_AT_STEP
"""

import os
import signal
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from transformers import TrainerCallback  # noqa: E402

from tests.test_reliability import build  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crashed node


if __name__ == "__main__":
    mode, output_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer = build(mode, output_dir)
    trainer.add_callback(KillAt(kill_at))
    trainer.train()
    sys.exit("not killed")
