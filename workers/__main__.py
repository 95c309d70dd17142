import sys

from zchannels.cli import main

sys.exit(main(["workers", *sys.argv[1:]]))
