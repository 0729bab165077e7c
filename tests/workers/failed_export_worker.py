"""A rank of a 2-rank gloo run (FSDP2-sharded model) whose export fails on rank 0; every rank must raise, none
may hang in a gather.

    python -m torch.distributed.run --nproc_per_node 2 failed_export_worker.py CASE OUT_DIR

CASE ``staging``: rank 0 cannot create its staging directory (the target is a file);
``unpicklable``: rank 0's shard writer raises an exception that cannot be pickled;
``lora_svd``: rank 0's SVD fails in the middle of ``export_lora`` (the other rank is still gathering layers).
"""

import os
import sys

import torch.distributed as dist
from peft import BOFTConfig, get_peft_model

import boft_plugin
from boft_plugin.distributed.fsdp2.shard import shard_for_fsdp2
from boft_plugin.export import lora, merged
from boft_plugin.runtime.process_exit import exit_after_distributed_run
from boft_plugin.toy.models import tiny_llama

case, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
boft_plugin.register()
model = get_peft_model(tiny_llama(seed=0), BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]))
shard_for_fsdp2(model)  # sharded: every gather of the export is a collective
target = os.path.join(out, "merged")
if case == "staging" and rank == 0:
    os.makedirs(out, exist_ok=True)
    with open(target, "w") as handle:  # a file where the export's directory should go
        handle.write("not a directory")
if case == "unpicklable" and rank == 0:

    class LocalError(RuntimeError):  # defined in a function's scope: pickle cannot find it by name
        def __reduce__(self):
            raise TypeError("cannot pickle LocalError")

    def failing_write(self, entry, value):
        raise LocalError("disk full while writing " + entry.key)

    merged.ShardWriter.write = failing_write
if case == "lora_svd" and rank == 0:
    calls = []

    def failing_svd(delta):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("SVD did not converge (layer 2)")
        return real_svd(delta)

    real_svd, lora.spectrum_of = lora.spectrum_of, failing_svd
dist.barrier()
try:
    if case == "lora_svd":
        boft_plugin.export_lora(model, os.path.join(out, "lora"), rank=4)
    else:
        boft_plugin.export_merged(model, target)
    sys.stdout.write(f"rank {rank}: no error\n")
    code = 0
except Exception as err:  # noqa: BLE001 - the test reads what every rank raised
    sys.stdout.write(f"rank {rank}: raised {type(err).__name__}: {err}\n")
    code = 3
sys.stdout.flush()
exit_after_distributed_run(code)
