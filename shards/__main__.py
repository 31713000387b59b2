import sys

from shards.cli import cli

sys.exit(cli())
