"""`python -m chatmesh`: same as the `chatmesh` console script."""

from chatmesh.cli import main

raise SystemExit(main())
