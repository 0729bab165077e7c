"""Hook of the recipe option ``fsdp2_pre_shard``: FSDP2 without accelerate's FSDP plugin.

accelerate 1.15 does not run FSDP on the CPU (``fsdp_version: 2`` silently falls back to DDP with
``use_cpu: true``; DESIGN.md section 5), so on the CPU the FSDP2 route is ``torch.distributed.run`` with this
option: the adapted ``PeftModel`` is sharded with ``fully_shard`` *after* the adapter is added (sharding first
leaves the adapter unsynchronised) and *before* the trainer wraps it (the recipe then stops accelerate from wrapping
it in DDP). The sharding itself is ``boft_plugin.distributed.fsdp.shard_for_fsdp2`` (the FSDP2 sharding issue);
in a build without that function this hook raises ``NotImplementedError``.
"""

from __future__ import annotations

import importlib
import importlib.util

SHARD_MODULE = "boft_plugin.distributed.fsdp"
SHARD_FUNCTION = "shard_for_fsdp2"


def pre_shard_fsdp2(model):
    """Return ``model`` (a ``PeftModel`` with its adapter added) sharded with FSDP2 by ``shard_for_fsdp2``."""
    if importlib.util.find_spec(SHARD_MODULE) is None:
        raise NotImplementedError(
            f"fsdp2_pre_shard needs {SHARD_MODULE}.{SHARD_FUNCTION}, which this build does not have yet (it is "
            "being written under the FSDP2 sharding issue). On GPUs use integrations/accelerate/fsdp2.yaml; on the "
            "CPU use DDP (torch.distributed.run) or DeepSpeed ZeRO-2/3 meanwhile."
        )
    module = importlib.import_module(SHARD_MODULE)
    shard = getattr(module, SHARD_FUNCTION, None)
    if shard is None:
        raise NotImplementedError(f"{SHARD_MODULE} has no {SHARD_FUNCTION}() yet (FSDP2 sharding issue)")
    sharded = shard(model)
    return model if sharded is None else sharded
