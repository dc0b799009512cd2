import sys

from authz.audit.cli import main

sys.exit(main(["audit", *sys.argv[1:]]))
