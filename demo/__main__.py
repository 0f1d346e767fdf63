"""`python -m demo`: see demo/__init__.py."""

from demo.main import main

raise SystemExit(main())
