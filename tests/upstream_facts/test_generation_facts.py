"""What the GRPO / RLOO generation path relies on in transformers, checked against the pinned version."""

from __future__ import annotations


def test_generate_syncs_the_ranks_of_a_model_marked_fsdp_managed():
    """transformers' ``generate`` turns ``synced_gpus`` on for ``is_fsdp_managed_module(model)``, which reads the
    attribute :func:`boft_plugin.distributed.fsdp2.generation.mark_fsdp_managed` sets (transformers' own FSDP2 path
    sets the same one)."""
    import inspect

    from peft import BOFTConfig, get_peft_model
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.generation import utils

    import boft_plugin
    from boft_plugin.distributed.fsdp2.generation import mark_fsdp_managed
    from boft_plugin.toy.models import tiny_llama

    boft_plugin.register()
    model = get_peft_model(tiny_llama(seed=0), BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    assert not is_fsdp_managed_module(model.get_base_model())
    mark_fsdp_managed(model)
    assert is_fsdp_managed_module(model.get_base_model()) and is_fsdp_managed_module(model)
    assert "is_fsdp_managed_module(self)) and world_size > 1" in inspect.getsource(utils.GenerationMixin)
