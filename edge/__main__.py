import sys

from zchannels.cli import main

sys.exit(main(["edge", *sys.argv[1:]]))
