"""`python -m linearize` runs the command line (what `torchrun -m linearize finetune ...` needs)."""

from .cli import app

app()
