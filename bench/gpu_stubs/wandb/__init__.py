"""Stand-in for wandb on the GPU machine, where bench/gpu.sh puts it on the path only if wandb is
missing. sae-lens imports wandb at import time (sae_lens/config.py) but calls it only while
training; saecat never trains, so an empty module lets sae-lens load without carrying wandb's
20 MB wheel and its dozen dependencies. Any use of it fails loudly."""

SAECAT_STUB = True


def __getattr__(name: str):
    raise AttributeError(f"wandb.{name}: this is bench/gpu_stubs' empty stand-in for wandb (not installed here)")
