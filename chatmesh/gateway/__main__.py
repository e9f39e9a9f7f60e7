"""`python -m chatmesh.gateway` (see `chatmesh.gateway.cli`)."""

import sys

from chatmesh.gateway.cli import main

sys.exit(main())
