"""`deepspeed [--num_gpus N] --module dualloop.eval ...` or `torchrun --nproc_per_node N -m dualloop.eval ...`:
`dualloop eval` with the samples shared among the ranks."""
import sys

from dualloop.eval.evaluate import main

sys.exit(main(sys.argv[1:]))
