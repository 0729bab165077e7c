"""``boft-plugin`` with every checkpoint's completion marker written ``SLOW_COMMIT_S`` seconds late (default 5).

Emulates a slow shared filesystem so that a test can kill a run while a checkpoint is being committed:

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/slow_commit.py sft --config recipe.yaml
"""

import os
import sys
import time

from boft_plugin.recipes.checkpoints import markers

_complete = markers.complete_checkpoint


def _slow_complete(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_COMMIT_S", "5")))
    return _complete(*args, **kwargs)


markers.complete_checkpoint = _slow_complete  # before the trainers module binds the name

from boft_plugin.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
