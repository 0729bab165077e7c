"""Benchmarks of boft-plugin against stock PEFT BOFT, LoRA, OFT and the frozen base (see ``bench_boft.py``)."""
