"""The main job (``boft-plugin demo``): SmolLM2-135M-Instruct from the package registry, its persona task, SFT + DPO."""
