"""`python -m finetune ...` is the `finetune` command (and what `torchrun -m finetune` starts)."""

from .cli import main

if __name__ == "__main__":
    main()
