"""`deepspeed [--num_gpus N | --hostfile H] --module dualloop.train --config CFG.yaml [key=value ...]`."""
import sys

from dualloop.train.trainer import main

sys.exit(main(sys.argv[1:]))
