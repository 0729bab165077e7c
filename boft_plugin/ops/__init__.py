"""Pure tensor maths (no PEFT import): the fast BOFT operators and their dense reference twin."""
